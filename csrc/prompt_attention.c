/* A prompt's attention, the part every SIMD path shares: units, buffers and the order of the steps. Each path gives
 * its pieces (prompt_attention_t: x86_avx2_attention.c, neon_attention.c); their inner loops stay inlined in them.
 *
 * Units: a KV head and a block of ATTN_PQ queries (the threads take them one by one: later queries see more keys).
 * The unit's keys go a block at a time (16 rows on AVX2, 8 on NEON: two vectors' lanes), transposed once (kt) for
 * the PQ x G query vectors of the unit, so that a query head's scores for the block are a vector sum over the head
 * dimension, no horizontal adds. Then per query head, as the decoding kernels compute it: the maximum with the
 * sink's logit, the exponentials, their sum in the lanes counted from the query's first visible key, and the values
 * added key by key in ascending order. Nothing depends on the unit around the query: a query gets the same numbers
 * whichever chunk of the prompt it is read in. D a multiple of 32. */
#include "internal.h"

#define PV_KEYS 64  /* value rows converted to floats at a time (16 KiB at D = 64) */

void prompt_attention_units(const attn_job_t *a, const prompt_attention_t *isa, int64_t u0, int64_t u1) {
    int64_t G = a->H / a->KV, D = a->D, KB = isa->keys;
    for (int64_t u = u0; u < u1; u++) {
        int64_t kvh = u % a->KV, t0 = u / a->KV * ATTN_PQ, nq = a->T - t0 < ATTN_PQ ? a->T - t0 : ATTN_PQ;
        int64_t lo[ATTN_PQ], pos[ATTN_PQ];
        for (int64_t t = 0; t < nq; t++) {
            pos[t] = a->first + t0 + t;
            lo[t] = a->window && pos[t] - a->window + 1 > 0 ? pos[t] - a->window + 1 : 0;
        }
        int64_t first = lo[0], end = pos[nq - 1] + 1, stride = end - first + 32;  /* a row: 16 floats before, 16 after */
        float *w = malloc(sizeof(float) * nq * G * (stride + D + 1)), *o = w + nq * G * stride, *total = o + nq * G * D;
        float *kt = aligned_alloc(32, sizeof(float) * (KB * D + PV_KEYS * D)), *vf = kt + KB * D;
        if (!w || !kt) { free(w); free(kt); __atomic_store_n(&((attn_job_t *)a)->failed, 1, __ATOMIC_RELAXED); return; }
        /* head g of query t: its scores from its first visible key lo[t] at w + (t G + g) stride + 16 */
        for (int64_t s0 = first; s0 < end; s0 += KB) {
            isa->keys_t(a, kvh, s0, end, kt);
            for (int64_t t = 0; t < nq; t++) {
                if (s0 + KB <= lo[t] || s0 > pos[t]) continue;  /* none of these keys is visible to query t */
                const float *q = a->q + ((t0 + t) * a->H + kvh * G) * D;
                for (int64_t g = 0; g < G; g += 4) {
                    float *rows[4];
                    for (int i = 0; i < 4; i++) rows[i] = w + (t * G + g + i) * stride + 16 + (s0 - lo[t]);
                    isa->scores(kt, D, q + g * D, a->scale, rows, G - g < 4 ? (int)(G - g) : 4);
                }
            }
        }
        for (int64_t t = 0; t < nq; t++)
            for (int64_t g = 0; g < G; g++)
                total[t * G + g] = isa->softmax_row(w + (t * G + g) * stride + 16, pos[t] - lo[t] + 1, a->sinks[kvh * G + g]);
        memset(o, 0, sizeof(float) * nq * G * D);
        for (int64_t vb = first; vb < end; vb += PV_KEYS) {  /* value rows as floats, then every head over them */
            int64_t ve = vb + PV_KEYS < end ? vb + PV_KEYS : end;
            for (int64_t s = vb; s < ve; s++) isa->value_row(a, (s * a->KV + kvh) * D, vf + (s - vb) * D);
            for (int64_t t = 0; t < nq; t++) {
                int64_t s0 = vb > lo[t] ? vb : lo[t], s1 = ve < pos[t] + 1 ? ve : pos[t] + 1;
                if (s0 >= s1) continue;
                const float *e = w + t * G * stride + 16 - lo[t];  /* e[s]: key s's numerator */
                for (int64_t g = 0; g < G; g += 2)
                    for (int64_t c = 0; c < D; c += 32)
                        isa->values(e + g * stride, stride, vf + c, vb, D, s0, s1, o + (t * G + g) * D + c, D,
                                    G - g >= 2 ? 2 : 1);
            }
        }
        for (int64_t t = 0; t < nq; t++)
            for (int64_t g = 0; g < G; g++)
                isa->scale_row(a->out + ((t0 + t) * a->H + kvh * G + g) * D, o + (t * G + g) * D, 1.f / total[t * G + g], D);
        free(w); free(kt);
    }
}
