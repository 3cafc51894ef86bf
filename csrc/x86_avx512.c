/* ossie's AVX-512 BF16 kernels (Zen 4/5, Sapphire Rapids and later): MXFP4 and bf16 products on vdpbf16ps, the
 * MXFP4 panel GEMM for prompts, and attention taking a KV head's query heads together (decoding and prefill). */
#include "internal.h"
#ifdef OSSIE_X86
#include <immintrin.h>

/* as x86_avx2.c's: a vector's 8 floats summed */
__attribute__((target("avx2,fma,f16c"))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s)); s = _mm_add_ss(s, _mm_movehdup_ps(s)); return _mm_cvtss_f32(s);
}

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
__attribute__((target(AVX512BF16))) void mxfp4_avx512bf16(const void *p, int64_t r0, int64_t r1) {
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
#define GRG 4           /* row groups of 16 per panel (64 rows: 368 KB of bf16 at 2,880 columns, in L2) */
#define GT 6            /* tokens per tile: GRG x GT = 24 accumulators, GRG weight vectors, one broadcast of x */
#define GROWS (16 * GRG)


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

__attribute__((target(AVX512BF16))) void mxfp4_avx512bf16_gemm(const void *p, int64_t r0, int64_t r1) {
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

__attribute__((target(AVX512BF16))) void bf16_avx512bf16(const void *p, int64_t r0, int64_t r1) {
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
__attribute__((target(AVX512BF16))) void bf16_avx512bf16_t1(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p;
    for (int64_t o = r0; o < r1; o++) bf16_tile(j, o, 0, 1);
}

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
__attribute__((target(AVX512BF16))) void attn_groups_avx512(const void *p, int64_t u0, int64_t u1) {
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
__attribute__((target(AVX512BF16))) void attn_kv_heads_avx512(const void *p, int64_t u0, int64_t u1) {
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
__attribute__((target(AVX512BF16))) void attn_groups_prefill_avx512(const void *p, int64_t u0, int64_t u1) {
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
void attention_setup(attn_job_t *a, int64_t n) {
    const uint32_t *bits = (const uint32_t *)a->q;
    int q_bf16 = 1;
    for (int64_t i = 0; i < n * a->D && q_bf16; i++) q_bf16 = (bits[i] & 0xffff) == 0;
    a->pairs = a->bf16 && q_bf16;
    a->group = (a->pairs || a->q8) && (a->H / a->KV) % 8 == 0 ? 8 : 4;
}

#endif
