"""The gpt-oss transformer: the whole forward pass, following the published math.

Per layer: x += Attn(RMSNorm(x)); x += MoE(RMSNorm(x)). Attention is grouped-query with a learned sink
logit per head, sliding-window (128) on even layers, YaRN rotary embeddings. The MoE routes each token to
its top-k experts, whose MXFP4 weights are decoded only when they are used.

The heavy operations (products, attention, the experts) are a backend's (ossie.backends), chosen once at
load: this module is the math and never asks which kernel runs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .checkpoint import Weights
from .config import ModelConfig

if TYPE_CHECKING:
    from ..backends import Backend
    from ..engine.kv_cache import KVCache


def yarn_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """YaRN: blend interpolated and extrapolated frequencies with a linear ramp; returns (inv_freq, concentration)."""
    d, base, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor
    freq = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    extrapolation, interpolation = 1.0 / freq, 1.0 / (factor * freq)

    def correction_dim(rotations: float) -> float:
        return d / 2 * math.log(cfg.initial_context_length / (rotations * 2 * math.pi)) / math.log(base)

    low, high = max(correction_dim(cfg.rope_ntk_beta), 0.0), min(correction_dim(cfg.rope_ntk_alpha), d - 1.0)
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = interpolation * ramp + extrapolation * (1 - ramp)
    return inv_freq, 0.1 * math.log(factor) + 1.0


def apply_rope(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """Rotate-half convention: the head dim is two halves (x1, x2), not interleaved pairs, and the result is
    (x1 cos - x2 sin, x2 cos + x1 sin). With cos2 = (cos, cos) and sin2 = (-sin, sin) [T, head_dim] that is
    x * cos2 + swap_halves(x) * sin2, the same roundings in fewer ops. x: [T, heads, head_dim]."""
    return x * cos2[:, None] + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin2[:, None]


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-k experts [T, k] and their weights [T, k] (a softmax over the chosen logits, float32).
    torch.topk breaks ties among bf16 logits as the peers do: every path routes through this call."""
    top, chosen = torch.topk(router_logits, k, dim=-1)
    return chosen, torch.softmax(top.float(), dim=-1)


def decoding_rows(sizes: list[int], checking: Sequence[int] = ()) -> list[int]:
    """The rows of a step's decoding sequences (sizes[b] rows of each sequence b in turn): one row each, or every
    row of a sequence in `checking` (its last token and k candidates, each row computed as the one-token step at
    its position would compute it)."""
    rows, row = [], 0
    for b, n in enumerate(sizes):
        if n == 1 or b in checking:
            rows.extend(range(row, row + n))
        row += n
    return rows


class Transformer:
    def __init__(self, cfg: ModelConfig, weights: Weights, dtype: torch.dtype, backend: Backend):
        self.cfg, self.w, self.dtype, self.ops = cfg, weights, dtype, backend
        self.device = weights.embedding.device
        backend.prepare(weights)
        inv_freq, self.concentration = yarn_inv_freq(cfg)
        self.inv_freq = inv_freq.to(self.device)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, cos) and (-sin, sin) for `positions` [T], scaled by YaRN's concentration; see apply_rope."""
        freqs = positions.to(device=self.device, dtype=torch.float32)[:, None] * self.inv_freq
        cos, sin = (freqs.cos() * self.concentration).to(self.dtype), (freqs.sin() * self.concentration).to(self.dtype)
        return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)

    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """One sequence: `tokens` [T] at positions cache.length..; float32 logits [T, vocab] (or [1, vocab])."""
        if last_only:
            return self.forward_batch(tokens, [cache], [tokens.shape[0]])
        return self.forward_batch(tokens, [cache], [tokens.shape[0]], all_logits=True)

    @torch.inference_mode()
    def forward_batch(self, tokens: torch.Tensor, caches: list[KVCache], sizes: list[int],
                      all_logits: bool = False, rows: list[int] | None = None,
                      checking: Sequence[int] = ()) -> torch.Tensor:
        """Several sequences in one pass: `tokens` [T] are sizes[b] tokens of each sequence b in turn, at positions
        caches[b].length..; every weight is read once for all of them. Returns float32 logits at the last token
        of each sequence [len(caches), vocab] (with all_logits, at every token [T, vocab]; with rows, at those
        rows of the T, in order: a sequence's guessed tokens being checked). checking: the sequences whose rows
        are a decoding token and its candidates: each row gets the logits its one-token step would get."""
        cfg = self.cfg
        with self.ops.running():
            positions = torch.cat([torch.arange(c.length, c.length + n) for c, n in zip(caches, sizes, strict=True)])
            cos, sin = self.rope(positions)
            x = F.embedding(tokens, self.w.embedding).to(self.dtype)
            x = self.ops.layers(self, x, cos, sin, caches, sizes, checking)
            for cache, n in zip(caches, sizes, strict=True):
                cache.advance(n)
            if all_logits:
                alone = decoding_rows(sizes, checking)
            elif rows is not None:
                decoding = set(decoding_rows(sizes, checking))
                alone = [i for i, r in enumerate(rows) if r in decoding]
                x = x[torch.tensor(rows, device=x.device)]
            else:
                x = x[torch.tensor(sizes, device=x.device).cumsum(0) - 1]  # each sequence's last row
                alone = [b for b, n in enumerate(sizes) if n == 1]  # row b: sequence b's
            return self.ops.linear(self.ops.rms_norm(x, self.w.norm, cfg.rms_norm_eps), self.w.unembedding,
                                   alone=alone).float()

    def layer(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[KVCache],
              sizes: list[int], state: Any = None, checking: Sequence[int] = ()) -> torch.Tensor:
        """Layer i on x [T, hidden] (sizes[b] rows of each sequence b in turn): x + Attn(RMSNorm(x)), then
        + MoE(RMSNorm(x)). Products and the experts see all rows at once; attention each sequence's own. state:
        the backend's, for the step (backends/base.py); checking: as forward_batch's."""
        cfg, lw, ops = self.cfg, self.w.layers[i], self.ops
        n_q, n_kv, d, t = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, x.shape[0]
        alone = decoding_rows(sizes, checking)  # rows a backend computes as it would alone (a decoding sequence's)
        qkv = ops.linear(ops.rms_norm(x, lw.attn_norm, cfg.rms_norm_eps), lw.qkv_w, lw.qkv_b, alone)
        qk = apply_rope(qkv[:, :(n_q + n_kv) * d].view(t, n_q + n_kv, d), cos, sin)  # q and k heads at once
        q, k, v = qk[:, :n_q], qk[:, n_q:], qkv[:, (n_q + n_kv) * d:].view(t, n_kv, d)
        window = cfg.sliding_window if cfg.is_sliding(i) else 0
        a = ops.attend(i, q, k, v, lw.sinks, window, caches, sizes, state, checking)
        x = x + ops.linear(a, lw.out_w, lw.out_b, alone)
        h = ops.rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps)
        chosen, weight = route(ops.linear(h, lw.gate_w, lw.gate_b, alone), cfg.experts_per_token)
        return x + ops.experts(h, lw, chosen, weight, cfg, alone)
