"""A prompt's experts with a few tokens each: a 64-token prompt gives an expert ~8. On the avx2 path those with 6-8
or 12-16 tokens in a prompt's call take mxfp4_avx2_few (the tokens across 8 or 16 vector lanes, rows decoded into
floats with their scales folded), whose sums run in another order than the tile kernel's: right against the float64
reference, and never in a decoding call, where a token must get what it gets alone."""

import pytest
import torch

from ossie.backends import cpu_kernels as kernels

from .test_kernels import close, moe_reference, on_one_thread, random_experts

pytestmark = pytest.mark.skipif(not kernels.available(), reason="C kernels not built (no compiler)")
ALPHA, LIMIT = 1.702, 7.0
COUNTS = [6, 8, 5, 12, 16, 13]  # tokens per expert: 8 lanes (6, 8), 16 (12, 13, 16), the tile kernel (5)


def few_token_prompt(gen: torch.Generator, h: int):
    """20 tokens choosing 3 of 6 experts each, expert e chosen by COUNTS[e] of them: the choices laid end to end
    and token t taking slots t, t + 20, t + 40 (an expert's run is shorter than 20 slots: 3 distinct experts)."""
    slots = [e for e, c in enumerate(COUNTS) for _ in range(c)]
    tokens = len(slots) // 3
    experts = torch.tensor([[slots[t], slots[t + tokens], slots[t + 2 * tokens]] for t in range(tokens)])
    assert torch.bincount(experts.flatten()).tolist() == COUNTS
    x = torch.randn(tokens, h, generator=gen)
    return x, experts, torch.softmax(torch.randn(tokens, 3, generator=gen), -1)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("h,i", [(320, 224), (288, 192)])
def test_a_prompts_few_token_experts_match_reference(path, bf16, h, i):
    """Expert widths of 2 x 224 rows (not a multiple of the kernel's 12 or 6 rows a block) and hidden sizes of 10
    and 9 groups (the decoded chunks of 8 groups end in a pair, or in a group alone); rows of expert 1 with scale
    bytes that do not fold into normal floats (0, 1: the tile kernel takes their block). The same bits on one
    thread as on several."""
    gen = torch.Generator().manual_seed(h + i + bf16)
    w1b, w1s, b1, w2b, w2s, b2 = random_experts(gen, e=6, h=h, i=i)
    w1s, w2s = w1s.clone(), w2s.clone()
    w1s[1, 13, 0], w1s[1, 40, 2], w2s[1, 7, 1] = 1, 0, 1
    weights_ = (w1b, w1s, b1, w2b, w2s, b2)
    x, experts, weights = few_token_prompt(gen, h)
    if bf16:
        x = x.bfloat16().float()
    y = kernels.moe(x, *weights_, experts, weights, ALPHA, LIMIT, bf16)
    ref = moe_reference(x, weights_, experts, weights, ALPHA, LIMIT, bf16)
    if bf16:  # activations rounded to bf16: a bound of rounding flips, as in test_moe_of_a_prompt_matches_reference
        assert ((y.double() - ref).norm() / ref.norm()).item() < 3e-5
    else:
        close(y.double(), ref)
    assert torch.equal(on_one_thread(lambda: kernels.moe(x, *weights_, experts, weights, ALPHA, LIMIT, bf16)), y)


@pytest.mark.parametrize("bf16", [False, True])
def test_a_decoding_call_of_8_tokens_on_the_same_experts_gives_each_its_own(path, bf16):
    """8 rows (the most a decoding call holds, ossie.backends.cpu.SMALL_BATCH) all choosing the same 3 experts: 8
    tokens an expert, which a prompt's call would give the few-token kernel. A decoding call keeps the tile kernel:
    every token bit for bit what it gets alone."""
    gen = torch.Generator().manual_seed(71 + bf16)
    weights_ = random_experts(gen)
    x, residual = torch.randn(8, 320, generator=gen), torch.randn(8, 320, generator=gen)
    if bf16:
        x, residual = x.bfloat16().float(), residual.bfloat16().float()
    experts = torch.tensor([[2, 4, 5]] * 8)
    weights = torch.softmax(torch.randn(8, 3, generator=gen), -1)
    together = kernels.moe(x, *weights_, experts, weights, ALPHA, LIMIT, bf16, residual=residual)
    for t in range(8):
        alone = kernels.moe(x[t:t + 1], *weights_, experts[t:t + 1], weights[t:t + 1], ALPHA, LIMIT, bf16,
                            residual=residual[t:t + 1])
        assert torch.equal(together[t:t + 1], alone), t
