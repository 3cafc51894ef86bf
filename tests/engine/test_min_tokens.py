"""min_tokens (vLLM's): no stop token is sampled before the output has that many tokens, greedy or sampled, with
speculation or without; after that, the request stops as it would."""

import pytest
import torch

from ossie.engine import SamplingParams
from tests.engine.test_speculative import (
    REPEATING,
    decoding,
    llms,  # noqa: F401  (the fixture)
)

MOST = list(range(150_000))  # stop ids covering three quarters of the vocabulary: a sampled token is one soon


def test_validated_against_max_tokens():
    SamplingParams(max_tokens=5, min_tokens=5).validate()
    for bad in (6, -1, 2.0):
        with pytest.raises(ValueError, match="min_tokens"):
            SamplingParams(max_tokens=5, min_tokens=bad).validate()


@pytest.mark.parametrize("speculative", [False, True])
def test_greedy_passes_over_a_stop_token_until_min_tokens(llms, speculative):  # noqa: F811
    """The greedy text's third token made a stop token: without min_tokens the request ends there; with
    min_tokens=10, the third token is the next best one and the request goes on past the tenth, with or without
    guesses (REPEATING is guessed: the guesses meet the held stop too)."""
    plain, spec = llms
    llm = spec if speculative else plain
    free = list(plain.generate(REPEATING, max_tokens=20, temperature=0, stop_token_ids=[]))
    stop = [free[2]]
    assert free[2] not in free[:2]
    assert list(llm.generate(REPEATING, max_tokens=20, temperature=0, stop_token_ids=stop)) == free[:3]
    held = list(llm.generate(REPEATING, sampling_params=SamplingParams(
        max_tokens=20, temperature=0, stop_token_ids=stop, min_tokens=10)))
    assert held[:2] == free[:2] and stop[0] not in held[:10] and len(held) > 10
    assert held[-1] == stop[0] or len(held) == 20  # after min_tokens, a stop token ends it again


@pytest.mark.parametrize("speculative", [False, True])
def test_sampled_holds_the_stop_tokens_off(llms, speculative):  # noqa: F811
    """Sampled (speculative sampling's rule when guessing: REPEATING's guesses are all stop ids, so all refused):
    the first 15 tokens are none of the stop ids, though without min_tokens the request ends within a few."""
    plain, spec = llms
    llm = spec if speculative else plain
    params = dict(max_tokens=40, temperature=1.0, seed=5, stop_token_ids=MOST)
    assert len(list(llm.generate(REPEATING, **params))) < 15
    held = list(llm.generate(REPEATING, sampling_params=SamplingParams(**params, min_tokens=15)))
    assert len(held) > 15 and all(t >= len(MOST) for t in held[:15])


def test_each_checked_row_is_held_by_the_token_it_gives():
    """A sequence 8 tokens out with min_tokens=10 and three guesses: rows 0 and 1 give tokens 9 and 10 (held),
    rows 2 and 3 give 11 and 12 (free); the next sequence's one row, 20 tokens out, is free; the third one's held."""
    from ossie.engine.model_runner import hold_stops

    def seq(out: int, min_tokens: int):
        s = decoding([1, 2, 3], max_tokens=30, min_tokens=min_tokens)
        s.stop_ids = frozenset({4, 6})
        s.output = [0] * out
        return s

    guessing, done, young = seq(8, 10), seq(20, 10), seq(0, 1)
    logits = torch.zeros(6, 8)
    hold_stops(logits, [guessing, done, young], [4, 1, 1])
    held = torch.isinf(logits[:, [4, 6]]).all(dim=1).tolist()
    assert held == [True, True, False, False, False, True]
    assert not torch.isinf(logits[:, [0, 1, 2, 3, 5, 7]]).any()
