/* ossie's AVX2 kernels (with FMA and F16C; AVX-VNNI and AVX-512 VNNI for the q8 products, which share their
 * code): the x86 path of every laptop and desktop without AVX-512 BF16. kernels.c chooses among the paths at run
 * time (choose_path); each kernel is compiled for its own instruction set (target attributes), so one build runs on
 * every x86-64 CPU. */
#include "internal.h"
#ifdef OSSIE_X86
#include "x86_avx2.h"

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
    const __m128i lut = _mm_loadu_si128((const __m128i *)FP4_X2), low4 = _mm_set1_epi8(0x0f);
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
            const float *x = j->xp + (t0 + t) * j->in + g * 32;
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
            const float *x = j->xp + (t0 + t) * j->in + g * 32;
            __m256 part = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
            for (int k = 1; k < 4; k++) part = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(x + 8 * k), part);
            acc[t] = _mm256_fmadd_ps(part, s, acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) j->y[(t0 + t) * j->out + o] = hsum256(acc[t]) + (j->bias ? j->bias[o] : 0.f);
}

/* reads xp: x in permuted_pos_avx2's order */
__attribute__((target(AVX2))) void mxfp4_avx2(const void *p, int64_t r0, int64_t r1) {
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
    __m256 acc[4][8];
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

/* One token: 4 rows a tile. 2 to 4 (a batch's decoding): 2 rows x 4 tokens, which converts each weight vector once
 * for 4 tokens where 4 rows x 2 tokens converted it once for 2 (the conversion is the lane-crossing vpmovzxwd);
 * 5 to 8: 1 row x 8 tokens (measured at 8 tokens: 5.6 GB/s of weights with 2 x 4 tiles, 6.3 with 1 x 8). */
__attribute__((target(AVX2))) void bf16_avx2(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p;
    if (j->T == 1) {
        for (int64_t o = r0; o < r1; o += 4)
            if (o + 4 <= r1) bf16_tile_avx2(j, o, 0, 4, 1);
            else for (int64_t r = o; r < r1; r++) bf16_tile_avx2(j, r, 0, 1, 1);
        return;
    }
    if (j->T > 4) {  /* 5 to 8 tokens (a larger batch's decoding): one row at a time, its vectors used by every token */
        for (int64_t o = r0; o < r1; o++)
            for (int64_t t0 = 0; t0 < j->T; t0 += 8)
                switch (j->T - t0 < 8 ? j->T - t0 : 8) {
                case 1: bf16_tile_avx2(j, o, t0, 1, 1); break;
                case 2: bf16_tile_avx2(j, o, t0, 1, 2); break;
                case 3: bf16_tile_avx2(j, o, t0, 1, 3); break;
                case 4: bf16_tile_avx2(j, o, t0, 1, 4); break;
                case 5: bf16_tile_avx2(j, o, t0, 1, 5); break;
                case 6: bf16_tile_avx2(j, o, t0, 1, 6); break;
                case 7: bf16_tile_avx2(j, o, t0, 1, 7); break;
                default: bf16_tile_avx2(j, o, t0, 1, 8); break;
                }
        return;
    }
    for (int64_t o = r0; o < r1; o += 2)
        for (int64_t t0 = 0; t0 < j->T; t0 += 4) {
            int nt = j->T - t0 < 4 ? (int)(j->T - t0) : 4;
            if (o + 2 <= r1)
                switch (nt) {
                case 1: bf16_tile_avx2(j, o, t0, 2, 1); break;
                case 2: bf16_tile_avx2(j, o, t0, 2, 2); break;
                case 3: bf16_tile_avx2(j, o, t0, 2, 3); break;
                default: bf16_tile_avx2(j, o, t0, 2, 4); break;
                }
            else
                switch (nt) {
                case 1: bf16_tile_avx2(j, o, t0, 1, 1); break;
                case 2: bf16_tile_avx2(j, o, t0, 1, 2); break;
                case 3: bf16_tile_avx2(j, o, t0, 1, 3); break;
                default: bf16_tile_avx2(j, o, t0, 1, 4); break;
                }
        }
}

/* ---- bf16 for many tokens (a prompt's projections): a panel GEMM ---------------------------------------------
 * torch's bf16 GEMM crawls without AVX-512 BF16, and its float32 one needed the weight converted (a copy of every
 * projection on every prompt chunk). Here 16 rows at a time are converted once into a float32 panel, k-major (the
 * 16 rows' values for each input index side by side: two vectors), PB_K input indices at a time (16 KiB, in L1),
 * and tiles of 16 rows x 6 tokens keep 12 accumulators in registers: per input index two loads of the panel, one
 * broadcast of each token's x and 12 FMAs, no horizontal sums. Each (row, token) sum is one chain per panel block,
 * the blocks added in order: the same whatever the token count or the rows beside it, so a prompt's rows get the
 * same sums however the prompt is cut into chunks. */
#define PB_K 256
#define PT 6  /* tokens per tile */

/* rows o..o+nr (16 with zero rows past nr) of the bf16 weight, inputs k0..k0+kn (kn a multiple of 8), as a panel */
__attribute__((target(AVX2))) static void bf16_panel(const job_t *j, int64_t o, int nr, int64_t k0, int64_t kn,
                                                     float *panel) {
    static const uint16_t zeros[8] = {0};
    for (int64_t k = 0; k < kn; k += 8)
        for (int half = 0; half < 2; half++) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) {
                int row = 8 * half + i;
                const uint16_t *src = row < nr ? j->w16 + (o + row) * j->in + k0 + k : zeros;
                r[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)src)), 16));
            }
            transpose8(r);
            for (int c = 0; c < 8; c++) _mm256_store_ps(panel + (k + c) * 16 + 8 * half, r[c]);
        }
}

/* NT tokens from x (rows in steps of `in`) over a panel block of kn inputs; adds each sum into sums [NT][16] */
__attribute__((target(AVX2), always_inline)) static inline void panel_tile_avx2(const float *panel, int64_t kn,
                                                                               const float *x, int64_t in,
                                                                               float *sums, const int NT) {
    __m256 a0[PT], a1[PT];
    for (int t = 0; t < NT; t++) a0[t] = a1[t] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kn; k++) {
        __m256 w0 = _mm256_load_ps(panel + 16 * k), w1 = _mm256_load_ps(panel + 16 * k + 8);
        for (int t = 0; t < NT; t++) {
            __m256 xb = _mm256_broadcast_ss(x + t * in + k);
            a0[t] = _mm256_fmadd_ps(w0, xb, a0[t]);
            a1[t] = _mm256_fmadd_ps(w1, xb, a1[t]);
        }
    }
    for (int t = 0; t < NT; t++) {
        _mm256_storeu_ps(sums + 16 * t, _mm256_add_ps(_mm256_loadu_ps(sums + 16 * t), a0[t]));
        _mm256_storeu_ps(sums + 16 * t + 8, _mm256_add_ps(_mm256_loadu_ps(sums + 16 * t + 8), a1[t]));
    }
}

/* every token of x (rows in steps of `in`) over a panel block, NT at a time */
__attribute__((target(AVX2))) static void panel_tiles(const float *panel, int64_t kn, const float *x, int64_t in,
                                                      int64_t T, float *sums) {
    for (int64_t t0 = 0; t0 < T; t0 += PT) {
        const float *xt = x + t0 * in; float *s = sums + 16 * t0;
        switch (T - t0 < PT ? T - t0 : PT) {
        case 1: panel_tile_avx2(panel, kn, xt, in, s, 1); break;
        case 2: panel_tile_avx2(panel, kn, xt, in, s, 2); break;
        case 3: panel_tile_avx2(panel, kn, xt, in, s, 3); break;
        case 4: panel_tile_avx2(panel, kn, xt, in, s, 4); break;
        case 5: panel_tile_avx2(panel, kn, xt, in, s, 5); break;
        default: panel_tile_avx2(panel, kn, xt, in, s, PT); break;
        }
    }
}

__attribute__((target(AVX2))) void bf16_avx2_gemm(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p; int64_t in = j->in, T = j->T;
    float *panel = aligned_alloc(32, sizeof(float) * 16 * PB_K), *sums = malloc(sizeof(float) * 16 * T);
    if (!panel || !sums) { free(panel); free(sums); bf16_avx2(p, r0, r1); return; }  /* the tile kernel needs no room */
    for (int64_t o = r0; o < r1; o += 16) {
        int nr = r1 - o < 16 ? (int)(r1 - o) : 16;
        memset(sums, 0, sizeof(float) * 16 * T);
        for (int64_t k0 = 0; k0 < in; k0 += PB_K) {
            int64_t kn = in - k0 < PB_K ? in - k0 : PB_K;
            bf16_panel(j, o, nr, k0, kn, panel);
            panel_tiles(panel, kn, j->x + k0, in, T, sums);
        }
        for (int64_t t = 0; t < T; t++)
            for (int r = 0; r < nr; r++) j->y[t * j->out + o + r] = sums[16 * t + r] + (j->bias ? j->bias[o + r] : 0.f);
    }
    free(panel); free(sums);
}

/* whether every scale byte of rows [r0, r1) keeps the folded values normal (here and in the AVX-512 panel) */
int scales_fold(const job_t *j, int64_t r0, int64_t r1) {
    const uint8_t *sc = j->scales + r0 * (j->in / 32), *end = j->scales + r1 * (j->in / 32);
    for (; sc < end; sc++) if (*sc < 2 || *sc > 252) return 0;
    return 1;
}

/* ---- MXFP4 for many tokens on AVX2 (a prompt's tokens per expert): the same panel GEMM ------------------------
 * 16 rows decoded once per PB_K inputs into the float32 panel, each group's scale folded in (exact while every
 * value stays a normal float: scale bytes 2..252, see scales_fold; a block of rows with others takes the tile
 * kernel), then the 16-row x 6-token tiles above. From GEMM_MIN_T tokens: below, decoding a panel costs more than
 * it saves (a 64-token prompt gives an expert ~8). */
__attribute__((target(AVX2))) static void mxfp4_panel(const job_t *j, int64_t o, int nr, int64_t k0, int64_t kn,
                                                      float *panel, float *tmp /* [8][32] */) {
    int64_t G = j->in / 32;
    for (int64_t g = k0 / 32; g < (k0 + kn) / 32; g++)
        for (int half = 0; half < 2; half++) {
            for (int i = 0; i < 8; i++) {
                int64_t row = o + 8 * half + i;
                __m256 w[4];
                if (8 * half + i < nr) {
                    decode1_avx2(j->blocks + (row * G + g) * 16, w);
                    __m256 s = _mm256_set1_ps(SCALE[j->scales[row * G + g]] * 0.5f);  /* the codes were doubled */
                    for (int c = 0; c < 4; c++) _mm256_store_ps(tmp + 32 * i + 8 * c, _mm256_mul_ps(w[c], s));
                } else
                    for (int c = 0; c < 4; c++) _mm256_store_ps(tmp + 32 * i + 8 * c, _mm256_setzero_ps());
            }
            for (int c = 0; c < 4; c++) {
                __m256 r[8];
                for (int i = 0; i < 8; i++) r[i] = _mm256_load_ps(tmp + 32 * i + 8 * c);
                transpose8(r);
                for (int q = 0; q < 8; q++) _mm256_store_ps(panel + (g * 32 - k0 + 8 * c + q) * 16 + 8 * half, r[q]);
            }
        }
}

/* x in natural order; xp, permuted, for the tile kernel (rows whose scales do not fold) */
__attribute__((target(AVX2))) void mxfp4_avx2_gemm(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p; int64_t in = j->in, T = j->T;
    float *panel = aligned_alloc(32, sizeof(float) * 16 * PB_K), *tmp = aligned_alloc(32, sizeof(float) * 8 * 32);
    float *sums = malloc(sizeof(float) * 16 * T);
    for (int64_t o = r0; o < r1; o += 16) {
        int nr = r1 - o < 16 ? (int)(r1 - o) : 16;
        if (!panel || !tmp || !sums || !scales_fold(j, o, o + nr)) { mxfp4_avx2(p, o, o + nr); continue; }
        memset(sums, 0, sizeof(float) * 16 * T);
        for (int64_t k0 = 0; k0 < in; k0 += PB_K) {
            int64_t kn = in - k0 < PB_K ? in - k0 : PB_K;
            /* the next panel's bytes, fetched while this one decodes and serves (16 row streams, which the hardware
             * prefetchers followed poorly): these rows' next inputs, or the next 16 rows' first */
            int64_t next_o = k0 + PB_K < in ? o : o + 16, next_g = k0 + PB_K < in ? (k0 + PB_K) / 32 : 0;
            for (int i = 0; i < 16; i++)
                for (int c = 0; c < PB_K / 2; c += 64) PREFETCH_W(j->blocks + ((next_o + i) * (in / 32) + next_g) * 16 + c);
            mxfp4_panel(j, o, nr, k0, kn, panel, tmp);
            panel_tiles(panel, kn, j->x + k0, in, T, sums);
        }
        for (int64_t t = 0; t < T; t++)
            for (int r = 0; r < nr; r++) j->y[t * j->out + o + r] = sums[16 * t + r] + (j->bias ? j->bias[o + r] : 0.f);
    }
    free(panel); free(tmp); free(sums);
}

/* ---- MXFP4 for a prompt's few tokens an expert on AVX2 (6-8 or 12-16: kernels.c's few_fits) ---------------------
 * A 64-token prompt gives an expert ~8 tokens. The tile kernel takes them 4 at a time, so it decodes every row twice,
 * and reads the 4 tokens' x (46 KB at the 20b's 2,880 inputs) from L2 for every row; the panel above costs a transpose
 * of every decoded value. Here the tokens lie across the vector: x is transposed once per call (xt: for each input,
 * the 8 or 16 tokens' values side by side), R rows are decoded FEW_K inputs at a time into floats with their scales
 * folded (scales_fold), and each input takes one broadcast of a row's weight and one FMA per 8 tokens: R x NV
 * accumulators (12), xt's FEW_K inputs and the rows' floats in L1, no horizontal sums. Each (row, token) sum is one
 * chain over the inputs in xp's order. Not for decoding: a token's sums here are not the tile kernel's. */
#define FEW_K 256
__attribute__((target(AVX2), always_inline)) static inline void few_block(const job_t *j, int64_t o, int nr,
                                                                         const float *xt, float *buf, const int NV) {
    const int R = 12 / NV;
    int64_t in = j->in, G = in / 32;
    __m256 acc[12];
    for (int i = 0; i < R * NV; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < in; k0 += FEW_K) {
        int64_t kn = in - k0 < FEW_K ? in - k0 : FEW_K, ge = (k0 + kn) / 32;
        for (int r = 0; r < R; r++) {
            float *b = buf + r * FEW_K - k0;  /* b[k] for input k of the chunk */
            if (r >= nr) { memset(buf + r * FEW_K, 0, sizeof(float) * kn); continue; }
            const uint8_t *blk = j->blocks + (o + r) * G * 16, *sc = j->scales + (o + r) * G;
            /* this chunk's bytes of the row R further, fetched a whole block ahead: one chunk ahead left the kernel
               waiting on memory (at 8 tokens it ran at the tile kernel's speed on weights from DRAM, 1.3x it on
               weights in the L3) */
            const uint8_t *next = blk + R * G * 16 + k0 / 2;
            PREFETCH_W(next); PREFETCH_W(next + 64);
            int64_t g = k0 / 32;
            for (; g + 2 <= ge; g += 2) {
                __m256 w[8];
                decode2_avx2(blk + g * 16, w);
                __m256 s = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(SCALE[sc[g]])), _mm_set1_ps(SCALE[sc[g + 1]]), 1);
                for (int i = 0; i < 8; i++) _mm256_store_ps(b + g * 32 + 8 * i, _mm256_mul_ps(w[i], s));
            }
            if (g < ge) {
                __m256 w[4], s = _mm256_set1_ps(SCALE[sc[g]] * 0.5f);  /* the codes were doubled */
                decode1_avx2(blk + g * 16, w);
                for (int i = 0; i < 4; i++) _mm256_store_ps(b + g * 32 + 8 * i, _mm256_mul_ps(w[i], s));
            }
        }
        const float *x = xt + k0 * 8 * NV;
        for (int64_t k = 0; k < kn; k++) {
            __m256 xv[2];
            for (int v = 0; v < NV; v++) xv[v] = _mm256_load_ps(x + (k * NV + v) * 8);
            for (int r = 0; r < R; r++) {
                __m256 w = _mm256_broadcast_ss(buf + r * FEW_K + k);
                for (int v = 0; v < NV; v++) acc[r * NV + v] = _mm256_fmadd_ps(w, xv[v], acc[r * NV + v]);
            }
        }
    }
    float lanes[12][8];  /* every accumulator stored by a constant index: with nr's index, GCC kept them in memory */
    for (int i = 0; i < R * NV; i++) _mm256_storeu_ps(lanes[i], acc[i]);
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < 8 * NV && t < j->T; t++)
            j->y[t * j->out + o + r] = lanes[r * NV + t / 8][t % 8] + (j->bias ? j->bias[o + r] : 0.f);
}

/* reads xt, and xp for the tile kernel (which takes the rows whose scales do not fold) */
__attribute__((target(AVX2))) void mxfp4_avx2_few(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p;
    const int NV = FEW_LANES(j->T) / 8, R = 12 / NV;
    float buf[12 * FEW_K] __attribute__((aligned(32)));  /* 12 KiB */
    for (int64_t o = r0; o < r1; o += R) {
        int nr = r1 - o < R ? (int)(r1 - o) : R;
        if (j->T > 16 || !scales_fold(j, o, o + nr)) mxfp4_avx2(p, o, o + nr);
        else if (NV == 1) few_block(j, o, nr, j->xt, buf, 1);
        else few_block(j, o, nr, j->xt, buf, 2);
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
    __attribute__((target(TARGET))) void NAME(const void *p, int64_t r0, int64_t r1) {                     \
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

/* the bandwidth probe's reads (ossie_read) */
__attribute__((target(AVX2))) void read_part_avx2(const void *ctx, int64_t b, int64_t e) {
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
