"""The seam speculative decoding needs: a step carries a decoding sequence's last token and k candidates, samples
at each of their k+1 positions, and the positions not kept are taken back. Taken back, they leave no trace: the
KV cache (full layers and the sliding-window rings) and so every later logit are exactly what they would have been
had the candidates never been fed."""

import dataclasses

import pytest
import torch

from ossie.engine import ModelRunner, PrefixCache, Scheduler, Sequence
from ossie.engine.kv_cache import KVCache
from ossie.special_tokens import N_ORDINARY
from tests.helpers import RecordingRunner, greedy

GEN = torch.Generator().manual_seed(11)
PROMPT = torch.randint(0, N_ORDINARY, (186,), generator=GEN).tolist()  # past the window of 128; see below
CANDIDATES = torch.randint(0, N_ORDINARY, (4,), generator=GEN).tolist()


def kv(cfg, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (t, cfg.num_kv_heads, cfg.head_dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def written(cache: KVCache, cfg, steps: list[int]) -> KVCache:
    """`cache` with steps of the given sizes written into every layer (rows from a seed per position)."""
    for n in steps:
        for layer in range(len(cache.sliding)):
            k, v = zip(*(kv(cfg, 1, 1000 * layer + cache.length + i) for i in range(n)), strict=True)
            cache.update(layer, torch.cat(k), torch.cat(v))
        cache.advance(n)
    return cache


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("kept", [0, 2, 5])
def test_truncate_gives_back_the_cache_without_the_positions(tiny_llm, quantized, kept):
    """Positions 0..149 (a ring of 128 wrapped), then a step of 5 of which `kept` stay: every buffer equals that of a
    cache that never saw the others (the ring slots they overwrote hold their old rows again)."""
    cfg = dataclasses.replace(tiny_llm.config, head_dim=32)  # q8 scales each 32 values of a head
    a = written(KVCache(cfg, torch.float32, capacity=256, quantized=quantized), cfg, [100, 50, 5])
    a.truncate(5 - kept)
    b = written(KVCache(cfg, torch.float32, capacity=256, quantized=quantized), cfg,
                [100, 50] + ([kept] if kept else []))
    assert a.length == b.length == 150 + kept
    for layer, sliding in enumerate(a.sliding):
        n = a.k[layer].shape[0] if sliding else a.length  # a ring: every slot; a full layer: the positions held
        assert torch.equal(a.k[layer][:n], b.k[layer][:n]) and torch.equal(a.v[layer][:n], b.v[layer][:n])


def test_truncate_refuses_what_a_ring_cannot_give_back(tiny_llm):
    cfg = tiny_llm.config
    cache = written(KVCache(cfg, torch.float32, capacity=256), cfg, [140, 4])
    with pytest.raises(ValueError, match="not all written by the last step"):
        cache.truncate(5)  # one more than the last step wrote
    written(cache, cfg, [1])
    with pytest.raises(ValueError, match="not all written by the last step"):
        cache.truncate(1)  # a one-token step keeps no undo
    assert cache.length == 145  # refused before anything changed
    cache.truncate(0)


def checked_step(runner: ModelRunner, seq: Sequence) -> list[int]:
    (samples,) = runner.run([seq])
    assert isinstance(samples, list) and len(samples) == len(CANDIDATES) + 1
    return samples


@pytest.fixture(scope="module")
def bf16_llm(tiny_repo):
    import ossie

    return ossie.LLM(tiny_repo, progress=False)  # bf16: one-token steps take the C kernels' fused decode


@pytest.mark.parametrize("prefix_cache", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_candidates_taken_back_leave_every_later_logit_unchanged(tiny_llm, bf16_llm, prefix_cache, dtype):
    """Decode 3 tokens, feed 4 candidates beside the last one and take all 5 positions back, then decode on: the
    tokens and their logits are bit for bit those of the sequence that never saw the candidates. (The 186-token
    prompt wraps the 128-position rings, and the 5 positions, 188-192, complete a 64-position block of the prefix
    cache that must be forgotten.)"""
    llm = tiny_llm if dtype == "float32" else bf16_llm

    def runner():
        cache = PrefixCache(llm.config, 2**30) if prefix_cache else None
        return RecordingRunner(llm.model, prefix_cache=cache)

    ref, ref_seq = runner(), Sequence(PROMPT, greedy(12))
    while not ref_seq.finished:
        ref_seq.append(ref.run([ref_seq])[0] if ref_seq.pending <= 1 else _prompt(ref, ref_seq))

    test, seq = runner(), Sequence(PROMPT, greedy(12))
    seq.append(_prompt(test, seq))
    for _ in range(2):
        seq.append(test.run([seq])[0])
    seq.propose(CANDIDATES)
    before = seq.num_computed
    checked_step(test, seq)
    assert seq.num_computed == before + 5
    test.kv.rollback(seq, 5)
    seq.accept([])  # nothing kept: the step never happened
    assert seq.pending == 1 and seq.cache.length == before
    if prefix_cache:
        assert len(seq.block_keys) == seq.num_computed // test.kv.prefix_cache.block_size == 2
    test.seen.clear()
    while not seq.finished:
        seq.append(test.run([seq])[0])
    assert seq.output == ref_seq.output
    later = torch.stack(ref.seen[-len(test.seen):])
    assert torch.equal(torch.stack(test.seen), later)


def _prompt(runner: ModelRunner, seq: Sequence) -> int:
    while True:
        (tok,) = runner.run([seq])
        if tok is not None:
            return tok


def test_kept_candidates_and_the_token_after_them_are_recorded(tiny_llm):
    """Keep the first two candidates and the token sampled after them: the output grows by three, the positions of
    the two rejected ones are taken back, and the sequence decodes on from there."""
    runner, seq = ModelRunner(tiny_llm.model), Sequence(PROMPT, greedy(20))
    seq.append(_prompt(runner, seq))
    n = seq.num_tokens
    seq.propose(CANDIDATES)
    samples = checked_step(runner, seq)
    seq.accept(CANDIDATES[:2] + [samples[2]])
    runner.kv.rollback(seq, len(CANDIDATES) - 2)
    assert seq.output[-3:] == CANDIDATES[:2] + [samples[2]] and seq.num_tokens == n + 3
    assert seq.pending == 1 and seq.num_computed == seq.cache.length == n + 2 and not seq.candidates
    assert runner.run([seq])[0] is not None


def test_candidates_only_while_decoding_without_steering(tiny_llm):
    seq = Sequence(PROMPT, greedy(4))
    with pytest.raises(ValueError, match="only while decoding"):
        seq.propose(CANDIDATES)  # its prompt is not read yet


def test_the_scheduler_checks_a_decoding_sequences_candidates_whole():
    """A decoding sequence with 4 candidates computes 5 tokens among the decoding ones, before any prompt chunk,
    and they count against the step's budget."""
    sched = Scheduler(max_running=4, max_tokens=16)
    decoding, guessing, prompt = (Sequence(list(range(1, n + 1)), greedy(8)) for n in (3, 3, 40))
    for seq in (decoding, guessing, prompt):
        sched.add(seq)
    sched.admit()
    for seq in (decoding, guessing):
        seq.num_computed = seq.num_tokens - 1
    guessing.candidates = [7, 8, 9, 10]
    batch, sizes = sched.schedule()
    assert batch == [decoding, guessing, prompt] and sizes == [1, 5, 10]
