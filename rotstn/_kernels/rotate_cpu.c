/* Fused bilinear warp with zero padding, forward and backward, for rotstn.
 *
 * Plain C99 with OpenMP (torch's own libgomp pool, see run()) or pthreads, no
 * Python or torch headers: rotstn compiles this file at first use
 * (rotstn/_kernels/compiled.py) and calls it through ctypes.
 *
 * One source, several instruction sets: compiled.py builds it once per variant
 * it needs, with -mavx512f -mavx512vl -mavx512bw -mavx512dq -mavx2 -mfma
 * ("avx512"), -mavx2 -mfma ("avx2") or the compiler's baseline ("generic"), and
 * loads the one the CPU can run (rotstn_cpu_features of the generic build
 * says which). The compiler's predefined macros (__AVX512F__, __AVX2__) pick
 * the code below: the sampling loops in intrinsics (16 float or 8 double
 * pixels a step on AVX-512, 8 or 4 on AVX2; a pixel's corners come in as
 * 8-byte loads of row pairs for float, masked gathers for double), or scalar
 * code that the compiler may vectorise where it can (the coordinate pass, on
 * NEON for aarch64 too).
 *
 * Geometry (as rotstn/_kernels/reference.py, in pixels): output pixel (i, j)
 * reads the input at x = sx + cos·u - sin·v, y = sy + sin·u + cos·v with
 * u = j - cx, v = i - cy; (cx, cy) is the output-side centre and (sx, sy) the
 * input point shown there (the same for a rotation). Bilinear with
 * x0 = floor(x); corners outside [0, W-1] × [0, H-1] contribute 0, which is
 * grid_sample's "zeros" padding for either align_corners (that flag only
 * changes the normalised coordinates).
 *
 * par holds (cos, sin, cx, cy, sx, sy) per sample in double. Images are
 * (C, H, W) contiguous per sample, sample b at img + b·img_bstride (0 for a
 * broadcast image). Work is split over samples (each sample is computed
 * whole by one thread, which takes the next one free, so the image-gradient
 * scatter is race-free) or, with fewer samples
 * than threads and no image gradient, over rows. The backward's per-row sums
 * go to a (B, H, 4) buffer that is reduced in a fixed order, so results do not
 * depend on the thread count.
 *
 * Layout, one part per stage: 1. sampling (coordinates, corners, the vector helpers of each
 * instruction set, the prefetch), 2. forward, 3. backward, 4. threading, 5. the entry points.
 * Each of the forward and backward has its scalar pixel code (the generic build, and the rows
 * of the vector builds narrower than one step), its vector step and row, and its worker.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__FMA__)
#define ROTSTN_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define ROTSTN_AVX2 1
#include <immintrin.h>
#endif

#define MAX_THREADS 256

#if defined(__GNUC__) && !defined(__clang__)
/* GCC pairs the scatter's q[0], q[1] updates into one 8-byte load and store; the next pixel
 * usually reads 4 bytes into that store, which defeats store forwarding (measured ~8 % slower). */
#pragma GCC optimize("no-tree-slp-vectorize")
#endif

/* The row loops are inlined at call sites with constant channel counts and flags, which specialises them. */
#if defined(__GNUC__)
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE static inline
#endif

/* Placed after vectors of offsets or scatter operands are stored to the stack: each lane is then
 * read back with one scalar load. Without it GCC keeps the vectors in registers and takes each
 * lane out with two or three shuffles (vextract, valign, vpsrldq, vpextrd), which made the scatter
 * and the corner loads shuffle-bound (the image gradient alone 1.3× slower, B = 64, 128², C = 1). */
#if defined(__GNUC__)
#define COMPILER_BARRIER() __asm__ __volatile__("" ::: "memory")
#else
#define COMPILER_BARRIER() ((void)0)
#endif

/* The instruction set this build was compiled for. */
const char *rotstn_isa(void) {
#if defined(ROTSTN_AVX512)
    return "avx512";
#elif defined(ROTSTN_AVX2)
    return "avx2";
#else
    return "generic";
#endif
}

/* What this CPU (and OS) can run: bit 0 the avx2 build, bit 1 the avx512 build. Called on the
 * generic build only, so it never executes an instruction the CPU may lack. GCC's and clang's
 * __builtin_cpu_supports also check that the OS saves the wide registers (XCR0). */
int rotstn_cpu_features(void) {
    int bits = 0;
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        bits |= 1;
    if ((bits & 1) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
        bits |= 2;
#endif
    return bits;
}

typedef struct {
    const void *img;
    int64_t img_bstride;
    void *out;        /* forward output, or NULL */
    const void *gout; /* backward: output gradient */
    void *gimg;       /* backward: image gradient, or NULL */
    double *rows;     /* backward: 4 sums per (sample, row), or NULL */
    const double *par;
    int64_t B, C, H, W;
    char *scratch;        /* per thread: x0, y0 (int32) and wx, wy of one row */
    size_t scratch_bytes; /* per thread */
    int nthreads, tid, by_rows;
    int64_t *next_sample; /* shared by the shares: the next sample to take (split over samples) */
    void *deriv; /* (B, 2, C, H, W) ∂out/∂x then ∂out/∂y per channel: forward writes, backward reads; or NULL */
} job_t;

/* The row functions' scratch: x0, y0, wx, wy of one row (the generic build's coordinate pass). */
#define ROW_BUFFERS(T) int32_t *restrict rx0, int32_t *restrict ry0, T *restrict rwx, T *restrict rwy

/* Threading (part 4) decides which rows and samples a share computes. */
static void row_range(const job_t *j, int64_t *r0, int64_t *r1);
static int next_b(const job_t *jb, int64_t *b);

/* ================================================================================================
 * 1. Sampling: source coordinates, corners, the vector helpers of each instruction set, and the
 * prefetch of a sample's image. Shared by the forward and the backward.
 * ================================================================================================ */

#if !defined(ROTSTN_AVX512) && !defined(ROTSTN_AVX2)
/* The corners of one row i of output pixels, in a pass of its own so that it vectorises:
 * x0, y0 = floor of the source coordinates (clamped to [-2, W+1] × [-2, H+1], where every
 * corner is already outside; NaN goes to -2) and the bilinear weights wx = x - x0,
 * wy = y - y0. Truncating x + 2 >= 0 is the floor of x. At θ = 0 (c = 1, s = 0) and
 * source = centre, x is exactly j, as in the reference path on sizes where its normalised
 * grid is exact. */
#define DEFINE_ROW_COORDS(T, SUFFIX)                                                                    \
    static void row_coords_##SUFFIX(int64_t W, int64_t H, const double *par, int64_t i,                 \
                                    int32_t *restrict rx0, int32_t *restrict ry0, T *restrict rwx,      \
                                    T *restrict rwy) {                                                  \
        const double c = par[0], s = par[1], cx = par[2], cy = par[3], sx = par[4], sy = par[5];        \
        const double v = (double)i - cy, bx = sx - s * v, by = sy + c * v;                              \
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
#endif

/* The same for one pixel (the vector builds' row tails). */
static inline void pixel_coords(int64_t W, int64_t H, const double *par, int64_t i, int64_t j, int32_t *x0,
                                int32_t *y0, double *wx, double *wy) {
    const double c = par[0], s = par[1], u = (double)j - par[2], v = (double)i - par[3];
    double x = par[4] + c * u - s * v, y = par[5] + s * u + c * v;
    x = x > -2.0 ? x : -2.0;
    x = x < (double)W + 1.0 ? x : (double)W + 1.0;
    y = y > -2.0 ? y : -2.0;
    y = y < (double)H + 1.0 ? y : (double)H + 1.0;
    *x0 = (int32_t)(x + 2.0) - 2;
    *y0 = (int32_t)(y + 2.0) - 2;
    *wx = x - (double)*x0;
    *wy = y - (double)*y0;
}

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

/* Double builds keep the masked gathers for steps across the border (BORDER_LOADS 0): never called. */
#define DEFINE_BORDER_STUB(S, T, I)                                                                     \
    static inline void corners_border_##S(const T *p, I x0, I y0, int32_t w, int32_t h, int32_t *off,  \
                                          V_##S *a, V_##S *b, V_##S *c, V_##S *d) {                    \
        (void)p, (void)x0, (void)y0, (void)w, (void)h, (void)off;                                       \
        *a = *b = *c = *d = zero_##S();                                                                 \
    }

/* Vector helpers, one set per (instruction set, dtype), named by suffix:
 *   V a vector of T, I the matching int32 indices, K a lane mask in the form the index
 *   arithmetic gives (a k-register on AVX-512, an all-ones/zeros integer vector on AVX2),
 *   D a double vector for the angle sums.
 *   N lanes; inrange(v, n): 0 <= v < n; gather(base, idx, k): base[idx] where k, else 0;
 *   maskz(k, v) / imaskz(k, i): v or i where k, else 0; accum: the four row sums of a step. */
#if defined(ROTSTN_AVX512)
#define N_zf 16
#define N_zd 8
typedef __m512 V_zf;
typedef __m512i I_zf;
typedef __mmask16 K_zf;
typedef __m512d V_zd;
typedef __m256i I_zd;
typedef __mmask8 K_zd;
typedef __m512d D_z;

static inline I_zf iload_zf(const int32_t *p) { return _mm512_loadu_si512((const void *)p); }
static inline void istore_zf(int32_t *p, I_zf v) { _mm512_storeu_si512((void *)p, v); }
static inline I_zf iaddc_zf(I_zf v, int32_t c) { return _mm512_add_epi32(v, _mm512_set1_epi32(c)); }
static inline I_zf imad_zf(I_zf y, int32_t w, I_zf x) {
    return _mm512_add_epi32(_mm512_mullo_epi32(y, _mm512_set1_epi32(w)), x);
}
static inline K_zf inrange_zf(I_zf v, int32_t n) { return _mm512_cmplt_epu32_mask(v, _mm512_set1_epi32(n)); }
static inline K_zf kand_zf(K_zf a, K_zf b) { return a & b; }
static inline I_zf imaskz_zf(K_zf k, I_zf v) { return _mm512_maskz_mov_epi32(k, v); }
static inline V_zf gather_zf(const float *base, I_zf idx, K_zf k) {
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, idx, base, 4);
}
static inline V_zf maskz_zf(K_zf k, V_zf v) { return _mm512_maskz_mov_ps(k, v); }
static inline V_zf load_zf(const float *p) { return _mm512_loadu_ps(p); }
static inline void store_zf(float *p, V_zf v) { _mm512_storeu_ps(p, v); }
/* The forward's saved derivatives: read only by the backward, later, so written around the caches
 * (no read for ownership; 9 % off forward + backward at C = 3, 3 % at C = 1) where aligned. */
static inline void nstore_zf(float *p, V_zf v) {
    if (((uintptr_t)p & 63) == 0)
        _mm512_stream_ps(p, v);
    else
        _mm512_storeu_ps(p, v);
}
static inline V_zf set1_zf(float x) { return _mm512_set1_ps(x); }
static inline V_zf zero_zf(void) { return _mm512_setzero_ps(); }
static inline V_zf add_zf(V_zf a, V_zf b) { return _mm512_add_ps(a, b); }
static inline V_zf sub_zf(V_zf a, V_zf b) { return _mm512_sub_ps(a, b); }
static inline V_zf mul_zf(V_zf a, V_zf b) { return _mm512_mul_ps(a, b); }
static inline V_zf fma_zf(V_zf a, V_zf b, V_zf c) { return _mm512_fmadd_ps(a, b, c); }
static inline int kall_zf(K_zf k) { return k == 0xFFFF; }
static inline K_zf tail_zf(int dead) { return (K_zf)(0xFFFFu << dead); } /* lanes >= dead */
static inline void zip_zf(V_zf a, V_zf b, float *dst) {
    const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    _mm512_storeu_ps(dst, _mm512_permutex2var_ps(a, lo, b));
    _mm512_storeu_ps(dst + 16, _mm512_permutex2var_ps(a, hi, b));
}
static inline __m512i pack4_z(__m128i a, __m128i b, __m128i c, __m128i d) {
    const __m256i lo = _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
    const __m256i hi = _mm256_inserti128_si256(_mm256_castsi128_si256(c), d, 1);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}
/* All four corners of 16 interior pixels: the row pairs (x0, x0+1) come in as 8-byte elements of
 * 64-bit gathers (half the elements of four 32-bit gathers), then split into left and right. */
static inline void corners4_zf(const float *p, I_zf o, const int32_t *off, int32_t w, V_zf *a, V_zf *b, V_zf *c,
                               V_zf *d) {
    (void)o; /* the offsets come in stored (off), once for every channel */
    const float *pw = p + w;
    __m128i t[8], u[8];
    for (int k = 0; k < 8; k++) {
        const float *e = p + off[2 * k], *f = p + off[2 * k + 1];
        const float *g = pw + off[2 * k], *h = pw + off[2 * k + 1];
        t[k] = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(_mm_loadl_epi64((const __m128i *)e)), (const double *)f));
        u[k] = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(_mm_loadl_epi64((const __m128i *)g)), (const double *)h));
    }
    const __m512 t0 = _mm512_castsi512_ps(pack4_z(t[0], t[1], t[2], t[3]));
    const __m512 t1 = _mm512_castsi512_ps(pack4_z(t[4], t[5], t[6], t[7]));
    const __m512 u0 = _mm512_castsi512_ps(pack4_z(u[0], u[1], u[2], u[3]));
    const __m512 u1 = _mm512_castsi512_ps(pack4_z(u[4], u[5], u[6], u[7]));
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    *a = _mm512_permutex2var_ps(t0, even, t1);
    *b = _mm512_permutex2var_ps(t0, odd, t1);
    *c = _mm512_permutex2var_ps(u0, even, u1);
    *d = _mm512_permutex2var_ps(u0, odd, u1);
}
/* The four corners of 16 pixels of a step across the border, with the same 8-byte loads: each
 * lane reads the row pair at x = clamp(x0, 0, W-2) of rows clamp(y0) and clamp(y0+1), always
 * inside the image, then keeps what is inside: (a, b) is the pair itself when 0 <= x0 <= W-2,
 * (0, first) when x0 = -1, (second, 0) when x0 = W-1, else 0; a row outside the image gives 0.
 * Exactly the values the masked gathers gave (zero padding), at the cost of an interior step.
 * Needs W >= 2 (the callers use the gathers otherwise). */
static inline void corners_border_zf(const float *p, I_zf x0, I_zf y0, int32_t w, int32_t h, int32_t *off,
                                     V_zf *a, V_zf *b, V_zf *c, V_zf *d) {
    const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi32(1);
    const __m512i xc = _mm512_min_epi32(_mm512_max_epi32(x0, zero), _mm512_set1_epi32(w - 2));
    const __m512i hmax = _mm512_set1_epi32(h - 1), y1 = _mm512_add_epi32(y0, one);
    const __m512i yc0 = _mm512_min_epi32(_mm512_max_epi32(y0, zero), hmax);
    const __m512i yc1 = _mm512_min_epi32(_mm512_max_epi32(y1, zero), hmax);
    const __m512i wv = _mm512_set1_epi32(w);
    _mm512_storeu_si512((void *)off, _mm512_add_epi32(_mm512_mullo_epi32(yc0, wv), xc));
    _mm512_storeu_si512((void *)(off + 16), _mm512_add_epi32(_mm512_mullo_epi32(yc1, wv), xc));
    COMPILER_BARRIER();
    __m128i t[8], u[8];
    for (int k = 0; k < 8; k++) {
        const float *e = p + off[2 * k], *f = p + off[2 * k + 1];
        const float *g = p + off[16 + 2 * k], *q = p + off[16 + 2 * k + 1];
        t[k] = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(_mm_loadl_epi64((const __m128i *)e)), (const double *)f));
        u[k] = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(_mm_loadl_epi64((const __m128i *)g)), (const double *)q));
    }
    const __m512 t0 = _mm512_castsi512_ps(pack4_z(t[0], t[1], t[2], t[3]));
    const __m512 t1 = _mm512_castsi512_ps(pack4_z(t[4], t[5], t[6], t[7]));
    const __m512 u0 = _mm512_castsi512_ps(pack4_z(u[0], u[1], u[2], u[3]));
    const __m512 u1 = _mm512_castsi512_ps(pack4_z(u[4], u[5], u[6], u[7]));
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    const __m512 ta = _mm512_permutex2var_ps(t0, even, t1), tb = _mm512_permutex2var_ps(t0, odd, t1);
    const __m512 ua = _mm512_permutex2var_ps(u0, even, u1), ub = _mm512_permutex2var_ps(u0, odd, u1);
    const __mmask16 in = _mm512_cmplt_epu32_mask(x0, _mm512_set1_epi32(w - 1)); /* 0 <= x0 <= W-2 */
    const __mmask16 lo = _mm512_cmpeq_epi32_mask(x0, _mm512_set1_epi32(-1));
    const __mmask16 hi = _mm512_cmpeq_epi32_mask(x0, _mm512_set1_epi32(w - 1));
    const __mmask16 r0 = _mm512_cmplt_epu32_mask(y0, _mm512_set1_epi32(h));
    const __mmask16 r1 = _mm512_cmplt_epu32_mask(y1, _mm512_set1_epi32(h));
    *a = _mm512_maskz_mov_ps(r0, _mm512_mask_mov_ps(_mm512_maskz_mov_ps(in, ta), hi, tb));
    *b = _mm512_maskz_mov_ps(r0, _mm512_mask_mov_ps(_mm512_maskz_mov_ps(in, tb), lo, ta));
    *c = _mm512_maskz_mov_ps(r1, _mm512_mask_mov_ps(_mm512_maskz_mov_ps(in, ua), hi, ub));
    *d = _mm512_maskz_mov_ps(r1, _mm512_mask_mov_ps(_mm512_maskz_mov_ps(in, ub), lo, ua));
}
#define BORDER_LOADS_zf 1
static inline K_zf kor_zf(K_zf a, K_zf b) { return a | b; }
static inline unsigned kbits_zf(K_zf k) { return (unsigned)k; }
static const int lane_order_zf[N_zf] = {0, 3, 6, 9, 12, 15, 1, 4, 7, 10, 13, 2, 5, 8, 11, 14};
static inline V_zf iota_zf(void) { return _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); }
static inline V_zf clamp_zf(V_zf x, float hi) { return _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-2.0f)), _mm512_set1_ps(hi)); }
static inline V_zf floor_zf(V_zf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
static inline I_zf toint_zf(V_zf x) { return _mm512_cvttps_epi32(x); }
static inline void accum_zf(V_zf gx, V_zf gy, double u0, D_z acc[4]) {
    const D_z lo = _mm512_add_pd(_mm512_set1_pd(u0), _mm512_set_pd(7, 6, 5, 4, 3, 2, 1, 0));
    const D_z hi = _mm512_add_pd(lo, _mm512_set1_pd(8.0));
    const D_z xl = _mm512_cvtps_pd(_mm512_castps512_ps256(gx));
    const D_z xh = _mm512_cvtps_pd(_mm512_extractf32x8_ps(gx, 1));
    const D_z yl = _mm512_cvtps_pd(_mm512_castps512_ps256(gy));
    const D_z yh = _mm512_cvtps_pd(_mm512_extractf32x8_ps(gy, 1));
    acc[0] = _mm512_add_pd(acc[0], _mm512_add_pd(xl, xh));
    acc[1] = _mm512_add_pd(acc[1], _mm512_add_pd(yl, yh));
    acc[2] = _mm512_fmadd_pd(xh, hi, _mm512_fmadd_pd(xl, lo, acc[2]));
    acc[3] = _mm512_fmadd_pd(yh, hi, _mm512_fmadd_pd(yl, lo, acc[3]));
}

static inline I_zd iload_zd(const int32_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline void istore_zd(int32_t *p, I_zd v) { _mm256_storeu_si256((__m256i *)p, v); }
static inline I_zd iaddc_zd(I_zd v, int32_t c) { return _mm256_add_epi32(v, _mm256_set1_epi32(c)); }
static inline I_zd imad_zd(I_zd y, int32_t w, I_zd x) {
    return _mm256_add_epi32(_mm256_mullo_epi32(y, _mm256_set1_epi32(w)), x);
}
static inline K_zd inrange_zd(I_zd v, int32_t n) { return _mm256_cmplt_epu32_mask(v, _mm256_set1_epi32(n)); }
static inline K_zd kand_zd(K_zd a, K_zd b) { return a & b; }
static inline I_zd imaskz_zd(K_zd k, I_zd v) { return _mm256_maskz_mov_epi32(k, v); }
static inline V_zd gather_zd(const double *base, I_zd idx, K_zd k) {
    return _mm512_mask_i32gather_pd(_mm512_setzero_pd(), k, idx, base, 8);
}
static inline V_zd maskz_zd(K_zd k, V_zd v) { return _mm512_maskz_mov_pd(k, v); }
static inline V_zd load_zd(const double *p) { return _mm512_loadu_pd(p); }
static inline void store_zd(double *p, V_zd v) { _mm512_storeu_pd(p, v); }
static inline void nstore_zd(double *p, V_zd v) { _mm512_storeu_pd(p, v); }
static inline V_zd set1_zd(double x) { return _mm512_set1_pd(x); }
static inline V_zd zero_zd(void) { return _mm512_setzero_pd(); }
static inline V_zd add_zd(V_zd a, V_zd b) { return _mm512_add_pd(a, b); }
static inline V_zd sub_zd(V_zd a, V_zd b) { return _mm512_sub_pd(a, b); }
static inline V_zd mul_zd(V_zd a, V_zd b) { return _mm512_mul_pd(a, b); }
static inline V_zd fma_zd(V_zd a, V_zd b, V_zd c) { return _mm512_fmadd_pd(a, b, c); }
static inline int kall_zd(K_zd k) { return k == 0xFF; }
static inline K_zd tail_zd(int dead) { return (K_zd)(0xFFu << dead); }
static inline void zip_zd(V_zd a, V_zd b, double *dst) {
    _mm512_storeu_pd(dst, _mm512_permutex2var_pd(a, _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0), b));
    _mm512_storeu_pd(dst + 8, _mm512_permutex2var_pd(a, _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4), b));
}
static inline void corners4_zd(const double *p, I_zd o, const int32_t *off, int32_t w, V_zd *a, V_zd *b, V_zd *c,
                               V_zd *d) {
    (void)off; /* gathers: the offsets in a vector */
    *a = _mm512_i32gather_pd(o, p, 8);
    *b = _mm512_i32gather_pd(_mm256_add_epi32(o, _mm256_set1_epi32(1)), p, 8);
    *c = _mm512_i32gather_pd(_mm256_add_epi32(o, _mm256_set1_epi32(w)), p, 8);
    *d = _mm512_i32gather_pd(_mm256_add_epi32(o, _mm256_set1_epi32(w + 1)), p, 8);
}
DEFINE_BORDER_STUB(zd, double, I_zd)
#define BORDER_LOADS_zd 0
static inline K_zd kor_zd(K_zd a, K_zd b) { return a | b; }
static inline unsigned kbits_zd(K_zd k) { return (unsigned)k; }
static const int lane_order_zd[N_zd] = {0, 3, 6, 1, 4, 7, 2, 5};
static inline V_zd iota_zd(void) { return _mm512_set_pd(7, 6, 5, 4, 3, 2, 1, 0); }
static inline V_zd clamp_zd(V_zd x, double hi) { return _mm512_min_pd(_mm512_max_pd(x, _mm512_set1_pd(-2.0)), _mm512_set1_pd(hi)); }
static inline V_zd floor_zd(V_zd x) { return _mm512_roundscale_pd(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
static inline I_zd toint_zd(V_zd x) { return _mm512_cvttpd_epi32(x); }
static inline void accum_zd(V_zd gx, V_zd gy, double u0, D_z acc[4]) {
    const D_z u = _mm512_add_pd(_mm512_set1_pd(u0), _mm512_set_pd(7, 6, 5, 4, 3, 2, 1, 0));
    acc[0] = _mm512_add_pd(acc[0], gx);
    acc[1] = _mm512_add_pd(acc[1], gy);
    acc[2] = _mm512_fmadd_pd(gx, u, acc[2]);
    acc[3] = _mm512_fmadd_pd(gy, u, acc[3]);
}
static inline D_z dzero_z(void) { return _mm512_setzero_pd(); }
static inline double hsum_z(D_z v) { return _mm512_reduce_add_pd(v); }
#define SUFFIX_F32 zf
#define SUFFIX_F64 zd
#define DZ z

#elif defined(ROTSTN_AVX2)
#define N_yf 8
#define N_yd 4
typedef __m256 V_yf;
typedef __m256i I_yf;
typedef __m256i K_yf;
typedef __m256d V_yd;
typedef __m128i I_yd;
typedef __m128i K_yd;
typedef __m256d D_y;

static inline I_yf iload_yf(const int32_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline void istore_yf(int32_t *p, I_yf v) { _mm256_storeu_si256((__m256i *)p, v); }
static inline I_yf iaddc_yf(I_yf v, int32_t c) { return _mm256_add_epi32(v, _mm256_set1_epi32(c)); }
static inline I_yf imad_yf(I_yf y, int32_t w, I_yf x) {
    return _mm256_add_epi32(_mm256_mullo_epi32(y, _mm256_set1_epi32(w)), x);
}
static inline K_yf inrange_yf(I_yf v, int32_t n) {
    return _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_setzero_si256(), v),
                               _mm256_cmpgt_epi32(_mm256_set1_epi32(n), v));
}
static inline K_yf kand_yf(K_yf a, K_yf b) { return _mm256_and_si256(a, b); }
static inline I_yf imaskz_yf(K_yf k, I_yf v) { return _mm256_and_si256(k, v); }
static inline V_yf gather_yf(const float *base, I_yf idx, K_yf k) {
    return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), base, idx, _mm256_castsi256_ps(k), 4);
}
static inline V_yf maskz_yf(K_yf k, V_yf v) { return _mm256_and_ps(_mm256_castsi256_ps(k), v); }
static inline V_yf load_yf(const float *p) { return _mm256_loadu_ps(p); }
static inline void store_yf(float *p, V_yf v) { _mm256_storeu_ps(p, v); }
static inline void nstore_yf(float *p, V_yf v) { _mm256_storeu_ps(p, v); }
static inline V_yf set1_yf(float x) { return _mm256_set1_ps(x); }
static inline V_yf zero_yf(void) { return _mm256_setzero_ps(); }
static inline V_yf add_yf(V_yf a, V_yf b) { return _mm256_add_ps(a, b); }
static inline V_yf sub_yf(V_yf a, V_yf b) { return _mm256_sub_ps(a, b); }
static inline V_yf mul_yf(V_yf a, V_yf b) { return _mm256_mul_ps(a, b); }
static inline V_yf fma_yf(V_yf a, V_yf b, V_yf c) { return _mm256_fmadd_ps(a, b, c); }
static inline int kall_yf(K_yf k) { return _mm256_movemask_ps(_mm256_castsi256_ps(k)) == 0xFF; }
static inline K_yf tail_yf(int dead) {
    return _mm256_cmpgt_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(dead - 1));
}
static inline void zip_yf(V_yf a, V_yf b, float *dst) {
    const __m256 lo = _mm256_unpacklo_ps(a, b), hi = _mm256_unpackhi_ps(a, b);
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
}
/* As corners4_zf, for 8 pixels: four 64-bit gathers of 4 row pairs. */
static inline void corners4_yf(const float *p, I_yf o, const int32_t *off, int32_t w, V_yf *a, V_yf *b, V_yf *c,
                               V_yf *d) {
    (void)o; /* the offsets come in stored (off), once for every channel */
    const float *pw = p + w;
    __m128i t[4], u[4];
    for (int k = 0; k < 4; k++) {
        const float *e = p + off[2 * k], *f = p + off[2 * k + 1];
        const float *g = pw + off[2 * k], *h = pw + off[2 * k + 1];
        t[k] = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(_mm_loadl_epi64((const __m128i *)e)), (const double *)f));
        u[k] = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(_mm_loadl_epi64((const __m128i *)g)), (const double *)h));
    }
    const __m256 t0 = _mm256_castsi256_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(t[0]), t[1], 1));
    const __m256 t1 = _mm256_castsi256_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(t[2]), t[3], 1));
    const __m256 u0 = _mm256_castsi256_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(u[0]), u[1], 1));
    const __m256 u1 = _mm256_castsi256_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(u[2]), u[3], 1));
    /* shuffle gives a0 a1 a4 a5 | a2 a3 a6 a7; the 64-bit permute puts the quarters in order */
    *a = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(t0, t1, 0x88)), 0xD8));
    *b = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(t0, t1, 0xDD)), 0xD8));
    *c = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(u0, u1, 0x88)), 0xD8));
    *d = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(u0, u1, 0xDD)), 0xD8));
}
/* As corners_border_zf, for 8 pixels. */
static inline void corners_border_yf(const float *p, I_yf x0, I_yf y0, int32_t w, int32_t h, int32_t *off,
                                     V_yf *a, V_yf *b, V_yf *c, V_yf *d) {
    const __m256i zero = _mm256_setzero_si256(), one = _mm256_set1_epi32(1);
    const __m256i xc = _mm256_min_epi32(_mm256_max_epi32(x0, zero), _mm256_set1_epi32(w - 2));
    const __m256i hmax = _mm256_set1_epi32(h - 1), y1 = _mm256_add_epi32(y0, one);
    const __m256i yc0 = _mm256_min_epi32(_mm256_max_epi32(y0, zero), hmax);
    const __m256i yc1 = _mm256_min_epi32(_mm256_max_epi32(y1, zero), hmax);
    const __m256i wv = _mm256_set1_epi32(w);
    _mm256_storeu_si256((__m256i *)off, _mm256_add_epi32(_mm256_mullo_epi32(yc0, wv), xc));
    _mm256_storeu_si256((__m256i *)(off + 8), _mm256_add_epi32(_mm256_mullo_epi32(yc1, wv), xc));
    COMPILER_BARRIER();
    __m128i t[4], u[4];
    for (int k = 0; k < 4; k++) {
        const float *e = p + off[2 * k], *f = p + off[2 * k + 1];
        const float *g = p + off[8 + 2 * k], *q = p + off[8 + 2 * k + 1];
        t[k] = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(_mm_loadl_epi64((const __m128i *)e)), (const double *)f));
        u[k] = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(_mm_loadl_epi64((const __m128i *)g)), (const double *)q));
    }
    const __m256 t0 = _mm256_castsi256_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(t[0]), t[1], 1));
    const __m256 t1 = _mm256_castsi256_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(t[2]), t[3], 1));
    const __m256 u0 = _mm256_castsi256_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(u[0]), u[1], 1));
    const __m256 u1 = _mm256_castsi256_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(u[2]), u[3], 1));
    const __m256 ta = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(t0, t1, 0x88)), 0xD8));
    const __m256 tb = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(t0, t1, 0xDD)), 0xD8));
    const __m256 ua = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(u0, u1, 0x88)), 0xD8));
    const __m256 ub = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(u0, u1, 0xDD)), 0xD8));
    const __m256 in = _mm256_castsi256_ps(inrange_yf(x0, w - 1)); /* 0 <= x0 <= W-2 */
    const __m256 lo = _mm256_castsi256_ps(_mm256_cmpeq_epi32(x0, _mm256_set1_epi32(-1)));
    const __m256 hi = _mm256_castsi256_ps(_mm256_cmpeq_epi32(x0, _mm256_set1_epi32(w - 1)));
    const __m256 r0 = _mm256_castsi256_ps(inrange_yf(y0, h)), r1 = _mm256_castsi256_ps(inrange_yf(y1, h));
    /* in, lo and hi exclude each other: or-ing the and-ed values selects */
    *a = _mm256_and_ps(r0, _mm256_or_ps(_mm256_and_ps(in, ta), _mm256_and_ps(hi, tb)));
    *b = _mm256_and_ps(r0, _mm256_or_ps(_mm256_and_ps(in, tb), _mm256_and_ps(lo, ta)));
    *c = _mm256_and_ps(r1, _mm256_or_ps(_mm256_and_ps(in, ua), _mm256_and_ps(hi, ub)));
    *d = _mm256_and_ps(r1, _mm256_or_ps(_mm256_and_ps(in, ub), _mm256_and_ps(lo, ua)));
}
#define BORDER_LOADS_yf 1
static inline K_yf kor_yf(K_yf a, K_yf b) { return _mm256_or_si256(a, b); }
static inline unsigned kbits_yf(K_yf k) { return (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(k)); }
static const int lane_order_yf[N_yf] = {0, 3, 6, 1, 4, 7, 2, 5};
static inline V_yf iota_yf(void) { return _mm256_set_ps(7, 6, 5, 4, 3, 2, 1, 0); }
static inline V_yf clamp_yf(V_yf x, float hi) { return _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-2.0f)), _mm256_set1_ps(hi)); }
static inline V_yf floor_yf(V_yf x) { return _mm256_floor_ps(x); }
static inline I_yf toint_yf(V_yf x) { return _mm256_cvttps_epi32(x); }
static inline void accum_yf(V_yf gx, V_yf gy, double u0, D_y acc[4]) {
    const D_y lo = _mm256_add_pd(_mm256_set1_pd(u0), _mm256_set_pd(3, 2, 1, 0));
    const D_y hi = _mm256_add_pd(lo, _mm256_set1_pd(4.0));
    const D_y xl = _mm256_cvtps_pd(_mm256_castps256_ps128(gx)), xh = _mm256_cvtps_pd(_mm256_extractf128_ps(gx, 1));
    const D_y yl = _mm256_cvtps_pd(_mm256_castps256_ps128(gy)), yh = _mm256_cvtps_pd(_mm256_extractf128_ps(gy, 1));
    acc[0] = _mm256_add_pd(acc[0], _mm256_add_pd(xl, xh));
    acc[1] = _mm256_add_pd(acc[1], _mm256_add_pd(yl, yh));
    acc[2] = _mm256_fmadd_pd(xh, hi, _mm256_fmadd_pd(xl, lo, acc[2]));
    acc[3] = _mm256_fmadd_pd(yh, hi, _mm256_fmadd_pd(yl, lo, acc[3]));
}

static inline I_yd iload_yd(const int32_t *p) { return _mm_loadu_si128((const __m128i *)p); }
static inline void istore_yd(int32_t *p, I_yd v) { _mm_storeu_si128((__m128i *)p, v); }
static inline I_yd iaddc_yd(I_yd v, int32_t c) { return _mm_add_epi32(v, _mm_set1_epi32(c)); }
static inline I_yd imad_yd(I_yd y, int32_t w, I_yd x) {
    return _mm_add_epi32(_mm_mullo_epi32(y, _mm_set1_epi32(w)), x);
}
static inline K_yd inrange_yd(I_yd v, int32_t n) {
    return _mm_andnot_si128(_mm_cmplt_epi32(v, _mm_setzero_si128()), _mm_cmplt_epi32(v, _mm_set1_epi32(n)));
}
static inline K_yd kand_yd(K_yd a, K_yd b) { return _mm_and_si128(a, b); }
static inline I_yd imaskz_yd(K_yd k, I_yd v) { return _mm_and_si128(k, v); }
static inline __m256d wide_yd(K_yd k) { return _mm256_castsi256_pd(_mm256_cvtepi32_epi64(k)); }
static inline V_yd gather_yd(const double *base, I_yd idx, K_yd k) {
    return _mm256_mask_i32gather_pd(_mm256_setzero_pd(), base, idx, wide_yd(k), 8);
}
static inline V_yd maskz_yd(K_yd k, V_yd v) { return _mm256_and_pd(wide_yd(k), v); }
static inline V_yd load_yd(const double *p) { return _mm256_loadu_pd(p); }
static inline void store_yd(double *p, V_yd v) { _mm256_storeu_pd(p, v); }
static inline void nstore_yd(double *p, V_yd v) { _mm256_storeu_pd(p, v); }
static inline V_yd set1_yd(double x) { return _mm256_set1_pd(x); }
static inline V_yd zero_yd(void) { return _mm256_setzero_pd(); }
static inline V_yd add_yd(V_yd a, V_yd b) { return _mm256_add_pd(a, b); }
static inline V_yd sub_yd(V_yd a, V_yd b) { return _mm256_sub_pd(a, b); }
static inline V_yd mul_yd(V_yd a, V_yd b) { return _mm256_mul_pd(a, b); }
static inline V_yd fma_yd(V_yd a, V_yd b, V_yd c) { return _mm256_fmadd_pd(a, b, c); }
static inline int kall_yd(K_yd k) { return _mm_movemask_ps(_mm_castsi128_ps(k)) == 0xF; }
static inline K_yd tail_yd(int dead) { return _mm_cmpgt_epi32(_mm_setr_epi32(0, 1, 2, 3), _mm_set1_epi32(dead - 1)); }
static inline void zip_yd(V_yd a, V_yd b, double *dst) {
    const __m256d lo = _mm256_unpacklo_pd(a, b), hi = _mm256_unpackhi_pd(a, b);
    _mm256_storeu_pd(dst, _mm256_permute2f128_pd(lo, hi, 0x20));
    _mm256_storeu_pd(dst + 4, _mm256_permute2f128_pd(lo, hi, 0x31));
}
static inline void corners4_yd(const double *p, I_yd o, const int32_t *off, int32_t w, V_yd *a, V_yd *b, V_yd *c,
                               V_yd *d) {
    (void)off; /* gathers: the offsets in a vector */
    *a = _mm256_i32gather_pd(p, o, 8);
    *b = _mm256_i32gather_pd(p, _mm_add_epi32(o, _mm_set1_epi32(1)), 8);
    *c = _mm256_i32gather_pd(p, _mm_add_epi32(o, _mm_set1_epi32(w)), 8);
    *d = _mm256_i32gather_pd(p, _mm_add_epi32(o, _mm_set1_epi32(w + 1)), 8);
}
DEFINE_BORDER_STUB(yd, double, I_yd)
#define BORDER_LOADS_yd 0
static inline K_yd kor_yd(K_yd a, K_yd b) { return _mm_or_si128(a, b); }
static inline unsigned kbits_yd(K_yd k) { return (unsigned)_mm_movemask_ps(_mm_castsi128_ps(k)); }
static const int lane_order_yd[N_yd] = {0, 2, 1, 3};
static inline V_yd iota_yd(void) { return _mm256_set_pd(3, 2, 1, 0); }
static inline V_yd clamp_yd(V_yd x, double hi) { return _mm256_min_pd(_mm256_max_pd(x, _mm256_set1_pd(-2.0)), _mm256_set1_pd(hi)); }
static inline V_yd floor_yd(V_yd x) { return _mm256_floor_pd(x); }
static inline I_yd toint_yd(V_yd x) { return _mm256_cvttpd_epi32(x); }
static inline void accum_yd(V_yd gx, V_yd gy, double u0, D_y acc[4]) {
    const D_y u = _mm256_add_pd(_mm256_set1_pd(u0), _mm256_set_pd(3, 2, 1, 0));
    acc[0] = _mm256_add_pd(acc[0], gx);
    acc[1] = _mm256_add_pd(acc[1], gy);
    acc[2] = _mm256_fmadd_pd(gx, u, acc[2]);
    acc[3] = _mm256_fmadd_pd(gy, u, acc[3]);
}
static inline D_y dzero_y(void) { return _mm256_setzero_pd(); }
static inline double hsum_y(D_y v) {
    const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
#define SUFFIX_F32 yf
#define SUFFIX_F64 yd
#define DZ y
#endif

#if defined(ROTSTN_AVX512) || defined(ROTSTN_AVX2)
/* q[0] += a[0], q[1] += a[1] as one 8- or 16-byte load, add and store (a corner pair of a row). */
static inline void pair_add_f32(float *q, const float *a) {
    const __m128 sum = _mm_add_ps(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)q)),
                                  _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)a)));
    _mm_storel_epi64((__m128i *)q, _mm_castps_si128(sum));
}
static inline void pair_add_f64(double *q, const double *a) { _mm_storeu_pd(q, _mm_add_pd(_mm_loadu_pd(q), _mm_loadu_pd(a))); }
#endif

#if defined(ROTSTN_AVX512) || defined(ROTSTN_AVX2)
#define STREAM_FENCE() _mm_sfence()
#else
#define STREAM_FENCE() ((void)0)
#endif

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

#if defined(ROTSTN_AVX512) || defined(ROTSTN_AVX2)
/* Source coordinates of a step of N pixels, in registers: x = c·j + bx, y = s·j + by with the row's
 * bx = sx - c·cx - s·v, by = sy - s·cx + c·v formed in double and rounded once to T (for float the
 * same order of rounding as the reference path's float grid; at θ = 0 with source = centre, x is
 * exactly j). Clamped to [-2, W+1] × [-2, H+1] (NaN to -2), where every corner is outside. */
#define DEFINE_ROW_CONSTANTS(T, S)                                                                      \
    typedef struct {                                                                                    \
        V_##S cv, sv, bxv, byv, iota;                                                                   \
        T xmax, ymax;                                                                                   \
    } row_##S;                                                                                          \
    static inline row_##S row_setup_##S(const double *par, int64_t i, int64_t H, int64_t W) {           \
        const double c = par[0], s = par[1], v = (double)i - par[3];                                    \
        row_##S r = {set1_##S((T)c), set1_##S((T)s), set1_##S((T)(par[4] - c * par[2] - s * v)),       \
                     set1_##S((T)(par[5] - s * par[2] + c * v)), iota_##S(), (T)W + 1, (T)H + 1};       \
        return r;                                                                                       \
    }
#define DEFINE_ROW_CONSTANTS_(T, S) DEFINE_ROW_CONSTANTS(T, S)
DEFINE_ROW_CONSTANTS_(float, SUFFIX_F32)
DEFINE_ROW_CONSTANTS_(double, SUFFIX_F64)

/* The step's coordinates, corner masks (k00 … k11: corner inside the image and lane live) and
 * corner offsets, as locals of the step functions below. */
#define STEP_SETUP(T, S)                                                                                \
    const int32_t w32 = (int32_t)W, h32 = (int32_t)H;                                                   \
    const V_##S jv = add_##S(set1_##S((T)j), rc->iota);                                                 \
    const V_##S xs = clamp_##S(fma_##S(rc->cv, jv, rc->bxv), rc->xmax);                                \
    const V_##S ys = clamp_##S(fma_##S(rc->sv, jv, rc->byv), rc->ymax);                                \
    const V_##S fx = floor_##S(xs), fy = floor_##S(ys);                                                 \
    const I_##S x0 = toint_##S(fx), y0 = toint_##S(fy);                                                 \
    const V_##S wx = sub_##S(xs, fx), wy = sub_##S(ys, fy);                                             \
    K_##S vx0 = inrange_##S(x0, w32), vx1 = inrange_##S(iaddc_##S(x0, 1), w32);                         \
    if (!full) /* the overlapping last step of a row: lanes already done count as outside */           \
        vx0 = kand_##S(vx0, live), vx1 = kand_##S(vx1, live);                                           \
    const K_##S vy0 = inrange_##S(y0, h32), vy1 = inrange_##S(iaddc_##S(y0, 1), h32);                   \
    const K_##S k00 = kand_##S(vx0, vy0), k01 = kand_##S(vx1, vy0);                                     \
    const K_##S k10 = kand_##S(vx0, vy1), k11 = kand_##S(vx1, vy1);                                     \
    const I_##S o00 = imad_##S(y0, w32, x0), o01 = iaddc_##S(o00, 1);                                   \
    const I_##S o10 = iaddc_##S(o00, w32), o11 = iaddc_##S(o00, w32 + 1);                               \
    const int interior = kall_##S(kand_##S(k00, k11));                                                  \
    (void)o01, (void)o10, (void)o11;

/* The four corners a (x0, y0), b (x0+1, y0), c (x0, y0+1), d (x0+1, y0+1) of a step's pixels in
 * channel plane p; corners outside the image read as 0. */
#define CORNERS(S)                                                                                      \
    if (interior) {                                                                                     \
        COMPILER_BARRIER();                                                                             \
        corners4_##S(p, o00, offs, w32, &a, &b, &c, &d);                                                \
    } else if (BORDER_LOADS_##S && w32 >= 2) {                                                          \
        corners_border_##S(p, x0, y0, w32, h32, border_off, &a, &b, &c, &d);                            \
    } else {                                                                                            \
        a = gather_##S(p, o00, k00);                                                                    \
        b = gather_##S(p, o01, k01);                                                                    \
        c = gather_##S(p, o10, k10);                                                                    \
        d = gather_##S(p, o11, k11);                                                                    \
    }

/* An interior step's corner offsets, stored once for every channel's loads (corners4: the float
 * builds read them back as scalars; the double builds gather from the vector and ignore them). */
#define STORE_OFFSETS(S)                                                                                \
    if (interior) {                                                                                     \
        istore_##S(offs, o00);                                                                          \
        COMPILER_BARRIER();                                                                             \
    }
#endif

/* The whole image of the sample about to be sampled, into the caches (L1, spilling to L2), before
 * its first row: a rotated walk over a fresh image defeats the hardware prefetchers, and each
 * miss stalls a gather for the full L3 or memory latency, one after the other. Issued up front,
 * the prefetches overlap (about 1000 lines for a 128² float image take a few µs) and the
 * gathers then hit L1 or L2 (forward at C = 3 about 2× faster, backward 1.5× faster, B = 64,
 * 128², against fetching the next sample's image a slice per row as before). Only images that
 * fit half of a thread's L2 are fetched (prefetch_max_bytes, set from the caches the OS reports by
 * rotstn_set_limits; 512 KiB until then); larger ones are left to the hardware. */
static int64_t prefetch_max_bytes = 512 * 1024;

/* The cache-dependent limits (rotstn/_kernels/machine.py computes them from the machine's caches). */
void rotstn_set_limits(int64_t prefetch_bytes) {
    if (prefetch_bytes >= 0)
        prefetch_max_bytes = prefetch_bytes;
}

static inline void prefetch_image(const void *img, size_t bytes) {
    if ((int64_t)bytes > prefetch_max_bytes)
        return;
    const char *p = (const char *)img;
    for (size_t o = 0; o < bytes; o += 64)
        __builtin_prefetch(p + o, 0, 3);
}

/* ================================================================================================
 * 2. Forward: one pass over the output pixels, every channel, and the derivatives ∂out/∂x,
 * ∂out/∂y the backward reads instead of the corners when the forward is asked for them.
 * ================================================================================================ */

/* One output pixel, scalar: the generic build's loop body and the vector builds' row tails.
 * o points at output pixel (i, j) of channel 0. */
#define DEFINE_PIXEL_FORWARD(T, SUFFIX)                                                                \
    ALWAYS_INLINE void forward_px_##SUFFIX(const T *img, T *o, const int64_t C, const int64_t H,        \
                                           const int64_t W, const int32_t x0, const int32_t y0,         \
                                           const T wx, const T wy) {                                    \
        const int64_t HW = H * W;                                                                       \
        if ((uint32_t)x0 < (uint32_t)(W - 1) && (uint32_t)y0 < (uint32_t)(H - 1)) {                     \
            const T *p = img + (int64_t)y0 * W + x0;                                                    \
            int64_t ch = 0;                                                                             \
            do {                                                                                        \
                const T top = p[0] + wx * (p[1] - p[0]);                                                \
                const T bottom = p[W] + wx * (p[W + 1] - p[W]);                                         \
                o[ch * HW] = top + wy * (bottom - top);                                                 \
                p += HW;                                                                                \
            } while (++ch < C);                                                                         \
            return;                                                                                     \
        }                                                                                               \
        double w[4];                                                                                    \
        int64_t off[4];                                                                                 \
        int valid[4];                                                                                   \
        corners(x0, y0, (double)wx, (double)wy, H, W, w, off, valid);                                   \
        for (int64_t ch = 0; ch < C; ch++) {                                                            \
            const T *p = img + ch * HW;                                                                 \
            o[ch * HW] = (T)w[0] * p[off[0]] + (T)w[1] * p[off[1]] + (T)w[2] * p[off[2]] +              \
                         (T)w[3] * p[off[3]];                                                           \
        }                                                                                               \
    }                                                                                                   \
                                                                                                        \
    /* ∂out/∂x, ∂out/∂y of one pixel, per channel, as backward_px_core computes them: d[ch·HW] and      \
     * d[(C + ch)·HW] (the forward's saved derivatives, which spare the backward the corners). */       \
    ALWAYS_INLINE void deriv_px_##SUFFIX(const T *img, T *dv, const int64_t C, const int64_t H,         \
                                         const int64_t W, const int32_t x0, const int32_t y0, const T wx,\
                                         const T wy) {                                                  \
        const int64_t HW = H * W;                                                                       \
        if ((uint32_t)x0 < (uint32_t)(W - 1) && (uint32_t)y0 < (uint32_t)(H - 1)) {                     \
            for (int64_t ch = 0; ch < C; ch++) {                                                        \
                const T *p = img + ch * HW + (int64_t)y0 * W + x0;                                      \
                const T i00 = p[0], i01 = p[1], i10 = p[W], i11 = p[W + 1];                             \
                const T dx0 = i01 - i00, dy0 = i10 - i00;                                               \
                dv[ch * HW] = dx0 + wy * (i11 - i10 - dx0);                                             \
                dv[(C + ch) * HW] = dy0 + wx * (i11 - i01 - dy0);                                       \
            }                                                                                           \
            return;                                                                                     \
        }                                                                                               \
        double w[4];                                                                                    \
        int64_t off[4];                                                                                 \
        int valid[4];                                                                                   \
        corners(x0, y0, (double)wx, (double)wy, H, W, w, off, valid);                                   \
        for (int64_t ch = 0; ch < C; ch++) {                                                            \
            const T *p = img + ch * HW;                                                                 \
            const T i00 = valid[0] ? p[off[0]] : 0, i01 = valid[1] ? p[off[1]] : 0;                     \
            const T i10 = valid[2] ? p[off[2]] : 0, i11 = valid[3] ? p[off[3]] : 0;                     \
            dv[ch * HW] = (1 - wy) * (i01 - i00) + wy * (i11 - i10);                                    \
            dv[(C + ch) * HW] = (1 - wx) * (i10 - i00) + wx * (i11 - i01);                              \
        }                                                                                               \
    }

DEFINE_PIXEL_FORWARD(float, f32)
DEFINE_PIXEL_FORWARD(double, f64)

#if defined(ROTSTN_AVX512) || defined(ROTSTN_AVX2)
/* One step of N output pixels from column j: every channel's value and, with deriv, ∂out/∂x and
 * ∂out/∂y as the backward computes them. Writing a lane twice (the overlapping last step of a
 * row) writes the same bits, so the forward needs no lane mask (full = 1 always). */
#define DEFINE_VECTOR_FORWARD_(T, S, SS)                                                                \
    ALWAYS_INLINE void forward_step_##SS(const T *img, T *out, T *deriv, const int64_t C,               \
                                         const int64_t H, const int64_t W, const int64_t i,             \
                                         const int64_t j, const row_##S *rc) {                          \
        const int full = 1;                                                                             \
        const K_##S live = tail_##S(0);                                                                 \
        const int64_t HW = H * W, at = i * W + j;                                                       \
        int32_t offs[N_##S], border_off[2 * N_##S];                                                     \
        STEP_SETUP(T, S)                                                                                \
        (void)live;                                                                                     \
        STORE_OFFSETS(S)                                                                                \
        for (int64_t ch = 0; ch < C; ch++) {                                                            \
            const T *p = img + ch * HW;                                                                 \
            V_##S a, b, c, d;                                                                           \
            CORNERS(S)                                                                                  \
            if (deriv) {                                                                                \
                const V_##S dx0 = sub_##S(b, a), dy0 = sub_##S(c, a);                                   \
                nstore_##S(deriv + ch * HW + at, fma_##S(wy, sub_##S(sub_##S(d, c), dx0), dx0));        \
                nstore_##S(deriv + (C + ch) * HW + at, fma_##S(wx, sub_##S(sub_##S(d, b), dy0), dy0));  \
            }                                                                                           \
            const V_##S top = fma_##S(wx, sub_##S(b, a), a);                                            \
            const V_##S bottom = fma_##S(wx, sub_##S(d, c), c);                                         \
            store_##S(out + ch * HW + at, fma_##S(wy, sub_##S(bottom, top), top));                      \
        }                                                                                               \
    }                                                                                                   \
                                                                                                        \
    /* Row i: N pixels a step; a row that is not a whole number of steps ends with one more step      \
     * over its last N pixels (overlapping the one before), so odd widths stay vectorised; rows       \
     * narrower than one step go through the scalar pixel code. */                                    \
    ALWAYS_INLINE void forward_row_##SS(const T *img, T *out, T *deriv, const int64_t C, const int64_t H, \
                                        const int64_t W, const int64_t i, const double *par,             \
                                        ROW_BUFFERS(T)) {                                               \
        (void)rx0, (void)ry0, (void)rwx, (void)rwy;                                                     \
        const row_##S rc = row_setup_##S(par, i, H, W);                                                 \
        int64_t j = 0;                                                                                  \
        for (; j + N_##S <= W; j += N_##S)                                                              \
            forward_step_##SS(img, out, deriv, C, H, W, i, j, &rc);                                     \
        if (j < W && W >= N_##S) {                                                                      \
            forward_step_##SS(img, out, deriv, C, H, W, i, W - N_##S, &rc);                             \
            return;                                                                                     \
        }                                                                                               \
        for (; j < W; j++) {                                                                            \
            int32_t x0, y0;                                                                             \
            double wx, wy;                                                                              \
            pixel_coords(W, H, par, i, j, &x0, &y0, &wx, &wy);                                          \
            forward_px_##SS(img, out + i * W + j, C, H, W, x0, y0, (T)wx, (T)wy);                       \
            if (deriv)                                                                                  \
                deriv_px_##SS(img, deriv + i * W + j, C, H, W, x0, y0, (T)wx, (T)wy);                   \
        }                                                                                               \
    }
#define DEFINE_VECTOR_FORWARD(T, S, SS) DEFINE_VECTOR_FORWARD_(T, S, SS)
DEFINE_VECTOR_FORWARD(float, SUFFIX_F32, f32)
DEFINE_VECTOR_FORWARD(double, SUFFIX_F64, f64)
#else
/* Generic build: the scalar pixel code, one pixel at a time, after the row's coordinate pass. */
#define DEFINE_SCALAR_FORWARD(T, SS)                                                                   \
    ALWAYS_INLINE void forward_row_##SS(const T *img, T *out, T *deriv, const int64_t C, const int64_t H, \
                                        const int64_t W, const int64_t i, const double *par,             \
                                        ROW_BUFFERS(T)) {                                               \
        row_coords_##SS(W, H, par, i, rx0, ry0, rwx, rwy);                                              \
        for (int64_t j = 0; j < W; j++) {                                                               \
            forward_px_##SS(img, out + i * W + j, C, H, W, rx0[j], ry0[j], rwx[j], rwy[j]);             \
            if (deriv)                                                                                  \
                deriv_px_##SS(img, deriv + i * W + j, C, H, W, rx0[j], ry0[j], rwx[j], rwy[j]);         \
        }                                                                                               \
    }

DEFINE_SCALAR_FORWARD(float, f32)
DEFINE_SCALAR_FORWARD(double, f64)
#endif

#define WORKER_SETUP(T)                                                                                 \
    const job_t *jb = (const job_t *)arg;                                                               \
    const int64_t C = jb->C, H = jb->H, W = jb->W, HW = H * W;                                          \
    T *rwx = (T *)(jb->scratch + (size_t)jb->tid * jb->scratch_bytes), *rwy = rwx + W;                  \
    int32_t *rx0 = (int32_t *)(rwy + W), *ry0 = rx0 + W;                                                \
    int64_t r0, r1;                                                                                     \
    row_range(jb, &r0, &r1);                                                                            \
    int64_t b = -1; /* the sample in hand (next_b) */

/* One share of the forward: samples (or rows) one after the other, each image prefetched first. */
#define DEFINE_FORWARD_WORKER(T, SUFFIX)                                                               \
    static void *forward_worker_##SUFFIX(void *arg) {                                                   \
        WORKER_SETUP(T)                                                                                 \
        while (next_b(jb, &b)) {                                                                        \
            const T *img = (const T *)jb->img + b * jb->img_bstride;                                    \
            T *out = (T *)jb->out + b * C * HW;                                                         \
            T *dv = jb->deriv ? (T *)jb->deriv + b * 2 * C * HW : NULL;                                 \
            const double *par = jb->par + 6 * b;                                                        \
            prefetch_image(img, (size_t)(C * HW) * sizeof(T));                                         \
            for (int64_t i = r0; i < r1; i++) {                                                         \
                if (C == 1)                                                                             \
                    forward_row_##SUFFIX(img, out, dv, 1, H, W, i, par, rx0, ry0, rwx, rwy);            \
                else                                                                                    \
                    forward_row_##SUFFIX(img, out, dv, C, H, W, i, par, rx0, ry0, rwx, rwy);            \
            }                                                                                           \
        }                                                                                               \
        STREAM_FENCE(); /* the derivatives' streaming stores done before the call returns */            \
        return NULL;                                                                                    \
    }

DEFINE_FORWARD_WORKER(float, f32)
DEFINE_FORWARD_WORKER(double, f64)

/* ================================================================================================
 * 3. Backward: the image-gradient scatter and the per-row sums that give dθ and the source point's
 * gradient, reduced per sample in a fixed order.
 * ================================================================================================ */

/* One pixel of the backward, scalar (the generic build's loop body and the vector builds' row
 * tails); g points at its output gradient. */
#define DEFINE_PIXEL_BACKWARD(T, SUFFIX)                                                               \
    /* Adds this pixel's dL/dx, dL/dy (over channels) to *gx, *gy and scatters into gimg. */           \
    ALWAYS_INLINE void backward_px_core_##SUFFIX(const T *img, const T *g, T *gimg, const int64_t C,         \
                                            const int64_t H, const int64_t W, const int32_t x0,         \
                                            const int32_t y0, const T wx, const T wy, const int do_img, \
                                            const int do_geo, T *gx_out, T *gy_out) {                   \
        const int64_t HW = H * W;                                                                       \
        T gx = 0, gy = 0;                                                                               \
        if ((uint32_t)x0 < (uint32_t)(W - 1) && (uint32_t)y0 < (uint32_t)(H - 1)) {                     \
            const int64_t at = (int64_t)y0 * W + x0;                                                    \
            const T w0 = (1 - wx) * (1 - wy), w1 = wx * (1 - wy);                                       \
            const T w2 = (1 - wx) * wy, w3 = wx * wy;                                                   \
            for (int64_t ch = 0; ch < C; ch++) {                                                        \
                const T gc = g[ch * HW];                                                                \
                if (do_img) {                                                                           \
                    T *q = gimg + ch * HW + at;                                                         \
                    q[0] += gc * w0;                                                                    \
                    q[1] += gc * w1;                                                                    \
                    q[W] += gc * w2;                                                                    \
                    q[W + 1] += gc * w3;                                                                \
                }                                                                                       \
                if (do_geo) {                                                                           \
                    const T *p = img + ch * HW + at;                                                    \
                    const T i00 = p[0], i01 = p[1], i10 = p[W], i11 = p[W + 1];                         \
                    const T dx0 = i01 - i00, dy0 = i10 - i00;                                           \
                    gx += gc * (dx0 + wy * (i11 - i10 - dx0));                                          \
                    gy += gc * (dy0 + wx * (i11 - i01 - dy0));                                          \
                }                                                                                       \
            }                                                                                           \
        } else {                                                                                        \
            double w[4];                                                                                \
            int64_t off[4];                                                                             \
            int valid[4];                                                                               \
            corners(x0, y0, (double)wx, (double)wy, H, W, w, off, valid);                               \
            if (!(valid[0] | valid[1] | valid[2] | valid[3])) {                                         \
                *gx_out = *gy_out = 0;                                                                  \
                return;                                                                                 \
            }                                                                                           \
            for (int64_t ch = 0; ch < C; ch++) {                                                        \
                const T gc = g[ch * HW];                                                                \
                if (do_img) {                                                                           \
                    /* Invalid corners have weight 0 and offset 0: adding 0 is harmless. */             \
                    T *q = gimg + ch * HW;                                                              \
                    for (int k = 0; k < 4; k++)                                                         \
                        q[off[k]] += gc * (T)w[k];                                                      \
                }                                                                                       \
                if (do_geo) {                                                                           \
                    const T *p = img + ch * HW;                                                         \
                    const T i00 = valid[0] ? p[off[0]] : 0, i01 = valid[1] ? p[off[1]] : 0;             \
                    const T i10 = valid[2] ? p[off[2]] : 0, i11 = valid[3] ? p[off[3]] : 0;             \
                    gx += gc * ((1 - wy) * (i01 - i00) + wy * (i11 - i10));                             \
                    gy += gc * ((1 - wx) * (i10 - i00) + wx * (i11 - i01));                             \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        *gx_out = gx;                                                                                   \
        *gy_out = gy;                                                                                   \
    }                                                                                                   \
                                                                                                        \
    /* backward_px_core, with dL/dx, dL/dy from the forward's derivatives dv when there are some. */    \
    ALWAYS_INLINE void backward_px_##SUFFIX(const T *img, const T *g, T *gimg, const T *dv,             \
                                            const int64_t C, const int64_t H, const int64_t W,          \
                                            const int32_t x0, const int32_t y0, const T wx, const T wy, \
                                            const int do_img, const int do_geo, T *gx_out, T *gy_out) { \
        if (!(dv && do_geo)) {                                                                          \
            backward_px_core_##SUFFIX(img, g, gimg, C, H, W, x0, y0, wx, wy, do_img, do_geo, gx_out, gy_out);\
            return;                                                                                     \
        }                                                                                               \
        const int64_t HW = H * W;                                                                       \
        T gx = 0, gy = 0, unused_x, unused_y;                                                           \
        for (int64_t ch = 0; ch < C; ch++) {                                                            \
            gx += g[ch * HW] * dv[ch * HW];                                                             \
            gy += g[ch * HW] * dv[(C + ch) * HW];                                                       \
        }                                                                                               \
        if (do_img)                                                                                     \
            backward_px_core_##SUFFIX(img, g, gimg, C, H, W, x0, y0, wx, wy, 1, 0, &unused_x, &unused_y);\
        *gx_out = gx;                                                                                   \
        *gy_out = gy;                                                                                   \
    }

DEFINE_PIXEL_BACKWARD(float, f32)
DEFINE_PIXEL_BACKWARD(double, f64)

#if defined(ROTSTN_AVX512) || defined(ROTSTN_AVX2)
/* The image-gradient scatter of one channel of a step: no vector scatter, since neighbouring pixels
 * share corners (conflicting lanes). add holds the weighted output gradient interleaved into row
 * pairs (x0, x0+1) of rows y0 (add[0]) and y0+1 (add[1]). Lanes go in the order 0, 3, 6, …, 1, 4, …:
 * pixels three apart never share a corner, so an update rarely waits for the one just stored
 * (store forwarding). Across the border: lanes inside by pairs, lanes partly inside corner by
 * corner, lanes wholly outside skipped. */
#define DEFINE_SCATTER(T, S, SS)                                                                        \
    ALWAYS_INLINE void scatter_step_##SS(T *q, T add[2][2 * N_##S], int32_t off[4][N_##S],              \
                                         const int64_t W, const int interior, const unsigned inside,    \
                                         const unsigned touched) {                                      \
        COMPILER_BARRIER();                                                                             \
        if (interior) {                                                                                 \
            for (int k = 0; k < N_##S; k++) {                                                           \
                const int l = lane_order_##S[k];                                                        \
                pair_add_##SS(q + off[0][l], add[0] + 2 * l);                                           \
                pair_add_##SS(q + off[0][l] + W, add[1] + 2 * l);                                       \
            }                                                                                           \
            return;                                                                                     \
        }                                                                                               \
        for (int k = 0; k < N_##S; k++) {                                                               \
            const int l = lane_order_##S[k];                                                            \
            if (inside >> l & 1) {                                                                      \
                pair_add_##SS(q + off[0][l], add[0] + 2 * l);                                           \
                pair_add_##SS(q + off[0][l] + W, add[1] + 2 * l);                                       \
            } else if (touched >> l & 1) {                                                              \
                q[off[0][l]] += add[0][2 * l];                                                          \
                q[off[1][l]] += add[0][2 * l + 1];                                                      \
                q[off[2][l]] += add[1][2 * l];                                                          \
                q[off[3][l]] += add[1][2 * l + 1];                                                      \
            }                                                                                           \
        }                                                                                               \
    }
#define DEFINE_SCATTER_(T, S, SS) DEFINE_SCATTER(T, S, SS)
DEFINE_SCATTER_(float, SUFFIX_F32, f32)
DEFINE_SCATTER_(double, SUFFIX_F64, f64)

/* One step of N pixels from column j of the backward: the scatter into gimg (do_img) and the row
 * sums Σ gx, Σ gy, Σ gx·u, Σ gy·u into acc (do_geo), with (gx, gy) = dL/d(x, y) of a pixel, from
 * the forward's derivatives when there are some, else from the image's corners. Only the lanes
 * in live count (full = 0: the overlapping last step of a row, whose first lanes are done). */
#define DEFINE_VECTOR_BACKWARD_(T, S, SS)                                                               \
    ALWAYS_INLINE void backward_step_##SS(const T *img, const T *gout, T *gimg, const T *deriv,         \
                                          const int64_t C, const int64_t H, const int64_t W,            \
                                          const int64_t i, const int64_t j, const row_##S *rc,          \
                                          const double cx, const int do_img, const int do_geo,          \
                                          const K_##S live, const int full, CAT(D_, DZ) acc[4]) {       \
        const int64_t HW = H * W, at = i * W + j;                                                       \
        int32_t off[4][N_##S], *const offs = off[0], border_off[2 * N_##S];                             \
        T add[2][2 * N_##S];                                                                            \
        STEP_SETUP(T, S)                                                                                \
        V_##S w00 = zero_##S(), w01 = w00, w10 = w00, w11 = w00;                                        \
        const unsigned inside = kbits_##S(kand_##S(k00, k11));                                         \
        const unsigned touched = kbits_##S(kor_##S(kor_##S(k00, k01), kor_##S(k10, k11)));             \
        if (do_img) {                                                                                   \
            const V_##S one = set1_##S((T)1), ux = sub_##S(one, wx), uy = sub_##S(one, wy);             \
            w00 = maskz_##S(k00, mul_##S(ux, uy));                                                      \
            w01 = maskz_##S(k01, mul_##S(wx, uy));                                                      \
            w10 = maskz_##S(k10, mul_##S(ux, wy));                                                      \
            w11 = maskz_##S(k11, mul_##S(wx, wy));                                                      \
            istore_##S(off[0], interior ? o00 : imaskz_##S(k00, o00));                                  \
            if (!interior) {                                                                            \
                istore_##S(off[1], imaskz_##S(k01, o01));                                               \
                istore_##S(off[2], imaskz_##S(k10, o10));                                               \
                istore_##S(off[3], imaskz_##S(k11, o11));                                               \
            }                                                                                           \
        }                                                                                               \
        V_##S gx = zero_##S(), gy = zero_##S();                                                         \
        if (do_geo && !deriv && !do_img) { /* else off[0] holds them already (the scatter's) */       \
            STORE_OFFSETS(S)                                                                            \
        }                                                                                               \
        for (int64_t ch = 0; ch < C; ch++) {                                                            \
            const V_##S g = load_##S(gout + ch * HW + at);                                              \
            if (do_geo && deriv) { /* the forward's ∂out/∂x, ∂out/∂y: no corners needed */              \
                gx = fma_##S(g, load_##S(deriv + ch * HW + at), gx);                                    \
                gy = fma_##S(g, load_##S(deriv + (C + ch) * HW + at), gy);                              \
            } else if (do_geo) {                                                                        \
                const T *p = img + ch * HW;                                                             \
                V_##S a, b, c, d;                                                                       \
                CORNERS(S)                                                                              \
                const V_##S dx0 = sub_##S(b, a), dy0 = sub_##S(c, a);                                   \
                gx = fma_##S(g, fma_##S(wy, sub_##S(sub_##S(d, c), dx0), dx0), gx);                     \
                gy = fma_##S(g, fma_##S(wx, sub_##S(sub_##S(d, b), dy0), dy0), gy);                     \
            }                                                                                           \
            if (do_img) {                                                                               \
                zip_##S(mul_##S(g, w00), mul_##S(g, w01), add[0]);                                      \
                zip_##S(mul_##S(g, w10), mul_##S(g, w11), add[1]);                                      \
                scatter_step_##SS(gimg + ch * HW, add, off, W, interior, inside, touched);              \
            }                                                                                           \
        }                                                                                               \
        if (do_geo) {                                                                                   \
            if (!full)                                                                                  \
                gx = maskz_##S(live, gx), gy = maskz_##S(live, gy);                                     \
            accum_##S(gx, gy, (double)j - cx, acc);                                                     \
        }                                                                                               \
    }                                                                                                   \
                                                                                                        \
    /* r = Σ_j gx, Σ_j gy, Σ_j gx·u, Σ_j gy·u over row i. Steps as in forward_row; the overlapping    \
     * last step masks off the lanes the step before has done. */                                     \
    ALWAYS_INLINE void backward_row_##SS(const T *img, const T *gout, T *gimg, const T *deriv,          \
                                         const int64_t C, const int64_t H, const int64_t W,             \
                                         const int64_t i, const double *par, ROW_BUFFERS(T),            \
                                         const int do_img, const int do_geo, double r[4]) {             \
        (void)rx0, (void)ry0, (void)rwx, (void)rwy;                                                     \
        const double cx = par[2];                                                                       \
        const row_##S rc = row_setup_##S(par, i, H, W);                                                 \
        const K_##S all = tail_##S(0);                                                                  \
        CAT(D_, DZ) acc[4] = {CAT(dzero_, DZ)(), CAT(dzero_, DZ)(), CAT(dzero_, DZ)(), CAT(dzero_, DZ)()}; \
        int64_t j = 0;                                                                                  \
        for (; j + N_##S <= W; j += N_##S)                                                              \
            backward_step_##SS(img, gout, gimg, deriv, C, H, W, i, j, &rc, cx, do_img, do_geo, all, 1, acc); \
        if (j < W && W >= N_##S) {                                                                      \
            const int64_t last = W - N_##S;                                                             \
            backward_step_##SS(img, gout, gimg, deriv, C, H, W, i, last, &rc, cx, do_img, do_geo,       \
                               tail_##S((int)(j - last)), 0, acc);                                      \
            j = W;                                                                                      \
        }                                                                                               \
        double rx = CAT(hsum_, DZ)(acc[0]), ry = CAT(hsum_, DZ)(acc[1]);                                \
        double rxu = CAT(hsum_, DZ)(acc[2]), ryu = CAT(hsum_, DZ)(acc[3]);                              \
        for (; j < W; j++) {                                                                            \
            T gx, gy;                                                                                   \
            int32_t x0, y0;                                                                             \
            double wx, wy;                                                                              \
            pixel_coords(W, H, par, i, j, &x0, &y0, &wx, &wy);                                          \
            backward_px_##SS(img, gout + i * W + j, gimg, deriv ? deriv + i * W + j : NULL, C, H, W,   \
                             x0, y0, (T)wx, (T)wy, do_img, do_geo, &gx, &gy);                           \
            const double u = (double)j - cx;                                                            \
            rx += gx;                                                                                   \
            ry += gy;                                                                                   \
            rxu += (double)gx * u;                                                                      \
            ryu += (double)gy * u;                                                                      \
        }                                                                                               \
        r[0] = rx;                                                                                      \
        r[1] = ry;                                                                                      \
        r[2] = rxu;                                                                                     \
        r[3] = ryu;                                                                                     \
    }
#define DEFINE_VECTOR_BACKWARD(T, S, SS) DEFINE_VECTOR_BACKWARD_(T, S, SS)
DEFINE_VECTOR_BACKWARD(float, SUFFIX_F32, f32)
DEFINE_VECTOR_BACKWARD(double, SUFFIX_F64, f64)
#else
/* Generic build: the scalar pixel code, one pixel at a time, after the row's coordinate pass. */
#define DEFINE_SCALAR_BACKWARD(T, SS)                                                                  \
    ALWAYS_INLINE void backward_row_##SS(const T *img, const T *gout, T *gimg, const T *deriv,          \
                                         const int64_t C,                                               \
                                         const int64_t H, const int64_t W, const int64_t i,             \
                                         const double *par, ROW_BUFFERS(T), const int do_img,           \
                                         const int do_geo, double r[4]) {                               \
        const double cx = par[2];                                                                       \
        double rx = 0, ry = 0, rxu = 0, ryu = 0;                                                        \
        row_coords_##SS(W, H, par, i, rx0, ry0, rwx, rwy);                                              \
        for (int64_t j = 0; j < W; j++) {                                                               \
            T gx, gy;                                                                                   \
            backward_px_##SS(img, gout + i * W + j, gimg, deriv ? deriv + i * W + j : NULL, C, H, W,   \
                             rx0[j], ry0[j], rwx[j], rwy[j],                                           \
                             do_img, do_geo, &gx, &gy);                                                 \
            const double u = (double)j - cx;                                                            \
            rx += gx;                                                                                   \
            ry += gy;                                                                                   \
            rxu += (double)gx * u;                                                                      \
            ryu += (double)gy * u;                                                                      \
        }                                                                                               \
        r[0] = rx;                                                                                      \
        r[1] = ry;                                                                                      \
        r[2] = rxu;                                                                                     \
        r[3] = ryu;                                                                                     \
    }

DEFINE_SCALAR_BACKWARD(float, f32)
DEFINE_SCALAR_BACKWARD(double, f64)
#endif

/* One share of the backward: the image gradient of a sample zeroed, then its rows, each with the
 * row call that the flags and channel count specialise. */
#define DEFINE_BACKWARD_WORKER(T, SUFFIX)                                                              \
    static void *backward_worker_##SUFFIX(void *arg) {                                                  \
        WORKER_SETUP(T)                                                                                 \
        const int want_geo = jb->rows != NULL;                                                          \
        double scrap[4];                                                                                \
        while (next_b(jb, &b)) {                                                                        \
            const T *img = (const T *)jb->img + b * jb->img_bstride;                                    \
            const T *gout = (const T *)jb->gout + b * C * HW;                                           \
            T *gimg = jb->gimg ? (T *)jb->gimg + b * C * HW : NULL;                                     \
            const T *dv = jb->deriv && want_geo ? (const T *)jb->deriv + b * 2 * C * HW : NULL;         \
            const double *par = jb->par + 6 * b;                                                        \
            if (gimg)                                                                                   \
                memset(gimg, 0, (size_t)(C * HW) * sizeof(T));                                          \
            if (!dv) /* the sums read the forward's derivatives, the scatter no image */                \
                prefetch_image(img, (size_t)(C * HW) * sizeof(T));                                         \
            for (int64_t i = r0; i < r1; i++) {                                                         \
                double *r = want_geo ? jb->rows + 4 * (b * H + i) : scrap;                              \
                /* Constant flags and channel count let the compiler specialise the common calls. */   \
                if (C == 1 && gimg && want_geo)                                                         \
                    backward_row_##SUFFIX(img, gout, gimg, dv, 1, H, W, i, par, rx0, ry0, rwx, rwy, 1, 1, r); \
                else if (C == 1 && want_geo)                                                            \
                    backward_row_##SUFFIX(img, gout, NULL, dv, 1, H, W, i, par, rx0, ry0, rwx, rwy, 0, 1, r); \
                else if (gimg && want_geo) {                                                            \
                    /* Several channels: the sums, then the scatter, each over the row (the fused       \
                     * pass thrashes L1 with the corners of every channel of image and gradient). */    \
                    backward_row_##SUFFIX(img, gout, NULL, dv, C, H, W, i, par, rx0, ry0, rwx, rwy, 0, 1, r); \
                    backward_row_##SUFFIX(img, gout, gimg, dv, C, H, W, i, par, rx0, ry0, rwx, rwy, 1, 0, scrap); \
                } else if (want_geo)                                                                    \
                    backward_row_##SUFFIX(img, gout, NULL, dv, C, H, W, i, par, rx0, ry0, rwx, rwy, 0, 1, r); \
                else                                                                                    \
                    backward_row_##SUFFIX(img, gout, gimg, dv, C, H, W, i, par, rx0, ry0, rwx, rwy, 1, 0, r); \
            }                                                                                           \
        }                                                                                               \
        return NULL;                                                                                    \
    }

DEFINE_BACKWARD_WORKER(float, f32)
DEFINE_BACKWARD_WORKER(double, f64)

/* dθ, Σ dL/dx, Σ dL/dy of each sample (geo, B × 3) from its rows' sums (rows, B × H × 4: Σ gx, Σ gy,
 * Σ gx·u, Σ gy·u), the rows in order, so the result does not depend on which thread did a row. */
static void reduce_rows(const double *rows, const double *par, int64_t B, int64_t H, double *geo) {
    for (int64_t b = 0; b < B; b++) {
        /* Σ gx, Σ gy, Σ gx·u, Σ gx·v, Σ gy·u, Σ gy·v over the sample. */
        double a[6] = {0, 0, 0, 0, 0, 0};
        const double cy = par[6 * b + 3];
        for (int64_t i = 0; i < H; i++) {
            const double *r = rows + 4 * (b * H + i), v = (double)i - cy;
            a[0] += r[0];
            a[1] += r[1];
            a[2] += r[2];
            a[3] += r[0] * v;
            a[4] += r[3];
            a[5] += r[1] * v;
        }
        const double c = par[6 * b], s = par[6 * b + 1];
        /* ∂x/∂θ = -s·u - c·v, ∂y/∂θ = c·u - s·v. */
        geo[3 * b] = -s * a[2] - c * a[3] + c * a[4] - s * a[5];
        geo[3 * b + 1] = a[0];
        geo[3 * b + 2] = a[1];
    }
}

/* ================================================================================================
 * 4. Threading: which share computes which samples or rows, on torch's OpenMP pool or pthreads,
 * and how many shares a call gets.
 * ================================================================================================ */

static void row_range(const job_t *j, int64_t *r0, int64_t *r1) {
    if (j->by_rows) {
        *r0 = j->H * j->tid / j->nthreads;
        *r1 = j->H * (j->tid + 1) / j->nthreads;
    } else {
        *r0 = 0;
        *r1 = j->H;
    }
}

/* The next sample for this share, or 0 when none is left. Split over rows, every share walks all
 * samples. Split over samples, each share takes the next one not yet taken (an atomic counter):
 * a share whose thread loses its core to another process for a while (a shared machine) leaves
 * its samples to the others instead of holding up the call. Which thread computes a sample does
 * not change its result, so results stay independent of the thread count and of the timing. */
static int next_b(const job_t *jb, int64_t *b) {
    if (jb->by_rows)
        *b += 1;
    else
#if defined(__GNUC__)
        *b = __atomic_fetch_add(jb->next_sample, 1, __ATOMIC_RELAXED);
#else /* no atomics: fixed shares (t, t + n, t + 2n, ...) */
        *b = *b < 0 ? jb->tid : *b + jb->nthreads;
#endif
    return *b < jb->B;
}

/* Run worker on n shares. Built with -fopenmp, the shares go to an OpenMP team: loaded into a
 * process where torch has loaded libgomp.so.1, the dynamic linker hands this library the same
 * runtime, so the team is torch's own intra-op pool (threads already made, often still
 * spinning after the previous torch op) instead of threads made per call that compete with
 * it for the cores. Without OpenMP, pthreads (the caller's thread is one of them). Either way
 * share t is job t, whatever the team size, so results do not depend on it. */
#if defined(_OPENMP)
#include <omp.h>
static void run(void *(*worker)(void *), job_t *base, int n, int by_rows) {
    job_t jobs[MAX_THREADS];
    for (int t = 0; t < n; t++) {
        jobs[t] = *base;
        jobs[t].nthreads = n;
        jobs[t].tid = t;
        jobs[t].by_rows = by_rows;
    }
    if (n == 1) {
        worker(&jobs[0]);
        return;
    }
#pragma omp parallel num_threads(n)
    {
        const int team = omp_get_num_threads();
        for (int t = omp_get_thread_num(); t < n; t += team)
            worker(&jobs[t]);
    }
}
#else
static void run(void *(*worker)(void *), job_t *base, int n, int by_rows) {
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
    for (int t = 1; t < n; t++) {
        if (started[t])
            pthread_join(threads[t], NULL);
        else /* a thread failed to start: do its share here */
            worker(&jobs[t]);
    }
}
#endif

/* Whether this build runs its shares on OpenMP (torch's pool when torch loaded libgomp first). */
int rotstn_openmp(void) {
#if defined(_OPENMP)
    return 1;
#else
    return 0;
#endif
}

/* Below this many output pixels one thread is faster than starting more (an OpenMP team from a
 * warm pool costs microseconds, a pthread per call tens of them). */
#if defined(_OPENMP)
#define MIN_PIXELS_PER_THREAD 1024
#else
#define MIN_PIXELS_PER_THREAD 4096
#endif

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

/* ================================================================================================
 * 5. Entry points (ctypes, rotstn/_kernels/cpu.py).
 * ================================================================================================ */

#define DEFINE_ENTRY(T, SUFFIX)                                                                         \
    int rotstn_forward_##SUFFIX(const T *img, int64_t img_bstride, T *out, T *deriv, const double *par, \
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
        int64_t next_sample = 0; /* next_b's counter */                                                 \
        job_t job = {img, img_bstride, out, NULL, NULL, NULL, par, B, C, H, W,                          \
                     scratch, bytes, 1, 0, 0, &next_sample, (void *)deriv};                             \
        run(forward_worker_##SUFFIX, &job, n, by_rows);                                                 \
        free(scratch);                                                                                  \
        return 0;                                                                                       \
    }                                                                                                   \
                                                                                                        \
    /* geo (B × 3: dθ, Σ dL/dx, Σ dL/dy) or NULL; gimg (B, C, H, W) or NULL. 0, or -1 out of memory.    \
     * Σ dL/dx, Σ dL/dy is the gradient of the source point; the caller derives the centre's. */       \
    int rotstn_backward_##SUFFIX(const T *img, int64_t img_bstride, const T *gout, T *gimg,             \
                                 const T *deriv,                                                        \
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
        double *rows = NULL;                                                                            \
        if (geo) {                                                                                      \
            rows = (double *)malloc((size_t)(B * H * 4) * sizeof(double));                              \
            if (!rows)                                                                                  \
                return -1;                                                                              \
        }                                                                                               \
        size_t bytes = scratch_bytes(W, sizeof(T));                                                     \
        char *scratch = (char *)malloc(bytes * (size_t)n);                                              \
        if (!scratch) {                                                                                 \
            free(rows);                                                                                 \
            return -1;                                                                                  \
        }                                                                                               \
        int64_t next_sample = 0; /* next_b's counter */                                                 \
        job_t job = {img, img_bstride, NULL, gout, gimg, rows, par, B, C, H, W,                         \
                     scratch, bytes, 1, 0, 0, &next_sample, (void *)deriv};                             \
        run(backward_worker_##SUFFIX, &job, n, by_rows);                                                \
        free(scratch);                                                                                  \
        if (geo) {                                                                                      \
            reduce_rows(rows, par, B, H, geo);                                                          \
            free(rows);                                                                                 \
        }                                                                                               \
        return 0;                                                                                       \
    }

DEFINE_ENTRY(float, f32)
DEFINE_ENTRY(double, f64)
