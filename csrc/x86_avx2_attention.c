/* ossie's AVX2 attention (with FMA): decoding's one query over the cache, and a prompt's queries over the keys each
 * sees. The path of every x86 CPU without AVX-512 BF16 (x86_avx512.c has that path's). */
#include "internal.h"
#ifdef OSSIE_X86
#include "x86_avx2.h"

/* 8 floats of a bf16 or float32 cache, from element i */
__attribute__((target(AVX2), always_inline)) static inline __m256 kv8(const attn_job_t *a, const void *base, int64_t i) {
    return a->bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                         _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i))), 16))
                   : _mm256_loadu_ps((const float *)base + i);
}

__attribute__((target(AVX2))) float dot_avx2(const attn_job_t *a, const float *q, int64_t off) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < a->D; d += 8) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), kv8(a, a->k, off + d), acc);
    }
    return hsum256(acc);
}
__attribute__((target(AVX2))) void axpy_avx2(const attn_job_t *a, float *o, float p, int64_t off) {
    __m256 pv = _mm256_set1_ps(p);
    for (int64_t d = 0; d < a->D; d += 8) {
        _mm256_storeu_ps(o + d, _mm256_fmadd_ps(pv, kv8(a, a->v, off + d), _mm256_loadu_ps(o + d)));
    }
}

/* Decoding attention, a KV head's query heads together (units: KV heads): each key and value row read and
 * converted once for the G heads that share it, where head by head read it G times (8 for gpt-oss). Every sum and
 * the softmax run as attn_heads runs them with dot_avx2 and axpy_avx2 (the same numbers bit for bit), only the
 * loops are swapped. D a multiple of 8, at most 128. */
#define KVH_MAX_D 128
__attribute__((target(AVX2))) void attn_kv_heads_avx2(const void *p, int64_t u0, int64_t u1) {
    const attn_job_t *a = p; int64_t G = a->H / a->KV, S = a->S, D = a->D, V = D / 8;
    float *w = malloc(sizeof(float) * G * (S + 2));
    if (!w) { __atomic_store_n(&((attn_job_t *)p)->failed, 1, __ATOMIC_RELAXED); return; }
    float *m = w + G * S, *total = m + G;
    for (int64_t kvh = u0; kvh < u1; kvh++) {
        int64_t h0 = kvh * G;
        for (int64_t g = 0; g < G; g++) m[g] = a->sinks[h0 + g];
        for (int64_t s = 0; s < S; s++) {
            int64_t off = (s * a->KV + kvh) * D;
            __m256 kv[KVH_MAX_D / 8];
            for (int64_t v = 0; v < V; v++)
                kv[v] = kv8(a, a->k, off + 8 * v);
            for (int64_t g = 0; g < G; g++) {
                const float *q = a->q + (h0 + g) * D;
                __m256 acc = _mm256_setzero_ps();
                for (int64_t v = 0; v < V; v++) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * v), kv[v], acc);
                float score = hsum256(acc) * a->scale;
                w[g * S + s] = score;
                if (score > m[g]) m[g] = score;
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float *wg = w + g * S;
            total[g] = expf(a->sinks[h0 + g] - m[g]);
            for (int64_t s = 0; s < S; s++) { wg[s] = expf(wg[s] - m[g]); total[g] += wg[s]; }
            memset(a->out + (h0 + g) * D, 0, sizeof(float) * D);
        }
        for (int64_t s = 0; s < S; s++) {
            int64_t off = (s * a->KV + kvh) * D;
            __m256 vv[KVH_MAX_D / 8];
            for (int64_t v = 0; v < V; v++)
                vv[v] = kv8(a, a->v, off + 8 * v);
            for (int64_t g = 0; g < G; g++) {
                __m256 pv = _mm256_set1_ps(w[g * S + s] / total[g]);
                float *o = a->out + (h0 + g) * D;
                for (int64_t v = 0; v < V; v++) _mm256_storeu_ps(o + 8 * v, _mm256_fmadd_ps(pv, vv[v], _mm256_loadu_ps(o + 8 * v)));
            }
        }
    }
    free(w);
}

/* exp(x) for x <= 0, 8 at a time (x86_avx512.c's exp16 on AVX2): 2^n exp(r) with n = round(x / ln 2), Cephes'
 * polynomial for exp(r); within 2 ulp of expf. Below -87 (where 2^n leaves the normal floats) it gives 0: a softmax
 * numerator under 1e-38 beside the maximum's 1. */
__attribute__((target(AVX2), always_inline)) static inline __m256 exp8(__m256 x) {
    __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(y, two_n));
}

/* ---- a prompt's attention on AVX2: prompt_attention.c's steps, 16 keys a block (two vectors' lanes) -------------- */

/* key rows s0..s0+15 of KV head kvh, transposed: kt[16 d + j] = k[s0 + j][d]; rows from `end` on as zeros */
__attribute__((target(AVX2))) static void keys16(const attn_job_t *a, int64_t kvh, int64_t s0, int64_t end, float *kt) {
    for (int half = 0; half < 2; half++)
        for (int64_t c = 0; c < a->D; c += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) {
                int64_t s = s0 + 8 * half + i;
                r[i] = s < end ? kv8(a, a->k, (s * a->KV + kvh) * a->D + c) : _mm256_setzero_ps();
            }
            transpose8(r);
            for (int i = 0; i < 8; i++) _mm256_store_ps(kt + 16 * (c + i) + 8 * half, r[i]);
        }
}

/* NG heads' scores (their queries D apart from q) of the 16 keys of kt, times scale, to rows[g] */
__attribute__((target(AVX2), always_inline)) static inline void scores16(const float *kt, int64_t D, const float *q,
                                                                          float scale, float *const rows[4], const int NG) {
    __m256 a0[4], a1[4];
    for (int g = 0; g < NG; g++) a0[g] = a1[g] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        __m256 k0 = _mm256_load_ps(kt + 16 * d), k1 = _mm256_load_ps(kt + 16 * d + 8);
        for (int g = 0; g < NG; g++) {
            __m256 qb = _mm256_broadcast_ss(q + g * D + d);
            a0[g] = _mm256_fmadd_ps(k0, qb, a0[g]);
            a1[g] = _mm256_fmadd_ps(k1, qb, a1[g]);
        }
    }
    __m256 sv = _mm256_set1_ps(scale);
    for (int g = 0; g < NG; g++) {
        _mm256_storeu_ps(rows[g], _mm256_mul_ps(a0[g], sv));
        _mm256_storeu_ps(rows[g] + 8, _mm256_mul_ps(a1[g], sv));
    }
}

__attribute__((target(AVX2))) static void scores_avx2(const float *kt, int64_t D, const float *q, float scale,
                                                      float *const rows[4], int ng) {
    switch (ng) {
    case 1: scores16(kt, D, q, scale, rows, 1); break;
    case 2: scores16(kt, D, q, scale, rows, 2); break;
    case 3: scores16(kt, D, q, scale, rows, 3); break;
    default: scores16(kt, D, q, scale, rows, 4); break;
    }
}

/* row[0..n): scores -> exp(score - max), the maximum taken with the sink's logit; returns their sum with the sink's */
__attribute__((target(AVX2))) static float softmax_row(float *row, int64_t n, float sink) {
    __m256 mv = _mm256_set1_ps(sink);
    int64_t n8 = n / 8 * 8;
    for (int64_t s = 0; s < n8; s += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(row + s));
    float m = hmax256(mv);
    for (int64_t s = n8; s < n; s++) m = row[s] > m ? row[s] : m;
    __m256 sum = _mm256_setzero_ps(); mv = _mm256_set1_ps(m);
    for (int64_t s = 0; s < n8; s += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + s), mv));
        _mm256_storeu_ps(row + s, e);
        sum = _mm256_add_ps(sum, e);
    }
    if (n8 < n) {  /* the tail in a padded vector (rows have 16 floats of room after them) */
        __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - n8)), lane));
        __m256 e = _mm256_and_ps(valid, exp8(_mm256_sub_ps(_mm256_loadu_ps(row + n8), mv)));
        _mm256_storeu_ps(row + n8, e);
        sum = _mm256_add_ps(sum, e);
    }
    return hsum256(sum) + expf(sink - m);
}

__attribute__((target(AVX2))) static void value_row_avx2(const attn_job_t *a, int64_t i, float *dst) {
    for (int64_t c = 0; c < a->D; c += 8) _mm256_store_ps(dst + c, kv8(a, a->v, i + c));
}

/* o[0..32) += sum over keys s in [s0, s1) of e[s] v[s], for NH heads (see prompt_attention_t.values) */
__attribute__((target(AVX2), always_inline)) static inline void values32(const float *e, int64_t stride, const float *vf,
                                                                          int64_t vb, int64_t D, int64_t s0, int64_t s1,
                                                                          float *o, int64_t ostride, const int NH) {
    __m256 acc[2][4];
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < 4; c++) acc[h][c] = _mm256_loadu_ps(o + h * ostride + 8 * c);
    for (int64_t s = s0; s < s1; s++) {
        const float *v = vf + (s - vb) * D;
        __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
        for (int h = 0; h < NH; h++) {
            __m256 p = _mm256_broadcast_ss(e + h * stride + s);
            acc[h][0] = _mm256_fmadd_ps(p, v0, acc[h][0]); acc[h][1] = _mm256_fmadd_ps(p, v1, acc[h][1]);
            acc[h][2] = _mm256_fmadd_ps(p, v2, acc[h][2]); acc[h][3] = _mm256_fmadd_ps(p, v3, acc[h][3]);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < 4; c++) _mm256_storeu_ps(o + h * ostride + 8 * c, acc[h][c]);
}

__attribute__((target(AVX2))) static void values_avx2(const float *e, int64_t stride, const float *vf, int64_t vb,
                                                      int64_t D, int64_t s0, int64_t s1, float *o, int64_t ostride,
                                                      int nh) {
    if (nh == 2) values32(e, stride, vf, vb, D, s0, s1, o, ostride, 2);
    else values32(e, stride, vf, vb, D, s0, s1, o, ostride, 1);
}

__attribute__((target(AVX2))) static void scale_row_avx2(float *dst, const float *o, float inv, int64_t D) {
    __m256 iv = _mm256_set1_ps(inv);
    for (int64_t c = 0; c < D; c += 8) _mm256_storeu_ps(dst + c, _mm256_mul_ps(_mm256_loadu_ps(o + c), iv));
}

static const prompt_attention_t AVX2_PROMPT = {16, keys16, scores_avx2, softmax_row, value_row_avx2, values_avx2,
                                               scale_row_avx2};

void attn_prefill_avx2(const void *p, int64_t u0, int64_t u1) { prompt_attention_units(p, &AVX2_PROMPT, u0, u1); }

#endif
