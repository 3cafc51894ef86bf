/* ossie's ARM64 attention: decoding's dot products and value sums (the scalar kernels' steps, bit for bit), and a
 * prompt's attention (x86_avx2_attention.c's scheme in 4-lane vectors). */
#include "internal.h"
#ifdef OSSIE_NEON
#include "neon.h"

static inline float32x4_t kv4(const attn_job_t *a, const void *base, int64_t i) {
    return a->bf16 ? bf16x4((const uint16_t *)base + i) : vld1q_f32((const float *)base + i);
}

/* ---- attention over a bf16 or float32 cache (D a multiple of 4): dot_scalar's and axpy_scalar's steps ------- */

float dot_neon(const attn_job_t *a, const float *q, int64_t off) {
    float32x4_t acc = vdupq_n_f32(0.f);
    for (int64_t d = 0; d < a->D; d += 4) acc = vfmaq_f32(acc, vld1q_f32(q + d), kv4(a, a->k, off + d));
    return hsum4q(acc);
}

void axpy_neon(const attn_job_t *a, float *o, float p, int64_t off) {
    float32x4_t pv = vdupq_n_f32(p);
    for (int64_t d = 0; d < a->D; d += 4) vst1q_f32(o + d, vfmaq_f32(vld1q_f32(o + d), pv, kv4(a, a->v, off + d)));
}

/* exp(x) in 4 lanes: x86_avx2_attention.c's exp8 (Cephes' polynomial), step for step; 0 below -87 */
static inline float32x4_t exp4(float32x4_t x) {
    uint32x4_t tiny = vcltq_f32(x, vdupq_n_f32(-87.f));
    x = vmaxq_f32(x, vdupq_n_f32(-87.f));
    float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t y = vdupq_n_f32(1.9875691500e-4f);
    y = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), y, r);
    y = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), y, r);
    y = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), y, r);
    y = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), y, r);
    y = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), y, r);
    y = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.f)), y, vmulq_f32(r, r));
    float32x4_t two_n = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23));
    return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(vmulq_f32(y, two_n)), tiny));
}

/* ---- a prompt's attention on NEON: prompt_attention.c's steps, 8 keys a block (two vectors' lanes) --------------- */

/* key rows s0..s0+7 of KV head kvh, transposed: kt[8 d + j] = k[s0 + j][d]; rows from `end` on as zeros */
static void keys8(const attn_job_t *a, int64_t kvh, int64_t s0, int64_t end, float *kt) {
    for (int half = 0; half < 2; half++)
        for (int64_t c = 0; c < a->D; c += 4) {
            int32x4_t r[4];
            for (int i = 0; i < 4; i++) {
                int64_t s = s0 + 4 * half + i;
                r[i] = s < end ? vreinterpretq_s32_f32(kv4(a, a->k, (s * a->KV + kvh) * a->D + c)) : vdupq_n_s32(0);
            }
            transpose4(r);
            for (int i = 0; i < 4; i++) vst1q_f32(kt + 8 * (c + i) + 4 * half, vreinterpretq_f32_s32(r[i]));
        }
}

/* NG heads' scores (their queries D apart from q) of the 8 keys of kt, times scale, to rows[g] */
static inline void scores8(const float *kt, int64_t D, const float *q, float scale, float *const rows[4], const int NG) {
    float32x4_t a0[4], a1[4];
    for (int g = 0; g < NG; g++) a0[g] = a1[g] = vdupq_n_f32(0.f);
    for (int64_t d = 0; d < D; d++) {
        float32x4_t k0 = vld1q_f32(kt + 8 * d), k1 = vld1q_f32(kt + 8 * d + 4);
        for (int g = 0; g < NG; g++) {
            float qb = q[g * D + d];
            a0[g] = vfmaq_n_f32(a0[g], k0, qb);
            a1[g] = vfmaq_n_f32(a1[g], k1, qb);
        }
    }
    for (int g = 0; g < NG; g++) {
        vst1q_f32(rows[g], vmulq_n_f32(a0[g], scale));
        vst1q_f32(rows[g] + 4, vmulq_n_f32(a1[g], scale));
    }
}

/* row[0..n): scores -> exp(score - max), the maximum taken with the sink's logit; returns their sum with the sink's */
static float softmax_row_neon(float *row, int64_t n, float sink) {
    float32x4_t mv = vdupq_n_f32(sink);
    int64_t n4 = n / 4 * 4;
    for (int64_t s = 0; s < n4; s += 4) mv = vmaxq_f32(mv, vld1q_f32(row + s));
    float m = vmaxvq_f32(mv);
    for (int64_t s = n4; s < n; s++) m = row[s] > m ? row[s] : m;
    float32x4_t sum = vdupq_n_f32(0.f);
    mv = vdupq_n_f32(m);
    for (int64_t s = 0; s < n4; s += 4) {
        float32x4_t e = exp4(vsubq_f32(vld1q_f32(row + s), mv));
        vst1q_f32(row + s, e);
        sum = vaddq_f32(sum, e);
    }
    if (n4 < n) {  /* the tail in a padded vector (rows have 16 floats of room after them) */
        static const uint32_t lanes[4] = {0, 1, 2, 3};
        uint32x4_t valid = vcltq_u32(vld1q_u32(lanes), vdupq_n_u32((uint32_t)(n - n4)));
        float32x4_t e = vreinterpretq_f32_u32(vandq_u32(valid, vreinterpretq_u32_f32(exp4(vsubq_f32(vld1q_f32(row + n4), mv)))));
        vst1q_f32(row + n4, e);
        sum = vaddq_f32(sum, e);
    }
    return hsum4q(sum) + expf(sink - m);
}

/* o[0..32) += sum over keys s in [s0, s1) of e[s] v[s], for NH heads (see prompt_attention_t.values) */
static inline void values32_neon(const float *e, int64_t stride, const float *vf, int64_t vb, int64_t D, int64_t s0,
                                 int64_t s1, float *o, int64_t ostride, const int NH) {
    float32x4_t acc[2][8];
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < 8; c++) acc[h][c] = vld1q_f32(o + h * ostride + 4 * c);
    for (int64_t s = s0; s < s1; s++) {
        const float *v = vf + (s - vb) * D;
        float32x4_t vv[8];
        for (int c = 0; c < 8; c++) vv[c] = vld1q_f32(v + 4 * c);
        for (int h = 0; h < NH; h++) {
            float p = e[h * stride + s];
            for (int c = 0; c < 8; c++) acc[h][c] = vfmaq_n_f32(acc[h][c], vv[c], p);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < 8; c++) vst1q_f32(o + h * ostride + 4 * c, acc[h][c]);
}

static void scores_neon(const float *kt, int64_t D, const float *q, float scale, float *const rows[4], int ng) {
    switch (ng) {
    case 1: scores8(kt, D, q, scale, rows, 1); break;
    case 2: scores8(kt, D, q, scale, rows, 2); break;
    case 3: scores8(kt, D, q, scale, rows, 3); break;
    default: scores8(kt, D, q, scale, rows, 4); break;
    }
}

static void value_row_neon(const attn_job_t *a, int64_t i, float *dst) {
    for (int64_t c = 0; c < a->D; c += 4) vst1q_f32(dst + c, kv4(a, a->v, i + c));
}

static void values_neon(const float *e, int64_t stride, const float *vf, int64_t vb, int64_t D, int64_t s0, int64_t s1,
                        float *o, int64_t ostride, int nh) {
    if (nh == 2) values32_neon(e, stride, vf, vb, D, s0, s1, o, ostride, 2);
    else values32_neon(e, stride, vf, vb, D, s0, s1, o, ostride, 1);
}

static void scale_row_neon(float *dst, const float *o, float inv, int64_t D) {
    for (int64_t c = 0; c < D; c += 4) vst1q_f32(dst + c, vmulq_n_f32(vld1q_f32(o + c), inv));
}

static const prompt_attention_t NEON_PROMPT = {8, keys8, scores_neon, softmax_row_neon, value_row_neon, values_neon,
                                               scale_row_neon};

void attn_prefill_neon(const void *p, int64_t u0, int64_t u1) { prompt_attention_units(p, &NEON_PROMPT, u0, u1); }
#endif
