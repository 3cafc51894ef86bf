"""The built-in tools: the python sandbox's escapes, the browser's pages and refusals, and the chat loop that runs
them between rounds of scripted completions. Nothing here reaches the internet."""

import http.server
import os
import socket
import threading
import time

import pytest
from openai_harmony import Author, Conversation, Message, Role

from ossie.chat import harmony
from ossie.tokenizer import harmony_encoding
from ossie.tools import BrowserTool, BuiltinTools, Limits, LocalBackend, PythonTool, SandboxUnavailable, ToolSettings
from ossie.tools import python as python_tool
from ossie.tools.browser import BrowserError, check_url
from tests.helpers import use_runner
from tests.scripted import ScriptedRunner

FAST = Limits(timeout_s=3)


@pytest.fixture(scope="module")
def py():
    with PythonTool(FAST) as tool:
        yield tool


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_python_output_value_and_traceback(py):
    assert py.run("print(2**100)") == "1267650600228229401496703205376\n"
    assert py.run("y = 6\ny * 7") == "42\n"  # a last expression shows its value, as in a notebook
    assert py.run("None") == ""
    out = py.run("def f():\n    return 1 / 0\nf()")
    assert out.startswith("Traceback") and "ZeroDivisionError: division by zero" in out
    assert "_repl" not in out  # the model sees its own code's frames only
    assert py.run("import os; os.write(1, b'raw '); import subprocess; subprocess.run(['echo', 'child'])"
                  " and None") == "raw child\n"


def test_python_state_persists_within_a_session_and_not_across():
    with PythonTool(FAST) as a, PythonTool(FAST) as b:
        assert a.run("x = 5") == ""
        assert a.run("x * 2") == "10\n"
        assert "NameError" in b.run("x")


def test_python_long_output_is_cut_with_a_note(py):
    out = py.run("print('a' * 50_000)")
    assert len(out) < 17_000 and out.endswith("[... output truncated: 50,001 characters in all, the first 16,000 "
                                              "shown]")


def test_python_sees_no_hidden_files_and_writes_only_its_scratch(py, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    assert "FileNotFoundError" in py.run(f"open({str(secret)!r}).read()")  # the host's /tmp is not there
    assert "FileNotFoundError" in py.run("open('/root/.bash_history')")  # nor are home folders
    assert py.run("open('/etc/ossie-test', 'w')").startswith("Traceback")  # /etc: read-only or not its own
    assert "Read-only file system" in py.run("open('/usr/ossie-test', 'w')")
    assert py.run(f"open({str(tmp_path / 'out.txt')!r}, 'w')").startswith("Traceback")
    assert not (tmp_path / "out.txt").exists()
    assert py.run("open('/mnt/data/kept.txt', 'w').write('hello')") == "5\n"
    with open(os.path.join(py.scratch, "kept.txt")) as f:
        assert f.read() == "hello"
    assert py.run("import os; os.getcwd()") == "'/mnt/data'\n"


def test_python_has_no_network(py):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        out = py.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        assert "ConnectionRefusedError" in out  # the sandbox's own loopback, where nothing listens
        assert "Error" in py.run("socket.create_connection(('1.1.1.1', 80), timeout=2)")
    finally:
        server.close()


def test_python_fork_bomb_is_contained(py):
    out = py.run("import os\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            import time\n"
                 "            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n"
                 "    print('stopped after', n, type(e).__name__)")
    assert out.startswith("stopped after") and "BlockingIOError" in out
    assert int(out.split()[2]) < python_tool.Limits().processes
    assert py.run("1 + 1") == "2\n"


def test_python_endless_loop_is_killed_and_nothing_is_left():
    with PythonTool(Limits(timeout_s=1.5)) as tool:
        tool.run("import subprocess; child = subprocess.Popen(['sleep', '300'])")
        pids = [tool._proc.pid]
        t0 = time.monotonic()
        out = tool.run("x = 1\nwhile True: pass")
        assert time.monotonic() - t0 < 5
        assert out.startswith("Execution timed out after 1.5 seconds") and "variables and imports are gone" in out
        assert not alive(pids[0])
        assert "NameError" in tool.run("x")  # a fresh interpreter
        pids.append(tool._proc.pid)
        scratch = tool.scratch
    assert not any(alive(p) for p in pids)
    assert not os.path.exists(scratch)
    # the sandbox's PID namespace dies with it, and the kernel takes what ran inside down after it (asynchronously:
    # the child's /proc entry can outlive the sandbox by a while; twice in a full CI run on a 2-core machine it
    # outlived a 5 s wait, never once alone in 10 tries, loaded or not); a child that survived would stay 300 s
    deadline = time.monotonic() + 30
    while (leftover := [d for d in os.listdir("/proc") if d.isdigit() and "sleep\x00300" in _cmdline(d)]) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftover == [], [_status(d) for d in leftover]


def _status(pid: str) -> str:
    """A process's state and parent, as /proc says (what a failure above should show)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return " ".join(line.strip() for line in f if line.startswith(("State:", "PPid:", "NSpid:")))
    except OSError:
        return f"{pid}: gone"


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:
        return ""


def test_python_memory_limit(py):
    assert "MemoryError" in py.run("b = bytearray(16 << 30)")
    assert py.run("'still here'") == "'still here'\n"


def test_python_exit_restarts_the_interpreter(py):
    assert "exited (exit code 3)" in py.run("import os; os._exit(3)")
    assert py.run("2 + 2") == "4\n"


def test_python_without_a_sandbox_runs_nothing(monkeypatch):
    monkeypatch.setattr(python_tool, "find_bwrap", lambda: None)
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        PythonTool()
    monkeypatch.setattr(python_tool, "find_bwrap", lambda: "/bin/false")  # a bwrap that cannot start
    with pytest.raises(SandboxUnavailable, match="did not start"):
        PythonTool()
    with PythonTool(dangerously_unsandboxed=True) as tool:  # the loud opt-in
        assert tool.run("21 * 2") == "42\n"


def test_a_sandbox_that_dies_at_once_is_always_said_so(monkeypatch, tmp_path):
    """A container without user namespaces: bwrap exits before the interpreter reads a line. Closing the pipe it
    left then raised BrokenPipeError (2 of 15 tries) instead of SandboxUnavailable."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(python_tool, "find_bwrap", lambda: str(fake))
    for _ in range(20):
        with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace"):
            PythonTool()


def test_python_sees_only_what_it_needs_of_etc(py):
    listed = py.run("import os; sorted(os.listdir('/etc'))")
    assert set(eval(listed)) <= {*python_tool.ETC, "passwd", "group"}, listed  # no pip.conf, no host settings
    assert py.run("print(open('/etc/passwd').read())").split() == python_tool.PASSWD.split()  # no host users
    if os.geteuid() == 0:  # it runs as nobody, whom its own passwd names
        assert py.run("import pwd; pwd.getpwuid(os.getuid()).pw_name") == "'nobody'\n"


def test_python_cannot_make_a_user_namespace(py):
    code = ("import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
            "(libc.unshare(0x10000000), os.strerror(ctypes.get_errno()))")
    assert py.run(code) == "(-1, 'Operation not permitted')\n"
    if os.path.exists("/usr/bin/unshare"):  # util-linux's, as a shell user would try it
        out = py.run("import subprocess; subprocess.run(['unshare', '-U', 'true'], capture_output=True).returncode")
        assert out != "0\n", out
    assert py.run("import os; os.fork() or os._exit(0); 'forked'") == "'forked'\n"  # plain processes still work


def test_the_interpreter_source_is_not_on_any_command_line(py):
    py.run("1")
    seen = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                seen.append(f.read())
        except OSError:
            pass
    assert any(b"/ossie/repl.py" in line for line in seen)  # the sandbox's interpreter is there, by its file
    assert not any(b"def drop_privileges" in line for line in seen)


# ---- browser ----------------------------------------------------------------------------------------------

PAGES = {
    "https://tides.example/": "<html><head><title>Tides explained</title></head><body><h1>Tides</h1>"
                              "<p>Tides are caused by the Moon's gravity.</p><p>See <a href='/moon'>the Moon</a>"
                              " and <a href='https://en.wikipedia.org/wiki/Tide_(disambiguation)'>more</a>.</p>"
                              + "".join(f"<p>Filler paragraph {i} about the sea.</p>" for i in range(300))
                              + "<p>Spring tides happen at full and new moon.</p></body></html>",
    "https://tides.example/moon": "<html><title>The Moon</title><body><p>The Moon orbits the Earth every 27.3 "
                                  "days.</p></body></html>",
    "https://notes.example/plain.txt": "plain text\nabout nothing",
}


def test_browser_search_open_find_and_citations():
    b = BrowserTool(LocalBackend(PAGES))
    shown = b.call("search", '{"query": "moon tides", "topn": 5}')
    assert shown.startswith("[0] Search results for `moon tides`\n**viewing lines [0 - ")
    assert "【0†Tides explained†tides.example】" in shown and "【1†The Moon†tides.example】" in shown
    page = b.call("open", '{"id": 0}')
    assert page.startswith("[1] Tides explained\n(https://tides.example/)\n**viewing lines [0 - ")
    assert "L2: Tides are caused by the Moon's gravity." in page
    assert "See 【0†the Moon†tides.example】 and 【1†more†en.wikipedia.org】." in page
    assert b.pages[1].links[1].url == "https://en.wikipedia.org/wiki/Tide_(disambiguation)"
    assert "Spring tides" not in page  # beyond the first window of ~1,024 tokens
    last = int(page.split("**viewing lines [0 - ")[1].split("]")[0])
    tokens = len(harmony_encoding().encode(page, disallowed_special=()))
    assert 900 < tokens < 1300 and last < 606
    found = b.call("find", '{"pattern": "SPRING TIDES"}')
    assert found.startswith("[2] Find results for text: `SPRING TIDES` in `Tides explained`")
    assert "【0†match at L606】" in found
    at_match = b.call("open", '{"id": 0}')
    assert at_match.startswith("[3] Tides explained") and "L606: Spring tides happen at full and new moon." in at_match
    moon = b.call("open", '{"id": 0, "cursor": 1}')
    assert moon.startswith("[4] The Moon\n(https://tides.example/moon)") and "27.3 days" in moon
    scrolled = b.call("open", '{"cursor": 1, "loc": 100, "num_lines": 3}')
    assert "**viewing lines [100 - 102] of 606**" in scrolled and scrolled.count("\nL") == 3
    text = "Tides follow the Moon【1†L2-L4】, twice a month strongly【3†L606】; see also【0†L1】."
    cites = b.citations(text)
    assert [(text[c.start:c.end], c.url, c.title) for c in cites] == [
        ("【1†L2-L4】", "https://tides.example/", "Tides explained"),
        ("【3†L606】", "https://tides.example/", "Tides explained")]  # cursor 0 is a search page: no URL
    assert b.call("open", '{"id": "https://notes.example/plain.txt"}').endswith("L0: plain text\nL1: about nothing")


def test_browser_errors_are_messages_for_the_model():
    b = BrowserTool(LocalBackend(PAGES))
    assert b.call("open", '{"id": 3}') == "Error: no page is open yet: search or open a URL first"
    b.call("search", '{"query": "moon"}')
    assert b.call("open", '{"id": 9}') == "Error: no link 9 on page [0]"
    assert b.call("find", '{"pattern": "x"}').startswith("Error: find works on an opened page")
    assert b.call("open", '{"cursor": 7}').startswith("Error: no page at cursor 7")
    assert b.call("scroll", "{}").startswith("Error: the browser has no function 'scroll'")
    assert b.call("search", "{not json").startswith("Error: the arguments are not valid JSON")
    assert b.call("search", '{"q": "x"}').startswith("Error: bad arguments for browser.search")
    assert b.call("open", '{"id": "file:///etc/passwd"}') == ("Error: cannot open 'file:///etc/passwd': only http "
                                                             "and https URLs can be opened")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/", "http://localhost/admin", "http://10.1.2.3/",
                                 "http://169.254.169.254/latest/meta-data/", "http://[::1]/", "http://192.168.0.1/",
                                 "http://0.0.0.0:22/"])
def test_browser_refuses_local_and_private_addresses(url):
    with pytest.raises(BrowserError, match="local or private address"):
        check_url(url)


@pytest.fixture
def local_site():
    """A web server on 127.0.0.1 with a page and a redirect to it."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/page")
                self.end_headers()
                return
            body = b"<html><title>Local page</title><body><p>served on loopback</p></body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_browser_on_a_local_server_only_when_allowed(local_site):
    refused = BrowserTool(LocalBackend({})).call("open", f'{{"id": "{local_site}/page"}}')
    assert refused.startswith("Error: cannot open") and "local or private address" in refused
    allowed = BrowserTool(LocalBackend({}), allow_private=True)
    page = allowed.call("open", f'{{"id": "{local_site}/redirect"}}')
    assert page.startswith(f"[0] Local page\n({local_site}/page)") and "served on loopback" in page


# ---- the chat loop ------------------------------------------------------------------------------------------

BIG = "1267650600228229401496703205376"


class Recording(ScriptedRunner):
    def __init__(self, runner, script):
        super().__init__(runner, script)
        self.prompts = []

    def _choose(self, prompt):
        self.prompts.append(list(prompt))
        return super()._choose(prompt)


@pytest.fixture
def scripted_llm(tiny_llm):
    real = tiny_llm.runner

    def use(script):
        return use_runner(tiny_llm, Recording(real, script))

    yield use
    use_runner(tiny_llm, real)


def test_chat_runs_python_and_answers(scripted_llm):
    llm = scripted_llm([
        "<|channel|>analysis<|message|>Compute it.<|end|><|start|>assistant<|channel|>analysis to=python code"
        "<|message|>print(2**100)<|call|>",
        {"match": BIG, "completion": f"<|channel|>final<|message|>It is {BIG}.<|return|>"}])
    messages = [{"role": "user", "content": "What is 2**100?"}]
    result = llm.chat(messages, builtin_tools=["python"], conversation_start_date="2026-11-27")
    assert result.content == f"It is {BIG}." and result.finish_reason == "stop" and not result.tool_calls
    [call] = result.builtin_calls
    assert (call.recipient, call.arguments, call.output) == ("python", "print(2**100)", BIG + "\n")
    # the second round's prompt is what harmony renders for the conversation with the call and its result
    first, second = llm.runner.prompts
    call_message = (Message.from_role_and_content(Role.ASSISTANT, "print(2**100)").with_channel("analysis")
                    .with_recipient("python").with_content_type("code"))
    conversation = harmony.build_conversation(messages, builtin_tools=["python"],
                                              conversation_start_date="2026-11-27")
    rendered = Conversation.from_messages(list(conversation.messages) + [
        Message.from_role_and_content(Role.ASSISTANT, "Compute it.").with_channel("analysis"), call_message,
        Message.from_author_and_content(Author.new(Role.TOOL, "python"), BIG + "\n").with_recipient("assistant")
        .with_channel("analysis")])
    expected = harmony_encoding().render_conversation_for_completion(rendered, Role.ASSISTANT)
    assert second == list(expected)
    assert second[:len(first) - 2] == first[:-2]  # the first prompt, less <|start|>assistant, is its prefix
    enc = harmony_encoding()
    generated = [enc.encode(t, allowed_special="all") for t in (
        "<|channel|>analysis<|message|>Compute it.<|end|><|start|>assistant<|channel|>analysis to=python code"
        "<|message|>print(2**100)<|call|>", f"<|channel|>final<|message|>It is {BIG}.<|return|>")]
    assert result.completion_tokens == sum(map(len, generated))


def test_chat_python_state_lasts_one_conversation(scripted_llm):
    script = ["<|channel|>analysis to=python code<|message|>x = 21<|call|>",
              {"match": "x = 21<|call|><|start|>python", "completion":
               "<|channel|>analysis to=python code<|message|>x * 2<|call|>"},
              {"match": "42\n<|end|>", "completion": "<|channel|>final<|message|>42<|return|>"},
              {"match": "NameError", "completion": "<|channel|>final<|message|>forgotten<|return|>"}]
    llm = scripted_llm(script)
    assert llm.chat([{"role": "user", "content": "go"}], builtin_tools=["python"]).content == "42"
    llm = scripted_llm(["<|channel|>analysis to=python code<|message|>x<|call|>", *script[3:]])
    assert llm.chat([{"role": "user", "content": "again"}], builtin_tools=["python"]).content == "forgotten"


def test_chat_browses_and_streams_calls_and_results(scripted_llm):
    llm = scripted_llm([
        '<|channel|>analysis to=browser.search code<|message|>{"query": "moon tides"}<|call|>',
        {"match": "Search results for", "completion":
         '<|channel|>analysis to=browser.open code<|message|>{"id": 0}<|call|>'},
        {"match": "(https://tides.example/)", "completion": "<|channel|>final<|message|>The Moon【1†L2】.<|return|>"}])
    browser = BrowserTool(LocalBackend(PAGES))
    deltas = list(llm.chat([{"role": "user", "content": "Why tides?"}], builtin_tools=[browser], stream=True))
    kinds = [d.kind for d in deltas if d.kind in ("builtin_call", "builtin_result")]
    assert kinds == ["builtin_call", "builtin_result", "builtin_call", "builtin_result"]
    calls = [(d.name, d.text) for d in deltas if d.kind == "builtin_call"]
    assert calls == [("browser.search", '{"query": "moon tides"}'), ("browser.open", '{"id": 0}')]
    result = deltas[-1].result
    assert result.content == "The Moon【1†L2】." and result.builtin_calls[1].output.startswith("[1] Tides explained")
    [cite] = browser.citations(result.content)
    assert cite.url == "https://tides.example/"
    assert browser.pages  # the caller's session stays open


def test_chat_stops_a_model_that_keeps_calling(scripted_llm):
    llm = scripted_llm(["<|channel|>analysis to=python code<|message|>1<|call|>"])
    result = llm.chat([{"role": "user", "content": "loop"}], builtin_tools=["python"],
                      tool_settings=ToolSettings(max_calls=3))
    outputs = [c.output for c in result.builtin_calls]
    assert outputs[:3] == ["1\n"] * 3 and "limit of 3 tool calls" in outputs[3]
    assert len(outputs) == 5 and outputs[4] is None  # the call after being told is not run: the answer ends
    assert any("past the limit" in w for w in result.warnings)


def test_chat_tool_calls_within_max_tokens(scripted_llm):
    llm = scripted_llm(["<|channel|>analysis to=python code<|message|>1<|call|>"])
    result = llm.chat([{"role": "user", "content": "loop"}], builtin_tools=["python"], max_tokens=40)
    assert result.finish_reason == "length" and result.completion_tokens <= 40


def test_builtin_tools_refuse_unknown_names():
    with pytest.raises(ValueError, match="unknown built-in tool"):
        BuiltinTools(["shell"])
    with BuiltinTools(["python"]) as tools:
        assert tools.run("browser.search", "{}") == "Error: there is no tool 'browser.search'"


def test_llm_chat_declares_what_harmony_declares(tiny_llm):
    ours = tiny_llm.render([{"role": "user", "content": "hi"}], builtin_tools=["browser", "python"],
                           conversation_start_date="2026-11-27")
    system = harmony.build_conversation([], builtin_tools=["browser", "python"],
                                        conversation_start_date="2026-11-27").messages[0].content[0]
    assert system.tools["browser"] and system.tools["python"]
    text = harmony_encoding().decode(ours)
    assert "namespace browser {" in text and "## python" in text


def test_search_backends_read_their_apis_answers(monkeypatch):
    """Exa's and You.com's answers (their documented shapes, served here by a fake httpx) as search results."""
    import httpx

    from ossie.tools import browser

    seen = []

    def fake(method):
        def call(url, **kw):
            seen.append((method, url, kw.get("headers"), kw.get("json") or kw.get("params")))
            if "exa" in url:
                body = {"results": [{"title": "Exa hit", "url": "https://a.example/", "text": "about a"}]}
            else:
                body = {"results": {"web": [{"title": "You hit", "url": "https://b.example/",
                                             "snippets": ["about", "b"]}], "news": []}}
            return httpx.Response(200, json=body, request=httpx.Request(method, url))
        return call

    monkeypatch.setattr(httpx, "post", fake("POST"))
    monkeypatch.setattr(httpx, "get", fake("GET"))
    monkeypatch.setenv("EXA_API_KEY", "k1")
    assert browser.ExaBackend().search("q", 3) == [browser.SearchResult("Exa hit", "https://a.example/", "about a")]
    assert seen[-1] == ("POST", "https://api.exa.ai/search", {"x-api-key": "k1"},
                        {"query": "q", "numResults": 3, "contents": {"text": {"maxCharacters": 400}}})
    assert browser.YouComBackend("k2").search("q", 2) == [
        browser.SearchResult("You hit", "https://b.example/", "about b")]
    assert seen[-1][:3] == ("GET", "https://api.ydc-index.io/v1/search", {"X-API-Key": "k2"})
    monkeypatch.delenv("EXA_API_KEY")
    monkeypatch.delenv("YDC_API_KEY", raising=False)
    with pytest.raises(ValueError, match="EXA_API_KEY"):
        browser.ExaBackend()
