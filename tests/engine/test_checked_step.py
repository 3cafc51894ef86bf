"""What speculative decoding needs from a step that checks k candidates: each of its k+1 rows computed as the one-token
step at that position computes it, so the logits at every checked row are, bit for bit, those the sequence gets
decoding the same tokens one at a time, and greedy output cannot change. The rows go through the products as
decoding rows do (each as it would alone), and attention reads, for each row, the keys a one-token step would read
in the order it would read them (a sliding layer's ring as it would lie then, past the window too)."""

import pytest
import torch

import ossie
from ossie.backends import cpu_kernels
from ossie.engine import ModelRunner, Sequence
from tests.helpers import RecordingRunner, greedy

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the C kernels were not built")

GEN = torch.Generator().manual_seed(23)
PROMPT = torch.randint(0, 4096, (140,), generator=GEN).tolist()  # past the sliding window of 128
CANDIDATES = torch.randint(0, 4096, (5,), generator=GEN).tolist()


def prefilled(runner: ModelRunner, prompt: list[int], max_tokens: int = 20) -> Sequence:
    seq = Sequence(prompt, greedy(max_tokens))
    while (tok := runner.run([seq])[0]) is None:
        pass
    seq.append(tok)
    return seq


def one_at_a_time(runner: RecordingRunner, seq: Sequence, tokens: list[int]) -> torch.Tensor:
    """The logits of one-token steps feeding seq's pending token, then `tokens` (appended whatever was sampled)"""
    runner.seen.clear()
    for tok in tokens:
        runner.run([seq])
        seq.append(tok)
    runner.run([seq])
    return torch.stack(runner.seen)


@pytest.fixture(scope="module", params=["tiny-bf16", "wide-bf16", "wide-q8"])
def llm(request):
    """bf16 models, whose products are ossie's C kernels (a float32 model's are torch's GEMM, whose sums depend on
    the row count: there, as for batching, checked rows agree with one-token steps only to float32 rounding)"""
    model, kind = request.param.split("-")
    repo = request.getfixturevalue("tiny_repo" if model == "tiny" else "wide_repo")
    return ossie.LLM(repo, dtype="bfloat16", progress=False, enable_prefix_caching=False,
                     quantization="q8" if kind == "q8" else None)


def test_checked_rows_get_the_logits_of_one_token_steps(llm, path):
    """The last token and 5 candidates (positions 140-145, the 128-position ring wrapped) checked in one step, alone
    and beside another sequence decoding and a third reading its prompt: every checked row's logits equal those of
    the one-token steps feeding the same tokens, bit for bit, on every kernel path."""
    if path == "scalar" and llm.config.hidden_size > 1000:
        pytest.skip("the tiny model covers the scalar path; at the 20b's widths its prompt takes minutes")
    ref = RecordingRunner(llm.model)
    expected = one_at_a_time(ref, prefilled(ref, PROMPT), CANDIDATES)

    runner = RecordingRunner(llm.model)
    seq = prefilled(runner, PROMPT)
    seq.propose(CANDIDATES)
    runner.seen.clear()
    (samples,) = runner.run([seq])
    assert len(samples) == len(CANDIDATES) + 1
    assert torch.equal(torch.stack(runner.seen), expected)

    runner = RecordingRunner(llm.model)
    seq, other = prefilled(runner, PROMPT), prefilled(runner, PROMPT[:37])
    reading = Sequence(PROMPT[:90], greedy(4))
    seq.propose(CANDIDATES)
    runner.seen.clear()
    runner.run([seq, other, reading])
    assert torch.equal(torch.stack(runner.by_sequence[seq.id][-len(CANDIDATES) - 1:]), expected)
