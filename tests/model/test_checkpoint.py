"""Layout detection, bad checkpoints named precisely, and model resolution without network."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ossie
from ossie.model.checkpoint import CheckpointError, ModelNotFoundError, detect_layout, resolve_model
from ossie.model.config import ConfigError
from ossie.synth import write_checkpoint
from tests.conftest import TINY

SMALL = TINY.replace(num_layers=2, vocab_size=512)


@pytest.fixture()
def hf_copy(tmp_path):
    return write_checkpoint(tmp_path / "m", SMALL, "hf", seed=0, progress=False)


def shard_with(folder, name):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][name]


def test_layout_detection(tiny_repo):
    assert detect_layout(tiny_repo) == ("hf", tiny_repo)
    assert detect_layout(tiny_repo, "original") == ("original", tiny_repo / "original")
    assert detect_layout(tiny_repo / "original") == ("original", tiny_repo / "original")
    with pytest.raises(ValueError):
        detect_layout(tiny_repo, "gguf")


def test_synth_files_look_published(tiny_repo):
    cfg = json.loads((tiny_repo / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4" and cfg["model_type"] == "gpt_oss"
    index = json.loads((tiny_repo / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["model.layers.0.mlp.experts.gate_up_proj_blocks"].startswith("model-00001-of-")
    t = load_file(tiny_repo / index["weight_map"]["model.layers.0.mlp.experts.gate_up_proj_blocks"])
    assert t["model.layers.0.mlp.experts.gate_up_proj_blocks"].dtype == torch.uint8
    assert t["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (8, 128, 2, 16)
    assert t["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    orig = load_file(tiny_repo / "original" / "model.safetensors")
    assert orig["block.0.attn.qkv.weight"].shape == (TINY.qkv_dim, 64)
    assert torch.equal(orig["block.1.mlp.mlp2_weight.scales"], t["model.layers.1.mlp.experts.down_proj_scales"])


def test_missing_tensor_is_named(hf_copy):
    name = "model.layers.1.self_attn.sinks"
    shard = shard_with(hf_copy, name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.sinks.*missing"):
        ossie.LLM(hf_copy, progress=False)


def test_misshaped_tensor_names_file_and_tensor(hf_copy):
    name = "model.layers.0.mlp.experts.down_proj_scales"
    shard = shard_with(hf_copy, name)
    tensors = load_file(shard)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, shard)
    with pytest.raises(CheckpointError) as e:
        ossie.LLM(hf_copy, progress=False)
    assert shard.name in str(e.value) and name in str(e.value) and "expected (8, 64, 2)" in str(e.value)


def test_wrong_dtype_is_named(hf_copy):
    name = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    shard = shard_with(hf_copy, name)
    tensors = load_file(shard)
    tensors[name] = tensors[name].float()
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match="gate_up_proj_blocks has dtype torch.float32, expected uint8"):
        ossie.LLM(hf_copy, progress=False)


def test_missing_shard_and_corrupt_file(hf_copy):
    shard = shard_with(hf_copy, "lm_head.weight")
    shard.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=shard.name):
        ossie.LLM(hf_copy, progress=False)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: listed in model.safetensors.index.json but missing"):
        ossie.LLM(hf_copy, progress=False)


def test_unsupported_config(hf_copy):
    cfg_path = hf_copy / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="config.json.*MXFP4"):
        ossie.LLM(hf_copy, progress=False)
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    cfg["num_key_value_heads"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_kv_heads"):
        ossie.LLM(hf_copy, progress=False)
    cfg_path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ossie.LLM(hf_copy, progress=False)


def test_rope_parameters_form(hf_copy, tmp_path):
    """transformers 5 writes rope as rope_parameters (with rope_theta inside): same model."""
    ids = list(range(100, 140))
    before = ossie.LLM(hf_copy, dtype="float32", progress=False).logits(ids)
    cfg_path = hf_copy / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_parameters"] = {**cfg.pop("rope_scaling"), "rope_theta": cfg.pop("rope_theta")}
    cfg_path.write_text(json.dumps(cfg))
    assert torch.equal(ossie.LLM(hf_copy, dtype="float32", progress=False).logits(ids), before)


def test_unknown_folder_and_layout(tmp_path):
    with pytest.raises(CheckpointError, match="no gpt-oss checkpoint"):
        ossie.LLM(tmp_path, progress=False)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a gpt-oss config"):
        ossie.LLM(tmp_path, progress=False)
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        ossie.LLM(tmp_path / "nope", progress=False)


@pytest.mark.parametrize("name", ["openai/gpt-oss-20b", "gpt-oss:20b", "gpt-oss:latest"])
def test_repo_id_offline_gives_instructions(monkeypatch, tmp_path, name):
    """A repo id, or the Ollama-style name of one, offline and not in the cache: what to do, in the error."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model(name)
    msg = str(e.value)
    assert "hf download openai/gpt-oss-20b" in msg and "ossie synth" in msg


def test_repo_id_from_cache(monkeypatch, tmp_path):
    """A repo already in the HF cache resolves offline, original layout included."""
    from huggingface_hub import constants

    snap = tmp_path / "hf" / "hub" / "models--openai--gpt-oss-tiny" / "snapshots" / ("a" * 40)
    write_checkpoint(snap, SMALL, "both", seed=0, progress=False)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    path = resolve_model("openai/gpt-oss-tiny")
    assert path == snap
    llm = ossie.LLM("openai/gpt-oss-tiny", layout="original", progress=False)
    assert llm.layout == "original"
    shutil.rmtree(tmp_path / "hf")
