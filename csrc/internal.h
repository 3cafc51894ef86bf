/* What ossie's kernel files share: the job types, the numeric helpers, the thread pool and the paths. Nothing here
 * knows Python (module.c binds the API of kernels.h), so csrc/tests builds the kernels alone, for any CPU. */
#ifndef OSSIE_INTERNAL_H
#define OSSIE_INTERNAL_H

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define OSSIE_X86 1
#endif
#if defined(__aarch64__)
#define OSSIE_NEON 1
#endif

extern float SCALE[256];  /* E8M0 byte -> 2^(s-127) */
static const float FP4[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};
static const int8_t FP4_X2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};  /* 2 x FP4: integers */

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
static inline float rbf(float v) { return bf16_to_f32(f32_to_bf16(v)); }  /* round to bf16 */

/* float16 (IEEE binary16) bits as float32, subnormals included */
static inline float half_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023, u;
    if (e == 31) u = sign | 0x7f800000 | (m << 13);
    else if (e) u = sign | ((e + 112) << 23) | (m << 13);
    else { float f = ldexpf((float)m, -24); memcpy(&u, &f, 4); u |= sign; }
    float f; memcpy(&f, &u, 4); return f;
}

/* a * b + c rounded once where the CPU fuses it (every ARM64 CPU; x86 with FMA built in), else twice: the scalar
 * kernels' sums, which the NEON kernels repeat operation for operation */
#if defined(__aarch64__) || defined(__FMA__)
#define SFMA(a, b, c) __builtin_fmaf((a), (b), (c))
#else
#define SFMA(a, b, c) ((a) * (b) + (c))
#endif

uint16_t f32_to_f16(float f);
uint16_t quant32(const float *x, int8_t *v);
float round_act32(const float *x, int8_t *q);
float round_act32_q8p(const float *x, int8_t *xq, int32_t *xc);
void mxfp4_q8act_scalar(const void *p, int64_t r0, int64_t r1);  /* MXFP4 on x rounded to int8 (xq, xs, xc) */

/* ---- the thread pool (pool.c) -------------------------------------------------------------------------- */
typedef void (*task_fn)(const void *ctx, int64_t begin, int64_t end);
#define MAX_THREADS 256
extern pthread_mutex_t call_mu;  /* one job at a time owns the pool: the API's entry points hold it */
void parallel_for(task_fn fn, const void *ctx, int64_t n, int64_t grain);
void parallel_for_dynamic(task_fn fn, const void *ctx, int64_t n, int64_t grain);
int pool_threads(void);
void pool_set_threads(int n);

/* ---- products ---------------------------------------------------------------------------------------- */
typedef struct {
    const float *x; const uint16_t *xb;   /* x as float32 [T, in]; as bf16 [T, in] for the bf16 path */
    const uint8_t *blocks, *scales;        /* MXFP4 weight */
    const uint16_t *w16;                   /* bf16 weight */
    const float *bias; float *y;
    int64_t T, out, in;
    const int8_t *xq; const float *xs;     /* q8: x rounded to int8 per 32, with its scales (see Q8_INT8_KERNEL) */
    const float *xp;                       /* x in permuted_pos_avx2's order: the avx2 MXFP4 tile kernel's */
    const int32_t *xc;                     /* MXFP4 on rounded x (the q8 mode's prompt experts): xq holds each group's even
                                              inputs, then its odd ones; xc 12 x each group's sum (round_act32_q8p) */
    const float *xt;                       /* mxfp4_avx2_few's x, transposed: for each input in xp's order, the tokens'
                                              values side by side in FEW_LANES(T) lanes (0 past T) */
} job_t;
#define FEW_LANES(T) ((T) > 8 ? 16 : 8)

/* Where element i of an MXFP4 product's input goes in the avx512bf16 path's order: word w (0..127) of a 4-group
 * block's decoded vectors A, B, C, D holds element 4 (w % 32) + w / 32 (see decode4 in x86_avx512.c), so element m goes
 * to word (m % 4) 32 + m / 4. */
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

/* Weights stream through once per token: fetch them 4 KiB ahead, into L2. 4 KiB decoded the 20b 2-4 % faster
 * than 2 KiB on Zen 5 (in-process alternation, benchmarks/decode_parts.py), 8 KiB no better. The hint was
 * non-temporal (NTA) at first, so that weights would not evict what the rest of the step keeps in the caches: on
 * Zen 5 NTA, T0 and T1 decoded alike, but on an Intel Xeon (AVX-512 BF16, family 6 model 167) NTA cost a third to a
 * half of the products' speed (one-token bf16 products 5.6 GB/s with NTA, 11.8 with T0; MXFP4 6.3 and 8.5), and T1
 * was as good as T0 or better (q8 12.4 GB/s against 9.8). PF_LOCALITY 2 is T1 on x86 (PRFM PLDL2KEEP on ARM). */
#ifndef PF_DIST
#define PF_DIST 4096
#endif
#ifndef PF_LOCALITY
#define PF_LOCALITY 2
#endif
#define PREFETCH_W(p) __builtin_prefetch((const void *)(p), 0, PF_LOCALITY)
/* A row's scales lie in their own array, read once at the row's start: fetched a few rows ahead, as the weights
 * are, or each row would begin with a wait on memory. */
#define PF_ROWS 4
static inline void prefetch_bytes(const void *p, int64_t n) {
    for (int64_t i = 0; i < n; i += 64) PREFETCH_W((const char *)p + i);
}
#define TT 4  /* tokens per tile: their accumulators stay in registers, their x rows in L1 */
#define GEMM_MIN_T 16  /* from this many tokens an MXFP4 product takes a panel GEMM (x86_avx2.c, x86_avx512.c) */
#define PROMPT_ROWS 9  /* a product or MoE call of this many rows or more is a prompt's: the CPU backend sends
                          decoding's rows (up to its SMALL_BATCH, 8) apart, so kernels whose sums depend on the row
                          count may serve such calls without changing what a decoding token gets */
#define GEMM_BF16_MIN_T PROMPT_ROWS  /* from this many tokens a bf16 product takes its panel GEMM (AVX2, NEON) */

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

/* One SIMD path's pieces of a prompt's attention, which prompt_attention_units drives (prompt_attention.c) */
typedef struct {
    int64_t keys;  /* key rows a block */
    /* key rows s0..s0 + keys of KV head kvh, transposed: kt[keys d + j] = k[s0 + j][d]; rows from `end` on as zeros */
    void (*keys_t)(const attn_job_t *a, int64_t kvh, int64_t s0, int64_t end, float *kt);
    /* ng heads' scores (their queries D apart from q) of the block's keys, times scale, to rows[g] */
    void (*scores)(const float *kt, int64_t D, const float *q, float scale, float *const rows[4], int ng);
    /* row[0..n): scores -> exp(score - max), the maximum taken with the sink's logit; their sum with the sink's */
    float (*softmax_row)(float *row, int64_t n, float sink);
    void (*value_row)(const attn_job_t *a, int64_t i, float *dst);  /* D floats of the value cache from element i */
    /* o[0..32) += sum over keys s in [s0, s1) of e[s] v[s], for nh heads (e and o rows `stride` apart), v rows as
     * floats (vf, D apart, key s at vf + (s - vb) D) */
    void (*values)(const float *e, int64_t stride, const float *vf, int64_t vb, int64_t D, int64_t s0, int64_t s1,
                   float *o, int64_t ostride, int nh);
    void (*scale_row)(float *dst, const float *o, float inv, int64_t D);  /* dst[0..D) = o * inv */
} prompt_attention_t;
void prompt_attention_units(const attn_job_t *a, const prompt_attention_t *isa, int64_t u0, int64_t u1);
#define ATTN_PQ 8  /* queries the AVX2 prefill attention takes together (each key row read and transposed once for them) */

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

/* memory read bandwidth: every thread sums its share of a buffer */
typedef struct { const uint64_t *p; uint64_t total; } read_job_t;

/* ---- paths ------------------------------------------------------------------------------------------------
 * x86, each a superset of the one before in what the kernels use: avx2 (with FMA and F16C); avxvnni: avx2 with
 * AVX-VNNI's 256-bit int8 dot products (Alder Lake and later Intel client CPUs, Zen 5), used by the q8 products;
 * avx512bf16. ARM64: neon (every ARMv8 CPU); dotprod: with SDOT, for the q8 products (Cortex-A76 and later, Apple
 * M1 and later, Snapdragon X, Graviton 2 and later); i8mm: dotprod with SMMLA for the q8 mode's prompt experts
 * (Cortex-A510/A710 and later, Apple M2 and later, Graviton 3 and later, Snapdragon X). A path can be forced only
 * where the CPU has it. */
enum { PATH_SCALAR = 0, PATH_AVX2, PATH_AVXVNNI, PATH_AVX512BF16, PATH_NEON, PATH_DOTPROD, PATH_I8MM, N_PATHS };
extern int path_ok[N_PATHS], has_vnni, has_arm_bf16;
int current_path(void);

#ifdef OSSIE_X86
void mxfp4_avx2(const void *p, int64_t r0, int64_t r1);        /* reads xp */
void mxfp4_avx2_gemm(const void *p, int64_t r0, int64_t r1);   /* prompts: from GEMM_MIN_T tokens */
void mxfp4_avx2_few(const void *p, int64_t r0, int64_t r1);    /* a prompt's experts of 6-8 or 12-16 tokens, reads xt */
void bf16_avx2(const void *p, int64_t r0, int64_t r1);
void bf16_avx2_gemm(const void *p, int64_t r0, int64_t r1);  /* prompts: from GEMM_BF16_MIN_T tokens */
void q8_avx2(const void *p, int64_t r0, int64_t r1);
void q8_avxvnni(const void *p, int64_t r0, int64_t r1);
void q8_vnni(const void *p, int64_t r0, int64_t r1);
void mxfp4_q8act_avx2(const void *p, int64_t r0, int64_t r1);  /* x86_q8_prompts.c */
void mxfp4_q8act_avxvnni(const void *p, int64_t r0, int64_t r1);
void mxfp4_q8act_vnni(const void *p, int64_t r0, int64_t r1);
void mxfp4_avx512bf16(const void *p, int64_t r0, int64_t r1);  /* xb in permuted_pos's order */
void mxfp4_avx512bf16_gemm(const void *p, int64_t r0, int64_t r1);
void bf16_avx512bf16(const void *p, int64_t r0, int64_t r1);
void bf16_avx512bf16_t1(const void *p, int64_t r0, int64_t r1);
float dot_avx2(const attn_job_t *a, const float *q, int64_t off);
void axpy_avx2(const attn_job_t *a, float *o, float p, int64_t off);
void attn_kv_heads_avx2(const void *p, int64_t u0, int64_t u1);  /* decoding, D % 8 == 0, D <= 128 */
void attn_prefill_avx2(const void *p, int64_t u0, int64_t u1);  /* prompts, D % 32 == 0; units: ATTN_PQ queries of a KV head */
void attention_setup(attn_job_t *a, int64_t n);
void attn_groups_avx512(const void *p, int64_t u0, int64_t u1);
void attn_kv_heads_avx512(const void *p, int64_t u0, int64_t u1);
void attn_groups_prefill_avx512(const void *p, int64_t u0, int64_t u1);
void read_part_avx2(const void *ctx, int64_t b, int64_t e);
int scales_fold(const job_t *j, int64_t r0, int64_t r1);  /* MXFP4 scales a panel can fold in */
#endif
#ifdef OSSIE_NEON
void mxfp4_neon(const void *p, int64_t r0, int64_t r1);
void bf16_neon(const void *p, int64_t r0, int64_t r1);
void bf16_neon_gemm(const void *p, int64_t r0, int64_t r1);  /* prompts: from GEMM_BF16_MIN_T tokens */
void bf16_bfmmla_gemm(const void *p, int64_t r0, int64_t r1);  /* the same with BFMMLA (has_arm_bf16), x holding bf16 values */
void q8_neon(const void *p, int64_t r0, int64_t r1);
void q8_dotprod(const void *p, int64_t r0, int64_t r1);
void mxfp4_q8act_neon(const void *p, int64_t r0, int64_t r1);  /* the q8 mode's prompt experts */
void mxfp4_q8act_dotprod(const void *p, int64_t r0, int64_t r1);
void mxfp4_q8act_i8mm(const void *p, int64_t r0, int64_t r1);
float dot_neon(const attn_job_t *a, const float *q, int64_t off);
void axpy_neon(const attn_job_t *a, float *o, float p, int64_t off);
void attn_prefill_neon(const void *p, int64_t u0, int64_t u1);  /* prompts, D % 32 == 0; units: ATTN_PQ queries of a KV head */
#endif

#endif
