/* The q8 mode's prompts on x86: MXFP4 experts on int8 dot products.
 *
 * A prompt's expert products are compute-bound: each expert's rows are read once for all the tokens that chose it.
 * In float32 (the exact mode's panel and tile kernels) a product costs an FMA per 8 multiply-adds, plus the MXFP4
 * decoding; on AVX2 without AVX-512 that held a 64-token prompt near llama.cpp's own speed. Here, as llama.cpp
 * computes its MXFP4 x q8_0 products, each token's activations are rounded to int8 for each 32 values (with the
 * scale amax / 127, round_act32), and the weights' doubled e2m1 codes (-12..12, exact) multiply them in integers.
 *
 * Layout: 8 rows at a time, one per 32-bit lane. A group (32 inputs) of the 8 rows is decoded once into 8 vectors,
 * vector q holding in lane r the 4 codes of row r at positions 4q..4q+3 of the group's order (the 16 even inputs, then
 * the 16 odd ones: the low and high nibbles, looked up in one vpshufb); a token's 4 activations at those positions
 * are broadcast to every lane, and one vpdpbusd (AVX-VNNI, AVX-512 VNNI), or vpmaddubsw + vpmaddwd (AVX2), adds the
 * 4 products into each row's lane. So a group costs 8 dot products for 8 rows and a token, and one conversion, one
 * multiply and one FMA by the scales, where float32 took 32 FMAs. vpmaddubsw and vpdpbusd take one operand unsigned:
 * the panel holds code + 12 (0..24), and 12 times the sum of the token's 32 rounded values (xc) comes off each
 * group's integer sum. On AVX2 a 16-bit lane holds 2 products of at most 24 x 127: 4 of them (8 products) are
 * summed in 16 bits before vpmaddwd widens them. Decoding the panel (one vpshufb a row and group, then an 8 x 8
 * transpose) is done once for all of an expert's tokens: at 8 tokens an expert (a 64-token prompt) it is still
 * about half of the work.
 *
 * A (row, token) sum is exact in integers within a group, then one chain over the groups in order: acc = fma(sum,
 * scale / 2 * x scale, acc). mxfp4_q8act_scalar (kernels.c) repeats it, and every path gives the same numbers, bit
 * for bit, whatever the token count (a token gets alone what it gets in a prompt). */
#include "internal.h"
#ifdef OSSIE_X86
#include "x86_avx2.h"

#define QG 16  /* groups a panel holds: 8 rows x 512 inputs, 4 KiB of codes (L1) */
#define QT 4   /* tokens a tile: their accumulators and sums stay in registers */
#ifndef PANELS_AHEAD
#define PANELS_AHEAD 2
#endif

typedef struct {
    __m256i w[QG][8];  /* group, quad: lane r = row r's 4 codes + 12 at the quad's positions */
    __m256 ws[QG];     /* lane r: row r's scale / 2 (the codes are doubled) */
} q8_panel;


/* groups g0..g0+ng of rows o..o+nr (zero rows past nr) into the panel */
__attribute__((target(AVX2))) static void q8_panel_fill(const job_t *j, int64_t o, int nr, int64_t g0, int ng,
                                                        q8_panel *P) {
    /* FP4_X2 + 12: the codes as the unsigned operand */
    const __m256i lut = _mm256_add_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)FP4_X2)),
                                        _mm256_set1_epi8(12));
    const __m256i nibble = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4), low4 = _mm256_set1_epi8(0x0f);
    int64_t G = j->in / 32;
    /* the panel after next's bytes, fetched while this one decodes (these rows' next groups, or the next 8 rows') */
    int64_t chunks = (G + QG - 1) / QG, c = g0 / QG + PANELS_AHEAD, nrow = o + 8 * (c / chunks), ng0 = (c % chunks) * QG;
    for (int i = 0; i < 8; i++) {
        const uint8_t *nb = j->blocks + ((nrow + i) * G + ng0) * 16;
        for (int c = 0; c < QG * 16; c += 64) PREFETCH_W(nb + c);
        PREFETCH_W(j->scales + (nrow + i) * G + ng0);
    }
    /* the scale bytes, group by group: [group][row] (rows past nr: 127, any normal value) */
    uint8_t sc[QG][8]; int edge = 0;
    for (int i = 0; i < 8; i++)
        for (int gi = 0; gi < ng; gi++) {
            uint8_t e = i < nr ? j->scales[(o + i) * G + g0 + gi] : 127;
            sc[gi][i] = e; edge |= e < 2 || e > 254;
        }
    for (int gi = 0; gi < ng; gi++) {
        int64_t g = g0 + gi;
        __m256 r[8];
        for (int i = 0; i < 8; i++) {  /* the 16 bytes in both lanes: the low nibbles in lane 0, the high ones in lane 1 */
            __m256i b = i < nr ? _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(j->blocks + ((o + i) * G + g) * 16)))
                               : _mm256_setzero_si256();  /* a row past nr: its results are dropped */
            r[i] = _mm256_castsi256_ps(_mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srlv_epi32(b, nibble), low4)));
        }
        transpose8(r);  /* the 8 rows' quad q into one vector, row i in lane i */
        for (int q = 0; q < 8; q++) P->w[gi][q] = _mm256_castps_si256(r[q]);
        /* E8M0 byte e is 2^(e - 127), and / 2: float bits (e - 1) << 23 while that is a normal float (e = 2..254;
         * SCALE's table else: subnormal, infinite) */
        __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)sc[gi]));
        P->ws[gi] = edge ? _mm256_mul_ps(_mm256_i32gather_ps(SCALE, e, 4), _mm256_set1_ps(0.5f))
                         : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23));
    }
}

/* one group's integer sums for NT tokens: ai[t] lane r = the sum of x x (code + 12) over the group, row r. Each quad's
 * codes are loaded once for the NT tokens (loads, not arithmetic, were what a token's group waited on). AVX2: each
 * half group's 8 products per lane in 16 bits (at most 4 x 2 x 24 x 127 = 24,384), then widened */
#define X4(xq, in, t, q) _mm256_set1_epi32(*(const int32_t *)((xq) + (t) * (in) + 4 * (q)))
#define GROUP_SUMS_AVX2(P, gi, xq, in, ai, NT)                                                                   \
    {                                                                                                            \
        __m256i s[QT];                                                                                           \
        for (int t = 0; t < NT; t++) ai[t] = _mm256_setzero_si256();                                             \
        for (int h = 0; h < 2; h++) {                                                                            \
            for (int t = 0; t < NT; t++) s[t] = _mm256_setzero_si256();                                          \
            for (int q = 4 * h; q < 4 * h + 4; q++) {                                                            \
                __m256i w = (P)->w[gi][q];                                                                       \
                for (int t = 0; t < NT; t++) s[t] = _mm256_add_epi16(s[t], _mm256_maddubs_epi16(w, X4(xq, in, t, q))); \
            }                                                                                                    \
            for (int t = 0; t < NT; t++) ai[t] = _mm256_add_epi32(ai[t], _mm256_madd_epi16(s[t], _mm256_set1_epi16(1))); \
        }                                                                                                        \
    }

#define GROUP_SUMS_VNNI(P, gi, xq, in, ai, NT, DPBUSD)                                                           \
    {                                                                                                            \
        for (int t = 0; t < NT; t++) ai[t] = _mm256_setzero_si256();                                             \
        for (int q = 0; q < 8; q++) {                                                                            \
            __m256i w = (P)->w[gi][q];                                                                           \
            for (int t = 0; t < NT; t++) ai[t] = DPBUSD(ai[t], w, X4(xq, in, t, q));                             \
        }                                                                                                        \
    }

#define SUMS_AVX2(P, gi, xq, in, ai, NT) GROUP_SUMS_AVX2(P, gi, xq, in, ai, NT)
#define SUMS_AVXVNNI(P, gi, xq, in, ai, NT) GROUP_SUMS_VNNI(P, gi, xq, in, ai, NT, _mm256_dpbusd_avx_epi32)
#define SUMS_VNNI(P, gi, xq, in, ai, NT) GROUP_SUMS_VNNI(P, gi, xq, in, ai, NT, _mm256_dpbusd_epi32)

/* The kernel for one instruction set: NAME (rows r0..r1 of the job), its tile (NT tokens over a panel) and SUMS. */
#define Q8_PROMPT_KERNEL(NAME, TARGET, SUMS)                                                                     \
    __attribute__((target(TARGET), always_inline)) static inline void NAME##_tile(                               \
        const q8_panel *P, int ng, const job_t *j, int64_t t0, int64_t g0, float *sums, const int NT) {          \
        int64_t in = j->in, G = in / 32;                                                                         \
        __m256 acc[QT]; __m256i ai[QT];                                                                          \
        for (int t = 0; t < NT; t++) acc[t] = _mm256_loadu_ps(sums + 8 * t);                                     \
        for (int gi = 0; gi < ng; gi++) {                                                                        \
            const int8_t *xq = j->xq + t0 * in + (g0 + gi) * 32;                                                 \
            SUMS(P, gi, xq, in, ai, NT)                                                                          \
            for (int t = 0; t < NT; t++) {                                                                       \
                int64_t tg = (t0 + t) * G + g0 + gi;                                                             \
                __m256 s = _mm256_mul_ps(P->ws[gi], _mm256_set1_ps(j->xs[tg]));                                  \
                __m256i d = _mm256_sub_epi32(ai[t], _mm256_set1_epi32(j->xc[tg]));  /* the codes' + 12 off */    \
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc[t]);                                      \
            }                                                                                                    \
        }                                                                                                        \
        for (int t = 0; t < NT; t++) _mm256_storeu_ps(sums + 8 * t, acc[t]);                                     \
    }                                                                                                            \
    __attribute__((target(TARGET))) void NAME(const void *p, int64_t r0, int64_t r1) {                           \
        const job_t *j = p; int64_t G = j->in / 32;                                                              \
        q8_panel *P = aligned_alloc(32, sizeof(q8_panel)); float *sums = malloc(sizeof(float) * 8 * j->T);       \
        if (!P || !sums) { free(P); free(sums); mxfp4_q8act_scalar(p, r0, r1); return; }  /* the same numbers */ \
        for (int64_t o = r0; o < r1; o += 8) {                                                                   \
            int nr = r1 - o < 8 ? (int)(r1 - o) : 8;                                                             \
            memset(sums, 0, sizeof(float) * 8 * j->T);                                                           \
            for (int64_t g0 = 0; g0 < G; g0 += QG) {                                                             \
                int ng = G - g0 < QG ? (int)(G - g0) : QG;                                                       \
                q8_panel_fill(j, o, nr, g0, ng, P);                                                              \
                for (int64_t t0 = 0; t0 < j->T; t0 += QT)                                                        \
                    switch (j->T - t0 < QT ? j->T - t0 : QT) {                                                   \
                    case 1: NAME##_tile(P, ng, j, t0, g0, sums + 8 * t0, 1); break;                              \
                    case 2: NAME##_tile(P, ng, j, t0, g0, sums + 8 * t0, 2); break;                              \
                    case 3: NAME##_tile(P, ng, j, t0, g0, sums + 8 * t0, 3); break;                              \
                    default: NAME##_tile(P, ng, j, t0, g0, sums + 8 * t0, QT); break;                            \
                    }                                                                                            \
            }                                                                                                    \
            for (int64_t t = 0; t < j->T; t++)                                                                   \
                for (int r = 0; r < nr; r++)                                                                     \
                    j->y[t * j->out + o + r] = sums[8 * t + r] + (j->bias ? j->bias[o + r] : 0.f);               \
        }                                                                                                        \
        free(P); free(sums);                                                                                     \
    }

Q8_PROMPT_KERNEL(mxfp4_q8act_avx2, AVX2, SUMS_AVX2)
Q8_PROMPT_KERNEL(mxfp4_q8act_avxvnni, AVX2 ",avxvnni", SUMS_AVXVNNI)
Q8_PROMPT_KERNEL(mxfp4_q8act_vnni, AVX2 ",avx512f,avx512vl,avx512vnni", SUMS_VNNI)

#endif
