"""`ossie serve --builtin-tools python,browser`: the server runs the built-in tools between rounds of scripted
completions. Chat completions keep them out of tool_calls; the Responses API returns code_interpreter_call and
web_search_call items and their stream events, as OpenAI's does. The browser reads pages served from memory."""

import json
import os
import threading
import time

import httpx
import openai
import pytest

from tests.helpers.server import MODEL, Server
from tests.tools.test_tools import BIG, PAGES

SCRIPT = [
    {"match": "run some python", "completion": "<|channel|>analysis<|message|>Let me compute.<|end|><|start|>"
                                               "assistant<|channel|>analysis to=python code<|message|>"
                                               "print(2**100)<|call|>"},
    {"match": BIG, "completion": f"<|channel|>final<|message|>It is {BIG}.<|return|>"},
    {"match": "loop forever", "completion": "<|channel|>analysis to=python code<|message|>while True: pass<|call|>"},
    {"match": "Execution timed out", "completion": "<|channel|>final<|message|>too slow<|return|>"},
    {"match": "search the web", "completion": '<|channel|>analysis to=browser.search code<|message|>'
                                              '{"query": "moon tides"}<|call|>'},
    {"match": "Search results for", "completion": '<|channel|>analysis to=browser.open code<|message|>{"id": 0}'
                                                  '<|call|>'},
    {"match": "(https://tides.example/)", "completion": "<|channel|>final<|message|>The Moon pulls the sea"
                                                        "【1†L2】.<|return|>"},
]


@pytest.fixture(scope="module")
def tool_server(tiny_repo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools")
    (folder / "script.json").write_text(json.dumps(SCRIPT))
    (folder / "pages.json").write_text(json.dumps(PAGES))
    os.environ["OSSIE_TEST_PAGES"] = str(folder / "pages.json")
    try:
        s = Server(tiny_repo, "--builtin-tools", "python,browser", "--python-timeout", "2",
                   script=folder / "script.json")
    finally:
        del os.environ["OSSIE_TEST_PAGES"]
    yield s
    log = s.stop()
    assert "Traceback" not in log, log


def chat(server, text, **extra):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": [{"role": "user", "content": text}], **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_completions_run_python_out_of_tool_calls(tool_server):
    body = chat(tool_server, "run some python")
    message = body["choices"][0]["message"]
    assert message["content"] == f"It is {BIG}." and message.get("tool_calls") is None
    assert body["choices"][0]["finish_reason"] == "stop"
    assert message["reasoning_content"] == "Let me compute."
    assert body["usage"]["completion_tokens"] > 10


def test_chat_completions_stream_with_python(tool_server):
    with httpx.stream("POST", tool_server.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "run some python"}]}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == f"It is {BIG}."
    assert not any(d.get("tool_calls") for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_an_endless_loop_is_cut_and_the_server_still_answers(tool_server):
    seen = []

    def probe():
        time.sleep(0.5)
        t0 = time.monotonic()
        seen.append((httpx.get(tool_server.url + "/health", timeout=5).status_code, time.monotonic() - t0))

    t = threading.Thread(target=probe)
    t.start()
    body = chat(tool_server, "loop forever")
    t.join()
    assert body["choices"][0]["message"]["content"] == "too slow"
    assert seen and seen[0][0] == 200 and seen[0][1] < 1.0  # answered while the sandbox ran


def test_chat_completions_cite_what_the_browser_read(tool_server):
    message = chat(tool_server, "search the web")["choices"][0]["message"]
    text = "The Moon pulls the sea【1†L2】."
    assert message["content"] == text
    [annotation] = message["annotations"]
    assert annotation == {"type": "url_citation", "url_citation": {
        "start_index": text.index("【"), "end_index": len(text) - 1, "url": "https://tides.example/",
        "title": "Tides explained"}}


def test_responses_code_interpreter(tool_server):
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="x")
    response = client.responses.create(model=MODEL, input="run some python",
                                       tools=[{"type": "code_interpreter", "container": {"type": "auto"}}])
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "code_interpreter_call", "message"]
    call = response.output[1]
    assert call.code == "print(2**100)" and call.status == "completed"
    assert call.outputs[0].type == "logs" and call.outputs[0].logs == BIG + "\n"
    assert response.output_text == f"It is {BIG}."


def test_responses_code_interpreter_stream_events(tool_server):
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="x")
    events = list(client.responses.create(model=MODEL, input="run some python", stream=True,
                                          tools=[{"type": "code_interpreter", "container": {"type": "auto"}}]))
    kinds = [e.type for e in events]
    order = ["response.code_interpreter_call.in_progress", "response.code_interpreter_call_code.delta",
             "response.code_interpreter_call_code.done", "response.code_interpreter_call.interpreting",
             "response.code_interpreter_call.completed"]
    assert [k for k in kinds if k.startswith("response.code_interpreter")] == order
    done = [e for e in events if e.type == "response.output_item.done" and e.item.type == "code_interpreter_call"]
    assert done[0].item.outputs[0].logs == BIG + "\n"
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_web_search_and_citations(tool_server):
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="x")
    response = client.responses.create(model=MODEL, input="search the web", tools=[{"type": "web_search_preview"}])
    searches = [item for item in response.output if item.type == "web_search_call"]
    assert [s.action.type for s in searches] == ["search", "open_page"]
    assert searches[0].action.query == "moon tides" and searches[1].action.url == "https://tides.example/"
    message = response.output[-1]
    text = response.output_text
    [annotation] = message.content[0].annotations
    assert annotation.type == "url_citation" and annotation.url == "https://tides.example/"
    assert text[annotation.start_index:annotation.end_index] == "【1†L2】"
    stream = list(client.responses.create(model=MODEL, input="search the web", stream=True,
                                          tools=[{"type": "web_search"}]))
    kinds = [e.type for e in stream if e.type.startswith("response.web_search_call")]
    assert kinds == ["response.web_search_call.in_progress", "response.web_search_call.searching",
                     "response.web_search_call.completed"] * 2


def test_responses_tools_sent_back_are_accepted(tool_server):
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="x")
    first = client.responses.create(model=MODEL, input="run some python",
                                    tools=[{"type": "code_interpreter", "container": {"type": "auto"}}])
    items = [item.model_dump(exclude_none=True) for item in first.output]
    again = client.responses.create(model=MODEL, input=[{"role": "user", "content": "run some python"}, *items,
                                                        {"role": "user", "content": "run some python"}])
    assert again.status == "completed"


def test_a_server_without_builtin_tools_refuses_them(scripted):
    r = httpx.post(scripted.url + "/v1/responses", json={"model": MODEL, "input": "hi",
                                                         "tools": [{"type": "code_interpreter"}]})
    assert r.status_code == 400
    error = r.json()["error"]
    assert "--builtin-tools python" in error["message"] and error["param"] == "tools[0].type"


def test_ollama_chat_runs_them_too(tool_server):
    import ollama

    reply = ollama.Client(host=tool_server.url).chat(model=MODEL, think="low",
                                                     messages=[{"role": "user", "content": "run some python"}])
    assert reply.message.content == f"It is {BIG}." and not reply.message.tool_calls
    assert reply.message.thinking == "Let me compute."
