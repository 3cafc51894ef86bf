"""ossie's Triton kernels for NVIDIA GPUs: the MXFP4 experts and attention with sinks.

Experts stay packed. A kernel reads MXFP4 bytes and E8M0 scales and decodes them in registers: the low nibble of a
byte is the even element of the pair, the high nibble the odd one, so a tile of bytes multiplies the even and the
odd columns of the activations separately and nothing is ever interleaved or copied. Each expert is two kernels:
the first product with its bias and the clamped SwiGLU fused (gate/up rows interleaved, as the checkpoint stores
them), the second with its bias and the routing weight. Two shapes:
- decoding (a few tokens): a GEMV per (token, chosen expert) and block of output rows, every SM streaming weights;
- a prompt (many tokens): a grouped GEMM over the (token, expert) pairs sorted by expert, each expert's pairs
  padded to whole row blocks, so every weight tile is read once per block of tokens.
Sorting happens on the device without a host sync (the grid is an upper bound; spare blocks exit), so a decode step
can be captured in a CUDA graph.

Attention: a FlashAttention-2 style prefill kernel whose running max starts at the head's sink logit (so the sink
sits in the denominator and nowhere else) with a band mask on sliding layers, and a flash-decoding kernel that
splits each sequence's keys and folds the sink into the final combine. Decoding reads each sequence's KV rows
through a table of addresses, so one launch serves a batch whose caches live in separate buffers.

Tiles stay within the 99 KB of shared memory of consumer cards (sm86/sm89) and use only instructions Ampere has.
The kernels run under TRITON_INTERPRET=1 on CPU tensors (CI tests them so, in float32: the interpreter computes
tl.dot of bf16 tiles wrongly on CPU).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# ---- MXFP4 -----------------------------------------------------------------------------------------------------


@triton.jit
def _nibbles(b):
    """The two E2M1 values of MXFP4 bytes b (int32, 0..255) as float32, each 2**-14 times its true value: a
    nibble's three magnitude bits, moved to a float16's two lowest exponent bits and its top mantissa bit, are that
    float16 (subnormals 0 and 0.5 included, which float16 keeps exactly), and its sign bit is the float16's. Five
    integer operations per value instead of decoding exponent and mantissa; callers multiply 2**14 into the block
    scale, once per 32 weights."""
    lo = ((b << 12) & 0x8000) | ((b << 9) & 0x0E00)
    hi = ((b << 8) & 0x8000) | ((b << 5) & 0x0E00)
    return (lo.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32),
            hi.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32))


@triton.jit
def _scale(s):
    """E8M0 scale bytes (int32) as the float32 2**(s-127) * 2**14 that undoes _nibbles' offset (a byte of 0 gives
    0 rather than the subnormal 2**-127, a weight of no consequence; 255 gives inf as in the reference)."""
    return (s << 23).to(tl.float32, bitcast=True) * 16384.0


@triton.jit
def _swiglu(gate, up, alpha, limit):
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    return gate * tl.sigmoid(alpha * gate) * (up + 1.0)


@triton.jit
def _gemv_rows(x_ptr, blocks_ptr, scales_ptr, rows, row_mask, K,
               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 [BLOCK_R]: rows `rows` of an MXFP4 matrix (blocks [*, K/2] bytes, scales [*, K/32]) times x [K]. x
    is read contiguously and split into its even and odd elements, which meet the low and high nibbles."""
    half: tl.constexpr = BLOCK_K // 2
    groups: tl.constexpr = BLOCK_K // 32
    acc = tl.zeros([BLOCK_R, groups], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        xe, xo = tl.split(tl.reshape(tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32), (half, 2)))
        j = k0 // 2 + tl.arange(0, half)  # byte index in the row
        b = tl.load(blocks_ptr + rows[:, None] * (K // 2) + j[None, :], mask=row_mask[:, None] & (j < K // 2)[None, :],
                    other=0).to(tl.int32)
        lo, hi = _nibbles(b)
        part = tl.reshape(lo * xe[None, :] + hi * xo[None, :], (BLOCK_R, groups, 16))
        g = k0 // 32 + tl.arange(0, groups)
        s = tl.load(scales_ptr + rows[:, None] * (K // 32) + g[None, :],
                    mask=row_mask[:, None] & (g < K // 32)[None, :], other=0).to(tl.int32)
        acc += tl.sum(part, axis=2) * _scale(s)  # a power of two: the same as scaling each weight
    return tl.sum(acc, axis=1)


@triton.jit
def _moe_up_gemv(x_ptr, expert_ptr, blocks_ptr, scales_ptr, bias_ptr, a_ptr, K, F, alpha, limit,
                 TOPK: tl.constexpr, ROUND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """a[pair, n] = SwiGLU(x[token] @ w1[e].T + b1[e]) for the BLOCK_R // 2 activations n of one (token, expert)
    pair whose gate and up rows (interleaved, as the checkpoint stores them) are rows r of this block."""
    pair = tl.program_id(0)
    e = tl.load(expert_ptr + pair).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < 2 * F
    w_blocks = blocks_ptr + e * (2 * F) * (K // 2)
    w_scales = scales_ptr + e * (2 * F) * (K // 32)
    y = _gemv_rows(x_ptr + (pair // TOPK).to(tl.int64) * K, w_blocks, w_scales, r, rm, K, BLOCK_R, BLOCK_K)
    y += tl.load(bias_ptr + e * 2 * F + r, mask=rm, other=0.0)
    if ROUND:  # the reference's product is rounded to the activations' dtype before the SwiGLU
        y = y.to(a_ptr.dtype.element_ty).to(tl.float32)
    gate, up = tl.split(tl.reshape(y, (BLOCK_R // 2, 2)))
    n = tl.program_id(1) * (BLOCK_R // 2) + tl.arange(0, BLOCK_R // 2)
    tl.store(a_ptr + pair.to(tl.int64) * F + n, _swiglu(gate, up, alpha, limit).to(a_ptr.dtype.element_ty),
             mask=n < F)


@triton.jit
def _moe_down_gemv(a_ptr, expert_ptr, weight_ptr, blocks_ptr, scales_ptr, bias_ptr, y_ptr, F, H,
                   ROUND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[pair, n] = weight[pair] * (a[pair] @ w2[e].T + b2[e]) for BLOCK_R outputs n, float32."""
    pair = tl.program_id(0)
    e = tl.load(expert_ptr + pair).to(tl.int64)
    n = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    nm = n < H
    y = _gemv_rows(a_ptr + pair.to(tl.int64) * F, blocks_ptr + e * H * (F // 2), scales_ptr + e * H * (F // 32),
                   n, nm, F, BLOCK_R, BLOCK_K)
    y += tl.load(bias_ptr + e * H + n, mask=nm, other=0.0)
    if ROUND:
        y = y.to(a_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + pair.to(tl.int64) * H + n, y * tl.load(weight_ptr + pair), mask=nm)


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    if F32:  # exact float32 products (tensor cores would round the inputs to tf32)
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _gemm_tile(x_ptr, x_rows, x_mask, blocks_ptr, scales_ptr, w_rows, w_mask, K, acc,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, F32: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += x[x_rows, :K] @ W[w_rows, :K].T for an MXFP4 W. The weight tile is read as
    [bytes, rows] (a K-major right operand, which the tensor cores take as it is); the even and odd columns of x meet
    the low and high nibbles in two products."""
    half: tl.constexpr = BLOCK_K // 2
    groups: tl.constexpr = BLOCK_K // 32
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + x_rows[:, None] * K + kk[None, :], mask=x_mask[:, None] & (kk < K)[None, :], other=0.0)
        xe, xo = tl.split(tl.reshape(x, (BLOCK_M, half, 2)))
        j = k0 // 2 + tl.arange(0, half)
        b = tl.load(blocks_ptr + w_rows[None, :] * (K // 2) + j[:, None],
                    mask=(j < K // 2)[:, None] & w_mask[None, :], other=0).to(tl.int32)
        g = k0 // 32 + tl.arange(0, groups)
        s = _scale(tl.load(scales_ptr + w_rows[None, :] * (K // 32) + g[:, None],
                           mask=(g < K // 32)[:, None] & w_mask[None, :], other=0).to(tl.int32))
        lo, hi = _nibbles(b)
        # exact in bf16: two significant bits times a power of two
        lo = tl.reshape(tl.reshape(lo, (groups, 16, BLOCK_N)) * s[:, None, :], (half, BLOCK_N)).to(x.dtype)
        hi = tl.reshape(tl.reshape(hi, (groups, 16, BLOCK_N)) * s[:, None, :], (half, BLOCK_N)).to(x.dtype)
        acc += _dot(xe, lo, F32)
        acc += _dot(xo, hi, F32)
    return acc


@triton.jit
def _moe_up_gemm(x_ptr, pairs_ptr, block_expert_ptr, blocks_ptr, scales_ptr, bias_ptr, a_ptr, P, K, F, alpha, limit,
                 TOPK: tl.constexpr, ROUND: tl.constexpr, F32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The grouped first product: BLOCK_M pairs of one expert (sorted, padded) by BLOCK_N rows of w1 (gate and up
    interleaved: BLOCK_N // 2 activations)."""
    e = tl.load(block_expert_ptr + tl.program_id(0)).to(tl.int64)
    if e < 0:  # past the last block of the last expert
        return
    pair = tl.load(pairs_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
    pm = pair < P
    r = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = r < 2 * F
    y = _gemm_tile(x_ptr, (pair // TOPK).to(tl.int64), pm, blocks_ptr + e * (2 * F) * (K // 2),
                   scales_ptr + e * (2 * F) * (K // 32), r, rm, K, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                   BLOCK_M, BLOCK_N, BLOCK_K, F32)
    y += tl.load(bias_ptr + e * 2 * F + r, mask=rm, other=0.0)[None, :]
    if ROUND:
        y = y.to(a_ptr.dtype.element_ty).to(tl.float32)
    gate, up = tl.split(tl.reshape(y, (BLOCK_M, BLOCK_N // 2, 2)))
    n = tl.program_id(1) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(a_ptr + pair.to(tl.int64)[:, None] * F + n[None, :],
             _swiglu(gate, up, alpha, limit).to(a_ptr.dtype.element_ty), mask=pm[:, None] & (n < F)[None, :])


@triton.jit
def _moe_down_gemm(a_ptr, pairs_ptr, block_expert_ptr, weight_ptr, blocks_ptr, scales_ptr, bias_ptr, y_ptr, P, F, H,
                   ROUND: tl.constexpr, F32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The grouped second product, times each pair's routing weight, float32."""
    e = tl.load(block_expert_ptr + tl.program_id(0)).to(tl.int64)
    if e < 0:
        return
    pair = tl.load(pairs_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
    pm = pair < P
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < H
    y = _gemm_tile(a_ptr, pair.to(tl.int64), pm, blocks_ptr + e * H * (F // 2), scales_ptr + e * H * (F // 32), n, nm,
                   F, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), BLOCK_M, BLOCK_N, BLOCK_K, F32)
    y += tl.load(bias_ptr + e * H + n, mask=nm, other=0.0)[None, :]
    if ROUND:
        y = y.to(a_ptr.dtype.element_ty).to(tl.float32)
    y *= tl.load(weight_ptr + pair, mask=pm, other=0.0)[:, None]
    tl.store(y_ptr + pair.to(tl.int64)[:, None] * H + n[None, :], y, mask=pm[:, None] & nm[None, :])


@dataclass(frozen=True)
class Tiles:
    """One launch shape of the MoE kernels: rows of W and K elements per step, warps, pipeline stages, and (for the
    grouped GEMM) pairs per block."""
    rows: int
    k: int
    warps: int = 4
    stages: int = 3
    m: int = 16


GEMV_PAIRS = 8  # up to this many (token, expert) pairs the GEMV shape wins: few tokens share an expert
# Launch shapes measured best on an H100 (benchmarks/gpu.py --kernels compares them: other shapes ran up to 2.9x
# slower). The grouped GEMM's are tried in order, the first whose pipeline fits the GPU's shared memory taken:
# consumer cards have 99 KB a block, and float32 tiles take twice the room of bf16 ones.
GEMV = Tiles(rows=32, k=1024, warps=4, stages=1)
GEMM_FEW = (Tiles(rows=64, k=64, warps=4, stages=3, m=16),  # decode steps of a batch: a few pairs per expert
            Tiles(rows=64, k=64, warps=4, stages=2, m=16))
GEMM_MANY = (Tiles(rows=128, k=64, warps=4, stages=3, m=128), Tiles(rows=64, k=128, warps=4, stages=2, m=128),
             Tiles(rows=64, k=64, warps=4, stages=2, m=64))  # prompts


def _shared_bytes(t: Tiles, element: int) -> int:
    """Shared memory a grouped-GEMM launch asks for, roughly: its pipeline stages of x and weight tiles (bytes and
    scales), plus room for the layout conversions (measured: Triton asked 237,568 bytes for a shape this puts at
    212,000)."""
    return t.stages * (t.m * t.k * element + t.rows * t.k // 2 + t.rows * t.k // 32) * 9 // 8 + 16384


@functools.cache
def _shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one block may use on this GPU (99 KB, a consumer card's, where torch does not say)."""
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 99 * 1024)


def _gemm_tiles(pairs: int, x: torch.Tensor) -> Tiles:
    shapes = GEMM_FEW if pairs <= 256 else GEMM_MANY
    if x.device.type != "cuda":  # Triton's interpreter: no limit
        return shapes[0]
    room = _shared_memory(x.device)
    return next((t for t in shapes if _shared_bytes(t, x.element_size()) <= room), shapes[-1])


def _sorted_pairs(chosen: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, expert) pairs (index token * k + slot) grouped by expert, each expert's run padded to whole
    blocks of block_m with the sentinel P, and each block's expert (-1 for the spare blocks at the end). All on the
    device with no host sync: the number of blocks is bounded by ceil(P / block_m) + min(E, P)."""
    flat = chosen.flatten().long()
    p, dev = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    rank = torch.arange(p, device=dev) - (counts.cumsum(0) - counts)[expert]
    max_blocks = triton.cdiv(p, block_m) + min(num_experts, p)
    pairs = torch.full((max_blocks * block_m,), p, dtype=torch.int32, device=dev)
    pairs[(padded_end - padded)[expert] + rank] = order.to(torch.int32)
    block_expert = torch.searchsorted(padded_end, torch.arange(max_blocks, device=dev) * block_m, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return pairs, block_expert


def moe(x: torch.Tensor, w1_blocks: torch.Tensor, w1_scales: torch.Tensor, w1_bias: torch.Tensor,
        w2_blocks: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor, chosen: torch.Tensor,
        weight: torch.Tensor, alpha: float, limit: float, tiles: Tiles | None = None) -> torch.Tensor:
    """sum over each token's chosen experts [T, k] of weight [T, k] * expert(x), x [T, hidden] in bf16 or float32;
    the result in x's dtype. Products accumulate in float32; each product is rounded to x's dtype where the torch
    reference rounds it (after the bias, before the SwiGLU and the routing weight). `tiles` overrides the launch
    shape chosen for the number of pairs (the benchmark compares shapes with it)."""
    t, h = x.shape
    num_experts, f2 = w1_blocks.shape[:2]
    f, topk = f2 // 2, chosen.shape[1]
    p = t * topk
    x = x.contiguous()
    weight = weight.float().contiguous()
    rnd, f32 = x.dtype != torch.float32, x.dtype == torch.float32
    a = torch.empty(p, f, dtype=x.dtype, device=x.device)
    y = torch.empty(p, h, dtype=torch.float32, device=x.device)
    if p <= GEMV_PAIRS:
        c = tiles or GEMV
        expert = chosen.flatten().to(torch.int32)
        launch = dict(num_warps=c.warps, num_stages=c.stages)
        _moe_up_gemv[(p, triton.cdiv(2 * f, c.rows))](x, expert, w1_blocks, w1_scales, w1_bias, a, h, f, alpha,
                                                        limit, TOPK=topk, ROUND=rnd, BLOCK_R=c.rows, BLOCK_K=c.k,
                                                        **launch)
        _moe_down_gemv[(p, triton.cdiv(h, c.rows))](a, expert, weight, w2_blocks, w2_scales, w2_bias, y, f, h,
                                                      ROUND=rnd, BLOCK_R=c.rows, BLOCK_K=c.k, **launch)
    else:
        c = tiles or _gemm_tiles(p, x)
        pairs, block_expert = _sorted_pairs(chosen, num_experts, c.m)
        grid = lambda n: (block_expert.numel(), triton.cdiv(n, c.rows))  # noqa: E731
        launch = dict(F32=f32, BLOCK_M=c.m, BLOCK_N=c.rows, BLOCK_K=c.k, num_warps=c.warps, num_stages=c.stages)
        _moe_up_gemm[grid(2 * f)](x, pairs, block_expert, w1_blocks, w1_scales, w1_bias, a, p, h, f, alpha, limit,
                                  TOPK=topk, ROUND=rnd, **launch)
        _moe_down_gemm[grid(h)](a, pairs, block_expert, weight, w2_blocks, w2_scales, w2_bias, y, p, f, h, ROUND=rnd,
                                **launch)
    return y.view(t, topk, h).sum(1).to(x.dtype)


# ---- attention ---------------------------------------------------------------------------------------------------


@triton.jit
def _attention_prefill(q_ptr, k_ptr, v_ptr, sinks_ptr, out_ptr, T, S, q_off, window, sm_scale,
                       sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, G: tl.constexpr, D: tl.constexpr, F32: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Queries i of one head (key coordinates q_off + i) over keys j with 0 <= q_off + i - j (< window)."""
    h = tl.program_id(1)
    kvh = h // G
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    im = i < T
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(q_ptr + i[:, None] * sq_t + h * sq_h + d[None, :], mask=im[:, None] & dm[None, :], other=0.0)
    qpos = q_off + i
    # the sink seeds the online softmax: max = sink, sum = exp(sink - max) = 1, and it adds nothing to the values
    m = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(sinks_ptr + h)
    den = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    first_q = q_off + tl.program_id(0) * BLOCK_M
    lo = 0
    if window > 0:
        lo = tl.maximum(first_q - window + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(first_q + BLOCK_M, S)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jm = j < S
        kv_mask = jm[:, None] & dm[None, :]
        k = tl.load(k_ptr + j[:, None] * sk_t + kvh * sk_h + d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), F32) * sm_scale
        dist = qpos[:, None] - j[None, :]
        visible = (dist >= 0) & jm[None, :]
        if window > 0:
            visible = visible & (dist < window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        scale = tl.exp(m - m_new)
        den = den * scale + tl.sum(p, axis=1)
        v = tl.load(v_ptr + j[:, None] * sv_t + kvh * sv_h + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * scale[:, None] + _dot(p.to(v.dtype), v, F32)
        m = m_new
    out = acc / den[:, None]
    tl.store(out_ptr + i[:, None] * (tl.num_programs(1) * D) + h * D + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=im[:, None] & dm[None, :])


@triton.jit
def _attention_decode_split(q_ptr, k_table, v_table, n_ptr, part_ptr, stat_ptr, sm_scale,
                            H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                            F32: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One query (per sequence b) of the G heads sharing KV head kvh, over split `sp` of its n[b] keys, all of which
    it sees (a sliding layer's ring holds only the window). Keys are rows [n, KV, D] at the address k_table[b]."""
    b, kvh, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G: tl.constexpr = H // KV
    g = tl.arange(0, BLOCK_G)
    gm = g < G
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    heads = kvh * G + g
    q = tl.load(q_ptr + b * H * D + heads[:, None] * D + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    kp = tl.load(k_table + b).to(tl.pointer_type(q_ptr.dtype.element_ty))
    vp = tl.load(v_table + b).to(tl.pointer_type(q_ptr.dtype.element_ty))
    n = tl.load(n_ptr + b)
    per_split = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_S) * BLOCK_S
    start = sp * per_split
    end = tl.minimum(n, start + per_split)
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    den = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for j0 in range(start, end, BLOCK_S):
        j = (j0 + tl.arange(0, BLOCK_S)).to(tl.int64)
        jm = j < end
        kv_mask = jm[:, None] & dm[None, :]
        k = tl.load(kp + (j[:, None] * KV + kvh) * D + d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), F32) * sm_scale
        s = tl.where(jm[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every block holds a key
        p = tl.exp(s - m_new[:, None])
        scale = tl.exp(m - m_new)
        den = den * scale + tl.sum(p, axis=1)
        v = tl.load(vp + (j[:, None] * KV + kvh) * D + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * scale[:, None] + _dot(p.to(v.dtype), v, F32)
        m = m_new
    row = (b * H + heads) * SPLITS + sp
    tl.store(part_ptr + row[:, None] * D + d[None, :], acc, mask=gm[:, None] & dm[None, :])
    tl.store(stat_ptr + row * 2, m, mask=gm)
    tl.store(stat_ptr + row * 2 + 1, den, mask=gm)


@triton.jit
def _attention_decode_combine(part_ptr, stat_ptr, sinks_ptr, out_ptr, H: tl.constexpr, D: tl.constexpr,
                              SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per (sequence, head): the splits' partial softmaxes merged, with the sink logit in the denominator."""
    b, h = tl.program_id(0), tl.program_id(1)
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    row = (b * H + h) * SPLITS + sp
    m = tl.load(stat_ptr + row * 2)
    den = tl.load(stat_ptr + row * 2 + 1)
    sink = tl.load(sinks_ptr + h)
    top = tl.maximum(tl.max(m, axis=0), sink)
    w = tl.exp(m - top)  # empty splits: exp(-inf) = 0
    total = tl.sum(den * w, axis=0) + tl.exp(sink - top)
    acc = tl.load(part_ptr + row[:, None] * D + d[None, :], mask=dm[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / total
    tl.store(out_ptr + (b * H + h) * D + d, out.to(out_ptr.dtype.element_ty), mask=dm)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, q_offset: int,
                      window: int) -> torch.Tensor:
    """Causal GQA with sinks: q [T, H, D] at key coordinates q_offset.., k/v [S, KV, D] at 0..; [T, H*D]."""
    t, h, d = q.shape
    kv = k.shape[1]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(t, h * d, dtype=q.dtype, device=q.device)
    block_m = 64 if t >= 64 else 16
    _attention_prefill[(triton.cdiv(t, block_m), h)](
        q, k, v, sinks, out, t, k.shape[0], q_offset, window, d**-0.5, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), G=h // kv, D=d, F32=q.dtype == torch.float32, BLOCK_M=block_m,
        BLOCK_N=64, BLOCK_D=_pow2(d))
    return out


DECODE_BLOCK = 64  # keys per step of the decode kernel


def decode_splits(max_keys: int) -> int:
    """Splits of each sequence's keys: enough programs to fill the GPU at long contexts, few at short ones."""
    return min(32, _pow2(triton.cdiv(max_keys, 4 * DECODE_BLOCK), 1))


def attention_decode(q: torch.Tensor, k_table: torch.Tensor, v_table: torch.Tensor, n_keys: torch.Tensor,
                     sinks: torch.Tensor, num_kv_heads: int, splits: int) -> torch.Tensor:
    """One query per sequence: q [B, H, D]; sequence b's n_keys[b] keys and values are rows [n, KV, D] at the
    addresses k_table[b], v_table[b] (int64, on q's device), any order. Returns [B, H*D]."""
    bsz, h, d = q.shape
    q = q.contiguous()
    part = torch.empty(bsz * h * splits, d, dtype=torch.float32, device=q.device)
    stat = torch.empty(bsz * h * splits, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(bsz, h * d, dtype=q.dtype, device=q.device)
    f32 = q.dtype == torch.float32
    _attention_decode_split[(bsz, num_kv_heads, splits)](
        q, k_table, v_table, n_keys, part, stat, d**-0.5, H=h, KV=num_kv_heads, D=d, SPLITS=splits, F32=f32,
        BLOCK_G=_pow2(h // num_kv_heads), BLOCK_S=DECODE_BLOCK, BLOCK_D=_pow2(d))
    _attention_decode_combine[(bsz, h)](part, stat, sinks, out, H=h, D=d, SPLITS=splits, BLOCK_D=_pow2(d, 1))
    return out


@triton.jit
def _write_kv(k_ptr, v_ptr, k_table, v_table, slot_ptr, ROW: tl.constexpr, BLOCK: tl.constexpr):
    """Row slot[b] of sequence b's key and value buffers (addresses in the tables) := k[b], v[b]."""
    b = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    im = i < ROW
    slot = tl.load(slot_ptr + b)
    kp = tl.load(k_table + b).to(tl.pointer_type(k_ptr.dtype.element_ty))
    vp = tl.load(v_table + b).to(tl.pointer_type(v_ptr.dtype.element_ty))
    tl.store(kp + slot * ROW + i, tl.load(k_ptr + b * ROW + i, mask=im), mask=im)
    tl.store(vp + slot * ROW + i, tl.load(v_ptr + b * ROW + i, mask=im), mask=im)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_table: torch.Tensor, v_table: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Each sequence b's new key and value rows k[b], v[b] [KV, D] into its buffers at row slots[b]."""
    bsz = k.shape[0]
    row = k[0].numel()
    _write_kv[(bsz,)](k.contiguous(), v.contiguous(), k_table, v_table, slots, ROW=row, BLOCK=_pow2(row, 1))
