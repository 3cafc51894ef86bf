"""The q8 mode's prompts: the MoE block on int8 activations (csrc/x86_q8_prompts.c, kernels.c's scalar reference)."""

import pytest
import torch

from ossie.backends import cpu_kernels as kernels
from ossie.backends.torch_ops import swiglu
from ossie.model.mxfp4 import mxfp4_dequantize

from .test_kernels import moe_reference, random_experts

pytestmark = pytest.mark.skipif(not kernels.available(), reason="C kernels not built (no compiler)")
ALPHA, LIMIT = 1.702, 7.0


def round_act32(x: torch.Tensor) -> torch.Tensor:
    """x [T, n] float32 as llama.cpp rounds activations for its q8_0 products (kernels.c round_act32): each 32
    values to int8 steps of amax / 127, computed in float32 as the C does; the rounded values, float64."""
    g = x.float().view(x.shape[0], -1, 32)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    return (torch.round(g * inv).double() * (amax / 127).double()).view(x.shape)


def reference(x, weights_, experts, weights, bf16):
    """The MoE block in float64 on rounded x and rounded activations, expert by expert in ascending order."""
    w1b, w1s, b1, w2b, w2s, b2 = weights_
    ref = torch.zeros(x.shape, dtype=torch.float64)
    xr = round_act32(x)
    for t in range(x.shape[0]):
        for n in experts[t].argsort().tolist():
            e = int(experts[t, n])
            up = xr[t:t + 1] @ mxfp4_dequantize(w1b[e], w1s[e], torch.float32).double().T + b1[e].double()
            act = swiglu(up.float(), ALPHA, LIMIT)  # the C kernel's SwiGLU runs in float32 on its float32 sums
            if bf16:
                act = act.bfloat16()
            down = round_act32(act.float()) @ mxfp4_dequantize(w2b[e], w2s[e], torch.float32).double().T
            ref[t] += weights[t, n].double() * (down[0] + b2[e].double())
    return ref


def prompt(gen, tokens=40, h=320):
    x = torch.randn(tokens, h, generator=gen)
    experts = torch.stack([torch.tensor([0, 1 + t % 2, 3 + (t % 7 == 0) + 2 * (t == 5)]) for t in range(tokens)])
    return x, experts, torch.softmax(torch.randn(tokens, 3, generator=gen), -1)


@pytest.mark.parametrize("bf16", [False, True])
def test_q8_moe_is_the_rounded_math(path, bf16):
    """Against float64 on x and activations rounded to int8 per 32 (an expert with 40 tokens, with a few, with
    one; groups of 10 and 6): the int8 products are that math to float32's rounding. Against the unrounded block
    the rounding costs ~2 % of these random experts' outputs (measured 2.0 %: two roundings, each to ~0.4 % of a
    group's largest value, through weights that amplify), and not nothing (the rounding happened)."""
    gen = torch.Generator().manual_seed(41 + bf16)
    weights_ = random_experts(gen)
    x, experts, weights = prompt(gen)
    if bf16:
        x = x.bfloat16().float()
    y = kernels.moe(x, *weights_, experts, weights, ALPHA, LIMIT, bf16, q8=True).double()
    ref = reference(x, weights_, experts, weights, bf16)
    # a bf16 model rounds activations to bf16, where the last float32 bit can flip one (see test_kernels)
    assert ((y - ref).norm() / ref.norm()).item() < (3e-5 if bf16 else 2e-6)
    exact = moe_reference(x, weights_, experts, weights, ALPHA, LIMIT, bf16)
    assert 1e-3 < ((y - exact).norm() / exact.norm()).item() < 0.04


def test_q8_moe_same_bits_on_every_path_and_every_token_count():
    """Integer sums, then one float chain in the same order everywhere: every path (AVX2, AVX-VNNI, AVX-512 VNNI;
    NEON and SDOT on ARM64) gives the scalar path's bits; a token gets alone what it gets in the prompt; one thread
    as several."""
    gen = torch.Generator().manual_seed(43)
    weights_ = random_experts(gen, h=608)  # 19 groups: a panel of 16 and one of 3
    x, experts, weights = prompt(gen, tokens=23, h=608)
    before, threads = kernels.kernel_path(), kernels.kernel_threads()
    results = {}
    try:
        for p in kernels.PATHS:
            kernels.set_path(p)
            if kernels.kernel_path() != p:
                continue
            results[p] = kernels.moe(x, *weights_, experts, weights, ALPHA, LIMIT, True, q8=True)
            for t in (0, 5, 22):
                alone = kernels.moe(x[t:t + 1], *weights_, experts[t:t + 1], weights[t:t + 1], ALPHA, LIMIT, True,
                                    q8=True)
                assert torch.equal(alone, results[p][t:t + 1]), (p, t)
        kernels.set_path("scalar")
        kernels.set_num_threads(1)
        one_thread = kernels.moe(x, *weights_, experts, weights, ALPHA, LIMIT, True, q8=True)
    finally:
        kernels.set_path(before)
        kernels.set_num_threads(threads)
    assert len(results) >= 2 or kernels.kernel_path() == "scalar", results.keys()
    for y in results.values():
        assert torch.equal(y, results["scalar"])
    assert torch.equal(one_thread, results["scalar"])


def test_q8_moe_edge_scales_on_every_path():
    """Scale bytes whose halves are no normal float (0, 1: subnormal; 255: infinite) take the table of scales, and
    the others the bits computed from the byte: every path gives the scalar path's numbers (infinities and NaNs
    where it has them)."""
    gen = torch.Generator().manual_seed(47)
    w1b, w1s, b1, w2b, w2s, b2 = random_experts(gen)
    w1s, w2s = w1s.clone(), w2s.clone()
    w1s[0, :8, 0] = torch.tensor([0, 1, 2, 254, 255, 0, 1, 2], dtype=torch.uint8)  # one row group of expert 0
    w2s[0, 3, :3] = torch.tensor([0, 1, 254], dtype=torch.uint8)
    weights_ = (w1b, w1s, b1, w2b, w2s, b2)
    x, experts, weights = prompt(gen, tokens=12)
    before, results = kernels.kernel_path(), {}
    try:
        for p in kernels.PATHS:
            kernels.set_path(p)
            if kernels.kernel_path() == p:
                results[p] = kernels.moe(x, *weights_, experts, weights, ALPHA, LIMIT, False, q8=True)
    finally:
        kernels.set_path(before)
    assert not results["scalar"].isfinite().all()  # the infinite scale reached the output
    for y in results.values():
        torch.testing.assert_close(y, results["scalar"], rtol=0, atol=0, equal_nan=True)
