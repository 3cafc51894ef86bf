/* The kernels on every path this CPU has, against the scalar path, with no Python: built by csrc/tests/qemu.sh for
 * ARM64 and run under qemu for CPU models with and without each extension, and natively by the test suite.
 *
 * Checked on each path: the NEON paths give the scalar path's numbers bit for bit (their kernels repeat its
 * operations), but for a prompt's bf16 products (a panel GEMM, as on x86: within float32 rounding, and the same
 * rows however the prompt is cut); the x86 paths' float sums run in other orders (8 or 16 lanes), so there the MXFP4, bf16 and attention
 * results agree within float32 rounding, and the q8 products, integer sums on every path, bit for bit; on every
 * path, tokens computed together give each token what it gets alone, bit for bit. One line per path and check;
 * the exit status is the number of failures. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels.h"

static uint64_t rng = 88172645463325252ULL;
static uint32_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return (uint32_t)(rng >> 11); }
static float uniform(void) { return (float)(next() % 2000001) / 1000000.f - 1.f; }  /* [-1, 1] */
static uint16_t bf16(float f) { uint32_t u; memcpy(&u, &f, 4); return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16); }
static float from_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static float bf16_value(void) { return from_bf16(bf16(uniform() * 2.f)); }

static int failures = 0;
static const char *PATHS[] = {"avx2", "avxvnni", "avx512bf16", "neon", "dotprod", "i8mm"};

static int is_arm(const char *path) { return !strcmp(path, "neon") || !strcmp(path, "dotprod") || !strcmp(path, "i8mm"); }

/* within tol of the reference's norm (0: bit for bit) */
static int close_to(const float *a, const float *b, int64_t n, double tol) {
    double diff = 0, norm = 0;
    for (int64_t i = 0; i < n; i++) {
        if (tol == 0 && memcmp(&a[i], &b[i], 4)) return 0;
        diff += (double)(a[i] - b[i]) * (a[i] - b[i]); norm += (double)b[i] * b[i];
    }
    return tol == 0 || sqrt(diff) <= tol * sqrt(norm);
}

#define F32_SUMS 2e-6  /* float32 sums in another order */
static int same(const float *a, const float *b, int64_t n, int exact) { return close_to(a, b, n, exact ? 0 : F32_SUMS); }

static void report(const char *path, const char *check, int ok) {
    printf("%-11s %-44s %s\n", path, check, ok ? "ok" : "MISMATCH");
    failures += !ok;
}

/* Decoding several sequences is a product of up to 8 rows (ossie/backends/cpu.py's SMALL_BATCH): there each row's
 * sums must not depend on the others. Prompts' many rows take GEMM kernels on x86, whose sums differ from the
 * decode kernels' (checked against the scalar path only). */
#define DECODE_ROWS 8

typedef struct { int kind; int64_t out, in, T; } product_case;

static void check_product(const product_case *c) {
    int64_t G = c->in / 32;
    size_t wbytes = c->kind == 0 ? (size_t)c->out * G * 16 : c->kind == 1 ? (size_t)c->out * c->in * 2 : (size_t)c->out * c->in;
    uint8_t *wa = malloc(wbytes), *wb = malloc((size_t)c->out * G * 2);
    float *x = malloc(sizeof(float) * c->T * c->in), *bias = malloc(sizeof(float) * c->out);
    float *ref = malloc(sizeof(float) * c->T * c->out), *y = malloc(sizeof(float) * c->T * c->out);
    float *alone = malloc(sizeof(float) * c->out);
    if (c->kind == 1) for (int64_t i = 0; i < c->out * c->in; i++) ((uint16_t *)wa)[i] = bf16(uniform());
    else if (c->kind == 2) {  /* quantized from bf16 rows, as at load */
        uint16_t *w16 = malloc(sizeof(uint16_t) * c->out * c->in);
        for (int64_t i = 0; i < c->out * c->in; i++) w16[i] = bf16(uniform());
        ossie_quantize_q8(w16, (int8_t *)wa, (uint16_t *)wb, c->out, c->in);
        free(w16);
    } else {
        for (size_t i = 0; i < wbytes; i++) wa[i] = (uint8_t)next();
        for (int64_t i = 0; i < c->out * G; i++) wb[i] = (uint8_t)(118 + next() % 12);
        wb[0] = 0; wb[1] = 160;  /* the smallest scale (2^-127), and a large one */
    }
    for (int64_t i = 0; i < c->T * c->in; i++) x[i] = bf16_value();
    for (int64_t i = 0; i < c->out; i++) bias[i] = uniform();
    char name[64];
    const char *kinds[] = {"mxfp4", "bf16", "q8"};
    ossie_set_path("scalar");
    ossie_matmul(c->kind, x, wa, wb, bias, ref, c->T, c->out, c->in, 1);
    for (int p = -1; p < (int)(sizeof(PATHS) / sizeof(*PATHS)); p++) {
        const char *path = p < 0 ? "scalar" : PATHS[p];
        if (!ossie_has_path(path)) continue;
        ossie_set_path(path);
        ossie_matmul(c->kind, x, wa, wb, bias, y, c->T, c->out, c->in, 1);
        snprintf(name, sizeof(name), "%s %lldx%lld, %lld tokens", kinds[c->kind], (long long)c->out, (long long)c->in,
                 (long long)c->T);
        /* ARM repeats the scalar sums but for a prompt's bf16 products (a panel GEMM, as on x86) */
        int exact = c->kind == 2 || (is_arm(path) && !(c->kind == 1 && c->T > DECODE_ROWS));
        if (p >= 0) report(path, name, same(y, ref, c->T * c->out, exact));
        if (c->kind == 1 && c->T >= 2 * (DECODE_ROWS + 1)) {  /* a prompt's rows whatever its chunks (of 9 rows or more) */
            int64_t cut = DECODE_ROWS + 1;
            float *parts = malloc(sizeof(float) * c->T * c->out);
            ossie_matmul(1, x, wa, wb, bias, parts, cut, c->out, c->in, 1);
            ossie_matmul(1, x + cut * c->in, wa, wb, bias, parts + cut * c->out, c->T - cut, c->out, c->in, 1);
            snprintf(name + strlen(name), sizeof(name) - strlen(name), ": in chunks");
            report(path, name, same(parts, y, c->T * c->out, 1));
            free(parts);
        }
        if (c->T == 1 || c->T > DECODE_ROWS) continue;
        int ok = 1;
        for (int64_t t = 0; t < c->T; t++) {
            ossie_matmul(c->kind, x + t * c->in, wa, wb, bias, alone, 1, c->out, c->in, 1);
            ok &= same(alone, y + t * c->out, c->out, 1);
        }
        snprintf(name + strlen(name), sizeof(name) - strlen(name), ": together = alone");
        report(path, name, ok);
    }
    free(wa); free(wb); free(x); free(bias); free(ref); free(y); free(alone);
}

/* q8: the q8 mode's prompt experts, integer products on every path: bit for bit everywhere */
static void check_moe(int bf16_model, int q8, int64_t T, int64_t H) {
    const int64_t k = 4, I = 96, E = 8;
    uint8_t *w1b = malloc(E * 2 * I * (H / 32) * 16), *w1s = malloc(E * 2 * I * (H / 32));
    uint8_t *w2b = malloc(E * H * (I / 32) * 16), *w2s = malloc(E * H * (I / 32));
    float *b1 = malloc(sizeof(float) * E * 2 * I), *b2 = malloc(sizeof(float) * E * H), *x = malloc(sizeof(float) * T * H);
    float *res = malloc(sizeof(float) * T * H), *wt = malloc(sizeof(float) * T * k);
    float *ref = malloc(sizeof(float) * T * H), *y = malloc(sizeof(float) * T * H), *alone = malloc(sizeof(float) * H);
    int64_t *ex = malloc(sizeof(int64_t) * T * k);
    for (int64_t i = 0; i < E * 2 * I * (H / 32) * 16; i++) w1b[i] = (uint8_t)next();
    for (int64_t i = 0; i < E * H * (I / 32) * 16; i++) w2b[i] = (uint8_t)next();
    for (int64_t i = 0; i < E * 2 * I * (H / 32); i++) w1s[i] = (uint8_t)(118 + next() % 8);
    for (int64_t i = 0; i < E * H * (I / 32); i++) w2s[i] = (uint8_t)(118 + next() % 8);
    for (int64_t i = 0; i < E * 2 * I; i++) b1[i] = bf16_value();
    for (int64_t i = 0; i < E * H; i++) b2[i] = bf16_value();
    for (int64_t i = 0; i < T * H; i++) { x[i] = bf16_value(); res[i] = bf16_value(); }
    for (int64_t t = 0; t < T; t++)
        for (int64_t a = 0; a < k; a++) { ex[t * k + a] = (t * 3 + a * 5) % E; wt[t * k + a] = 0.25f + 0.1f * (float)a; }
    ossie_set_path("scalar");
    ossie_moe(x, w1b, w1s, b1, w2b, w2s, b2, ex, wt, ref, T, k, H, I, E, bf16_model, 1.702f, 7.f, res, q8);
    char name[64];
    snprintf(name, sizeof(name), "moe%s, %s model, %d tokens", q8 ? " q8" : "", bf16_model ? "bf16" : "float32", (int)T);
    for (int p = -1; p < (int)(sizeof(PATHS) / sizeof(*PATHS)); p++) {
        const char *path = p < 0 ? "scalar" : PATHS[p];
        if (!ossie_has_path(path)) continue;
        ossie_set_path(path);
        ossie_moe(x, w1b, w1s, b1, w2b, w2s, b2, ex, wt, y, T, k, H, I, E, bf16_model, 1.702f, 7.f, res, q8);
        /* x86 sums in other orders, and a bf16 model rounds them: a last-bit difference may flip a bf16 rounding
         * (2^-8 of a value) */
        if (p >= 0) report(path, name, close_to(y, ref, T * H, is_arm(path) || q8 ? 0 : bf16_model ? 4e-3 : F32_SUMS));
        int ok = 1;
        for (int64_t t = 0; t < T; t++) {
            ossie_moe(x + t * H, w1b, w1s, b1, w2b, w2s, b2, ex + t * k, wt + t * k, alone, 1, k, H, I, E, bf16_model,
                      1.702f, 7.f, res + t * H, q8);
            ok &= same(alone, y + t * H, H, 1);
        }
        char line[96]; snprintf(line, sizeof(line), "%s: together = alone", name);
        report(path, line, ok);
    }
    free(w1b); free(w1s); free(w2b); free(w2s); free(b1); free(b2); free(x); free(res); free(wt); free(ref); free(y);
    free(alone); free(ex);
}

static void check_attention(int cache) {  /* 0 float32, 1 bf16, 2 q8 */
    const int64_t S = 37, H = 16, KV = 2, D = 64, row = D + 2 * (D / 32);
    float *q = malloc(sizeof(float) * H * D), *sinks = malloc(sizeof(float) * H);
    float *ref = malloc(sizeof(float) * H * D), *out = malloc(sizeof(float) * H * D);
    size_t bytes = cache == 0 ? sizeof(float) * S * KV * D : cache == 1 ? 2 * S * KV * D : (size_t)S * KV * row;
    uint8_t *k = malloc(bytes), *v = malloc(bytes);
    for (int64_t i = 0; i < H * D; i++) q[i] = bf16_value();
    for (int64_t i = 0; i < H; i++) sinks[i] = uniform();
    if (cache == 2)
        for (int64_t r = 0; r < S * KV; r++) {  /* int8 values, then float16 scales near 1/64 */
            for (int64_t d = 0; d < D; d++) { k[r * row + d] = (uint8_t)next(); v[r * row + d] = (uint8_t)next(); }
            for (int64_t g = 0; g < D / 32; g++) {
                uint16_t h = (uint16_t)(0x2400 + next() % 256);
                memcpy(k + r * row + D + 2 * g, &h, 2); memcpy(v + r * row + D + 2 * g, &h, 2);
            }
        }
    else
        for (int64_t i = 0; i < S * KV * D; i++) {
            float a = uniform(), b = uniform();
            if (cache == 1) { ((uint16_t *)k)[i] = bf16(a); ((uint16_t *)v)[i] = bf16(b); }
            else { ((float *)k)[i] = a; ((float *)v)[i] = b; }
        }
    const char *names[] = {"attention, float32 cache", "attention, bf16 cache", "attention, q8 cache"};
    ossie_set_path("scalar");
    ossie_attention(q, k, v, sinks, ref, S, H, KV, D, 0.125f, cache == 1, cache == 2);
    for (int p = 0; p < (int)(sizeof(PATHS) / sizeof(*PATHS)); p++) {
        if (!ossie_has_path(PATHS[p])) continue;
        ossie_set_path(PATHS[p]);
        ossie_attention(q, k, v, sinks, out, S, H, KV, D, 0.125f, cache == 1, cache == 2);
        /* x86's AVX-512 attention scores a q8 cache with the query rounded to 8 bits: only the NEON paths compare */
        int x86_q8 = cache == 2 && !is_arm(PATHS[p]);
        report(PATHS[p], names[cache], close_to(out, ref, H * D, is_arm(PATHS[p]) ? 0 : x86_q8 ? 0.02 : F32_SUMS));
    }
    free(q); free(sinks); free(ref); free(out); free(k); free(v);
}

/* A prompt's attention (the AVX-512, AVX2 and NEON prompt kernels; the scalar path has none, torch serves it): T
 * queries at positions first.. against every key before them (or the last `window`), each query against the scalar
 * path's decoding attention over its visible keys, within float32 rounding; and the prompt cut in two chunks, bit
 * for bit the whole. */
static void check_attention_prefill(int bf16_cache, int64_t window) {
    const int64_t T = 21, first = 5, S = first + T, H = 16, KV = 2, D = 64, cut = 9;
    size_t es = bf16_cache ? 2 : 4;
    float *q = malloc(sizeof(float) * T * H * D), *sinks = malloc(sizeof(float) * H);
    float *ref = malloc(sizeof(float) * T * H * D), *out = malloc(sizeof(float) * T * H * D);
    float *parts = malloc(sizeof(float) * T * H * D);
    uint8_t *k = malloc(es * S * KV * D), *v = malloc(es * S * KV * D);
    for (int64_t i = 0; i < T * H * D; i++) q[i] = bf16_value();
    for (int64_t i = 0; i < H; i++) sinks[i] = uniform();
    for (int64_t i = 0; i < S * KV * D; i++) {
        float a = uniform(), b = uniform();
        if (bf16_cache) { ((uint16_t *)k)[i] = bf16(a); ((uint16_t *)v)[i] = bf16(b); }
        else { ((float *)k)[i] = a; ((float *)v)[i] = b; }
    }
    ossie_set_path("scalar");
    for (int64_t t = 0; t < T; t++) {
        int64_t pos = first + t, lo = window && pos - window + 1 > 0 ? pos - window + 1 : 0;
        ossie_attention(q + t * H * D, k + es * lo * KV * D, v + es * lo * KV * D, sinks, ref + t * H * D, pos - lo + 1,
                        H, KV, D, 0.125f, bf16_cache, 0);
    }
    char name[64];
    snprintf(name, sizeof(name), "prompt attention, %s cache, window %d", bf16_cache ? "bf16" : "float32", (int)window);
    for (int p = 0; p < (int)(sizeof(PATHS) / sizeof(*PATHS)); p++) {
        if (!ossie_has_path(PATHS[p])) continue;
        ossie_set_path(PATHS[p]);
        if (ossie_attention_prefill(q, k, v, sinks, out, T, S, H, KV, D, 0.125f, bf16_cache, first, window, 0) != 1) {
            report(PATHS[p], name, 0);  /* every SIMD path has a prompt kernel for D = 64 */
            continue;
        }
        report(PATHS[p], name, close_to(out, ref, T * H * D, F32_SUMS));
        ossie_attention_prefill(q, k, v, sinks, parts, cut, S, H, KV, D, 0.125f, bf16_cache, first, window, 0);
        ossie_attention_prefill(q + cut * H * D, k, v, sinks, parts + cut * H * D, T - cut, S, H, KV, D, 0.125f,
                                bf16_cache, first + cut, window, 0);
        char chunks[80];
        snprintf(chunks, sizeof(chunks), "%s: in chunks", name);
        report(PATHS[p], chunks, close_to(parts, out, T * H * D, 0));
    }
    free(q); free(sinks); free(ref); free(out); free(parts); free(k); free(v);
}

int main(void) {
    ossie_init();
    ossie_set_threads(2);
    printf("paths:");
    for (int p = 0; p < (int)(sizeof(PATHS) / sizeof(*PATHS)); p++) if (ossie_has_path(PATHS[p])) printf(" %s", PATHS[p]);
    printf(" (and scalar)\n");
    const product_case cases[] = {
        {0, 96, 2880, 1}, {0, 40, 96, 3}, {0, 33, 160, 8}, {0, 17, 32, 20}, {0, 35, 320, 40},
        {1, 96, 2880, 1}, {1, 33, 160, 3}, {1, 9, 64, 8}, {1, 37, 576, 21}, {1, 20, 288, 9},
        {2, 96, 2880, 1}, {2, 33, 1120, 5}, {2, 17, 32, 8},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(*cases); i++) check_product(&cases[i]);
    check_moe(1, 0, 5, 256); check_moe(0, 0, 5, 256);
    check_moe(1, 1, 5, 256); check_moe(0, 1, 5, 256); check_moe(1, 1, 23, 608);  /* 608: a panel of 16 groups and 3 */
    for (int c = 0; c < 3; c++) check_attention(c);
    check_attention_prefill(0, 0); check_attention_prefill(1, 0); check_attention_prefill(1, 7);
    printf("%d mismatch%s\n", failures, failures == 1 ? "" : "es");
    return failures ? 1 : 0;
}
