"""`ossie serve` in a subprocess for the server tests, the scripted completions it can replay, and the small
things those tests share (the model name, tools, a client)."""

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    import openai

MODEL = "tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}

# scripted completions (the engine replays them instead of sampling), chosen by a marker in the prompt
SCRIPT = [
    {"match": "CALL-WEATHER", "completion":
        "<|channel|>analysis<|message|>The user wants the weather. I will call the tool.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"city": "Paris"}<|call|>'},
    {"match": "RECIPIENT-FIRST", "completion":
        ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Oslo"}<|call|>'},
    # the model wants a function the request does not allow: tool_choice must steer it to get_weather
    {"match": "WRONG-FUNCTION", "completion":
        "<|channel|>commentary to=functions.get_timezone <|constrain|>json<|message|>"
        '{"city": "Rome"}<|call|>'},
    {"match": "ANSWER", "completion":
        "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>"
        "It is sunny in Paris. STOP here<|return|>"},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO = Path(__file__).resolve().parents[2]


class Server:
    """`ossie serve` in a subprocess; with `script`, its runner replays that script (tests/scripted.py)."""

    def __init__(self, checkpoint, *args, script=None):
        self.port, self.args = free_port(), args
        self.url = f"http://127.0.0.1:{self.port}"
        command = ["-m", "tests.scripted_main", str(script)] if script else ["-m", "ossie"]
        # the log goes to a file: a pipe nobody reads until the end would fill up (access lines) and stall the server
        self.log_file = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, *command, "serve", str(checkpoint), "--port", str(self.port),
             "--served-model-name", MODEL, "--dtype", "float32", *args],
            cwd=REPO, stdout=self.log_file, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("ossie serve exited:\n" + self.log())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("ossie serve did not come up")

    def health(self) -> dict:
        """The engine's counters (with the server's key: without one, /health says only that it is alive)."""
        key = self.args[self.args.index("--api-key") + 1] if "--api-key" in self.args else None
        return httpx.get(self.url + "/health", headers={"authorization": f"Bearer {key}"} if key else {}).json()

    def log(self) -> str:
        self.log_file.seek(0)
        return self.log_file.read()

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.log()


def client(s: Server, **kw) -> "openai.OpenAI":
    import openai

    return openai.OpenAI(base_url=s.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def metrics(url: str, headers: dict | None = None) -> dict[str, float]:
    """A server's /metrics, read with prometheus_client's own parser: each sample's name (with its labels, if any,
    as name{k="v"}) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(url + "/metrics", headers=headers or {})
    assert r.status_code == 200, r.text
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def no_harmony(text: str | None) -> None:
    for marker in ("<|", "|>", "to=functions", "commentary", "<|constrain|>"):
        assert marker not in (text or ""), text


GOOD = {"model": MODEL, "messages": user("hi"), "max_tokens": 2}
