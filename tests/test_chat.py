"""LLM.chat on the tiny model, the scripted tool-call flow, and the `ossie chat` / `ossie generate` CLI."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

import ossie
from tests.scripted import ScriptedRunner

REPO = Path(__file__).resolve().parents[1]

SCRIPT = [
    "<|channel|>analysis<|message|>User wants weather. Call the tool.<|end|><|start|>assistant<|channel|>commentary "
    'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>',
    "<|channel|>analysis<|message|>Tool says 20.<|end|><|start|>assistant<|channel|>final<|message|>"
    "It is 20 degrees in Paris.<|return|>",
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def test_stream_adds_up_to_non_stream(tiny_llm):
    msgs = [{"role": "user", "content": "Say hi"}]
    full = tiny_llm.chat(msgs, max_tokens=40, temperature=0.0)
    parts = list(tiny_llm.chat(msgs, max_tokens=40, temperature=0.0, stream=True))
    final = parts[-1].result
    assert parts[-1].kind == "finish"
    assert "".join(p.text for p in parts if p.kind == "content") == full.content == final.content
    assert "".join(p.text for p in parts if p.kind == "reasoning") == full.reasoning
    assert full.finish_reason == final.finish_reason
    assert full.completion_tokens == 40 and full.prompt_tokens == len(tiny_llm.render(msgs))


def test_scripted_tool_round_trip(tiny_repo):
    llm = ossie.LLM(tiny_repo, dtype="float32", progress=False)
    llm.runner = ScriptedRunner(llm.runner, SCRIPT)
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = llm.chat(msgs, tools=TOOLS)
    assert r.finish_reason == "tool_calls" and r.content == ""
    assert r.reasoning == "User wants weather. Call the tool."
    assert [(c.name, json.loads(c.arguments)) for c in r.tool_calls] == [("get_weather", {"city": "Paris"})]
    msgs += [{"role": "assistant", "reasoning_content": r.reasoning,
              "tool_calls": [{"id": r.tool_calls[0].id, "type": "function",
                              "function": {"name": "get_weather", "arguments": r.tool_calls[0].arguments}}]},
             {"role": "tool", "tool_call_id": r.tool_calls[0].id, "content": '{"temp": 20}'}]
    r2 = llm.chat(msgs, tools=TOOLS)
    assert (r2.content, r2.finish_reason, r2.tool_calls) == ("It is 20 degrees in Paris.", "stop", [])


def test_generate_command_json(tiny_repo):
    p = subprocess.run([sys.executable, "-m", "ossie", "generate", str(tiny_repo), "--prompt", "hi",
                        "--max-tokens", "12", "--temperature", "0", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 12


def spawn_chat(repo, *extra, script=None):
    """`ossie chat` in a pseudo-terminal; with `script`, its runner replays that script (tests/scripted.py)."""
    import os

    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb"}
    command = ["-m", "tests.scripted_main", str(script)] if script else ["-m", "ossie"]
    # Ctrl-C as at a terminal: a runner started in the background by a non-interactive shell ignores SIGINT, and
    # an ignored signal stays ignored across exec (Python then installs no KeyboardInterrupt handler)
    child = pexpect.spawn(sys.executable, [*command, "chat", str(repo), *extra], env=env, cwd=str(REPO),
                          encoding="utf-8", timeout=120, dimensions=(40, 200),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect("ossie chat")
    child.expect(">>> ")
    return child


def test_chat_cli_commands_multiline_and_ctrl_c(tiny_repo, tmp_path):
    child = spawn_chat(tiny_repo, "--max-tokens", "16", "--seed", "1")
    child.sendline("/effort high")
    child.expect("reasoning effort: high")
    child.expect(">>> ")
    child.sendline("hello")
    child.expect(r"16 tokens \(\d+ reasoning\), [\d.]+ tok/s, prompt \d+ tokens( \(\d+ cached\))?, finish: length")
    child.expect(">>> ")
    child.sendline('"""')
    child.expect(r"\.\.\. ")
    child.sendline("line one")
    child.sendline('line two"""')
    child.expect("tok/s")
    child.expect(">>> ")
    child.sendline("/system Be brief.")
    child.expect("instructions set")
    child.sendline(f"/save {tmp_path / 'conv.json'}")
    child.expect("saved 4 messages")
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    saved = json.loads((tmp_path / "conv.json").read_text())
    assert saved["reasoning_effort"] == "high" and saved["system"] == "Be brief."
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    assert saved["messages"][2]["content"] == "line one\nline two"


def test_chat_cli_ctrl_c_stops_the_answer_not_the_chat(tiny_repo):
    child = spawn_chat(tiny_repo, "--max-tokens", "0")  # unbounded: only Ctrl-C ends this answer
    child.sendline("tell me everything")
    child.expect(pexpect.TIMEOUT, timeout=3)
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)


@pytest.mark.parametrize("hide", [False, True])
def test_chat_cli_tool_call_asks_for_result(tiny_repo, tmp_path, hide):
    (tmp_path / "script.json").write_text(json.dumps(SCRIPT))
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    extra = ["--tools", str(tmp_path / "tools.json")] + (["--no-reasoning"] if hide else [])
    child = spawn_chat(tiny_repo, *extra, script=tmp_path / "script.json")
    child.sendline("Weather in Paris?")
    before = ""
    child.expect(r'tool call: get_weather\({"city": "Paris"}\)')
    before += child.before
    child.expect("result of get_weather> ")
    child.sendline('{"temp": 20}')
    child.expect("It is 20 degrees in Paris.")
    before += child.before
    child.expect("finish: stop")
    assert ("User wants weather" in before) != hide  # reasoning shown unless --no-reasoning
    assert "<|" not in before and "to=functions" not in before
    child.sendline(f"/save {tmp_path / 'c.json'}")
    child.expect("saved")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    msgs = json.loads((tmp_path / "c.json").read_text())["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
    assert msgs[2]["tool_call_id"] == msgs[1]["tool_calls"][0]["id"]
