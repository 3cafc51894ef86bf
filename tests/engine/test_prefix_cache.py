"""Automatic prefix caching: a request served from cached blocks gives the logits of one computed from scratch
(prefixes ending inside and beyond the sliding window, divergence inside a block, chunks longer than the window,
eviction under a small budget, two requests sharing a prefix at once), and the server reports what it reused."""

import pytest
import torch

import ossie
from ossie.engine import Engine, ModelRunner, PrefixCache, SamplingParams, Sequence
from ossie.engine.prefix_cache import BLOCK_SIZE
from ossie.special_tokens import N_ORDINARY
from tests.helpers import RecordingRunner, alone, greedy, run_engine

GEN = torch.Generator().manual_seed(11)
HISTORY = torch.randint(0, N_ORDINARY, (400,), generator=GEN).tolist()
OTHER = torch.randint(0, N_ORDINARY, (400,), generator=GEN).tolist()
TOL = dict(rtol=1e-4, atol=1e-4)  # float32 logits: equal up to the order of float32 sums in differently sized products


def generate(runner: RecordingRunner, prompt: list[int], steps: int = 6) -> tuple[Sequence, torch.Tensor]:
    """Greedy steps of one sequence; returns it and the logits each token was sampled from."""
    runner.seen.clear()
    seq = Sequence(list(prompt), SamplingParams(max_tokens=steps, temperature=0, stop_token_ids=[]))
    while not seq.finished:
        (tok,) = runner.run([seq])
        if tok is not None:
            seq.append(tok)
    runner.kv.free(seq)
    return seq, torch.stack(runner.seen)


def check_exact(llm: ossie.LLM, seq: Sequence, logits: torch.Tensor) -> None:
    full = llm.logits(seq.prompt + seq.output[:-1])[len(seq.prompt) - 1:]
    assert torch.allclose(logits, full, **TOL), (logits - full).abs().max()


def runner_with_cache(llm: ossie.LLM, budget: int = 2**30, chunk: int = 512) -> RecordingRunner:
    return RecordingRunner(llm.model, chunk, PrefixCache(llm.config, budget))


@pytest.mark.parametrize("shared", [64, 100, 128, 256, 320])
@pytest.mark.parametrize("chunk", [512, 100, 48])
def test_resumed_prefix_is_exact(tiny_llm, shared, chunk):
    """A second prompt shares `shared` tokens with a first one, then differs: it reuses the whole blocks of the
    shared part that can be resumed (the window is 128: prefixes end inside it and beyond it; 100 diverges inside
    a block) and its logits equal the full forward pass over it. Chunks of 100 straddle blocks and overwrite rows
    of the sliding ring within a step; 512 reads the whole prompt at once (longer than the window)."""
    runner = runner_with_cache(tiny_llm, chunk=chunk)
    first, logits = generate(runner, HISTORY[:330])
    check_exact(tiny_llm, first, logits)
    assert first.num_cached_tokens == 0
    second, logits = generate(runner, HISTORY[:shared] + OTHER[:330 - shared])
    check_exact(tiny_llm, second, logits)
    whole = shared // BLOCK_SIZE * BLOCK_SIZE
    if chunk % BLOCK_SIZE == 0 or chunk < BLOCK_SIZE:  # every block of the first prompt kept its sliding rows
        assert second.num_cached_tokens == whole
    else:  # blocks that straddle a step may have lost theirs: resumed from an earlier boundary, never a later one
        assert second.num_cached_tokens <= whole and second.num_cached_tokens % BLOCK_SIZE == 0


def test_conversation_reuses_prompt_and_completion(tiny_llm):
    """The next request of an agent loop (the previous prompt, its completion, a tool result) reuses every whole
    block of what was computed before, completion included."""
    runner = runner_with_cache(tiny_llm)
    first, _ = generate(runner, HISTORY[:200], steps=100)
    computed = first.prompt + first.output[:-1]  # the last token was sampled, never fed
    second, logits = generate(runner, first.prompt + first.output + OTHER[:50])
    assert second.num_cached_tokens == len(computed) // BLOCK_SIZE * BLOCK_SIZE == 256
    check_exact(tiny_llm, second, logits)


def test_prompt_equal_to_a_cached_one_still_computes_its_last_token(tiny_llm):
    runner = runner_with_cache(tiny_llm)
    generate(runner, HISTORY[:256])
    again, logits = generate(runner, HISTORY[:256])
    assert again.num_cached_tokens == 192  # the last block holds the last token, whose logits are needed
    check_exact(tiny_llm, again, logits)


def test_eviction_under_a_small_budget(tiny_llm):
    """A budget of three blocks: the least recently used block that no other cached block extends goes first (so
    a prefix keeps its start, the part other requests can reuse), the budget holds, and what is cached is served
    exactly."""
    probe = runner_with_cache(tiny_llm)
    generate(probe, HISTORY[:65], steps=1)
    block_bytes = probe.kv.prefix_cache.stats.bytes
    runner = runner_with_cache(tiny_llm, budget=3 * block_bytes)
    cache = runner.kv.prefix_cache
    generate(runner, HISTORY[:330])  # 5 blocks: the chain's end is dropped, its start stays
    assert cache.stats.bytes <= 3 * block_bytes and cache.stats.blocks == 3
    second, logits = generate(runner, HISTORY[:330])
    assert second.num_cached_tokens == 192
    check_exact(tiny_llm, second, logits)
    cache.clear()
    generate(runner, OTHER[:140])  # 2 blocks
    generate(runner, HISTORY[:140])  # 2 more: OTHER's second block (a leaf, least recently used) is dropped
    assert [b.tokens[0] for b in cache.blocks.values()] == [OTHER[0], HISTORY[0], HISTORY[64]]
    third, logits = generate(runner, OTHER[:140])
    assert third.num_cached_tokens == 64
    check_exact(tiny_llm, third, logits)


def test_budget_zero_caches_nothing(tiny_llm):
    runner = runner_with_cache(tiny_llm, budget=0)
    generate(runner, HISTORY[:200])
    again, _ = generate(runner, HISTORY[:200])
    assert again.num_cached_tokens == 0 and runner.kv.prefix_cache.stats.bytes == 0


def test_two_requests_sharing_a_prefix_at_once(tiny_llm):
    """Two requests with a common 200-token history run together in the engine: each produces what it produces
    alone, their common blocks are kept once, and a third request with that history reuses them. (Whether the
    second reuses the first's blocks depends on whether the engine admitted it a step later.)"""
    prompts = [HISTORY[:200] + OTHER[:20], HISTORY[:200] + OTHER[20:45]]
    solo = [alone(ModelRunner(tiny_llm.model), p, greedy(12)) for p in prompts]
    runner = ModelRunner(tiny_llm.model, prefix_cache=PrefixCache(tiny_llm.config, 2**30))
    engine = Engine(runner).start()
    try:
        out, _ = run_engine(engine, prompts, greedy(12))
        assert out == solo
        assert runner.kv.prefix_cache.stats.blocks == 3  # 192 shared positions; neither has a 4th whole block
        _, (third,) = run_engine(engine, [HISTORY[:200] + OTHER[45:60]], greedy(12))
    finally:
        engine.shutdown()
    assert third.sequence.num_cached_tokens == 192
    stats = engine.snapshot()
    assert stats.cached_prompt_tokens in (192, 384) and stats.kv_cached_blocks == runner.kv.prefix_cache.stats.blocks


def test_chat_turns_reuse_the_conversation(tiny_llm):
    """LLM.chat: the next turn of a conversation reuses the previous turn's prompt (harmony drops the previous
    turn's analysis, so reuse stops after the last user message), and answers as from scratch."""
    messages = [{"role": "system", "content": "You are terse. " * 20},
                {"role": "user", "content": "Tell me about the sea. " * 10}]
    llm = ossie.LLM(tiny_llm.path, dtype="float32", progress=False)
    first = llm.chat(messages, max_tokens=20, temperature=0)
    messages += [{"role": "assistant", "content": first.content or "ok"}, {"role": "user", "content": "More."}]
    second = llm.chat(messages, max_tokens=20, temperature=0)
    assert 0 < second.cached_tokens <= first.prompt_tokens
    assert second.cached_tokens >= (first.prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE - BLOCK_SIZE
    fresh = ossie.LLM(tiny_llm.path, dtype="float32", progress=False, enable_prefix_caching=False)
    again = fresh.chat(messages, max_tokens=20, temperature=0)
    assert (again.content, again.reasoning, again.cached_tokens) == (second.content, second.reasoning, 0)
