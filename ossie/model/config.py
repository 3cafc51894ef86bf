"""Model configuration: one dataclass, read from either published config.json flavour."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..special_tokens import ENDOFTEXT, RETURN


class ConfigError(ValueError):
    """The config.json is missing, unreadable or describes a model ossie does not support."""


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = 24
    hidden_size: int = 2880
    num_heads: int = 64
    num_kv_heads: int = 8
    head_dim: int = 64
    num_experts: int = 32
    experts_per_token: int = 4
    intermediate_size: int = 2880
    vocab_size: int = 201088
    sliding_window: int = 128
    # "sliding_attention" or "full_attention" per layer; gpt-oss alternates, starting with sliding.
    layer_types: tuple[str, ...] = field(default=())
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0  # YaRN beta_slow
    rope_ntk_beta: float = 32.0  # YaRN beta_fast
    initial_context_length: int = 4096
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702

    def __post_init__(self) -> None:
        if not self.layer_types:
            types = tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_layers))
            object.__setattr__(self, "layer_types", types)
        self.validate()

    # ---- derived ---------------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return int(self.initial_context_length * self.rope_scaling_factor)

    @property
    def qkv_dim(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def validate(self) -> None:
        problems = []
        for f in dataclasses.fields(self):  # a config.json's "64" or true must not reach the arithmetic
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{f.name} must be a positive integer, got {value!r}")
            if f.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"{f.name} must be a number, got {value!r}")
        if len(self.layer_types) != self.num_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        bad = set(self.layer_types) - {"sliding_attention", "full_attention"}
        if bad:
            problems.append(f"unknown layer types {sorted(bad)}")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for rotary embeddings")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                problems.append(f"{name} {getattr(self, name)} must be a multiple of 32 (MXFP4 block size)")
        if not 0 < self.experts_per_token <= self.num_experts:
            problems.append(f"experts_per_token {self.experts_per_token} not in 1..{self.num_experts}")
        if problems:
            raise ConfigError("unsupported gpt-oss config: " + "; ".join(problems))

    # ---- the two published config.json flavours ----------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Hugging Face `config.json` (model_type gpt_oss); rope as rope_scaling+rope_theta or rope_parameters."""
        if d.get("model_type") not in (None, "gpt_oss"):
            raise ConfigError(f"model_type is {d.get('model_type')!r}, expected 'gpt_oss'")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "yarn"))
        if rope_type != "yarn":
            raise ConfigError(f"rope type {rope_type!r} is not supported (gpt-oss uses yarn)")
        if rope.get("truncate", False):
            raise ConfigError("rope_scaling.truncate=true is not gpt-oss's YaRN (the published config has false)")
        theta = rope.get("rope_theta", d.get("rope_theta", 150000.0))
        try:
            return cls(
                num_layers=d["num_hidden_layers"],
                hidden_size=d["hidden_size"],
                num_heads=d["num_attention_heads"],
                num_kv_heads=d["num_key_value_heads"],
                head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
                num_experts=d["num_local_experts"],
                experts_per_token=d.get("num_experts_per_tok", d.get("experts_per_token", 4)),
                intermediate_size=d["intermediate_size"],
                vocab_size=d["vocab_size"],
                sliding_window=d.get("sliding_window") or 128,
                layer_types=tuple(d.get("layer_types") or ()),
                rope_theta=float(theta),
                rope_scaling_factor=float(rope.get("factor", 32.0)),
                rope_ntk_alpha=float(rope.get("beta_slow", 1.0)),
                rope_ntk_beta=float(rope.get("beta_fast", 32.0)),
                initial_context_length=int(rope.get("original_max_position_embeddings", 4096)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                swiglu_limit=float(d.get("swiglu_limit", 7.0)),
                swiglu_alpha=float(d.get("swiglu_alpha", 1.702)),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_original_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """The reference implementation's `original/config.json`."""
        try:
            return cls(
                num_layers=d["num_hidden_layers"],
                hidden_size=d["hidden_size"],
                num_heads=d["num_attention_heads"],
                num_kv_heads=d["num_key_value_heads"],
                head_dim=d["head_dim"],
                num_experts=d["num_experts"],
                experts_per_token=d["experts_per_token"],
                intermediate_size=d["intermediate_size"],
                vocab_size=d["vocab_size"],
                sliding_window=d.get("sliding_window", 128),
                rope_theta=float(d.get("rope_theta", 150000.0)),
                rope_scaling_factor=float(d.get("rope_scaling_factor", 32.0)),
                rope_ntk_alpha=float(d.get("rope_ntk_alpha", 1.0)),
                rope_ntk_beta=float(d.get("rope_ntk_beta", 32.0)),
                initial_context_length=int(d.get("initial_context_length", 4096)),
                swiglu_limit=float(d.get("swiglu_limit", 7.0)),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the field {e.args[0]!r}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """What `openai/gpt-oss-*`'s root config.json holds (for synthetic checkpoints)."""
        return {
            "architectures": ["GptOssForCausalLM"],
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": RETURN,
            "experts_per_token": self.experts_per_token,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.initial_context_length,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_context,
            "model_type": "gpt_oss",
            "num_attention_heads": self.num_heads,
            "num_experts_per_tok": self.experts_per_token,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "num_local_experts": self.num_experts,
            "output_router_logits": False,
            "pad_token_id": ENDOFTEXT,
            "quantization_config": {
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
                "quant_method": "mxfp4",
            },
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {
                "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha,
                "factor": self.rope_scaling_factor,
                "original_max_position_embeddings": self.initial_context_length,
                "rope_type": "yarn",
                "truncate": False,
            },
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    def to_original_dict(self) -> dict[str, Any]:
        return {
            "num_hidden_layers": self.num_layers,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.initial_context_length,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_ntk_alpha,
            "rope_ntk_beta": self.rope_ntk_beta,
        }

    def replace(self, **changes: Any) -> ModelConfig:
        if "num_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    "20b": ModelConfig(),
    "120b": ModelConfig(num_layers=36, num_experts=128),
    # Real vocabulary (so harmony token ids are valid), everything else small: for tests and demos.
    "tiny": ModelConfig(
        num_layers=4, hidden_size=64, num_heads=8, num_kv_heads=2, head_dim=16,
        num_experts=8, experts_per_token=2, intermediate_size=64,
    ),
}


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
