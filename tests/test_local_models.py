"""`ossie list`, `ossie rm` and `ossie pull` over a Hugging Face cache made here (no network)."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
