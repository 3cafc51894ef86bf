"""Each policy the code states, pinned by a test that fails when the policy changes, not only when a number does:
the scheduler's (who runs, in what order, who is preempted and where it goes), the engine's KV budget (a request
larger than the budget still runs; the only running request is never preempted), the prefix cache's invariants
(checked after every operation of a random workload) and its eviction order, the server's key on every path and
its body limit on chunked bodies, stop strings split across chunks, the browser's address rules on every hop, and
pull's hash check of every file kind."""

import asyncio
import hashlib
import random
import time
import types

import pytest
import torch

from ossie.engine import Engine, PrefixCache, Scheduler, Sequence
from ossie.engine.kv_manager import KVManager
from tests.helpers import greedy, run_engine

# ---- the scheduler ---------------------------------------------------------------------------------------------


def seqs(*lengths: int) -> list[Sequence]:
    return [Sequence(list(range(1, n + 1)), greedy(4)) for n in lengths]


def test_admission_is_first_come_within_max_running_and_fits():
    sched = Scheduler(max_running=2)
    a, b, c = seqs(10, 10, 10)
    for s in (a, b, c):
        sched.add(s)
    assert sched.admit() == [a, b] and list(sched.waiting) == [c]  # in arrival order, up to max_running
    sched.remove(a)
    assert sched.admit(lambda s: False) == [] and list(sched.waiting) == [c]  # it does not fit beside b: it waits
    sched.remove(b)
    assert sched.admit(lambda s: False) == [c]  # nothing runs: the first waiting gets in, fits or not


def test_a_waiting_request_that_does_not_fit_holds_the_line():
    """No overtaking: a smaller request behind one that does not fit waits too (first come, first served)."""
    sched = Scheduler(max_running=4)
    big, small, running = seqs(1000, 10, 10)
    sched.add(running)
    sched.admit()
    sched.add(big)
    sched.add(small)
    assert sched.admit(lambda s: len(s.prompt) < 100) == [] and list(sched.waiting) == [big, small]


def test_preemption_takes_the_last_admitted_back_to_the_front():
    sched = Scheduler(max_running=3)
    a, b, c, d = seqs(10, 10, 10, 10)
    for s in (a, b, c, d):
        sched.add(s)
    sched.admit()
    victim = sched.preempt()
    assert victim is c and sched.running == [a, b]  # the one admitted last, not the oldest
    assert list(sched.waiting) == [c, d]  # at the front of the queue, ahead of those that never ran
    assert sched.admit() == [c]


def test_a_step_decodes_first_then_the_shortest_prompts_within_the_budget():
    sched = Scheduler(max_running=8, max_tokens=100, align=16)
    decoding, p300, p40 = seqs(5, 300, 40)
    for s in (p300, decoding, p40):
        sched.add(s)
    sched.admit()
    decoding.num_computed = 4  # one token pending: it decodes
    batch, sizes = sched.schedule()
    # decoding's token, then the shortest prompt first; the long one's chunk stops at a multiple of 16 (59 -> 48:
    # a block computed in two steps may lose its sliding rows in between)
    assert batch == [decoding, p40, p300] and sizes == [1, 40, 48]
    p300.num_computed = 5  # a chunk that cannot reach a multiple of 16 takes what the budget leaves
    decoding.num_computed, p40.num_computed = 5, 40
    decoding.output.append(1)
    p40.output.append(1)
    batch, sizes = sched.schedule()
    assert batch == [decoding, p40, p300] and sizes == [1, 1, 91]  # 5 + 91 = 96, a multiple of 16


def test_remove_takes_a_sequence_out_of_either_list():
    sched = Scheduler(max_running=1)
    a, b = seqs(3, 3)
    sched.add(a)
    sched.add(b)
    sched.admit()
    sched.remove(b)
    sched.remove(a)
    assert not sched.running and not sched.waiting and len(sched) == 0


# ---- the engine's KV budget, with a runner whose memory is simple arithmetic ------------------------------------


class FakeCache:
    def __init__(self, seq: Sequence, per_token: int):
        self.seq, self.per_token = seq, per_token

    def nbytes(self) -> int:
        return self.per_token * (self.seq.num_computed + 4)


class FakeMemory(KVManager):
    """The KV manager's policy over fake memory: per_token bytes a computed token (and 4 tokens' room)."""

    def __init__(self, budget: int, per_token: int):
        super().__init__(types.SimpleNamespace(), torch.float32, budget=budget)
        self.per_token = per_token
        self.holding: list[Sequence] = []
        self.allocations: list[int] = []  # sequence ids, each time one gets a cache

    def cache_bytes(self, seq: Sequence) -> int:
        return self.per_token * (seq.num_tokens + 4)

    def allocate(self, seq: Sequence) -> None:
        seq.cache, seq.num_computed = FakeCache(seq, self.per_token), 0
        self.holding.append(seq)
        self.allocations.append(seq.id)

    def free(self, seq: Sequence) -> None:
        seq.cache = None
        if seq in self.holding:
            self.holding.remove(seq)


class FakeRunner:
    """Every step checks the engine's promise: the caches held at the start of a step fit the budget, unless only
    one sequence holds one."""

    prefill_chunk = 512

    def __init__(self, budget: int, per_token: int = 1):
        self.kv = FakeMemory(budget, per_token)
        self.config = types.SimpleNamespace(vocab_size=1000)
        self.violations: list[str] = []
        self.hold = lambda: False  # the first step waits while this is true (requests submitted meanwhile queue up)

    def run(self, batch: list[Sequence], sizes: list[int]) -> list[int | None]:
        deadline = time.monotonic() + 30  # a hold that never ends fails the test's checks, not the suite
        while self.hold() and time.monotonic() < deadline:
            time.sleep(0.001)
        self.hold = lambda: False  # once
        held = self.kv.running_bytes(self.kv.holding)
        if held > self.kv.budget and len(self.kv.holding) > 1:
            self.violations.append(f"{held} bytes held by {len(self.kv.holding)} sequences")
        out = []
        for seq, n in zip(batch, sizes, strict=True):
            seq.num_computed += n
            out.append(7 if seq.pending == 0 else None)
        return out


def test_the_last_admitted_is_preempted_and_returns_before_the_others():
    runner = FakeRunner(budget=30)
    engine = Engine(runner, max_running=3).start()
    try:
        # a one-token request's step holds the engine until the three are queued (else the first could finish
        # before the others arrive); each then starts at 14 bytes and grows to 44: two fit at first, then not both
        # (the engine may have taken some of them before its step: they are then among its handles)
        runner.hold = lambda: engine.intake.qsize() + len(engine.handles) < 4
        engine.submit([1], greedy(1), None, lambda event: None)
        out, handles = run_engine(engine, [list(range(1, 11))] * 3, greedy(30))
    finally:
        engine.shutdown()
    first, second, third = (h.sequence.id for h in handles)
    assert runner.kv.allocations[1:4] == [first, second, second]  # the second, admitted last, preempted, back first
    assert runner.kv.allocations.index(third) > 2
    assert engine.snapshot().preempted >= 1 and runner.violations == []
    assert all(len(tokens) == 30 for tokens in out)


def test_a_request_larger_than_the_whole_budget_runs_alone_and_is_never_preempted():
    runner = FakeRunner(budget=20)
    engine = Engine(runner, max_running=4).start()
    try:
        out, handles = run_engine(engine, [list(range(1, 50)), list(range(1, 5))], greedy(8))
    finally:
        engine.shutdown()
    s = engine.snapshot()
    assert (s.finished, s.failed) == (2, 0)  # admitted when nothing ran; nothing hung
    big = handles[0].sequence.id
    assert runner.kv.allocations.count(big) == 1  # over the budget alone, it was not preempted
    assert runner.violations == []


# ---- the prefix cache: invariants after every operation, and what eviction drops --------------------------------


class FakeKV:
    """A sequence's cache as the prefix cache reads it: rows of every layer (2 floats a position); with `rng`, a
    sliding layer's rows are sometimes gone from its ring (the block is kept without them, and gains them when a
    later sequence stores it again)."""

    def __init__(self, rng: random.Random | None = None, sliding: tuple[int, ...] = (0,)):
        self.rng, self.sliding = rng, sliding

    def rows(self, layer: int, start: int, end: int):
        if self.rng is not None and layer in self.sliding and self.rng.random() < 0.3:
            return None
        return torch.zeros(end - start, 2), torch.zeros(end - start, 2)


def check_invariants(cache: PrefixCache) -> None:
    blocks = cache.blocks
    assert cache.stats.blocks == len(blocks)
    assert cache.stats.bytes == sum(b.nbytes for b in blocks.values())  # the byte count follows the blocks
    for key, block in blocks.items():
        assert block.key == key
        assert block.parent is None or block.parent in blocks  # no chain is stranded
        assert block.children == sum(1 for b in blocks.values() if b.parent == key)  # counts follow evictions


def test_prefix_cache_invariants_hold_through_a_random_workload():
    cfg = types.SimpleNamespace(sliding_window=8, num_layers=2, is_sliding=lambda i: i == 0)
    block_bytes = 2 * 2 * 2 * 4 * 4  # 2 layers x keys and values x 4 positions x 2 floats x 4 bytes
    cache = PrefixCache(cfg, budget_bytes=10 * block_bytes, block_size=4)
    rng = random.Random(0)
    kv = FakeKV(rng)
    gained = 0
    for _ in range(400):
        op = rng.random()
        if op < 0.6:  # a sequence's blocks kept, from a small alphabet so that chains share and branch
            tokens = [rng.randrange(3) for _ in range(4 * rng.randint(1, 5))]
            parent = None
            for i in range(len(tokens) // 4):
                before = {k: b.sliding is None for k, b in cache.blocks.items()}
                parent = cache.store(parent, tuple(tokens[4 * i:4 * i + 4]), kv, 4 * i)
                gained += before.get(parent, False) and cache.blocks.get(parent) is not None \
                    and cache.blocks[parent].sliding is not None
        elif op < 0.85:
            cache.match([rng.randrange(3) for _ in range(4 * rng.randint(1, 6) + 1)])
        else:
            cache.evict(rng.randrange(12) * block_bytes)
        check_invariants(cache)
        assert cache.stats.bytes <= 10 * block_bytes
    assert gained > 0  # the workload did reach the path where a kept block gains its sliding rows


def test_eviction_drops_the_least_recently_used_leaf():
    cfg = types.SimpleNamespace(sliding_window=8, num_layers=1, is_sliding=lambda i: False)
    cache, kv = PrefixCache(cfg, budget_bytes=10**9, block_size=2), FakeKV()
    a1 = cache.store(None, (1, 1), kv, 0)
    a2 = cache.store(a1, (1, 2), kv, 2)
    b1 = cache.store(None, (2, 2), kv, 0)
    cache.match([1, 1, 1, 2, 9])  # chain a used last: b1 is the least recently used leaf
    assert b1 in cache.blocks
    cache.evict(cache.stats.bytes - 1)
    assert set(cache.blocks) == {a1, a2}
    cache.evict(cache.stats.bytes - 1)
    assert set(cache.blocks) == {a1}  # a2 before its parent a1 (dropping a1 would strand a2)
    check_invariants(cache)


# ---- the server: the key on every path, the body limit on chunked bodies ---------------------------------------


def test_the_api_key_guards_every_route(tiny_llm):
    from fastapi.testclient import TestClient

    from ossie.server import ServerOptions, create_app

    app = create_app(tiny_llm, ["tiny"], ServerOptions(api_keys={"sekret": "default"}))
    routes = [(method.upper(), path.replace("{model}", "tiny").replace("{response_id}", "x"))
              for path, methods in app.openapi()["paths"].items() for method in methods]
    assert len(routes) >= 14  # every endpoint of both APIs (a route added later is covered without a change here)
    with TestClient(app) as http:
        for method, path in routes + [("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/redoc")]:
            r = http.request(method, path, json={})
            if path == "/health":
                assert r.status_code == 200 and r.json() == {"status": "ok"}
            else:
                assert r.status_code == 401, (method, path, r.status_code)


def test_a_chunked_body_over_the_limit_is_refused_before_it_is_read_whole():
    from ossie.server.middleware import BodyLimit

    chunks_read, sent = [], []

    async def endpoint(scope, receive, send):  # reads the whole body, as an endpoint would
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"read it all"})

    async def receive():
        chunks_read.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": len(chunks_read) < 100}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}  # no Content-Length
    asyncio.run(BodyLimit(endpoint, max_bytes=4500)(scope, receive, send))
    assert sent[0]["status"] == 413
    assert len(chunks_read) == 5  # it stopped at the chunk that went over, not after 100


# ---- stop strings split across chunks ----------------------------------------------------------------------------


@pytest.mark.parametrize("stop", ["STOP", ["xyz", "STOP"], ["TOP", "STOP"], "S"])
def test_a_stop_string_split_anywhere_leaks_nothing(stop):
    from ossie.chat.stops import StopStrings

    text = "a SToP or STO then STOP and more"
    first = min(i for i in (text.find(s) for s in ([stop] if isinstance(stop, str) else stop)) if i >= 0)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            stops = StopStrings(stop)
            out = "".join(stops.push(piece) for piece in (text[:i], text[i:j], text[j:]))
            assert stops.hit and out == text[:first], (i, j, out)


def test_a_partial_stop_string_at_the_end_is_released():
    from ossie.chat.stops import StopStrings

    stops = StopStrings("STOP")
    assert stops.push("it ends ST") == "it ends "  # held back: it may start the stop string
    assert stops.push("O") == ""
    assert stops.flush() == "STO" and not stops.hit


# ---- the browser's address rules, on every hop -------------------------------------------------------------------

REFUSED = ["127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "172.31.255.254", "192.168.1.1", "169.254.169.254",
           "100.64.0.1", "100.127.255.254", "0.0.0.0", "224.0.0.1", "255.255.255.255", "198.18.0.1", "::1",
           "fc00::1", "fd12:3456::1", "fe80::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::"]
ALLOWED = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "100.128.0.1", "172.32.0.1"]


def resolving_to(address: str):
    family = 10 if ":" in address else 2

    def getaddrinfo(host, port, *args, **kwargs):
        return [(family, 1, 6, "", (address, port))]
    return getaddrinfo


@pytest.mark.parametrize("address", REFUSED + ALLOWED)
def test_browser_address_rules(monkeypatch, address):
    from ossie.tools import browser

    monkeypatch.setattr(browser.socket, "getaddrinfo", resolving_to(address))
    if address in ALLOWED:
        browser.check_url("http://site.example/page")
    else:
        with pytest.raises(browser.BrowserError, match="local or private address"):
            browser.check_url("http://site.example/page")
    browser.check_url("http://site.example/page", allow_private=True)  # what --browser-allow-private lets through


@pytest.mark.parametrize("target", ["http://127.0.0.1:8000/admin", "http://[::1]/", "http://100.64.1.1/",
                                    "http://192.168.0.1/router", "http://inside.example/"])
def test_browser_refuses_a_redirect_to_a_local_or_private_address(monkeypatch, target):
    """A public page that redirects inward: the hop is checked as the first URL was."""
    import httpx

    from ossie.tools import browser

    real = socket_getaddrinfo = browser.socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "public.example":
            return resolving_to("93.184.216.34")(host, port)
        if host == "inside.example":
            return resolving_to("10.0.0.7")(host, port)
        return real(host, port, *args, **kwargs)

    fetched = []

    def handler(request: httpx.Request) -> httpx.Response:
        fetched.append(str(request.url))
        if request.url.host == "public.example":
            return httpx.Response(302, headers={"location": target})
        return httpx.Response(200, text="<p>internal secrets</p>")

    client = httpx.Client

    monkeypatch.setattr(browser.socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(httpx, "Client", lambda **kw: client(transport=httpx.MockTransport(handler), **kw))
    with pytest.raises(browser.BrowserError, match="local or private address"):
        browser.fetch("http://public.example/go")
    assert fetched == ["http://public.example/go"]  # the inward hop was never requested
    assert socket_getaddrinfo is real


# ---- pull: every downloaded file checked against its hash ---------------------------------------------------------


def snapshot(tmp_path, files: dict[str, bytes]):
    """A Hugging Face cache snapshot: blobs named by their hash (SHA-256 for LFS files, git's blob id for small
    ones), linked from the snapshot folder."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    for name, data in files.items():
        if name.endswith(".safetensors"):
            digest = hashlib.sha256(data).hexdigest()
        else:
            digest = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (blobs / digest).write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blobs / digest)
    return snap


FILES = {"config.json": b'{"a": 1}', "model-00000-of-00002.safetensors": b"w" * 5000,
         "model-00001-of-00002.safetensors": b"v" * 7000, "original/model.safetensors": b"o" * 3000}


@pytest.mark.parametrize("corrupt", list(FILES))
def test_pull_checks_every_file_against_its_hash(tmp_path, corrupt):
    from ossie.model.checkpoint import CheckpointError, verify_snapshot

    snap = snapshot(tmp_path, FILES)
    verify_snapshot(snap, progress=False)  # intact: nothing said
    blob = (snap / corrupt).resolve()
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")  # one byte changed
    with pytest.raises(CheckpointError, match="corrupted") as e:
        verify_snapshot(snap, progress=False)
    assert corrupt in str(e.value)
    assert not blob.exists() and not (snap / corrupt).exists()  # deleted: the next pull fetches it anew
    assert all((snap / name).exists() for name in FILES if name != corrupt)


def test_browser_fetch_limits(monkeypatch):
    """At most MAX_REDIRECTS hops, and at most max_bytes of a page read."""
    import httpx

    from ossie.tools import browser

    def handler(request: httpx.Request) -> httpx.Response:
        n = int(request.url.path.strip("/") or 0)
        if request.url.host == "loop.example":
            return httpx.Response(302, headers={"location": f"/{n + 1}"})
        return httpx.Response(200, content=b"x" * 10_000, headers={"content-type": "text/plain"})

    client = httpx.Client
    monkeypatch.setattr(browser.socket, "getaddrinfo", resolving_to("93.184.216.34"))
    monkeypatch.setattr(httpx, "Client", lambda **kw: client(transport=httpx.MockTransport(handler), **kw))
    with pytest.raises(browser.BrowserError, match=f"more than {browser.MAX_REDIRECTS} redirects"):
        browser.fetch("http://loop.example/0")
    assert len(browser.fetch("http://big.example/", max_bytes=4096).text) == 4096
