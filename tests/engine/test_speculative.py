"""Speculative decoding's first part (engine/speculative.py): greedy requests guess what follows from their own text
and check the guesses in one step. What it must never do: change a token, exceed a request's budget, let one
request's text into another's guesses, or check more rows than the backend computes each as alone."""

import pytest
import torch

import ossie
from ossie.backends import cpu_kernels
from ossie.engine import NgramDraft, SamplingParams, Sequence, Speculator
from ossie.engine.sampling import candidates, check_guesses
from tests.helpers import run_engine

REPEATING = [5, 6, 7, 8, 9, 10, 11, 12] * 6 + [5, 6, 7]  # a text that repeats itself: its guesses are right


def test_ngram_draft_follows_the_latest_occurrence_of_the_longest_suffix():
    d = NgramDraft()
    d.extend([1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3])
    assert d.propose(2) == [4, 9]  # [1, 2, 3] seen before, followed by 4: the 3-gram wins over [2, 3] -> 5
    d.extend([7, 2, 3])
    assert d.propose(3) == [7, 2, 3]  # [2, 3]: its latest occurrence (after 1) was followed by 7
    d.extend([8])
    assert d.propose(4) == []  # [3, 8] never seen, and one token alone guesses nothing


class Eager(Speculator):
    """Guessing that always pays (a step of any rows costs one step's time): whether guesses pay is
    test_guess_length_follows_the_costs_and_the_chance's matter, not these tests'"""

    def cost(self, rows: int) -> float:
        return 1.0


def decoding(prompt: list[int], **params) -> Sequence:
    params = {"max_tokens": 50, "temperature": 0, **params}
    seq = Sequence(prompt, SamplingParams(stop_token_ids=[], **params))
    seq.num_computed = len(prompt) - 1  # read: its last token is the one to compute
    seq.output = [prompt[-1]]
    seq.prompt = prompt[:-1]
    return seq


def test_guesses_come_from_the_requests_own_text_only():
    """Two requests: one's prompt says what follows [1, 2, 3]; the other ends with [1, 2, 3] but never saw what
    followed it: it guesses nothing (one index per request: nothing one sends reaches another's guesses)."""
    spec = Eager(k=4)
    teller, asker = decoding([1, 2, 3, 42, 43, 44, 9, 1, 2]), decoding([7, 7, 1, 2, 3])
    spec.propose([teller, asker])
    assert teller.candidates == [3, 42, 43, 44] and asker.candidates == []


def test_guesses_stay_within_the_rows_and_the_budget():
    """Rows: one per decoding sequence, the guesses in what is left; max_tokens: a guess never asks for a token
    past the request's budget (the step samples one more after the guesses)."""
    spec = Eager(k=4, rows=8)
    seqs = [decoding(REPEATING) for _ in range(6)]  # 6 rows, 2 left for guesses
    spec.propose(seqs)
    assert [len(s.candidates) for s in seqs] == [2, 0, 0, 0, 0, 0]
    short = decoding(REPEATING, max_tokens=3)  # 1 token out: 2 left, of which the step samples one after guesses
    Eager(k=4).propose([short])
    assert len(short.candidates) == 1
    steered = decoding(REPEATING)
    steered.steering = object()  # guesses too: its rows are masked as they come (test_speculative_steering.py)
    sampled = decoding(REPEATING, temperature=0.7)  # checked by speculative sampling's rule
    Eager(k=4).propose([steered, sampled])  # 8 rows: one each, 6 for guesses, taken in turn
    assert len(steered.candidates) == 4 and len(sampled.candidates) == 2


def test_guess_length_follows_the_costs_and_the_chance():
    """Guess as many tokens as maximize the expected tokens per second: none where a step of more rows costs more
    than the guesses would bring, the most allowed where they cost nothing; a sequence whose guesses are all
    missed stops guessing, and tries again once its counts have faded."""
    spec = Speculator(k=7)
    for rows, seconds in ((1, 1.0), (2, 1.5), (3, 1.9), (5, 2.75), (8, 3.8)):  # timed as on the 20b, AVX2
        spec.observe(rows, seconds)
    assert spec.cost(5) == 2.75 and spec.cost(4) == 1 + 3 * 0.5  # 4 rows never timed: the prior's
    assert spec.length(0.2, 7) == 0 and spec.length(0.99, 7) >= 4 and spec.length(0.8, 1) == 1
    flat = Eager(k=7)
    assert flat.length(0.5, 7) == 7 and flat.length(0.0, 7) == 0
    seq = decoding(REPEATING, max_tokens=1000)
    spec.propose([seq])
    assert seq.candidates  # the prior (each guess kept at 0.6) says one guess pays
    missed = 0
    for _ in range(100):  # every guess missed: the sequence writes 5-token loops of its own, which it guesses
        if seq.candidates:
            seq.num_computed += len(seq.candidates) + 1  # the step, as the runner counts it
            spec.settle(seq, [99] * (len(seq.candidates) + 1),
                        lambda s, n: setattr(s, "num_computed", s.num_computed - n))
            missed += 1
        else:
            seq.num_computed += 1
            seq.append(len(seq.output) % 5)
        spec.propose([seq])
        if missed and spec.length(spec.guessing[seq.id].chance(), 7) == 0:
            break
    assert 1 <= missed <= 3 and not seq.candidates  # a few misses and it stops guessing
    for waited in range(200):  # noqa: B007 (counted)  # no guesses: the misses fade until the prior's chance says to try again
        seq.num_computed += 1
        seq.append(len(seq.output) % 5)
        spec.propose([seq])
        if seq.candidates:
            break
    assert seq.candidates and waited >= 20  # not soon: a text whose guesses miss pays ~2 % for trying


@pytest.fixture(scope="module")
def llms(tiny_repo):
    """The tiny model in bf16 (its products are the C kernels', whose checked rows equal one-token steps bit for
    bit: test_checked_step.py), with and without speculation"""
    if not cpu_kernels.available():
        pytest.skip("the C kernels were not built")
    plain = ossie.LLM(tiny_repo, progress=False, enable_prefix_caching=False)
    spec = ossie.LLM(tiny_repo, progress=False, enable_prefix_caching=False, speculative="ngram")
    spec.engine.speculator = Eager(rows=spec.engine.speculator.rows)
    return plain, spec


def together(llm, prompts, params):
    """the prompts submitted at once to the LLM's engine, stepped on a thread of its own: their tokens"""
    llm.engine.start()
    try:
        return run_engine(llm.engine, prompts, params)[0]
    finally:
        llm.engine.shutdown()


def test_greedy_output_is_the_same_token_for_token(llms, path):
    """Greedy requests alone and four at once (one of them sampled with a seed), on every kernel path: the greedy
    ones get the same tokens with speculation as without, the sampled one the same tokens run to run, and guesses
    were made and kept (on text that repeats itself and on the random model's own loops)."""
    plain, spec = llms
    gen = torch.Generator().manual_seed(4)
    prompts = [REPEATING, torch.randint(0, 1000, (40,), generator=gen).tolist(), REPEATING[3:] + [99, 98],
               torch.randint(0, 1000, (150,), generator=gen).tolist()]  # past the sliding window of 128
    for prompt in prompts:
        assert list(spec.generate(prompt, max_tokens=40, temperature=0, stop_token_ids=[])) == \
            list(plain.generate(prompt, max_tokens=40, temperature=0, stop_token_ids=[]))
    before = spec.engine.snapshot()
    params = [SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[]) for _ in prompts[:3]]
    params.append(SamplingParams(max_tokens=30, temperature=0.8, seed=3, stop_token_ids=[]))
    first = together(spec, prompts, params)
    assert first[:3] == together(plain, prompts, params)[:3]  # the greedy ones
    assert together(spec, prompts, params) == first  # the sampled one: its seed gives the same tokens again
    stats = spec.engine.snapshot()
    assert stats.accepted_tokens > before.accepted_tokens and stats.drafted_tokens > stats.accepted_tokens
    assert plain.engine.snapshot().drafted_tokens == 0


def test_with_the_prefix_cache_the_same_tokens(tiny_repo, llms):
    """Checked guesses fill blocks of the prefix cache, and those of the guesses not kept are forgotten: the same
    request again (its prompt from the cache) and a longer one starting with its whole text give the tokens of the
    model without speculation."""
    plain, _ = llms
    spec = ossie.LLM(tiny_repo, progress=False, speculative="ngram")
    spec.engine.speculator = Eager(rows=spec.engine.speculator.rows)
    prompt = REPEATING + [1, 2, 3]
    first = list(spec.generate(prompt, max_tokens=70, temperature=0, stop_token_ids=[]))
    assert first == list(plain.generate(prompt, max_tokens=70, temperature=0, stop_token_ids=[]))
    assert list(spec.generate(prompt, max_tokens=70, temperature=0, stop_token_ids=[])) == first
    longer = prompt + first[:50]
    assert list(spec.generate(longer, max_tokens=20, temperature=0, stop_token_ids=[])) == \
        list(plain.generate(longer, max_tokens=20, temperature=0, stop_token_ids=[]))
    assert spec.engine.snapshot().cached_prompt_tokens > 0 and spec.engine.snapshot().accepted_tokens > 0


@pytest.mark.parametrize("filters", [{}, {"top_k": 4}, {"top_p": 0.8}, {"min_p": 0.1}])
def test_speculative_sampling_keeps_the_models_distribution(filters):
    """Over a 6-token vocabulary, 20,000 checks of two guesses: the first token has the distribution sampling one
    token gives from the first row, and the second, where the first guess was kept, the second row's (chi-square
    at p = 0.001; the guesses are the first row's likeliest token, and an unlikely one for the second row)."""
    gen = torch.Generator().manual_seed(8)
    rows = torch.randn(3, 6, generator=gen) * 1.5
    params = SamplingParams(temperature=0.9, **filters)
    guesses = [int(rows[0].argmax()), int(rows[1].argmin())]

    def dist(row):  # what sampling one token draws from
        ids, weights = candidates(row, params)
        p = torch.zeros(6)
        p[ids if ids is not None else torch.arange(6)] = weights / weights.sum()
        return p

    first, second = torch.zeros(6), torch.zeros(6)
    for _ in range(20000):
        out = check_guesses(rows, guesses, params, gen)
        first[out[0]] += 1
        if out[0] == guesses[0]:
            second[out[1]] += 1
    for counts, expected in ((first, dist(rows[0])), (second, dist(rows[1]))):
        n, e = counts.sum(), expected.clamp_min(1e-12)
        seen = e > 1e-6
        assert (counts[~seen] == 0).all()  # nothing outside the filtered distribution
        chi2 = (((counts - n * e) ** 2) / (n * e))[seen].sum()
        assert chi2 < 20.5, (counts / n, expected)  # 5 degrees of freedom at most, p = 0.001


class Scripted:
    """A draft source that guesses from a script of what follows (a draft model would decode it): it records what
    it is told, to check that it hears every token of its own sequence, in order, once."""

    made: list = []

    def __init__(self, script: list[int]):
        self.script, self.told = script, []
        Scripted.made.append(self)

    def extend(self, tokens):
        self.told.extend(tokens)

    def propose(self, k: int) -> list[int]:
        done = len(self.told) - self.prompt_length
        return self.script[done:done + k]


def test_a_draft_source_of_another_kind_plugs_in(tiny_repo, llms):
    """The Speculator's draft sources are one small interface (DraftSource): a source that knows the greedy text in
    advance (as a good draft model would) gets every guess kept, the output is the plain one token for token, each
    sequence gets a source of its own, and each source is told its sequence's prompt and kept tokens in order."""
    plain, _ = llms
    prompt = list(range(300, 340))
    expected = list(plain.generate(prompt, max_tokens=24, temperature=0, stop_token_ids=[]))

    def make(seq: Sequence) -> Scripted:
        source = Scripted(expected)
        source.prompt_length = len(seq.prompt)
        return source

    Scripted.made = []
    spec = ossie.LLM(tiny_repo, progress=False, enable_prefix_caching=False, speculative="ngram")
    spec.engine.speculator = Eager(rows=spec.engine.speculator.rows, draft=make)
    assert list(spec.generate(prompt, max_tokens=24, temperature=0, stop_token_ids=[])) == expected
    stats = spec.engine.snapshot()
    assert stats.accepted_tokens == stats.drafted_tokens > 12  # every guess right, most tokens guessed
    assert list(spec.generate(prompt[:20], max_tokens=4, temperature=0, stop_token_ids=[]))
    first, second = Scripted.made
    assert first.told == (prompt + expected)[:len(first.told)] and len(first.told) >= len(prompt) + 12
    assert second.told[:20] == prompt[:20]  # the second request: a source of its own
