/* ossie._kernels: the Python binding of kernels.h. Arguments come as integers (tensors' data pointers) and sizes
 * from ossie/backends/cpu_kernels.py, which checks every tensor first; here the sizes are checked once more, the GIL
 * is released around each call, and failures become Python exceptions. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "kernels.h"

#define P(v) ((void *)(uintptr_t)(v))

static PyObject *no_memory_or_none(int rc) {
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_matmul(PyObject *self __attribute__((unused)), PyObject *args) {
    int kind, bf16_ok, rc; unsigned long long x, wa, wb, bias, y; long long T, out, in;
    if (!PyArg_ParseTuple(args, "iKKKKKLLLp", &kind, &x, &wa, &wb, &bias, &y, &T, &out, &in, &bf16_ok)) return NULL;
    if (in % 32 || T < 1 || out < 1) { PyErr_SetString(PyExc_ValueError, "in must be a multiple of 32; T, out >= 1"); return NULL; }
    if (kind < 0 || kind > 2) { PyErr_SetString(PyExc_ValueError, "kind is 0 (MXFP4), 1 (bf16) or 2 (q8)"); return NULL; }
    Py_BEGIN_ALLOW_THREADS
    rc = ossie_matmul(kind, P(x), P(wa), P(wb), P(bias), P(y), T, out, in, bf16_ok);
    Py_END_ALLOW_THREADS
    return no_memory_or_none(rc);
}

/* The MoE block of T tokens in one call, so no Python runs between its products:
 * y[t] = sum over token t's chosen experts e (ascending, as the reference path adds them) of
 *        weight_te * (W2_e @ swiglu(W1_e @ x[t] + b1_e) + b2_e)   (+ residual[t], if given).
 * x float32 [T, H]; W1 MXFP4 [E, 2I, H/32, 16] with scales; b1 float32 [E, 2I]; W2 MXFP4 [E, H, I/32, 16]; b2 [E, H];
 * experts int64 [T, k], weights float32 [T, k].
 * round_bf16: the model runs in bf16, so the activation is rounded to bf16 before W2, as the reference does, and
 * y = bf16(residual + bf16(moe)), as its residual add rounds.
 * Each expert any token chose is read once, for all the tokens that chose it (continuous batching: the decode
 * steps of several sequences share the reads). A token's products are those of the same product kernels with it
 * alone (their sums run per token in the same order whatever the token count), so a token's result does not
 * depend on the others in the call.
 * Two passes over the threads, none in between: every chosen expert's W1 rows (each thread applies SwiGLU to its
 * own gate/up row pairs, for every token of that expert, and writes the activations where W2's product reads
 * them), then the W2 rows (each thread adds each token's experts up for its own rows). */
static PyObject *py_moe(PyObject *self __attribute__((unused)), PyObject *args) {
    unsigned long long x, w1b, w1s, b1, w2b, w2s, b2, experts, weights, y, res; long long T, k, H, I, E;
    int bf16, q8, rc;
    float alpha, limit;
    if (!PyArg_ParseTuple(args, "KKKKKKKKKKLLLLLpffKp", &x, &w1b, &w1s, &b1, &w2b, &w2s, &b2, &experts, &weights, &y,
                          &T, &k, &H, &I, &E, &bf16, &alpha, &limit, &res, &q8)) return NULL;
    if (H % 32 || I % 32) { PyErr_SetString(PyExc_ValueError, "hidden and intermediate sizes must be multiples of 32"); return NULL; }
    if (T < 1 || k < 1 || E < 1) { PyErr_SetString(PyExc_ValueError, "T, k and E must be >= 1"); return NULL; }
    Py_BEGIN_ALLOW_THREADS
    rc = ossie_moe(P(x), P(w1b), P(w1s), P(b1), P(w2b), P(w2s), P(b2), P(experts), P(weights), P(y), T, k, H, I, E,
                   bf16, alpha, limit, P(res), q8);
    Py_END_ALLOW_THREADS
    if (rc == -2) { PyErr_SetString(PyExc_ValueError, "expert id out of range"); return NULL; }
    return no_memory_or_none(rc);
}

/* attention_prefill(q, k, v, sinks, out, T, S, H, KV, D, scale, bf16, first, window[, q8]) -> bool: T queries q
 * float32 [T, H, D] at key rows first.. of k, v [S, KV, D] (rows in position order; with q8 packed q8 rows [S, KV,
 * KV_ROW(D)]), causal, within `window` rows if not 0; out float32 [T, H, D]. False (nothing done) where the
 * AVX-512 kernel does not apply: the caller's torch path then serves. */
static PyObject *py_attention_prefill(PyObject *self __attribute__((unused)), PyObject *args) {
    unsigned long long q, k, v, sinks, out; long long T, S, H, KV, D, first, window; float scale; int bf16, q8 = 0, rc;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLLfpLL|p", &q, &k, &v, &sinks, &out, &T, &S, &H, &KV, &D, &scale, &bf16,
                          &first, &window, &q8)) return NULL;
    if (T < 1 || KV < 1 || H % KV || first < 0 || first + T > S || window < 0) {
        PyErr_SetString(PyExc_ValueError, "attention_prefill: T >= 1, H a multiple of KV, first + T <= S"); return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = ossie_attention_prefill(P(q), P(k), P(v), P(sinks), P(out), T, S, H, KV, D, scale, bf16, first, window, q8);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
    return PyBool_FromLong(rc);
}

/* attention(q, k, v, sinks, out, S, H, KV, D, scale, bf16[, q8]): q float32 [H, D], out float32 [H, D]; k, v
 * [S, KV, D] bf16 or float32, or with q8 packed q8 rows [S, KV, KV_ROW(D)] */
static PyObject *py_attention(PyObject *self __attribute__((unused)), PyObject *args) {
    unsigned long long q, k, v, sinks, out; long long S, H, KV, D; float scale; int bf16, q8 = 0, rc;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLfp|p", &q, &k, &v, &sinks, &out, &S, &H, &KV, &D, &scale, &bf16, &q8))
        return NULL;
    if (S < 1 || KV < 1 || H % KV || (q8 && D % 32)) {
        PyErr_SetString(PyExc_ValueError, "attention: S >= 1, H a multiple of KV (and D of 32 for q8)"); return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = ossie_attention(P(q), P(k), P(v), P(sinks), P(out), S, H, KV, D, scale, bf16, q8);
    Py_END_ALLOW_THREADS
    return no_memory_or_none(rc);
}

/* rms_norm(x, w, out, T, n, eps): rms_norm_bf16 on each of T rows (x, out float32 [T, n], w float32 [n]): the
 * op-by-op path of a bf16 model norms as the fused blocks do, in the same order, so that a token decoded in a batch
 * (op by op) gets bit for bit what it gets alone (fused). torch's rms_norm sums the squares in another order: at
 * the 20b's width its last bit differed often enough to change bf16 roundings and then tokens. */
static PyObject *py_rms_norm(PyObject *self __attribute__((unused)), PyObject *args) {
    unsigned long long x, w, out; long long T, n; float eps;
    if (!PyArg_ParseTuple(args, "KKKLLf", &x, &w, &out, &T, &n, &eps)) return NULL;
    if (T < 0 || n < 1) { PyErr_SetString(PyExc_ValueError, "rms_norm: T >= 0, n >= 1"); return NULL; }
    Py_BEGIN_ALLOW_THREADS
    ossie_rms_norm(P(x), P(w), P(out), T, n, eps);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
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
static PyObject *py_attention_block(PyObject *self __attribute__((unused)), PyObject *args) {
    unsigned long long x, nw, qw, qb, c2, s2, kc, vc, sk, ow, ob, y, mnw, gw, gb, hout, lout, qs = 0, os = 0;
    long long slot, nkeys, H, KV, D, hid, E; float eps; int wkind = 1;  /* the projections: 1 bf16, 2 q8 (+ scales) */
    int kv_q8 = 0, rc;
    if (!PyArg_ParseTuple(args, "KKKKKKKKKKKKLLLLLLfKKKLKK|iKKp", &x, &nw, &qw, &qb, &c2, &s2, &kc, &vc, &sk, &ow, &ob,
                          &y, &slot, &nkeys, &H, &KV, &D, &hid, &eps, &mnw, &gw, &gb, &E, &hout, &lout, &wkind, &qs,
                          &os, &kv_q8)) return NULL;
    if (wkind != 1 && wkind != 2) { PyErr_SetString(PyExc_ValueError, "attention_block: wkind is 1 or 2"); return NULL; }
    if (hid % 32 || (H * D) % 32 || D % 2 || KV < 1 || H % KV || nkeys < 1 || E > 256 || (kv_q8 && D % 32)) {
        PyErr_SetString(PyExc_ValueError, "attention_block: unsupported shapes"); return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = ossie_attention_block(P(x), P(nw), P(qw), P(qb), P(c2), P(s2), P(kc), P(vc), P(sk), P(ow), P(ob), P(y), slot,
                               nkeys, H, KV, D, hid, eps, P(mnw), P(gw), P(gb), E, P(hout), P(lout), wkind, P(qs), P(os),
                               kv_q8);
    Py_END_ALLOW_THREADS
    return no_memory_or_none(rc);
}

/* quantize_q8(w, values, scales, out, in): bf16 w [out, in] into int8 values [out, in] and float16 scales
 * [out, in/32], on all threads */
static PyObject *py_quantize_q8(PyObject *self __attribute__((unused)), PyObject *args) {
    unsigned long long w, v, sc; long long out, in;
    if (!PyArg_ParseTuple(args, "KKKLL", &w, &v, &sc, &out, &in)) return NULL;
    if (in % 32 || out < 1) { PyErr_SetString(PyExc_ValueError, "quantize_q8: in must be a multiple of 32"); return NULL; }
    Py_BEGIN_ALLOW_THREADS
    ossie_quantize_q8(P(w), P(v), P(sc), out, in);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_read(PyObject *self __attribute__((unused)), PyObject *args) {
    unsigned long long ptr, total; long long nbytes;
    if (!PyArg_ParseTuple(args, "KL", &ptr, &nbytes)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    total = ossie_read(P(ptr), nbytes);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLongLong(total);
}

static PyObject *py_set_threads(PyObject *self __attribute__((unused)), PyObject *args) {
    int n; if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    ossie_set_threads(n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_get_threads(PyObject *self __attribute__((unused)), PyObject *args __attribute__((unused))) {
    return PyLong_FromLong(ossie_threads());
}

static PyObject *py_set_path(PyObject *self __attribute__((unused)), PyObject *args) {
    const char *name; if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    if (ossie_set_path(name)) {
        PyErr_SetString(PyExc_ValueError, "path: best, scalar, avx2, avxvnni, avx512bf16, neon, dotprod or i8mm"); return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_path(PyObject *self __attribute__((unused)), PyObject *args __attribute__((unused))) {
    return PyUnicode_FromString(ossie_path());
}

static PyObject *py_has_path(PyObject *self __attribute__((unused)), PyObject *args) {
    const char *name; if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    return PyBool_FromLong(ossie_has_path(name));
}

static PyMethodDef methods[] = {
    {"matmul", py_matmul, METH_VARARGS, "y = x @ W.T + bias for an MXFP4 (kind 0), bf16 (1) or q8 (2) weight"},
    {"moe", py_moe, METH_VARARGS, "the MoE block of T tokens: experts' products, SwiGLU and weighted sums"},
    {"attention_block", py_attention_block, METH_VARARGS, "the attention block of one token of a bf16 model"},
    {"rms_norm", py_rms_norm, METH_VARARGS, "RMSNorm of T rows, rounded to bf16, as the fused blocks norm"},
    {"attention", py_attention, METH_VARARGS, "attention of one query over the KV cache, with sinks"},
    {"attention_prefill", py_attention_prefill, METH_VARARGS, "causal attention of a block of queries, with sinks"},
    {"quantize_q8", py_quantize_q8, METH_VARARGS, "bf16 rows into q8 (int8 values, a float16 scale per 32)"},
    {"read", py_read, METH_VARARGS, "read(ptr, nbytes): sum a buffer's words on all threads (bandwidth probe)"},
    {"set_threads", py_set_threads, METH_VARARGS, "number of threads for the kernels"},
    {"get_threads", py_get_threads, METH_NOARGS, "number of threads for the kernels"},
    {"set_path", py_set_path, METH_VARARGS, "force a code path (best, or one of has_path's names) for tests"},
    {"has_path", py_has_path, METH_VARARGS, "whether this CPU has a code path (scalar, avx2, avxvnni, avx512bf16, neon, dotprod, i8mm)"},
    {"path", py_path, METH_NOARGS, "the code path in use"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "ossie's fused CPU kernels", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { ossie_init(); return PyModule_Create(&module); }
