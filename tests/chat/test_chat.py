"""LLM.chat on the tiny model, the scripted tool-call flow, and the `ossie chat` / `ossie generate` CLI."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

import ossie
from tests.helpers import use_runner
from tests.scripted import ScriptedRunner

REPO = Path(__file__).resolve().parents[2]

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
    use_runner(llm, ScriptedRunner(llm.runner, SCRIPT))
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


def spawn_chat(repo, *extra, script=None, env=None):
    """`ossie chat` in a pseudo-terminal; with `script`, its runner replays that script (tests/scripted.py)."""
    import os

    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", **(env or {})}
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


def test_chat_cli_ctrl_c_stops_the_answer_not_the_chat(tiny_repo, tmp_path):
    # a long answer paced at 20 tokens a second: a sampled one may end by chance before the Ctrl-C comes
    long_answer = "<|channel|>final<|message|>" + "word " * 2000 + "<|return|>"
    (tmp_path / "script.json").write_text(json.dumps([long_answer]))
    child = spawn_chat(tiny_repo, "--max-tokens", "0", script=tmp_path / "script.json",
                       env={"OSSIE_TEST_SECONDS_PER_TOKEN": "0.05"})  # unbounded: only Ctrl-C ends this answer
    child.sendline("tell me everything")
    child.expect("word word")
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


def test_chat_cli_line_editing_and_history(tiny_repo, tmp_path):
    """On a real terminal the line is edited (arrow keys move the cursor; escape codes never reach the model) and
    the history is kept between runs, in ossie's cache folder."""
    import os

    env = {**os.environ, "NO_COLOR": "1", "TERM": "xterm-256color", "OSSIE_CACHE_DIR": str(tmp_path)}

    def chat():
        child = pexpect.spawn(sys.executable, ["-m", "ossie", "chat", str(tiny_repo), "--max-tokens", "4"], env=env,
                              cwd=str(REPO), encoding="utf-8", timeout=120, dimensions=(40, 200))
        child.expect("ossie chat")
        child.expect(">>>")
        return child

    child = chat()
    child.send("/effort lo\x1b[D\x1b[Cw\r")  # left, right, then "w": "/effort low"
    child.expect("reasoning effort: low")
    child.expect(">>>")
    child.sendeof()
    child.expect(pexpect.EOF)
    assert "/effort low" in (tmp_path / "chat_history").read_text()
    child = chat()
    child.send("\x1b[A\r")  # up: the last line of the previous run
    child.expect("reasoning effort: low")
    child.expect(">>>")
    child.send('"""first line\r')  # a multi-line message: one entry in the history, recalled whole
    child.expect(r"\.\.\.")
    child.send('second line"""\r')
    child.expect("tok/s")
    child.expect(">>>")
    child.sendeof()
    child.expect(pexpect.EOF)
    child = chat()
    child.send("\x1b[A\r")  # up: the whole message, both lines
    child.expect("tok/s")
    child.expect(">>>")
    child.send(f"/save {tmp_path / 'recalled.json'}\r")
    child.expect("saved 2 messages")
    child.expect(">>>")  # Ctrl-D before the prompt is up reaches no one
    child.sendeof()
    child.expect(pexpect.EOF)
    saved = json.loads((tmp_path / "recalled.json").read_text())
    assert saved["messages"][0] == {"role": "user", "content": "first line\nsecond line"}
    history = (tmp_path / "chat_history").read_text()
    assert '+"""first line\n+second line"""' in history and '\n+"""first line\n\n' not in history


def test_chat_cli_says_what_is_wrong_and_goes_on(tiny_repo, tmp_path):
    child = spawn_chat(tiny_repo, "--max-tokens", "8", "--seed", "2")
    child.sendline("/effort extreme")
    child.expect("takes low, medium or high")
    child.sendline("/effort")
    child.expect("reasoning effort: medium")
    child.sendline("/frobnicate")
    child.expect("unknown command /frobnicate")
    child.sendline(f"/save {tmp_path}/no/such/folder/conv.json")
    child.expect("cannot save to")
    child.sendline('"""one line"""')
    child.expect("tok/s")
    child.sendline(f"/save {tmp_path / 'conv.json'}")
    child.expect("saved 2 messages")
    child.sendline("/reset")
    child.sendline("/load /no/such/file.json")
    child.expect("cannot load")
    child.sendline(f"/load {tmp_path / 'conv.json'}")
    child.expect("loaded 2 messages")
    child.sendline(f"/save {tmp_path / 'again.json'}")
    child.expect("saved 2 messages")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    saved = json.loads((tmp_path / "again.json").read_text())
    assert saved["messages"][0] == {"role": "user", "content": "one line"}


def test_chat_cli_random_checkpoint_notice(tiny_repo):
    child = spawn_chat(tiny_repo)
    assert "random synthetic checkpoint" in child.before
    child.sendeof()
    child.expect(pexpect.EOF)


def test_generate_streams_what_no_stream_prints_at_once(tiny_repo):
    """`ossie generate` streams the answer by default; --no-stream prints the same text once it is complete (the
    tiny model writes no harmony header: its text is streamed as it comes all the same)."""
    base = [sys.executable, "-m", "ossie", "generate", str(tiny_repo), "--prompt", "hi", "--max-tokens", "24",
            "--temperature", "0"]
    streamed = subprocess.run(base, capture_output=True, text=True, timeout=300)
    whole = subprocess.run([*base, "--no-stream"], capture_output=True, text=True, timeout=300)
    assert streamed.returncode == whole.returncode == 0, (streamed.stderr, whole.stderr)
    assert streamed.stdout == whole.stdout and streamed.stdout.strip()


TOOL_SCRIPT = [
    {"match": "set x", "completion": "<|channel|>analysis to=python code<|message|>x = 6 * 7<|call|>"},
    {"match": "<|start|>python to=assistant<|channel|>analysis<|message|><|end|>",
     "completion": "<|channel|>final<|message|>x is set<|return|>"},
    {"match": "show x", "completion": "<|channel|>analysis to=python code<|message|>x<|call|>"},
    {"match": "<|message|>42\n<|end|>", "completion": "<|channel|>final<|message|>x is 42<|return|>"},
    {"match": "NameError", "completion": "<|channel|>final<|message|>x is gone<|return|>"},
]


def test_chat_cli_runs_python_and_keeps_its_state_for_the_conversation(tiny_repo, tmp_path):
    script = tmp_path / "script.json"
    script.write_text(json.dumps(TOOL_SCRIPT))
    child = spawn_chat(tiny_repo, "--tools", "python", script=script)
    child.sendline("set x")
    child.expect("▸ python")
    child.expect("x = 6 \\* 7")
    child.expect("◂ python")
    child.expect("x is set")
    child.expect(">>> ")
    child.sendline("show x")  # the next turn: the same interpreter
    child.expect("◂ python")
    child.expect("42")
    child.expect("x is 42")
    child.expect(">>> ")
    child.sendline("/reset")  # a new conversation: a fresh interpreter
    child.expect("conversation cleared")
    child.sendline("show x")
    child.expect("NameError")
    child.expect("x is gone")
    child.expect(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)


def test_tool_options_fail_in_one_line(tiny_repo):
    for args, message in ((["--builtin-tools", "shell"], "error: --builtin-tools: unknown tool 'shell'"),
                          (["--tools", "python", "--python-timeout", "0"], "--python-timeout must be above 0"),
                          (["--builtin-tools", "browser", "--search-backend", "exa"], "EXA_API_KEY")):
        p = subprocess.run([sys.executable, "-m", "ossie", "generate", str(tiny_repo), "--prompt", "hi", *args],
                           capture_output=True, text=True, timeout=300,
                           env={k: v for k, v in __import__("os").environ.items() if k != "EXA_API_KEY"})
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
