"""An independent, deliberately naive float64 implementation of gpt-oss, written from the published math
(../shared/gpt-oss-facts.md and the official reference's structure): dense dequantization of every expert,
every expert evaluated for every token, full attention matrices with explicit masks and a concatenated sink
column. It shares no code with ossie's model."""

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def dequant(blocks, scales):
    lut = torch.tensor(FP4, dtype=torch.float64)
    lo, hi = lut[(blocks & 15).long()], lut[(blocks >> 4).long()]
    vals = torch.empty(*blocks.shape[:-1], 32, dtype=torch.float64)
    vals[..., 0::2], vals[..., 1::2] = lo, hi
    vals = vals * torch.pow(2.0, scales.double() - 127)[..., None]
    return vals.reshape(*blocks.shape[:-2], -1)


def reference_logits(folder: Path, tokens: list[int]) -> torch.Tensor:
    """Logits [T, vocab] in float64 for an original-layout checkpoint folder."""
    cfg = json.loads((folder / "config.json").read_text())
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        w = {k: f.get_tensor(k) for k in f.keys()}
    W = {k: (v.double() if v.is_floating_point() else v) for k, v in w.items()}
    T, H, KV, D = len(tokens), cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def norm(x, scale):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * scale

    # YaRN
    base, factor = cfg["rope_theta"], cfg["rope_scaling_factor"]
    freq = base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ctx = cfg["initial_context_length"]
    low = D / 2 * math.log(ctx / (cfg["rope_ntk_beta"] * 2 * math.pi)) / math.log(base)
    high = D / 2 * math.log(ctx / (cfg["rope_ntk_alpha"] * 2 * math.pi)) / math.log(base)
    ramp = ((torch.arange(D // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    inv_freq = (1 / (factor * freq)) * ramp + (1 / freq) * (1 - ramp)
    conc = 0.1 * math.log(factor) + 1
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = torch.cos(ang) * conc, torch.sin(ang) * conc

    def rope(x):  # [T, heads, D]
        a, b = x[..., : D // 2], x[..., D // 2:]
        c, s = cos[:, None], sin[:, None]
        return torch.cat([a * c - b * s, b * c + a * s], -1)

    x = W["embedding.weight"][torch.tensor(tokens)]
    for n in range(cfg["num_hidden_layers"]):
        p = f"block.{n}."
        t = norm(x, W[p + "attn.norm.scale"])
        qkv = t @ W[p + "attn.qkv.weight"].T + W[p + "attn.qkv.bias"]
        q = rope(qkv[:, : H * D].reshape(T, H, D))
        k = rope(qkv[:, H * D: (H + KV) * D].reshape(T, KV, D))
        v = qkv[:, (H + KV) * D:].reshape(T, KV, D)
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        mask = torch.triu(torch.full((T, T), -math.inf, dtype=torch.float64), diagonal=1)
        if n % 2 == 0:
            mask += torch.tril(torch.full((T, T), -math.inf, dtype=torch.float64), diagonal=-cfg["sliding_window"])
        qk = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D) + mask
        qk = torch.cat([qk, W[p + "attn.sinks"].view(H, 1, 1).expand(H, T, 1)], dim=-1)
        probs = torch.softmax(qk, dim=-1)[..., :-1]
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(T, H * D)
        x = x + attn @ W[p + "attn.out.weight"].T + W[p + "attn.out.bias"]

        t = norm(x, W[p + "mlp.norm.scale"])
        g = t @ W[p + "mlp.gate.weight"].T + W[p + "mlp.gate.bias"]
        top = torch.topk(g, cfg["experts_per_token"], dim=-1)
        weights = torch.softmax(top.values, dim=-1)
        w1 = dequant(w[p + "mlp.mlp1_weight.blocks"], w[p + "mlp.mlp1_weight.scales"])
        w2 = dequant(w[p + "mlp.mlp2_weight.blocks"], w[p + "mlp.mlp2_weight.scales"])
        h = torch.einsum("eoi,ti->teo", w1, t) + W[p + "mlp.mlp1_bias"]  # every expert, every token
        gate, up = h[..., 0::2].clamp(max=cfg["swiglu_limit"]), h[..., 1::2].clamp(-7.0, 7.0)
        a = gate * torch.sigmoid(1.702 * gate) * (up + 1)
        y = torch.einsum("eoi,tei->teo", w2, a) + W[p + "mlp.mlp2_bias"]
        picked = torch.gather(y, 1, top.indices[..., None].expand(-1, -1, y.shape[-1]))
        x = x + (picked * weights[..., None]).sum(1)
    return norm(x, W["norm.scale"]) @ W["unembedding.weight"].T
