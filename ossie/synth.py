"""Synthetic gpt-oss checkpoints: random weights in the exact published format, shapes and file layout.

Weights depend only on (seed, tensor), not on the layout, so the same seed written in the Hugging Face and
the original layout describes the same model. Files are streamed tensor by tensor: safetensors'
`save_file` wants every tensor in memory at once, which a 13 GB checkpoint on a 16 GB machine cannot afford.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .model.checkpoint import (
    SYNTHETIC_KEY,
    LayerWeights,
    Weights,
    global_specs,
    layer_specs,
    split_rows,
    tensor_names,
    write_index,
)
from .model.config import PRESETS, ModelConfig

SHARD_BYTES = 5 * 2**30  # HF layout: ~5 GB shards, like the published repos
_ST_DTYPE = {torch.bfloat16: "BF16", torch.uint8: "U8", torch.float32: "F32"}


def _random(cfg: ModelConfig, canonical: str, layer: int | None, seed: int,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """The canonical tensor's values, determined by (seed, layer, name, device) alone."""
    key = f"{layer}.{canonical}"
    g = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    shape, kind = (layer_specs(cfg) if layer is not None else global_specs(cfg))[canonical]
    if kind == "u8":
        if canonical.endswith("scales"):  # exponents around 2**-6: weights of a plausible magnitude
            return torch.randint(119, 124, shape, generator=g, dtype=torch.uint8, device=device)
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8, device=device)
    if canonical in ("attn_norm", "mlp_norm", "norm"):
        t = 1.0 + 0.1 * torch.randn(shape, generator=g, device=device)
    elif canonical == "sinks":
        t = torch.randn(shape, generator=g, device=device)
    else:
        fan_in = shape[-1] if len(shape) == 2 and canonical != "embedding" else 50.0
        std = 0.02 if canonical.endswith(("_b", "bias")) else 1.0 / fan_in**0.5
        t = std * torch.randn(shape, generator=g, device=device)
    return t.to(torch.bfloat16)


def random_weights(cfg: ModelConfig | str, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                   seed: int = 0) -> Weights:
    """A synthetic model made directly in memory on `device` (random numbers drawn there: a GPU builds the 20b in
    seconds), in the dtypes a checkpoint loads to. For benchmarks; its values differ from write_checkpoint's."""
    cfg = PRESETS[cfg] if isinstance(cfg, str) else cfg
    target = {"u8": torch.uint8, "f32": torch.float32, "matrix": dtype}

    def make(canonical: str, layer: int | None, kind: str) -> torch.Tensor:
        return _random(cfg, canonical, layer, seed, device).to(target[kind])

    layers = [LayerWeights(**{name: make(name, i, kind) for name, (_, kind) in layer_specs(cfg).items()})
              for i in range(cfg.num_layers)]
    return Weights(**{name: make(name, None, kind) for name, (_, kind) in global_specs(cfg).items()}, layers=layers)


class _Entry:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, make: Callable[[], torch.Tensor]):
        self.name, self.shape, self.dtype, self.make = name, shape, dtype, make
        self.nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


def _entries(cfg: ModelConfig, layout: str, seed: int) -> list[_Entry]:
    """Every tensor of the checkpoint, in file order, with a function that makes its data."""
    cache: dict[tuple, torch.Tensor] = {}

    def piece(canonical: str, layer: int | None, index: int, rows: list[int] | None) -> torch.Tensor:
        key = (canonical, layer)
        if key not in cache:  # q, k and v come from one canonical qkv tensor: make it once
            cache.clear()
            cache[key] = _random(cfg, canonical, layer, seed)
        t = cache[key]
        return t if rows is None else t.split(rows)[index]

    out: list[_Entry] = []

    def add(canonical: str, layer: int | None, spec: tuple[tuple[int, ...], str]) -> None:
        shape, kind = spec
        rows = split_rows(cfg, canonical) if layout == "hf" else None
        dtype = torch.uint8 if kind == "u8" else torch.bfloat16
        for i, name in enumerate(tensor_names(layout, canonical, layer)):
            shp = shape if rows is None else (rows[i], *shape[1:])
            out.append(_Entry(name, shp, dtype, lambda c=canonical, ly=layer, i=i, r=rows: piece(c, ly, i, r)))

    glob = global_specs(cfg)
    add("embedding", None, glob["embedding"])
    for layer in range(cfg.num_layers):
        for canonical, spec in layer_specs(cfg).items():
            add(canonical, layer, spec)
    add("norm", None, glob["norm"])
    add("unembedding", None, glob["unembedding"])
    return out


def _write_safetensors(path: Path, entries: list[_Entry], bar: tqdm) -> None:
    """The safetensors format: u64 header size, JSON header (name -> dtype, shape, offsets), raw data."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": _ST_DTYPE[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            t = e.make().contiguous()
            assert tuple(t.shape) == e.shape and t.dtype == e.dtype, e.name
            f.write(t.view(torch.uint8).numpy().data)
            bar.update(e.nbytes)
    tmp.rename(path)


def checkpoint_bytes(cfg: ModelConfig, layout: str = "hf") -> int:
    """What write_checkpoint writes, in bytes (the tensors; the headers and config are small)."""
    one = sum(e.nbytes for e in _entries(cfg, "hf" if layout == "both" else layout, 0))
    return 2 * one if layout == "both" else one


def write_checkpoint(folder: str | Path, cfg: ModelConfig | str = "tiny", layout: str = "hf", seed: int = 0,
                     progress: bool = True) -> Path:
    """Write a random gpt-oss checkpoint. layout: "hf" (repo root), "original" (the reference's files) or
    "both" (HF files at the root and the original ones under original/, like the published repos)."""
    if isinstance(cfg, str):
        if cfg not in PRESETS:
            raise ValueError(f"unknown preset {cfg!r}; choose from {sorted(PRESETS)}")
        cfg = PRESETS[cfg]
    if layout not in ("hf", "original", "both"):
        raise ValueError(f"layout must be hf, original or both, got {layout!r}")
    folder = Path(folder)
    if layout == "both":
        write_checkpoint(folder, cfg, "hf", seed, progress)
        write_checkpoint(folder / "original", cfg, "original", seed, progress)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    entries = _entries(cfg, layout, seed)
    total = sum(e.nbytes for e in entries)
    with tqdm(total=total, desc=f"writing {layout} checkpoint", unit="B", unit_scale=True,
              disable=not progress) as bar:
        if layout == "original":
            (folder / "config.json").write_text(json.dumps({**cfg.to_original_dict(), SYNTHETIC_KEY: True}, indent=2))
            _write_safetensors(folder / "model.safetensors", entries, bar)
            return folder
        (folder / "config.json").write_text(json.dumps({**cfg.to_hf_dict(), SYNTHETIC_KEY: True}, indent=2))
        shards: list[list[_Entry]] = [[]]
        size = 0
        for e in entries:
            if shards[-1] and size + e.nbytes > SHARD_BYTES:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += e.nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(folder / name, shard, bar)
            weight_map.update({e.name: name for e in shard})
        write_index(folder, weight_map, total)
    return folder
