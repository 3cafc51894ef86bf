/* ossie CPU kernels: fused MXFP4 and bf16 matrix products for decode and small batches.
 *
 * y[t, o] = sum_i x[t, i] * W[o, i] (+ bias[o]) with x float32 [T, in], y float32 [T, out].
 * MXFP4 W: blocks uint8 [out, in/32, 16] (low nibble = even element), scales uint8 [out, in/32] (E8M0).
 * bf16 W: uint16 [out, in].
 * The packed weights are read once and never materialised. Paths, chosen at run time:
 *   avx512bf16: weights decoded to bf16 (exact: fp4 values are bf16 numbers), x rounded to bf16 (exact when
 *               the model runs in bf16, as its activations are bf16), vdpbf16ps products, fp32 sums;
 *   avx2:       fp32 FMA; scalar: portable C. Rows are split over a small pthread pool.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define OSSIE_X86 1
#endif

static float SCALE[256];        /* E8M0 byte -> 2^(s-127) */
static const float FP4[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* ---- thread pool: the caller runs chunk 0, workers the rest ------------------------------------------ */
typedef void (*task_fn)(const void *ctx, int64_t begin, int64_t end);
#define MAX_THREADS 256
static struct {
    pthread_mutex_t mu; pthread_cond_t work, done;
    int nthreads, started, pending; int64_t generation;
    task_fn fn; const void *ctx; int64_t n, grain; int parts;  /* the current job, split in `parts` */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, 1, 1, 0, 0, 0, 0, 0, 1, 1};

static void chunk(int i, int parts, int64_t n, int64_t grain, int64_t *b, int64_t *e) {
    int64_t units = (n + grain - 1) / grain;
    *b = units * i / parts * grain; *e = units * (i + 1) / parts * grain;
    if (*e > n) *e = n;
    if (*b > n) *b = n;
}

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg; int64_t seen = 0;
    for (;;) {
        pthread_mutex_lock(&pool.mu);
        while (pool.generation == seen) pthread_cond_wait(&pool.work, &pool.mu);
        seen = pool.generation;
        task_fn fn = pool.fn; const void *ctx = pool.ctx; int64_t n = pool.n, grain = pool.grain; int parts = pool.parts;
        pthread_mutex_unlock(&pool.mu);
        if (id >= parts) continue;  /* the pool was shrunk: this worker sits out (and is not counted) */
        int64_t b, e; chunk(id, parts, n, grain, &b, &e);
        if (b < e) fn(ctx, b, e);
        pthread_mutex_lock(&pool.mu);
        if (--pool.pending == 0) pthread_cond_signal(&pool.done);
        pthread_mutex_unlock(&pool.mu);
    }
    return NULL;
}

static void parallel_for(task_fn fn, const void *ctx, int64_t n, int64_t grain) {
    pthread_mutex_lock(&pool.mu);
    int parts = pool.nthreads;
    if (parts <= 1 || n <= grain) { pthread_mutex_unlock(&pool.mu); fn(ctx, 0, n); return; }
    while (pool.started < parts) {  /* start workers lazily */
        pthread_t t; pthread_create(&t, NULL, worker, (void *)(intptr_t)pool.started); pthread_detach(t);
        pool.started++;
    }
    pool.fn = fn; pool.ctx = ctx; pool.n = n; pool.grain = grain; pool.parts = parts; pool.pending = parts - 1; pool.generation++;
    pthread_cond_broadcast(&pool.work);
    pthread_mutex_unlock(&pool.mu);
    int64_t b, e; chunk(0, parts, n, grain, &b, &e);
    if (b < e) fn(ctx, b, e);
    pthread_mutex_lock(&pool.mu);
    while (pool.pending > 0) pthread_cond_wait(&pool.done, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
}

/* ---- the product ------------------------------------------------------------------------------------- */
typedef struct {
    const float *x; const uint16_t *xb;   /* x as float32 [T, in]; as bf16 [T, in] for the bf16 path */
    const uint8_t *blocks, *scales;        /* MXFP4 weight */
    const uint16_t *w16;                   /* bf16 weight */
    const float *bias; float *y;
    int64_t T, out, in;
} job_t;

#define TT 8  /* tokens per tile: their accumulators stay in registers */

static void mxfp4_scalar(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p; int64_t G = j->in / 32;
    for (int64_t o = r0; o < r1; o++)
        for (int64_t t = 0; t < j->T; t++) {
            const float *x = j->x + t * j->in; float acc = 0.f;
            for (int64_t g = 0; g < G; g++) {
                const uint8_t *b = j->blocks + (o * G + g) * 16; float part = 0.f;
                for (int k = 0; k < 16; k++)
                    part += FP4[b[k] & 15] * x[g * 32 + 2 * k] + FP4[b[k] >> 4] * x[g * 32 + 2 * k + 1];
                acc += part * SCALE[j->scales[o * G + g]];
            }
            j->y[t * j->out + o] = acc + (j->bias ? j->bias[o] : 0.f);
        }
}

static void bf16_scalar(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p;
    for (int64_t o = r0; o < r1; o++)
        for (int64_t t = 0; t < j->T; t++) {
            const float *x = j->x + t * j->in; const uint16_t *w = j->w16 + o * j->in; float acc = 0.f;
            for (int64_t i = 0; i < j->in; i++) acc += bf16_to_f32(w[i]) * x[i];
            j->y[t * j->out + o] = acc + (j->bias ? j->bias[o] : 0.f);
        }
}

#ifdef OSSIE_X86
__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s)); s = _mm_add_ss(s, _mm_movehdup_ps(s)); return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) static void mxfp4_avx2(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p; int64_t G = j->in / 32;
    /* fp4 values doubled, as int8 (halved again through the scale) */
    const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m128i low4 = _mm_set1_epi8(0x0f);
    for (int64_t o = r0; o < r1; o++)
        for (int64_t t0 = 0; t0 < j->T; t0 += TT) {
            int nt = (int)(j->T - t0 < TT ? j->T - t0 : TT);
            __m256 acc[TT];
            for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
            for (int64_t g = 0; g < G; g++) {
                __m128i b = _mm_loadu_si128((const __m128i *)(j->blocks + (o * G + g) * 16));
                __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(b, low4));
                __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(b, 4), low4));
                __m128i v0 = _mm_unpacklo_epi8(lo, hi), v1 = _mm_unpackhi_epi8(lo, hi);
                __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v0));
                __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v0, 8)));
                __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v1));
                __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v1, 8)));
                __m256 s = _mm256_set1_ps(SCALE[j->scales[o * G + g]] * 0.5f);
                for (int t = 0; t < nt; t++) {
                    const float *x = j->x + (t0 + t) * j->in + g * 32;
                    __m256 part = _mm256_mul_ps(w0, _mm256_loadu_ps(x));
                    part = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 8), part);
                    part = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + 16), part);
                    part = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + 24), part);
                    acc[t] = _mm256_fmadd_ps(part, s, acc[t]);
                }
            }
            for (int t = 0; t < nt; t++) j->y[(t0 + t) * j->out + o] = hsum256(acc[t]) + (j->bias ? j->bias[o] : 0.f);
        }
}

__attribute__((target("avx2,fma"))) static void bf16_avx2(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p;
    for (int64_t o = r0; o < r1; o++)
        for (int64_t t0 = 0; t0 < j->T; t0 += TT) {
            int nt = (int)(j->T - t0 < TT ? j->T - t0 : TT);
            __m256 acc[TT];
            for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
            const uint16_t *w = j->w16 + o * j->in;
            for (int64_t i = 0; i < j->in; i += 8) {
                __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + i))), 16));
                for (int t = 0; t < nt; t++)
                    acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(j->x + (t0 + t) * j->in + i), acc[t]);
            }
            for (int t = 0; t < nt; t++) j->y[(t0 + t) * j->out + o] = hsum256(acc[t]) + (j->bias ? j->bias[o] : 0.f);
        }
}

#define AVX512BF16 "avx512f,avx512bw,avx512vl,avx512bf16"
/* MXFP4 on AVX-512-BF16, four groups (64 bytes) at a time. Nibbles are split bytewise and mapped to the
 * high and low bytes of their bf16 values with two vpshufb tables; unpacking those bytes into words keeps each
 * 128-bit lane within one group, so one scale per lane. The words come out in a fixed order (low nibbles of
 * bytes 0-7, 8-15, then high nibbles of bytes 0-7, 8-15, per lane), and x is permuted once per call to match:
 * a dot product does not care about order. */
#define BF16_HI 0x00, 0x3f, 0x3f, 0x3f, 0x40, 0x40, 0x40, 0x40, 0x80, 0xbf, 0xbf, 0xbf, 0xc0, 0xc0, 0xc0, 0xc0
#define BF16_LO 0x00, 0x00, 0x80, 0xc0, 0x00, 0x40, 0x80, 0xc0, 0x00, 0x00, 0x80, 0xc0, 0x00, 0x40, 0x80, 0xc0

/* element of a 4-group block held by word w (0..127) of the decoded vectors A, B, C, D */
static inline int64_t permuted_index(int64_t w) {
    int v = (int)(w / 32), lane = (int)(w % 32) / 8, k = (int)(w % 8);
    int byte = k + (v == 1 || v == 3 ? 8 : 0), odd = v >= 2;
    return lane * 32 + 2 * byte + odd;
}

__attribute__((target(AVX512BF16))) static inline void decode4(const uint8_t *blk, __m512i *a, __m512i *b,
                                                                 __m512i *c, __m512i *d) {
    const __m512i hi_lut = _mm512_broadcast_i32x4(_mm_setr_epi8(BF16_HI)), lo_lut = _mm512_broadcast_i32x4(_mm_setr_epi8(BF16_LO));
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    __m512i bytes = _mm512_loadu_si512(blk);
    __m512i lo = _mm512_and_si512(bytes, low4), hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
    __m512i lo_h = _mm512_shuffle_epi8(hi_lut, lo), lo_l = _mm512_shuffle_epi8(lo_lut, lo);
    __m512i hi_h = _mm512_shuffle_epi8(hi_lut, hi), hi_l = _mm512_shuffle_epi8(lo_lut, hi);
    *a = _mm512_unpacklo_epi8(lo_l, lo_h); *b = _mm512_unpackhi_epi8(lo_l, lo_h);
    *c = _mm512_unpacklo_epi8(hi_l, hi_h); *d = _mm512_unpackhi_epi8(hi_l, hi_h);
}

/* 2^(s-127) for the 4 scale bytes at sc, each broadcast over its group's 128-bit lane: the byte shifted into a
 * float's exponent field (s = 0, 2^-127, becomes 0: a float32 subnormal, far below any sum's resolution) */
__attribute__((target(AVX512BF16))) static inline __m512 scales4(const uint8_t *sc) {
    int32_t four; memcpy(&four, sc, 4);
    __m128i bytes = _mm_shuffle_epi8(_mm_cvtsi32_si128(four), _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu8_epi32(bytes), 23));
}

/* one group in natural order (the tail when the group count is not a multiple of 4) */
__attribute__((target(AVX512BF16))) static inline __m512 dot1(const uint8_t *blk, const uint16_t *x) {
    const __m512i lut = _mm512_setr_epi32(0x3f000000, 0x3fc03f80, 0x40404000, 0x40c04080,
                                          0xbf008000, 0xbfc0bf80, 0xc040c000, 0xc0c0c080, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)blk));
    __m512i idx = _mm512_or_si512(_mm512_and_si512(d, _mm512_set1_epi32(0x0f)),
                                  _mm512_slli_epi32(_mm512_and_si512(d, _mm512_set1_epi32(0xf0)), 12));
    return _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_permutexvar_epi16(idx, lut),
                            (__m512bh)_mm512_loadu_si512(x));
}

/* xb: x in bf16, each token's 4-group blocks permuted (see permuted_index), tail groups in natural order */
__attribute__((target(AVX512BF16))) static void mxfp4_avx512bf16(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p; int64_t G = j->in / 32, G4 = G / 4 * 4;
    for (int64_t o = r0; o < r1; o++) {
        const uint8_t *blk = j->blocks + o * G * 16, *sc = j->scales + o * G;
        for (int64_t t0 = 0; t0 < j->T; t0 += TT) {
            int nt = (int)(j->T - t0 < TT ? j->T - t0 : TT);
            __m512 acc[TT];
            for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_ps();
            for (int64_t g = 0; g < G4; g += 4) {
                __m512i a, b, c, d;
                decode4(blk + g * 16, &a, &b, &c, &d);
                __m512 s = scales4(sc + g);
                for (int t = 0; t < nt; t++) {
                    const uint16_t *x = j->xb + (t0 + t) * j->in + g * 32;
                    __m512 part = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)a, (__m512bh)_mm512_loadu_si512(x));
                    part = _mm512_dpbf16_ps(part, (__m512bh)b, (__m512bh)_mm512_loadu_si512(x + 32));
                    part = _mm512_dpbf16_ps(part, (__m512bh)c, (__m512bh)_mm512_loadu_si512(x + 64));
                    part = _mm512_dpbf16_ps(part, (__m512bh)d, (__m512bh)_mm512_loadu_si512(x + 96));
                    acc[t] = _mm512_fmadd_ps(part, s, acc[t]);
                }
            }
            for (int64_t g = G4; g < G; g++)
                for (int t = 0; t < nt; t++)
                    acc[t] = _mm512_fmadd_ps(dot1(blk + g * 16, j->xb + (t0 + t) * j->in + g * 32),
                                             _mm512_set1_ps(SCALE[sc[g]]), acc[t]);
            for (int t = 0; t < nt; t++)
                j->y[(t0 + t) * j->out + o] = _mm512_reduce_add_ps(acc[t]) + (j->bias ? j->bias[o] : 0.f);
        }
    }
}

__attribute__((target(AVX512BF16))) static void bf16_avx512bf16(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p;
    for (int64_t o = r0; o < r1; o++)
        for (int64_t t0 = 0; t0 < j->T; t0 += TT) {
            int nt = (int)(j->T - t0 < TT ? j->T - t0 : TT);
            __m512 acc[TT];
            for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_ps();
            const uint16_t *w = j->w16 + o * j->in;
            for (int64_t i = 0; i < j->in; i += 32) {
                __m512bh wv = (__m512bh)_mm512_loadu_si512(w + i);
                for (int t = 0; t < nt; t++)
                    acc[t] = _mm512_dpbf16_ps(acc[t], wv, (__m512bh)_mm512_loadu_si512(j->xb + (t0 + t) * j->in + i));
            }
            for (int t = 0; t < nt; t++)
                j->y[(t0 + t) * j->out + o] = _mm512_reduce_add_ps(acc[t]) + (j->bias ? j->bias[o] : 0.f);
        }
}

/* One token (decode): four accumulators break the dot-product latency chain. */
__attribute__((target(AVX512BF16))) static void bf16_avx512bf16_t1(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p;
    for (int64_t o = r0; o < r1; o++) {
        const uint16_t *w = j->w16 + o * j->in;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        int64_t i = 0;
        for (; i + 128 <= j->in; i += 128)
            for (int u = 0; u < 4; u++)
                acc[u] = _mm512_dpbf16_ps(acc[u], (__m512bh)_mm512_loadu_si512(w + i + 32 * u),
                                          (__m512bh)_mm512_loadu_si512(j->xb + i + 32 * u));
        for (; i < j->in; i += 32)
            acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(j->xb + i));
        __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        j->y[o] = _mm512_reduce_add_ps(sum) + (j->bias ? j->bias[o] : 0.f);
    }
}
#endif

/* ---- dispatch ---------------------------------------------------------------------------------------- */
enum { PATH_SCALAR = 0, PATH_AVX2 = 1, PATH_AVX512BF16 = 2 };
static int best_path = PATH_SCALAR, forced_path = -1;

static void detect(void) {
    for (int s = 0; s < 256; s++) SCALE[s] = ldexpf(1.0f, s - 127);
#ifdef OSSIE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best_path = PATH_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512bf16")) best_path = PATH_AVX512BF16;
#endif
}

static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;
static const char *PATH_NAMES[] = {"scalar", "avx2", "avx512bf16"};

/* matmul(kind, x, w_a, w_b, bias, y, T, out, in, bf16_ok): kind 0 = MXFP4 (w_a blocks, w_b scales), 1 = bf16 (w_a).
 * bf16_ok: x holds bf16 values (rounding it to bf16 is exact), so the bf16 dot-product path may be used. */
static PyObject *py_matmul(PyObject *self __attribute__((unused)), PyObject *args) {
    int kind, bf16_ok; unsigned long long x, wa, wb, bias, y; long long T, out, in;
    if (!PyArg_ParseTuple(args, "iKKKKKLLLp", &kind, &x, &wa, &wb, &bias, &y, &T, &out, &in, &bf16_ok)) return NULL;
    if (in % 32 || T < 1 || out < 1) { PyErr_SetString(PyExc_ValueError, "in must be a multiple of 32; T, out >= 1"); return NULL; }
    int path = forced_path >= 0 && forced_path < best_path ? forced_path : best_path;
    if (path == PATH_AVX512BF16 && !bf16_ok) path = PATH_AVX2;
    job_t j = {(const float *)x, NULL, (const uint8_t *)wa, (const uint8_t *)wb, (const uint16_t *)wa,
               (const float *)bias, (float *)y, T, out, in};
    uint16_t *xb = NULL;
    Py_BEGIN_ALLOW_THREADS
    task_fn fn = kind == 0 ? mxfp4_scalar : bf16_scalar;
#ifdef OSSIE_X86
    if (path == PATH_AVX512BF16) {
        xb = malloc(sizeof(uint16_t) * T * in);
        int64_t G4 = in / 32 / 4 * 4;
        for (int64_t t = 0; t < T; t++)
            for (int64_t i = 0; i < in; i++) {
                int64_t src = i;
                if (kind == 0 && i < G4 * 32) src = i / 128 * 128 + permuted_index(i % 128);
                xb[t * in + i] = f32_to_bf16(j.x[t * in + src]);
            }
        j.xb = xb;
        if (kind == 0) fn = mxfp4_avx512bf16;
        else fn = T == 1 ? bf16_avx512bf16_t1 : bf16_avx512bf16;
    } else if (path == PATH_AVX2) {
        fn = kind == 0 ? mxfp4_avx2 : bf16_avx2;
    }
#endif
    pthread_mutex_lock(&call_mu);  /* one product at a time owns the pool (callers on other Python threads wait) */
    parallel_for(fn, &j, out, 16);
    pthread_mutex_unlock(&call_mu);
    free(xb);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_set_threads(PyObject *self __attribute__((unused)), PyObject *args) {
    int n; if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    pthread_mutex_lock(&pool.mu);
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    pool.nthreads = n;  /* workers beyond n stay parked; missing ones start on the next parallel_for */
    pthread_mutex_unlock(&pool.mu);
    Py_RETURN_NONE;
}

static PyObject *py_get_threads(PyObject *self __attribute__((unused)), PyObject *args __attribute__((unused))) { return PyLong_FromLong(pool.nthreads); }

static PyObject *py_set_path(PyObject *self __attribute__((unused)), PyObject *args) {
    const char *name; if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    forced_path = -1;
    for (int i = 0; i < 3; i++) if (!strcmp(name, PATH_NAMES[i])) forced_path = i;
    if (strcmp(name, "best") && forced_path < 0) { PyErr_SetString(PyExc_ValueError, "path: best, scalar, avx2 or avx512bf16"); return NULL; }
    Py_RETURN_NONE;
}

static PyObject *py_path(PyObject *self __attribute__((unused)), PyObject *args __attribute__((unused))) {
    int path = forced_path >= 0 && forced_path < best_path ? forced_path : best_path;
    return PyUnicode_FromString(PATH_NAMES[path]);
}

static PyMethodDef methods[] = {
    {"matmul", py_matmul, METH_VARARGS, "y = x @ W.T + bias for an MXFP4 (kind 0) or bf16 (kind 1) weight"},
    {"set_threads", py_set_threads, METH_VARARGS, "number of threads for the kernels"},
    {"get_threads", py_get_threads, METH_NOARGS, "number of threads for the kernels"},
    {"set_path", py_set_path, METH_VARARGS, "force a code path (best, scalar, avx2, avx512bf16) for tests"},
    {"path", py_path, METH_NOARGS, "the code path in use"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "ossie's fused CPU kernels", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { detect(); return PyModule_Create(&module); }
