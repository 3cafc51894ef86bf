"""The reference backend: every heavy operation in plain torch, on any device and dtype.

It is the oracle the other backends are tested against, and the fallback where they do not apply. MXFP4
experts are decoded one at a time, only when a token routes to them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..model.checkpoint import LayerWeights, Weights
from ..model.config import ModelConfig
from ..model.mxfp4 import mxfp4_dequantize
from ..model.q8 import Q8, dequantize, unpack_kv
from .base import Backend

if TYPE_CHECKING:
    from ..engine.kv_cache import KVCache
    from ..model.transformer import Transformer


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, q_start: int,
              k_start: int, window: int, block: int = 256) -> torch.Tensor:
    """Causal GQA with per-head sinks. q [T, H, D] at positions q_start.., k/v [S, KV, D] at k_start...

    window > 0: query i sees key j only if i - j < window. The sink is an extra logit in each head's
    softmax whose probability is dropped, so rows sum to less than one. Queries go in blocks to bound memory.
    """
    t_all, h, d = q.shape
    kv = k.shape[1]
    g = h // kv
    sink = sinks.view(kv, g, 1, 1).float()
    out = q.new_empty(t_all, h * d)
    if q.device.type == "cpu":  # CPU GEMMs on these thin bf16 shapes are several times slower than in float32
        q, k, v = q.float(), k.float(), v.float()
    for b0 in range(0, t_all, block):
        b1 = min(t_all, b0 + block)
        qp0, qp1 = q_start + b0, q_start + b1
        lo = max(k_start, qp0 - window + 1) if window else k_start
        kb = k[lo - k_start: qp1 - k_start].permute(1, 2, 0)  # [KV, D, S]
        vb = v[lo - k_start: qp1 - k_start].permute(1, 0, 2)  # [KV, S, D]
        n = b1 - b0
        # [KV, G*T, D]: the G query heads of a KV head, all tokens, as one plain batched matmul
        qb = q[b0:b1].view(n, kv, g, d).permute(1, 2, 0, 3).reshape(kv, g * n, d)
        scores = torch.bmm(qb, kb).float().view(kv, g, n, -1) * d**-0.5  # [KV, G, T, S]
        if n > 1:  # a single query (decoding) sees every key from lo on: no mask to build
            dist = torch.arange(qp0, qp1)[:, None] - torch.arange(lo, qp1)[None, :]
            visible = (dist >= 0) & (dist < window) if window else dist >= 0
            scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
        m = torch.maximum(scores.amax(-1, keepdim=True), sink)
        e = torch.exp(scores - m)
        probs = e / (e.sum(-1, keepdim=True) + torch.exp(sink - m))
        o = torch.bmm(probs.to(v.dtype).view(kv, g * n, -1), vb).view(kv, g, n, d)
        out[b0:b1] = o.permute(2, 0, 1, 3).reshape(n, h * d)
    return out


def one_token_steps(attention: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`attention` (a backend's, same arguments) applied to queries q [T, H, D] at q_start.. one at a time, each
    over the keys the one-token step at its position reads, in the order it reads them: on a sliding layer, the
    ring as it would lie then (slot j holding the position that is j modulo the window), not the window in
    position order. The same keys in another order give other float sums, and a checked candidate must get the
    logits of the step that would have decoded it (speculative decoding then cannot change a greedy token)."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, q_start: int, k_start: int,
               window: int) -> torch.Tensor:
        out = []
        for i in range(q.shape[0]):
            p = q_start + i
            lo = max(k_start, p - window + 1) if window else k_start
            keys, values = k[lo - k_start:p + 1 - k_start], v[lo - k_start:p + 1 - k_start]
            if window and p + 1 > window:  # a full ring: from the slot-0 position on, then the older ones
                r = -lo % window
                keys, values = torch.cat([keys[r:], keys[:r]]), torch.cat([values[r:], values[:r]])
            out.append(attention(q[i:i + 1], keys, values, sinks, p, p + 1 - keys.shape[0], window))
        return torch.cat(out)

    return attend


def swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """Clamped SwiGLU on interleaved gate/up columns: gate = h[..., 0::2], up = h[..., 1::2]."""
    gate, up = h[..., 0::2].clamp(max=limit), h[..., 1::2].clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


class TorchBackend(Backend):
    """Reference operations (the contract is base.py's `Backend`)."""

    name = "torch"

    def prepare(self, weights: Weights) -> None:
        """Adapt the loaded weights once, at load (nothing to do here)."""

    def running(self) -> contextlib.AbstractContextManager:
        """Entered around each forward pass (a backend may set up threads for it)."""
        return contextlib.nullcontext()

    def layers(self, model: Transformer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               caches: list[KVCache], sizes: list[int], checking: Sequence[int] = ()) -> torch.Tensor:
        """Every layer of `model` on x [T, hidden] (sizes[b] rows of each sequence b), in order."""
        for i in range(len(model.w.layers)):
            x = model.layer(i, x, cos, sin, caches, sizes, checking=checking)
        return x

    def rms_norm(self, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        """x / sqrt(mean(x^2) + eps) * scale, in float32, in x's dtype."""
        return F.rms_norm(x.float(), scale.shape, scale, eps).to(x.dtype)

    def linear(self, x: torch.Tensor, w: torch.Tensor | Q8, bias: torch.Tensor | None = None,
               alone: Sequence[int] = ()) -> torch.Tensor:
        """x @ w.T + bias. alone: rows of decoding sequences, which a backend computes as it computes a sequence
        decoding alone, whatever else the step carries (the reference computes every row one way)."""
        if isinstance(w, Q8):  # the 8-bit mode's matrices, decoded for this product
            w = dequantize(w, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, window: int,
               caches: list[KVCache], sizes: list[int], state: Any = None,
               checking: Sequence[int] = ()) -> torch.Tensor:
        """Attention of a layer for sizes[b] rows of each sequence b: their new keys and values [T, KV, D] go into
        the sequence's cache, and its queries [T, H, D] attend to the keys they see there. Returns [T, H*D]."""
        parts, row = [], 0
        for b, (cache, n) in enumerate(zip(caches, sizes, strict=True)):
            keys, values, k_start = cache.update(layer, k[row:row + n], v[row:row + n])
            attend = one_token_steps(self.attention) if b in checking else self.attention
            parts.append(attend(q[row:row + n], keys, values, sinks, cache.length, k_start, window))
            row += n
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, q_start: int,
                  k_start: int, window: int) -> torch.Tensor:
        """One sequence's queries q [T, H, D] at positions q_start.. over keys k/v [S, KV, D] at k_start.. (or a
        q8 cache's packed rows, unpacked here: see engine/kv_cache.py)."""
        if k.dtype == torch.uint8:
            k, v = unpack_kv(k, q.dtype), unpack_kv(v, q.dtype)
        return attention(q, k, v, sinks, q_start, k_start, window)

    def experts(self, x: torch.Tensor, lw: LayerWeights, chosen: torch.Tensor, weight: torch.Tensor,
                cfg: ModelConfig, alone: Sequence[int] = ()) -> torch.Tensor:
        """sum over each token's chosen experts [T, k] of weight [T, k] * expert(x); tokens sharing an expert
        go together, experts in ascending order. alone: as for linear."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, tok, slot in tokens_by_expert(chosen):
            w1 = mxfp4_dequantize(lw.w1_blocks[e], lw.w1_scales[e], x.dtype)
            a = swiglu(F.linear(x[tok], w1, lw.w1_bias[e].to(x.dtype)).float(), cfg.swiglu_alpha, cfg.swiglu_limit)
            w2 = mxfp4_dequantize(lw.w2_blocks[e], lw.w2_scales[e], x.dtype)
            y = F.linear(a.to(x.dtype), w2, lw.w2_bias[e].to(x.dtype))
            out.index_add_(0, tok, y.float() * weight[tok, slot, None])
        return out.to(x.dtype)


def tokens_by_expert(chosen: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, the tokens routed to it, the slot of the choice) for each expert chosen, in ascending order."""
    for e in chosen.unique().tolist():
        tok, slot = (chosen == e).nonzero(as_tuple=True)
        yield e, tok, slot
