"""`ossie serve` on loopback with a tiny synthetic checkpoint: the official openai client, raw HTTP, streaming,
tool calls (scripted completions), tool_choice steering, bad input, concurrency and disconnects."""

import copy
import json
import re
import threading
import time

import httpx
import pytest
import torch

from ossie.chat import harmony
from tests.helpers import use_runner
from tests.helpers.server import GOOD, MODEL, SCRIPT, TIME, WEATHER, Server, client, no_harmony, user
from tests.helpers.server import metrics as read_metrics

openai = pytest.importorskip("openai")

# ---- the openai client ---------------------------------------------------------------------------------------


def test_startup_log_and_models(server):
    assert "kernels: " in server.log()  # which CPU path serves, for a user's report
    c = client(server)
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert c.models.retrieve(MODEL).id == MODEL


def test_chat_stream_adds_up_to_non_stream(server):
    c = client(server)
    kw = dict(model=MODEL, messages=user("Hello there"), max_tokens=24, temperature=0, seed=1)
    full = c.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length")
    content, reasoning, chunks = "", "", list(c.chat.completions.create(**kw, stream=True,
                                                                       stream_options={"include_usage": True}))
    for ch in chunks:
        if ch.choices:
            d = ch.choices[0].delta
            content += d.content or ""
            reasoning += getattr(d, "reasoning_content", None) or ""
    assert content == (choice.message.content or "")
    assert reasoning == (getattr(choice.message, "reasoning_content", None) or "")
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == choice.finish_reason
    # usage: the exact harmony prompt, and one completion token per generated token
    assert full.usage.prompt_tokens == len(harmony.render(user("Hello there")))
    assert full.usage.completion_tokens == 24 or choice.finish_reason == "stop"
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    no_harmony(choice.message.content)


def test_chat_with_tools_declared(server):
    r = client(server).chat.completions.create(model=MODEL, messages=user("weather?"), tools=[WEATHER],
                                               max_tokens=16, temperature=0)
    assert r.usage.prompt_tokens == len(harmony.render(user("weather?"), [WEATHER]))
    no_harmony(r.choices[0].message.content)


def test_responses_stream_and_non_stream(server):
    c = client(server)
    kw = dict(model=MODEL, input="Tell me a story", max_output_tokens=20, temperature=0, reasoning={"effort": "low"})
    full = c.responses.create(**kw)
    assert full.status in ("completed", "incomplete")
    assert full.usage.input_tokens == len(harmony.render(user("Tell me a story"), reasoning_effort="low"))
    assert full.usage.output_tokens == 20 or full.status == "completed"
    events = list(c.responses.create(**kw, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert [o.type for o in final.output] == [o.type for o in full.output]
    assert final.output_text == full.output_text
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == full.output_text
    # every item is announced before its deltas and closed after them, one after the other
    for i, item in enumerate(final.output):
        at = [n for n, e in enumerate(events) if getattr(e, "output_index", None) == i]
        assert events[at[0]].type == "response.output_item.added" and events[at[0]].item.id == item.id
        assert events[at[-1]].type == "response.output_item.done" and events[at[-1]].item.id == item.id
        assert all(n not in at for n in range(at[0], at[-1]) if getattr(events[n], "output_index", i) != i)


def test_previous_response_id(server):
    c = client(server)
    first = c.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=8, temperature=0)
    second = c.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                max_output_tokens=8, temperature=0)
    assert second.usage.input_tokens > len(harmony.render(user("What is my name?")))
    assert c.responses.retrieve(second.id).id == second.id
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model=MODEL, input="x", previous_response_id="resp_missing", max_output_tokens=4)


def test_completions_raw_text(server):
    c = client(server)
    full = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0, stream=True) if ch.choices)
    assert streamed == full.choices[0].text
    assert full.usage.prompt_tokens == len(harmony.harmony_encoding().encode("The capital of France is"))
    assert full.usage.completion_tokens <= 12


# ---- tool calls (scripted completions) ---------------------------------------------------------------------


def test_tool_call_non_stream(scripted):
    r = client(scripted).chat.completions.create(model=MODEL, messages=user("CALL-WEATHER in Paris?"),
                                                 tools=[WEATHER], max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.reasoning_content == "The user wants the weather. I will call the tool."
    assert not choice.message.content
    assert r.usage.completion_tokens == len(harmony.harmony_encoding().encode(SCRIPT[0]["completion"],
                                                                              allowed_special="all"))


@pytest.mark.parametrize("marker", ["CALL-WEATHER", "RECIPIENT-FIRST"])
def test_tool_call_streams_as_tool_calls(scripted, marker):
    chunks = list(client(scripted).chat.completions.create(
        model=MODEL, messages=user(marker), tools=[WEATHER], max_tokens=200, stream=True))
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    assert all(tc.function.name is None for tc in calls[1:])  # the name first, then argument pieces
    args = "".join(tc.function.arguments or "" for tc in calls)
    assert json.loads(args)["city"] in ("Paris", "Oslo")
    for ch in chunks:
        if ch.choices:
            no_harmony(ch.choices[0].delta.content)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"


def test_tool_call_round_trip(scripted):
    messages = user("CALL-WEATHER in Paris?") + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"} ANSWER'}]
    r = client(scripted).chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=100)
    assert r.choices[0].message.content.startswith("It is sunny in Paris")
    assert r.choices[0].finish_reason == "stop"


def test_usage_counts_exactly(scripted):
    """reasoning_tokens: every token of the analysis message, header and <|end|> included; completion_tokens:
    every token generated."""
    from ossie.tokenizer import harmony_encoding

    enc = harmony_encoding()
    r = client(scripted).chat.completions.create(model=MODEL, messages=user("ANSWER"), max_tokens=100)
    analysis = "<|channel|>analysis<|message|>Easy.<|end|>"
    assert r.usage.completion_tokens_details.reasoning_tokens == len(enc.encode(analysis, allowed_special="all"))
    completion = next(e["completion"] for e in SCRIPT if isinstance(e, dict) and e["match"] == "ANSWER")
    assert r.usage.completion_tokens == len(enc.encode(completion, allowed_special="all"))


def test_stop_string(scripted):
    c = client(scripted)
    r = c.chat.completions.create(model=MODEL, messages=user("ANSWER"), stop=["STOP"], max_tokens=100)
    assert r.choices[0].message.content == "It is sunny in Paris. "
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=MODEL, messages=user("ANSWER"), stop="STOP", max_tokens=100, stream=True) if ch.choices)
    assert streamed == "It is sunny in Paris. "


def test_responses_function_call_items(scripted):
    c = client(scripted)
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}]
    r = c.responses.create(model=MODEL, input="CALL-WEATHER", tools=tools, max_output_tokens=200)
    assert [o.type for o in r.output] == ["reasoning", "function_call"]
    call = r.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    events = list(c.responses.create(model=MODEL, input="CALL-WEATHER", tools=tools, max_output_tokens=200,
                                     stream=True))
    kinds = [e.type for e in events]
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [e.item.type for e in added] == ["reasoning", "function_call"]
    assert added[1].item.name == "get_weather"
    assert kinds.index("response.function_call_arguments.delta") > kinds.index("response.output_item.added", 3)
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(args) == {"city": "Paris"}
    assert kinds[-1] == "response.completed"
    # the call's result goes back as a function_call_output item
    follow = c.responses.create(model=MODEL, previous_response_id=r.id, tools=tools, max_output_tokens=100,
                                input=[{"type": "function_call_output", "call_id": call.call_id,
                                        "output": "clear sky ANSWER"}])
    assert follow.output_text.startswith("It is sunny")


def test_responses_input_items_render_as_chat_messages():
    """An assistant message followed by its function calls is one turn (the text is the calls' preamble, harmony's
    commentary, as chat completions renders it); a function_call_output given as content parts reaches the model
    as their text."""
    from ossie.server.responses import input_to_messages

    items = [{"role": "user", "content": "weather?"},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
             {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
             {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "sunny"}]}]
    chat = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [{
                "id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    assert harmony.render(input_to_messages(items), [WEATHER]) == harmony.render(chat, [WEATHER])


def test_responses_cut_item_is_incomplete(scripted):
    c = client(scripted)
    r = c.responses.create(model=MODEL, input="ANSWER", max_output_tokens=12)
    assert r.status == "incomplete" and r.output[-1].status == "incomplete"
    events = list(c.responses.create(model=MODEL, input="ANSWER", max_output_tokens=12, stream=True))
    done = [e for e in events if e.type == "response.output_item.done"]
    assert done[-1].item.status == "incomplete" and events[-1].type == "response.incomplete"


# ---- tool_choice is enforced ---------------------------------------------------------------------------------


def test_named_tool_choice_steers_the_call(scripted):
    """The model (script) calls get_timezone; tool_choice names get_weather: the call made is get_weather."""
    r = client(scripted).chat.completions.create(
        model=MODEL, messages=user("WRONG-FUNCTION"), tools=[WEATHER, TIME], max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Rome"}
    assert r.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
@pytest.mark.parametrize("seed,max_tokens", [(0, 40), (1, 60), (2, 120), (3, 33)])
def test_tool_choice_with_a_random_model(server, choice, seed, max_tokens):
    """The tiny random model knows nothing of tools, yet its answer becomes a call to an allowed function, and a
    whole one: its random arguments are closed in time to fit max_tokens (these seeds and budgets once cut them,
    and the half-written arguments came back as content). tests/chat/test_constraints.py checks the raw tokens."""
    r = client(server).chat.completions.create(model=MODEL, messages=user("What time is it?"),
                                               tools=[WEATHER, TIME], tool_choice=choice, max_tokens=max_tokens,
                                               temperature=1.0, seed=seed)
    choice_ = r.choices[0]
    allowed = {"get_weather", "get_time"} if choice == "required" else {"get_time"}
    assert choice_.finish_reason == "tool_calls", choice_
    for call in choice_.message.tool_calls:
        assert call.function.name in allowed
        assert isinstance(json.loads(call.function.arguments), dict)
    assert not choice_.message.content
    assert r.usage.completion_tokens <= max_tokens


def test_tool_choice_too_small_a_budget_gives_no_partial_call(server):
    """max_tokens too small for even the call's header: no call and no half of one, finish "length"."""
    r = client(server).chat.completions.create(model=MODEL, messages=user("What time is it?"), tools=[WEATHER],
                                               tool_choice="required", max_tokens=6, temperature=1.0, seed=0)
    assert r.choices[0].finish_reason == "length"
    assert not r.choices[0].message.tool_calls and not r.choices[0].message.content


def test_tool_choice_none_and_json_format(server):
    c = client(server)
    r = c.chat.completions.create(model=MODEL, messages=user("hi"), tools=[WEATHER], tool_choice="none",
                                  max_tokens=120, temperature=1.0, seed=5)
    assert not r.choices[0].message.tool_calls
    for seed, max_tokens in ((5, 120), (6, 40), (7, 90)):  # the JSON object is closed in time to fit max_tokens
        r = c.chat.completions.create(model=MODEL, messages=user("hi"), response_format={"type": "json_object"},
                                      max_tokens=max_tokens, temperature=1.0, seed=seed)
        assert isinstance(json.loads(r.choices[0].message.content), dict), r.choices[0]
        assert r.choices[0].finish_reason == "stop"


# ---- bad input gets a 4xx, and the server keeps serving ---------------------------------------------------------

BAD = [
    ("malformed JSON", b'{"model": "tiny", "messages": [', 400),
    ("not an object", b"[1, 2]", 400),
    ("missing messages", {"model": MODEL}, 400),
    ("empty messages", {"model": MODEL, "messages": []}, 400),
    ("wrong type", {**GOOD, "temperature": "hot"}, 400),
    ("max_tokens not positive", {**GOOD, "max_tokens": 0}, 400),
    ("unknown model", {**GOOD, "model": "gpt-5"}, 404),
    ("max_tokens beyond the context", {**GOOD, "max_tokens": 10_000_000}, 400),
    ("unknown tool_choice", {**GOOD, "tools": [WEATHER], "tool_choice": "sometimes"}, 400),
    ("tool_choice names an undeclared function",
     {**GOOD, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400),
    ("required without tools", {**GOOD, "tool_choice": "required"}, 400),
    ("unknown role", {**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("tool result answering no call", {**GOOD, "messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]},
     400),
    ("n > 1", {**GOOD, "n": 2}, 400),
    ("bad response_format", {**GOOD, "response_format": {"type": "yaml"}}, 400),
]


@pytest.mark.parametrize("name,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_requests(server, name, body, status):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/chat/completions", headers={"content-type": "application/json"}, **kw,
                   timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    ok = httpx.post(server.url + "/v1/chat/completions", json=GOOD, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("path,body,status", [
    ("/v1/responses", {"model": MODEL}, 400),
    ("/v1/responses", {"model": MODEL, "input": [{"type": "image", "url": "x"}]}, 400),
    ("/v1/responses", {"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]}, 400),
    ("/v1/responses", {"model": MODEL, "input": "x", "reasoning": {"effort": "max"}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 999999999]}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400),
    ("/v1/nothing", {}, 404),
])
def test_bad_other_requests(server, path, body, status):
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2},
                      timeout=30).status_code == 200


def test_api_key(tiny_repo):
    s = Server(tiny_repo, "--api-key", "sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            client(s, api_key="wrong").models.list()
        r = httpx.post(s.url + "/v1/chat/completions", json=GOOD)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client(s, api_key="sekret").chat.completions.create(**GOOD).choices
        assert httpx.get(s.url + "/health").status_code == 200  # health needs no key
    finally:
        s.stop()


# ---- several clients, and clients that leave ------------------------------------------------------------------


def test_concurrent_streams(server):
    prompts = [f"Client number {i} says hello" for i in range(4)]
    c = client(server)
    solo = {p: c.chat.completions.create(model=MODEL, messages=user(p), max_tokens=20, temperature=0).choices[0]
            for p in prompts}
    results, errors = {}, []

    def run(p):
        try:
            text = ""
            for ch in client(server).chat.completions.create(model=MODEL, messages=user(p), max_tokens=20,
                                                             temperature=0, stream=True):
                if ch.choices:
                    text += ch.choices[0].delta.content or ""
            results[p] = text
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for p in prompts:  # each stream equals what the request gives alone
        assert results[p] == (solo[p].message.content or "")


def wait_for_cancel(server, before) -> dict:
    deadline = time.time() + 30
    while time.time() < deadline:
        h = server.health()
        if h["cancelled"] > before["cancelled"] and h["running"] == 0:
            return h
        time.sleep(0.1)
    return server.health()


@pytest.mark.parametrize("path,body,lines", [
    ("/v1/completions", {"prompt": "Once upon a time"}, 6),
    ("/v1/chat/completions", {"messages": user("Talk for a long time")}, 1),
    ("/v1/responses", {"input": "Talk for a long time"}, 2),
])
def test_disconnect_frees_the_request(server, path, body, lines):
    before = server.health()
    body = {"model": MODEL, **body, "stream": True, "temperature": 1.0, "min_tokens": 5000,
            ("max_output_tokens" if "responses" in path else "max_tokens"): 5000}
    with httpx.stream("POST", server.url + path, json=body, timeout=30) as r:
        it = r.iter_lines()
        got = 0
        while got < lines:
            got += bool(next(it).strip())
    h = wait_for_cancel(server, before)  # the client left: its generation stops and its cache is freed
    assert h["cancelled"] == before["cancelled"] + 1 and h["running"] == 0, h
    assert h["generated_tokens"] - before["generated_tokens"] < 5000
    assert client(server).chat.completions.create(**GOOD).choices  # still serving


def test_internal_failure_fails_one_request(tiny_llm):
    """A request whose generation raises gets a 500 with an OpenAI-style body that names the request (in the log)
    but not the internals; the next one is served."""
    from fastapi.testclient import TestClient

    from ossie.server import create_app

    class FlakyRunner:  # the model runner, whose first step fails
        def __init__(self, runner):
            self.runner, self.steps = runner, 0

        def __getattr__(self, name):
            return getattr(self.runner, name)

        def run(self, batch, sizes=None):
            self.steps += 1
            if self.steps == 1:
                raise RuntimeError("simulated kernel failure")
            return self.runner.run(batch, sizes)

    llm = use_runner(copy.copy(tiny_llm), FlakyRunner(tiny_llm.runner))
    with TestClient(create_app(llm, [MODEL])) as http:
        r = http.post("/v1/chat/completions", json=GOOD)
        assert r.status_code == 500 and "simulated kernel failure" not in r.text
        assert r.json()["error"]["type"] == "server_error" and r.headers["x-request-id"].startswith("req_")
        r = http.post("/v1/chat/completions", json={**GOOD, "stream": True})
        assert r.status_code == 200 and "[DONE]" in r.text
        assert http.get("/health").json()["failed"] == 1


def test_unexpected_error_is_a_500_that_closes_the_connection(tiny_llm):
    """A bug in an endpoint: a 500 naming the request but not the exception, and `Connection: close` (uvicorn
    closes the connection after an unhandled error; without the header the client's next request on it failed)."""
    from fastapi.testclient import TestClient

    from ossie.server import create_app

    app = create_app(tiny_llm, [MODEL])

    def broken(req):
        raise RuntimeError("secret internals")

    app.state.serving.check_request = broken
    with TestClient(app, raise_server_exceptions=False) as http:
        r = http.post("/v1/chat/completions", json=GOOD)
        assert r.status_code == 500 and r.headers["connection"] == "close"
        assert "secret internals" not in r.text and re.search(r"req_[0-9a-f]{16}", r.json()["error"]["message"])


def test_long_prompts_read_in_small_chunks(tiny_repo, tiny_llm):
    """A server that reads prompts 50 tokens at a time answers prompts longer than the 128-token window as one full
    forward pass over them predicts (raw completion) and as the in-process chat does (chat completions)."""
    from ossie.special_tokens import N_ORDINARY
    from ossie.tokenizer import TextDecoder

    prompt = [int(t) for t in torch.randint(0, N_ORDINARY, (300,), generator=torch.Generator().manual_seed(4))]
    expected = []
    for _ in range(8):
        expected.append(int(tiny_llm.logits(prompt + expected)[-1].argmax()))
    decoder = TextDecoder()
    text = "".join(decoder.push(t) for t in expected) + decoder.flush()
    messages = user("Tell me about the sea. " * 30)
    answer = tiny_llm.chat(messages, max_tokens=24, temperature=0)
    s = Server(tiny_repo, "--prefill-chunk", "50")
    try:
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 8,
                                                        "temperature": 0}, timeout=60).json()
        assert r["choices"][0]["text"] == text and r["usage"]["completion_tokens"] == 8
        r = client(s).chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
        assert r.usage.prompt_tokens > 200
        assert r.choices[0].message.content == answer.content
        assert (getattr(r.choices[0].message, "reasoning_content", None) or "") == answer.reasoning
    finally:
        s.stop()


def test_prefix_cache_usage_and_metrics(server):
    """The same conversation sent again is read from the prefix cache (all its whole blocks but the one holding
    the last prompt token), answers the same, and says so in usage (chat completions, responses) and /metrics.
    The first time, only the harmony system message every request starts with may be cached."""
    c = client(server)
    messages = user("A question about the sea and its tides, asked at length. " * 12)
    first = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    second = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    n = first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens <= 64
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // 64 * 64 > 0
    assert second.choices[0].message.content == first.choices[0].message.content
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (n - 1) // 64 * 64
    kw = dict(model=MODEL, input="Tell me about rivers and how they reach the sea. " * 12, max_output_tokens=4,
              temperature=0)
    r1, r2 = c.responses.create(**kw), c.responses.create(**kw)
    assert r1.usage.input_tokens_details.cached_tokens <= 64
    assert r2.usage.input_tokens_details.cached_tokens == (r2.usage.input_tokens - 1) // 64 * 64 > 0
    metrics = read_metrics(server.url)
    assert int(metrics["ossie_prompt_tokens_cached_total"]) >= 2 * ((n - 1) // 64 * 64)
    assert 0 < float(metrics["ossie_prefix_cache_hit_rate"]) < 1
    assert int(metrics["ossie_kv_cache_prefix_bytes"]) > 0 and int(metrics["ossie_kv_cache_prefix_blocks"]) > 0
    assert int(metrics["ossie_kv_cache_running_bytes"]) == 0  # nothing is running now
    assert metrics["ossie_spec_decode_num_draft_tokens_total"] == 0  # speculation is off by default
