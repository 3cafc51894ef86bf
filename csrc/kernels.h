/* ossie's CPU kernels, as C functions: what module.c binds to Python and csrc/tests calls directly. Pointers are to
 * dense arrays of the shapes named; the callers check shapes (ossie/backends/cpu_kernels.py does for Python). Each
 * call runs on the kernels' thread pool, one call at a time (others wait). Returns: 0, or -1 when memory ran out. */
#ifndef OSSIE_KERNELS_H
#define OSSIE_KERNELS_H

#include <stdint.h>

void ossie_init(void);  /* detects the CPU's paths; call once first */

/* y [T, out] = x [T, in] @ W.T + bias. kind 0: MXFP4 (wa blocks [out, in/32, 16], wb E8M0 scales [out, in/32]);
 * 1: bf16 (wa [out, in]); 2: q8 (wa int8 [out, in], wb float16 scales [out, in/32]). in: a multiple of 32.
 * bf16_ok: x holds bf16 values, so the bf16 dot-product path may round it to bf16 (exactly). */
int ossie_matmul(int kind, const float *x, const void *wa, const void *wb, const float *bias, float *y, int64_t T,
                 int64_t out, int64_t in, int bf16_ok);

/* The MoE block of T tokens: y[t] = sum over token t's k experts (experts int64 [T, k], weights float [T, k]) of
 * weight * (W2 @ swiglu(W1 @ x[t] + b1) + b2) (+ residual[t] if not NULL). W1 MXFP4 [E, 2I, H/32, 16] and scales,
 * b1 [E, 2I]; W2 MXFP4 [E, H, I/32, 16] and scales, b2 [E, H]. bf16: round as a bf16 model does. -2: an expert id
 * out of range. q8: the q8 mode's prompts: x and the activations rounded to int8 per 32 (round_act32) and the
 * products in integers (x86_q8_prompts.c, neon.c), one kernel whatever an expert's token count. */
int ossie_moe(const float *x, const void *w1b, const void *w1s, const float *b1, const void *w2b, const void *w2s,
              const float *b2, const int64_t *experts, const float *weights, float *y, int64_t T, int64_t k, int64_t H,
              int64_t I, int64_t E, int bf16, float alpha, float limit, const float *residual, int q8);

/* one query q [H, D] over S cached keys and values k, v [S, KV, D] (bf16 or float32; q8: packed q8 rows), with
 * sinks [H]; out [H, D] */
int ossie_attention(const float *q, const void *k, const void *v, const float *sinks, float *out, int64_t S, int64_t H,
                    int64_t KV, int64_t D, float scale, int bf16, int q8);

/* T queries [T, H, D] at rows first.. of k, v [S, KV, D], causal, within `window` rows if not 0. 1: done; 0: the
 * kernel does not apply here (nothing done) */
int ossie_attention_prefill(const float *q, const void *k, const void *v, const float *sinks, float *out, int64_t T,
                            int64_t S, int64_t H, int64_t KV, int64_t D, float scale, int bf16, int64_t first,
                            int64_t window, int q8);

/* RMSNorm of T rows of n, rounded to bf16, as the fused blocks norm */
void ossie_rms_norm(const float *x, const float *w, float *out, int64_t T, int64_t n, float eps);

/* The attention block of one decoding token of a bf16 model (see the definition for every argument). */
int ossie_attention_block(const float *x, const float *nw, const void *qw, const float *qb, const float *c2,
                          const float *s2, void *kc, void *vc, const float *sk, const void *ow, const float *ob, float *y,
                          int64_t slot, int64_t nkeys, int64_t H, int64_t KV, int64_t D, int64_t hid, float eps,
                          const float *mnw, const void *gw, const float *gb, int64_t E, float *hout, uint16_t *lout,
                          int wkind, const void *qs, const void *os, int kv_q8);

/* bf16 w [out, in] into int8 values [out, in] and float16 scales [out, in/32] */
void ossie_quantize_q8(const uint16_t *w, int8_t *values, uint16_t *scales, int64_t out, int64_t in);

uint64_t ossie_read(const void *p, int64_t nbytes);  /* sums the buffer's words on every thread (bandwidth probe) */
void ossie_set_threads(int n);
int ossie_threads(void);
/* "best", or a path ("scalar", "avx2", "avxvnni", "avx512bf16", "neon", "dotprod"): forced where the CPU has it,
 * else the best it has. -1: not a path's name */
int ossie_set_path(const char *name);
const char *ossie_path(void);
int ossie_has_path(const char *name);

#endif
