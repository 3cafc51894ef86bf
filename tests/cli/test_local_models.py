"""`ossie list`, `ossie rm` and `ossie pull` over a Hugging Face cache made here (no network)."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def fake_cache(root: Path, repo: str, checkpoint: Path) -> Path:
    """The Hugging Face cache layout huggingface_hub writes: blobs by hash, a snapshot of links, refs/main."""
    base = root / ("models--" + repo.replace("/", "--"))
    revision = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = base / "snapshots" / revision
    for f in checkpoint.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            blob = base / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = snapshot / f.relative_to(checkpoint)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(revision)
    return snapshot


def ossie(*args, cache: Path, **env):
    return subprocess.run([sys.executable, "-m", "ossie", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "HF_HUB_CACHE": str(cache), **env})


def test_list_serve_path_and_rm(tiny_repo, tmp_path):
    cache = tmp_path / "hub"
    snapshot = fake_cache(cache, "openai/gpt-oss-20b", tiny_repo)
    shutil.copytree(tiny_repo, tmp_path / "not-gpt-oss-files")  # not in the cache: not listed
    out = ossie("list", cache=cache)
    assert out.returncode == 0, out.stderr
    (line,) = [row for row in out.stdout.splitlines() if "openai/gpt-oss-20b" in row]
    assert "hf+original" in line and str(snapshot) in line and "GB" in line
    # the Ollama-style name resolves to the cached snapshot with no network
    gen = ossie("generate", "gpt-oss:20b", "--prompt", "hi", "--max-tokens", "3", "--no-stream", cache=cache,
                HF_HUB_OFFLINE="1")
    assert gen.returncode == 0, gen.stderr
    out = ossie("rm", "gpt-oss:20b", cache=cache)
    assert out.returncode == 0 and "deleted gpt-oss:20b" in out.stdout, out.stderr
    assert "no gpt-oss model" in ossie("list", cache=cache).stdout
    again = ossie("rm", "gpt-oss:20b", cache=cache)
    assert again.returncode == 2 and again.stderr.strip().startswith("error:") and "not on this machine" in again.stderr


def test_pull_offline_says_what_to_do(tmp_path):
    out = ossie("pull", "gpt-oss:120b", cache=tmp_path / "hub", HF_HUB_OFFLINE="1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "hf download openai/gpt-oss-120b" in out.stderr


class FakeHub:
    """Just enough of the Hugging Face Hub's HTTP API for huggingface_hub to download a repo (HF_ENDPOINT points at
    it): the revision and tree listings, and files by /resolve/ with HEAD, ETags and ranges. `corrupt` serves a
    file with one byte changed under its true hash; `stall` sends half of a file and then waits for `release`."""

    COMMIT = "c0ffee" * 6 + "c0ff"

    def __init__(self, repo: str, checkpoint: Path, corrupt: str | None = None, stall: str | None = None,
                 drop: str | None = None):
        import http.server
        import threading

        self.repo, self.corrupt, self.stall, self.drop = repo, corrupt, stall, drop
        self.files = {str(f.relative_to(checkpoint)): f.read_bytes() for f in sorted(checkpoint.rglob("*"))
                      if f.is_file()}
        self.ranges: list[tuple[str, str | None]] = []  # (file, Range header) of each GET
        self.half_sent, self.release = threading.Event(), threading.Event()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_GET(self):
                hub.answer(self, body=True)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def lfs(name: str) -> bool:
        return name.endswith(".safetensors")

    def etag(self, name: str) -> str:
        data = self.files[name]
        if self.lfs(name):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def json(self, h, obj) -> None:
        import json

        body = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def answer(self, h, body: bool) -> None:
        from urllib.parse import unquote, urlsplit

        path = unquote(urlsplit(h.path).path)
        api = f"/api/models/{self.repo}/"
        if path.startswith(api + "revision/"):
            return self.json(h, {"id": self.repo, "sha": self.COMMIT, "siblings": [{"rfilename": n}
                                                                                   for n in self.files]})
        if path.startswith(api + "tree/"):
            return self.json(h, [{"type": "file", "path": n, "size": len(d), "oid": self.etag(n) if not self.lfs(n)
                                  else "0" * 40, **({"lfs": {"oid": self.etag(n), "size": len(d), "pointerSize": 132}}
                                                    if self.lfs(n) else {})} for n, d in self.files.items()])
        prefix = f"/{self.repo}/resolve/"
        if not path.startswith(prefix):
            h.send_error(404)
            return
        name = path[len(prefix):].split("/", 1)[1]
        data = self.files[name]
        if name == self.corrupt:
            data = bytes([data[0] ^ 1]) + data[1:]
        start = 0
        if body:
            self.ranges.append((name, h.headers.get("Range")))
            if h.headers.get("Range"):
                start = int(h.headers["Range"].split("=")[1].split("-")[0])
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", self.COMMIT)
        h.send_header("ETag", f'"{self.etag(name)}"')
        if self.lfs(name):
            h.send_header("X-Linked-Etag", f'"{self.etag(name)}"')
            h.send_header("X-Linked-Size", str(len(data)))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        if not body:
            return
        if name in (self.stall, self.drop) and not start:
            h.wfile.write(data[:len(data) // 2])
            h.wfile.flush()
            self.half_sent.set()
            if name == self.stall:
                self.release.wait(60)
            self.drop = None
            h.close_connection = True
            return
        h.wfile.write(data[start:])

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


def pull(hub: FakeHub, cache: Path, *args, **env) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", **env}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.Popen([sys.executable, "-m", "ossie", "pull", "gpt-oss:20b", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_pull_shows_progress_verifies_and_lists(tiny_repo, tmp_path):
    hub = FakeHub("openai/gpt-oss-20b", tiny_repo)
    try:
        out, err = pull(hub, tmp_path / "hub").communicate(timeout=120)
    finally:
        hub.close()
    assert "gpt-oss:20b: " in out and "Traceback" not in err, err
    snapshot = Path(out.split(": ", 1)[1].strip())
    assert (snapshot / "config.json").is_file() and not (snapshot / "original").exists()  # the hf layout only
    assert "verifying" in err and "100%" in err  # huggingface_hub's bars, then ossie's check of every file
    listed = ossie("list", cache=tmp_path / "hub")
    assert "openai/gpt-oss-20b" in listed.stdout and "hf" in listed.stdout


def test_pull_resumes_after_a_dropped_connection(tiny_repo, tmp_path):
    """The connection drops in the middle of the weights: huggingface_hub asks for the rest, not the whole file."""
    hub = FakeHub("openai/gpt-oss-20b", tiny_repo)
    weights = next(n for n in hub.files if n.startswith("model") and hub.lfs(n))
    hub.drop = weights
    try:
        out, err = pull(hub, tmp_path / "hub").communicate(timeout=120)
    finally:
        hub.close()
    assert "gpt-oss:20b: " in out, err
    ranges = [r for name, r in hub.ranges if name == weights]
    assert ranges[0] is None and len(ranges) == 2 and int(ranges[1].split("=")[1].rstrip("-")) > 0
    assert "verifying" in err  # and the file put together from two requests has the Hub's SHA-256


def test_pull_ctrl_c_leaves_at_once_and_cleans_up(tiny_repo, tmp_path):
    import signal
    import time

    cache = tmp_path / "hub"
    hub = FakeHub("openai/gpt-oss-20b", tiny_repo)
    hub.stall = next(n for n in hub.files if n.startswith("model") and hub.lfs(n))
    try:
        first = pull(hub, cache, HF_HUB_DOWNLOAD_TIMEOUT="120")  # it would wait on the stalled file
        assert hub.half_sent.wait(60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(f.stat().st_size for f in cache.rglob("*.incomplete")):
            time.sleep(0.1)
        t0 = time.monotonic()
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
        assert time.monotonic() - t0 < 10 and first.returncode == 130
        assert "interrupted: run `ossie pull` again" in err
        assert not list(cache.rglob("*.incomplete"))  # no partial file left to fill the disk
        assert any(f.name == "config.json" for f in cache.rglob("config.json"))  # what was complete stays
        hub.stall = None
        out, err = pull(hub, cache).communicate(timeout=120)
    finally:
        hub.close()
    assert "gpt-oss:20b: " in out, err


def test_pull_detects_a_corrupted_file(tiny_repo, tmp_path):
    cache = tmp_path / "hub"
    hub = FakeHub("openai/gpt-oss-20b", tiny_repo, corrupt="config.json")
    try:
        p = pull(hub, cache)
        out, err = p.communicate(timeout=120)
    finally:
        hub.close()
    assert p.returncode == 2 and "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert "config.json: the downloaded file is corrupted" in line and "pull again" in line
    assert not any(f.name == "config.json" for f in cache.rglob("config.json"))  # deleted: the next pull refetches
