"""The opt-in 8-bit mode (`quantization="q8"`): the attention projections and the unembedding held as 8-bit values
with a float16 scale for each 32 of a row (llama.cpp's q8_0), made at load from the bf16 checkpoint. The experts
stay MXFP4; the embedding (read one row a token), the router and the norms stay as they are. A decode step then
reads ~2.5 GB instead of ~3.7 for the 20b. A prompt's expert products, compute-bound, round their inputs to int8
for each 32 values as llama.cpp's do and run on int8 dot products (backends/cpu.py, csrc/x86_q8_prompts.c). The
cost in accuracy is measured by benchmarks/q8.py and bounded in tests/model/test_q8.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checkpoint import Weights

Kernel = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
GROUP = 32
ROWS_AT_ONCE = 4096  # rows quantized together: the unembedding's 201,088 rows never exist as float32 all at once


@dataclass
class Q8:
    """A matrix [out, in] as int8 `values` [out, in] and float16 `scales` [out, in / 32]: weight = value * scale.
    `source`: the matrix it was made from, as loaded (memory-mapped from the checkpoint where the layout allows),
    which a prompt's many rows use: their products are compute-bound, so 8 bits would save them nothing, and the
    exact weights give the KV cache exactly. Decoding, memory-bound, reads the 8 bits."""

    values: torch.Tensor
    scales: torch.Tensor
    source: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def nbytes(self) -> int:
        """What decoding reads (the source stays on disk until a prompt pages it in)."""
        return self.values.nbytes + self.scales.nbytes


def quantize(w: torch.Tensor, kernel: Kernel | None = None) -> Q8:
    """Round each group of 32 of a row to 127 steps of its largest magnitude (the scale as float16, and the values
    rounded with that float16 scale, so that value * scale is what the kernels compute). `kernel`: a faster
    function giving the same (values, scales) for a bf16 matrix (the C kernels' quantize_q8: the 20b's matrices
    in ~1 s instead of ~10); this torch version is its reference."""
    if w.shape[-1] % GROUP:
        raise ValueError(f"q8 needs rows of a multiple of {GROUP} values, got {w.shape[-1]}")
    if kernel is not None and w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous():
        return Q8(*kernel(w), w)
    return quantize_torch(w)


def quantize_torch(w: torch.Tensor) -> Q8:
    out, n_in = w.shape
    values = torch.empty(out, n_in, dtype=torch.int8)
    scales = torch.empty(out, n_in // GROUP, dtype=torch.float16)
    for r in range(0, out, ROWS_AT_ONCE):
        g = w[r:r + ROWS_AT_ONCE].float().view(-1, n_in // GROUP, GROUP)
        s = (g.abs().amax(-1) / 127).half()
        safe = torch.where(s > 0, s.float(), torch.ones_like(s, dtype=torch.float32))
        values[r:r + ROWS_AT_ONCE] = (g / safe[..., None]).round().clamp(-127, 127).to(torch.int8).view(-1, n_in)
        scales[r:r + ROWS_AT_ONCE] = s
    return Q8(values, scales, w)


def dequantize(q: Q8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out, n_in = q.values.shape
    w = q.values.float().view(out, n_in // GROUP, GROUP) * q.scales.float()[..., None]
    return w.view(out, n_in).to(dtype)


def quantize_weights(weights: Weights, kernel: Kernel | None = None) -> None:
    """The 8-bit mode, in place: the layers' qkv and output projections and the unembedding become Q8."""
    for lw in weights.layers:
        lw.qkv_w, lw.out_w = quantize(lw.qkv_w, kernel), quantize(lw.out_w, kernel)
    weights.unembedding = quantize(weights.unembedding, kernel)


# ---- the 8-bit KV cache (kv_cache_dtype="q8") ----------------------------------------------------------------------
# A cached key or value row of one KV head is packed as its q8_0 form: the head_dim int8 values, then the float16
# scale of each 32 of them, little-endian (68 bytes for head_dim 64, against 128 in bf16). One uint8 tensor
# [positions, kv_heads, row bytes] holds them, so the cache's slicing, ring slots, copies and the prefix cache's
# blocks work on it as on bf16 rows. The C kernels read it in place (csrc/kernels.c, attention over a q8 cache).


def kv_row_bytes(head_dim: int) -> int:
    """Bytes of one packed q8 row of head_dim values."""
    return head_dim + 2 * (head_dim // GROUP)


def pack_kv(x: torch.Tensor) -> torch.Tensor:
    """Keys or values [T, kv_heads, head_dim] (bf16 or float32) as packed q8 rows, uint8 [T, kv_heads, row bytes]:
    the same rounding as `quantize` (so the C kernels' writes give the same bytes)."""
    t, kv, d = x.shape
    q = quantize_torch(x.reshape(t * kv, d))
    return torch.cat([q.values.view(torch.uint8), q.scales.view(torch.uint8)], dim=1).view(t, kv, kv_row_bytes(d))


UNPACK_ROWS = 65536  # rows unpacked at a time: a prompt over a long context never holds all of them in float32


def unpack_kv(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed q8 rows [T, kv_heads, row bytes] as values [T, kv_heads, head_dim] of `dtype`."""
    t, kv, nbytes = packed.shape
    d = nbytes * GROUP // (GROUP + 2)
    rows = packed.reshape(t * kv, nbytes)
    out = torch.empty(t * kv, d, dtype=dtype, device=packed.device)
    for r in range(0, t * kv, UNPACK_ROWS):
        part = rows[r:r + UNPACK_ROWS]
        q = Q8(part[:, :d].contiguous().view(torch.int8), part[:, d:].contiguous().view(torch.float16))
        out[r:r + UNPACK_ROWS] = dequantize(q, dtype)
    return out.view(t, kv, d)
