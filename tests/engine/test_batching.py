"""Continuous batching: the decode steps of all running sequences in one forward pass, prompts read in chunks under a
per-step token budget, preemption when KV memory runs out, cancelling one sequence of a batch. A sequence decoded
in a batch produces what it produces alone."""

import pytest
import torch

import ossie
from ossie.backends.cpu_kernels import available as kernels_built
from ossie.engine import Engine, ModelRunner, Sequence
from ossie.special_tokens import N_ORDINARY
from tests.helpers import RecordingRunner, alone, greedy, run_engine, step_together

GEN = torch.Generator().manual_seed(5)
PROMPTS = [torch.randint(0, N_ORDINARY, (n,), generator=GEN).tolist() for n in (20, 45, 130, 7)]


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.0, seed=3)])
def test_batched_sequences_equal_each_alone(tiny_llm, sampling):
    """Four sequences (prompts of 7 to 130 tokens, so prompt chunks and decode steps share forward passes) step
    together: each produces the tokens it produces alone, greedy or sampled with a seed, from the same logits up to
    float32 rounding (the model's float32 products are torch's, whose sums may depend on the row count)."""
    runner = RecordingRunner(tiny_llm.model)
    seqs = [Sequence(p, greedy(16 + 3 * i, **sampling)) for i, p in enumerate(PROMPTS)]
    step_together(runner, seqs)
    for seq in seqs:
        solo = RecordingRunner(tiny_llm.model)
        assert alone(solo, seq.prompt, greedy(seq.params.max_tokens, **sampling)) == seq.output
        together, by_itself = torch.stack(runner.by_sequence[seq.id]), torch.stack(solo.seen)
        assert torch.allclose(together, by_itself, rtol=1e-5, atol=1e-5), (together - by_itself).abs().max()


@pytest.mark.skipif(not kernels_built(), reason="the C kernels were not built (no C compiler at install)")
@pytest.mark.parametrize("model", ["tiny", "wide", "wide-q8"])
def test_batched_bf16_decoding_equals_alone_bit_for_bit(request, path, model):
    """bf16 on the CPU, on every kernel path: a sequence alone decodes through the fused attention block (one C call
    a layer); in a batch the attention block goes op by op over all rows. Each decode step's logits are the same
    bit for bit. (The prompts are read alone first: prompts read together go through torch's GEMM and the experts'
    panel kernel, whose sums depend on the row count.)"""
    repo = request.getfixturevalue("tiny_repo" if model == "tiny" else "wide_repo")
    llm = ossie.LLM(repo, dtype="bfloat16", progress=False, enable_prefix_caching=False,
                    quantization="q8" if model.endswith("q8") else None)  # the 8-bit mode's decode kernels too
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 4096, (n,), generator=gen).tolist() for n in (20, 33, 7, 40)]
    steps = 12 if model == "tiny" or path != "scalar" else 4  # the scalar path is slow at these widths

    def read_prompts(runner):
        seqs = [Sequence(p, greedy(steps)) for p in prompts]
        for seq in seqs:
            (tok,) = runner.run([seq])
            seq.append(tok)
        return seqs

    solo = RecordingRunner(llm.model)
    for seq in read_prompts(solo):
        while not seq.finished:
            (tok,) = solo.run([seq])
            seq.append(tok)
    runner = RecordingRunner(llm.model)
    seqs = read_prompts(runner)
    step_together(runner, seqs)
    for seq, by_itself in zip(seqs, solo.by_sequence.values(), strict=True):
        together = torch.stack(runner.by_sequence[seq.id])
        assert torch.equal(together, torch.stack(by_itself)), (together - torch.stack(by_itself)).abs().max()


def test_long_prompt_does_not_stop_the_others(tiny_llm):
    """A per-step budget of 32 tokens: two sequences decode while a 300-token prompt is read 30 tokens a step
    beside them (the decoding ones go first), so they get a token every step meanwhile; everyone produces what it
    produces alone."""
    runner = ModelRunner(tiny_llm.model, prefill_chunk=32)
    long = torch.randint(0, N_ORDINARY, (300,), generator=GEN).tolist()
    order: list[int] = []
    engine = Engine(runner).start()
    try:
        def on_token(i, n, handles):
            order.append(i)

        out, _ = run_engine(engine, [PROMPTS[0], PROMPTS[3], long], greedy(20), on_token)
    finally:
        engine.shutdown()
    first_of_long = order.index(2)
    assert order[:first_of_long].count(0) >= 8 and order[:first_of_long].count(1) >= 8  # ~300/30 steps of reading
    for prompt, tokens in zip([PROMPTS[0], PROMPTS[3], long], out, strict=True):
        assert tokens == alone(ModelRunner(tiny_llm.model), prompt, greedy(20))


def test_cancelling_one_sequence_leaves_the_others(tiny_llm):
    runner = ModelRunner(tiny_llm.model)
    engine = Engine(runner).start()
    try:
        def on_token(i, n, handles):
            if i == 1 and n == 3:
                handles[1].cancel()

        out, handles = run_engine(engine, PROMPTS[:3], greedy(20), on_token)
    finally:
        engine.shutdown()
    assert len(out[1]) < 20 and handles[1].sequence.cache is None
    for i in (0, 2):
        assert out[i] == alone(ModelRunner(tiny_llm.model), PROMPTS[i], greedy(20))
    assert engine.snapshot().cancelled == 1 and engine.snapshot().finished == 2


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.0, seed=9)])
def test_preempted_when_kv_memory_runs_out(tiny_llm, sampling):
    """A KV budget of 2.5 times one sequence's first cache: two of three sequences are admitted (the third waits),
    and when their caches grow (past the room they started with) the one admitted last is preempted and computes its
    tokens again later. Nothing fails, and everyone produces what it produces alone, greedy or with a seed."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    first_cache = ModelRunner(tiny_llm.model).kv.cache_bytes(Sequence(prompts[1], greedy(300)))
    runner = ModelRunner(tiny_llm.model, kv_budget=int(2.5 * first_cache))
    engine = Engine(runner).start()
    try:
        out, _ = run_engine(engine, prompts, [greedy(300, **sampling) for _ in prompts])
    finally:
        engine.shutdown()
    stats = engine.snapshot()
    assert stats.finished == 3 and stats.failed == 0 and stats.running == 0 and stats.waiting == 0
    assert stats.preempted >= 1
    for prompt, tokens in zip(prompts, out, strict=True):
        assert tokens == alone(ModelRunner(tiny_llm.model), prompt, greedy(300, **sampling))


def test_step_budget_favours_short_prompts_and_decoding():
    """Prompt chunks go shortest rest first, and while a sequence decodes a step reads at most
    prefill_while_decoding prompt tokens (so the decoding one's next token is not held up by a whole chunk)."""
    from ossie.engine.scheduler import Scheduler

    sched = Scheduler(max_running=4, max_tokens=512, prefill_while_decoding=64)
    long, short, decoding = (Sequence(list(range(n)), greedy(4)) for n in (5000, 70, 10))
    for seq in (long, short, decoding):
        sched.add(seq)
    sched.admit()
    decoding.num_computed = 9  # its prompt is read but for the last token: it decodes
    batch, sizes = sched.schedule()
    assert batch == [decoding, short] and sizes == [1, 64]  # 64 prompt tokens, the short prompt first
    decoding.num_computed, short.num_computed = 10, 70
    decoding.output.append(1)  # it has sampled a token: one pending again
    short.output.append(1)
    sched.running.remove(decoding)
    sched.running.remove(short)
    batch, sizes = sched.schedule()
    assert batch == [long] and sizes == [512]  # nothing decodes: a whole chunk


@pytest.mark.skipif(not kernels_built(), reason="the C kernels were not built (no C compiler at install)")
def test_decoding_beside_arriving_prompts_equals_alone_bit_for_bit(wide_repo, path):
    """Continuous batching as a server does it: two sequences decode while two prompts arrive and are read beside
    them in the same step (more than 8 rows). The decoding sequences' logits are those of decoding alone, bit for
    bit: their rows take the decode kernels whatever the step also carries (in one large product, torch's GEMM and
    the experts' panel kernel gave them sums that depend on the other rows)."""
    llm = ossie.LLM(wide_repo, dtype="bfloat16", progress=False, enable_prefix_caching=False)
    gen = torch.Generator().manual_seed(8)
    early = [torch.randint(0, 4096, (n,), generator=gen).tolist() for n in (12, 30)]
    late = [torch.randint(0, 4096, (n,), generator=gen).tolist() for n in (40, 25)]
    steps = 6 if path != "scalar" else 3

    solo = RecordingRunner(llm.model)
    expected = [alone(solo, p, greedy(steps)) for p in early]
    runner = RecordingRunner(llm.model)
    decoding = [Sequence(p, greedy(steps)) for p in early]
    for seq in decoding:  # their prompts read alone, as the solo runs read them
        (tok,) = runner.run([seq])
        seq.append(tok)
    arriving = [Sequence(p, greedy(2)) for p in late]
    batch = decoding + arriving
    for seq, tok in zip(batch, runner.run(batch), strict=True):  # two decode rows beside 65 prompt rows
        seq.append(tok)
    step_together(runner, decoding)
    for seq, want, logits in zip(decoding, expected, solo.by_sequence.values(), strict=True):
        assert seq.output == want
        assert torch.equal(torch.stack(runner.by_sequence[seq.id]), torch.stack(logits))
