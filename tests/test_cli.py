"""The `ossie` command line, run as a user would."""

import subprocess
import sys
from pathlib import Path

import pytest


def run(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "ossie", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.mark.parametrize("sub", [[], ["synth"], ["bench"]])
def test_help(sub):
    out = run(*sub, "--help").stdout
    assert "usage: ossie" in out


def test_synth_then_bench(tmp_path):
    out = run("synth", str(tmp_path / "m"), "--preset", "tiny", "--layout", "original", "--seed", "3").stdout
    assert "original layout" in out
    assert (tmp_path / "m" / "model.safetensors").is_file()
    bench = run("bench", str(tmp_path / "m"), "--prompt-tokens", "8", "--gen-tokens", "4", "--runs", "2").stdout
    for word in ("load", "prefill", "decode", "peak RSS", "original layout", "roofline", "GB/s", "GFLOP/s"):
        assert word in bench


def test_bad_model_exit_code(tmp_path):
    p = run("bench", str(tmp_path / "missing"), check=False)
    assert p.returncode == 2 and "error:" in p.stderr and "Traceback" not in p.stderr


def test_version_answers_without_torch():
    """`ossie --version` and `--help` do not import torch (3.5 s before)."""
    p = subprocess.run([sys.executable, "-c", "import sys; from ossie.cli import main\n"
                        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
                        "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=60)
    assert p.stdout.split() == ["ossie", "0.1.0", "False"], p


def one_line_error(p) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr and lines[-1].startswith("error: "), p.stderr
    return lines[-1]


@pytest.mark.parametrize("threads", ["-1", "0", "100000"])
def test_bad_threads(tiny_repo, threads):
    assert "--threads" in one_line_error(run("generate", str(tiny_repo), "--prompt", "hi", "--threads", threads,
                                             check=False))


def test_cuda_without_a_gpu(tiny_repo):
    import torch

    if torch.cuda.is_available():  # this machine has one: the error this test checks cannot happen
        return
    assert "no CUDA GPU" in one_line_error(run("generate", str(tiny_repo), "--prompt", "hi", "--device", "cuda",
                                               check=False))


def test_config_value_of_the_wrong_type(tiny_repo, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_repo, bad, ignore=shutil.ignore_patterns("original"))
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hidden_size"] = "64"
    (bad / "config.json").write_text(json.dumps(cfg))
    line = one_line_error(run("generate", str(bad), "--prompt", "hi", check=False))
    assert "config.json" in line and "hidden_size" in line


def test_synth_to_a_file_or_a_full_disk(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert "not a folder" in one_line_error(run("synth", str(f), check=False))
    assert "cannot create" in one_line_error(run("synth", str(f / "sub"), check=False))
    # /dev/shm is memory: never 65 GB free here; and nothing is created before the check
    p = run("synth", "/dev/shm/ossie-synth-test/120b", "--preset", "120b", check=False)
    assert "GB free" in one_line_error(p)
    assert not Path("/dev/shm/ossie-synth-test").exists()
