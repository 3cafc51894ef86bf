/* ossie's ARM64 kernels: Advanced SIMD (every ARMv8-A CPU), SDOT (dotprod: Cortex-A76 and later, Apple M1 and
 * later, Snapdragon X, Graviton 2 and later) for the q8 products, and SMMLA (i8mm) for the q8 mode's prompts. Each repeats the scalar kernel's operations in
 * kernels.c one for one (the same lanes, the same fused multiply-adds, the same order of the final adds), so each
 * path gives the scalar path's numbers bit for bit: csrc/tests/qemu.sh checks it under emulation for CPUs with and
 * without each extension. The q8 products' integer sums and float steps are also those of the x86 kernels: a q8
 * model gives the same numbers on ARM as on x86. */
#include "internal.h"
#ifdef OSSIE_NEON
#include "neon.h"

#if defined(__clang__)
#define DOTPROD __attribute__((target("dotprod")))
#define I8MM __attribute__((target("dotprod,i8mm")))
#define BF16 __attribute__((target("bf16")))
#else
#define DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#define I8MM __attribute__((target("arch=armv8.2-a+dotprod+i8mm")))
#define BF16 __attribute__((target("arch=armv8.2-a+bf16")))
#endif

/* ---- MXFP4: a group's 32 codes as floats in natural order --------------------------------------------------
 * Each code looks up the high and low bytes of its value's bf16 bits (tbl), the bytes interleave into bf16 words
 * (zip), and a bf16 word shifted left by 16 is the float: exact, no conversion instruction. */
static const uint8_t FP4_HI[16] = {0x00, 0x3f, 0x3f, 0x3f, 0x40, 0x40, 0x40, 0x40,
                                   0x80, 0xbf, 0xbf, 0xbf, 0xc0, 0xc0, 0xc0, 0xc0};
static const uint8_t FP4_LO[16] = {0x00, 0x00, 0x80, 0xc0, 0x00, 0x40, 0x80, 0xc0,
                                   0x00, 0x00, 0x80, 0xc0, 0x00, 0x40, 0x80, 0xc0};

static inline void decode_group(const uint8_t *blk, uint8x16_t hi_t, uint8x16_t lo_t, float32x4_t w[8]) {
    uint8x16_t b = vld1q_u8(blk);
    uint8x16_t even = vandq_u8(b, vdupq_n_u8(0x0f)), odd = vshrq_n_u8(b, 4);
    uint8x16_t codes[2] = {vzip1q_u8(even, odd), vzip2q_u8(even, odd)};  /* elements 0-15, 16-31 */
    for (int c = 0; c < 2; c++) {
        uint8x16_t hi = vqtbl1q_u8(hi_t, codes[c]), lo = vqtbl1q_u8(lo_t, codes[c]);
        uint16x8_t words[2] = {vreinterpretq_u16_u8(vzip1q_u8(lo, hi)), vreinterpretq_u16_u8(vzip2q_u8(lo, hi))};
        for (int h = 0; h < 2; h++) {
            w[4 * c + 2 * h] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(words[h]), 16));
            w[4 * c + 2 * h + 1] = vreinterpretq_f32_u32(vshll_high_n_u16(words[h], 16));
        }
    }
}

/* one row o against nt (<= TT) tokens from t0: the group decoded once for them all */
static inline void mxfp4_tile_neon(const job_t *j, int64_t o, int64_t t0, int nt) {
    int64_t G = j->in / 32;
    const uint8_t *blk = j->blocks + o * G * 16, *sc = j->scales + o * G;
    const uint8x16_t hi_t = vld1q_u8(FP4_HI), lo_t = vld1q_u8(FP4_LO);
    float32x4_t acc[TT], w[8];
    for (int t = 0; t < nt; t++) acc[t] = vdupq_n_f32(0.f);
    for (int64_t g = 0; g < G; g++) {
        PREFETCH_W(blk + g * 16 + PF_DIST);
        decode_group(blk + g * 16, hi_t, lo_t, w);
        float32x4_t s = vdupq_n_f32(SCALE[sc[g]]);
        for (int t = 0; t < nt; t++) {
            const float *x = j->x + (t0 + t) * j->in + g * 32;
            float32x4_t part = vmulq_f32(w[0], vld1q_f32(x));
            for (int v = 1; v < 8; v++) part = vfmaq_f32(part, w[v], vld1q_f32(x + 4 * v));
            acc[t] = vfmaq_f32(acc[t], part, s);
        }
    }
    for (int t = 0; t < nt; t++) j->y[(t0 + t) * j->out + o] = hsum4q(acc[t]) + (j->bias ? j->bias[o] : 0.f);
}

void mxfp4_neon(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p;
    for (int64_t o = r0; o < r1; o++) {
        prefetch_bytes(j->scales + (o + PF_ROWS) * (j->in / 32), j->in / 32);
        for (int64_t t0 = 0; t0 < j->T; t0 += TT) mxfp4_tile_neon(j, o, t0, j->T - t0 < TT ? (int)(j->T - t0) : TT);
    }
}

/* ---- bf16: four rows at a time (four chains of FMAs), each (row, token) sum one chain over the row ----------- */

void bf16_neon(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p; int64_t in = j->in;
    for (int64_t o = r0; o < r1; o += 4) {
        int R = r1 - o < 4 ? (int)(r1 - o) : 4;
        for (int64_t t = 0; t < j->T; t++) {
            const float *x = j->x + t * in;
            float32x4_t acc[4] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
            for (int64_t i = 0; i < in; i += 4) {
                if (t == 0 && (i & 31) == 0)
                    for (int r = 0; r < R; r++) PREFETCH_W(j->w16 + (o + r) * in + i + PF_DIST / 2);
                float32x4_t xv = vld1q_f32(x + i);
                for (int r = 0; r < R; r++) acc[r] = vfmaq_f32(acc[r], bf16x4(j->w16 + (o + r) * in + i), xv);
            }
            for (int r = 0; r < R; r++) j->y[t * j->out + o + r] = hsum4q(acc[r]) + (j->bias ? j->bias[o + r] : 0.f);
        }
    }
}

/* ---- q8: a group's 32 products summed exactly, 4 to a lane in 8 lanes (two int32x4) ------------------------- */
static inline int32x4_t dot16_neon(int8x16_t w, int8x16_t x) {  /* lane k: bytes 4k..4k+3 */
    int32x4_t lo = vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(x)));
    int32x4_t hi = vpaddlq_s16(vmull_high_s8(w, x));
    return vpaddq_s32(lo, hi);
}

DOTPROD static inline int32x4_t dot16_dotprod(int8x16_t w, int8x16_t x) { return vdotq_s32(vdupq_n_s32(0), w, x); }

/* q8_scalar's steps: each lane times the two scales into one of two chains (even and odd groups), the chains added,
 * then the lanes as hsum256 adds them */
#define Q8_NEON_KERNEL(NAME, ATTR, DOT)                                                                       \
    ATTR void NAME(const void *p, int64_t r0, int64_t r1) {                                                   \
        const job_t *j = p; int64_t G = j->in / 32;                                                           \
        const int8_t *w = (const int8_t *)j->blocks; const uint16_t *sc = (const uint16_t *)j->scales;        \
        for (int64_t o = r0; o < r1; o++) {                                                                   \
            prefetch_bytes(sc + (o + PF_ROWS) * G, 2 * G);                                                    \
            const int8_t *row = w + o * j->in;                                                                \
            for (int64_t t = 0; t < j->T; t++) {                                                              \
                float32x4_t acc[2][2] = {{vdupq_n_f32(0.f), vdupq_n_f32(0.f)}, {vdupq_n_f32(0.f), vdupq_n_f32(0.f)}}; \
                for (int64_t g = 0; g < G; g++) {                                                             \
                    if (t == 0) PREFETCH_W(row + g * 32 + PF_DIST);                                           \
                    const int8_t *xq = j->xq + (t * G + g) * 32;                                              \
                    int32x4_t d0 = DOT(vld1q_s8(row + g * 32), vld1q_s8(xq));                                 \
                    int32x4_t d1 = DOT(vld1q_s8(row + g * 32 + 16), vld1q_s8(xq + 16));                       \
                    float32x4_t s = vdupq_n_f32(half_to_f32(sc[o * G + g]) * j->xs[t * G + g]);               \
                    acc[g & 1][0] = vfmaq_f32(acc[g & 1][0], vcvtq_f32_s32(d0), s);                           \
                    acc[g & 1][1] = vfmaq_f32(acc[g & 1][1], vcvtq_f32_s32(d1), s);                           \
                }                                                                                             \
                float32x4_t h = vaddq_f32(vaddq_f32(acc[0][0], acc[1][0]), vaddq_f32(acc[0][1], acc[1][1]));  \
                j->y[t * j->out + o] = hsum4q(h) + (j->bias ? j->bias[o] : 0.f);                              \
            }                                                                                                 \
        }                                                                                                     \
    }

Q8_NEON_KERNEL(q8_neon, , dot16_neon)
Q8_NEON_KERNEL(q8_dotprod, DOTPROD, dot16_dotprod)

/* ---- the q8 mode's prompt experts: MXFP4 on x rounded to int8 (x86_q8_prompts.c's scheme, 4 rows a vector) ----
 * 4 rows of an expert decoded once per group for all its tokens: each row's codes (doubled, -12..12) looked up
 * signed (tbl), its 16 even inputs and 16 odd ones (the order round_act32_q8p lays x in), then a 4 x 4 transpose of
 * 32-bit lanes, so that lane r holds row r's 4 codes at a quad of the group. A token's 4 values at that quad go to
 * every lane and one SDOT (or the 8-bit multiplies and pairwise adds of dot16_neon) adds their products into each
 * row's lane: the exact integer sum of the group, then mxfp4_q8act_scalar's float steps (its bits). */
#define QG_NEON 16  /* groups a panel holds */
#define QT_NEON 4   /* tokens a tile */

typedef struct { int32x4_t w[QG_NEON][8]; float32x4_t ws[QG_NEON]; } q8_panel_neon;

/* groups g0..g0+ng of rows o..o+nr (zero rows past nr) */
static void q8_panel_fill_neon(const job_t *j, int64_t o, int nr, int64_t g0, int ng, q8_panel_neon *P) {
    const int8x16_t lut = vld1q_s8(FP4_X2);
    int64_t G = j->in / 32;
    for (int gi = 0; gi < ng; gi++) {
        int32x4_t ev[4], od[4]; float ws[4];
        for (int i = 0; i < 4; i++) {
            uint8x16_t b = i < nr ? vld1q_u8(j->blocks + ((o + i) * G + g0 + gi) * 16) : vdupq_n_u8(0);
            ev[i] = vreinterpretq_s32_s8(vqtbl1q_s8(lut, vandq_u8(b, vdupq_n_u8(0x0f))));
            od[i] = vreinterpretq_s32_s8(vqtbl1q_s8(lut, vshrq_n_u8(b, 4)));
            ws[i] = i < nr ? SCALE[j->scales[(o + i) * G + g0 + gi]] * 0.5f : 0.f;
        }
        transpose4(ev); transpose4(od);
        for (int q = 0; q < 4; q++) { P->w[gi][q] = ev[q]; P->w[gi][4 + q] = od[q]; }
        P->ws[gi] = vld1q_f32(ws);
    }
}

static inline int32x4_t dot_acc_neon(int32x4_t acc, int32x4_t w, int32x4_t x) {
    return vaddq_s32(acc, dot16_neon(vreinterpretq_s8_s32(w), vreinterpretq_s8_s32(x)));
}
DOTPROD static inline int32x4_t dot_acc_dotprod(int32x4_t acc, int32x4_t w, int32x4_t x) {
    return vdotq_s32(acc, vreinterpretq_s8_s32(w), vreinterpretq_s8_s32(x));
}

#define Q8_PROMPT_NEON(NAME, ATTR, DOT_ACC)                                                                   \
    ATTR static inline void NAME##_tile(const q8_panel_neon *P, int ng, const job_t *j, int64_t t0, int nt,    \
                                        int64_t g0, float *sums) {                                            \
        int64_t in = j->in, G = in / 32;                                                                      \
        float32x4_t acc[QT_NEON];                                                                             \
        for (int t = 0; t < nt; t++) acc[t] = vld1q_f32(sums + 4 * t);                                        \
        for (int gi = 0; gi < ng; gi++)                                                                       \
            for (int t = 0; t < nt; t++) {                                                                    \
                const int8_t *xq = j->xq + (t0 + t) * in + (g0 + gi) * 32;                                    \
                int32x4_t ai = vdupq_n_s32(0);                                                                \
                for (int q = 0; q < 8; q++) {                                                                 \
                    int32_t a; memcpy(&a, xq + 4 * q, 4);                                                     \
                    ai = DOT_ACC(ai, P->w[gi][q], vdupq_n_s32(a));                                            \
                }                                                                                             \
                float32x4_t s = vmulq_n_f32(P->ws[gi], j->xs[(t0 + t) * G + g0 + gi]);                       \
                acc[t] = vfmaq_f32(acc[t], vcvtq_f32_s32(ai), s);                                             \
            }                                                                                                 \
        for (int t = 0; t < nt; t++) vst1q_f32(sums + 4 * t, acc[t]);                                         \
    }                                                                                                         \
    ATTR void NAME(const void *p, int64_t r0, int64_t r1) {                                                   \
        const job_t *j = p; int64_t G = j->in / 32;                                                           \
        q8_panel_neon *P = malloc(sizeof(q8_panel_neon)); float *sums = malloc(sizeof(float) * 4 * j->T);     \
        if (!P || !sums) { free(P); free(sums); mxfp4_q8act_scalar(p, r0, r1); return; }  /* the same numbers */ \
        for (int64_t o = r0; o < r1; o += 4) {                                                                \
            int nr = r1 - o < 4 ? (int)(r1 - o) : 4;                                                          \
            memset(sums, 0, sizeof(float) * 4 * j->T);                                                        \
            for (int64_t g0 = 0; g0 < G; g0 += QG_NEON) {                                                     \
                int ng = G - g0 < QG_NEON ? (int)(G - g0) : QG_NEON;                                          \
                q8_panel_fill_neon(j, o, nr, g0, ng, P);                                                      \
                for (int64_t t0 = 0; t0 < j->T; t0 += QT_NEON)                                                \
                    NAME##_tile(P, ng, j, t0, j->T - t0 < QT_NEON ? (int)(j->T - t0) : QT_NEON, g0, sums + 4 * t0); \
            }                                                                                                 \
            for (int64_t t = 0; t < j->T; t++)                                                                \
                for (int r = 0; r < nr; r++)                                                                  \
                    j->y[t * j->out + o + r] = sums[4 * t + r] + (j->bias ? j->bias[o + r] : 0.f);            \
        }                                                                                                     \
        free(P); free(sums);                                                                                  \
    }

Q8_PROMPT_NEON(mxfp4_q8act_neon, , dot_acc_neon)
Q8_PROMPT_NEON(mxfp4_q8act_dotprod, DOTPROD, dot_acc_dotprod)

/* ---- bf16 for a prompt's rows (from GEMM_BF16_MIN_T): x86_avx2.c's panel GEMM on NEON -------------------------
 * One token's bf16 products reread the weights per token and sum in 4 lanes (bf16_neon); a prompt's take 16 rows
 * converted once into a float32 panel, k-major (the 16 rows' values for each input side by side: four vectors),
 * NPB_K inputs at a time (16 KiB, in L1), against tiles of 6 tokens: 24 accumulators, per input four loads of the
 * panel, one of each token's x and 24 FMAs, no horizontal sums. Each (row, token) sum is one chain per panel block,
 * the blocks added in order: the same whatever the token count, so a prompt's rows get the same sums however the
 * prompt is cut into chunks (not the one-token kernel's: prompts only, as on x86). */
#define NPB_K 256
#define NPT 6

/* rows o..o+nr (16 with zero rows past nr) of the bf16 weight, inputs k0..k0+kn (kn a multiple of 4), as a panel */
static void bf16_panel_neon(const job_t *j, int64_t o, int nr, int64_t k0, int64_t kn, float *panel) {
    static const uint16_t zeros[4] = {0};
    for (int64_t k = 0; k < kn; k += 4)
        for (int q = 0; q < 4; q++) {  /* rows 4q..4q+3 */
            int32x4_t r[4];
            for (int i = 0; i < 4; i++) {
                int row = 4 * q + i;
                const uint16_t *src = row < nr ? j->w16 + (o + row) * j->in + k0 + k : zeros;
                r[i] = vreinterpretq_s32_u32(vshll_n_u16(vld1_u16(src), 16));
            }
            transpose4(r);  /* r[c]: the 4 rows' values at input k + c */
            for (int c = 0; c < 4; c++) vst1q_f32(panel + (k + c) * 16 + 4 * q, vreinterpretq_f32_s32(r[c]));
        }
}

/* NT tokens of x (rows in steps of `in`) over a panel block of kn inputs; adds each sum into sums [NT][16] */
static inline void panel_tile_neon(const float *panel, int64_t kn, const float *x, int64_t in, float *sums,
                                   const int NT) {
    float32x4_t a[NPT][4];
    for (int t = 0; t < NT; t++)
        for (int i = 0; i < 4; i++) a[t][i] = vdupq_n_f32(0.f);
    for (int64_t k = 0; k < kn; k++) {
        float32x4_t w[4];
        for (int i = 0; i < 4; i++) w[i] = vld1q_f32(panel + 16 * k + 4 * i);
        for (int t = 0; t < NT; t++) {
            float xb = x[t * in + k];
            for (int i = 0; i < 4; i++) a[t][i] = vfmaq_n_f32(a[t][i], w[i], xb);
        }
    }
    for (int t = 0; t < NT; t++)
        for (int i = 0; i < 4; i++) vst1q_f32(sums + 16 * t + 4 * i, vaddq_f32(vld1q_f32(sums + 16 * t + 4 * i), a[t][i]));
}

void bf16_neon_gemm(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p; int64_t in = j->in, T = j->T;
    float *panel = malloc(sizeof(float) * 16 * NPB_K), *sums = malloc(sizeof(float) * 16 * T);
    if (!panel || !sums) { free(panel); free(sums); bf16_neon(p, r0, r1); return; }  /* the tile kernel needs no room */
    for (int64_t o = r0; o < r1; o += 16) {
        int nr = r1 - o < 16 ? (int)(r1 - o) : 16;
        memset(sums, 0, sizeof(float) * 16 * T);
        for (int64_t k0 = 0; k0 < in; k0 += NPB_K) {
            int64_t kn = in - k0 < NPB_K ? in - k0 : NPB_K;
            for (int i = 0; i < nr; i++) prefetch_bytes(j->w16 + (o + i) * in + k0 + NPB_K, 2 * NPB_K);  /* the next block */
            bf16_panel_neon(j, o, nr, k0, kn, panel);
            for (int64_t t0 = 0; t0 < T; t0 += NPT) {
                const float *x = j->x + t0 * in + k0; float *s = sums + 16 * t0;
                switch (T - t0 < NPT ? T - t0 : NPT) {
                case 1: panel_tile_neon(panel, kn, x, in, s, 1); break;
                case 2: panel_tile_neon(panel, kn, x, in, s, 2); break;
                case 3: panel_tile_neon(panel, kn, x, in, s, 3); break;
                case 4: panel_tile_neon(panel, kn, x, in, s, 4); break;
                case 5: panel_tile_neon(panel, kn, x, in, s, 5); break;
                default: panel_tile_neon(panel, kn, x, in, s, NPT); break;
                }
            }
        }
        for (int64_t t = 0; t < T; t++)
            for (int r = 0; r < nr; r++) j->y[t * j->out + o + r] = sums[16 * t + r] + (j->bias ? j->bias[o + r] : 0.f);
    }
    free(panel); free(sums);
}

/* ---- the same on BFMMLA (FEAT_BF16: Apple M2 and later, Graviton 3 and later, Cortex-A510/A710 and later) -------
 * One BFMMLA multiplies 2 rows x 4 inputs by 2 tokens x 4 inputs into the 4 sums of the pairs (16 products; an FMA
 * makes 4), reading bf16 as stored: a panel block is each row pair's 4 inputs side by side (no transpose, no
 * conversion), x is rounded to bf16 once per call (exact: a bf16 model's activations are bf16 values) and laid out
 * as token pairs the same way, and a tile takes 16 rows against 4 tokens (16 accumulators). BFMMLA sums its
 * products with round-to-odd and flushes denormals (it ignores the FPCR): each (row, token) sum is one chain per
 * block as in the float32 panel, the same however the prompt is cut, within float32 rounding of the reference. */
#define BQ (NPB_K / 4)  /* input quads a panel block */

/* rows o..o+nr (16 with zero rows past nr), inputs k0..k0+kn: [quad][row pair] of 8 bf16 */
static void bf16_panel_bfmmla(const job_t *j, int64_t o, int nr, int64_t k0, int64_t kn, uint16_t *panel) {
    static const uint16_t zeros[4] = {0};
    for (int p = 0; p < 8; p++) {
        const uint16_t *r0 = 2 * p < nr ? j->w16 + (o + 2 * p) * j->in + k0 : NULL;
        const uint16_t *r1 = 2 * p + 1 < nr ? j->w16 + (o + 2 * p + 1) * j->in + k0 : NULL;
        for (int64_t q = 0; q < kn / 4; q++)
            vst1q_u16(panel + (q * 8 + p) * 8, vcombine_u16(vld1_u16(r0 ? r0 + 4 * q : zeros), vld1_u16(r1 ? r1 + 4 * q : zeros)));
    }
}

/* token pairs tp0, tp0 + 1 (NP of them) against the block; lanes (row 2p, token 2tp), (2p, 2tp + 1), (2p + 1, 2tp),
 * (2p + 1, 2tp + 1) added into sums [token][16] */
BF16 static inline void bfmmla_tile(const uint16_t *panel, int64_t nq, const uint16_t *xb, int64_t quads, int64_t tp0,
                                    int64_t T, float *sums, const int NP) {
    float32x4_t acc[8][2];
    for (int p = 0; p < 8; p++) acc[p][0] = acc[p][1] = vdupq_n_f32(0.f);
    for (int64_t q = 0; q < nq; q++) {
        bfloat16x8_t x[2];
        for (int i = 0; i < NP; i++) x[i] = vreinterpretq_bf16_u16(vld1q_u16(xb + ((tp0 + i) * quads + q) * 8));
        for (int p = 0; p < 8; p++) {
            bfloat16x8_t w = vreinterpretq_bf16_u16(vld1q_u16(panel + (q * 8 + p) * 8));
            for (int i = 0; i < NP; i++) acc[p][i] = vbfmmlaq_f32(acc[p][i], w, x[i]);
        }
    }
    for (int i = 0; i < NP; i++) {
        int64_t t = 2 * (tp0 + i);
        for (int p = 0; p < 8; p++) {
            float v[4];
            vst1q_f32(v, acc[p][i]);
            sums[16 * t + 2 * p] += v[0]; sums[16 * t + 2 * p + 1] += v[2];
            if (t + 1 < T) { sums[16 * (t + 1) + 2 * p] += v[1]; sums[16 * (t + 1) + 2 * p + 1] += v[3]; }
        }
    }
}

BF16 void bf16_bfmmla_gemm(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p; int64_t in = j->in, T = j->T, pairs = (T + 1) / 2, quads = in / 4;
    uint16_t *panel = malloc(sizeof(uint16_t) * 16 * NPB_K), *xb = malloc(sizeof(uint16_t) * pairs * 2 * in);
    float *sums = malloc(sizeof(float) * 16 * 2 * pairs);
    if (!panel || !xb || !sums) { free(panel); free(xb); free(sums); bf16_neon_gemm(p, r0, r1); return; }
    for (int64_t tp = 0; tp < pairs; tp++)  /* x as bf16, [token pair][quad]: token 2tp's 4 inputs, then 2tp + 1's */
        for (int64_t q = 0; q < quads; q++)
            for (int i = 0; i < 2; i++) {
                int64_t t = 2 * tp + i;
                bfloat16x4_t v = vcvt_bf16_f32(t < T ? vld1q_f32(j->x + t * in + 4 * q) : vdupq_n_f32(0.f));
                vst1_u16(xb + (tp * quads + q) * 8 + 4 * i, vreinterpret_u16_bf16(v));
            }
    for (int64_t o = r0; o < r1; o += 16) {
        int nr = r1 - o < 16 ? (int)(r1 - o) : 16;
        memset(sums, 0, sizeof(float) * 16 * 2 * pairs);
        for (int64_t k0 = 0; k0 < in; k0 += NPB_K) {
            int64_t kn = in - k0 < NPB_K ? in - k0 : NPB_K;
            for (int i = 0; i < nr; i++) prefetch_bytes(j->w16 + (o + i) * in + k0 + NPB_K, 2 * NPB_K);  /* the next block */
            bf16_panel_bfmmla(j, o, nr, k0, kn, panel);
            const uint16_t *xq = xb + (k0 / 4) * 8;  /* the block's first quad (rows of xb are `quads` quads long) */
            for (int64_t tp = 0; tp < pairs; tp += 2)
                if (pairs - tp >= 2) bfmmla_tile(panel, kn / 4, xq, quads, tp, T, sums, 2);
                else bfmmla_tile(panel, kn / 4, xq, quads, tp, T, sums, 1);
        }
        for (int64_t t = 0; t < T; t++)
            for (int r = 0; r < nr; r++) j->y[t * j->out + o + r] = sums[16 * t + r] + (j->bias ? j->bias[o + r] : 0.f);
    }
    free(panel); free(xb); free(sums);
}

/* ---- the same on SMMLA (i8mm: Cortex-A510/A710 and later, Apple M2 and later, Graviton 3, Snapdragon X) -------
 * One SMMLA multiplies 2 rows x 8 inputs by 2 tokens x 8 inputs into the 4 sums of the pairs (32 products; SDOT
 * makes 16): a panel holds each group's codes as 2 row pairs x 4 quarters of the group (the q8p order: 16 even
 * inputs, then 16 odd), and a tile takes 4 rows against 2 tokens at a time. Each (row, token) lane then gets the
 * group's exact integer sum and mxfp4_q8act_scalar's float steps: its bits, in the lanes' 2 x 2 order. */
typedef struct { int8x16_t w[QG_NEON][2][4]; float ws[QG_NEON][4]; } q8_panel_i8mm;

static void q8_panel_fill_i8mm(const job_t *j, int64_t o, int nr, int64_t g0, int ng, q8_panel_i8mm *P) {
    const int8x16_t lut = vld1q_s8(FP4_X2);
    int64_t G = j->in / 32;
    for (int gi = 0; gi < ng; gi++) {
        int8x16_t ev[4], od[4];
        for (int i = 0; i < 4; i++) {
            uint8x16_t b = i < nr ? vld1q_u8(j->blocks + ((o + i) * G + g0 + gi) * 16) : vdupq_n_u8(0);
            ev[i] = vqtbl1q_s8(lut, vandq_u8(b, vdupq_n_u8(0x0f)));
            od[i] = vqtbl1q_s8(lut, vshrq_n_u8(b, 4));
            P->ws[gi][i] = i < nr ? SCALE[j->scales[(o + i) * G + g0 + gi]] * 0.5f : 0.f;
        }
        for (int rp = 0; rp < 2; rp++) {
            const int8x16_t a = ev[2 * rp], b = ev[2 * rp + 1], c = od[2 * rp], d = od[2 * rp + 1];
            P->w[gi][rp][0] = vcombine_s8(vget_low_s8(a), vget_low_s8(b));
            P->w[gi][rp][1] = vcombine_s8(vget_high_s8(a), vget_high_s8(b));
            P->w[gi][rp][2] = vcombine_s8(vget_low_s8(c), vget_low_s8(d));
            P->w[gi][rp][3] = vcombine_s8(vget_high_s8(c), vget_high_s8(d));
        }
    }
}

/* tokens t0 and t0 + 1 (alone when two is 0) against the panel's 4 rows: sums [token][4 rows] carried across panels */
I8MM static void q8_tile_i8mm(const q8_panel_i8mm *P, int ng, const job_t *j, int64_t t0, int two, int64_t g0,
                              float *sums) {
    int64_t in = j->in, G = in / 32;
    float32x4_t acc[2];  /* row pair rp: lanes (2rp, t0), (2rp, t0 + 1), (2rp + 1, t0), (2rp + 1, t0 + 1) */
    for (int rp = 0; rp < 2; rp++) {
        float v[4] = {sums[2 * rp], two ? sums[4 + 2 * rp] : 0.f, sums[2 * rp + 1], two ? sums[4 + 2 * rp + 1] : 0.f};
        acc[rp] = vld1q_f32(v);
    }
    for (int gi = 0; gi < ng; gi++) {
        const int8_t *x0 = j->xq + t0 * in + (g0 + gi) * 32, *x1 = x0 + in;
        int32x4_t ai[2] = {vdupq_n_s32(0), vdupq_n_s32(0)};
        for (int q = 0; q < 4; q++) {
            int8x16_t xv = vcombine_s8(vld1_s8(x0 + 8 * q), two ? vld1_s8(x1 + 8 * q) : vdup_n_s8(0));
            ai[0] = vmmlaq_s32(ai[0], P->w[gi][0][q], xv);
            ai[1] = vmmlaq_s32(ai[1], P->w[gi][1][q], xv);
        }
        float xs0 = j->xs[t0 * G + g0 + gi], xs1 = two ? j->xs[(t0 + 1) * G + g0 + gi] : 0.f;
        for (int rp = 0; rp < 2; rp++) {
            const float *ws = P->ws[gi];
            float sv[4] = {ws[2 * rp] * xs0, ws[2 * rp] * xs1, ws[2 * rp + 1] * xs0, ws[2 * rp + 1] * xs1};
            acc[rp] = vfmaq_f32(acc[rp], vcvtq_f32_s32(ai[rp]), vld1q_f32(sv));
        }
    }
    for (int rp = 0; rp < 2; rp++) {
        float v[4];
        vst1q_f32(v, acc[rp]);
        sums[2 * rp] = v[0]; sums[2 * rp + 1] = v[2];
        if (two) { sums[4 + 2 * rp] = v[1]; sums[4 + 2 * rp + 1] = v[3]; }
    }
}

I8MM void mxfp4_q8act_i8mm(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p; int64_t G = j->in / 32;
    q8_panel_i8mm *P = malloc(sizeof(q8_panel_i8mm)); float *sums = malloc(sizeof(float) * 4 * j->T);
    if (!P || !sums) { free(P); free(sums); mxfp4_q8act_scalar(p, r0, r1); return; }  /* the same numbers */
    for (int64_t o = r0; o < r1; o += 4) {
        int nr = r1 - o < 4 ? (int)(r1 - o) : 4;
        memset(sums, 0, sizeof(float) * 4 * j->T);
        for (int64_t g0 = 0; g0 < G; g0 += QG_NEON) {
            int ng = G - g0 < QG_NEON ? (int)(G - g0) : QG_NEON;
            q8_panel_fill_i8mm(j, o, nr, g0, ng, P);
            for (int64_t t0 = 0; t0 < j->T; t0 += 2) q8_tile_i8mm(P, ng, j, t0, t0 + 1 < j->T, g0, sums + 4 * t0);
        }
        for (int64_t t = 0; t < j->T; t++)
            for (int r = 0; r < nr; r++) j->y[t * j->out + o + r] = sums[4 * t + r] + (j->bias ? j->bias[o + r] : 0.f);
    }
    free(P); free(sums);
}

#endif
