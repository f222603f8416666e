/* Sums over the overlap of two images, for rotstn's rigid registration.
 *
 * Compiled with rotate_cpu.c into one library (rotstn/_kernels/compiled.py) and
 * called through ctypes by rotstn/registration/_refine.py, which holds the
 * same computation in torch ops for other devices and for machines without a
 * C compiler; tests compare the two.
 *
 * One call handles R rows, each one hypothesis (θ, t) of one pair: a level-
 * pixel affine map q = (a0·x + a1·y + a2, a3·x + a4·y + a5) that takes N fixed
 * points (x, y) into the moving level. For every point:
 *
 *   inside = q within [m, W-1-m] × [m, H-1-m] (m: the frame margin),
 *   g      = moving bilinearly sampled at q,
 *   w      = point weight · inside · (moving's mask sampled at q > 0.999, if any),
 *
 * and with the point's terms J (k of them) the row gets
 *
 *   Σ w·J_i·J_j (i <= j, row-major), then Σ w·J_i·g (i < k), then Σ w·g²:
 *
 * k(k+1)/2 + k + 1 doubles. k = 5 with J = (jθ, gx, gy, f, 1) gives a
 * Gauss–Newton step's normal equations (21 sums); k = 2 with J = (f, 1) the
 * moments of a normalised cross-correlation (6 sums: Σwf², Σwf, Σw, Σwfg,
 * Σwg, Σwg²).
 *
 * The inner loop is written for the compiler to vectorise (omp simd; the four
 * corners are gathers): clamped indices keep every load inside the image,
 * whatever q is (NaN included), and a point outside gets weight 0. Sums run in
 * the images' type over blocks of BLOCK points and in double across blocks.
 * Rows are split over an OpenMP team (torch's pool) when the build has OpenMP;
 * each row is summed by one thread in a fixed order, so results do not depend
 * on the thread count.
 *
 * The body below is compiled twice, for float and for double: the file
 * includes itself with SUMS_T and SUMS_SUFFIX set.
 */
#ifndef SUMS_T

#include <math.h>
#include <stdint.h>

#define BLOCK 128
#define GLUE_(a, b) a##b
#define GLUE(a, b) GLUE_(a, b)
#if defined(__GNUC__)
#define SUMS_INLINE static inline __attribute__((always_inline))
#else
#define SUMS_INLINE static inline
#endif

#define SUMS_T float
#define SUMS_SUFFIX _f32
#include __FILE__
#undef SUMS_T
#undef SUMS_SUFFIX

#define SUMS_T double
#define SUMS_SUFFIX _f64
#include __FILE__
#undef SUMS_T
#undef SUMS_SUFFIX

#else /* the body, for one type */

typedef SUMS_T GLUE(real, SUMS_SUFFIX);
#define T GLUE(real, SUMS_SUFFIX)

/* One row. gradient and masked are constants at each call site, so each of the four combinations is
 * its own loop without branches. */
SUMS_INLINE void GLUE(row_sums, SUMS_SUFFIX)(const T *restrict x, const T *restrict y, int64_t n,
                                             const T *restrict f, const T *restrict pw, const T *restrict jt,
                                             const T *restrict gx, const T *restrict gy,
                                             const T *restrict img, const T *restrict mask, int64_t H,
                                             int64_t W, double margin, const double *a, double *restrict out,
                                             const int gradient, const int masked) {
    const T a0 = (T)a[0], a1 = (T)a[1], a2 = (T)a[2], a3 = (T)a[3], a4 = (T)a[4], a5 = (T)a[5];
    const T lox = (T)margin, hix = (T)((double)(W - 1) - margin);
    const T loy = (T)margin, hiy = (T)((double)(H - 1) - margin);
    const T wmax = (T)(W - 1), hmax = (T)(H - 1);
    const int32_t xlast = (int32_t)(W - 2), ylast = (int32_t)(H - 2), stride = (int32_t)W;
    double tot[21] = {0};
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t stop = start + BLOCK < n ? start + BLOCK : n;
        T s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0, s8 = 0, s9 = 0, s10 = 0;
        T s11 = 0, s12 = 0, s13 = 0, s14 = 0, s15 = 0, s16 = 0, s17 = 0, s18 = 0, s19 = 0, s20 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s16, s17, s18, s19, s20)
        for (int64_t i = start; i < stop; i++) {
            const T qx = a0 * x[i] + a1 * y[i] + a2, qy = a3 * x[i] + a4 * y[i] + a5;
            const int in = (qx >= lox) & (qx <= hix) & (qy >= loy) & (qy <= hiy);
            /* (NaN >= 0) is false: NaN goes to 0, and any point outside samples a pixel of the frame. */
            T cx = qx >= 0 ? qx : 0, cy = qy >= 0 ? qy : 0;
            cx = cx <= wmax ? cx : wmax;
            cy = cy <= hmax ? cy : hmax;
            int32_t ix = (int32_t)cx, iy = (int32_t)cy;
            ix = ix < xlast ? ix : xlast;
            iy = iy < ylast ? iy : ylast;
            const T wx = cx - (T)ix, wy = cy - (T)iy;
            const int32_t o = iy * stride + ix;
            const T top = img[o] + wx * (img[o + 1] - img[o]);
            const T bottom = img[o + stride] + wx * (img[o + stride + 1] - img[o + stride]);
            const T g = top + wy * (bottom - top);
            T w = in ? pw[i] : 0;
            if (masked) {
                const T mt = mask[o] + wx * (mask[o + 1] - mask[o]);
                const T mb = mask[o + stride] + wx * (mask[o + stride + 1] - mask[o + stride]);
                w = (mt + wy * (mb - mt)) > (T)0.999 ? w : 0;
            }
            const T fi = f[i], wg = w * g, wf = w * fi;
            if (gradient) {
                const T t = jt[i], u = gx[i], v = gy[i];
                const T wt = w * t, wu = w * u, wv = w * v;
                s0 += wt * t;
                s1 += wt * u;
                s2 += wt * v;
                s3 += wt * fi;
                s4 += wt;
                s5 += wu * u;
                s6 += wu * v;
                s7 += wu * fi;
                s8 += wu;
                s9 += wv * v;
                s10 += wv * fi;
                s11 += wv;
                s12 += wf * fi;
                s13 += wf;
                s14 += w;
                s15 += wt * g;
                s16 += wu * g;
                s17 += wv * g;
                s18 += wf * g;
                s19 += wg;
                s20 += wg * g;
            } else {
                s0 += wf * fi;
                s1 += wf;
                s2 += w;
                s3 += wf * g;
                s4 += wg;
                s5 += wg * g;
            }
        }
        const T s[21] = {s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s16, s17, s18, s19, s20};
        for (int k = 0; k < 21; k++)
            tot[k] += (double)s[k];
    }
    const int k = gradient ? 21 : 6;
    for (int i = 0; i < k; i++)
        out[i] = tot[i];
}

/* rows hypotheses; row r belongs to pair r / per_pair, whose fixed data (f, pw, jt, gx, gy: N values
 * each) start at pair·fixed_bstride (0: shared by the batch) and whose moving level (and mask) at
 * pair·moving_bstride. jt, gx, gy NULL: the 6 moments, else the 21 normal-equation sums, to out
 * (rows, 6 or 21). mask may be NULL. affine (rows, 6) in level pixels. Returns 0, or -1 for a moving
 * level under 2×2 pixels. */
int GLUE(rotstn_overlap_sums, SUMS_SUFFIX)(const T *x, const T *y, int64_t n, const T *f, const T *pw,
                                           const T *jt, const T *gx, const T *gy, int64_t fixed_bstride,
                                           const T *img, const T *mask, int64_t moving_bstride, int64_t H,
                                           int64_t W, double margin, const double *affine, int64_t rows,
                                           int64_t per_pair, double *out, int nthreads) {
    if (H < 2 || W < 2 || per_pair < 1)
        return -1;
    const int gradient = jt != 0, masked = mask != 0;
    const int64_t k = gradient ? 21 : 6;
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t p = r / per_pair, fo = p * fixed_bstride, mo = p * moving_bstride;
        const T *fr = f + fo, *pr = pw + fo, *im = img + mo;
        const double *ar = affine + 6 * r;
        double *o = out + k * r;
        if (gradient && masked)
            GLUE(row_sums, SUMS_SUFFIX)(x, y, n, fr, pr, jt + fo, gx + fo, gy + fo, im, mask + mo, H, W, margin, ar, o, 1, 1);
        else if (gradient)
            GLUE(row_sums, SUMS_SUFFIX)(x, y, n, fr, pr, jt + fo, gx + fo, gy + fo, im, 0, H, W, margin, ar, o, 1, 0);
        else if (masked)
            GLUE(row_sums, SUMS_SUFFIX)(x, y, n, fr, pr, 0, 0, 0, im, mask + mo, H, W, margin, ar, o, 0, 1);
        else
            GLUE(row_sums, SUMS_SUFFIX)(x, y, n, fr, pr, 0, 0, 0, im, 0, H, W, margin, ar, o, 0, 0);
    }
    return 0;
}

/* Solve the 5×5 system a·x = b in place (Gaussian elimination with partial pivoting); 0 when singular. */
static int GLUE(solve5, SUMS_SUFFIX)(double a[5][5], double b[5], double x[5]) {
    for (int c = 0; c < 5; c++) {
        int pivot = c;
        for (int r = c + 1; r < 5; r++)
            if (fabs(a[r][c]) > fabs(a[pivot][c]))
                pivot = r;
        if (!(fabs(a[pivot][c]) > 0))
            return 0;
        if (pivot != c) {
            for (int k = 0; k < 5; k++) {
                const double tmp = a[c][k];
                a[c][k] = a[pivot][k];
                a[pivot][k] = tmp;
            }
            const double tmp = b[c];
            b[c] = b[pivot];
            b[pivot] = tmp;
        }
        for (int r = c + 1; r < 5; r++) {
            const double f = a[r][c] / a[c][c];
            for (int k = c; k < 5; k++)
                a[r][k] -= f * a[c][k];
            b[r] -= f * b[c];
        }
    }
    for (int r = 4; r >= 0; r--) {
        double v = b[r];
        for (int k = r + 1; k < 5; k++)
            v -= a[r][k] * x[k];
        x[r] = v / a[r][r];
    }
    return 1;
}

/* Gauss–Newton on one level for B pairs, each on its own until it stops (the loop of
 * rotstn/registration/_refine.py's refine(), step for step; read the comments there). The fixed
 * points' data (f, pw, jt, gx, gy) and the moving level are laid out as for the sums above, with
 * per_pair 1. frame: (c_f x, c_f y, c_m x, c_m y, scale) in level pixels, then the step limit REACH;
 * radius, tolerance and iterations as in refine(). angle (B) and t (B, 2, level-0 pixels) are read and
 * written in place. */
int GLUE(rotstn_refine, SUMS_SUFFIX)(const T *x, const T *y, int64_t n, const T *f, const T *pw, const T *jt,
                                     const T *gx, const T *gy, int64_t fixed_bstride, const T *img,
                                     const T *mask, int64_t moving_bstride, int64_t H, int64_t W, double margin,
                                     const double *frame, double radius, double tolerance, int64_t iterations,
                                     double *angle, double *t, int64_t B, int nthreads) {
    if (H < 2 || W < 2)
        return -1;
    (void)nthreads;
    const double cfx = frame[0], cfy = frame[1], cmx = frame[2], cmy = frame[3], scale = frame[4];
    const double reach_max = frame[5];
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1 && B > 1)
    for (int64_t p = 0; p < B; p++) {
        const int64_t fo = p * fixed_bstride, mo = p * moving_bstride;
        double th = angle[p], tx = t[2 * p], ty = t[2 * p + 1];
        double previous[3] = {0, 0, 0};
        double limit = 1.0; /* the step limit, pixels of the level (REACH in _refine.py) */
        for (int64_t it = 0; it < iterations; it++) {
            const double c = cos(th), s = sin(th), ox = cfx + tx / scale, oy = cfy + ty / scale;
            const double affine[6] = {c, -s, cmx - c * ox + s * oy, s, c, cmy - s * ox - c * oy};
            double sums[21];
            if (mask)
                GLUE(row_sums, SUMS_SUFFIX)(x, y, n, f + fo, pw + fo, jt + fo, gx + fo, gy + fo, img + mo, mask + mo,
                                            H, W, margin, affine, sums, 1, 1);
            else
                GLUE(row_sums, SUMS_SUFFIX)(x, y, n, f + fo, pw + fo, jt + fo, gx + fo, gy + fo, img + mo, 0, H, W,
                                            margin, affine, sums, 1, 0);
            /* The normal matrix from its upper triangle (row-major in sums[0..14]), the right side. */
            double a[5][5], b[5], sol[5];
            for (int i = 0, k = 0; i < 5; i++)
                for (int j = i; j < 5; j++, k++)
                    a[i][j] = a[j][i] = sums[k];
            for (int i = 0; i < 5; i++) {
                a[i][i] += a[i][i] * 1e-6 + 1e-12;
                b[i] = sums[15 + i];
            }
            double delta[3] = {0, 0, 0};
            if (GLUE(solve5, SUMS_SUFFIX)(a, b, sol)) {
                const double gain = sol[3], d = fabs(gain) > 1e-12 ? gain : 1.0;
                for (int i = 0; i < 3; i++)
                    delta[i] = sol[i] / d;
                const int usable = sums[14] >= 16 && isfinite(delta[0]) && isfinite(delta[1]) &&
                                   isfinite(delta[2]) && gain > 0;
                if (!usable)
                    delta[0] = delta[1] = delta[2] = 0;
            }
            const double moves[3] = {delta[0] * radius, delta[1], delta[2]};
            const double dot = moves[0] * previous[0] + moves[1] * previous[1] + moves[2] * previous[2];
            const double pp = previous[0] * previous[0] + previous[1] * previous[1] + previous[2] * previous[2];
            const double mm = moves[0] * moves[0] + moves[1] * moves[1] + moves[2] * moves[2];
            const double ratio = dot / (pp > 1e-30 ? pp : 1e-30);
            const int aligned = dot > 0.9 * sqrt(mm) * sqrt(pp);
            double boost = 1.0;
            if (aligned && ratio > 0.3 && ratio < 0.9)
                boost = 1.0 / (1.0 - ratio);
            if (aligned && ratio >= 0.9 && ratio < 1.25)
                boost = 2.0;
            for (int i = 0; i < 3; i++) {
                previous[i] = moves[i];
                delta[i] *= boost;
            }
            const double reach = fabs(delta[0]) * radius + sqrt(delta[1] * delta[1] + delta[2] * delta[2]);
            const double shrink = limit / (reach > limit ? reach : limit);
            for (int i = 0; i < 3; i++)
                delta[i] *= shrink;
            limit = aligned && reach > limit ? (2 * limit < reach_max ? 2 * limit : reach_max) : 1.0;
            const double dc = cos(delta[0]), ds = sin(delta[0]), lx = tx / scale, ly = ty / scale;
            tx = (delta[1] + dc * lx - ds * ly) * scale;
            ty = (delta[2] + ds * lx + dc * ly) * scale;
            th -= delta[0];
            if (!(reach * shrink >= tolerance))
                break;
        }
        angle[p] = th;
        t[2 * p] = tx;
        t[2 * p + 1] = ty;
    }
    return 0;
}

#undef T
#endif
