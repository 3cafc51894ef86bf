"""Speculative decoding for steered requests (tool_choice, response_format): each checked row is masked as the
steering would mask it once the guesses before it were kept, so a steered request gets with guesses what it gets
without them, and never a token its steering forbids."""

import threading

import torch

from ossie.chat import constraints
from ossie.engine import SamplingParams, Token
from ossie.engine.model_runner import steered_rows
from ossie.special_tokens import STOP_TOKEN_IDS
from tests.engine.test_speculative import llms  # noqa: F401  (the fixture)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
# a conversation whose history holds the call the steering will demand: the call's header repeats, so it is guessed
HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
               "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "c1", "content": '{"sky": "clear"}'},
           {"role": "user", "content": "And in Paris again?"}]


class Only:
    """A steering that allows token `allowed[i]` alone at its i-th token (and anything after)."""

    def __init__(self, allowed: list[int]):
        self.allowed, self.at = allowed, 0

    def copy(self):
        other = Only(self.allowed)
        other.at = self.at
        return other

    def mask(self, logits):
        if self.at >= len(self.allowed):
            return logits
        out = torch.full_like(logits, float("-inf"))
        out[self.allowed[self.at]] = logits[self.allowed[self.at]]
        return out

    def advance(self, token):
        self.at += 1


def test_each_row_is_masked_as_after_the_guesses_before_it():
    rows = torch.zeros(4, 10)
    steering = Only([3, 4, 5])
    out = steered_rows(steering, rows, [3, 4, 9])  # the third guess is forbidden
    assert [int(torch.argmax(r)) for r in out[:3]] == [3, 4, 5]
    assert torch.equal(out[3], rows[3])  # after a refused guess: never read, left alone
    assert steering.at == 0  # the request's own steering has not moved: a copy tried the guesses
    out = steered_rows(Only([3]), rows, [7, 8, 9])  # the first guess is forbidden: only its row is masked
    assert torch.isinf(out[0]).sum() == 9 and torch.equal(out[1:], rows[1:])


def test_a_copied_steering_advances_on_its_own():
    original = constraints.answer_steering(json=True)
    header = constraints._encode("<|channel|>final<|message|>")
    for tok in header:
        original.advance(tok)
    json_start = constraints._encode('{"a"')
    copy = original.copy()
    for tok in json_start:
        copy.advance(tok)
    assert original.phase == copy.phase == "json" and original.json.state != copy.json.state
    assert original.json.state == ("", original.json.state[1], None)  # nothing of the copy's JSON reached it
    assert original.tokens == len(header) and copy.tokens == len(header) + len(json_start)


def steered(llm, prompt, steering, max_tokens, **sampling):
    """One steered request through the LLM's engine (on its own thread): its tokens, and how it ended."""
    steering.budget, steering.reasoning_budget = max_tokens, max_tokens // 2
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=list(STOP_TOKEN_IDS), **sampling)
    tokens, ended, done = [], [], threading.Event()

    def on_event(event):
        if isinstance(event, Token):
            tokens.append(event.id)
        else:
            ended.append(event)
            done.set()

    llm.engine.start()
    try:
        llm.engine.submit(prompt, params, steering, on_event)
        assert done.wait(300)
    finally:
        llm.engine.shutdown()
    return tokens, type(ended[0]).__name__


def test_steered_requests_guess_and_get_the_same_tokens(llms):  # noqa: F811
    plain, spec = llms
    prompt = spec.render(HISTORY, [WEATHER], "low")
    before = spec.engine.snapshot()
    for make in (lambda: constraints.tool_call_steering(["get_weather"]),
                 lambda: constraints.answer_steering(json=True)):
        want = steered(plain, prompt, make(), 60, temperature=0)
        got = steered(spec, prompt, make(), 60, temperature=0)
        assert got == want and want[1] == "Finished"
    sampled = steered(spec, prompt, constraints.tool_call_steering(["get_weather"]), 60, temperature=1.0, seed=5)
    assert sampled[1] == "Finished"  # every token its steering allowed (a forbidden one fails the request)
    assert steered(spec, prompt, constraints.tool_call_steering(["get_weather"]), 60, temperature=1.0,
                   seed=5) == sampled
    after = spec.engine.snapshot()
    assert after.drafted_tokens > before.drafted_tokens and after.accepted_tokens > before.accepted_tokens
