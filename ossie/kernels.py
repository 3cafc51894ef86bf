"""Compute kernels. The MXFP4 format lives here: experts' weights stay packed and are decoded on demand.

MXFP4: `blocks` uint8 [..., G, 16] hold 32 FP4 (E2M1) codes per group, low nibble = even element;
`scales` uint8 [..., G] are E8M0 exponents: value = fp4 * 2**(scale - 127).
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

_LUT_CACHE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _luts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(byte -> its two fp4 values [256, 2], scale byte -> 2**(s-127) [256]) in float32."""
    if device not in _LUT_CACHE:
        fp4 = torch.tensor(FP4_VALUES, dtype=torch.float32)
        byte = torch.arange(256)
        pairs = torch.stack([fp4[byte & 0x0F], fp4[byte >> 4]], dim=-1)
        # float64 first: 2**-127 is a float32 subnormal, exact; 255 (NaN in the MX spec) gives inf.
        scale = torch.tensor([2.0 ** (e - 127) for e in range(256)], dtype=torch.float64).float()
        _LUT_CACHE[device] = (pairs.to(device), scale.to(device))
    return _LUT_CACHE[device]


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode MXFP4 `blocks` [..., G, 16] and `scales` [..., G] to a dense [..., G*32] tensor."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 shapes do not match: blocks {tuple(blocks.shape)}, scales {tuple(scales.shape)}")
    pairs, scale_lut = _luts(blocks.device)
    values = pairs[blocks.long()].flatten(-3)  # [..., G, 16, 2] -> [..., G*32]
    factor = scale_lut[scales.long()].repeat_interleave(32, dim=-1)
    return (values * factor).to(dtype)


def mxfp4_linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W.T + b for an MXFP4 weight W [out, in] (blocks [out, in/32, 16]); decodes only this matrix."""
    w = mxfp4_dequantize(blocks, scales, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


# ---- fused C kernels (csrc/kernels.c), used on the CPU when built -------------------------------------------
try:
    from . import _kernels
except ImportError:  # built without a C compiler: the torch path above serves
    _kernels = None

SMALL_BATCH = 8  # up to this many rows, the bf16 kernel beats torch's GEMM; above, torch's GEMM is compute-bound


def fast_kernels() -> bool:
    """Whether the C kernels are built and not disabled (OSSIE_KERNELS=torch disables them)."""
    import os

    return _kernels is not None and os.environ.get("OSSIE_KERNELS", "").lower() != "torch"


def kernel_path() -> str:
    return _kernels.path() if fast_kernels() else "torch"


_threads = [torch.get_num_threads()]


def set_num_threads(n: int) -> None:
    _threads[0] = n
    torch.set_num_threads(n)
    if _kernels is not None:
        _kernels.set_threads(n)


def kernel_threads() -> int:
    return _threads[0]


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as a dense float32 tensor, for the kernels (no new tensor when it is one already: decoding calls this
    a few hundred times per token)."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.float().contiguous()


def mxfp4_matmul(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 bf16_activations: bool = False) -> torch.Tensor:
    """float32 y [T, out] = x [T, in] @ W.T + bias for an MXFP4 W (blocks [out, in/32, 16], scales [out, in/32]),
    reading the packed weight directly. bf16_activations: x holds bf16 values (the bf16 dot-product path is exact)."""
    x = _f32(x)
    t, n_in = x.shape
    out_features = blocks.shape[0]
    if blocks.shape != (out_features, n_in // 32, 16) or scales.shape != blocks.shape[:2]:
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, blocks {tuple(blocks.shape)}, "
                         f"scales {tuple(scales.shape)}")
    if not fast_kernels() or x.device.type != "cpu":
        return mxfp4_linear(x, blocks, scales, None if bias is None else bias.float())
    y = torch.empty(t, out_features, dtype=torch.float32)
    b = _f32(bias)
    _kernels.matmul(0, _ptr(x), _ptr(blocks.contiguous()), _ptr(scales.contiguous()), _ptr(b), _ptr(y),
                    t, out_features, n_in, bf16_activations)
    return y


def bf16_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float32 y [T, out] = x @ w.T + bias for a bf16 weight, x holding bf16 values."""
    x = _f32(x)
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    b = _f32(bias)
    _kernels.matmul(1, _ptr(x), _ptr(w), 0, _ptr(b), _ptr(y), x.shape[0], w.shape[0], x.shape[1], True)
    return y


def moe_one_token(x: torch.Tensor, w1_blocks: torch.Tensor, w1_scales: torch.Tensor, w1_bias: torch.Tensor,
                  w2_blocks: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor, experts: torch.Tensor,
                  weights: torch.Tensor, alpha: float, limit: float, bf16: bool,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE block for one token in one C call: sum over `experts` (int64 [k]) of weights (float32 [k]) *
    expert(x); float32 [hidden]. Stacked expert weights as loaded (contiguous: w1 [E, 2I, H/32, 16], biases
    float32); the experts are added in ascending order, as the reference path adds them. With `residual` (float32
    [hidden]), returns residual + that sum, rounded as a bf16 model's residual add rounds when bf16."""
    h, i = w2_blocks.shape[1], w2_blocks.shape[2] * 32
    x, weights, residual = _f32(x), _f32(weights), _f32(residual)
    y = torch.empty(h, dtype=torch.float32)
    experts = experts.contiguous()
    _kernels.moe(_ptr(x), _ptr(w1_blocks), _ptr(w1_scales), _ptr(w1_bias), _ptr(w2_blocks), _ptr(w2_scales),
                 _ptr(w2_bias), _ptr(experts), _ptr(weights), _ptr(y), experts.numel(), h, i, bf16, alpha, limit,
                 _ptr(residual))
    return y


def attention_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention of one query q [H, D] over keys/values [S, KV, D] (any order) with per-head sinks; float32 [H*D]."""
    h, d = q.shape
    s, kv, _ = k.shape
    q = q.float().contiguous()
    out = torch.empty(h * d, dtype=torch.float32)
    _kernels.attention(_ptr(q), _ptr(k.contiguous()), _ptr(v.contiguous()), _ptr(sinks.float().contiguous()),
                       _ptr(out), s, h, kv, d, d**-0.5, k.dtype == torch.bfloat16)
    return out


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, first: int,
                      window: int) -> torch.Tensor | None:
    """Causal attention of T queries q [T, H, D] at key rows first.. of k/v [S, KV, D] (rows in position order),
    within `window` rows if not 0; float32 [T, H*D]. None where the C kernel does not apply (see quads_apply in
    csrc/kernels.c): the torch path serves then."""
    t, h, d = q.shape
    s, kv, _ = k.shape
    q, sinks = _f32(q), _f32(sinks)
    k, v = k.contiguous(), v.contiguous()
    out = torch.empty(t, h * d, dtype=torch.float32)
    done = _kernels.attention_prefill(_ptr(q), _ptr(k), _ptr(v), _ptr(sinks), _ptr(out), t, s, h, kv, d, d**-0.5,
                                      k.dtype == torch.bfloat16, first, window)
    return out if done else None


def attention_block_one_token(x: torch.Tensor, lw, cos2: torch.Tensor, sin2: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, slot: int, n_keys: int, heads: int, kv_heads: int,
                              head_dim: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = x + Attention(RMSNorm(x)) for one token of a bf16 model in one C call, the new key and value written to
    row `slot` of the caches; attention reads rows 0..n_keys-1. Also gives what the MoE block starts from:
    h = RMSNorm(y) with the layer's mlp_norm, and the router's logits for h. x: float32 [hidden] holding bf16
    values; returns (y, h) as such, and the logits as bf16 [experts]."""
    x = _f32(x.reshape(-1))
    y, h = torch.empty_like(x), torch.empty_like(x)
    logits = torch.empty(lw.gate_w.shape[0], dtype=torch.bfloat16)
    _kernels.attention_block(_ptr(x), _ptr(lw.attn_norm), _ptr(lw.qkv_w), _ptr(lw.qkv_b), _ptr(cos2), _ptr(sin2),
                             _ptr(k_cache), _ptr(v_cache), _ptr(lw.sinks), _ptr(lw.out_w), _ptr(lw.out_b), _ptr(y),
                             slot, n_keys, heads, kv_heads, head_dim, x.shape[-1], eps,
                             _ptr(lw.mlp_norm), _ptr(lw.gate_w), _ptr(lw.gate_b), logits.numel(), _ptr(h),
                             _ptr(logits))
    return y, h, logits


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the bf16 kernel for the small batches of decoding (memory-bound: read w once, fast)."""
    if (w.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[0] <= SMALL_BATCH and x.device.type == "cpu"
            and w.shape[1] % 32 == 0 and w.is_contiguous() and fast_kernels()):
        return bf16_matmul(x, w, bias).to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    if x.device.type != "cpu" or not fast_kernels():
        return torch.nn.functional.linear(x, w, bias)
    # a large GEMM (prefill): torch gets every core for it, and gives them back for the kernels that follow
    threads = torch.get_num_threads()
    torch.set_num_threads(kernel_threads())
    try:
        return torch.nn.functional.linear(x, w, bias)
    finally:
        torch.set_num_threads(threads)
