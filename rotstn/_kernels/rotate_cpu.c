/* Fused bilinear rotation with zero padding, forward and backward, for rotstn.
 *
 * Plain C99 + pthreads, no Python or torch headers: rotstn compiles this file
 * at first use (rotstn/_kernels/compiled.py) and calls it through ctypes.
 *
 * Geometry (as rotstn/_kernels/reference.py, in pixels): output pixel (i, j)
 * reads the input at x = cx + cos·u - sin·v, y = cy + sin·u + cos·v with
 * u = j - cx, v = i - cy. Bilinear with x0 = floor(x); corners outside
 * [0, W-1] × [0, H-1] contribute 0, which is grid_sample's "zeros" padding for
 * either align_corners (that flag only changes the normalised coordinates).
 *
 * par holds (cos, sin, cx, cy) per sample in double. Images are (C, H, W)
 * contiguous per sample, sample b at img + b·img_bstride (0 for a broadcast
 * image). Work is split over samples (each thread owns whole samples, so the
 * image-gradient scatter is race-free) or, with fewer samples than threads
 * and no image gradient, over rows with private partial sums.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 256

#if defined(__GNUC__) && !defined(__clang__)
/* GCC pairs the scatter's q[0], q[1] updates into one 8-byte load and store; the next pixel
 * usually reads 4 bytes into that store, which defeats store forwarding (measured ~8 % slower). */
#pragma GCC optimize("no-tree-slp-vectorize")
#endif
/* The coordinate pass is the one loop that vectorises; with GCC on x86-64 Linux it is also
 * built for AVX2 and picked at load time (ifunc), so the binary still runs on any x86-64.
 * compiled.py retries with -DROTSTN_NO_CLONES where ifuncs are not supported. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(ROTSTN_NO_CLONES)
#define ROW_COORDS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ROW_COORDS_CLONES
#endif

/* The row loops are inlined at call sites with constant channel counts and flags, which specialises them. */
#if defined(__GNUC__)
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE static inline
#endif


typedef struct {
    const void *img;
    int64_t img_bstride;
    void *out;        /* forward output, or NULL */
    const void *gout; /* backward: output gradient */
    void *gimg;       /* backward: image gradient, or NULL */
    double *partial;  /* backward: 6 sums per (thread, sample), or NULL */
    const double *par;
    int64_t B, C, H, W;
    char *scratch;        /* per thread: x0, y0 (int32) and wx, wy of one row */
    size_t scratch_bytes; /* per thread */
    int nthreads, tid, by_rows;
} job_t;

static void row_range(const job_t *j, int64_t *r0, int64_t *r1) {
    if (j->by_rows) {
        *r0 = j->H * j->tid / j->nthreads;
        *r1 = j->H * (j->tid + 1) / j->nthreads;
    } else {
        *r0 = 0;
        *r1 = j->H;
    }
}

/* The corners of one row i of output pixels, in a pass of its own so that it vectorises:
 * x0, y0 = floor of the source coordinates (clamped to [-2, W+1] × [-2, H+1], where every
 * corner is already outside; NaN goes to -2) and the bilinear weights wx = x - x0,
 * wy = y - y0. Truncating x + 2 >= 0 is the floor of x. At θ = 0 (c = 1, s = 0) x is
 * exactly j, as in the reference path on sizes where its normalised grid is exact. */
#define DEFINE_ROW_COORDS(T, SUFFIX)                                                                    \
    ROW_COORDS_CLONES static void row_coords_##SUFFIX(int64_t W, int64_t H, const double *par, int64_t i,                 \
                                    int32_t *restrict rx0, int32_t *restrict ry0, T *restrict rwx,      \
                                    T *restrict rwy) {                                                  \
        const double c = par[0], s = par[1], cx = par[2], cy = par[3];                                  \
        const double v = (double)i - cy, bx = cx - s * v, by = cy + c * v;                              \
        const double xmax = (double)W + 1.0, ymax = (double)H + 1.0;                                    \
        for (int32_t j = 0; j < (int32_t)W; j++) {                                                      \
            const double u = (double)j - cx;                                                            \
            double x = bx + c * u, y = by + s * u;                                                      \
            x = x > -2.0 ? x : -2.0;                                                                    \
            x = x < xmax ? x : xmax;                                                                    \
            y = y > -2.0 ? y : -2.0;                                                                    \
            y = y < ymax ? y : ymax;                                                                    \
            const int32_t xi = (int32_t)(x + 2.0) - 2, yi = (int32_t)(y + 2.0) - 2;                     \
            rx0[j] = xi;                                                                                \
            ry0[j] = yi;                                                                                \
            rwx[j] = (T)(x - (double)xi);                                                               \
            rwy[j] = (T)(y - (double)yi);                                                               \
        }                                                                                               \
    }

DEFINE_ROW_COORDS(float, f32)
DEFINE_ROW_COORDS(double, f64)

/* Bilinear weights and offsets of the four corners (x0, y0), (x0+1, y0), (x0, y0+1), (x0+1, y0+1)
 * of a pixel near the border; a corner outside the image gets weight 0, offset 0 and valid 0. */
static void corners(int32_t x0, int32_t y0, double wx, double wy, int64_t H, int64_t W, double w[4],
                    int64_t off[4], int valid[4]) {
    const int vx0 = x0 >= 0 && x0 < W, vx1 = x0 + 1 >= 0 && x0 + 1 < W;
    const int vy0 = y0 >= 0 && y0 < H, vy1 = y0 + 1 >= 0 && y0 + 1 < H;
    valid[0] = vx0 && vy0;
    valid[1] = vx1 && vy0;
    valid[2] = vx0 && vy1;
    valid[3] = vx1 && vy1;
    w[0] = (1.0 - wx) * (1.0 - wy);
    w[1] = wx * (1.0 - wy);
    w[2] = (1.0 - wx) * wy;
    w[3] = wx * wy;
    off[0] = (int64_t)y0 * W + x0;
    off[1] = off[0] + 1;
    off[2] = off[0] + W;
    off[3] = off[2] + 1;
    for (int k = 0; k < 4; k++)
        if (!valid[k]) {
            w[k] = 0.0;
            off[k] = 0;
        }
}

#define WORKER_SETUP(T)                                                                                 \
    const job_t *jb = (const job_t *)arg;                                                               \
    const int64_t C = jb->C, H = jb->H, W = jb->W, HW = H * W;                                          \
    T *rwx = (T *)(jb->scratch + (size_t)jb->tid * jb->scratch_bytes), *rwy = rwx + W;                  \
    int32_t *rx0 = (int32_t *)(rwy + W), *ry0 = rx0 + W;                                                \
    int64_t r0, r1;                                                                                     \
    row_range(jb, &r0, &r1);                                                                            \
    const int64_t b0 = jb->by_rows ? 0 : jb->tid, bstep = jb->by_rows ? 1 : jb->nthreads;

#define DEFINE_KERNELS(T, SUFFIX)                                                                       \
    ALWAYS_INLINE void forward_row_##SUFFIX(                             \
        const T *img, T *out, const int64_t C, const int64_t H, const int64_t W, const int64_t i,        \
        const int32_t *rx0, const int32_t *ry0, const T *rwx, const T *rwy) {                           \
        const int64_t HW = H * W;                                                                       \
        for (int64_t j = 0; j < W; j++) {                                                       \
            const int32_t x0 = rx0[j], y0 = ry0[j];                                             \
            const T wx = rwx[j], wy = rwy[j];                                                   \
            T *o = out + i * W + j;                                                             \
            if ((uint32_t)x0 < (uint32_t)(W - 1) && (uint32_t)y0 < (uint32_t)(H - 1)) {         \
                const T *p = img + (int64_t)y0 * W + x0;                                        \
                int64_t ch = 0;                                                                 \
                do {                                                                            \
                    const T top = p[0] + wx * (p[1] - p[0]);                                    \
                    const T bottom = p[W] + wx * (p[W + 1] - p[W]);                             \
                    o[ch * HW] = top + wy * (bottom - top);                                     \
                    p += HW;                                                                    \
                } while (++ch < C);                                                             \
                continue;                                                                       \
            }                                                                                   \
            double w[4];                                                                        \
            int64_t off[4];                                                                     \
            int valid[4];                                                                       \
            corners(x0, y0, (double)wx, (double)wy, H, W, w, off, valid);                       \
            for (int64_t ch = 0; ch < C; ch++) {                                                \
                const T *p = img + ch * HW;                                                     \
                o[ch * HW] = (T)w[0] * p[off[0]] + (T)w[1] * p[off[1]] + (T)w[2] * p[off[2]] +  \
                             (T)w[3] * p[off[3]];                                               \
            }                                                                                   \
        }                                                                                       \
    }                                                                                                   \
                                                                                                        \
    static void *forward_worker_##SUFFIX(void *arg) {                                                   \
        WORKER_SETUP(T)                                                                                 \
        for (int64_t b = b0; b < jb->B; b += bstep) {                                                   \
            const T *img = (const T *)jb->img + b * jb->img_bstride;                                    \
            T *out = (T *)jb->out + b * C * HW;                                                         \
            for (int64_t i = r0; i < r1; i++) {                                                         \
                row_coords_##SUFFIX(W, H, jb->par + 4 * b, i, rx0, ry0, rwx, rwy);                              \
                if (C == 1)                                                                             \
                    forward_row_##SUFFIX(img, out, 1, H, W, i, rx0, ry0, rwx, rwy);                     \
                else                                                                                    \
                    forward_row_##SUFFIX(img, out, C, H, W, i, rx0, ry0, rwx, rwy);                     \
            }                                                                                           \
        }                                                                                               \
        return NULL;                                                                                    \
    }                                                                                                   \
                                                                                                        \
    ALWAYS_INLINE void backward_row_##SUFFIX(                            \
        const T *img, const T *gout, T *gimg, const int64_t C, const int64_t H, const int64_t W,        \
        const int64_t i, const int32_t *rx0, const int32_t *ry0, const T *rwx, const T *rwy,            \
        const double cx, const int do_img, const int do_geo, double r[4]) {                             \
        const int64_t HW = H * W;                                                                       \
        double rx = 0, ry = 0, rxu = 0, ryu = 0;                                                        \
        for (int64_t j = 0; j < W; j++) {                                                       \
            const int32_t x0 = rx0[j], y0 = ry0[j];                                             \
            const T wx = rwx[j], wy = rwy[j];                                                   \
            const int64_t pix = i * W + j;                                                      \
            T gx = 0, gy = 0;                                                                   \
            if ((uint32_t)x0 < (uint32_t)(W - 1) && (uint32_t)y0 < (uint32_t)(H - 1)) {         \
                const int64_t at = (int64_t)y0 * W + x0;                                        \
                const T w0 = (1 - wx) * (1 - wy), w1 = wx * (1 - wy);                           \
                const T w2 = (1 - wx) * wy, w3 = wx * wy;                                       \
                for (int64_t ch = 0; ch < C; ch++) {                                            \
                    const T g = gout[ch * HW + pix];                                            \
                    if (do_img) {                                                                 \
                        T *q = gimg + ch * HW + at;                                             \
                        q[0] += g * w0;                                                         \
                        q[1] += g * w1;                                                         \
                        q[W] += g * w2;                                                         \
                        q[W + 1] += g * w3;                                                     \
                    }                                                                           \
                    if (do_geo) {                                                             \
                        const T *p = img + ch * HW + at;                                        \
                        const T i00 = p[0], i01 = p[1], i10 = p[W], i11 = p[W + 1];             \
                        const T dx0 = i01 - i00, dy0 = i10 - i00;                               \
                        gx += g * (dx0 + wy * (i11 - i10 - dx0));                               \
                        gy += g * (dy0 + wx * (i11 - i01 - dy0));                               \
                    }                                                                           \
                }                                                                               \
            } else {                                                                            \
                double w[4];                                                                    \
                int64_t off[4];                                                                 \
                int valid[4];                                                                   \
                corners(x0, y0, (double)wx, (double)wy, H, W, w, off, valid);                   \
                if (!(valid[0] | valid[1] | valid[2] | valid[3]))                               \
                    continue;                                                                   \
                for (int64_t ch = 0; ch < C; ch++) {                                            \
                    const T g = gout[ch * HW + pix];                                            \
                    if (do_img) {                                                                 \
                        /* Invalid corners have weight 0 and offset 0: adding 0 is harmless. */ \
                        T *q = gimg + ch * HW;                                                  \
                        for (int k = 0; k < 4; k++)                                             \
                            q[off[k]] += g * (T)w[k];                                           \
                    }                                                                           \
                    if (do_geo) {                                                             \
                        const T *p = img + ch * HW;                                             \
                        const T i00 = valid[0] ? p[off[0]] : 0, i01 = valid[1] ? p[off[1]] : 0; \
                        const T i10 = valid[2] ? p[off[2]] : 0, i11 = valid[3] ? p[off[3]] : 0; \
                        gx += g * ((1 - wy) * (i01 - i00) + wy * (i11 - i10));                  \
                        gy += g * ((1 - wx) * (i10 - i00) + wx * (i11 - i01));                  \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
            const double u = (double)j - cx;                                                    \
            rx += gx;                                                                           \
            ry += gy;                                                                           \
            rxu += (double)gx * u;                                                              \
            ryu += (double)gy * u;                                                              \
        }                                                                                       \
        r[0] = rx;                                                                                      \
        r[1] = ry;                                                                                      \
        r[2] = rxu;                                                                                     \
        r[3] = ryu;                                                                                     \
    }                                                                                                   \
                                                                                                        \
    static void *backward_worker_##SUFFIX(void *arg) {                                                  \
        WORKER_SETUP(T)                                                                                 \
        const int want_geo = jb->partial != NULL;                                                       \
        for (int64_t b = b0; b < jb->B; b += bstep) {                                                   \
            const T *img = (const T *)jb->img + b * jb->img_bstride;                                    \
            const T *gout = (const T *)jb->gout + b * C * HW;                                           \
            T *gimg = jb->gimg ? (T *)jb->gimg + b * C * HW : NULL;                                     \
            const double cx = jb->par[4 * b + 2], cy = jb->par[4 * b + 3];                              \
            /* Σ gx, Σ gy, Σ gx·u, Σ gx·v, Σ gy·u, Σ gy·v; (gx, gy) = dL/d(x, y) of one pixel. */        \
            double sx = 0, sy = 0, sxu = 0, sxv = 0, syu = 0, syv = 0;                                  \
            if (gimg)                                                                                   \
                memset(gimg, 0, (size_t)(C * HW) * sizeof(T));                                          \
            for (int64_t i = r0; i < r1; i++) {                                                         \
                const double v = (double)i - cy;                                                        \
                row_coords_##SUFFIX(W, H, jb->par + 4 * b, i, rx0, ry0, rwx, rwy);                              \
                double r[4] = {0, 0, 0, 0}; /* Σ_j gx, Σ_j gy, Σ_j gx·u, Σ_j gy·u */                   \
                const int32_t *ox = rx0, *oy = ry0;                                                     \
                const T *fx = rwx, *fy = rwy;                                                           \
                /* Constant flags and channel count let the compiler specialise the common calls. */   \
                if (C == 1 && gimg && want_geo)                                                         \
                    backward_row_##SUFFIX(img, gout, gimg, 1, H, W, i, ox, oy, fx, fy, cx, 1, 1, r);    \
                else if (C == 1 && want_geo)                                                            \
                    backward_row_##SUFFIX(img, gout, NULL, 1, H, W, i, ox, oy, fx, fy, cx, 0, 1, r);    \
                else if (gimg && want_geo)                                                              \
                    backward_row_##SUFFIX(img, gout, gimg, C, H, W, i, ox, oy, fx, fy, cx, 1, 1, r);    \
                else                                                                                    \
                    backward_row_##SUFFIX(img, gout, gimg, C, H, W, i, ox, oy, fx, fy, cx, gimg != NULL, \
                                          want_geo, r);                                                 \
                const double rx = r[0], ry = r[1], rxu = r[2], ryu = r[3];                              \
                sx += rx;                                                                               \
                sy += ry;                                                                               \
                sxu += rxu;                                                                             \
                syu += ryu;                                                                             \
                sxv += rx * v;                                                                          \
                syv += ry * v;                                                                          \
            }                                                                                           \
            if (want_geo) {                                                                             \
                double *acc = jb->partial + 6 * ((int64_t)jb->tid * jb->B + b);                         \
                acc[0] = sx;                                                                            \
                acc[1] = sy;                                                                            \
                acc[2] = sxu;                                                                           \
                acc[3] = sxv;                                                                           \
                acc[4] = syu;                                                                           \
                acc[5] = syv;                                                                           \
            }                                                                                           \
        }                                                                                               \
        return NULL;                                                                                    \
    }

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)

/* Run worker on n threads (the caller's thread is one of them); 1 if threads cannot be made. */
static int run(void *(*worker)(void *), job_t *base, int n, int by_rows) {
    job_t jobs[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 0; t < n; t++) {
        jobs[t] = *base;
        jobs[t].nthreads = n;
        jobs[t].tid = t;
        jobs[t].by_rows = by_rows;
        started[t] = 0;
    }
    for (int t = 1; t < n; t++)
        started[t] = pthread_create(&threads[t], NULL, worker, &jobs[t]) == 0;
    worker(&jobs[0]);
    int ok = 1;
    for (int t = 1; t < n; t++) {
        if (started[t])
            pthread_join(threads[t], NULL);
        else
            ok = 0;
    }
    if (!ok) /* a thread failed to start: do its share here */
        for (int t = 1; t < n; t++)
            if (!started[t])
                worker(&jobs[t]);
    return n;
}

/* Below this many output pixels one thread is faster than starting more. */
#define MIN_PIXELS_PER_THREAD 4096

static int thread_count(int64_t work_pixels, int nthreads) {
    if (nthreads < 1)
        nthreads = 1;
    if (nthreads > MAX_THREADS)
        nthreads = MAX_THREADS;
    int64_t most = work_pixels / MIN_PIXELS_PER_THREAD;
    if (most < 1)
        most = 1;
    return (int)(nthreads < most ? nthreads : most);
}

/* Bytes of one thread's row buffers, rounded up to keep each thread's block 64-byte aligned. */
static size_t scratch_bytes(int64_t W, size_t elem) {
    size_t bytes = (size_t)W * (2 * sizeof(int32_t) + 2 * elem);
    return (bytes + 63) / 64 * 64;
}

#define DEFINE_ENTRY(T, SUFFIX)                                                                         \
    int rotstn_forward_##SUFFIX(const T *img, int64_t img_bstride, T *out, const double *par,           \
                                int64_t B, int64_t C, int64_t H, int64_t W, int nthreads) {             \
        if (B <= 0 || C <= 0 || H <= 0 || W <= 0)                                                       \
            return 0; /* nothing to do (and no job for run() to hand out) */                            \
        int n = thread_count(B * H * W, nthreads);                                                      \
        int by_rows = B < n;                                                                            \
        if (!by_rows && n > B)                                                                          \
            n = (int)B;                                                                                 \
        size_t bytes = scratch_bytes(W, sizeof(T));                                                     \
        char *scratch = (char *)malloc(bytes * (size_t)n);                                              \
        if (!scratch)                                                                                   \
            return -1;                                                                                  \
        job_t job = {img, img_bstride, out, NULL, NULL, NULL, par, B, C, H, W, scratch, bytes, 1, 0, 0}; \
        run(forward_worker_##SUFFIX, &job, n, by_rows);                                                 \
        free(scratch);                                                                                  \
        return 0;                                                                                       \
    }                                                                                                   \
                                                                                                        \
    /* geo (B × 3: dθ, dcx, dcy) or NULL; gimg (B, C, H, W) or NULL. Returns 0, or -1 out of memory. */ \
    int rotstn_backward_##SUFFIX(const T *img, int64_t img_bstride, const T *gout, T *gimg,             \
                                 double *geo, const double *par, int64_t B, int64_t C, int64_t H,       \
                                 int64_t W, int nthreads) {                                             \
        if (B <= 0 || C <= 0 || H <= 0 || W <= 0) {                                                     \
            /* No pixels: the angle and centre gradients are 0 (and run() would get no job). */         \
            for (int64_t k = 0; geo && k < 3 * B; k++)                                                  \
                geo[k] = 0.0;                                                                           \
            return 0;                                                                                   \
        }                                                                                               \
        int n = thread_count(B * H * W, nthreads);                                                      \
        /* Rows may be split only when no thread scatters into the image gradient. */                  \
        int by_rows = B < n && gimg == NULL;                                                            \
        if (!by_rows && n > B)                                                                          \
            n = (int)B;                                                                                 \
        double *partial = NULL;                                                                         \
        if (geo) {                                                                                      \
            partial = (double *)calloc((size_t)(n * B * 6), sizeof(double));                            \
            if (!partial)                                                                               \
                return -1;                                                                              \
        }                                                                                               \
        size_t bytes = scratch_bytes(W, sizeof(T));                                                     \
        char *scratch = (char *)malloc(bytes * (size_t)n);                                              \
        if (!scratch) {                                                                                 \
            free(partial);                                                                              \
            return -1;                                                                                  \
        }                                                                                               \
        job_t job = {img, img_bstride, NULL, gout, gimg, partial, par, B, C, H, W, scratch, bytes, 1, 0, 0}; \
        run(backward_worker_##SUFFIX, &job, n, by_rows);                                                \
        free(scratch);                                                                                  \
        if (geo) {                                                                                      \
            for (int64_t b = 0; b < B; b++) {                                                           \
                double a[6] = {0, 0, 0, 0, 0, 0};                                                       \
                for (int t = 0; t < n; t++)                                                             \
                    for (int k = 0; k < 6; k++)                                                         \
                        a[k] += partial[6 * ((int64_t)t * B + b) + k];                                  \
                const double c = par[4 * b], s = par[4 * b + 1];                                        \
                /* ∂x/∂θ = -s·u - c·v, ∂y/∂θ = c·u - s·v; ∂x/∂cx = 1 - c, ∂x/∂cy = s,                   \
                   ∂y/∂cx = -s, ∂y/∂cy = 1 - c. */                                                      \
                geo[3 * b] = -s * a[2] - c * a[3] + c * a[4] - s * a[5];                                \
                geo[3 * b + 1] = (1 - c) * a[0] - s * a[1];                                             \
                geo[3 * b + 2] = s * a[0] + (1 - c) * a[1];                                             \
            }                                                                                           \
            free(partial);                                                                              \
        }                                                                                               \
        return 0;                                                                                       \
    }

DEFINE_ENTRY(float, f32)
DEFINE_ENTRY(double, f64)
