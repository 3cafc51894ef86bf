"""The library's requests go through the same engine as the server's: `LLM.generate` and `LLM.chat` are blocking
clients of `llm.engine`, with its batching, KV budget, preemption and prefix cache; a server made for an LLM takes
over that engine, and the library's calls in the same process then share its batch. Also: what a blocking client
does when its consumer stops early, and the answer loop's stop strings through `LLM.chat`."""

import copy

import pytest

import ossie
from ossie.engine import ModelRunner, Sequence
from tests.engine.test_batching import PROMPTS
from tests.helpers import alone, greedy, use_runner
from tests.scripted import ScriptedRunner


def interleave(llm: ossie.LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Read several generations a token at a time, in turn, on this thread (each read steps the engine)."""
    gens = [llm.generate(p, max_tokens=max_tokens, temperature=0, stop_token_ids=[]) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    live = set(range(len(gens)))
    while live:
        for i in sorted(live):
            tok = next(gens[i], None)
            if tok is None:
                live.discard(i)
            else:
                out[i].append(tok)
    return out


@pytest.fixture
def counted(tiny_repo):
    """A fresh LLM (its own engine and budget) whose runner records the size of every step's batch."""

    def make(**kw):
        llm = ossie.LLM(tiny_repo, dtype="float32", progress=False, **kw)
        llm.batches = []
        run = llm.runner.run

        def spy(batch, sizes=None):
            llm.batches.append(len(batch))
            return run(batch, sizes)

        llm.runner.run = spy
        return llm

    return make


def test_generations_read_in_turn_are_batched_and_equal_alone(counted):
    llm = counted()
    out = interleave(llm, PROMPTS[:3], 12)
    assert max(llm.batches) == 3  # the three decoded in one step, not one after the other
    for prompt, tokens in zip(PROMPTS[:3], out, strict=True):
        assert tokens == alone(ModelRunner(llm.model), prompt, greedy(12))


def test_the_kv_budget_preempts_library_requests_as_it_does_the_servers(counted, tiny_llm):
    """The server's preemption test, through LLM.generate: a KV budget of 2.5 first caches, three requests that
    grow past it. The last admitted is preempted and computes again; everyone gets what it gets alone."""
    first_cache = ModelRunner(tiny_llm.model).kv.cache_bytes(Sequence(PROMPTS[1], greedy(300)))
    llm = counted(kv_cache_gb=2.5 * first_cache / 2**30)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    out = interleave(llm, prompts, 300)
    stats = llm.engine.snapshot()
    assert stats.preempted >= 1 and stats.finished == 3 and stats.failed == 0
    assert llm.runner.kv.running_bytes([]) == 0 and stats.running == 0
    for prompt, tokens in zip(prompts, out, strict=True):
        assert tokens == alone(ModelRunner(tiny_llm.model), prompt, greedy(300))


def test_max_num_seqs_holds_the_others_back(counted):
    llm = counted(max_num_seqs=2)
    interleave(llm, PROMPTS[:4], 6)
    assert max(llm.batches) == 2 and llm.engine.snapshot().finished == 4


def test_a_generation_left_early_is_cancelled_and_frees_its_memory(counted):
    llm = counted()
    tokens = llm.generate(PROMPTS[0], max_tokens=50, temperature=0)
    next(tokens)
    [seq] = llm.engine.scheduler.running
    assert seq.cache is not None
    tokens.close()
    assert seq.cache is None and not llm.engine.scheduler and llm.engine.snapshot().cancelled == 1


def test_a_failed_step_raises_in_the_caller_and_the_engine_goes_on(tiny_llm):
    llm = copy.copy(tiny_llm)
    use_runner(llm, copy.copy(tiny_llm.runner))
    run, calls = llm.runner.run, []

    def flaky(batch, sizes=None):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated kernel failure")
        return run(batch, sizes)

    llm.runner.run = flaky
    with pytest.raises(RuntimeError, match="simulated kernel failure"):
        list(llm.generate(PROMPTS[0], max_tokens=4, temperature=0))
    assert list(llm.generate(PROMPTS[0], max_tokens=4, temperature=0, stop_token_ids=[])) == alone(
        ModelRunner(tiny_llm.model), PROMPTS[0], greedy(4))
    assert llm.engine.snapshot().failed == 1


def test_a_server_steps_the_llms_engine_while_it_runs(tiny_llm):
    """create_app starts the LLM's engine thread: llm.generate in the same process is then one of the server's
    requests (its counters count it); when the server stops, the library's calls step the engine again (a stopped
    engine thread once left them waiting for ever)."""
    from fastapi.testclient import TestClient

    from ossie.server.app import create_app

    llm = use_runner(copy.copy(tiny_llm), tiny_llm.runner)  # an engine of its own
    expected = alone(ModelRunner(tiny_llm.model), PROMPTS[0], greedy(5))
    with TestClient(create_app(llm, ["m"])) as http:
        assert llm.engine.background
        assert list(llm.generate(PROMPTS[0], max_tokens=5, temperature=0, stop_token_ids=[])) == expected
        assert http.get("/health").json()["finished"] == 1
    assert not llm.engine.background
    assert list(llm.generate(PROMPTS[0], max_tokens=5, temperature=0, stop_token_ids=[])) == expected
    assert llm.engine.snapshot().finished == 2


def test_chat_stop_strings_cut_the_answer(tiny_repo):
    """The answer loop is the server's: a stop string ends the content before it, finish_reason "stop"."""
    llm = ossie.LLM(tiny_repo, dtype="float32", progress=False)
    use_runner(llm, ScriptedRunner(llm.runner, ["<|channel|>final<|message|>one two STOP three<|return|>"] * 2))
    msgs = [{"role": "user", "content": "count"}]
    r = llm.chat(msgs, stop=["STOP"])
    assert r.content == "one two " and r.finish_reason == "stop"
    streamed = list(llm.chat(msgs, stop="STOP", stream=True))
    assert "".join(d.text for d in streamed if d.kind == "content") == "one two "
    assert llm.engine.snapshot().cancelled == 2  # the stop string ended each generation
