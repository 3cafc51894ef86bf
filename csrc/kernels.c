/* ossie CPU kernels: fused MXFP4, bf16 and q8 matrix products for decode and small batches, the MoE block, attention
 * over the KV cache, and the attention block of one decoding token. The API is kernels.h; module.c binds it to
 * Python, csrc/tests drives it from C.
 *
 * y[t, o] = sum_i x[t, i] * W[o, i] (+ bias[o]) with x float32 [T, in], y float32 [T, out].
 * MXFP4 W: blocks uint8 [out, in/32, 16] (low nibble = even element), scales uint8 [out, in/32] (E8M0).
 * bf16 W: uint16 [out, in]. q8 W: int8 [out, in] and float16 scales [out, in/32].
 * The packed weights are read once and never materialised. Paths, chosen at run time (internal.h):
 *   avx512bf16: weights decoded to bf16 (exact: fp4 values are bf16 numbers), x rounded to bf16 (exact when
 *               the model runs in bf16, as its activations are bf16), vdpbf16ps products, fp32 sums;
 *   avx2, neon: fp32 FMA (x86_avx2.c, neon.c); scalar: portable C, in the order the NEON kernels repeat (below).
 * q8 products round x to int8 per 32 values on every path, and every path gives the same numbers.
 * Rows are split over a small pthread pool (pool.c).
 */
#include "kernels.h"
#include "internal.h"
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif
#if defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

float SCALE[256];

/* float32 -> float16 bits, rounding to nearest even as torch's .half() */
uint16_t f32_to_f16(float f) {
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
uint16_t quant32(const float *x, int8_t *v) {
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
float round_act32(const float *x, int8_t *q) {
    float amax = 0.f;
    for (int k = 0; k < 32; k++) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
    float inv = amax > 0.f ? 127.f / amax : 0.f;  /* |x * inv| <= 127: no clamp needed */
    for (int k = 0; k < 32; k++) q[k] = (int8_t)lrintf(x[k] * inv);
    return amax / 127.f;
}

/* round_act32 for the q8 mode's prompt experts (x86_q8_prompts.c): the int8 values in the order the panel decodes
 * MXFP4 codes in (the 16 even inputs, then the 16 odd ones), and into xc 12 x their sum (what the panel's codes + 12
 * add); returns the scale */
float round_act32_q8p(const float *x, int8_t *xq, int32_t *xc) {
    int8_t q[32];
    float s = round_act32(x, q);
    int32_t sum = 0;
    for (int k = 0; k < 16; k++) { xq[k] = q[2 * k]; xq[16 + k] = q[2 * k + 1]; sum += q[2 * k] + q[2 * k + 1]; }
    *xc = 12 * sum;
    return s;
}

/* ---- the scalar kernels ---------------------------------------------------------------------------------
 * Portable C, and the reference the NEON kernels are checked against bit for bit (csrc/tests): each sum runs in
 * 4 lanes (element i into lane i % 4, one fused multiply-add each where the CPU fuses), the lanes added as
 * (0 + 2) + (1 + 3), the order of a float32x4 reduced by halves. */
static inline float hsum4(const float a[4]) { return (a[0] + a[2]) + (a[1] + a[3]); }

static void mxfp4_scalar(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p; int64_t G = j->in / 32;
    for (int64_t o = r0; o < r1; o++)
        for (int64_t t = 0; t < j->T; t++) {
            const float *x = j->x + t * j->in; float acc[4] = {0.f, 0.f, 0.f, 0.f};
            for (int64_t g = 0; g < G; g++) {
                const uint8_t *b = j->blocks + (o * G + g) * 16; const float *xg = x + g * 32; float w[32], part[4];
                for (int k = 0; k < 16; k++) { w[2 * k] = FP4[b[k] & 15]; w[2 * k + 1] = FP4[b[k] >> 4]; }
                for (int l = 0; l < 4; l++) part[l] = w[l] * xg[l];
                for (int v = 1; v < 8; v++)
                    for (int l = 0; l < 4; l++) part[l] = SFMA(w[4 * v + l], xg[4 * v + l], part[l]);
                float s = SCALE[j->scales[o * G + g]];
                for (int l = 0; l < 4; l++) acc[l] = SFMA(part[l], s, acc[l]);
            }
            j->y[t * j->out + o] = hsum4(acc) + (j->bias ? j->bias[o] : 0.f);
        }
}

static void bf16_scalar(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p;
    for (int64_t o = r0; o < r1; o++)
        for (int64_t t = 0; t < j->T; t++) {
            const float *x = j->x + t * j->in; const uint16_t *w = j->w16 + o * j->in; float acc[4] = {0.f, 0.f, 0.f, 0.f};
            for (int64_t i = 0; i < j->in; i += 4)  /* in is a multiple of 32 */
                for (int l = 0; l < 4; l++) acc[l] = SFMA(bf16_to_f32(w[i + l]), x[i + l], acc[l]);
            j->y[t * j->out + o] = hsum4(acc) + (j->bias ? j->bias[o] : 0.f);
        }
}

/* q8 (llama.cpp's q8_0): int8 values [out, in] (in `blocks`) and a float16 scale for each 32 of a row [out, in/32]
 * (in `scales`); a weight is value * scale. x rounded to int8 per 32 (xq, xs; see round_act32). The SIMD kernels'
 * order, step for step (x86_avx2.c's Q8_INT8_KERNEL): a group's products summed exactly, 4 to a lane in 8 lanes; each
 * lane times the two scales, fused into one of two chains (even and odd groups); the chains added, then the lanes
 * as hsum256 adds them. fmaf, not SFMA: the SIMD kernels fuse on every CPU that runs them. */
static void q8_scalar(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p; int64_t G = j->in / 32;
    const int8_t *w = (const int8_t *)j->blocks; const uint16_t *sc = (const uint16_t *)j->scales;
    for (int64_t o = r0; o < r1; o++)
        for (int64_t t = 0; t < j->T; t++) {
            float acc[2][8] = {{0.f}};
            for (int64_t g = 0; g < G; g++) {
                const int8_t *b = w + o * j->in + g * 32, *xq = j->xq + (t * G + g) * 32;
                float s = half_to_f32(sc[o * G + g]) * j->xs[t * G + g];
                for (int l = 0; l < 8; l++) {
                    int32_t d = 0;
                    for (int k = 4 * l; k < 4 * l + 4; k++) d += (int32_t)b[k] * xq[k];
                    acc[g & 1][l] = fmaf((float)d, s, acc[g & 1][l]);
                }
            }
            float v[8], h[4];
            for (int l = 0; l < 8; l++) v[l] = acc[0][l] + acc[1][l];
            for (int l = 0; l < 4; l++) h[l] = v[l] + v[l + 4];
            j->y[t * j->out + o] = ((h[0] + h[2]) + (h[1] + h[3])) + (j->bias ? j->bias[o] : 0.f);
        }
}

/* MXFP4 on x rounded to int8 per 32 (the q8 mode's prompt experts): the reference of x86_q8_prompts.c, step for
 * step. A group's products summed exactly as integers (codes doubled: -12..12), then one chain over the groups, fused
 * (fmaf: the SIMD kernels fuse) with the row's scale / 2 times x's scale. */
void mxfp4_q8act_scalar(const void *p, int64_t r0, int64_t r1) {
    const job_t *j = p; int64_t G = j->in / 32;
    for (int64_t o = r0; o < r1; o++)
        for (int64_t t = 0; t < j->T; t++) {
            float acc = 0.f;
            for (int64_t g = 0; g < G; g++) {
                const uint8_t *b = j->blocks + (o * G + g) * 16; const int8_t *xq = j->xq + t * j->in + g * 32;
                int32_t d = 0;
                for (int k = 0; k < 16; k++) d += xq[k] * FP4_X2[b[k] & 15] + xq[16 + k] * FP4_X2[b[k] >> 4];
                acc = fmaf((float)d, SCALE[j->scales[o * G + g]] * 0.5f * j->xs[t * G + g], acc);
            }
            j->y[t * j->out + o] = acc + (j->bias ? j->bias[o] : 0.f);
        }
}

/* ---- dispatch ---------------------------------------------------------------------------------------- */
static const char *PATH_NAMES[N_PATHS] = {"scalar", "avx2", "avxvnni", "avx512bf16", "neon", "dotprod", "i8mm"};
int path_ok[N_PATHS] = {1}, has_vnni = 0, has_arm_bf16 = 0;
static int best_path = PATH_SCALAR, forced_path = -1;

#ifdef OSSIE_NEON
/* an ARM64 extension: a bit of getauxval's HWCAP (or HWCAP2) on Linux, a sysctl on macOS */
static int arm_has(int hwcap2, unsigned long bit, const char *sysctl) {
#if defined(__linux__)
    (void)sysctl;
    return (getauxval(hwcap2 ? AT_HWCAP2 : AT_HWCAP) & bit) != 0;
#elif defined(__APPLE__)
    (void)hwcap2; (void)bit;
    int v = 0; size_t n = sizeof(v);
    return sysctlbyname(sysctl, &v, &n, NULL, 0) == 0 && v;
#else
    (void)hwcap2; (void)bit; (void)sysctl;
    return 0;
#endif
}
#endif

void ossie_init(void) {
    for (int s = 0; s < 256; s++) SCALE[s] = ldexpf(1.0f, s - 127);
#ifdef OSSIE_X86
    __builtin_cpu_init();
    path_ok[PATH_AVX2] = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    path_ok[PATH_AVXVNNI] = path_ok[PATH_AVX2] && __builtin_cpu_supports("avxvnni");
    path_ok[PATH_AVX512BF16] = path_ok[PATH_AVX2] && __builtin_cpu_supports("avx512f") &&
                               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
    has_vnni = path_ok[PATH_AVX512BF16] && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
#endif
#ifdef OSSIE_NEON
    path_ok[PATH_NEON] = 1;  /* Advanced SIMD is part of ARMv8-A */
    path_ok[PATH_DOTPROD] = arm_has(0, 1 << 20, "hw.optional.arm.FEAT_DotProd");  /* HWCAP_ASIMDDP: SDOT */
    path_ok[PATH_I8MM] = path_ok[PATH_DOTPROD] && arm_has(1, 1 << 13, "hw.optional.arm.FEAT_I8MM");  /* HWCAP2_I8MM */
    /* BFMMLA (HWCAP2_BF16), used on the i8mm path: every CPU with i8mm so far has it (both are ARMv8.6's) */
    has_arm_bf16 = path_ok[PATH_I8MM] && arm_has(1, 1 << 14, "hw.optional.arm.FEAT_BF16");
#endif
    for (int p = 0; p < N_PATHS; p++) if (path_ok[p]) best_path = p;
}

int current_path(void) { return forced_path >= 0 ? forced_path : best_path; }

/* The code path for a product, and its row-range function. kind 0 = MXFP4, 1 = bf16, 2 = q8, 3 = MXFP4 on x
 * rounded to int8 (the q8 mode's prompt experts). bf16_ok: x holds bf16 values
 * (rounding it to bf16 is exact), so the bf16 dot-product path may be used; that path reads x as bf16 (xb), the
 * MXFP4 one in the permuted order of permuted_pos. */
static int choose_path(int kind, int bf16_ok, int64_t T, task_fn *fn) {
    int path = current_path();
    if (kind >= 2) {  /* x rounded to int8 per 32 on every path: q8 weights (2), or MXFP4 (3: the q8 mode's prompts) */
        *fn = kind == 2 ? q8_scalar : mxfp4_q8act_scalar;
#ifdef OSSIE_X86
        static const task_fn INT8[2][3] = {{q8_avx2, q8_avxvnni, q8_vnni},
                                           {mxfp4_q8act_avx2, mxfp4_q8act_avxvnni, mxfp4_q8act_vnni}};
        /* every CPU with AVX-512 BF16 has AVX-512 VNNI too (Cooper Lake, Sapphire Rapids, Zen 4) */
        int isa = path == PATH_AVX512BF16 ? (has_vnni ? 2 : path_ok[PATH_AVXVNNI]) : path == PATH_AVXVNNI ? 1
                  : path == PATH_AVX2 ? 0 : -1;
        if (isa >= 0) *fn = INT8[kind - 2][isa];
#endif
#ifdef OSSIE_NEON
        if (path == PATH_I8MM) *fn = kind == 2 ? q8_dotprod : mxfp4_q8act_i8mm;  /* one token a q8 product: SDOT */
        else if (path == PATH_DOTPROD) *fn = kind == 2 ? q8_dotprod : mxfp4_q8act_dotprod;
        else if (path == PATH_NEON) *fn = kind == 2 ? q8_neon : mxfp4_q8act_neon;
#endif
        return path;
    }
    if (path == PATH_AVXVNNI || (path == PATH_AVX512BF16 && !bf16_ok)) path = PATH_AVX2;
    if (path == PATH_DOTPROD || path == PATH_I8MM) path = PATH_NEON;  /* SDOT and SMMLA serve the q8 products only */
    *fn = kind == 0 ? mxfp4_scalar : bf16_scalar;
#ifdef OSSIE_X86
    if (path == PATH_AVX512BF16)
        *fn = kind == 0 ? (T >= GEMM_MIN_T ? mxfp4_avx512bf16_gemm : mxfp4_avx512bf16)
                        : (T == 1 ? bf16_avx512bf16_t1 : bf16_avx512bf16);
    else if (path == PATH_AVX2)
        *fn = kind == 0 ? (T >= GEMM_MIN_T ? mxfp4_avx2_gemm : mxfp4_avx2) : (T >= GEMM_BF16_MIN_T ? bf16_avx2_gemm : bf16_avx2);
#else
    (void)T;
#endif
#ifdef OSSIE_NEON
    if (path == PATH_NEON)
        *fn = kind == 0 ? mxfp4_neon : T < GEMM_BF16_MIN_T ? bf16_neon
            : bf16_ok && has_arm_bf16 && current_path() == PATH_I8MM ? bf16_bfmmla_gemm : bf16_neon_gemm;
#endif
    return path;
}

/* y = x @ W.T + bias. kind 0 = MXFP4 (wa blocks, wb scales), 1 = bf16 (wa), 2 = q8 (wa int8 values, wb float16
 * scales); see choose_path for bf16_ok. Called holding call_mu. */
static int product(int kind, const float *x, const void *wa, const void *wb, const float *bias, float *y, int64_t T,
                   int64_t out, int64_t in, int bf16_ok) {
    job_t j = {x, NULL, (const uint8_t *)wa, (const uint8_t *)wb, (const uint16_t *)wa, bias, y, T, out, in};
    task_fn fn;
    uint16_t *xb = NULL;
    int path = choose_path(kind, bf16_ok, T, &fn);
    int8_t *xq = NULL; float *xs = NULL, *xp = NULL;
    if (kind == 2) {  /* x rounded to int8 for each 32 values of a token, with the scales */
        int64_t G = in / 32;
        xq = malloc(T * in); xs = malloc(sizeof(float) * T * G);
        if (!xq || !xs) { free(xq); free(xs); return -1; }
        for (int64_t t = 0; t < T; t++)
            for (int64_t g = 0; g < G; g++) xs[t * G + g] = round_act32(x + t * in + g * 32, xq + (t * G + g) * 32);
        j.xq = xq; j.xs = xs;
    }
    if (path == PATH_AVX2 && kind == 0) {  /* the MXFP4 tile kernel reads x in its decoding's order */
        if (!(xp = malloc(sizeof(float) * T * in))) { free(xq); free(xs); return -1; }
        for (int64_t t = 0; t < T; t++)
            for (int64_t i = 0; i < in; i++) xp[t * in + permuted_pos_avx2(i, in)] = x[t * in + i];
        j.xp = xp;
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

int ossie_matmul(int kind, const float *x, const void *wa, const void *wb, const float *bias, float *y, int64_t T,
                 int64_t out, int64_t in, int bf16_ok) {
    pthread_mutex_lock(&call_mu);  /* one product at a time owns the pool (callers on other threads wait) */
    int rc = product(kind, x, wa, wb, bias, y, T, out, in, bf16_ok);
    pthread_mutex_unlock(&call_mu);
    return rc;
}

typedef struct {
    int64_t n, k, H, I, T; int bf16, path; float alpha, limit;  /* path: the products' (x's layout follows it) */
    int q8;                /* the q8 mode's prompt: products on x rounded to int8 (xq, xs, xc), activations in natural order */
    float *actf; int8_t *actq; float *acts; int32_t *actc;  /* q8: every row's activations [rows, I], rounded */
    job_t *up, *down;      /* per distinct chosen expert, ascending: its W1 product (into h) and W2 product (into part) */
    task_fn *fn;           /* per expert: its products' kernel, chosen by its token count (a panel GEMM from GEMM_MIN_T;
                              on avx2, a prompt's experts of 6-8 or 12-16 tokens the few-token kernel: few_fits) */
    float **act; uint16_t **actb;  /* per expert [T_e, I] activations: float32, or bf16 in the avx512bf16 order */
    float **actn;          /* per expert on the avx2 path, where its kernel is the panel GEMM: the activations in natural
                              order too (the panel reads x so, its fallback tile kernel permuted); NULL elsewhere */
    float **actt;          /* per expert whose kernel is mxfp4_avx2_few: the activations transposed too (see job_t.xt) */
    const int64_t *slot_expert, *slot_row;  /* [T, k] in ascending expert order: which expert, which of its rows */
    const float *slot_wt, *residual;
    float *y;
} moe_job_t;

static void moe_up(const void *p, int64_t b, int64_t e) {
    const moe_job_t *m = p; int64_t rows = 2 * m->I;
    for (int64_t n = b / rows; n < m->n && n * rows < e; n++) {
        int64_t r0 = b > n * rows ? b - n * rows : 0, r1 = e < (n + 1) * rows ? e - n * rows : rows;
        m->fn[n](&m->up[n], r0, r1);  /* chunks start at multiples of an even grain: whole (gate, up) pairs */
        for (int64_t t = 0; t < m->up[n].T; t++) {
            const float *h = m->up[n].y + t * rows;
            for (int64_t i = r0 / 2; i < r1 / 2; i++) {  /* clamped SwiGLU on interleaved (gate, up) */
                float gate = h[2 * i], up = h[2 * i + 1];
                gate = gate > m->limit ? m->limit : gate;
                up = up > m->limit ? m->limit : (up < -m->limit ? -m->limit : up);
                float a = gate * (1.f / (1.f + expf(-(m->alpha * gate)))) * (up + 1.f);
                if (m->bf16) a = rbf(a);
                if (m->q8) m->act[n][t * m->I + i] = a;
                else if (m->path == PATH_AVX512BF16) m->actb[n][t * m->I + permuted_pos(i, m->I)] = f32_to_bf16(a);
                else m->act[n][t * m->I + (m->path == PATH_AVX2 ? permuted_pos_avx2(i, m->I) : i)] = a;
                if (m->actn[n]) m->actn[n][t * m->I + i] = a;
                if (m->actt[n]) m->actt[n][permuted_pos_avx2(i, m->I) * FEW_LANES(m->up[n].T) + t] = a;
            }
        }
    }
}

/* q8: groups b..e of every row's activations rounded to int8, once all of them are in (a thread's rows of W1 give
 * a part of a group) */
static void moe_round(const void *p, int64_t b, int64_t e) {
    const moe_job_t *m = p; int64_t GI = m->I / 32;
    for (int64_t i = b; i < e; i++)
        m->acts[i] = round_act32_q8p(m->actf + (i / GI) * m->I + (i % GI) * 32, m->actq + (i / GI) * m->I + (i % GI) * 32,
                                     m->actc + i);
}

static void moe_down(const void *p, int64_t b, int64_t e) {
    const moe_job_t *m = p;
    for (int64_t n = 0; n < m->n; n++) m->fn[n](&m->down[n], b, e);
    for (int64_t t = 0; t < m->T; t++)
        for (int64_t r = b; r < e; r++) {
            float acc = 0.f;
            for (int64_t j = t * m->k; j < (t + 1) * m->k; j++)
                acc += m->down[m->slot_expert[j]].y[m->slot_row[j] * m->H + r] * m->slot_wt[j];
            if (m->residual) acc = m->bf16 ? rbf(m->residual[t * m->H + r] + rbf(acc)) : m->residual[t * m->H + r] + acc;
            m->y[t * m->H + r] = acc;
        }
}

#ifdef OSSIE_X86
/* Whether a prompt's expert with c tokens takes mxfp4_avx2_few: its lanes (8, or 16 past 8 tokens) at least three
 * quarters full, 6-8 or 12-16 tokens. Below, the tile kernel's 4-token tiles do as well for less; at 9-11 the few-token
 * kernel multiplies 16 lanes for as few real tokens and the tile kernel is faster. One product of 5,760 x 2,880 from
 * memory, AVX2 code on the Xeon (family 6 model 167), one thread: 7 tokens 57.5 GFLOP/s against the tile kernel's
 * 52.8, 8: 64.3 / 52.7, 9: 47.2 / 53.7, 12: 63.0 / 54.1, 16: 83.6 against the panel's 68.2. */
static int few_fits(int64_t c) { return c <= 16 && 4 * c >= 3 * FEW_LANES(c); }
#endif

/* The MoE block of T tokens in one call: decoding's few (each chosen expert read once for all of them) and a
 * prompt's many. A prompt's tokens gather on their experts unevenly, so its experts' products go to the threads
 * piece by piece (parallel_for_dynamic) rather than in equal shares of rows; one call rather than a call per expert
 * and product leaves no thread waiting at each of them. */
int ossie_moe(const float *x, const void *w1b, const void *w1s, const float *b1, const void *w2b, const void *w2s,
              const float *b2, const int64_t *experts, const float *weights, float *y, int64_t T, int64_t k, int64_t H,
              int64_t I, int64_t E, int bf16, float alpha, float limit, const float *res, int q8) {
    const int64_t *ex = experts; const float *wts = weights;
    for (int64_t j = 0; j < T * k; j++)
        if (ex[j] < 0 || ex[j] >= E) return -2;
    moe_job_t m = {0};
    int64_t *count = calloc(E, sizeof(int64_t)), *index = malloc(sizeof(int64_t) * E), *order = malloc(sizeof(int64_t) * k),
            *slot_expert = malloc(sizeof(int64_t) * T * k), *slot_row = malloc(sizeof(int64_t) * T * k);
    float *slot_wt = malloc(sizeof(float) * T * k);
    m.fn = calloc(E, sizeof(task_fn));
    int rc = !count || !index || !order || !slot_expert || !slot_row || !slot_wt || !m.fn;
    float *xg = NULL, *xn = NULL, *h = NULL, *actf = NULL, *actnf = NULL, *part = NULL, *xsg = NULL, *acts = NULL;
    float *xtf = NULL, *acttf = NULL;  /* the few-token kernel's x and activations, transposed */
    uint16_t *xb = NULL, *actbuf = NULL;
    int8_t *xqg = NULL, *actq = NULL;  /* q8: x and the activations rounded (round_act32_q8p), each row's */
    int32_t *xcg = NULL, *actc = NULL;
    if (!rc) {
        for (int64_t j = 0; j < T * k; j++) count[ex[j]]++;
        task_fn one;  /* the one-token kernel: experts with more tokens may take a panel GEMM */
        m.path = q8 ? PATH_SCALAR : choose_path(0, bf16, 1, &one);  /* q8: float rows in natural order */
        if (q8) choose_path(3, 0, 1, &one);  /* one kernel whatever the token count: a token's sums as alone */
        int64_t n = 0, rows = 0, panel_rows = 0, few_lanes = 0, least = T, most = 0;
        /* the avx2 kernels whose x is laid out apart: the panel's in natural order, the few-token kernel's transposed */
        task_fn avx2_panel = NULL, avx2_few = NULL;
#ifdef OSSIE_X86
        avx2_panel = mxfp4_avx2_gemm; avx2_few = mxfp4_avx2_few;
#endif
        for (int64_t e = 0; e < E; e++) if (count[e]) {
            int64_t i = index[e] = n++;
            rows += count[e];
            if (count[e] < least) least = count[e];
            if (count[e] > most) most = count[e];
            m.fn[i] = one;
            if (!q8) choose_path(0, bf16, count[e], &m.fn[i]);
#ifdef OSSIE_X86
            if (m.path == PATH_AVX2 && T >= PROMPT_ROWS && few_fits(count[e])) m.fn[i] = mxfp4_avx2_few;
#endif
            if (m.fn[i] == avx2_panel) panel_rows += count[e];
            if (m.fn[i] == avx2_few) few_lanes += FEW_LANES(count[e]);
        }
        m.n = n; m.k = k; m.H = H; m.I = I; m.T = T; m.bf16 = bf16; m.alpha = alpha; m.limit = limit; m.q8 = q8;
        m.up = calloc(n, sizeof(job_t)); m.down = calloc(n, sizeof(job_t));
        m.act = calloc(n, sizeof(float *)); m.actb = calloc(n, sizeof(uint16_t *)); m.actn = calloc(n, sizeof(float *));
        m.actt = calloc(n, sizeof(float *));
        int both = panel_rows > 0;  /* some experts take the avx2 panel: x in both orders */
        if (q8) {
            xqg = malloc(rows * H); xsg = malloc(sizeof(float) * rows * (H / 32)); xcg = malloc(sizeof(int32_t) * rows * (H / 32));
            actq = malloc(rows * I); acts = malloc(sizeof(float) * rows * (I / 32)); actc = malloc(sizeof(int32_t) * rows * (I / 32));
        } else xg = malloc(sizeof(float) * rows * H);
        h = malloc(sizeof(float) * rows * 2 * I);
        actf = malloc(sizeof(float) * rows * I); part = malloc(sizeof(float) * rows * H);
        if (m.path == PATH_AVX512BF16) { xb = malloc(sizeof(uint16_t) * rows * H); actbuf = malloc(sizeof(uint16_t) * rows * I); }
        if (both) { xn = malloc(sizeof(float) * panel_rows * H); actnf = malloc(sizeof(float) * panel_rows * I); }
        if (few_lanes) {  /* aligned for the kernel's vector loads; lanes past an expert's tokens stay 0 */
            xtf = aligned_alloc(32, sizeof(float) * few_lanes * H); acttf = aligned_alloc(32, sizeof(float) * few_lanes * I);
            if (xtf) memset(xtf, 0, sizeof(float) * few_lanes * H);
            if (acttf) memset(acttf, 0, sizeof(float) * few_lanes * I);
        }
        rc = !m.up || !m.down || !m.act || !m.actb || !m.actn || !m.actt || !h || !actf || !part ||
             (few_lanes && (!xtf || !acttf)) ||
             (q8 ? !xqg || !xsg || !xcg || !actq || !acts || !actc : !xg) ||
             (m.path == PATH_AVX512BF16 && (!xb || !actbuf)) || (both && (!xn || !actnf));
        if (!rc) {
            /* each expert's rows (its tokens, in token order) start after the previous experts' */
            int64_t off = 0, panel_off = 0, few_off = 0;
            for (int64_t e = 0; e < E; e++) if (count[e]) {
                int64_t i = index[e], c = count[e];
                m.up[i] = (job_t){xg ? xg + off * H : NULL, xb ? xb + off * H : NULL, (const uint8_t *)w1b + e * 2 * I * (H / 32) * 16,
                                  (const uint8_t *)w1s + e * 2 * I * (H / 32), NULL, (const float *)b1 + e * 2 * I,
                                  h + off * 2 * I, 0, 2 * I, H};
                m.act[i] = actf + off * I; m.actb[i] = actbuf ? actbuf + off * I : NULL;
                m.down[i] = (job_t){m.act[i], m.actb[i], (const uint8_t *)w2b + e * H * (I / 32) * 16,
                                    (const uint8_t *)w2s + e * H * (I / 32), NULL, (const float *)b2 + e * H,
                                    part + off * H, c, H, I};
                m.up[i].xp = m.up[i].x; m.down[i].xp = m.down[i].x;  /* on the avx2 path both are laid out permuted */
                if (q8) {
                    m.up[i].xq = xqg + off * H; m.up[i].xs = xsg + off * (H / 32); m.up[i].xc = xcg + off * (H / 32);
                    m.down[i].xq = actq + off * I; m.down[i].xs = acts + off * (I / 32); m.down[i].xc = actc + off * (I / 32);
                }
                if (both && m.fn[i] == avx2_panel) {  /* the panel reads x in natural order */
                    m.up[i].x = xn + panel_off * H;
                    m.down[i].x = m.actn[i] = actnf + panel_off * I;
                    panel_off += c;
                }
                if (few_lanes && m.fn[i] == avx2_few) {
                    m.up[i].xt = xtf + few_off * H;
                    m.down[i].xt = m.actt[i] = acttf + few_off * I;
                    few_off += FEW_LANES(c);
                }
                off += c;
            }
            const float *xf = x;
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
                    slot_expert[t * k + a] = i; slot_row[t * k + a] = row; slot_wt[t * k + a] = wts[t * k + order[a]];
                    if (q8) {  /* the token's rounding, made for its first expert, copied for the others */
                        int64_t GH = H / 32;
                        int8_t *xq = (int8_t *)u->xq + row * H; float *xs = (float *)u->xs + row * GH;
                        int32_t *xc = (int32_t *)u->xc + row * GH;
                        if (a == 0)
                            for (int64_t g = 0; g < GH; g++) xs[g] = round_act32_q8p(xf + t * H + g * 32, xq + g * 32, xc + g);
                        else {
                            const job_t *f = &m.up[slot_expert[t * k]]; int64_t fr = slot_row[t * k];
                            memcpy(xq, f->xq + fr * H, H); memcpy(xs, f->xs + fr * GH, sizeof(float) * GH);
                            memcpy(xc, f->xc + fr * GH, sizeof(int32_t) * GH);
                        }
                        continue;
                    }
                    float *dst = (float *)u->xp + row * H;  /* points into xg, which this call owns */
                    if (m.path == PATH_AVX2)
                        for (int64_t c = 0; c < H; c++) dst[permuted_pos_avx2(c, H)] = xf[t * H + c];
                    else memcpy(dst, xf + t * H, sizeof(float) * H);
                    if (u->x != u->xp) memcpy((float *)u->x + row * H, xf + t * H, sizeof(float) * H);
                    if (u->xt)
                        for (int64_t c = 0; c < H; c++) ((float *)u->xt)[permuted_pos_avx2(c, H) * FEW_LANES(count[e]) + row] = xf[t * H + c];
                    if (m.path == PATH_AVX512BF16)
                        for (int64_t c = 0; c < H; c++) xb[(u->xb - xb) + row * H + permuted_pos(c, H)] = f32_to_bf16(dst[c]);
                }
            }
            m.slot_expert = slot_expert; m.slot_row = slot_row; m.slot_wt = slot_wt;
            m.residual = res; m.y = y; m.actf = actf; m.actq = actq; m.acts = acts; m.actc = actc;
            pthread_mutex_lock(&call_mu);
            if (most > least) parallel_for_dynamic(moe_up, &m, n * 2 * I, 128);  /* a multiple of 16: see moe_up */
            else parallel_for(moe_up, &m, n * 2 * I, 16);
            if (q8) parallel_for(moe_round, &m, rows * (I / 32), 64);
            parallel_for(moe_down, &m, H, 16);
            pthread_mutex_unlock(&call_mu);
        }
    }
    free(count); free(index); free(order); free(slot_expert); free(slot_row); free(slot_wt);
    free(m.up); free(m.down); free(m.fn); free(m.act); free(m.actb); free(m.actn); free(m.actt); free(xtf); free(acttf);
    free(xg); free(xn); free(xb); free(h); free(actf); free(actnf); free(actbuf); free(part);
    free(xqg); free(xsg); free(xcg); free(actq); free(acts); free(actc);
    return rc ? -1 : 0;
}
/* q . k[off..off+D) in the scalar kernels' 4 lanes (dot_neon's order), the elements past a multiple of 4 after */
static float dot_scalar(const attn_job_t *a, const float *q, int64_t off) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f}; int64_t D4 = a->D / 4 * 4;
    for (int64_t d = 0; d < D4; d += 4)
        for (int l = 0; l < 4; l++) acc[l] = SFMA(q[d + l], kv_at(a, a->k, off + d + l), acc[l]);
    float sum = hsum4(acc);
    for (int64_t d = D4; d < a->D; d++) sum = SFMA(q[d], kv_at(a, a->k, off + d), sum);
    return sum;
}


/* o += p * v[off..off+D) */
static void axpy_scalar(const attn_job_t *a, float *o, float p, int64_t off) {
    for (int64_t d = 0; d < a->D; d++) o[d] = SFMA(p, kv_at(a, a->v, off + d), o[d]);
}

static void attn_heads(const void *p, int64_t h0, int64_t h1) {
    const attn_job_t *a = p; int64_t G = a->H / a->KV, S = a->S, D = a->D;
    float *w = malloc(sizeof(float) * S);
    if (!w) { __atomic_store_n(&((attn_job_t *)p)->failed, 1, __ATOMIC_RELAXED); return; }
    float (*dot)(const attn_job_t *, const float *, int64_t) = dot_scalar;
    void (*axpy)(const attn_job_t *, float *, float, int64_t) = axpy_scalar;
    int path = current_path();
#ifdef OSSIE_X86
    if (path >= PATH_AVX2 && path <= PATH_AVX512BF16 && D % 8 == 0 && !a->q8) { dot = dot_avx2; axpy = axpy_avx2; }
#endif
#ifdef OSSIE_NEON
    if (path >= PATH_NEON && D % 4 == 0 && !a->q8) { dot = dot_neon; axpy = axpy_neon; }
#endif
    (void)path;
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
        if (a->S >= 2048 && a->KV >= pool_threads()) parallel_for(attn_kv_heads_avx512, a, a->KV, 1);
        else parallel_for(attn_groups_avx512, a, a->H / a->group, 1);
        return;
    }
    int path = current_path();
    if (path >= PATH_AVX2 && path <= PATH_AVX512BF16 && a->D % 8 == 0 && a->D <= 128 && !a->q8 && a->T == 0 &&
        a->KV >= pool_threads()) {  /* a KV head's query heads together (a unit per KV head for every thread) */
        parallel_for(attn_kv_heads_avx2, a, a->KV, 1);
        return;
    }
#endif
    parallel_for(attn_heads, a, a->H, 4);
}

/* attention_prefill(q, k, v, sinks, out, T, S, H, KV, D, scale, bf16, first, window[, q8]) -> bool: T queries q
 * float32 [T, H, D] at key rows first.. of k, v [S, KV, D] (rows in position order; with q8 packed q8 rows [S, KV,
 * KV_ROW(D)]), causal, within `window` rows if not 0; out float32 [T, H, D]. False (nothing done) where neither
 * the AVX-512 kernel nor the AVX2 or NEON one applies (the scalar path; off AVX-512, a q8 cache or D not a multiple
 * of 32): the caller's torch path then serves. */
int ossie_attention_prefill(const float *q, const void *k, const void *v, const float *sinks, float *out, int64_t T,
                            int64_t S, int64_t H, int64_t KV, int64_t D, float scale, int bf16, int64_t first,
                            int64_t window, int q8) {
    attn_job_t a = {q, k, v, sinks, out, S, H, KV, D, scale, bf16 && !q8, 0, T, first, window};
    a.q8 = q8;
    if (quads_apply(&a)) {
#ifdef OSSIE_X86
        pthread_mutex_lock(&call_mu);
        attention_setup(&a, T * H);
        parallel_for(attn_groups_prefill_avx512, &a, T * (H / a.group), 1);
        pthread_mutex_unlock(&call_mu);
#endif
        return a.failed ? -1 : 1;
    }
#ifdef OSSIE_X86
    int path = current_path();
    if (path >= PATH_AVX2 && path <= PATH_AVX512BF16 && !q8 && D % 32 == 0) {
        pthread_mutex_lock(&call_mu);  /* later queries see more keys: units of unequal cost */
        parallel_for_dynamic(attn_prefill_avx2, &a, KV * ((T + ATTN_PQ - 1) / ATTN_PQ), 1);
        pthread_mutex_unlock(&call_mu);
        return a.failed ? -1 : 1;
    }
#endif
#ifdef OSSIE_NEON
    if (current_path() >= PATH_NEON && !q8 && D % 32 == 0) {
        pthread_mutex_lock(&call_mu);
        parallel_for_dynamic(attn_prefill_neon, &a, KV * ((T + ATTN_PQ - 1) / ATTN_PQ), 1);
        pthread_mutex_unlock(&call_mu);
        return a.failed ? -1 : 1;
    }
#endif
    return 0;
}

/* attention(q, k, v, sinks, out, S, H, KV, D, scale, bf16[, q8]): q float32 [H, D], out float32 [H, D]; k, v
 * [S, KV, D] bf16 or float32, or with q8 packed q8 rows [S, KV, KV_ROW(D)] */
int ossie_attention(const float *q, const void *k, const void *v, const float *sinks, float *out, int64_t S, int64_t H,
                    int64_t KV, int64_t D, float scale, int bf16, int q8) {
    attn_job_t a = {q, k, v, sinks, out, S, H, KV, D, scale, bf16 && !q8, 0};
    a.q8 = q8;
    pthread_mutex_lock(&call_mu);
    attention_heads(&a);
    pthread_mutex_unlock(&call_mu);
    return a.failed ? -1 : 0;
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
void ossie_rms_norm(const float *x, const float *w, float *out, int64_t T, int64_t n, float eps) {
    for (int64_t t = 0; t < T; t++) rms_norm_bf16(x + t * n, w, out + t * n, n, eps);
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
int ossie_attention_block(const float *x, const float *nw, const void *qw, const float *qb, const float *c2,
                          const float *s2, void *kc, void *vc, const float *sk, const void *ow, const float *ob, float *y,
                          int64_t slot, int64_t nkeys, int64_t H, int64_t KV, int64_t D, int64_t hid, float eps,
                          const float *mnw, const void *gw, const float *gb, int64_t E, float *hout, uint16_t *lout,
                          int wkind, const void *qs, const void *os, int kv_q8) {
    const float *xf = (const float *)x, *norm = (const float *)nw, *cos2 = (const float *)c2, *sin2 = (const float *)s2;
    int64_t nq = (H + 2 * KV) * D;
    float *h = malloc(sizeof(float) * hid), *qkv = malloc(sizeof(float) * nq), *a = malloc(sizeof(float) * H * D),
          *o = malloc(sizeof(float) * hid);
    int rc = !h || !qkv || !a || !o;
    attn_job_t job = {qkv, (const void *)kc, (const void *)vc, (const float *)sk, a, nkeys, H, KV, D,
                      1.f / sqrtf((float)D), !kv_q8, 0};
    job.q8 = kv_q8;
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
    free(h); free(qkv); free(a); free(o);
    return rc ? -1 : 0;
}

/* Memory read bandwidth, for the roofline: every thread sums its share of a buffer (larger than the caches). */
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
void ossie_quantize_q8(const uint16_t *w, int8_t *v, uint16_t *scales, int64_t out, int64_t in) {
    quant_job_t q = {w, v, scales, in};
    pthread_mutex_lock(&call_mu);
    parallel_for(quant_rows, &q, out, 64);
    pthread_mutex_unlock(&call_mu);
}

uint64_t ossie_read(const void *p, int64_t nbytes) {
    read_job_t r = {(const uint64_t *)p, 0};
    task_fn fn = read_part;
#ifdef OSSIE_X86
    if (path_ok[PATH_AVX2]) fn = read_part_avx2;
#endif
    pthread_mutex_lock(&call_mu);
    parallel_for(fn, &r, nbytes / 4096, 1);  /* whole 4 KiB pages */
    pthread_mutex_unlock(&call_mu);
    return r.total;
}

void ossie_set_threads(int n) {
    pthread_mutex_lock(&call_mu);  /* not in the middle of a job */
    pool_set_threads(n);
    pthread_mutex_unlock(&call_mu);
}

int ossie_threads(void) { return pool_threads(); }

int ossie_set_path(const char *name) {
    int chosen = -1;
    for (int i = 0; i < N_PATHS; i++) if (!strcmp(name, PATH_NAMES[i])) chosen = i;
    if (strcmp(name, "best") && chosen < 0) return -1;
    forced_path = chosen >= 0 && path_ok[chosen] ? chosen : -1;  /* a path this CPU lacks: the best it has */
    return 0;
}

const char *ossie_path(void) { return PATH_NAMES[current_path()]; }

int ossie_has_path(const char *name) {
    for (int i = 0; i < N_PATHS; i++) if (!strcmp(name, PATH_NAMES[i])) return path_ok[i];
    return 0;
}
