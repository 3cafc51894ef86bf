"""Finding, validating and loading gpt-oss checkpoints in either published layout.

Tensors are memory-mapped by safetensors: a bf16 model in bf16 and the packed MXFP4 experts are used
in place, never copied, so resident memory stays close to the checkpoint's size.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .config import ConfigError, ModelConfig, read_json

log = logging.getLogger("ossie")

LAYOUTS = ("hf", "original")


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, unreadable or of the wrong shape; the message names it."""


class ModelNotFoundError(FileNotFoundError):
    """MODEL is neither a local folder nor a Hugging Face repo that could be fetched."""


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden] float32
    qkv_w: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]; rows: q, then k, then v
    qkv_b: torch.Tensor
    sinks: torch.Tensor  # [heads] float32
    out_w: torch.Tensor  # [hidden, heads * head_dim]
    out_b: torch.Tensor
    mlp_norm: torch.Tensor
    gate_w: torch.Tensor  # router [experts, hidden]
    gate_b: torch.Tensor
    w1_blocks: torch.Tensor  # uint8 [experts, 2 * intermediate, hidden / 32, 16]; gate/up rows interleaved
    w1_scales: torch.Tensor  # uint8 [experts, 2 * intermediate, hidden / 32]
    w1_bias: torch.Tensor  # [experts, 2 * intermediate]
    w2_blocks: torch.Tensor  # uint8 [experts, hidden, intermediate / 32, 16]
    w2_scales: torch.Tensor
    w2_bias: torch.Tensor  # [experts, hidden]


@dataclass
class Weights:
    embedding: torch.Tensor  # [vocab, hidden]
    norm: torch.Tensor  # [hidden] float32
    unembedding: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]

    def nbytes(self) -> int:
        tensors = [self.embedding, self.norm, self.unembedding]
        tensors += [t for layer in self.layers for t in vars(layer).values()]
        return sum(t.nbytes for t in tensors)  # tensors, and Q8 matrices in the 8-bit mode


# ---- expected tensors ---------------------------------------------------------------------------------
# kind: "matrix" -> model dtype, "f32" -> float32 (norms, sinks, biases: the kernels add them in float32),
# "u8" -> packed


def layer_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    h, e, i2 = cfg.hidden_size, cfg.num_experts, 2 * cfg.intermediate_size
    return {
        "attn_norm": ((h,), "f32"),
        "qkv_w": ((cfg.qkv_dim, h), "matrix"),
        "qkv_b": ((cfg.qkv_dim,), "f32"),
        "sinks": ((cfg.num_heads,), "f32"),
        "out_w": ((h, cfg.num_heads * cfg.head_dim), "matrix"),
        "out_b": ((h,), "f32"),
        "mlp_norm": ((h,), "f32"),
        "gate_w": ((e, h), "matrix"),
        "gate_b": ((e,), "f32"),
        "w1_blocks": ((e, i2, h // 32, 16), "u8"),
        "w1_scales": ((e, i2, h // 32), "u8"),
        "w1_bias": ((e, i2), "f32"),
        "w2_blocks": ((e, h, cfg.intermediate_size // 32, 16), "u8"),
        "w2_scales": ((e, h, cfg.intermediate_size // 32), "u8"),
        "w2_bias": ((e, h), "f32"),
    }


def global_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    return {
        "embedding": ((cfg.vocab_size, cfg.hidden_size), "matrix"),
        "norm": ((cfg.hidden_size,), "f32"),
        "unembedding": ((cfg.vocab_size, cfg.hidden_size), "matrix"),
    }


def tensor_names(layout: str, canonical: str, layer: int | None = None) -> list[str]:
    """The checkpoint tensor name(s) holding a canonical tensor; several names are concatenated on dim 0."""
    if layout == "hf":
        if layer is None:
            return [{"embedding": "model.embed_tokens.weight", "norm": "model.norm.weight",
                     "unembedding": "lm_head.weight"}[canonical]]
        p = f"model.layers.{layer}."
        qkv = ("q_proj", "k_proj", "v_proj")
        return {
            "attn_norm": [p + "input_layernorm.weight"],
            "qkv_w": [f"{p}self_attn.{m}.weight" for m in qkv],
            "qkv_b": [f"{p}self_attn.{m}.bias" for m in qkv],
            "sinks": [p + "self_attn.sinks"],
            "out_w": [p + "self_attn.o_proj.weight"],
            "out_b": [p + "self_attn.o_proj.bias"],
            "mlp_norm": [p + "post_attention_layernorm.weight"],
            "gate_w": [p + "mlp.router.weight"],
            "gate_b": [p + "mlp.router.bias"],
            "w1_blocks": [p + "mlp.experts.gate_up_proj_blocks"],
            "w1_scales": [p + "mlp.experts.gate_up_proj_scales"],
            "w1_bias": [p + "mlp.experts.gate_up_proj_bias"],
            "w2_blocks": [p + "mlp.experts.down_proj_blocks"],
            "w2_scales": [p + "mlp.experts.down_proj_scales"],
            "w2_bias": [p + "mlp.experts.down_proj_bias"],
        }[canonical]
    if layer is None:
        return [{"embedding": "embedding.weight", "norm": "norm.scale", "unembedding": "unembedding.weight"}[canonical]]
    p = f"block.{layer}."
    return [{
        "attn_norm": p + "attn.norm.scale",
        "qkv_w": p + "attn.qkv.weight",
        "qkv_b": p + "attn.qkv.bias",
        "sinks": p + "attn.sinks",
        "out_w": p + "attn.out.weight",
        "out_b": p + "attn.out.bias",
        "mlp_norm": p + "mlp.norm.scale",
        "gate_w": p + "mlp.gate.weight",
        "gate_b": p + "mlp.gate.bias",
        "w1_blocks": p + "mlp.mlp1_weight.blocks",
        "w1_scales": p + "mlp.mlp1_weight.scales",
        "w1_bias": p + "mlp.mlp1_bias",
        "w2_blocks": p + "mlp.mlp2_weight.blocks",
        "w2_scales": p + "mlp.mlp2_weight.scales",
        "w2_bias": p + "mlp.mlp2_bias",
    }[canonical]]


def split_rows(cfg: ModelConfig, canonical: str) -> list[int] | None:
    """Row counts of the pieces a canonical tensor is stored as in the HF layout (q, k, v)."""
    if canonical in ("qkv_w", "qkv_b"):
        return [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
    return None


# ---- finding the checkpoint ---------------------------------------------------------------------------

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_FILES = ["config.json", "generation_config.json", "model.safetensors.index.json", "model*.safetensors"]
_ORIGINAL_FILES = ["original/*"]


OLLAMA_NAMES = {"gpt-oss:20b": "openai/gpt-oss-20b", "gpt-oss:120b": "openai/gpt-oss-120b",
                "gpt-oss:latest": "openai/gpt-oss-20b", "gpt-oss": "openai/gpt-oss-20b"}  # as Ollama users write them


def resolve_model(model: str | Path, layout: str | None = None) -> Path:
    """A local folder as is, or a Hugging Face repo id (or an Ollama-style name of one, gpt-oss:20b) fetched (only
    the chosen layout's files) into the HF cache."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path}: expected a checkpoint folder, found a file")
        return path
    repo = repo_id(str(model))
    from huggingface_hub import snapshot_download

    try:  # already in the cache: no network needed
        return Path(snapshot_download(repo, allow_patterns=layout_files(layout), local_files_only=True))
    except Exception:
        pass
    return download(repo, layout)


def repo_id(model: str) -> str:
    """The Hugging Face repo a model name designates (an Ollama-style name maps to its repo)."""
    repo = OLLAMA_NAMES.get(model, model)
    if not _REPO_ID.match(repo) or repo.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{repo}: no such folder (and not a Hugging Face repo id like openai/gpt-oss-20b)")
    return repo


def layout_files(layout: str | None) -> list[str]:
    return _ORIGINAL_FILES if layout == "original" else _HF_FILES


def download(repo: str, layout: str | None = None, verify: bool = False) -> Path:
    """Fetch a repo's files of one layout into the Hugging Face cache (huggingface_hub shows progress, resumes an
    interrupted download and checks each file's size); with `verify`, each file's content is then checked against
    the hash the Hub gave it (verify_snapshot). The snapshot folder."""
    from huggingface_hub import snapshot_download

    patterns = layout_files(layout)
    log.info("downloading %s (%s layout) from the Hugging Face Hub", repo, layout or "hf")
    try:
        path = Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated, disk full...
        raise ModelNotFoundError(
            f"could not fetch {repo!r} from the Hugging Face Hub ({type(e).__name__}: {e}).\n"
            f"If this machine is offline, download it where there is network with\n"
            f"  hf download {repo} --include {' '.join(patterns)}\n"
            f"copy the folder here and pass its path as MODEL, or try ossie with a synthetic checkpoint:\n"
            f"  ossie synth ./gpt-oss-synth --preset 20b"
        ) from None
    if verify:
        verify_snapshot(path)
    return path


def partial_downloads(repo: str, since: float = 0.0) -> list[Path]:
    """The unfinished download files of a repo in the Hugging Face cache, changed since `since` (a time)."""
    from huggingface_hub import constants

    blobs = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--")) / "blobs"
    return [f for f in blobs.glob("*.incomplete") if f.stat().st_mtime >= since] if blobs.is_dir() else []


def _content_hash(path: Path, kind: str, size: int, bar: tqdm) -> str:
    h = hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % size)  # git's blob id
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def verify_snapshot(snapshot: Path, progress: bool = True) -> None:
    """Check every file of a Hugging Face cache snapshot against its blob's name, which is the hash the Hub gave
    it: the SHA-256 of a large (LFS) file, the git blob id of a small one. A file that does not match is deleted
    (the next pull fetches it again) and named in a CheckpointError."""
    files = [(f, Path(os.path.realpath(f))) for f in sorted(snapshot.rglob("*")) if f.is_symlink() and f.is_file()]
    total = sum(blob.stat().st_size for _, blob in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="verifying", disable=not progress) as bar:
        for link, blob in files:
            expected = blob.name
            kind = "sha256" if re.fullmatch(r"[0-9a-f]{64}", expected) else "git" if re.fullmatch(
                r"[0-9a-f]{40}", expected) else None
            if kind is None:  # not a hash-named blob: nothing to check it against
                bar.update(blob.stat().st_size)
                continue
            if _content_hash(blob, kind, blob.stat().st_size, bar) != expected:
                blob.unlink()
                link.unlink()
                raise CheckpointError(f"{link.relative_to(snapshot)}: the downloaded file is corrupted (its "
                                      f"{'SHA-256' if kind == 'sha256' else 'git hash'} is not {expected}); it was "
                                      "deleted: pull again to fetch it anew")


def _kind_of_config(path: Path) -> str | None:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        return None
    d = read_json(cfg_path)
    if "num_local_experts" in d or d.get("model_type") == "gpt_oss":
        return "hf"
    if "num_experts" in d and "experts_per_token" in d:
        return "original"
    return "unknown"


def detect_layout(path: Path, layout: str | None = None) -> tuple[str, Path]:
    """(layout, folder holding its config.json) for a folder given by the user."""
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} or None, got {layout!r}")
    found: dict[str, Path] = {}
    for folder in (path, path / "original"):
        kind = _kind_of_config(folder)
        if kind in LAYOUTS and kind not in found:
            found[kind] = folder
        elif kind == "unknown" and folder == path and not (path / "original").is_dir():
            raise CheckpointError(f"{folder / 'config.json'}: not a gpt-oss config (neither the Hugging Face "
                                  "nor the original layout)")
    if not found:
        raise CheckpointError(f"{path}: no gpt-oss checkpoint here (expected config.json with "
                              "model_type gpt_oss, or an original/ folder with the reference layout)")
    if layout is not None:
        if layout not in found:
            raise CheckpointError(f"{path}: no {layout} layout here (found: {', '.join(found)})")
        return layout, found[layout]
    chosen = "hf" if "hf" in found else "original"
    if len(found) > 1:
        log.info("%s holds both layouts; loading the %s layout (choose with layout=)", path, chosen)
    return chosen, found[chosen]


SYNTHETIC_KEY = "ossie_synthetic"  # in the config.json of a random checkpoint (ossie synth)


def is_synthetic(folder: Path) -> bool:
    """Whether `ossie synth` wrote this checkpoint (its config.json says so): what it says is random."""
    return bool(read_json(folder / "config.json").get(SYNTHETIC_KEY))


def load_config(folder: Path, layout: str) -> ModelConfig:
    d = read_json(folder / "config.json")
    try:
        if layout == "hf":
            q = d.get("quantization_config") or {}
            if q.get("quant_method") != "mxfp4":
                raise ConfigError(f"quantization_config.quant_method is {q.get('quant_method')!r}; ossie runs "
                                  "the published MXFP4 checkpoints")
            return ModelConfig.from_hf_dict(d)
        return ModelConfig.from_original_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{folder / 'config.json'}: {e}") from None
    except (TypeError, ValueError, AttributeError) as e:  # a value of the wrong type met arithmetic first
        raise ConfigError(f"{folder / 'config.json'}: a value has the wrong type ({e})") from None


# ---- reading tensors ----------------------------------------------------------------------------------


class TensorFiles:
    """Which safetensors file holds which tensor; hands out memory-mapped tensors."""

    def __init__(self, folder: Path, layout: str):
        self.folder = folder
        self.where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        index = folder / "model.safetensors.index.json"
        if layout == "hf" and index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: has no weight_map")
            self.where = {name: folder / file for name, file in weight_map.items()}
            missing = sorted({p for p in self.where.values() if not p.is_file()})
            if missing:
                raise CheckpointError(f"{missing[0]}: listed in {index.name} but missing")
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{folder}: no .safetensors files")
            for f in files:
                for name in self._open(f).keys():
                    self.where[name] = f

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read as safetensors ({e})") from None
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        file = self.where.get(name)
        if file is None:
            raise CheckpointError(f"{self.folder}: tensor {name} is missing from the checkpoint")
        handle = self._open(file)
        if name not in handle.keys():
            raise CheckpointError(f"{file}: tensor {name} is missing (the index says this file holds it)")
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{file}: tensor {name} cannot be read ({e})") from None


def _drop_pages(t: torch.Tensor) -> None:
    """Hand back to the kernel the memory-mapped pages of `t`, which nothing will read again (the HF layout's q, k
    and v projections, once concatenated): they would otherwise stay in the process's resident memory beside the
    copy (0.7 GB at 20b). Only whole pages inside the tensor; best effort (a no-op where madvise is unavailable)."""
    advice = getattr(mmap, "MADV_DONTNEED", None)  # where the platform has madvise
    if advice is None or t.device.type != "cpu":
        return
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first),
                                                  advice)


def _load_one(files: TensorFiles, names: list[str], shape: tuple[int, ...], kind: str,
              dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    parts = []
    for name in names:
        t = files.get(name)
        if kind == "u8" and t.dtype != torch.uint8:
            raise CheckpointError(f"{files.where[name]}: tensor {name} has dtype {t.dtype}, expected uint8 (MXFP4)")
        if kind != "u8" and not t.is_floating_point():
            raise CheckpointError(f"{files.where[name]}: tensor {name} has dtype {t.dtype}, expected a float type")
        parts.append((name, t))
    t = parts[0][1] if len(parts) == 1 else torch.cat([p for _, p in parts], dim=0)
    if len(parts) > 1:
        for _, p in parts:
            _drop_pages(p)
    if tuple(t.shape) != shape:
        detail = ", ".join(f"{n} {tuple(p.shape)}" for n, p in parts)
        raise CheckpointError(f"{files.where[names[0]]}: tensor {' + '.join(names)} has shape {detail}, "
                              f"expected {shape}")
    target = {"u8": torch.uint8, "f32": torch.float32}.get(kind, dtype)
    # .to() is a no-op (no copy) when dtype and device already match: the tensor stays memory-mapped.
    return t.to(device=device, dtype=target)


def load_weights(folder: Path, layout: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 progress: bool = True) -> Weights:
    files = TensorFiles(folder, layout)
    specs = layer_specs(cfg)
    total = cfg.num_layers * len(specs) + 3
    with tqdm(total=total, desc="loading", unit="tensor", disable=not progress, leave=False) as bar:
        def get(canonical: str, spec: tuple[tuple[int, ...], str], layer: int | None = None) -> torch.Tensor:
            bar.update(1)
            return _load_one(files, tensor_names(layout, canonical, layer), spec[0], spec[1], dtype, device)

        glob = global_specs(cfg)
        layers = []
        for i in range(cfg.num_layers):
            layers.append(LayerWeights(**{c: get(c, spec, i) for c, spec in specs.items()}))
        weights = Weights(embedding=get("embedding", glob["embedding"]), norm=get("norm", glob["norm"]),
                          unembedding=get("unembedding", glob["unembedding"]), layers=layers)
    extra = set(files.where) - {n for c in glob for n in tensor_names(layout, c)} - {
        n for i in range(cfg.num_layers) for c in specs for n in tensor_names(layout, c, i)}
    if extra:
        log.warning("%s: %d tensors not used by the model, e.g. %s", folder, len(extra), sorted(extra)[0])
    return weights


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
