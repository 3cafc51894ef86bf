"""Constrained decoding: the JSON automaton, and the steering of a (random) model's raw harmony output."""

import json
import re

import pytest

from ossie.chat import constraints
from ossie.chat.constraints import JsonPrefix
from ossie.engine import SamplingParams, Sequence
from ossie.tokenizer import harmony_encoding
from tests.helpers import stream

GOOD = ['{}', '{"a": 1}', '{"a":[1, 2.5, -3e+4, true, null, {"b": "x\\n\\u00e9"}], "c": false}', '{"k": "v"}',
        '{"a":0}', '{"a":-0.5E3}', '{"a": []}', '{"é": "日本"}']
BAD = ['[]', '1', '{"a" 1}', '{"a": 01}', '{"a": tru}', '{"a": 1,}', '{"a": 1} ', '{a: 1}', '{"a": "\x01"}',
       '{"a": 1.}', '{"a": -}', ' {}', '{"a":  1}', '{\n"a": 1}', '{"a": 1 }', '{"a": "\\x"}', '{}}']


def run(text: str) -> JsonPrefix | None:
    j = JsonPrefix()
    for ch in text.encode():
        if not j.accepts(bytes([ch])):
            return None
        j.feed(bytes([ch]))
    return j


@pytest.mark.parametrize("text", GOOD)
def test_json_accepts_objects(text):
    j = run(text)
    assert j is not None and j.done
    assert isinstance(json.loads(text), dict)
    for cut in range(len(text.encode())):  # every prefix is accepted, and only the whole is done
        prefix = text.encode()[:cut]
        try:
            prefix.decode()
        except UnicodeDecodeError:
            continue
        p = run(prefix.decode())
        assert p is not None and not p.done


@pytest.mark.parametrize("text", BAD)
def test_json_rejects(text):
    j = run(text)
    assert j is None or not j.done


def raw_completion(llm, steering, max_tokens=160, seed=0):
    prompt = llm.render([{"role": "user", "content": "What time is it in Paris?"}],
                        tools=[{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
                               for n in ("get_weather", "get_time")])
    steering.reasoning_budget = max_tokens // 2 - 20
    seq = Sequence(prompt, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed), steering)
    tokens = list(stream(llm.runner, seq))
    return harmony_encoding().decode(tokens), tokens


ANALYSIS = r"(<\|channel\|>analysis<\|message\|>(?P<reasoning>.*?)<\|end\|><\|start\|>assistant)?"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("names", [["get_weather", "get_time"], ["get_time"]])
def test_tool_call_steering_on_a_random_model(tiny_llm, names, seed):
    text, tokens = raw_completion(tiny_llm, constraints.tool_call_steering(names), seed=seed)
    m = re.fullmatch(ANALYSIS + r"<\|channel\|>commentary to=functions\.(?P<name>\w+) <\|constrain\|>json"
                     r"<\|message\|>(?P<args>.*?)(?P<call><\|call\|>)?", text, re.S)
    assert m, text
    assert m["name"] in names
    assert "<|" not in (m["reasoning"] or "")
    args = run(m["args"])
    assert args is not None, m["args"]  # always a JSON prefix
    if m["call"]:
        assert args.done and isinstance(json.loads(m["args"]), dict)
    else:
        assert len(tokens) == 160  # only running out of tokens leaves a call open


@pytest.mark.parametrize("seed", range(3))
def test_answer_steering(tiny_llm, seed):
    text, _ = raw_completion(tiny_llm, constraints.answer_steering(json=False), seed=seed)
    plain = r"(?:(?!<\|).)*"  # text without a special token
    assert re.fullmatch(ANALYSIS + r"<\|channel\|>final<\|message\|>" + plain + r"(<\|return\|>)?", text, re.S), text
    text, _ = raw_completion(tiny_llm, constraints.answer_steering(json=True), seed=seed)
    m = re.fullmatch(ANALYSIS + r"<\|channel\|>final<\|message\|>(?P<json>.*?)(<\|return\|>)?", text, re.S)
    assert m and run(m["json"]) is not None, text


def test_reasoning_budget(tiny_llm):
    steering = constraints.tool_call_steering(["get_time"])
    text, _ = raw_completion(tiny_llm, steering, max_tokens=200)
    steering_tokens = steering.reasoning_tokens
    assert steering_tokens <= 200 // 2 - 20 + 1  # the budget, plus the <|end|> that closes the analysis


def test_no_tools_no_call_steering():
    with pytest.raises(ValueError):
        constraints.tool_call_steering([])


@pytest.mark.parametrize("text", GOOD)
def test_closing_completes_every_prefix(text):
    """Cut anywhere, a JSON object is completed by `closing` (what the steering forces when max_tokens runs out)."""
    for cut in range(len(text.encode()) + 1):
        j = JsonPrefix()
        prefix = text.encode()[:cut]
        try:
            prefix.decode()
        except UnicodeDecodeError:  # inside a multi-byte character (the decoded text would hold U+FFFD there)
            continue
        j.feed(prefix)
        close = constraints.closing(j.state)
        j.feed(close)
        assert j.done and isinstance(json.loads(prefix + close), dict), (prefix, close)


@pytest.mark.parametrize("budget", [20, 25, 31, 47])
def test_json_is_closed_within_the_budget(tiny_llm, budget):
    """A random model steered to a JSON answer with max_tokens = budget: the object is complete and parses."""
    steering = constraints.answer_steering(json=True)
    steering.budget = budget
    prompt = harmony_encoding().encode("<|start|>user<|message|>hi<|end|><|start|>assistant", allowed_special="all")
    seq = Sequence(list(prompt), SamplingParams(max_tokens=budget, temperature=1.0, seed=budget,
                                                stop_token_ids=None), steering)
    out = list(stream(tiny_llm.runner, seq))
    text = harmony_encoding().decode(out)
    answer = text.split("<|channel|>final<|message|>", 1)[1].removesuffix("<|return|>")
    assert isinstance(json.loads(answer), dict) and steering.finished and len(out) <= budget
