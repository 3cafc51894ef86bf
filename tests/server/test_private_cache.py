"""Private prefix caches: one API principal cannot learn from the cache what another sent.

The attack (vLLM's CVE-2025-46570): principal B guesses A's prompt and watches `cached_tokens` and the time to the
first token; with a shared cache the right guess comes back cached and fast. Here B's probes of A's secret must
look exactly like probes of random text, while A's own resumed conversation still hits."""

import logging

import pytest
import torch
from fastapi.testclient import TestClient

from ossie.engine import CacheScope, PrefixCache
from ossie.engine.prefix_cache import BLOCK_SIZE
from ossie.server import ServerOptions, create_app
from ossie.special_tokens import N_ORDINARY

MODEL = "tiny"
KEYS = {"key-a": "alice", "key-b": "bob"}
A, B = ({"authorization": f"Bearer {key}"} for key in KEYS)
GEN = torch.Generator().manual_seed(5)


def tokens(n: int) -> list[int]:
    return torch.randint(0, N_ORDINARY, (n,), generator=GEN).tolist()


SECRET = tokens(6 * BLOCK_SIZE)


def complete(http: TestClient, who: dict, prompt: list[int], **extra) -> dict:
    r = http.post("/v1/completions", headers=who, json={"model": MODEL, "prompt": prompt, "max_tokens": 1,
                                                        "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def cached(usage: dict) -> int:
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def roc_auc(positives: list[float], negatives: list[float]) -> float:
    """The probability that a positive scores above a negative (ties count half): 0.5 is no signal at all."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


@pytest.fixture(scope="module")
def app_factory(tiny_llm):
    def make(**options):
        return TestClient(create_app(tiny_llm, [MODEL], ServerOptions(**options)))
    return make


CONTROL = tokens(6 * BLOCK_SIZE)  # a secret of the same length that nobody sent


def probes(http: TestClient, who: dict, target: list[int], n: int = 12) -> tuple[list[int], list[int]]:
    """What n guesses that start with 1..6 blocks of `target` (then differ) see: cached_tokens, and the prompt
    tokens computed (the time to the first token follows them). The guesses also fill the prober's own cache, as
    an attacker's would: the same schedule over CONTROL is what the prober sees when `target` was never sent."""
    seen, computed = [], []
    for i in range(n):
        guess = target[:(i % 6 + 1) * BLOCK_SIZE] + tokens(BLOCK_SIZE + 7)
        usage = complete(http, who, guess)
        seen.append(cached(usage))
        computed.append(usage["prompt_tokens"] - cached(usage))
    return seen, computed


def test_another_principal_learns_nothing_from_the_cache(app_factory):
    with app_factory(api_keys=KEYS) as http:
        complete(http, A, SECRET)  # alice's secret is computed and cached
        hits, work = probes(http, B, SECRET)
        control_hits, control_work = probes(http, B, CONTROL)
        # bob's guesses of alice's secret are served exactly as guesses of what nobody sent
        assert roc_auc(hits, control_hits) <= 0.55 and roc_auc(control_work, work) <= 0.55
        assert (hits, work) == (control_hits, control_work)
        # alice resuming her own conversation still finds it: every whole block of the secret
        usage = complete(http, A, SECRET + tokens(40))
        assert cached(usage) >= 0.9 * len(SECRET)


def test_the_same_probes_do_tell_within_one_principal(app_factory):
    """The detector itself works: the same probes from alice, who may see her own cache, tell her secret from the
    control every time. (This is what bob saw before caches were private.)"""
    with app_factory(api_keys=KEYS) as http:
        complete(http, A, SECRET)
        hits, work = probes(http, A, SECRET, n=6)  # one round: a second finds the first round's own blocks
        control_hits, control_work = probes(http, A, CONTROL, n=6)
        assert all(h > c for h, c in zip(hits, control_hits, strict=True)), (hits, control_hits)
        assert roc_auc(hits, control_hits) > 0.55 and roc_auc(control_work, work) > 0.55


def test_without_keys_the_cache_is_one_for_all(app_factory):
    """The README's statement: without API keys every client is one principal and shares the cache."""
    with app_factory() as http:
        complete(http, {}, SECRET)
        assert cached(complete(http, {}, SECRET + tokens(10))) >= len(SECRET) - BLOCK_SIZE


@pytest.mark.parametrize("trusted", [True, False])
def test_cache_salt_only_from_a_trusted_gateway(app_factory, trusted):
    """A gateway that serves many users under one key salts each user's requests: with --trust-cache-salt the salts
    share nothing; without it the field is ignored (a client could otherwise choose another user's salt... and
    with it, that user's cache)."""
    with app_factory(api_keys=KEYS, trust_cache_salt=trusted) as http:
        complete(http, A, SECRET, cache_salt="user-1")
        other = cached(complete(http, A, SECRET + tokens(10), cache_salt="user-2"))
        same = cached(complete(http, A, SECRET + tokens(10), cache_salt="user-1"))
        assert same >= len(SECRET) - BLOCK_SIZE
        assert other == (0 if trusted else same)


def test_a_declared_shared_prefix_is_everyones_and_nothing_more(app_factory):
    from ossie.chat import harmony

    system = "You are the support assistant of Example Corp. " * 40  # several blocks once rendered
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "my account is 12345678, " * 30}]
    prompt = harmony.render(messages, None, "medium")
    with app_factory(api_keys=KEYS, shared_prefixes=(system,)) as http:
        def ask(who):
            r = http.post("/v1/chat/completions", headers=who, json={
                "model": MODEL, "max_tokens": 1, "temperature": 0, "messages": messages})
            assert r.status_code == 200, r.text
            return cached(r.json()["usage"])

        public = http.app.state.serving.shared_prefixes.length(prompt)
        assert 3 * BLOCK_SIZE < public < len(prompt) - 3 * BLOCK_SIZE  # the system prompt, not the user's message
        assert ask(A) == 0
        # bob, with the same system prompt and (by chance) alice's message: the system prompt's whole blocks only
        assert ask(B) == public // BLOCK_SIZE * BLOCK_SIZE
        # alice asking again finds her own blocks as well
        assert ask(A) == (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE


def test_stored_responses_are_their_principals(app_factory):
    with app_factory(api_keys=KEYS) as http:
        r = http.post("/v1/responses", headers=A, json={"model": MODEL, "input": "hello", "max_output_tokens": 2})
        rid = r.json()["id"]
        assert http.get(f"/v1/responses/{rid}", headers=A).status_code == 200
        assert http.get(f"/v1/responses/{rid}", headers=B).status_code == 404
        r = http.post("/v1/responses", headers=B, json={"model": MODEL, "input": "more", "max_output_tokens": 2,
                                                        "previous_response_id": rid})
        assert r.status_code == 404


def test_access_log_names_the_principal_never_the_key(app_factory, caplog):
    with caplog.at_level(logging.INFO, logger="ossie.access"), app_factory(api_keys=KEYS) as http:
        complete(http, B, tokens(5))
    lines = [r.getMessage() for r in caplog.records if r.name == "ossie.access"]
    assert any("[bob]" in line and "/v1/completions" in line for line in lines), lines
    assert not any("key-b" in line for line in lines)


def test_health_without_a_key_is_liveness_only(app_factory):
    with app_factory(api_keys=KEYS) as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/health", headers={"authorization": "Bearer wrong"}).json() == {"status": "ok"}
        full = http.get("/health", headers=A).json()
        assert full["status"] == "ok" and "cached_prompt_tokens" in full and "kv_running_bytes" in full


# ---- the prefix cache's scopes, as pure data ------------------------------------------------------------------


def test_prefix_cache_scopes(tiny_llm):
    """Blocks are found only by their owner; the declared shared tokens' whole blocks by anyone; an owner's block
    after a shared one is still the owner's."""
    from ossie.engine import ModelRunner, SamplingParams, Sequence

    runner = ModelRunner(tiny_llm.model, 512, PrefixCache(tiny_llm.config, 2**30))
    cache = runner.kv.prefix_cache
    prompt = tokens(4 * BLOCK_SIZE + 1)
    shared = 2 * BLOCK_SIZE + 10  # two whole blocks public, the rest alice's
    seq = Sequence(prompt, SamplingParams(max_tokens=1, temperature=0, stop_token_ids=[]),
                   scope=CacheScope("alice", shared))
    runner.kv.allocate(seq)
    runner.run([seq])
    assert {b.owner for b in cache.blocks.values()} == {None, "alice"}
    assert [b.owner for b in cache.match(prompt, CacheScope("alice", shared))] == [None, None, "alice", "alice"]
    assert [b.owner for b in cache.match(prompt, CacheScope("bob", shared))] == [None, None]
    assert cache.match(prompt, CacheScope("bob")) == []  # bob's request does not share the declared prefix
    assert [b.owner for b in cache.match(prompt, CacheScope(None))] == [None, None]  # nor "everyone" alice's
    assert len(cache.match(prompt, CacheScope("alice"))) == 0  # alice without the shared prefix: other keys
