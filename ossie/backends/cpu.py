"""The CPU backend: ossie's C kernels (cpu_kernels) where they apply, the torch reference elsewhere.

- Decoding one sequence of a bf16 model (one token): each layer is two C calls, the attention block (which also
  normalizes for the MoE and computes the router's logits) and the MoE block with its residual add, with torch's
  top-k between them so that ties among the router's bf16 logits are broken as the peers break them. Several
  sequences (continuous batching) go op by op, every product over all their rows.
- Products: the bf16 kernel for the few rows of decoding (memory-bound: it reads each weight once); torch's GEMM
  on every core for prefill's many rows (compute-bound). MXFP4 experts are read packed, never decoded to bf16.
- Attention: one C call for a single query over the cache (any row order); prefill's queries each over the keys
  they see, where the AVX-512 kernel applies. A q8 KV cache's packed rows are read in place by both.
The kernels use every core; torch's OpenMP workers, which spin-wait after each parallel op, would take cores from
them. So torch runs on one thread during a forward pass, except in the large GEMMs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..model.checkpoint import LayerWeights, Weights
from ..model.config import ModelConfig
from ..model.q8 import Q8, dequantize
from ..model.transformer import route
from . import cpu_kernels as K
from .base import Backend
from .torch_ops import TorchBackend

if TYPE_CHECKING:
    from ..engine.kv_cache import KVCache
    from ..model.transformer import Transformer

SMALL_BATCH = 8  # up to this many rows, the bf16 kernel beats torch's GEMM; above, torch's GEMM is compute-bound


def _apart(alone: Sequence[int], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the decoding rows, the others) where a step's rows would not all take the decode kernels but its decoding
    rows can: more than SMALL_BATCH rows, of which 1..SMALL_BATCH decode. Then each decoding row is computed as it
    is alone (the products and the MoE kernel give each row what it gets alone); in one large product it went
    through torch's GEMM or the experts' panel kernel, whose sums depend on the other rows, and a sequence's tokens
    changed with the prompts that arrived beside it. None otherwise."""
    if not alone or len(alone) > SMALL_BATCH or x.shape[0] <= SMALL_BATCH:
        return None
    mask = torch.zeros(x.shape[0], dtype=torch.bool)
    mask[list(alone)] = True
    return mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)


class CpuBackend(Backend):
    name = "cpu"
    decoding_rows = SMALL_BATCH  # see _apart
    attend = TorchBackend.attend  # each sequence's keys into its cache, then `attention` (below) over them

    def __init__(self, fused_decode: bool = True):
        """fused_decode=False runs decoding op by op (the kernels still serve each op): the fused path's oracle."""
        if not K.available():
            raise RuntimeError("ossie's C kernels are not built (no C compiler at install?): use the torch backend")
        self.fused_decode = fused_decode
        # torch's bf16 GEMM is fast where the CPU has AVX-512 BF16 and pathological elsewhere (a 32 x 2880 x 5760
        # product took 26.5 s on a Zen 3, 0.17 s in float32): on AVX2 and ARM64 a prompt's bf16 products take the
        # kernels' panel GEMM (at the FMA peak, and no float32 copy of the weight per call), elsewhere torch's
        # float32 GEMM
        path = K.kernel_path()
        self.bf16_gemm = path == "avx512bf16"
        self.bf16_panel = path in ("avx2", "avxvnni", "neon", "dotprod", "i8mm")

    def prepare(self, weights: Weights) -> None:
        # the kernels read weights by pointer: they must be dense (they are, as loaded)
        for holder in (weights, *weights.layers):
            for name, t in vars(holder).items():
                if isinstance(t, torch.Tensor) and not t.is_contiguous():
                    setattr(holder, name, t.contiguous())

    def running(self) -> contextlib.AbstractContextManager:
        return K.torch_threads(1)

    def layers(self, model: Transformer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               caches: list[KVCache], sizes: list[int], checking: Sequence[int] = ()) -> torch.Tensor:
        if not (self.fused_decode and x.shape[0] == 1 and x.dtype == torch.bfloat16):
            return TorchBackend.layers(self, model, x, cos, sin, caches, sizes, checking)
        cfg, (cache,) = model.cfg, caches
        cos2, sin2 = cos[0].float(), sin[0].float()
        x = x[0].float()  # float32 holding bf16 values, as the kernels take and give them
        for i, lw in enumerate(model.w.layers):
            slot, n_keys = cache.decode_slot(i)
            x, h, logits = K.attention_block_one_token(x, lw, cos2, sin2, cache.k[i], cache.v[i], slot, n_keys,
                                                       cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps)
            chosen, weight = route(logits.view(1, -1), cfg.experts_per_token)
            x = K.moe(h.view(1, -1), lw.w1_blocks, lw.w1_scales, lw.w1_bias, lw.w2_blocks, lw.w2_scales, lw.w2_bias,
                      chosen, weight, cfg.swiglu_alpha, cfg.swiglu_limit, True, residual=x.view(1, -1))[0]
        return x.to(torch.bfloat16).view(1, -1)

    def rms_norm(self, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.dim() == 2:  # as the fused decoding blocks norm, bit for bit
            return K.rms_norm(x, scale, eps).to(x.dtype)
        return TorchBackend.rms_norm(self, x, scale, eps)

    def linear(self, x: torch.Tensor, w: torch.Tensor | Q8, bias: torch.Tensor | None = None,
               alone: Sequence[int] = ()) -> torch.Tensor:
        rows = _apart(alone, x)
        if rows is not None:  # decoding rows beside a prompt's: each as the decode kernels compute it alone
            out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
            out[rows[0]], out[rows[1]] = self.linear(x[rows[0]], w, bias), self.linear(x[rows[1]], w, bias)
            return out
        if isinstance(w, Q8):
            if x.dim() == 2 and x.shape[0] <= SMALL_BATCH:  # the 8-bit mode's decoding: read as it is stored
                return K.q8_matmul(x, w, bias).to(x.dtype)
            # a prompt's many rows: compute-bound, so the matrix as loaded serves (8 bits would save nothing)
            w = w.source if w.source is not None else dequantize(w, x.dtype)
        if (w.dtype == torch.bfloat16 and x.dim() == 2 and w.shape[1] % 32 == 0
                and (x.shape[0] <= SMALL_BATCH or (self.bf16_panel and x.dtype == torch.bfloat16))):
            return K.bf16_matmul(x, w, bias).to(x.dtype)
        with K.torch_threads(K.kernel_threads()):  # a large GEMM: torch gets every core, and gives them back
            if w.dtype == torch.bfloat16 and not self.bf16_gemm:  # bf16 values, exact in float32; rounded back
                return F.linear(x.float(), w.float(), None if bias is None else bias.to(x.dtype).float()).to(x.dtype)
            return TorchBackend.linear(self, x, w, bias)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, q_start: int,
                  k_start: int, window: int) -> torch.Tensor:
        if k.dtype in (torch.bfloat16, torch.float32, torch.uint8):  # uint8: a q8 cache's packed rows
            if q.shape[0] == 1:  # decoding: every key from `lo` on is visible to the single query, in any order
                lo = max(k_start, q_start - window + 1) if window else k_start
                return K.attention_one_query(q[0], k[lo - k_start:], v[lo - k_start:], sinks).view(1, -1).to(q.dtype)
            if k.dtype in (q.dtype, torch.uint8):
                out = K.attention_prefill(q, k, v, sinks, q_start - k_start, window)
                if out is not None:
                    return out.to(q.dtype)
        if q.shape[0] > 1:  # a prompt's attention in torch (no C kernel for this path or cache): on every core
            with K.torch_threads(K.kernel_threads()):
                return TorchBackend.attention(self, q, k, v, sinks, q_start, k_start, window)
        return TorchBackend.attention(self, q, k, v, sinks, q_start, k_start, window)

    def experts(self, x: torch.Tensor, lw: LayerWeights, chosen: torch.Tensor, weight: torch.Tensor,
                cfg: ModelConfig, alone: Sequence[int] = ()) -> torch.Tensor:
        rows = _apart(alone, x)
        if rows is not None:  # as linear's
            out = torch.empty_like(x)
            for r in rows:
                out[r] = self.experts(x[r], lw, chosen[r], weight[r], cfg)
            return out
        # one C call for all tokens: each chosen expert read once for the tokens that chose it, decoding's few
        # and a prompt's many alike (a call per expert and product left a thread waiting at each of them).
        # The 8-bit mode (its layers hold Q8 projections) on a prompt's rows: the experts' products on int8
        # activations, as llama.cpp's MXFP4 x q8_0 products (compute-bound there, where 8-bit weights would save
        # nothing, int8 dot products do ~2x fp32's work an instruction); decoding's rows, memory-bound, stay exact.
        q8 = isinstance(lw.qkv_w, Q8) and x.shape[0] > SMALL_BATCH
        y = K.moe(x, lw.w1_blocks, lw.w1_scales, lw.w1_bias, lw.w2_blocks, lw.w2_scales, lw.w2_bias, chosen,
                  weight, cfg.swiglu_alpha, cfg.swiglu_limit, x.dtype == torch.bfloat16, q8=q8)
        return y.to(x.dtype)
