"""The gpt-oss transformer: the whole forward pass, following the published math.

Per layer: x += Attn(RMSNorm(x)); x += MoE(RMSNorm(x)). Attention is grouped-query with a learned sink
logit per head, sliding-window (128) on even layers, YaRN rotary embeddings. The MoE routes each token to
its top-k experts, whose MXFP4 weights are decoded only when they are used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checkpoint import LayerWeights, Weights
from .config import ModelConfig
from .kernels import (
    attention_block_one_token,
    attention_one_query,
    attention_prefill,
    fast_kernels,
    linear,
    moe_one_token,
    mxfp4_dequantize,
    mxfp4_matmul,
)
from .kv_cache import KVCache

FUSED_DECODE = True  # tests switch it off to compare the fused decode step with the op-by-op one


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, q_start: int,
              k_start: int, window: int, block: int = 256) -> torch.Tensor:
    """Causal GQA with per-head sinks. q [T, H, D] at positions q_start.., k/v [S, KV, D] at k_start...

    window > 0: query i sees key j only if i - j < window. The sink is an extra logit in each head's
    softmax whose probability is dropped, so rows sum to less than one. Queries go in blocks to bound memory.
    """
    t_all, h, d = q.shape
    if t_all == 1 and q.device.type == "cpu" and fast_kernels() and k.dtype in (torch.bfloat16, torch.float32):
        # decoding: one C call; every key from `lo` on is visible to a single query, in any order
        lo = max(k_start, q_start - window + 1) if window else k_start
        return attention_one_query(q[0], k[lo - k_start:], v[lo - k_start:], sinks).view(1, -1).to(q.dtype)
    if q.device.type == "cpu" and fast_kernels() and k.dtype == q.dtype and k.dtype in (torch.bfloat16, torch.float32):
        # prefill: the same C kernel, each query over the keys it sees (None where it does not apply)
        out = attention_prefill(q, k, v, sinks, q_start - k_start, window)
        if out is not None:
            return out.to(q.dtype)
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


def swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """Clamped SwiGLU on interleaved gate/up columns: gate = h[..., 0::2], up = h[..., 1::2]."""
    gate, up = h[..., 0::2].clamp(max=limit), h[..., 1::2].clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def moe(x: torch.Tensor, lw: LayerWeights, cfg: ModelConfig) -> torch.Tensor:
    """Route each token to its top-k experts (softmax over the chosen logits); tokens sharing an expert go together."""
    router = linear(x, lw.gate_w, lw.gate_b)
    top, chosen = torch.topk(router, cfg.experts_per_token, dim=-1)
    weight = torch.softmax(top.float(), dim=-1)
    use_kernels = fast_kernels() and x.device.type == "cpu"
    bf16 = x.dtype == torch.bfloat16
    if use_kernels and x.shape[0] == 1:  # decoding: the whole block in one C call
        y = moe_one_token(x, lw.w1_blocks, lw.w1_scales, lw.w1_bias, lw.w2_blocks, lw.w2_scales, lw.w2_bias,
                          chosen[0], weight[0], cfg.swiglu_alpha, cfg.swiglu_limit, bf16)
        return y.view(1, -1).to(x.dtype)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in chosen.unique().tolist():
        tok, slot = (chosen == e).nonzero(as_tuple=True)
        if use_kernels:  # read the packed weights directly
            h = mxfp4_matmul(x[tok], lw.w1_blocks[e], lw.w1_scales[e], lw.w1_bias[e], bf16)
            a = swiglu(h, cfg.swiglu_alpha, cfg.swiglu_limit)
            y = mxfp4_matmul(a.to(x.dtype), lw.w2_blocks[e], lw.w2_scales[e], lw.w2_bias[e], bf16)
        else:  # reference path: decode this expert's weights, then a dense product
            w1 = mxfp4_dequantize(lw.w1_blocks[e], lw.w1_scales[e], x.dtype)
            a = swiglu(F.linear(x[tok], w1, lw.w1_bias[e].to(x.dtype)).float(), cfg.swiglu_alpha, cfg.swiglu_limit)
            w2 = mxfp4_dequantize(lw.w2_blocks[e], lw.w2_scales[e], x.dtype)
            y = F.linear(a.to(x.dtype), w2, lw.w2_bias[e].to(x.dtype))
        out.index_add_(0, tok, y.float() * weight[tok, slot, None])
    return out.to(x.dtype)


class Transformer:
    def __init__(self, cfg: ModelConfig, weights: Weights, dtype: torch.dtype):
        self.cfg, self.w, self.dtype = cfg, weights, dtype
        self.device = weights.embedding.device
        for lw in weights.layers:  # the kernels read weights by pointer: they must be dense (they are, as loaded)
            for name, t in vars(lw).items():
                if not t.is_contiguous():
                    setattr(lw, name, t.contiguous())
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
        # ossie's kernels use every core; torch's OpenMP workers, which spin-wait after each parallel op, would
        # take cores from them. So torch runs on one thread here, except in the large GEMMs (see kernels.linear).
        threads = torch.get_num_threads()
        if self.device.type == "cpu" and fast_kernels():
            torch.set_num_threads(1)
        try:
            return self._forward(tokens, cache, last_only)
        finally:
            torch.set_num_threads(threads)

    def _decode_layers(self, x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The layers for one token of a bf16 model on the CPU: two C calls a layer (the attention block, which also
        normalizes for the MoE and computes the router's logits; the MoE block with its residual add) and torch's
        top-k between them, so that ties among the router's bf16 logits are broken as the peers break them."""
        cfg = self.cfg
        x = x[0].float()  # float32 holding bf16 values, as the kernels take and give them
        for i, lw in enumerate(self.w.layers):
            slot, n_keys = cache.decode_slot(i)
            x, h, logits = attention_block_one_token(x, lw, cos2, sin2, cache.k[i], cache.v[i], slot, n_keys,
                                                     cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps)
            top, chosen = torch.topk(logits, cfg.experts_per_token)
            x = moe_one_token(h, lw.w1_blocks, lw.w1_scales, lw.w1_bias, lw.w2_blocks, lw.w2_scales, lw.w2_bias,
                              chosen, torch.softmax(top.float(), dim=-1), cfg.swiglu_alpha, cfg.swiglu_limit, True,
                              residual=x)
        return x.to(torch.bfloat16).view(1, -1)

    def _forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool) -> torch.Tensor:
        cfg, n_q, n_kv, d = self.cfg, self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        t, p0 = tokens.shape[0], cache.length
        cos, sin = self.rope(p0, t)
        x = F.embedding(tokens, self.w.embedding).to(self.dtype)
        # decoding one token of a bf16 model on the CPU: each block is one C call (see _decode_layers)
        if (FUSED_DECODE and t == 1 and self.device.type == "cpu" and self.dtype == torch.bfloat16
                and fast_kernels()):
            x = self._decode_layers(x, cos[0].float(), sin[0].float(), cache)
        else:
            for i, lw in enumerate(self.w.layers):
                qkv = linear(rms_norm(x, lw.attn_norm, cfg.rms_norm_eps), lw.qkv_w, lw.qkv_b)
                qk = apply_rope(qkv[:, :(n_q + n_kv) * d].view(t, n_q + n_kv, d), cos, sin)  # q and k heads at once
                q, k = qk[:, :n_q], qk[:, n_q:]
                keys, values, k_start = cache.update(i, k, qkv[:, (n_q + n_kv) * d:].view(t, n_kv, d))
                window = cfg.sliding_window if cfg.is_sliding(i) else 0
                a = attention(q, keys, values, lw.sinks, p0, k_start, window)
                x = x + linear(a, lw.out_w, lw.out_b)
                x = x + moe(rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps), lw, cfg)
        cache.advance(t)
        if last_only:
            x = x[-1:]
        return linear(rms_norm(x, self.w.norm, cfg.rms_norm_eps), self.w.unembedding).float()
