"""The gpt-oss transformer: the whole forward pass, following the published math.

Per layer: x += Attn(RMSNorm(x)); x += MoE(RMSNorm(x)). Attention is grouped-query with a learned sink
logit per head, sliding-window (128) on even layers, YaRN rotary embeddings. The MoE routes each token to
its top-k experts, whose MXFP4 weights are decoded only when they are used.

The heavy operations (products, attention, the experts) are a backend's (ossie.backends), chosen once at
load: this module is the math and never asks which kernel runs it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

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


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * scale, in float32."""
    return F.rms_norm(x.float(), scale.shape, scale, eps).to(x.dtype)


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-k experts [T, k] and their weights [T, k] (a softmax over the chosen logits, float32).
    torch.topk breaks ties among bf16 logits as the peers do: every path routes through this call."""
    top, chosen = torch.topk(router_logits, k, dim=-1)
    return chosen, torch.softmax(top.float(), dim=-1)


class Transformer:
    def __init__(self, cfg: ModelConfig, weights: Weights, dtype: torch.dtype, backend: Backend):
        self.cfg, self.w, self.dtype, self.ops = cfg, weights, dtype, backend
        self.device = weights.embedding.device
        backend.prepare(weights)
        inv_freq, self.concentration = yarn_inv_freq(cfg)
        self.inv_freq = inv_freq.to(self.device)

    def rope(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, cos) and (-sin, sin) for positions start.., scaled by YaRN's concentration; see apply_rope."""
        freqs = torch.arange(start, start + n, device=self.device, dtype=torch.float32)[:, None] * self.inv_freq
        cos, sin = (freqs.cos() * self.concentration).to(self.dtype), (freqs.sin() * self.concentration).to(self.dtype)
        return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Run `tokens` [T] at positions cache.length..; returns float32 logits [T, vocab] (or [1, vocab])."""
        cfg = self.cfg
        with self.ops.running():
            cos, sin = self.rope(cache.length, tokens.shape[0])
            x = F.embedding(tokens, self.w.embedding).to(self.dtype)
            x = self.ops.layers(self, x, cos, sin, cache)
            cache.advance(tokens.shape[0])
            if last_only:
                x = x[-1:]
            return self.ops.linear(rms_norm(x, self.w.norm, cfg.rms_norm_eps), self.w.unembedding).float()

    def layer(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Layer i on x [T, hidden] at positions cache.length..: x + Attn(RMSNorm(x)), then + MoE(RMSNorm(x))."""
        cfg, lw, ops = self.cfg, self.w.layers[i], self.ops
        n_q, n_kv, d, t = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, x.shape[0]
        qkv = ops.linear(rms_norm(x, lw.attn_norm, cfg.rms_norm_eps), lw.qkv_w, lw.qkv_b)
        qk = apply_rope(qkv[:, :(n_q + n_kv) * d].view(t, n_q + n_kv, d), cos, sin)  # q and k heads at once
        q, k = qk[:, :n_q], qk[:, n_q:]
        keys, values, k_start = cache.update(i, k, qkv[:, (n_q + n_kv) * d:].view(t, n_kv, d))
        window = cfg.sliding_window if cfg.is_sliding(i) else 0
        a = ops.attention(q, keys, values, lw.sinks, cache.length, k_start, window)
        x = x + ops.linear(a, lw.out_w, lw.out_b)
        h = rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps)
        chosen, weight = route(ops.linear(h, lw.gate_w, lw.gate_b), cfg.experts_per_token)
        return x + ops.experts(h, lw, chosen, weight, cfg)
