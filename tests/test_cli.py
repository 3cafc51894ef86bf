"""The `ossie` command line, run as a user would."""

import subprocess
import sys

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
