"""Python entry points of ossie's C kernels (csrc/kernels.c, built as ossie._kernels).

The C side takes raw pointers and sizes. Every entry point here checks the shapes, dtypes, layout and device of
what it passes, so a wrong call raises ValueError instead of reading or writing memory it does not own (the checks
are a few microseconds a call; a decode step makes about fifty calls).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from ..model.q8 import kv_row_bytes

try:
    from .. import _kernels
except ImportError:  # built without a C compiler: the torch backend serves
    _kernels = None

# OSSIE_CPU_PATH=avx2 (or scalar) runs a slower path than the CPU's best, in this process and the processes it
# starts (a server, a test's): to compare paths, or to run an AVX2 laptop's code on an AVX-512 machine.
PATH_ENV = "OSSIE_CPU_PATH"
PATHS = ("scalar", "avx2", "avxvnni", "avx512bf16", "neon", "dotprod", "i8mm")  # csrc/kernels.c PATH_NAMES
if _kernels is not None and os.environ.get(PATH_ENV):
    _kernels.set_path(os.environ[PATH_ENV])

_threads = [torch.get_num_threads()]


def available() -> bool:
    """Whether the C kernels were built."""
    return _kernels is not None


def kernel_path() -> str:
    """The SIMD code path the kernels run ("avx512bf16", "avxvnni", "avx2"; "i8mm", "dotprod", "neon" on ARM64;
    "scalar")."""
    return _kernels.path()


def path_summary() -> str:
    """The kernel path in one line, and what a faster one would need where this CPU lacks it (for `ossie bench`
    and `ossie serve`, so that a user's report says what ran)."""
    import platform

    path, machine = kernel_path(), platform.machine().lower()
    if os.environ.get(PATH_ENV):
        return f"kernels: {path} (forced by {PATH_ENV}={os.environ[PATH_ENV]})"
    if path == "avx512bf16":
        return "kernels: avx512bf16 (AVX-512 with BF16 dot products: ossie's fastest CPU path)"
    if machine in ("x86_64", "amd64", "i686", "x86"):
        lacks = "this CPU has no AVX-512 BF16, which ossie's fastest kernels use: Zen 4/5, Sapphire Rapids and later"
        if path == "avxvnni":
            return f"kernels: avxvnni (AVX2, FMA and AVX-VNNI int8 dot products for the q8 mode; {lacks})"
        if path == "avx2":
            return f"kernels: avx2 (AVX2 and FMA; {lacks})"
        return "kernels: scalar (this CPU has no AVX2 with FMA: ossie's kernels run their portable C)"
    if path == "i8mm":
        return ("kernels: i8mm (ARM64 Advanced SIMD, with SDOT int8 dot products for the q8 mode, SMMLA int8 "
                "matrix products for its prompts, and BFMMLA for a prompt's bf16 products where the CPU has BF16)")
    if path == "dotprod":
        return ("kernels: dotprod (ARM64 Advanced SIMD, with SDOT int8 dot products for the q8 mode; this CPU has no "
                "SMMLA, which its prompts' fastest products use: Cortex-A510/A710 and later, Apple M2 and later)")
    if path == "neon":
        return ("kernels: neon (ARM64 Advanced SIMD; this CPU has no SDOT, which the q8 mode's fastest products use: "
                "Cortex-A76 and later, Apple M1 and later)")
    return f"kernels: {path} (on {machine} ossie's kernels run their portable C)"


def set_path(name: str) -> None:
    """Force a slower SIMD path ("avxvnni", "avx2", "neon", "scalar") or go back to the fastest this CPU has
    ("best"): for tests and measurements. A path the CPU lacks leaves the fastest in place."""
    _kernels.set_path(name)


def set_num_threads(n: int) -> None:
    """Threads for the kernels' pool and for torch's large products."""
    _threads[0] = n
    torch.set_num_threads(n)
    if _kernels is not None:
        _kernels.set_threads(n)


def kernel_threads() -> int:
    return _threads[0]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's thread count for a while, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _expect(fn: str, name: str, t: torch.Tensor, shape: tuple[int, ...], *dtypes: torch.dtype) -> None:
    if t.shape != shape or t.dtype not in dtypes or not t.is_contiguous() or t.device.type != "cpu":
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{fn}: {name} must be a contiguous CPU {want} tensor of shape {tuple(shape)}, got "
                         f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)} on {t.device}"
                         + ("" if t.is_contiguous() else " (not contiguous)"))


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as a dense float32 tensor, for the kernels (no new tensor when it is one already: decoding calls this
    a few hundred times per token)."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.float().contiguous()


F32, BF16, U8 = (torch.float32,), (torch.bfloat16,), (torch.uint8,)


def mxfp4_matmul(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 bf16_activations: bool = False) -> torch.Tensor:
    """float32 y [T, out] = x [T, in] @ W.T + bias for an MXFP4 W (blocks [out, in/32, 16], scales [out, in/32]),
    reading the packed weight directly. bf16_activations: x holds bf16 values (the bf16 dot-product path is exact)."""
    fn = "mxfp4_matmul"
    x, bias = _f32(x), _f32(bias)
    if x.dim() != 2 or x.shape[1] % 32:
        raise ValueError(f"{fn}: x must be [tokens, in] with in a multiple of 32, got {tuple(x.shape)}")
    t, n_in = x.shape
    out = blocks.shape[0]
    _expect(fn, "x", x, (t, n_in), *F32)
    _expect(fn, "blocks", blocks, (out, n_in // 32, 16), *U8)
    _expect(fn, "scales", scales, (out, n_in // 32), *U8)
    if bias is not None:
        _expect(fn, "bias", bias, (out,), *F32)
    y = torch.empty(t, out, dtype=torch.float32)
    _kernels.matmul(0, _ptr(x), _ptr(blocks), _ptr(scales), _ptr(bias), _ptr(y), t, out, n_in, bf16_activations)
    return y


def bf16_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float32 y [T, out] = x @ w.T + bias for a bf16 weight w [out, in], x [T, in] holding bf16 values."""
    fn = "bf16_matmul"
    x, bias = _f32(x), _f32(bias)
    if w.dim() != 2 or w.shape[1] % 32:
        raise ValueError(f"{fn}: w must be [out, in] with in a multiple of 32, got {tuple(w.shape)}")
    out, n_in = w.shape
    _expect(fn, "w", w, (out, n_in), *BF16)
    _expect(fn, "x", x, (x.shape[0], n_in), *F32)
    if bias is not None:
        _expect(fn, "bias", bias, (out,), *F32)
    y = torch.empty(x.shape[0], out, dtype=torch.float32)
    _kernels.matmul(1, _ptr(x), _ptr(w), 0, _ptr(bias), _ptr(y), x.shape[0], out, n_in, True)
    return y


def q8_matmul(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float32 y [T, out] = x @ W.T + bias for a q8 W (ossie.model.q8.Q8: int8 values [out, in], float16 scales
    [out, in/32]), x [T, in]."""
    fn = "q8_matmul"
    x, bias = _f32(x), _f32(bias)
    out, n_in = w.values.shape
    if n_in % 32:
        raise ValueError(f"{fn}: rows must be a multiple of 32 values, got {n_in}")
    _expect(fn, "values", w.values, (out, n_in), torch.int8)
    _expect(fn, "scales", w.scales, (out, n_in // 32), torch.float16)
    _expect(fn, "x", x, (x.shape[0], n_in), *F32)
    if bias is not None:
        _expect(fn, "bias", bias, (out,), *F32)
    y = torch.empty(x.shape[0], out, dtype=torch.float32)
    _kernels.matmul(2, _ptr(x), _ptr(w.values), _ptr(w.scales), _ptr(bias), _ptr(y), x.shape[0], out, n_in, False)
    return y


def quantize_q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 w [out, in] as q8: (int8 values [out, in], float16 scales [out, in/32]), on all threads; the same
    numbers as ossie.model.q8's torch version."""
    fn = "quantize_q8"
    if w.dim() != 2 or w.shape[1] % 32:
        raise ValueError(f"{fn}: w must be [out, in] with in a multiple of 32, got {tuple(w.shape)}")
    _expect(fn, "w", w, tuple(w.shape), *BF16)
    values = torch.empty(w.shape, dtype=torch.int8)
    scales = torch.empty(w.shape[0], w.shape[1] // 32, dtype=torch.float16)
    _kernels.quantize_q8(_ptr(w), _ptr(values), _ptr(scales), w.shape[0], w.shape[1])
    return values, scales


def moe(x: torch.Tensor, w1_blocks: torch.Tensor, w1_scales: torch.Tensor, w1_bias: torch.Tensor,
        w2_blocks: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor, experts: torch.Tensor,
        weights: torch.Tensor, alpha: float, limit: float, bf16: bool,
        residual: torch.Tensor | None = None, q8: bool = False) -> torch.Tensor:
    """The MoE block of T tokens x [T, hidden] in one C call: for each token, the sum over its `experts` (int64
    [T, k]) of weights (float32 [T, k]) * expert(x); float32 [T, hidden]. Each chosen expert is read once for all
    the tokens that chose it, and a token's result is what it gets alone. Stacked expert weights as loaded
    (w1 [E, 2I, H/32, 16], biases float32); a token's experts are added in ascending order, as the reference path
    adds them. With `residual` (float32 [T, hidden]), returns residual + that sum, rounded as a bf16 model's
    residual add rounds when bf16. q8: the q8 mode's prompts: x and the experts' activations rounded to int8 for each
    32 values (scale amax / 127, as llama.cpp's q8_0) and the products summed in integers."""
    fn = "moe"
    if w2_blocks.dim() != 4 or x.dim() != 2:
        raise ValueError(f"{fn}: x must be [tokens, hidden] and w2_blocks [experts, hidden, intermediate/32, 16], "
                         f"got {tuple(x.shape)} and {tuple(w2_blocks.shape)}")
    e, h, i = w2_blocks.shape[0], w2_blocks.shape[1], w2_blocks.shape[2] * 32
    t = x.shape[0]
    x, weights, residual = _f32(x), _f32(weights), _f32(residual)
    experts = experts.contiguous()
    k = experts.shape[-1] if experts.dim() == 2 else 0
    _expect(fn, "x", x, (t, h), *F32)
    _expect(fn, "w1_blocks", w1_blocks, (e, 2 * i, h // 32, 16), *U8)
    _expect(fn, "w1_scales", w1_scales, (e, 2 * i, h // 32), *U8)
    _expect(fn, "w1_bias", w1_bias, (e, 2 * i), *F32)
    _expect(fn, "w2_blocks", w2_blocks, (e, h, i // 32, 16), *U8)
    _expect(fn, "w2_scales", w2_scales, (e, h, i // 32), *U8)
    _expect(fn, "w2_bias", w2_bias, (e, h), *F32)
    _expect(fn, "experts", experts, (t, max(k, 1)), torch.int64)
    _expect(fn, "weights", weights, (t, k), *F32)
    if residual is not None:
        _expect(fn, "residual", residual, (t, h), *F32)
    if any(not 0 <= j < e for j in experts.flatten().tolist()):
        raise ValueError(f"{fn}: expert ids {experts.tolist()} outside [0, {e})")
    y = torch.empty(t, h, dtype=torch.float32)
    _kernels.moe(_ptr(x), _ptr(w1_blocks), _ptr(w1_scales), _ptr(w1_bias), _ptr(w2_blocks), _ptr(w2_scales),
                 _ptr(w2_bias), _ptr(experts), _ptr(weights), _ptr(y), t, k, h, i, e, bf16, alpha, limit,
                 _ptr(residual), q8)
    return y


def _check_kv(fn: str, k: torch.Tensor, v: torch.Tensor, heads: int, head_dim: int) -> None:
    """Keys and values [rows, kv_heads, head_dim] in bf16 or float32, or a q8 cache's packed rows (uint8
    [rows, kv_heads, kv_row_bytes(head_dim)], ossie.model.q8.pack_kv)."""
    q8 = k.dtype == torch.uint8
    width = kv_row_bytes(head_dim) if q8 else head_dim
    if k.dim() != 3 or k.shape[-1] != width or k.shape[1] < 1 or heads % k.shape[1] or (q8 and head_dim % 32):
        raise ValueError(f"{fn}: keys must be [rows, kv_heads, {width}] with kv_heads dividing {heads}, got "
                         f"{tuple(k.shape)}")
    _expect(fn, "keys", k, tuple(k.shape), torch.bfloat16, torch.float32, torch.uint8)
    _expect(fn, "values", v, tuple(k.shape), k.dtype)


def attention_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention of one query q [H, D] over keys/values [S, KV, D] (any order) with per-head sinks; float32 [H*D].
    Over a q8 cache's packed rows the scores round the query to int8 per 32 as well (llama.cpp's q8_0 products)."""
    fn = "attention_one_query"
    h, d = q.shape
    q, sinks, k, v = _f32(q), _f32(sinks), k.contiguous(), v.contiguous()
    _check_kv(fn, k, v, h, d)
    _expect(fn, "sinks", sinks, (h,), *F32)
    out = torch.empty(h * d, dtype=torch.float32)
    _kernels.attention(_ptr(q), _ptr(k), _ptr(v), _ptr(sinks), _ptr(out), k.shape[0], h, k.shape[1], d, d**-0.5,
                       k.dtype == torch.bfloat16, k.dtype == torch.uint8)
    return out


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, first: int,
                      window: int) -> torch.Tensor | None:
    """Causal attention of T queries q [T, H, D] at key rows first.. of k/v [S, KV, D] (rows in position order, or a
    q8 cache's packed rows, whose scores round the queries to int8 per 32 as decoding's do), within `window` rows if
    not 0; float32 [T, H*D]. None where no C kernel applies (see ossie_attention_prefill in csrc/kernels.c): the
    torch path serves then."""
    fn = "attention_prefill"
    t, h, d = q.shape
    q, sinks, k, v = _f32(q), _f32(sinks), k.contiguous(), v.contiguous()
    _check_kv(fn, k, v, h, d)
    _expect(fn, "sinks", sinks, (h,), *F32)
    if not (0 <= first and first + t <= k.shape[0] and window >= 0):
        raise ValueError(f"{fn}: {t} queries from key row {first} do not fit {k.shape[0]} keys (window {window})")
    out = torch.empty(t, h * d, dtype=torch.float32)
    done = _kernels.attention_prefill(_ptr(q), _ptr(k), _ptr(v), _ptr(sinks), _ptr(out), t, k.shape[0], h,
                                      k.shape[1], d, d**-0.5, k.dtype == torch.bfloat16, first, window,
                                      k.dtype == torch.uint8)
    return out if done else None


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * scale rounded to bf16, row by row, summed as the fused decoding blocks sum:
    x [T, n] holding bf16 values, scale [n]; float32 [T, n] holding bf16 values."""
    x, scale = _f32(x), _f32(scale)
    if x.dim() != 2:
        raise ValueError(f"rms_norm: x must be [T, n], got {tuple(x.shape)}")
    _expect("rms_norm", "x", x, tuple(x.shape), *F32)
    _expect("rms_norm", "scale", scale, (x.shape[1],), *F32)
    out = torch.empty_like(x)
    _kernels.rms_norm(_ptr(x), _ptr(scale), _ptr(out), x.shape[0], x.shape[1], eps)
    return out


def attention_block_one_token(x: torch.Tensor, lw, cos2: torch.Tensor, sin2: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, slot: int, n_keys: int, heads: int, kv_heads: int,
                              head_dim: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = x + Attention(RMSNorm(x)) for one token of a bf16 model in one C call, the new key and value written to
    row `slot` of the caches; attention reads rows 0..n_keys-1. Also gives what the MoE block starts from:
    h = RMSNorm(y) with the layer's mlp_norm, and the router's logits for h. x: float32 [hidden] holding bf16
    values; lw: the layer's LayerWeights; returns (y, h) as such, and the logits as bf16 [experts]."""
    fn = "attention_block_one_token"
    x = _f32(x.reshape(-1))
    hid, qkv_dim, e = x.shape[0], (heads + 2 * kv_heads) * head_dim, lw.gate_w.shape[0]
    _expect(fn, "x", x, (hid,), *F32)
    q8 = not isinstance(lw.qkv_w, torch.Tensor)  # the 8-bit mode's projections (ossie.model.q8.Q8)
    for name, shape, dtype in (("attn_norm", (hid,), F32), ("qkv_w", (qkv_dim, hid), BF16), ("qkv_b", (qkv_dim,), F32),
                               ("sinks", (heads,), F32), ("out_w", (hid, heads * head_dim), BF16),
                               ("out_b", (hid,), F32), ("mlp_norm", (hid,), F32), ("gate_w", (e, hid), BF16),
                               ("gate_b", (e,), F32)):
        t = getattr(lw, name)
        if q8 and name in ("qkv_w", "out_w"):
            _expect(fn, name + ".values", t.values, shape, torch.int8)
            _expect(fn, name + ".scales", t.scales, (shape[0], shape[1] // 32), torch.float16)
        else:
            _expect(fn, name, t, shape, *dtype)
    _expect(fn, "cos2", cos2, (head_dim,), *F32)
    _expect(fn, "sin2", sin2, (head_dim,), *F32)
    rows, kv_q8 = k_cache.shape[0], k_cache.dtype == torch.uint8  # a q8 cache: packed rows (ossie.model.q8.pack_kv)
    width, cache_dtype = (kv_row_bytes(head_dim), U8) if kv_q8 else (head_dim, BF16)
    if kv_q8 and head_dim % 32:
        raise ValueError(f"{fn}: a q8 cache needs head_dim a multiple of 32, got {head_dim}")
    _expect(fn, "k_cache", k_cache, (rows, kv_heads, width), *cache_dtype)
    _expect(fn, "v_cache", v_cache, (rows, kv_heads, width), *cache_dtype)
    if not (0 <= slot < rows and slot < n_keys <= rows) or e > 256:
        raise ValueError(f"{fn}: slot {slot} and {n_keys} keys do not fit a cache of {rows} rows "
                         f"(or more than 256 experts: {e})")
    y, h = torch.empty_like(x), torch.empty_like(x)
    logits = torch.empty(e, dtype=torch.bfloat16)
    qkv_w, out_w = (lw.qkv_w.values, lw.out_w.values) if q8 else (lw.qkv_w, lw.out_w)
    scales = (2, _ptr(lw.qkv_w.scales), _ptr(lw.out_w.scales)) if q8 else (1, 0, 0)
    _kernels.attention_block(_ptr(x), _ptr(lw.attn_norm), _ptr(qkv_w), _ptr(lw.qkv_b), _ptr(cos2), _ptr(sin2),
                             _ptr(k_cache), _ptr(v_cache), _ptr(lw.sinks), _ptr(out_w), _ptr(lw.out_b), _ptr(y),
                             slot, n_keys, heads, kv_heads, head_dim, hid, eps,
                             _ptr(lw.mlp_norm), _ptr(lw.gate_w), _ptr(lw.gate_b), e, _ptr(h), _ptr(logits), *scales,
                             kv_q8)
    return y, h, logits


def read(buffer: torch.Tensor) -> int:
    """Read `buffer` with every kernel thread (to measure bandwidth); returns the bytes read."""
    if buffer.device.type != "cpu" or not buffer.is_contiguous():
        raise ValueError("read: a contiguous CPU tensor is needed")
    nbytes = buffer.numel() * buffer.element_size() // 4096 * 4096
    _kernels.read(buffer.data_ptr(), nbytes)
    return nbytes
