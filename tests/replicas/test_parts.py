"""The replicas' parts without a cluster: a replica's stream of updates (and its cancellation), the ingress's engine
client (a request sent again after its replica failed before its first token, never after), the routing keys
and the router's policy."""

import asyncio
import dataclasses

import pytest

from ossie.engine import EVERYONE, CacheScope, Cancelled, Failed, Finished, SamplingParams, Token
from ossie.engine.prefix_cache import BLOCK_SIZE
from ossie.engine_args import EngineArgs
from ossie.replicas.remote import RemoteEngine, ReplicaLost, route_keys
from ossie.replicas.replica import EngineReplica, ReplicaInfo, Update

PROMPT = list(range(1000, 1000 + 3 * BLOCK_SIZE + 5))


@pytest.fixture(scope="module")
def replica(tiny_repo):
    r = EngineReplica(EngineArgs(tiny_repo, num_threads=1, max_num_seqs=2))
    yield r
    r.engine.shutdown()


def test_a_replica_streams_batched_updates_to_the_end(replica):
    async def collect():
        return [u async for u in replica.generate(PROMPT, SamplingParams(max_tokens=20, temperature=0,
                                                                          stop_token_ids=[]), None, None,
                                                  CacheScope())]

    updates = asyncio.run(collect())
    events = [e for u in updates for e in u.events]
    assert all(u.admitted for u in updates) and events[-1] == Finished("length")
    assert sum(isinstance(e, Token) for e in events) == 20
    again = [e for u in asyncio.run(collect()) for e in u.events]
    assert again == events  # greedy: the same tokens
    assert asyncio.run(collect())[0].cached_tokens == 3 * BLOCK_SIZE  # the prompt's whole blocks, cached


def test_closing_a_replicas_stream_cancels_its_request(replica):
    before = replica.snapshot()

    async def leave_early():
        stream = replica.generate(PROMPT, SamplingParams(max_tokens=5000, min_tokens=5000), None, None, CacheScope())
        async for update in stream:
            if any(isinstance(e, Token) for e in update.events):
                break
        await stream.aclose()
        for _ in range(100):
            s = replica.snapshot()
            if s.cancelled > before.cancelled and s.running == 0:
                return s
            await asyncio.sleep(0.05)
        return replica.snapshot()

    s = asyncio.run(leave_early())
    assert s.cancelled == before.cancelled + 1 and s.running == 0 and s.kv_running_bytes == 0
    replica.check_health()
    replica.engine.shutdown()
    with pytest.raises(RuntimeError, match="engine thread"):
        replica.check_health()  # Ray replaces such a replica
    replica.engine.start()


class Stream:
    """A replica's stream as a Serve handle gives it: its updates, then (fail_after) an error as a dead actor's."""

    def __init__(self, updates, fail_after=None):
        self.updates, self.fail_after, self.cancelled = updates, fail_after, False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for i, u in enumerate(self.updates):
            if i == self.fail_after:
                raise ConnectionError("actor died")
            yield u
        if self.fail_after is not None and self.fail_after >= len(self.updates):
            raise ConnectionError("actor died")

    def cancel(self):
        self.cancelled = True


class Handle:
    """A Serve handle of replicas that answer with the given streams in turn (what each call was sent with kept)."""

    def __init__(self, streams):
        self.streams, self.calls = list(streams), []
        self.generate = self

    def options(self, stream):
        return self

    def remote(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self.streams.pop(0)


def remote(tiny_repo, streams) -> tuple[RemoteEngine, Handle]:
    from ossie.model.config import PRESETS

    handle = Handle(streams)
    return RemoteEngine(handle, ReplicaInfo(PRESETS["tiny"], tiny_repo, 0, "cpu", 2), count=2), handle


def run(engine: RemoteEngine, prompt=PROMPT, scope=EVERYONE) -> list:
    async def go():
        events, done = [], asyncio.Event()

        def on_event(e):
            events.append(e)
            if not isinstance(e, Token):
                done.set()

        engine.submit(prompt, SamplingParams(max_tokens=3), None, on_event, None, scope)
        await asyncio.wait_for(done.wait(), 10)
        return events

    return asyncio.run(go())


def test_a_request_with_no_token_yet_is_sent_again(tiny_repo):
    good = [Update([], True, 64), Update([Token(1), Token(2)], True, 64), Update([Token(3), Finished("length")],
                                                                               True, 64)]
    engine, handle = remote(tiny_repo, [Stream([Update([], True, 10)], fail_after=1), Stream(good)])
    assert run(engine) == [Token(1), Token(2), Token(3), Finished("length")]
    assert len(handle.calls) == 2 and handle.calls[0]["route"] == handle.calls[1]["route"]
    s = engine.snapshot()
    assert (s.finished, s.failed, s.running, s.waiting, s.generated_tokens, s.cached_prompt_tokens) == \
        (1, 0, 0, 0, 3, 64)  # the cached tokens of the replica that served it


def test_a_request_that_had_tokens_fails_cleanly(tiny_repo):
    engine, handle = remote(tiny_repo, [Stream([Update([Token(1)], True, 0)], fail_after=1)])
    events = run(engine)
    assert events[0] == Token(1) and isinstance(events[1], Failed) and isinstance(events[1].error, ReplicaLost)
    assert len(handle.calls) == 1 and engine.snapshot().failed == 1
    engine, handle = remote(tiny_repo, [Stream([], fail_after=0) for _ in range(3)])
    events = run(engine)  # every try failed: RETRIES, then the error
    assert len(handle.calls) == 3 and isinstance(events[-1], Failed)


def test_a_replicas_own_events_pass_through(tiny_repo):
    """A request the replica's engine failed or cancelled is not sent again: that is its answer."""
    engine, handle = remote(tiny_repo, [Stream([Update([Failed(ValueError("bad"))], True, 0)])])
    assert isinstance(run(engine)[-1], Failed) and len(handle.calls) == 1
    engine, handle = remote(tiny_repo, [Stream([Update([Cancelled()], True, 0)])])
    assert run(engine) == [Cancelled()] and engine.snapshot().cancelled == 1


def test_route_keys_are_the_prefix_caches_and_the_owners():
    """A key per whole block, each chained over the blocks before it and the owner: a shared start gives shared
    keys, a different owner none (but for the blocks declared shared, everyone's)."""
    a = route_keys(PROMPT, CacheScope("alice"))
    assert len(a) == 3
    assert route_keys(PROMPT[:2 * BLOCK_SIZE] + [7] * BLOCK_SIZE, CacheScope("alice"))[:2] == a[:2]
    assert route_keys(PROMPT[:2 * BLOCK_SIZE] + [7] * BLOCK_SIZE, CacheScope("alice"))[2] != a[2]
    b = route_keys(PROMPT, CacheScope("bob"))
    assert not set(a) & set(b)
    shared = route_keys(PROMPT, CacheScope("bob", shared=BLOCK_SIZE))
    assert shared[0] == route_keys(PROMPT, CacheScope("alice", shared=BLOCK_SIZE))[0] and shared[1] not in a


def test_the_router_prefers_the_holder_unless_it_is_full():
    pytest.importorskip("ray.serve")
    from ossie.replicas.router import ConversationRouter

    @dataclasses.dataclass(eq=False)
    class Replica:
        replica_id: str
        max_ongoing_requests: int = 2

    class Pending:
        def __init__(self, keys):
            self.kwargs = {"route": keys}

    router = ConversationRouter.__new__(ConversationRouter)  # its policy alone: Ray's machinery is not needed
    router.initialize_state()
    loads = {"r1": 0, "r2": 1, "r3": 0}
    router._load = lambda r: loads[r.replica_id]
    r1, r2, r3 = Replica("r1"), Replica("r2"), Replica("r3")
    choose = lambda keys: asyncio.run(router.choose_replicas([r1, r2, r3], Pending(keys)))  # noqa: E731
    assert choose((1, 2))[0][-1] is r2  # nothing held: the least loaded first, r2 (busier) last
    router.on_request_routed(Pending((1, 2)), "r2", None)
    first, rest = choose((1, 2, 3))  # one call: ties among equally loaded replicas break at random each time
    assert first == [r2] and {r.replica_id for r in rest} == {"r1", "r3"}  # the longest held prefix
    assert choose((1, 9))[0] == [r2]  # a prefix of it, half of the prompt
    assert r2 not in choose((1, 7, 8, 9))[0][:2]  # a quarter held (the header alone): the least loaded first
    assert choose((9,))[0][0] is not r2 and len(choose((9,))) == 1  # another conversation
    loads["r2"] = 2  # full
    assert choose((1, 2))[-1] == [r2] and r2 not in choose((1, 2))[0]  # spread: the others first


def test_the_cached_tokens_are_the_last_update_says(tiny_repo):
    """A replica may tell its request admitted before its engine looked the prompt up in the prefix cache (0
    cached, then 128 with the first token): the request's cached_tokens and the counters take the later word."""
    engine, _ = remote(tiny_repo, [Stream([Update([], True, 0), Update([Token(1)], True, 128),
                                           Update([Finished("length")], True, 128)])])

    async def go():
        done = asyncio.Event()
        handle = engine.submit(PROMPT, SamplingParams(max_tokens=3), None,
                               lambda e: done.set() if isinstance(e, Finished) else None)
        await asyncio.wait_for(done.wait(), 10)
        return handle.cached_tokens

    assert asyncio.run(go()) == 128 and engine.snapshot().cached_prompt_tokens == 128


def test_app_builder_reads_serve_runs_text_arguments(tiny_repo):
    """`serve run ossie.replicas:app_builder model=... replicas=2 num_threads=1` gives every value as text: numbers
    become numbers (an EngineArgs or ReplicaOptions check would refuse text), and what cannot be is refused."""
    from tests.replicas.conftest import _ray

    _ray()
    from ray.serve import Application

    from ossie.replicas import app_builder
    from ossie.replicas.app import _number

    assert [_number(v) for v in ("2", "0.5", "true", "False", "auto", 3)] == [2, 0.5, True, False, "auto", 3]
    for args in ({"replicas": "2", "num_threads": "1", "max_num_seqs": "4", "dtype": "float32"},
                 {"replicas": "auto", "min_replicas": "1", "max_replicas": "3", "router": "pow2", "api_key": "k"}):
        assert isinstance(app_builder({"model": str(tiny_repo), **args}), Application)
    for bad in ({"replicas": "0"}, {"replicas": "auto", "min_replicas": "3", "max_replicas": "2"},
                {"router": "random"}, {"num_threads": "0"}):
        with pytest.raises(ValueError):
            app_builder({"model": str(tiny_repo), **bad})
