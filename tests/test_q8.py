"""The 8-bit mode (quantization="q8"): the format, the kernel on every code path against the format's own
decoding, and what it costs a model in accuracy, bounded against what bf16 rounding alone costs it."""

import pytest
import torch

import ossie
from ossie.backends import cpu_kernels as kernels
from ossie.model.q8 import GROUP, Q8, dequantize, quantize, quantize_torch

pytestmark = pytest.mark.skipif(not kernels.available(), reason="ossie's C kernels are not built")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_format_rounds_each_group_to_127_steps_of_its_largest():
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(70, 96, generator=gen) * torch.logspace(-3, 2, 96)).bfloat16()  # groups of very different sizes
    w[3] = 0  # an all-zero row: scale 0, values 0
    q = quantize_torch(w)
    assert q.values.dtype == torch.int8 and q.scales.dtype == torch.float16 and q.scales.shape == (70, 96 // GROUP)
    assert q.values.abs().max() <= 127 and (q.values[3] == 0).all() and (q.scales[3] == 0).all()
    back = dequantize(q)
    step = q.scales.float().repeat_interleave(GROUP, 1)
    assert ((back - w.float()).abs() <= step / 2 * 1.01 + 1e-12).all()  # half a step at most, each group its own
    assert q.nbytes == 70 * 96 + 70 * 3 * 2 and q.source is w
    gaussian = torch.randn(512, 256, generator=gen).bfloat16()
    assert rel(dequantize(quantize(gaussian)), gaussian) < 0.007  # ~ 2.5 sigma / 127 steps / sqrt(12)


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_kernel_on_every_path(path, tokens):
    """Each code path against the format's own decoding: the float paths exactly up to float32 sums; with AVX-512
    VNNI, where x is rounded to 8 bits per 32 values as llama.cpp rounds it, within that rounding."""
    gen = torch.Generator().manual_seed(tokens)
    w = torch.randn(300, 160, generator=gen).bfloat16()
    q, bias = quantize(w), torch.randn(300, generator=gen)
    x = torch.randn(tokens, 160, generator=gen).bfloat16().float()
    expected = x @ dequantize(q).T + bias
    y = kernels.q8_matmul(x, q, bias)
    vnni = path == "avx512bf16" and kernels.kernel_path() == "avx512bf16"
    assert rel(y, expected) < (0.01 if vnni else 1e-6)


@pytest.fixture(scope="module")
def models(tiny_repo):
    load = dict(progress=False, enable_prefix_caching=False)
    return (ossie.LLM(tiny_repo, dtype="float32", **load), ossie.LLM(tiny_repo, **load),
            ossie.LLM(tiny_repo, quantization="q8", **load))


def test_q8_model_costs_accuracy_within_bounds(models):
    """Logits of a 300-token prompt against the float32 model: the q8 model's error is within three times the
    error bf16 rounding alone gives the exact mode (this random tiny model amplifies every rounding), and its top
    token agrees with the exact mode's at most positions (measured: benchmarks/q8.py)."""
    f32, exact, q8 = models
    ids = torch.randint(0, 200_000, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    truth, a, b = f32.logits(ids), exact.logits(ids), q8.logits(ids)
    assert rel(b, truth) < 3 * rel(a, truth)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.6


def test_q8_decoding_reads_the_8_bits(models):
    """Decoding takes the q8 kernel (prefill the checkpoint's bf16 matrices): greedy tokens of the fused one-call
    path and of op-by-op decoding agree, and differ from the exact mode's only after a while (rounding)."""
    _, exact, q8 = models
    assert isinstance(q8.model.w.layers[0].qkv_w, Q8) and isinstance(q8.model.w.unembedding, Q8)
    assert q8.model.w.nbytes() < exact.model.w.nbytes()
    prompt = list(range(1000, 1040))
    fused = list(q8.generate(prompt, max_tokens=12, temperature=0))
    q8.backend.fused_decode = False
    try:
        by_ops = list(q8.generate(prompt, max_tokens=12, temperature=0))
    finally:
        q8.backend.fused_decode = True
    assert fused[:6] == by_ops[:6]


def test_q8_is_refused_where_it_does_not_apply(tiny_repo):
    with pytest.raises(ValueError, match="bf16 models on the CPU"):
        ossie.LLM(tiny_repo, dtype="float32", quantization="q8", progress=False)
    with pytest.raises(ValueError, match="quantization must be one of"):
        ossie.LLM(tiny_repo, quantization="q4", progress=False)


def test_c_quantizer_gives_the_reference_numbers():
    """The C quantizer (used at load) against the torch one, bit for bit: groups of ordinary, tiny (float16
    subnormal scales), huge and zero weights, and values exactly half a step between two codes."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(257, 160, generator=gen) * torch.logspace(-9, 4, 160)
    w[7] = 0
    w[8, :32] = torch.arange(32) * 0.5  # ties: round half to even in both
    w = w.bfloat16()
    values, scales = kernels.quantize_q8(w)
    reference = quantize_torch(w)
    assert torch.equal(values, reference.values)
    assert torch.equal(scales.view(torch.int16), reference.scales.view(torch.int16))
    assert torch.equal(quantize(w, kernels.quantize_q8).values, values)
