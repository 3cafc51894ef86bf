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
#include <sched.h>
#include <time.h>
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

static inline float rbf(float v) { return bf16_to_f32(f32_to_bf16(v)); }  /* round to bf16 */

/* ---- thread pool: the caller runs chunk 0, workers the rest ------------------------------------------
 * Decoding calls the pool a few hundred times per token, so waking workers through the kernel would cost more
 * than some of the products: a worker spins on the job counter for a while after each job (SPIN_NS) and only
 * then sleeps on the condition variable. The caller spins for the workers to finish: they are running. */
typedef void (*task_fn)(const void *ctx, int64_t begin, int64_t end);
#define MAX_THREADS 256
#ifndef SPIN_NS
#define SPIN_NS 300000
#endif
static struct {
    pthread_mutex_t mu; pthread_cond_t work;
    int nthreads, started; int pending; int64_t generation;  /* pending, generation: atomics */
    task_fn fn; const void *ctx; int64_t n, grain; int parts;  /* the current job, split in `parts` */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 1, 1, 0, 0, 0, 0, 0, 1, 1};

static void chunk(int i, int parts, int64_t n, int64_t grain, int64_t *b, int64_t *e) {
    int64_t units = (n + grain - 1) / grain;
    *b = units * i / parts * grain; *e = units * (i + 1) / parts * grain;
    if (*e > n) *e = n;
    if (*b > n) *b = n;
}

static inline void cpu_relax(void) {
#ifdef OSSIE_X86
    _mm_pause();
#endif
}

static int64_t now_ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; }

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg; int64_t seen = 0;
    for (;;) {
        int64_t start = now_ns();
        for (int spins = 0; __atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE) == seen; spins++) {
            cpu_relax();
            if ((spins & 255) == 255 && now_ns() - start > SPIN_NS) {  /* idle: sleep until the next job */
                pthread_mutex_lock(&pool.mu);
                while (__atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE) == seen) pthread_cond_wait(&pool.work, &pool.mu);
                pthread_mutex_unlock(&pool.mu);
            }
        }
        seen = __atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE);
        task_fn fn = pool.fn; const void *ctx = pool.ctx; int64_t n = pool.n, grain = pool.grain; int parts = pool.parts;
        if (id >= parts) continue;  /* the pool was shrunk: this worker sits out (and is not counted) */
        int64_t b, e; chunk(id, parts, n, grain, &b, &e);
        if (b < e) fn(ctx, b, e);
        __atomic_fetch_sub(&pool.pending, 1, __ATOMIC_RELEASE);
    }
    return NULL;
}

/* Callers hold call_mu: one job at a time. */
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;

static void parallel_for(task_fn fn, const void *ctx, int64_t n, int64_t grain) {
    int parts = pool.nthreads;
    if (parts <= 1 || n <= grain) { fn(ctx, 0, n); return; }
    while (pool.started < parts) {  /* start workers lazily */
        pthread_t t;
        if (pthread_create(&t, NULL, worker, (void *)(intptr_t)pool.started)) { parts = pool.started; break; }
        pthread_detach(t);
        pool.started++;
    }
    pool.fn = fn; pool.ctx = ctx; pool.n = n; pool.grain = grain; pool.parts = parts;
    __atomic_store_n(&pool.pending, parts - 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&pool.generation, 1, __ATOMIC_RELEASE);  /* publishes the job */
    pthread_mutex_lock(&pool.mu);  /* wake the workers that went to sleep (under the lock: no lost wake-up) */
    pthread_cond_broadcast(&pool.work);
    pthread_mutex_unlock(&pool.mu);
    int64_t b, e; chunk(0, parts, n, grain, &b, &e);
    if (b < e) fn(ctx, b, e);
    for (int spins = 0; __atomic_load_n(&pool.pending, __ATOMIC_ACQUIRE) > 0; spins++) {
        cpu_relax();
        if ((spins & 1023) == 1023) sched_yield();  /* a worker may have been descheduled */
    }
}

/* ---- the product ------------------------------------------------------------------------------------- */
typedef struct {
    const float *x; const uint16_t *xb;   /* x as float32 [T, in]; as bf16 [T, in] for the bf16 path */
    const uint8_t *blocks, *scales;        /* MXFP4 weight */
    const uint16_t *w16;                   /* bf16 weight */
    const float *bias; float *y;
    int64_t T, out, in;
    const int8_t *xq; const float *xs;     /* q8: x rounded to int8 per 32, with its scales (see Q8_INT8_KERNEL) */
} job_t;

/* Weights stream through once per token: fetch them 4 KiB ahead, into L2. 4 KiB decoded the 20b 2-4 % faster
 * than 2 KiB on Zen 5 (in-process alternation, benchmarks/decode_parts.py), 8 KiB no better. The hint was
 * non-temporal (NTA) at first, so that weights would not evict what the rest of the step keeps in the caches: on
 * Zen 5 NTA, T0 and T1 decoded alike, but on an Intel Xeon (AVX-512 BF16, family 6 model 167) NTA cost a third to a
 * half of the products' speed (one-token bf16 products 5.6 GB/s with NTA, 11.8 with T0; MXFP4 6.3 and 8.5), and T1
 * was as good as T0 or better (q8 12.4 GB/s against 9.8). */
#ifndef PF_DIST
#define PF_DIST 4096
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1
#endif
#define PREFETCH_W(p) _mm_prefetch((const char *)(p), PF_HINT)
/* A row's scales lie in their own array, read once at the row's start: fetched a few rows ahead, as the weights
 * are, or each row would begin with a wait on memory. */
#define PF_ROWS 4
static inline void prefetch_bytes(const void *p, int64_t n) {
    for (int64_t i = 0; i < n; i += 64) PREFETCH_W((const char *)p + i);
}
#define TT 4  /* tokens per tile: their accumulators stay in registers, their x rows in L1 */

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

/* float16 (IEEE binary16) bits as float32, subnormals included */
static inline float half_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023, u;
    if (e == 31) u = sign | 0x7f800000 | (m << 13);
    else if (e) u = sign | ((e + 112) << 23) | (m << 13);
    else { float f = ldexpf((float)m, -24); memcpy(&u, &f, 4); u |= sign; }
    float f; memcpy(&f, &u, 4); return f;
}

/* float32 -> float16 bits, rounding to nearest even as torch's .half() */
static uint16_t f32_to_f16(float f) {
    uint32_t x; memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffff;
    if (ax >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000 ? 0x200 : 0));  /* inf, nan */
    if (ax >= 0x477ff000) return (uint16_t)(sign | 0x7c00);  /* 65520 and up round to inf */
    if (ax < 0x38800000) {  /* below 2^-14: a subnormal, in units of 2^-24 (the product is exact) */
        float a; memcpy(&a, &ax, 4);
        return (uint16_t)(sign | (uint32_t)lrintf(a * 16777216.f));
    }
    uint32_t r = ax - 0x38000000;  /* the exponent rebiased from 127 to 15 */
    return (uint16_t)(sign | ((r + 0x0fff + ((r >> 13) & 1)) >> 13));
}

/* 32 values as q8: int8 values v and the float16 scale (returned), as ossie.model.q8.quantize_torch rounds them */
static uint16_t quant32(const float *x, int8_t *v) {
    float amax = 0.f;
    for (int k = 0; k < 32; k++) { float a = fabsf(x[k]); if (a > amax) amax = a; }
    uint16_t h = f32_to_f16(amax / 127.f);
    float d = half_to_f32(h);
    if (d == 0.f) d = 1.f;  /* an all-zero group (or one below float16's range): values 0 */
    for (int k = 0; k < 32; k++) {
        long r = lrintf(x[k] / d);
        v[k] = (int8_t)(r > 127 ? 127 : r < -127 ? -127 : r);
    }
    return h;
}

/* 32 activations rounded to int8 with the scale amax / 127, as llama.cpp rounds them for its q8_0 products: the
 * values into q; returns the scale */
static float round_act32(const float *x, int8_t *q) {
    float amax = 0.f;
    for (int k = 0; k < 32; k++) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
    float inv = amax > 0.f ? 127.f / amax : 0.f;  /* |x * inv| <= 127: no clamp needed */
    for (int k = 0; k < 32; k++) q[k] = (int8_t)lrintf(x[k] * inv);
    return amax / 127.f;
}

/* q8 (llama.cpp's q8_0): int8 values [out, in] (in `blocks`) and a float16 scale for each 32 of a row [out, in/32]
 * (in `scales`); a weight is value * scale. x is float32. */
static void q8_scalar(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p; int64_t G = j->in / 32;
    const int8_t *w = (const int8_t *)j->blocks; const uint16_t *sc = (const uint16_t *)j->scales;
    for (int64_t o = r0; o < r1; o++)
        for (int64_t t = 0; t < j->T; t++) {
            const float *x = j->x + t * j->in; float acc = 0.f;
            for (int64_t g = 0; g < G; g++) {
                const int8_t *b = w + o * j->in + g * 32; float part = 0.f;
                for (int k = 0; k < 32; k++) part += (float)b[k] * x[g * 32 + k];
                acc += part * half_to_f32(sc[o * G + g]);
            }
            j->y[t * j->out + o] = acc + (j->bias ? j->bias[o] : 0.f);
        }
}

#ifdef OSSIE_X86
/* ---- AVX2 (with FMA and F16C): the path of every x86 laptop and desktop without AVX-512 BF16 -----------------
 * MXFP4: two groups (32 bytes, 64 values) decoded at a time, by in-lane byte shuffles only (no lane-crossing
 * sign extension, which Intel runs on one port): the codes' low and high nibbles look up the high and low bytes of
 * their bf16 values (vpshufb), which interleave into bf16 words (vpunpck*bw), and a bf16 word becomes a float by a
 * shift or a mask. 19 instructions for 64 values where sign-extending int8 codes took 32. The 8 vectors this gives
 * hold the elements in the order of permuted_pos_avx2, in which x is laid out once per call; each 128-bit lane is
 * one group, so the two groups' scales multiply the pair's partial sum lane by lane. */
static const int8_t FP4_BF16_HI[16] = {0x00, 0x3f, 0x3f, 0x3f, 0x40, 0x40, 0x40, 0x40,
                                       (int8_t)0x80, (int8_t)0xbf, (int8_t)0xbf, (int8_t)0xbf,
                                       (int8_t)0xc0, (int8_t)0xc0, (int8_t)0xc0, (int8_t)0xc0};
static const int8_t FP4_BF16_LO[16] = {0x00, 0x00, (int8_t)0x80, (int8_t)0xc0, 0x00, 0x40, (int8_t)0x80, (int8_t)0xc0,
                                       0x00, 0x00, (int8_t)0x80, (int8_t)0xc0, 0x00, 0x40, (int8_t)0x80, (int8_t)0xc0};
#define AVX2 "avx2,fma,f16c"

__attribute__((target(AVX2))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s)); s = _mm_add_ss(s, _mm_movehdup_ps(s)); return _mm_cvtss_f32(s);
}

/* the 64 values of two groups at blk, as 8 vectors of floats in permuted_pos_avx2's order */
__attribute__((target(AVX2), always_inline)) static inline void decode2_avx2(const uint8_t *blk, __m256 w[8]) {
    const __m256i hi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)FP4_BF16_HI));
    const __m256i lo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)FP4_BF16_LO));
    const __m256i low4 = _mm256_set1_epi8(0x0f), top = _mm256_set1_epi32((int)0xffff0000);
    __m256i b = _mm256_loadu_si256((const __m256i *)blk);
    __m256i even = _mm256_and_si256(b, low4), odd = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
    __m256i e_lo = _mm256_shuffle_epi8(lo, even), e_hi = _mm256_shuffle_epi8(hi, even);
    __m256i o_lo = _mm256_shuffle_epi8(lo, odd), o_hi = _mm256_shuffle_epi8(hi, odd);
    __m256i words[4] = {_mm256_unpacklo_epi8(e_lo, e_hi), _mm256_unpackhi_epi8(e_lo, e_hi),
                        _mm256_unpacklo_epi8(o_lo, o_hi), _mm256_unpackhi_epi8(o_lo, o_hi)};
    for (int k = 0; k < 4; k++) {
        w[2 * k] = _mm256_castsi256_ps(_mm256_slli_epi32(words[k], 16));   /* the even words */
        w[2 * k + 1] = _mm256_castsi256_ps(_mm256_and_si256(words[k], top));  /* the odd words */
    }
}

/* one group in natural order (the last group of an odd count): codes as doubled int8 values, sign-extended */
__attribute__((target(AVX2), always_inline)) static inline void decode1_avx2(const uint8_t *blk, __m256 w[4]) {
    const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12), low4 = _mm_set1_epi8(0x0f);
    __m128i b = _mm_loadu_si128((const __m128i *)blk);
    __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(b, low4));
    __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(b, 4), low4));
    __m128i v0 = _mm_unpacklo_epi8(lo, hi), v1 = _mm_unpackhi_epi8(lo, hi);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v0));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v0, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v1));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v1, 8)));
}

/* One row o against NT tokens from t0 (NT a compile-time constant: the accumulators stay in registers). x is in
 * permuted_pos_avx2's order. A token's sum is one chain over the row's group pairs, whatever NT: a token gets the
 * same result alone and beside others. */
__attribute__((target(AVX2), always_inline)) static inline void mxfp4_tile_avx2(const job_t *j, int64_t o, int64_t t0,
                                                                               const int NT) {
    int64_t G = j->in / 32, g = 0;
    const uint8_t *blk = j->blocks + o * G * 16, *sc = j->scales + o * G;
    __m256 acc[TT], w[8];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (; g + 2 <= G; g += 2) {
        PREFETCH_W(blk + g * 16 + PF_DIST);
        decode2_avx2(blk + g * 16, w);
        __m256 s = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(SCALE[sc[g]])), _mm_set1_ps(SCALE[sc[g + 1]]), 1);
        for (int t = 0; t < NT; t++) {
            const float *x = j->x + (t0 + t) * j->in + g * 32;
            __m256 p0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(x)), p1 = _mm256_mul_ps(w[4], _mm256_loadu_ps(x + 32));
            for (int k = 1; k < 4; k++) {
                p0 = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(x + 8 * k), p0);
                p1 = _mm256_fmadd_ps(w[4 + k], _mm256_loadu_ps(x + 32 + 8 * k), p1);
            }
            acc[t] = _mm256_fmadd_ps(_mm256_add_ps(p0, p1), s, acc[t]);
        }
    }
    if (g < G) {
        decode1_avx2(blk + g * 16, w);
        __m256 s = _mm256_set1_ps(SCALE[sc[g]] * 0.5f);  /* the codes were doubled */
        for (int t = 0; t < NT; t++) {
            const float *x = j->x + (t0 + t) * j->in + g * 32;
            __m256 part = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
            for (int k = 1; k < 4; k++) part = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(x + 8 * k), part);
            acc[t] = _mm256_fmadd_ps(part, s, acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) j->y[(t0 + t) * j->out + o] = hsum256(acc[t]) + (j->bias ? j->bias[o] : 0.f);
}

/* x: float32 in permuted_pos_avx2's order */
__attribute__((target(AVX2))) static void mxfp4_avx2(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p;
    for (int64_t ob = r0; ob < r1; ob += 16)  /* blocks of rows (in L2) against tiles of tokens (their x in L1) */
        for (int64_t t0 = 0; t0 < j->T; t0 += TT)
            for (int64_t o = ob; o < r1 && o < ob + 16; o++) {
                if (t0 == 0) prefetch_bytes(j->scales + (o + PF_ROWS) * (j->in / 32), j->in / 32);
                switch (j->T - t0 < TT ? j->T - t0 : TT) {
                case 1: mxfp4_tile_avx2(j, o, t0, 1); break;
                case 2: mxfp4_tile_avx2(j, o, t0, 2); break;
                case 3: mxfp4_tile_avx2(j, o, t0, 3); break;
                default: mxfp4_tile_avx2(j, o, t0, 4); break;
                }
            }
}

/* bf16: R rows against NT tokens (compile-time constants), R x NT accumulators. Decoding is one token: with one row
 * at a time its sum was a single chain of FMAs, whose latency (not the memory) set the pace; four rows give four
 * chains. Each (row, token) sum is still one chain over the row in steps of 8, whatever R and NT. */
__attribute__((target(AVX2), always_inline)) static inline void bf16_tile_avx2(const job_t *j, int64_t o, int64_t t0,
                                                                              const int R, const int NT) {
    __m256 acc[4][2];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();
    const uint16_t *w = j->w16 + o * j->in;
    for (int64_t i = 0; i < j->in; i += 32) {
        for (int r = 0; r < R; r++) PREFETCH_W(w + r * j->in + i + PF_DIST / 2);
        for (int u = 0; u < 32; u += 8)
            for (int r = 0; r < R; r++) {
                __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + r * j->in + i + u))), 16));
                for (int t = 0; t < NT; t++)
                    acc[r][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(j->x + (t0 + t) * j->in + i + u), acc[r][t]);
            }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < NT; t++)
            j->y[(t0 + t) * j->out + o + r] = hsum256(acc[r][t]) + (j->bias ? j->bias[o + r] : 0.f);
}

__attribute__((target(AVX2))) static void bf16_avx2(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p;
    for (int64_t o = r0; o < r1; o += 4)
        for (int64_t t0 = 0; t0 < j->T; t0 += 2) {
            int nt = j->T - t0 < 2 ? 1 : 2;
            if (o + 4 <= r1) { if (nt == 1) bf16_tile_avx2(j, o, t0, 4, 1); else bf16_tile_avx2(j, o, t0, 4, 2); }
            else for (int64_t r = o; r < r1; r++) { if (nt == 1) bf16_tile_avx2(j, r, t0, 1, 1); else bf16_tile_avx2(j, r, t0, 1, 2); }
        }
}

/* ---- q8 on integer dot products: every x86 path alike -----------------------------------------------------
 * As llama.cpp computes its q8_0 products: x is rounded to int8 for each 32 values of a token (xq, scale xs; see
 * round_act32), so a group's 32 products are integer. |w| goes in as the unsigned operand and x takes w's sign
 * (vpsignb), so each 32-bit lane holds the exact sum of 4 products w * x: with vpmaddubsw + vpmaddwd on AVX2 (two
 * products in 16 bits stay below 2 * 127 * 127, no saturation), with vpdpbusd on AVX-VNNI and AVX-512 VNNI. The
 * lanes are the same integers on every path, and the float work after them is the same: the three paths give the
 * same numbers, bit for bit. Two groups a step, into two chains. */
#define Q8_INT8_KERNEL(NAME, TARGET, DOT)                                                                         \
    __attribute__((target(TARGET))) static void NAME(const void *p, int64_t r0, int64_t r1) {                     \
        const job_t *j = p; int64_t G = j->in / 32;                                                               \
        const int8_t *w = (const int8_t *)j->blocks; const uint16_t *sc = (const uint16_t *)j->scales;            \
        for (int64_t o = r0; o < r1; o++) {                                                                       \
            prefetch_bytes(sc + (o + PF_ROWS) * G, 2 * G);                                                        \
            const int8_t *row = w + o * j->in;                                                                    \
            for (int64_t t0 = 0; t0 < j->T; t0 += TT) {                                                           \
                int nt = (int)(j->T - t0 < TT ? j->T - t0 : TT);                                                  \
                __m256 acc[TT][2];                                                                                \
                for (int t = 0; t < nt; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();                         \
                for (int64_t g = 0; g < G; g += 2) {                                                              \
                    int two = g + 1 < G;                                                                          \
                    PREFETCH_W(row + g * 32 + PF_DIST);                                                           \
                    __m256i w0 = _mm256_loadu_si256((const __m256i *)(row + g * 32));                             \
                    __m256i w1 = two ? _mm256_loadu_si256((const __m256i *)(row + g * 32 + 32)) : _mm256_setzero_si256(); \
                    __m256i a0 = _mm256_sign_epi8(w0, w0), a1 = _mm256_sign_epi8(w1, w1);                         \
                    float s0 = _cvtsh_ss(sc[o * G + g]), s1 = two ? _cvtsh_ss(sc[o * G + g + 1]) : 0.f;            \
                    for (int t = 0; t < nt; t++) {                                                                \
                        int64_t tg = (t0 + t) * G + g;                                                            \
                        const __m256i *xq = (const __m256i *)(j->xq + tg * 32);                                   \
                        __m256i d0 = DOT(a0, _mm256_sign_epi8(_mm256_loadu_si256(xq), w0));                       \
                        acc[t][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_set1_ps(s0 * j->xs[tg]), acc[t][0]); \
                        if (two) {                                                                                \
                            __m256i d1 = DOT(a1, _mm256_sign_epi8(_mm256_loadu_si256(xq + 1), w1));               \
                            acc[t][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_set1_ps(s1 * j->xs[tg + 1]), \
                                                        acc[t][1]);                                               \
                        }                                                                                         \
                    }                                                                                             \
                }                                                                                                 \
                for (int t = 0; t < nt; t++)                                                                      \
                    j->y[(t0 + t) * j->out + o] = hsum256(_mm256_add_ps(acc[t][0], acc[t][1]))                    \
                                                  + (j->bias ? j->bias[o] : 0.f);                                 \
            }                                                                                                     \
        }                                                                                                         \
    }

#define DOT_AVX2(a, b) _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
#define DOT_AVXVNNI(a, b) _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b)
#define DOT_AVX512VNNI(a, b) _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
Q8_INT8_KERNEL(q8_avx2, AVX2, DOT_AVX2)
Q8_INT8_KERNEL(q8_avxvnni, AVX2 ",avxvnni", DOT_AVXVNNI)
Q8_INT8_KERNEL(q8_vnni, AVX2 ",avx512f,avx512vl,avx512vnni", DOT_AVX512VNNI)

#define AVX512BF16 "avx512f,avx512bw,avx512vl,avx512bf16"


/* MXFP4 on AVX-512-BF16, four groups (64 bytes) at a time. Each 16-bit word of the packed bytes holds four
 * codes (elements 4k..4k+3 of the 128). vpermw looks a word's low 5 bits up in a 32-entry table: the 16 fp4
 * values as bf16, twice, so the 5th bit (the next code's) does not matter. Shifting the words by 0, 4, 8 and 12
 * gives four vectors A, B, C, D whose word k holds element 4k, 4k+1, 4k+2, 4k+3; word k belongs to group k/8,
 * so each 128-bit lane is one group (one scale per lane). x is permuted once per call to match: a dot
 * product does not care about order. */
#define FP4_BF16 0x0000, 0x3f00, 0x3f80, 0x3fc0, 0x4000, 0x4040, 0x4080, 0x40c0, \
                 0x8000, 0xbf00, 0xbf80, 0xbfc0, 0xc000, 0xc040, 0xc080, 0xc0c0

static const uint16_t FP4_BF16_TABLE[32] = {FP4_BF16, FP4_BF16};

__attribute__((target(AVX512BF16))) static inline void decode4(const uint8_t *blk, __m512i *a, __m512i *b,
                                                                 __m512i *c, __m512i *d) {
    const __m512i lut = _mm512_loadu_si512(FP4_BF16_TABLE);
    __m512i w = _mm512_loadu_si512(blk);
    *a = _mm512_permutexvar_epi16(w, lut);
    *b = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), lut);
    *c = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 8), lut);
    *d = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 12), lut);
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

/* One row o against NT tokens from t0. NT is a compile-time constant at each call (see the switch below), so the
 * accumulators live in registers: indexing them with a run-time count would put them on the stack. */
/* Four groups (64 bytes of blocks) against NT tokens; s: the groups' scales, one per 128-bit lane. */
__attribute__((target(AVX512BF16), always_inline)) static inline void chunk4(const uint8_t *blk, __m512 s,
                                                                               const uint16_t *x, int64_t in,
                                                                               const int NT, __m512 *acc) {
    __m512i a, b, c, d;
    PREFETCH_W(blk + PF_DIST);
    decode4(blk, &a, &b, &c, &d);
    for (int t = 0; t < NT; t++) {
        const uint16_t *xt = x + t * in;
        __m512 p0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)a, (__m512bh)_mm512_loadu_si512(xt));
        __m512 p1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)b, (__m512bh)_mm512_loadu_si512(xt + 32));
        p0 = _mm512_dpbf16_ps(p0, (__m512bh)c, (__m512bh)_mm512_loadu_si512(xt + 64));
        p1 = _mm512_dpbf16_ps(p1, (__m512bh)d, (__m512bh)_mm512_loadu_si512(xt + 96));
        acc[t] = _mm512_fmadd_ps(_mm512_add_ps(p0, p1), s, acc[t]);
    }
}

/* One row o against NT tokens from t0. NT is a compile-time constant at each call (see the switch below), so the
 * accumulators live in registers: indexing them with a run-time count would put them on the stack. Scales are
 * read 16 at a time (one vector of 16 floats) and spread over the lanes of each 4-group chunk by a permute. */
__attribute__((target(AVX512BF16), always_inline)) static inline void mxfp4_tile(const job_t *j, int64_t o,
                                                                                   int64_t t0, const int NT) {
    int64_t G = j->in / 32, G4 = G / 4 * 4, G16 = G / 16 * 16, g = 0;
    const uint8_t *blk = j->blocks + o * G * 16, *sc = j->scales + o * G;
    const uint16_t *xt = j->xb + t0 * j->in;
    __m512 acc[TT];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    const __m512i spread0 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i four = _mm512_set1_epi32(4);
    for (; g < G16; g += 16) {
        __m512 s16 = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sc + g))), 23));
        __m512i idx = spread0;
        for (int k = 0; k < 4; k++, idx = _mm512_add_epi32(idx, four))
            chunk4(blk + (g + 4 * k) * 16, _mm512_permutexvar_ps(idx, s16), xt + (g + 4 * k) * 32, j->in, NT, acc);
    }
    for (; g < G4; g += 4) chunk4(blk + g * 16, scales4(sc + g), xt + g * 32, j->in, NT, acc);
    for (; g < G; g++)
        for (int t = 0; t < NT; t++)
            acc[t] = _mm512_fmadd_ps(dot1(blk + g * 16, xt + t * j->in + g * 32), _mm512_set1_ps(SCALE[sc[g]]), acc[t]);
    for (int t = 0; t < NT; t++)
        j->y[(t0 + t) * j->out + o] = _mm512_reduce_add_ps(acc[t]) + (j->bias ? j->bias[o] : 0.f);
}

/* xb: x in bf16, each token's 4-group blocks permuted (see permuted_pos), tail groups in natural order */
__attribute__((target(AVX512BF16))) static void mxfp4_avx512bf16(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p;
    /* blocks of rows (in L2) against tiles of tokens (their x in L1) */
    for (int64_t ob = r0; ob < r1; ob += 64)
        for (int64_t t0 = 0; t0 < j->T; t0 += TT)
            for (int64_t o = ob; o < r1 && o < ob + 64; o++) {
                if (t0 == 0) prefetch_bytes(j->scales + (o + PF_ROWS) * (j->in / 32), j->in / 32);
                switch (j->T - t0 < TT ? j->T - t0 : TT) {
                case 1: mxfp4_tile(j, o, t0, 1); break;
                case 2: mxfp4_tile(j, o, t0, 2); break;
                case 3: mxfp4_tile(j, o, t0, 3); break;
                default: mxfp4_tile(j, o, t0, 4); break;
                }
            }
}

/* r[i] = row i of a 16 x 16 matrix of 32-bit words; afterwards r[j] = its column j. Three rounds of unpacks within
 * 128-bit lanes, then 128-bit lanes exchanged: 64 shuffles. */
__attribute__((target(AVX512BF16))) static inline void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);      /* per lane: r_i[0] r_i+1[0] r_i[1] r_i+1[1] */
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);  /* r_i[2] r_i+1[2] r_i[3] r_i+1[3] */
    }
    for (int i = 0; i < 16; i += 4) {  /* u[i + k], lane L: rows i..i+3 of column 4L + k */
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int k = 0; k < 4; k++) {
        __m512i v = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x44), w = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xEE);
        __m512i v2 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x44), w2 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xEE);
        r[k] = _mm512_shuffle_i32x4(v, v2, 0x88);
        r[4 + k] = _mm512_shuffle_i32x4(v, v2, 0xDD);
        r[8 + k] = _mm512_shuffle_i32x4(w, w2, 0x88);
        r[12 + k] = _mm512_shuffle_i32x4(w, w2, 0xDD);
    }
}

/* Keys s0..s0+15 of the key rows from lo (S of them; past the last, it again: their lanes are masked out later),
 * 64 bytes of each from `base` (positions `stride` bytes apart), transposed: w16[p] holds 32-bit word p of each
 * key, so that a score is a lane of a vector sum (no horizontal adds), where gathering lane by lane cost several
 * times more. */
__attribute__((target(AVX512BF16), always_inline)) static inline void keys16(const uint8_t *base, int64_t stride,
                                                                           int64_t lo, int64_t s0, int64_t S,
                                                                           __m512i w16[16]) {
    for (int i = 0; i < 16; i++) {
        int64_t s = lo + s0 + (s0 + i < S ? i : S - 1 - s0);
        w16[i] = _mm512_loadu_si512((const void *)(base + s * stride));
    }
    transpose16(w16);
}

/* ---- MXFP4 for many tokens (a prompt's tokens per expert): decoded once, then a bf16 GEMM ---------------------
 * With many tokens the product is compute-bound, and the tile kernel above spends as much on decoding chunks (for
 * every tile of tokens) and on its loads (a whole vector of x per dot product) as on the dot products. Here a block
 * of GROWS rows is decoded once into bf16, each group's scale folded in (2^(s-127) added to the exponent: exact as
 * long as every value stays a normal number, which holds for scale bytes 2..252), and laid out as a panel: for each
 * pair of elements p, the 16 rows of a row group side by side (one vector: the layout vdpbf16ps multiplies a
 * broadcast pair of x by). Tiles of GROWS rows x GT tokens then keep GRG x GT accumulators in registers, each
 * vdpbf16ps adding two products for 16 rows, with one vector of weights per 16 rows and one broadcast of x per token: no
 * horizontal sums, and a third of the tile kernel's loads per product. Each (row, token) sum is one chain over the pairs of the
 * row, in the same order whatever the token count. */
#define GEMM_MIN_T 16   /* from this many tokens a call takes the panel GEMM */
#define GRG 4           /* row groups of 16 per panel (64 rows: 368 KB of bf16 at 2,880 columns, in L2) */
#define GT 6            /* tokens per tile: GRG x GT = 24 accumulators, GRG weight vectors, one broadcast of x */
#define GROWS (16 * GRG)

/* whether every scale byte of rows [r0, r1) keeps the folded values normal (see above) */
static int scales_fold(const job_t *j, int64_t r0, int64_t r1) {
    const uint8_t *sc = j->scales + r0 * (j->in / 32), *end = j->scales + r1 * (j->in / 32);
    for (; sc < end; sc++) if (*sc < 2 || *sc > 252) return 0;
    return 1;
}

/* row o as bf16 into w [in], each group's scale folded in, 4-group chunks in the order of decode4 (x's permuted
 * order), tail groups in natural order */
__attribute__((target(AVX512BF16))) static void decode_row(const job_t *j, int64_t o, uint16_t *w) {
    int64_t G = j->in / 32, G4 = G / 4 * 4;
    const __m512i lane_of_word = _mm512_set_epi16(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2,
                                                   1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i bias = _mm512_set1_epi16(127), magnitude = _mm512_set1_epi16(0x7fff);
    const uint8_t *blk = j->blocks + o * G * 16, *sc = j->scales + o * G;
    for (int64_t g = 0; g < G4; g += 4) {
        int32_t four; memcpy(&four, sc + g, 4);
        /* word k of a decoded vector belongs to group g + k / 8 (one per 128-bit lane) */
        __m512i e = _mm512_permutexvar_epi16(lane_of_word, _mm512_cvtepu8_epi16(_mm256_castsi128_si256(_mm_cvtsi32_si128(four))));
        e = _mm512_slli_epi16(_mm512_sub_epi16(e, bias), 7);
        __m512i v[4];
        decode4(blk + g * 16, &v[0], &v[1], &v[2], &v[3]);
        for (int k = 0; k < 4; k++) {
            __mmask32 nonzero = _mm512_test_epi16_mask(v[k], magnitude);
            _mm512_storeu_si512((void *)(w + g * 32 + 32 * k), _mm512_mask_add_epi16(v[k], nonzero, v[k], e));
        }
    }
    for (int64_t g = G4; g < G; g++) {
        const __m512i lut = _mm512_setr_epi32(0x3f000000, 0x3fc03f80, 0x40404000, 0x40c04080,
                                              0xbf008000, 0xbfc0bf80, 0xc040c000, 0xc0c0c080, 0, 0, 0, 0, 0, 0, 0, 0);
        __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + g * 16)));
        __m512i idx = _mm512_or_si512(_mm512_and_si512(d, _mm512_set1_epi32(0x0f)),
                                      _mm512_slli_epi32(_mm512_and_si512(d, _mm512_set1_epi32(0xf0)), 12));
        __m512i v = _mm512_permutexvar_epi16(idx, lut), e = _mm512_set1_epi16((int16_t)((sc[g] - 127) << 7));
        __mmask32 nonzero = _mm512_test_epi16_mask(v, magnitude);
        _mm512_storeu_si512((void *)(w + g * 32), _mm512_mask_add_epi16(v, nonzero, v, e));
    }
}

/* rows [r0, r0 + GROWS) (those below r1; the rest zero) into the panel: pair p of row group rg at
 * panel + (GRG p + rg) * 32 words. rows: room for 16 decoded rows. */
__attribute__((target(AVX512BF16))) static void decode_panel(const job_t *j, int64_t r0, int64_t r1, uint16_t *rows,
                                                              uint16_t *panel) {
    int64_t in = j->in;
    for (int rg = 0; rg < GRG; rg++) {
        for (int r = 0; r < 16; r++) {
            if (r0 + 16 * rg + r < r1) decode_row(j, r0 + 16 * rg + r, rows + r * in);
            else memset(rows + r * in, 0, sizeof(uint16_t) * in);
        }
        for (int64_t i = 0; i < in; i += 32) {  /* 16 rows x 16 pairs, transposed: vector p = pair p of each row */
            __m512i v[16];
            for (int r = 0; r < 16; r++) v[r] = _mm512_loadu_si512((const void *)(rows + r * in + i));
            transpose16(v);
            for (int p = 0; p < 16; p++) _mm512_store_si512((void *)(panel + (GRG * (i / 2 + p) + rg) * 32), v[p]);
        }
    }
}

/* the panel's GROWS rows from o (those below r1) against tokens t0..t0+NT-1, NT a compile-time constant */
__attribute__((target(AVX512BF16), always_inline)) static inline void panel_tile(const job_t *j, const uint16_t *panel,
                                                                                   int64_t o, int64_t r1, int64_t t0,
                                                                                   const int NT) {
    __m512 acc[GRG][GT];
    for (int rg = 0; rg < GRG; rg++) for (int t = 0; t < NT; t++) acc[rg][t] = _mm512_setzero_ps();
    const uint32_t *x = (const uint32_t *)(j->xb + t0 * j->in);
    int64_t pairs = j->in / 2;
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh w[GRG];
        for (int rg = 0; rg < GRG; rg++) w[rg] = (__m512bh)_mm512_load_si512((const void *)(panel + (GRG * p + rg) * 32));
        for (int t = 0; t < NT; t++) {
            __m512bh xv = (__m512bh)_mm512_set1_epi32((int)x[t * pairs + p]);
            for (int rg = 0; rg < GRG; rg++) acc[rg][t] = _mm512_dpbf16_ps(acc[rg][t], w[rg], xv);
        }
    }
    for (int rg = 0; rg < GRG; rg++) {
        int64_t first = o + 16 * rg, n = r1 - first < 16 ? r1 - first : 16;
        if (n <= 0) break;
        __mmask16 keep = (__mmask16)((1u << n) - 1);
        __m512 b = j->bias ? _mm512_maskz_loadu_ps(keep, j->bias + first) : _mm512_setzero_ps();
        for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(j->y + (t0 + t) * j->out + first, keep, _mm512_add_ps(acc[rg][t], b));
    }
}

__attribute__((target(AVX512BF16))) static void mxfp4_avx512bf16_gemm(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p;
    uint16_t *rows = aligned_alloc(64, sizeof(uint16_t) * 16 * j->in), *panel = aligned_alloc(64, sizeof(uint16_t) * GROWS * j->in);
    if (!rows || !panel) { free(rows); free(panel); mxfp4_avx512bf16(p, r0, r1); return; }  /* the tile kernel needs no room */
    for (int64_t o = r0; o < r1; o += GROWS) {
        int64_t oe = o + GROWS < r1 ? o + GROWS : r1;
        if (!scales_fold(j, o, oe)) { mxfp4_avx512bf16(p, o, oe); continue; }
        decode_panel(j, o, oe, rows, panel);
        for (int64_t t0 = 0; t0 < j->T; t0 += GT)
            switch (j->T - t0 < GT ? j->T - t0 : GT) {
            case 1: panel_tile(j, panel, o, oe, t0, 1); break;
            case 2: panel_tile(j, panel, o, oe, t0, 2); break;
            case 3: panel_tile(j, panel, o, oe, t0, 3); break;
            case 4: panel_tile(j, panel, o, oe, t0, 4); break;
            case 5: panel_tile(j, panel, o, oe, t0, 5); break;
            default: panel_tile(j, panel, o, oe, t0, GT); break;
            }
    }
    free(rows); free(panel);
}

/* One row o against NT tokens from t0, NT a compile-time constant (see mxfp4_tile). Each token's sum runs exactly as
 * the one-token kernel's does (four accumulators over 128-element steps, added pairwise), so a token's result does
 * not depend on how many tokens share the call (continuous batching gives each sequence what it gets alone). */
__attribute__((target(AVX512BF16), always_inline)) static inline void bf16_tile(const job_t *j, int64_t o, int64_t t0,
                                                                                  const int NT) {
    const uint16_t *w = j->w16 + o * j->in;
    __m512 acc[TT][4];
    for (int t = 0; t < NT; t++)
        for (int u = 0; u < 4; u++) acc[t][u] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 128 <= j->in; i += 128)
        for (int u = 0; u < 4; u++) {
            PREFETCH_W(w + i + 32 * u + PF_DIST / 2);
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w + i + 32 * u);
            for (int t = 0; t < NT; t++)
                acc[t][u] = _mm512_dpbf16_ps(acc[t][u], wv,
                                             (__m512bh)_mm512_loadu_si512(j->xb + (t0 + t) * j->in + i + 32 * u));
        }
    for (; i < j->in; i += 32) {
        __m512bh wv = (__m512bh)_mm512_loadu_si512(w + i);
        for (int t = 0; t < NT; t++)
            acc[t][0] = _mm512_dpbf16_ps(acc[t][0], wv, (__m512bh)_mm512_loadu_si512(j->xb + (t0 + t) * j->in + i));
    }
    for (int t = 0; t < NT; t++) {
        __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]), _mm512_add_ps(acc[t][2], acc[t][3]));
        j->y[(t0 + t) * j->out + o] = _mm512_reduce_add_ps(sum) + (j->bias ? j->bias[o] : 0.f);
    }
}

__attribute__((target(AVX512BF16))) static void bf16_avx512bf16(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p;
    /* blocks of rows (in L2) against tiles of tokens (their x in L1), as mxfp4_avx512bf16 */
    for (int64_t ob = r0; ob < r1; ob += 32)
        for (int64_t t0 = 0; t0 < j->T; t0 += TT)
            for (int64_t o = ob; o < r1 && o < ob + 32; o++)
                switch (j->T - t0 < TT ? j->T - t0 : TT) {
                case 1: bf16_tile(j, o, t0, 1); break;
                case 2: bf16_tile(j, o, t0, 2); break;
                case 3: bf16_tile(j, o, t0, 3); break;
                default: bf16_tile(j, o, t0, 4); break;
                }
}

/* One token (decode): four accumulators break the dot-product latency chain. */
__attribute__((target(AVX512BF16))) static void bf16_avx512bf16_t1(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p;
    for (int64_t o = r0; o < r1; o++) bf16_tile(j, o, 0, 1);
}
#endif

/* ---- dispatch ---------------------------------------------------------------------------------------- */
/* Paths, each a superset of the one before in what the kernels use: avxvnni is avx2 with AVX-VNNI's 256-bit int8
 * dot products (Alder Lake and later Intel client CPUs, Zen 5), used by the q8 products. A path can be forced only
 * where the CPU has it (an AVX-512 CPU may lack AVX-VNNI). */
enum { PATH_SCALAR = 0, PATH_AVX2 = 1, PATH_AVXVNNI = 2, PATH_AVX512BF16 = 3, N_PATHS };
static const char *PATH_NAMES[] = {"scalar", "avx2", "avxvnni", "avx512bf16"};
static int path_ok[N_PATHS] = {1}, best_path = PATH_SCALAR, forced_path = -1, has_vnni = 0;

static void detect(void) {
    for (int s = 0; s < 256; s++) SCALE[s] = ldexpf(1.0f, s - 127);
#ifdef OSSIE_X86
    __builtin_cpu_init();
    path_ok[PATH_AVX2] = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    path_ok[PATH_AVXVNNI] = path_ok[PATH_AVX2] && __builtin_cpu_supports("avxvnni");
    path_ok[PATH_AVX512BF16] = path_ok[PATH_AVX2] && __builtin_cpu_supports("avx512f") &&
                               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
    has_vnni = path_ok[PATH_AVX512BF16] && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
#endif
    for (int p = 0; p < N_PATHS; p++) if (path_ok[p]) best_path = p;
}

static inline int current_path(void) { return forced_path >= 0 ? forced_path : best_path; }

/* The code path for a product, and its row-range function. kind 0 = MXFP4, 1 = bf16. bf16_ok: x holds bf16 values
 * (rounding it to bf16 is exact), so the bf16 dot-product path may be used; that path reads x as bf16 (xb), the
 * MXFP4 one in the permuted order of permuted_pos. */
static int choose_path(int kind, int bf16_ok, int64_t T, task_fn *fn) {
    int path = current_path();
    if (kind == 2) {  /* q8: the scalar kernel reads x as float32, the others rounded to int8 (see Q8_INT8_KERNEL) */
        *fn = q8_scalar;
#ifdef OSSIE_X86
        /* every CPU with AVX-512 BF16 has AVX-512 VNNI too (Cooper Lake, Sapphire Rapids, Zen 4) */
        if (path == PATH_AVX512BF16) *fn = has_vnni ? q8_vnni : path_ok[PATH_AVXVNNI] ? q8_avxvnni : q8_avx2;
        else if (path == PATH_AVXVNNI) *fn = q8_avxvnni;
        else if (path == PATH_AVX2) *fn = q8_avx2;
#endif
        return path;
    }
    if (path == PATH_AVXVNNI || (path == PATH_AVX512BF16 && !bf16_ok)) path = PATH_AVX2;
    *fn = kind == 0 ? mxfp4_scalar : bf16_scalar;
#ifdef OSSIE_X86
    if (path == PATH_AVX512BF16)
        *fn = kind == 0 ? (T >= GEMM_MIN_T ? mxfp4_avx512bf16_gemm : mxfp4_avx512bf16)
                        : (T == 1 ? bf16_avx512bf16_t1 : bf16_avx512bf16);
    else if (path == PATH_AVX2) *fn = kind == 0 ? mxfp4_avx2 : bf16_avx2;
#else
    (void)T;
#endif
    return path;
}

/* Where element i of an MXFP4 product's input goes in the avx512bf16 path's order: word w (0..127) of a 4-group
 * block's decoded vectors A, B, C, D holds element 4 (w % 32) + w / 32 (see decode4), so element m goes to
 * word (m % 4) 32 + m / 4. */
static inline int64_t permuted_pos(int64_t i, int64_t in) {
    if (i >= in / 128 * 128) return i;  /* tail groups: natural order */
    int64_t m = i % 128;
    return i - m + (m % 4) * 32 + m / 4;
}

/* The same for the avx2 path (decode2_avx2): in a pair of groups, element e of group h (0, 1) is code e, the low
 * nibble of byte e/2 for even e; it lands in vector k = 4 (e odd) + 2 (e >= 16) + (e % 4 >= 2), at lane h's word
 * (e % 16) / 4. The last group of an odd count stays in natural order. */
static inline int64_t permuted_pos_avx2(int64_t i, int64_t in) {
    if (i >= in / 64 * 64) return i;
    int64_t m = i % 64, h = m / 32, e = m % 32, r = e % 4;
    return i - m + ((r & 1) * 4 + (e / 16) * 2 + (r >> 1)) * 8 + h * 4 + (e % 16) / 4;
}

/* y = x @ W.T + bias. kind 0 = MXFP4 (wa blocks, wb scales), 1 = bf16 (wa), 2 = q8 (wa int8 values, wb float16
 * scales); see choose_path for bf16_ok. Called without the GIL, holding call_mu. */
static int product(int kind, const float *x, const void *wa, const void *wb, const float *bias, float *y, int64_t T,
                   int64_t out, int64_t in, int bf16_ok) {
    job_t j = {x, NULL, (const uint8_t *)wa, (const uint8_t *)wb, (const uint16_t *)wa, bias, y, T, out, in};
    task_fn fn;
    uint16_t *xb = NULL;
    int path = choose_path(kind, bf16_ok, T, &fn);
    int8_t *xq = NULL; float *xs = NULL, *xp = NULL;
    if (kind == 2 && fn != q8_scalar) {  /* x rounded to int8 for each 32 values of a token, with the scales */
        int64_t G = in / 32;
        xq = malloc(T * in); xs = malloc(sizeof(float) * T * G);
        if (!xq || !xs) { free(xq); free(xs); return -1; }
        for (int64_t t = 0; t < T; t++)
            for (int64_t g = 0; g < G; g++) xs[t * G + g] = round_act32(x + t * in + g * 32, xq + (t * G + g) * 32);
        j.xq = xq; j.xs = xs;
    }
    if (path == PATH_AVX2 && kind == 0) {  /* the MXFP4 kernel reads x in its decoding's order */
        if (!(xp = malloc(sizeof(float) * T * in))) { free(xq); free(xs); return -1; }
        for (int64_t t = 0; t < T; t++)
            for (int64_t i = 0; i < in; i++) xp[t * in + permuted_pos_avx2(i, in)] = x[t * in + i];
        j.x = xp;
    }
    if (path == PATH_AVX512BF16 && kind != 2) {
        if (!(xb = aligned_alloc(64, sizeof(uint16_t) * T * in + 64))) return -1;  /* loads within cache lines */
        for (int64_t t = 0; t < T; t++)
            for (int64_t i = 0; i < in; i++) xb[t * in + (kind == 0 ? permuted_pos(i, in) : i)] = f32_to_bf16(x[t * in + i]);
        j.xb = xb;
    }
    parallel_for(fn, &j, out, 16);
    free(xb); free(xq); free(xs); free(xp);
    return 0;
}

static PyObject *py_matmul(PyObject *self __attribute__((unused)), PyObject *args) {
    int kind, bf16_ok, rc; unsigned long long x, wa, wb, bias, y; long long T, out, in;
    if (!PyArg_ParseTuple(args, "iKKKKKLLLp", &kind, &x, &wa, &wb, &bias, &y, &T, &out, &in, &bf16_ok)) return NULL;
    if (in % 32 || T < 1 || out < 1) { PyErr_SetString(PyExc_ValueError, "in must be a multiple of 32; T, out >= 1"); return NULL; }
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&call_mu);  /* one product at a time owns the pool (callers on other Python threads wait) */
    rc = product(kind, (const float *)x, (const void *)wa, (const void *)wb, (const float *)bias, (float *)y, T, out,
                 in, bf16_ok);
    pthread_mutex_unlock(&call_mu);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* The MoE block of T tokens in one call, so no Python runs between its products:
 * y[t] = sum over token t's chosen experts e (ascending, as the reference path adds them) of
 *        weight_te * (W2_e @ swiglu(W1_e @ x[t] + b1_e) + b2_e)   (+ residual[t], if given).
 * x float32 [T, H]; W1 MXFP4 [E, 2I, H/32, 16] with scales; b1 float32 [E, 2I]; W2 MXFP4 [E, H, I/32, 16]; b2 [E, H];
 * experts int64 [T, k], weights float32 [T, k].
 * round_bf16: the model runs in bf16, so the activation is rounded to bf16 before W2, as the reference does, and
 * y = bf16(residual + bf16(moe)), as its residual add rounds.
 * Each expert any token chose is read once, for all the tokens that chose it (continuous batching: the decode
 * steps of several sequences share the reads). A token's products are those of the same product kernels with it
 * alone (their sums run per token in the same order whatever the token count), so a token's result does not
 * depend on the others in the call.
 * Two passes over the threads, none in between: every chosen expert's W1 rows (each thread applies SwiGLU to its
 * own gate/up row pairs, for every token of that expert, and writes the activations where W2's product reads
 * them), then the W2 rows (each thread adds each token's experts up for its own rows). */
typedef struct {
    int64_t n, k, H, I, T; int bf16, path; float alpha, limit;  /* path: the products' (x's layout follows it) */
    job_t *up, *down;      /* per distinct chosen expert, ascending: its W1 product (into h) and W2 product (into part) */
    task_fn up_fn, down_fn;
    float **act; uint16_t **actb;  /* per expert [T_e, I] activations: float32, or bf16 in the avx512bf16 order */
    const int64_t *slot_expert, *slot_row;  /* [T, k] in ascending expert order: which expert, which of its rows */
    const float *slot_wt, *residual;
    float *y;
} moe_job_t;

static void moe_up(const void *p, int64_t b, int64_t e) {
    const moe_job_t *m = p; int64_t rows = 2 * m->I;
    for (int64_t n = b / rows; n < m->n && n * rows < e; n++) {
        int64_t r0 = b > n * rows ? b - n * rows : 0, r1 = e < (n + 1) * rows ? e - n * rows : rows;
        m->up_fn(&m->up[n], r0, r1);  /* chunks start at multiples of an even grain: whole (gate, up) pairs */
        for (int64_t t = 0; t < m->up[n].T; t++) {
            const float *h = m->up[n].y + t * rows;
            for (int64_t i = r0 / 2; i < r1 / 2; i++) {  /* clamped SwiGLU on interleaved (gate, up) */
                float gate = h[2 * i], up = h[2 * i + 1];
                gate = gate > m->limit ? m->limit : gate;
                up = up > m->limit ? m->limit : (up < -m->limit ? -m->limit : up);
                float a = gate * (1.f / (1.f + expf(-(m->alpha * gate)))) * (up + 1.f);
                if (m->path == PATH_AVX512BF16) m->actb[n][t * m->I + permuted_pos(i, m->I)] = f32_to_bf16(a);
                else m->act[n][t * m->I + (m->path == PATH_AVX2 ? permuted_pos_avx2(i, m->I) : i)] = m->bf16 ? rbf(a) : a;
            }
        }
    }
}

static void moe_down(const void *p, int64_t b, int64_t e) {
    const moe_job_t *m = p;
    for (int64_t n = 0; n < m->n; n++) m->down_fn(&m->down[n], b, e);
    for (int64_t t = 0; t < m->T; t++)
        for (int64_t r = b; r < e; r++) {
            float acc = 0.f;
            for (int64_t j = t * m->k; j < (t + 1) * m->k; j++)
                acc += m->down[m->slot_expert[j]].y[m->slot_row[j] * m->H + r] * m->slot_wt[j];
            if (m->residual) acc = m->bf16 ? rbf(m->residual[t * m->H + r] + rbf(acc)) : m->residual[t * m->H + r] + acc;
            m->y[t * m->H + r] = acc;
        }
}

static PyObject *py_moe(PyObject *self __attribute__((unused)), PyObject *args) {
    unsigned long long x, w1b, w1s, b1, w2b, w2s, b2, experts, weights, y, res; long long T, k, H, I, E; int bf16;
    float alpha, limit;
    if (!PyArg_ParseTuple(args, "KKKKKKKKKKLLLLLpffK", &x, &w1b, &w1s, &b1, &w2b, &w2s, &b2, &experts, &weights, &y,
                          &T, &k, &H, &I, &E, &bf16, &alpha, &limit, &res)) return NULL;
    if (H % 32 || I % 32) { PyErr_SetString(PyExc_ValueError, "hidden and intermediate sizes must be multiples of 32"); return NULL; }
    if (T < 1 || k < 1 || E < 1) { PyErr_SetString(PyExc_ValueError, "T, k and E must be >= 1"); return NULL; }
    const int64_t *ex = (const int64_t *)experts; const float *wts = (const float *)weights;
    for (int64_t j = 0; j < T * k; j++)
        if (ex[j] < 0 || ex[j] >= E) { PyErr_SetString(PyExc_ValueError, "expert id out of range"); return NULL; }
    moe_job_t m = {0};
    int64_t *count = calloc(E, sizeof(int64_t)), *index = malloc(sizeof(int64_t) * E), *order = malloc(sizeof(int64_t) * k),
            *slot_expert = malloc(sizeof(int64_t) * T * k), *slot_row = malloc(sizeof(int64_t) * T * k);
    float *slot_wt = malloc(sizeof(float) * T * k);
    int rc = !count || !index || !order || !slot_expert || !slot_row || !slot_wt;
    float *xg = NULL, *h = NULL, *actf = NULL, *part = NULL; uint16_t *xb = NULL, *actbuf = NULL;
    if (!rc) {
        for (int64_t j = 0; j < T * k; j++) count[ex[j]]++;
        int64_t n = 0, rows = 0;
        for (int64_t e = 0; e < E; e++) if (count[e]) { index[e] = n++; rows += count[e]; }
        m.n = n; m.k = k; m.H = H; m.I = I; m.T = T; m.bf16 = bf16; m.alpha = alpha; m.limit = limit;
        m.up = calloc(n, sizeof(job_t)); m.down = calloc(n, sizeof(job_t));
        m.act = calloc(n, sizeof(float *)); m.actb = calloc(n, sizeof(uint16_t *));
        xg = malloc(sizeof(float) * rows * H); xb = malloc(sizeof(uint16_t) * rows * H);
        h = malloc(sizeof(float) * rows * 2 * I); actf = malloc(sizeof(float) * rows * I);
        actbuf = malloc(sizeof(uint16_t) * rows * I); part = malloc(sizeof(float) * rows * H);
        rc = !m.up || !m.down || !m.act || !m.actb || !xg || !xb || !h || !actf || !actbuf || !part;
        if (!rc) {
            m.path = choose_path(0, bf16, 1, &m.up_fn);
            m.down_fn = m.up_fn;
            /* each expert's rows (its tokens, in token order) start after the previous experts' */
            int64_t off = 0;
            for (int64_t e = 0; e < E; e++) if (count[e]) {
                int64_t i = index[e], c = count[e];
                m.up[i] = (job_t){xg + off * H, xb + off * H, (const uint8_t *)w1b + e * 2 * I * (H / 32) * 16,
                                  (const uint8_t *)w1s + e * 2 * I * (H / 32), NULL, (const float *)b1 + e * 2 * I,
                                  h + off * 2 * I, 0, 2 * I, H};
                m.act[i] = actf + off * I; m.actb[i] = actbuf + off * I;
                m.down[i] = (job_t){m.act[i], m.actb[i], (const uint8_t *)w2b + e * H * (I / 32) * 16,
                                    (const uint8_t *)w2s + e * H * (I / 32), NULL, (const float *)b2 + e * H,
                                    part + off * H, c, H, I};
                off += c;
            }
            const float *xf = (const float *)x;
            for (int64_t t = 0; t < T; t++) {
                for (int64_t a = 0; a < k; a++) order[a] = a;  /* this token's choices in ascending expert order */
                for (int64_t a = 1; a < k; a++)
                    for (int64_t b = a; b > 0 && ex[t * k + order[b - 1]] > ex[t * k + order[b]]; b--) {
                        int64_t tmp = order[b]; order[b] = order[b - 1]; order[b - 1] = tmp;
                    }
                for (int64_t a = 0; a < k; a++) {
                    int64_t e = ex[t * k + order[a]], i = index[e];
                    job_t *u = &m.up[i];
                    int64_t row = u->T++;  /* this token's row in the expert's products */
                    float *dst = xg + (u->x - xg) + row * H;  /* u->x points into xg, which this call owns */
                    if (m.path == PATH_AVX2)
                        for (int64_t c = 0; c < H; c++) dst[permuted_pos_avx2(c, H)] = xf[t * H + c];
                    else memcpy(dst, xf + t * H, sizeof(float) * H);
                    if (m.path == PATH_AVX512BF16)
                        for (int64_t c = 0; c < H; c++) xb[(u->xb - xb) + row * H + permuted_pos(c, H)] = f32_to_bf16(dst[c]);
                    slot_expert[t * k + a] = i; slot_row[t * k + a] = row; slot_wt[t * k + a] = wts[t * k + order[a]];
                }
            }
            m.slot_expert = slot_expert; m.slot_row = slot_row; m.slot_wt = slot_wt;
            m.residual = (const float *)res; m.y = (float *)y;
            Py_BEGIN_ALLOW_THREADS
            pthread_mutex_lock(&call_mu);
            parallel_for(moe_up, &m, n * 2 * I, 16);
            parallel_for(moe_down, &m, H, 16);
            pthread_mutex_unlock(&call_mu);
            Py_END_ALLOW_THREADS
        }
    }
    free(count); free(index); free(order); free(slot_expert); free(slot_row); free(slot_wt);
    free(m.up); free(m.down); free(m.act); free(m.actb); free(xg); free(xb); free(h); free(actf); free(actbuf); free(part);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ---- attention of one query (decoding) over the KV cache ---------------------------------------------------
 * out[h] = sum_s p[h, s] v[s, h / G] with p = softmax over (q[h] . k[s, h / G] * scale, sink[h]) and the sink's share
 * dropped. Keys can be in any order (a ring buffer as it lies): a single query sees them all, and a softmax does
 * not care about order. k, v: [S, KV, D], bf16 or float32. */
typedef struct {
    const float *q; const void *k, *v; const float *sinks; float *out; int64_t S, H, KV, D; float scale; int bf16;
    int failed;  /* set by a worker that could not allocate */
    int64_t T, first, window;  /* prefill: T queries; query t is at position first + t and sees key rows
                                  (first + t - window, first + t] (all before it when window is 0); rows are positions */
    int pairs, group;  /* set by attention_setup. pairs: a bf16 cache and queries holding bf16 values, whose scores
                          the AVX-512 path takes in bf16 pairs; group: the query heads it scores together: 8 (pairs
                          or a q8 cache, and a multiple of 8 query heads per KV head, as gpt-oss has) or 4 */
    int q8;  /* the cache holds packed q8 rows (ossie.model.q8.pack_kv): per position and KV head, D int8 values and
                D/32 float16 scales, KV_ROW(D) bytes; bf16 is then 0 */
} attn_job_t;

#define KV_ROW(D) ((D) + 2 * ((D) / 32))

/* element i (= (position * KV + kv_head) * D + d) of a q8 cache */
static inline float q8_kv_at(const attn_job_t *a, const void *base, int64_t i) {
    const uint8_t *row = (const uint8_t *)base + (i / a->D) * KV_ROW(a->D);
    int64_t d = i % a->D; uint16_t h;
    memcpy(&h, row + a->D + 2 * (d / 32), 2);
    return (float)(int8_t)row[d] * half_to_f32(h);
}

static inline float kv_at(const attn_job_t *a, const void *base, int64_t i) {
    if (a->q8) return q8_kv_at(a, base, i);
    return a->bf16 ? bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static float dot_scalar(const attn_job_t *a, const float *q, int64_t off) {
    float acc = 0.f;
    for (int64_t d = 0; d < a->D; d++) acc += q[d] * kv_at(a, a->k, off + d);
    return acc;
}

#ifdef OSSIE_X86
__attribute__((target(AVX2))) static float dot_avx2(const attn_job_t *a, const float *q, int64_t off) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < a->D; d += 8) {
        __m256 kv = a->bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
                                  _mm_loadu_si128((const __m128i *)((const uint16_t *)a->k + off + d))), 16))
                            : _mm256_loadu_ps((const float *)a->k + off + d);
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), kv, acc);
    }
    return hsum256(acc);
}
#endif

/* o += p * v[off..off+D) */
static void axpy_scalar(const attn_job_t *a, float *o, float p, int64_t off) {
    if (a->q8) { for (int64_t d = 0; d < a->D; d++) o[d] += p * q8_kv_at(a, a->v, off + d); }
    else if (a->bf16) { const uint16_t *v = (const uint16_t *)a->v + off; for (int64_t d = 0; d < a->D; d++) o[d] += p * bf16_to_f32(v[d]); }
    else { const float *v = (const float *)a->v + off; for (int64_t d = 0; d < a->D; d++) o[d] += p * v[d]; }
}

#ifdef OSSIE_X86
__attribute__((target(AVX2))) static void axpy_avx2(const attn_job_t *a, float *o, float p, int64_t off) {
    __m256 pv = _mm256_set1_ps(p);
    for (int64_t d = 0; d < a->D; d += 8) {
        __m256 v = a->bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
                                 _mm_loadu_si128((const __m128i *)((const uint16_t *)a->v + off + d))), 16))
                           : _mm256_loadu_ps((const float *)a->v + off + d);
        _mm256_storeu_ps(o + d, _mm256_fmadd_ps(pv, v, _mm256_loadu_ps(o + d)));
    }
}
#endif

static void attn_heads(const void *p, int64_t h0, int64_t h1) {
    const attn_job_t *a = p; int64_t G = a->H / a->KV, S = a->S, D = a->D;
    float *w = malloc(sizeof(float) * S);
    if (!w) { __atomic_store_n(&((attn_job_t *)p)->failed, 1, __ATOMIC_RELAXED); return; }
    float (*dot)(const attn_job_t *, const float *, int64_t) = dot_scalar;
    void (*axpy)(const attn_job_t *, float *, float, int64_t) = axpy_scalar;
#ifdef OSSIE_X86
    if (current_path() >= PATH_AVX2 && D % 8 == 0 && !a->q8) { dot = dot_avx2; axpy = axpy_avx2; }
#endif
    for (int64_t h = h0; h < h1; h++) {
        const float *q = a->q + h * D; int64_t kvh = h / G; float m = a->sinks[h], total;
        for (int64_t s = 0; s < S; s++) {
            w[s] = dot(a, q, (s * a->KV + kvh) * D) * a->scale;
            if (w[s] > m) m = w[s];
        }
        total = expf(a->sinks[h] - m);
        for (int64_t s = 0; s < S; s++) { w[s] = expf(w[s] - m); total += w[s]; }
        float *o = a->out + h * D;
        for (int64_t d = 0; d < D; d++) o[d] = 0.f;
        for (int64_t s = 0; s < S; s++) axpy(a, o, w[s] / total, (s * a->KV + kvh) * D);
    }
    free(w);
}

#ifdef OSSIE_X86
/* exp(x) for x <= 0, 16 at a time: exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts for
 * precision) and Cephes' polynomial for exp(r) on [-ln2/2, ln2/2]: within 2 ulp of expf. */
__attribute__((target(AVX512BF16))) static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  /* exp(-104) is below the smallest float */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(y, n);
}

/* Four query heads h0..h0+3 of one KV head (gpt-oss has 8 per KV head), head_dim 64, on AVX-512, over key rows
 * [lo, lo + S): the keys go 16 at a time, one per lane (bf16 rows transposed in registers; float32 ones gathered),
 * so each score is a lane of a vector sum, with no horizontal adds; each key and value row is read once for the
 * four heads. Three phases, each over a range of the keys, so that a caller may interleave the quads of one KV
 * head block by block (the rows a block read for one quad are still in cache for the next): the sums are the same
 * whichever way the ranges are cut, as long as they are cut at multiples of 16.
 * q: the four heads' queries; w: the scores, head g's key s at w[g * (S + 16) + s]; m: the running maxima. */
__attribute__((target(AVX512BF16))) static void quad_scores(const attn_job_t *a, const float *q, int64_t h0, int64_t lo,
                                                             int64_t S, int64_t s_begin, int64_t s_end, float *w,
                                                             float *m) {
    int64_t G = a->H / a->KV, row = a->KV * 64, kvh = h0 / G;
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i hi16 = _mm512_set1_epi32((int)0xffff0000);
    /* lane i of even[g] + odd[g] is q[g] . k[s0 + i]; two chains per head (even and odd dims) */
    for (int64_t s0 = s_begin; s0 < s_end; s0 += 16) {
        __mmask16 valid = S - s0 >= 16 ? 0xffff : (__mmask16)((1u << (S - s0)) - 1);
        __m512 even[4], odd[4];
        for (int g = 0; g < 4; g++) even[g] = odd[g] = _mm512_setzero_ps();
        if (a->bf16) {
            /* dims d, d+1 of a bf16 row share a 32-bit word: the 16 keys' rows are read half a row (16 words)
             * at a time, transposed (keys16) */
            const uint16_t *kb = (const uint16_t *)a->k + kvh * 64;
            for (int half = 0; half < 2; half++) {
                __m512i w16[16];
                keys16((const uint8_t *)(kb + 32 * half), 2 * row, lo, s0, S, w16);
                for (int p = 0; p < 16; p++) {
                    int d = 32 * half + 2 * p;
                    __m512 k0 = _mm512_castsi512_ps(_mm512_slli_epi32(w16[p], 16));
                    __m512 k1 = _mm512_castsi512_ps(_mm512_and_si512(w16[p], hi16));
                    for (int g = 0; g < 4; g++) {
                        even[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * 64 + d]), k0, even[g]);
                        odd[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * 64 + d + 1]), k1, odd[g]);
                    }
                }
            }
        } else {
            __m512i base = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32((int)(lo + s0))),
                                                               _mm512_set1_epi32((int)row)),
                                            _mm512_set1_epi32((int)(kvh * 64)));  /* element index of k[s][kvh][0] */
            for (int d = 0; d < 64; d += 2) {
                __m512i idx = _mm512_add_epi32(base, _mm512_set1_epi32(d));
                __m512 k0 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, idx, a->k, 4);
                __m512 k1 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid,
                                                     _mm512_add_epi32(idx, _mm512_set1_epi32(1)), a->k, 4);
                for (int g = 0; g < 4; g++) {
                    even[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * 64 + d]), k0, even[g]);
                    odd[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * 64 + d + 1]), k1, odd[g]);
                }
            }
        }
        for (int g = 0; g < 4; g++) {
            __m512 sc = _mm512_mul_ps(_mm512_add_ps(even[g], odd[g]), _mm512_set1_ps(a->scale));
            _mm512_storeu_ps(w + g * (S + 16) + s0, sc);
            float mx = _mm512_mask_reduce_max_ps(valid, sc);
            if (mx > m[g]) m[g] = mx;
        }
    }
}

/* quad_scores for nh = 4 or 8 heads from h0 whose queries hold bf16 values, over a bf16 cache: the same transposed
 * keys, each word (dims d, d + 1 of 16 keys) multiplied by a head's pair of query values in one vdpbf16ps, whose
 * products are exact (bf16 times bf16) and summed in float32 as the FMAs would: four instructions fewer per word and
 * head, and eight heads share one transpose. qp[g * 32 + p]: head g's dims 2p, 2p + 1 as a bf16 pair. */
__attribute__((target(AVX512BF16), always_inline)) static inline void pair_scores(const attn_job_t *a, const uint32_t *qp,
                                                                                 int nh, int64_t h0, int64_t lo,
                                                                                 int64_t S, int64_t s_begin,
                                                                                 int64_t s_end, float *w, float *m) {
    int64_t G = a->H / a->KV, row = a->KV * 64, kvh = h0 / G;
    const uint16_t *kb = (const uint16_t *)a->k + kvh * 64;
    for (int64_t s0 = s_begin; s0 < s_end; s0 += 16) {
        __mmask16 valid = S - s0 >= 16 ? 0xffff : (__mmask16)((1u << (S - s0)) - 1);
        __m512 acc[2][8];  /* four heads keep two chains each (even and odd words), for the instruction's latency */
        for (int c = 0; c < 2; c++) for (int g = 0; g < nh; g++) acc[c][g] = _mm512_setzero_ps();
        for (int half = 0; half < 2; half++) {
            __m512i w16[16];
            keys16((const uint8_t *)(kb + 32 * half), 2 * row, lo, s0, S, w16);
            for (int p = 0; p < 16; p++) {
                int c = nh == 4 ? p & 1 : 0;
                for (int g = 0; g < nh; g++)
                    acc[c][g] = _mm512_dpbf16_ps(acc[c][g], (__m512bh)_mm512_set1_epi32((int)qp[g * 32 + 16 * half + p]),
                                                 (__m512bh)w16[p]);
            }
        }
        for (int g = 0; g < nh; g++) {
            __m512 sum = nh == 4 ? _mm512_add_ps(acc[0][g], acc[1][g]) : acc[0][g];
            __m512 sc = _mm512_mul_ps(sum, _mm512_set1_ps(a->scale));
            _mm512_storeu_ps(w + g * (S + 16) + s0, sc);
            float mx = _mm512_mask_reduce_max_ps(valid, sc);
            if (mx > m[g]) m[g] = mx;
        }
    }
}

__attribute__((target(AVX512BF16))) static void pair_scores4(const attn_job_t *a, const uint32_t *qp, int64_t h0,
                                                              int64_t lo, int64_t S, int64_t s_begin, int64_t s_end,
                                                              float *w, float *m) {
    pair_scores(a, qp, 4, h0, lo, S, s_begin, s_end, w, m);
}

__attribute__((target(AVX512BF16))) static void pair_scores8(const attn_job_t *a, const uint32_t *qp, int64_t h0,
                                                              int64_t lo, int64_t S, int64_t s_begin, int64_t s_end,
                                                              float *w, float *m) {
    pair_scores(a, qp, 8, h0, lo, S, s_begin, s_end, w, m);
}

/* Scores over a q8 cache, as llama.cpp computes q8_0 dot products: the queries rounded to int8 for each 32 dims too
 * (qb: head g's dims 4p..4p+3 as bytes q + 128 at qb[g * 16 + p]; qd[g * 2 + b]: the scale of its block b), and
 * AVX-512 VNNI's vpdpbusd multiplying four unsigned query bytes by four signed key bytes at once. The keys' 64
 * value bytes are transposed as the bf16 rows are (vector p: dims 4p..4p+3 of 16 keys); the +128 offset is taken
 * back with each key's sum over the block (one more vpdpbusd against ones); each block's integer sum is scaled by
 * both scales (the keys' gathered from their rows). head_dim 64: two blocks. */
#define VNNI AVX512BF16 ",avx512vnni"
__attribute__((target(VNNI), always_inline)) static inline void q8_scores(const attn_job_t *a, const uint32_t *qb,
                                                                          const float *qd, int nh, int64_t h0,
                                                                          int64_t lo, int64_t S, int64_t s_begin,
                                                                          int64_t s_end, float *w, float *m) {
    int64_t G = a->H / a->KV, row = a->KV * KV_ROW(64), kvh = h0 / G;
    const uint8_t *kb = (const uint8_t *)a->k + kvh * KV_ROW(64);
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t s0 = s_begin; s0 < s_end; s0 += 16) {
        __mmask16 valid = S - s0 >= 16 ? 0xffff : (__mmask16)((1u << (S - s0)) - 1);
        __m512i k16[16], at[16];
        int32_t offs[16];  /* each key's two scales, after its 64 values */
        for (int i = 0; i < 16; i++) offs[i] = (int32_t)((lo + s0 + (s0 + i < S ? i : S - 1 - s0)) * row + 64);
        __m512i sc = _mm512_i32gather_epi32(_mm512_loadu_si512((const void *)offs), (const void *)kb, 1);
        __m512 ks[2] = {_mm512_cvtph_ps(_mm512_cvtepi32_epi16(sc)), _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(sc, 16)))};
        keys16(kb, row, lo, s0, S, k16);
        __m512 sum[8];
        for (int b = 0; b < 2; b++) {
            __m512i ksum = _mm512_setzero_si512();
            for (int g = 0; g < nh; g++) at[g] = _mm512_setzero_si512();
            for (int p = 8 * b; p < 8 * b + 8; p++) {
                ksum = _mm512_dpbusd_epi32(ksum, ones, k16[p]);
                for (int g = 0; g < nh; g++) at[g] = _mm512_dpbusd_epi32(at[g], _mm512_set1_epi32((int)qb[g * 16 + p]), k16[p]);
            }
            __m512i offset = _mm512_slli_epi32(ksum, 7);  /* 128 times the keys' sums */
            for (int g = 0; g < nh; g++) {
                __m512 part = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(at[g], offset)),
                                            _mm512_mul_ps(ks[b], _mm512_set1_ps(qd[g * 2 + b])));
                sum[g] = b ? _mm512_add_ps(sum[g], part) : part;
            }
        }
        for (int g = 0; g < nh; g++) {
            __m512 v = _mm512_mul_ps(sum[g], _mm512_set1_ps(a->scale));
            _mm512_storeu_ps(w + g * (S + 16) + s0, v);
            float mx = _mm512_mask_reduce_max_ps(valid, v);
            if (mx > m[g]) m[g] = mx;
        }
    }
}

__attribute__((target(VNNI))) static void q8_scores4(const attn_job_t *a, const uint32_t *qb, const float *qd, int64_t h0,
                                                      int64_t lo, int64_t S, int64_t s_begin, int64_t s_end, float *w,
                                                      float *m) {
    q8_scores(a, qb, qd, 4, h0, lo, S, s_begin, s_end, w, m);
}

__attribute__((target(VNNI))) static void q8_scores8(const attn_job_t *a, const uint32_t *qb, const float *qd, int64_t h0,
                                                      int64_t lo, int64_t S, int64_t s_begin, int64_t s_end, float *w,
                                                      float *m) {
    q8_scores(a, qb, qd, 8, h0, lo, S, s_begin, s_end, w, m);
}

/* head g's query (64 floats at q + 64 g) as q8_scores takes it: bytes q / d + 128 per block of 32 with d its
 * largest magnitude / 127 */
static void quantize_queries(const float *q, int nh, uint32_t *qb, float *qd) {
    for (int g = 0; g < nh; g++)
        for (int b = 0; b < 2; b++) {
            int8_t v[32];
            qd[g * 2 + b] = round_act32(q + g * 64 + 32 * b, v);
            uint8_t *bytes = (uint8_t *)(qb + g * 16 + 8 * b);
            for (int k = 0; k < 32; k++) bytes[k] = (uint8_t)(v[k] + 128);
        }
}

/* A group's queries as its scoring reads them, made once per call: bf16 pairs (pair_scores), or int8 bytes and
 * their scales (q8_scores) */
typedef struct { uint32_t words[8 * 32]; float qd[16]; } group_query_t;

static void group_query(const attn_job_t *a, const float *q, group_query_t *gq) {
    if (a->q8) quantize_queries(q, a->group, gq->words, gq->qd);
    else if (a->pairs)
        for (int i = 0; i < a->group * 32; i++) {
            uint32_t lo16, hi16;
            memcpy(&lo16, q + 2 * i, 4); memcpy(&hi16, q + 2 * i + 1, 4);
            gq->words[i] = (lo16 >> 16) | (hi16 & 0xffff0000u);  /* exact: the values are bf16 */
        }
}

/* The scores of a group of a->group heads from h0 (q: their queries, gq: as group_query made them) over key rows
 * [lo, lo + S), keys s_begin..s_end. Head g's scores go to w + g * (S + 16), its running maximum to m[g]. */
__attribute__((target(AVX512BF16))) static void group_scores(const attn_job_t *a, const float *q,
                                                              const group_query_t *gq, int64_t h0, int64_t lo,
                                                              int64_t S, int64_t s_begin, int64_t s_end, float *w,
                                                              float *m) {
    if (a->q8 && a->group == 8) q8_scores8(a, gq->words, gq->qd, h0, lo, S, s_begin, s_end, w, m);
    else if (a->q8) q8_scores4(a, gq->words, gq->qd, h0, lo, S, s_begin, s_end, w, m);
    else if (!a->pairs) quad_scores(a, q, h0, lo, S, s_begin, s_end, w, m);
    else if (a->group == 8) pair_scores8(a, gq->words, h0, lo, S, s_begin, s_end, w, m);
    else pair_scores4(a, gq->words, h0, lo, S, s_begin, s_end, w, m);
}

/* the scores of all S keys as softmax numerators, in place; total[g]: their sum with the sink's */
__attribute__((target(AVX512BF16))) static void quad_softmax(const attn_job_t *a, int64_t h0, int64_t S, float *w,
                                                              const float *m, float *total) {
    for (int g = 0; g < 4; g++) {
        float *wg = w + g * (S + 16); __m512 mv = _mm512_set1_ps(m[g]), sum = _mm512_setzero_ps();
        for (int64_t s0 = 0; s0 < S; s0 += 16) {
            __mmask16 valid = S - s0 >= 16 ? 0xffff : (__mmask16)((1u << (S - s0)) - 1);
            __m512 e = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(_mm512_loadu_ps(wg + s0), mv)));
            _mm512_storeu_ps(wg + s0, e);
            sum = _mm512_add_ps(sum, e);
        }
        total[g] = _mm512_reduce_add_ps(sum) + expf(a->sinks[h0 + g] - m[g]);
    }
}

/* acc[g] (four heads' 64 floats, in memory between ranges) += sum over keys s in [s_begin, s_end) of e[g][s] v[s] */
__attribute__((target(AVX512BF16))) static void quad_values(const attn_job_t *a, int64_t h0, int64_t lo, int64_t S,
                                                             int64_t s_begin, int64_t s_end, const float *w, float *acc_mem) {
    int64_t G = a->H / a->KV, row = a->KV * 64, kvh = h0 / G;
    __m512 acc[4][4];
    for (int g = 0; g < 4; g++) for (int c = 0; c < 4; c++) acc[g][c] = _mm512_loadu_ps(acc_mem + g * 64 + 16 * c);
    for (int64_t s = s_begin; s < s_end; s++) {
        __m512 v[4];
        if (a->q8) {  /* int8 values, their two scales folded into the weights below */
            const uint8_t *vr = (const uint8_t *)a->v + (lo + s) * a->KV * KV_ROW(64) + kvh * KV_ROW(64);
            for (int c = 0; c < 4; c++) v[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(vr + 16 * c))));
            uint16_t h[2]; memcpy(h, vr + 64, 4);
            float d0 = half_to_f32(h[0]), d1 = half_to_f32(h[1]);
            for (int g = 0; g < 4; g++) {
                float e = w[g * (S + 16) + s];
                __m512 e0 = _mm512_set1_ps(e * d0), e1 = _mm512_set1_ps(e * d1);
                acc[g][0] = _mm512_fmadd_ps(e0, v[0], acc[g][0]); acc[g][1] = _mm512_fmadd_ps(e0, v[1], acc[g][1]);
                acc[g][2] = _mm512_fmadd_ps(e1, v[2], acc[g][2]); acc[g][3] = _mm512_fmadd_ps(e1, v[3], acc[g][3]);
            }
            continue;
        }
        if (a->bf16) {
            const uint16_t *vr = (const uint16_t *)a->v + (lo + s) * row + kvh * 64;
            for (int c = 0; c < 4; c++)
                v[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(vr + 16 * c))), 16));
        } else {
            const float *vr = (const float *)a->v + (lo + s) * row + kvh * 64;
            for (int c = 0; c < 4; c++) v[c] = _mm512_loadu_ps(vr + 16 * c);
        }
        for (int g = 0; g < 4; g++) {
            __m512 e = _mm512_set1_ps(w[g * (S + 16) + s]);
            for (int c = 0; c < 4; c++) acc[g][c] = _mm512_fmadd_ps(e, v[c], acc[g][c]);
        }
    }
    for (int g = 0; g < 4; g++) for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc_mem + g * 64 + 16 * c, acc[g][c]);
}

/* out[g] = acc[g] / total[g] */
__attribute__((target(AVX512BF16))) static void quad_out(const float *acc, const float *total, float *out) {
    for (int g = 0; g < 4; g++) {
        __m512 inv = _mm512_set1_ps(1.f / total[g]);
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(out + g * 64 + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(acc + g * 64 + 16 * c), inv));
    }
}

/* one group of a->group heads over key rows [lo, hi) in one go; w: room for 8 * (hi - lo + 16) floats */
__attribute__((target(AVX512BF16))) static void attn_group(const attn_job_t *a, const float *q, float *out, int64_t h0,
                                                            int64_t lo, int64_t hi, float *w) {
    int64_t S = hi - lo;
    float m[8], total[8], acc[8 * 64] = {0};
    group_query_t gq;
    for (int g = 0; g < a->group; g++) m[g] = a->sinks[h0 + g];
    group_query(a, q, &gq);
    group_scores(a, q, &gq, h0, lo, S, 0, S, w, m);
    for (int j = 0; j < a->group; j += 4) {
        quad_softmax(a, h0 + j, S, w + j * (S + 16), m + j, total + j);
        quad_values(a, h0 + j, lo, S, 0, S, w + j * (S + 16), acc + j * 64);
        quad_out(acc + j * 64, total + j, out + j * 64);
    }
}

/* decoding: one query, every key; units: groups of heads */
__attribute__((target(AVX512BF16))) static void attn_groups_avx512(const void *p, int64_t u0, int64_t u1) {
    const attn_job_t *a = p;
    float *w = malloc(sizeof(float) * 8 * (a->S + 16));
    if (!w) { __atomic_store_n(&((attn_job_t *)p)->failed, 1, __ATOMIC_RELAXED); return; }
    for (int64_t u = u0; u < u1; u++) attn_group(a, a->q + a->group * u * 64, a->out + a->group * u * 64, a->group * u, 0,
                                                 a->S, w);
    free(w);
}

#define KV_BLOCK 256  /* keys a KV head's groups take in turn (a block of its rows: 32 KiB of keys, as much of values) */

/* decoding at long contexts: units: KV heads, whose groups go through the keys block by block in turn, so that each
 * block of key and value rows comes from memory once rather than once per group (the same sums as attn_groups) */
__attribute__((target(AVX512BF16))) static void attn_kv_heads_avx512(const void *p, int64_t u0, int64_t u1) {
    const attn_job_t *a = p;
    int64_t S = a->S, G = a->H / a->KV, groups = G / a->group, quads = G / 4;
    float *w = malloc(sizeof(float) * G * (S + 16) + sizeof(float) * G * (64 + 2));
    if (!w) { __atomic_store_n(&((attn_job_t *)p)->failed, 1, __ATOMIC_RELAXED); return; }
    float *acc = w + G * (S + 16), *m = acc + G * 64, *total = m + G;
    group_query_t *gq = malloc(sizeof(group_query_t) * groups);
    if (!gq) { free(w); __atomic_store_n(&((attn_job_t *)p)->failed, 1, __ATOMIC_RELAXED); return; }
    for (int64_t kvh = u0; kvh < u1; kvh++) {
        int64_t h_first = kvh * G;  /* head h_first + g: scores at w + g * (S + 16), maximum m[g], sum total[g] */
        for (int64_t g = 0; g < G; g++) m[g] = a->sinks[h_first + g];
        for (int64_t j = 0; j < groups; j++) group_query(a, a->q + (h_first + j * a->group) * 64, &gq[j]);
        for (int64_t b = 0; b < S; b += KV_BLOCK)
            for (int64_t j = 0; j < groups; j++) {
                int64_t g = j * a->group;
                group_scores(a, a->q + (h_first + g) * 64, &gq[j], h_first + g, 0, S, b,
                             b + KV_BLOCK < S ? b + KV_BLOCK : S, w + g * (S + 16), m + g);
            }
        for (int64_t j = 0; j < quads; j++) quad_softmax(a, h_first + 4 * j, S, w + 4 * j * (S + 16), m + 4 * j, total + 4 * j);
        memset(acc, 0, sizeof(float) * G * 64);
        for (int64_t b = 0; b < S; b += KV_BLOCK)
            for (int64_t j = 0; j < quads; j++)
                quad_values(a, h_first + 4 * j, 0, S, b, b + KV_BLOCK < S ? b + KV_BLOCK : S, w + 4 * j * (S + 16),
                            acc + j * 4 * 64);
        for (int64_t j = 0; j < quads; j++) quad_out(acc + j * 4 * 64, total + 4 * j, a->out + (h_first + 4 * j) * 64);
    }
    free(w); free(gq);
}

/* prefill: T queries, each over the keys it may see (causal, within the window); units: (query, group of heads) */
__attribute__((target(AVX512BF16))) static void attn_groups_prefill_avx512(const void *p, int64_t u0, int64_t u1) {
    const attn_job_t *a = p; int64_t groups = a->H / a->group;
    float *w = malloc(sizeof(float) * 8 * (a->S + 16));
    if (!w) { __atomic_store_n(&((attn_job_t *)p)->failed, 1, __ATOMIC_RELAXED); return; }
    for (int64_t u = u0; u < u1; u++) {
        int64_t t = u / groups, h0 = a->group * (u % groups), pos = a->first + t;
        int64_t lo = a->window && pos - a->window + 1 > 0 ? pos - a->window + 1 : 0;
        attn_group(a, a->q + (t * a->H + h0) * 64, a->out + (t * a->H + h0) * 64, h0, lo, pos + 1, w);
    }
    free(w);
}

/* Chooses the AVX-512 path's scoring (attn_job_t's pairs and group) for q [n, D] floats. */
static void attention_setup(attn_job_t *a, int64_t n) {
    const uint32_t *bits = (const uint32_t *)a->q;
    int q_bf16 = 1;
    for (int64_t i = 0; i < n * a->D && q_bf16; i++) q_bf16 = (bits[i] & 0xffff) == 0;
    a->pairs = a->bf16 && q_bf16;
    a->group = (a->pairs || a->q8) && (a->H / a->KV) % 8 == 0 ? 8 : 4;
}
#endif

/* whether the AVX-512 kernel applies: head_dim 64, query heads per KV head a multiple of 4, int32 gather indices
 * (and VNNI for a q8 cache) */
static int quads_apply(const attn_job_t *a) {
#ifdef OSSIE_X86
    return current_path() == PATH_AVX512BF16 && a->D == 64 && (a->H / a->KV) % 4 == 0 && (!a->q8 || has_vnni) &&
           a->S * a->KV * KV_ROW(64) < (1LL << 31);
#else
    (void)a;
    return 0;
#endif
}

/* all heads of one query: the AVX-512 kernel where it applies, else head by head */
static void attention_heads(attn_job_t *a) {
#ifdef OSSIE_X86
    if (quads_apply(a)) {
        /* long contexts: a KV head's rows read once for all its quads, where that leaves a unit for every thread */
        attention_setup(a, a->H);
        if (a->S >= 2048 && a->KV >= pool.nthreads) parallel_for(attn_kv_heads_avx512, a, a->KV, 1);
        else parallel_for(attn_groups_avx512, a, a->H / a->group, 1);
        return;
    }
#endif
    parallel_for(attn_heads, a, a->H, 4);
}

/* attention_prefill(q, k, v, sinks, out, T, S, H, KV, D, scale, bf16, first, window[, q8]) -> bool: T queries q
 * float32 [T, H, D] at key rows first.. of k, v [S, KV, D] (rows in position order; with q8 packed q8 rows [S, KV,
 * KV_ROW(D)]), causal, within `window` rows if not 0; out float32 [T, H, D]. False (nothing done) where the
 * AVX-512 kernel does not apply: the caller's torch path then serves. */
static PyObject *py_attention_prefill(PyObject *self __attribute__((unused)), PyObject *args) {
    unsigned long long q, k, v, sinks, out; long long T, S, H, KV, D, first, window; float scale; int bf16, q8 = 0;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLLfpLL|p", &q, &k, &v, &sinks, &out, &T, &S, &H, &KV, &D, &scale, &bf16,
                          &first, &window, &q8)) return NULL;
    if (T < 1 || KV < 1 || H % KV || first < 0 || first + T > S || window < 0) {
        PyErr_SetString(PyExc_ValueError, "attention_prefill: T >= 1, H a multiple of KV, first + T <= S"); return NULL;
    }
    attn_job_t a = {(const float *)q, (const void *)k, (const void *)v, (const float *)sinks, (float *)out, S, H, KV, D,
                    scale, bf16 && !q8, 0, T, first, window};
    a.q8 = q8;
    if (!quads_apply(&a)) Py_RETURN_FALSE;
#ifdef OSSIE_X86
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&call_mu);
    attention_setup(&a, T * H);
    parallel_for(attn_groups_prefill_avx512, &a, T * (H / a.group), 1);
    pthread_mutex_unlock(&call_mu);
    Py_END_ALLOW_THREADS
#endif
    if (a.failed) return PyErr_NoMemory();
    Py_RETURN_TRUE;
}

/* attention(q, k, v, sinks, out, S, H, KV, D, scale, bf16[, q8]): q float32 [H, D], out float32 [H, D]; k, v
 * [S, KV, D] bf16 or float32, or with q8 packed q8 rows [S, KV, KV_ROW(D)] */
static PyObject *py_attention(PyObject *self __attribute__((unused)), PyObject *args) {
    unsigned long long q, k, v, sinks, out; long long S, H, KV, D; float scale; int bf16, q8 = 0;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLfp|p", &q, &k, &v, &sinks, &out, &S, &H, &KV, &D, &scale, &bf16, &q8))
        return NULL;
    if (S < 1 || KV < 1 || H % KV || (q8 && D % 32)) {
        PyErr_SetString(PyExc_ValueError, "attention: S >= 1, H a multiple of KV (and D of 32 for q8)"); return NULL;
    }
    attn_job_t a = {(const float *)q, (const void *)k, (const void *)v, (const float *)sinks, (float *)out, S, H, KV, D,
                    scale, bf16 && !q8, 0};
    a.q8 = q8;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&call_mu);
    attention_heads(&a);
    pthread_mutex_unlock(&call_mu);
    Py_END_ALLOW_THREADS
    if (a.failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* out = bf16(x / sqrt(mean(x^2) + eps) * w), as the torch path's rms_norm (float32, then rounded) */
static void rms_norm_bf16(const float *x, const float *w, float *out, int64_t n, float eps) {
    float ss = 0.f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = rbf(x[i] * inv * w[i]);
}

/* rms_norm(x, w, out, T, n, eps): rms_norm_bf16 on each of T rows (x, out float32 [T, n], w float32 [n]): the
 * op-by-op path of a bf16 model norms as the fused blocks do, in the same order, so that a token decoded in a batch
 * (op by op) gets bit for bit what it gets alone (fused). torch's rms_norm sums the squares in another order: at
 * the 20b's width its last bit differed often enough to change bf16 roundings and then tokens. */
static PyObject *py_rms_norm(PyObject *self __attribute__((unused)), PyObject *args) {
    unsigned long long x, w, out; long long T, n; float eps;
    if (!PyArg_ParseTuple(args, "KKKLLf", &x, &w, &out, &T, &n, &eps)) return NULL;
    if (T < 0 || n < 1) { PyErr_SetString(PyExc_ValueError, "rms_norm: T >= 0, n >= 1"); return NULL; }
    Py_BEGIN_ALLOW_THREADS
    for (long long t = 0; t < T; t++) rms_norm_bf16((const float *)x + t * n, (const float *)w, (float *)out + t * n, n, eps);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* The attention block of one token (decoding) in one call, for a bf16 model: RMSNorm, the qkv product, RoPE on
 * q and k, the KV cache write, attention over the cache, the out product and the residual add. Every value is
 * rounded to bf16 where the torch path rounds it (each op on bf16 tensors rounds its result), so the two paths
 * agree up to the order of float32 sums. x, y: float32 [hidden] holding bf16 values; cos2, sin2: float32 [D] as
 * in model.apply_rope; caches bf16 [rows, KV, D]; the new key and value go to row `slot`, and attention reads
 * rows 0..n_keys-1 (a ring buffer as it lies); with kv_q8 the caches hold packed q8 rows [rows, KV, KV_ROW(D)] and the
 * new key and value are written so (as ossie.model.q8.pack_kv writes them). With a router (gate_w not 0), it also gives the MoE block's input
 * RMSNorm(y) (float32 [hidden] holding bf16 values) and the router's logits (bf16 [E]), so the decoding loop runs
 * no torch op between the blocks but the top-k. */
static PyObject *py_attention_block(PyObject *self __attribute__((unused)), PyObject *args) {
    unsigned long long x, nw, qw, qb, c2, s2, kc, vc, sk, ow, ob, y, mnw, gw, gb, hout, lout, qs = 0, os = 0;
    long long slot, nkeys, H, KV, D, hid, E; float eps; int wkind = 1;  /* the projections: 1 bf16, 2 q8 (+ scales) */
    int kv_q8 = 0;
    if (!PyArg_ParseTuple(args, "KKKKKKKKKKKKLLLLLLfKKKLKK|iKKp", &x, &nw, &qw, &qb, &c2, &s2, &kc, &vc, &sk, &ow, &ob,
                          &y, &slot, &nkeys, &H, &KV, &D, &hid, &eps, &mnw, &gw, &gb, &E, &hout, &lout, &wkind, &qs,
                          &os, &kv_q8)) return NULL;
    if (wkind != 1 && wkind != 2) { PyErr_SetString(PyExc_ValueError, "attention_block: wkind is 1 or 2"); return NULL; }
    if (hid % 32 || (H * D) % 32 || D % 2 || KV < 1 || H % KV || nkeys < 1 || E > 256 || (kv_q8 && D % 32)) {
        PyErr_SetString(PyExc_ValueError, "attention_block: unsupported shapes"); return NULL;
    }
    const float *xf = (const float *)x, *norm = (const float *)nw, *cos2 = (const float *)c2, *sin2 = (const float *)s2;
    int64_t nq = (H + 2 * KV) * D;
    float *h = malloc(sizeof(float) * hid), *qkv = malloc(sizeof(float) * nq), *a = malloc(sizeof(float) * H * D),
          *o = malloc(sizeof(float) * hid);
    int rc = !h || !qkv || !a || !o;
    attn_job_t job = {qkv, (const void *)kc, (const void *)vc, (const float *)sk, a, nkeys, H, KV, D,
                      1.f / sqrtf((float)D), !kv_q8, 0};
    job.q8 = kv_q8;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&call_mu);
    if (!rc) {
        rms_norm_bf16(xf, norm, h, hid, eps);
        rc |= product(wkind, h, (const void *)qw, (const void *)qs, (const float *)qb, qkv, 1, nq, hid, 1);
    }
    if (!rc) {
        for (int64_t i = 0; i < nq; i++) qkv[i] = rbf(qkv[i]);
        int64_t half = D / 2;
        for (int64_t head = 0; head < H + KV; head++) {  /* RoPE: x * cos2 + swap_halves(x) * sin2 */
            float *v = qkv + head * D;
            for (int64_t j = 0; j < half; j++) {
                float lo = v[j], hi = v[j + half];
                v[j] = rbf(rbf(lo * cos2[j]) + rbf(hi * sin2[j]));
                v[j + half] = rbf(rbf(hi * cos2[j + half]) + rbf(lo * sin2[j + half]));
            }
        }
        if (kv_q8) {  /* each head's row: D int8 values, then a float16 scale per 32 */
            uint8_t *kq = (uint8_t *)kc + slot * KV * KV_ROW(D), *vq = (uint8_t *)vc + slot * KV * KV_ROW(D);
            for (int64_t h = 0; h < KV; h++)
                for (int64_t g = 0; g < D / 32; g++) {
                    uint16_t hk = quant32(qkv + H * D + h * D + 32 * g, (int8_t *)(kq + h * KV_ROW(D) + 32 * g));
                    uint16_t hv = quant32(qkv + (H + KV) * D + h * D + 32 * g, (int8_t *)(vq + h * KV_ROW(D) + 32 * g));
                    memcpy(kq + h * KV_ROW(D) + D + 2 * g, &hk, 2);
                    memcpy(vq + h * KV_ROW(D) + D + 2 * g, &hv, 2);
                }
        } else {
            uint16_t *kcache = (uint16_t *)kc + slot * KV * D, *vcache = (uint16_t *)vc + slot * KV * D;
            for (int64_t i = 0; i < KV * D; i++) {
                kcache[i] = f32_to_bf16(qkv[H * D + i]);
                vcache[i] = f32_to_bf16(qkv[(H + KV) * D + i]);
            }
        }
        attention_heads(&job);
        rc |= job.failed;
    }
    if (!rc) {
        for (int64_t i = 0; i < H * D; i++) a[i] = rbf(a[i]);
        rc |= product(wkind, a, (const void *)ow, (const void *)os, (const float *)ob, o, 1, hid, H * D, 1);
        for (int64_t i = 0; i < hid; i++) ((float *)y)[i] = rbf(xf[i] + rbf(o[i]));
    }
    if (!rc && gw) {  /* the MoE block's input, RMSNorm(y), and its router logits, rounded to bf16 as the torch path */
        float logits[256];
        rms_norm_bf16((const float *)y, (const float *)mnw, (float *)hout, hid, eps);
        rc |= product(1, (const float *)hout, (const void *)gw, NULL, (const float *)gb, logits, 1, E, hid, 1);
        for (int64_t e = 0; e < E && !rc; e++) ((uint16_t *)lout)[e] = f32_to_bf16(logits[e]);
    }
    pthread_mutex_unlock(&call_mu);
    Py_END_ALLOW_THREADS
    free(h); free(qkv); free(a); free(o);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* Memory read bandwidth, for the roofline: every thread sums its share of a buffer (larger than the caches). */
typedef struct { const uint64_t *p; uint64_t total; } read_job_t;

#ifdef OSSIE_X86
__attribute__((target("avx2"))) static void read_part_avx2(const void *ctx, int64_t b, int64_t e) {
    read_job_t *r = (read_job_t *)ctx; __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t i = b * 512; i < e * 512; i += 16) {
        s0 = _mm256_add_epi64(s0, _mm256_loadu_si256((const __m256i *)(r->p + i)));
        s1 = _mm256_add_epi64(s1, _mm256_loadu_si256((const __m256i *)(r->p + i + 4)));
        s2 = _mm256_add_epi64(s2, _mm256_loadu_si256((const __m256i *)(r->p + i + 8)));
        s3 = _mm256_add_epi64(s3, _mm256_loadu_si256((const __m256i *)(r->p + i + 12)));
    }
    uint64_t out[4]; _mm256_storeu_si256((__m256i *)out, _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)));
    __atomic_fetch_add(&r->total, out[0] + out[1] + out[2] + out[3], __ATOMIC_RELAXED);
}
#endif

static void read_part(const void *ctx, int64_t b, int64_t e) {
    read_job_t *r = (read_job_t *)ctx; uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t i = b * 512; i < e * 512; i += 4) { s0 += r->p[i]; s1 += r->p[i + 1]; s2 += r->p[i + 2]; s3 += r->p[i + 3]; }
    __atomic_fetch_add(&r->total, s0 + s1 + s2 + s3, __ATOMIC_RELAXED);
}

/* ---- q8 quantization at load (ossie.model.q8.quantize; the torch version there is the reference) ---------- */
typedef struct { const uint16_t *w; int8_t *v; uint16_t *s; int64_t in; } quant_job_t;

static void quant_rows(const void *p, int64_t r0, int64_t r1) {
    const quant_job_t *q = p; int64_t G = q->in / 32;
    for (int64_t o = r0; o < r1; o++)
        for (int64_t g = 0; g < G; g++) {
            float x[32];
            for (int k = 0; k < 32; k++) x[k] = bf16_to_f32(q->w[o * q->in + g * 32 + k]);
            q->s[o * G + g] = quant32(x, q->v + o * q->in + g * 32);
        }
}

/* quantize_q8(w, values, scales, out, in): bf16 w [out, in] into int8 values [out, in] and float16 scales
 * [out, in/32], on all threads */
static PyObject *py_quantize_q8(PyObject *self __attribute__((unused)), PyObject *args) {
    unsigned long long w, v, sc; long long out, in;
    if (!PyArg_ParseTuple(args, "KKKLL", &w, &v, &sc, &out, &in)) return NULL;
    if (in % 32 || out < 1) { PyErr_SetString(PyExc_ValueError, "quantize_q8: in must be a multiple of 32"); return NULL; }
    quant_job_t q = {(const uint16_t *)w, (int8_t *)v, (uint16_t *)sc, in};
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&call_mu);
    parallel_for(quant_rows, &q, out, 64);
    pthread_mutex_unlock(&call_mu);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_read(PyObject *self __attribute__((unused)), PyObject *args) {
    unsigned long long ptr; long long nbytes;
    if (!PyArg_ParseTuple(args, "KL", &ptr, &nbytes)) return NULL;
    read_job_t r = {(const uint64_t *)ptr, 0};
    task_fn fn = read_part;
#ifdef OSSIE_X86
    if (path_ok[PATH_AVX2]) fn = read_part_avx2;
#endif
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&call_mu);
    parallel_for(fn, &r, nbytes / 4096, 1);  /* whole 4 KiB pages */
    pthread_mutex_unlock(&call_mu);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLongLong(r.total);
}

static PyObject *py_set_threads(PyObject *self __attribute__((unused)), PyObject *args) {
    int n; if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&call_mu);  /* not in the middle of a job */
    pool.nthreads = n;  /* workers beyond n sit jobs out; missing ones start on the next parallel_for */
    pthread_mutex_unlock(&call_mu);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_get_threads(PyObject *self __attribute__((unused)), PyObject *args __attribute__((unused))) { return PyLong_FromLong(pool.nthreads); }

static PyObject *py_set_path(PyObject *self __attribute__((unused)), PyObject *args) {
    const char *name; if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    int chosen = -1;
    for (int i = 0; i < N_PATHS; i++) if (!strcmp(name, PATH_NAMES[i])) chosen = i;
    if (strcmp(name, "best") && chosen < 0) {
        PyErr_SetString(PyExc_ValueError, "path: best, scalar, avx2, avxvnni or avx512bf16"); return NULL;
    }
    forced_path = chosen >= 0 && path_ok[chosen] ? chosen : -1;  /* a path this CPU lacks: the best it has */
    Py_RETURN_NONE;
}

static PyObject *py_path(PyObject *self __attribute__((unused)), PyObject *args __attribute__((unused))) {
    return PyUnicode_FromString(PATH_NAMES[current_path()]);
}

static PyMethodDef methods[] = {
    {"matmul", py_matmul, METH_VARARGS, "y = x @ W.T + bias for an MXFP4 (kind 0), bf16 (1) or q8 (2) weight"},
    {"moe", py_moe, METH_VARARGS, "the MoE block of T tokens: experts' products, SwiGLU and weighted sums"},
    {"attention_block", py_attention_block, METH_VARARGS, "the attention block of one token of a bf16 model"},
    {"rms_norm", py_rms_norm, METH_VARARGS, "RMSNorm of T rows, rounded to bf16, as the fused blocks norm"},
    {"attention", py_attention, METH_VARARGS, "attention of one query over the KV cache, with sinks"},
    {"attention_prefill", py_attention_prefill, METH_VARARGS, "causal attention of a block of queries, with sinks"},
    {"quantize_q8", py_quantize_q8, METH_VARARGS, "bf16 rows into q8 (int8 values, a float16 scale per 32)"},
    {"read", py_read, METH_VARARGS, "read(ptr, nbytes): sum a buffer's words on all threads (bandwidth probe)"},
    {"set_threads", py_set_threads, METH_VARARGS, "number of threads for the kernels"},
    {"get_threads", py_get_threads, METH_NOARGS, "number of threads for the kernels"},
    {"set_path", py_set_path, METH_VARARGS, "force a code path (best, scalar, avx2, avx512bf16) for tests"},
    {"path", py_path, METH_NOARGS, "the code path in use"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "ossie's fused CPU kernels", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { detect(); return PyModule_Create(&module); }
