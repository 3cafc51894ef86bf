"""Ollama's native API on `ossie serve`, driven by Ollama's own Python client (`ollama`), with scripted completions
where the shape matters (reasoning, tool calls) and the random tiny model elsewhere."""

import json

import httpx
import pytest

from tests.helpers.server import MODEL, WEATHER

ollama = pytest.importorskip("ollama")


def test_models_are_listed_shown_and_pulled(server):
    c = ollama.Client(host=server.url)
    assert httpx.get(server.url + "/api/version").json()["version"]
    assert MODEL in [m.model for m in c.list().models]
    shown = c.show(MODEL)
    assert set(shown.capabilities) == {"completion", "tools", "thinking"}
    assert shown.modelinfo["general.architecture"] == "gptoss" and shown.details.quantization_level == "MXFP4"
    assert httpx.post(server.url + "/api/show", json={"model": MODEL}).json()["thinking"]["values"] == [
        "low", "medium", "high"]
    (running,) = c.ps().models
    assert running.model == MODEL and running.context_length == 131072 and running.size > 0
    assert c.pull(MODEL).status == "success"
    progress = list(c.pull(MODEL + ":latest", stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    layers = [p for p in progress if p.total]
    assert layers and all(p.completed == p.total for p in layers)
    assert any(p.status == "pulling config.json" for p in layers)
    with pytest.raises(ollama.ResponseError) as e:
        c.pull("gpt-oss:120b")  # another model: ossie serves one, and says how to serve that one
    assert e.value.status_code == 404 and "ossie serve gpt-oss:120b" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        c.show("llama3:8b")
    assert e.value.status_code == 404 and "not found" in e.value.error


@pytest.mark.parametrize("stream", [False, True])
def test_chat_with_thinking(scripted, stream):
    c = ollama.Client(host=scripted.url)
    args = dict(model=MODEL, messages=[{"role": "user", "content": "ANSWER"}], think="low")
    if stream:
        parts = list(c.chat(**args, stream=True))
        content = "".join(p.message.content or "" for p in parts)
        thinking = "".join(p.message.thinking or "" for p in parts)
        final = parts[-1]
    else:
        final = c.chat(**args)
        content, thinking = final.message.content, final.message.thinking
    assert content == "It is sunny in Paris. STOP here" and thinking == "Easy."
    assert final.done and final.done_reason == "stop" and final.eval_count > 0 and final.prompt_eval_count > 0
    assert final.total_duration >= final.eval_duration > 0
    quiet = c.chat(model=MODEL, messages=[{"role": "user", "content": "ANSWER"}], think=False)
    assert quiet.message.content == content and not quiet.message.thinking


def test_tool_call_round_trip(scripted):
    c = ollama.Client(host=scripted.url)
    messages = [{"role": "user", "content": "CALL-WEATHER in Paris?"}]
    r = c.chat(model=MODEL, messages=messages, tools=[WEATHER])
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    messages += [r.message, {"role": "tool", "content": '{"sky": "clear"} ANSWER', "tool_name": "get_weather"}]
    r = c.chat(model=MODEL, messages=messages, tools=[WEATHER])
    assert r.message.content.startswith("It is sunny in Paris") and not r.message.tool_calls


def test_generate(scripted):
    c = ollama.Client(host=scripted.url)
    r = c.generate(model=MODEL, prompt="ANSWER", system="Be brief.")
    assert r.response == "It is sunny in Paris. STOP here" and r.thinking == "Easy." and r.done_reason == "stop"
    streamed = "".join(p.response for p in c.generate(model=MODEL, prompt="ANSWER", stream=True))
    assert streamed == r.response
    assert c.generate(model=MODEL, prompt="").done_reason == "load"  # Ollama's way to load a model


def test_options_and_format(server):
    c = ollama.Client(host=server.url)
    r = c.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 5, "seed": 1})
    assert r.eval_count == 5 and r.done_reason == "length"
    r = c.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], format="json",
               options={"num_predict": 60, "temperature": 1.0, "seed": 3})
    assert isinstance(json.loads(r.message.content), dict)
    seeded = [c.generate(model=MODEL, prompt="Pick", options={"seed": 9, "num_predict": 8}).response
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    r = c.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"num_ctx": 80})
    assert r.prompt_eval_count + r.eval_count == 80 and r.done_reason == "length"  # num_ctx bounds the whole


@pytest.mark.parametrize("path,body,status", [
    ("/api/chat", {"model": "nope:1b", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "think": "extreme"}, 400),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": "x"}},
     400),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, 400),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "format": "yaml"}, 400),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "format": {"type": 5}}, 400),
    ("/api/show", {}, 400),
    ("/api/chat", b'{"model": ', 400),
])
def test_bad_requests_answered_as_ollama_does(server, path, body, status):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, headers={"content-type": "application/json"}, timeout=30, **kw)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]
