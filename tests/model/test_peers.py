"""ossie's float32 logits against transformers' GptOssForCausalLM and an independent float64 reference."""

import dataclasses

import pytest
import torch

import ossie
from ossie.synth import write_checkpoint
from tests.conftest import TINY
from tests.reference import reference_logits

transformers = pytest.importorskip("transformers", reason="transformers is the test-only peer: pip install -e .[test]")

# 200 tokens: longer than the 128-token sliding window, so the window mask matters.
TOKENS = torch.randint(0, 201088, (200,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def hf_model(tiny_repo):
    from transformers import GptOssForCausalLM, Mxfp4Config

    # transformers dequantizes the MXFP4 experts itself, as a user of it can offline: that is the peer. Left to
    # choose, transformers >= 5.2x loads them through a Triton kernel fetched from the Hub (and stops at a
    # publisher trust check without a network), so the dequantizing path is asked for by name.
    model = GptOssForCausalLM.from_pretrained(tiny_repo, dtype=torch.float32,
                                              quantization_config=Mxfp4Config(dequantize=True))
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def hf_logits(hf_model):
    with torch.no_grad():
        return hf_model(torch.tensor([TOKENS])).logits[0].float()


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_logits_match_transformers(tiny_repo, hf_logits, layout):
    llm = ossie.LLM(tiny_repo, dtype="float32", layout=layout, progress=False)
    assert llm.layout == layout
    ours = llm.logits(TOKENS)
    assert ours.shape == hf_logits.shape == (200, 201088)
    err = rel_err(ours, hf_logits)
    print(f"{layout}: relative error vs transformers {err:.2e}, max abs {(ours - hf_logits).abs().max():.2e}")
    assert err < 1e-4
    assert torch.allclose(ours, hf_logits, rtol=1e-4, atol=1e-4)


def test_logits_match_reference_math(tiny_repo, tiny_llm):
    ref = reference_logits(tiny_repo / "original", TOKENS[:150])
    ours = tiny_llm.logits(TOKENS[:150])
    err = rel_err(ours, ref)
    print(f"relative error vs float64 reference math {err:.2e}")
    assert err < 1e-4


def test_greedy_generation_matches_transformers(tiny_llm, hf_model):
    prompt = TOKENS[:120]  # generation crosses the 128-token window boundary
    ours = list(tiny_llm.generate(prompt, max_tokens=24, temperature=0.0, stop_token_ids=[]))
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs


def test_bf16_is_close_to_float32(tmp_path):
    # bf16 rounding flips the router's choice wherever two experts' logits nearly tie, and a flipped expert changes
    # that position (and, through attention, later ones) wholesale: with top-2 of 8, that is luck, not precision.
    # With every expert chosen there is no choice to flip, and bf16 must then agree with float32 to its precision.
    dense = dataclasses.replace(TINY, experts_per_token=TINY.num_experts)
    folder = write_checkpoint(tmp_path, dense, "hf", seed=1, progress=False)
    bf16 = ossie.LLM(folder, dtype="bfloat16", progress=False)
    fp32 = ossie.LLM(folder, dtype="float32", progress=False)
    assert bf16.model.w.embedding.dtype == torch.bfloat16
    assert rel_err(bf16.logits(TOKENS[:64]), fp32.logits(TOKENS[:64])) < 0.05
