"""The `ossie` command line, run as a user would."""

import re
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "ossie", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.mark.parametrize("sub", [[], ["synth"], ["bench"], ["serve"], ["chat"]])
def test_help(sub):
    out = run(*sub, "--help").stdout
    assert "usage: ossie" in out
    assert not re.search(r"ossie\.[a-z_]+\.", out), out  # defaults as values, not as Python names
    if sub == ["chat"]:
        for command in ("/effort", "/system", "/reset", "/save", "/load", "/bye"):
            assert command in out


def test_synth_then_bench(tmp_path):
    out = run("synth", str(tmp_path / "m"), "--preset", "tiny", "--layout", "original", "--seed", "3").stdout
    assert "original layout" in out
    assert (tmp_path / "m" / "model.safetensors").is_file()
    bench = run("bench", str(tmp_path / "m"), "--prompt-tokens", "8", "--gen-tokens", "4", "--runs", "2").stdout
    for word in ("load", "prefill", "decode", "peak RSS", "original layout", "roofline", "GB/s", "GFLOP/s",
                 "kernels: "):
        assert word in bench


def test_bench_reports_what_speculation_guessed(tmp_path):
    run("synth", str(tmp_path / "m"), "--preset", "tiny")
    out = run("bench", str(tmp_path / "m"), "--prompt-tokens", "8", "--gen-tokens", "24", "--runs", "2",
              "--speculative", "ngram").stdout
    line = next(x for x in out.splitlines() if x.startswith("speculation"))
    guessed, kept, per_step = re.search(r"ngram: (\d+) tokens guessed, (\d+) kept \(\d+%\); ([\d.]+) tokens a decode "
                                        r"step", line).groups()
    assert int(kept) <= int(guessed) and 1.0 <= float(per_step) <= 1 + 4  # at most 4 guesses and one token a step
    assert "speculation" not in run("bench", str(tmp_path / "m"), "--prompt-tokens", "8", "--gen-tokens", "4",
                                    "--runs", "1").stdout
    p = run("bench", str(tmp_path / "m"), "--depth", "16", "--speculative", "ngram", check=False)
    assert p.returncode == 2 and "--depth and --speculative" in p.stderr and "Traceback" not in p.stderr


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


class SlowClock:
    """torch.matmul at a fixed rate on a simulated clock: what bench's matmul probe sees on a CPU where the product
    is that fast (26.5 s for 32 x 2880 x 5760 in bf16 on a Zen 3 without AVX-512 BF16 is 40 MFLOP/s)."""

    def __init__(self, flop_s: float):
        self.flop_s, self.now, self.shapes = flop_s, 0.0, []

    def matmul(self, a, b):
        self.shapes.append((a.shape[0], a.shape[1], b.shape[1]))
        self.now += 2 * a.shape[0] * a.shape[1] * b.shape[1] / self.flop_s

    def perf_counter(self):
        return self.now


@pytest.mark.parametrize("flop_s", [40e6, 1e12])
def test_bench_matmul_probe_is_bounded(monkeypatch, flop_s):
    from ossie import bench

    clock = SlowClock(flop_s)
    monkeypatch.setattr(bench.torch, "matmul", clock.matmul)
    monkeypatch.setattr(bench.time, "perf_counter", clock.perf_counter)
    rate = bench.measure_matmul_flops(bench.torch.bfloat16, budget_s=2.0)
    assert clock.now <= 2.0 * 1.5, clock.shapes  # at most one product's overrun past the budget
    assert rate.flop_s == pytest.approx(flop_s)
    assert rate.shape == clock.shapes[-1]
    if flop_s > 1e9:  # a fast product reaches prefill's shape
        assert rate.shape == bench.PREFILL_SHAPE
    else:  # a pathological one stops at a small shape, and the report says so
        assert rate.shape[0] < bench.PREFILL_SHAPE[0]
        result = bench.BenchResult(load_s=0, flops_per_token=10**9, matmul=rate)
        assert "would take too long" in result._ceiling(1.0)


@pytest.mark.parametrize("args,flag", [
    (["serve", "--port", "99999"], "--port"), (["serve", "--port", "0"], "--port"),
    (["serve", "--max-running", "0"], "--max-running"), (["serve", "--request-timeout", "0"], "--request-timeout"),
    (["serve", "--max-body-mb", "-1"], "--max-body-mb"), (["generate", "--prompt", "x", "--max-tokens", "-1"],
                                                          "--max-tokens"),
    (["generate", "--prompt", "x", "--top-p", "0"], "--top-p"), (["bench", "--runs", "0"], "--runs"),
    (["chat", "--temperature", "-0.5"], "--temperature"), (["serve", "--kv-cache-gb", "-2"], "--kv-cache-gb"),
])
def test_bad_numbers_are_refused_before_the_model_loads(tmp_path, args, flag):
    """The model does not exist: an error about it would mean the model was looked for before the option was
    checked (a bad --port was a traceback after the load)."""
    command, *rest = args
    line = one_line_error(run(command, str(tmp_path / "no-such-model"), *rest, check=False))
    assert flag in line and "no-such-model" not in line


def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line_error(run("serve", str(tmp_path / "no-such-model"), "--port", str(port), check=False))
    assert f"cannot listen on 127.0.0.1:{port}" in line


@pytest.mark.parametrize("machine,path,says", [
    ("x86_64", "avx512bf16", "fastest CPU path"), ("x86_64", "avx2", "no AVX-512 BF16"),
    ("x86_64", "avxvnni", "AVX-VNNI int8"),
    ("x86_64", "scalar", "no AVX2 with FMA"), ("aarch64", "neon", "no SDOT"), ("aarch64", "dotprod", "no SMMLA"),
    ("aarch64", "i8mm", "SMMLA int8"),
    ("riscv64", "scalar", "portable C"),
])
def test_the_kernel_path_is_named_with_what_a_faster_one_needs(monkeypatch, machine, path, says):
    import platform

    from ossie.backends import cpu_kernels

    monkeypatch.delenv(cpu_kernels.PATH_ENV, raising=False)
    monkeypatch.setattr(cpu_kernels, "kernel_path", lambda: path)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    line = cpu_kernels.path_summary()
    assert line.startswith(f"kernels: {path} (") and says in line and "\n" not in line
    monkeypatch.setenv(cpu_kernels.PATH_ENV, "avx2")
    assert "forced by OSSIE_CPU_PATH=avx2" in cpu_kernels.path_summary()


@pytest.mark.parametrize("args,says", [
    (["--replicas", "0"], "argument --replicas: must be a number of replicas"),
    (["--replicas", "two"], "argument --replicas: must be a number of replicas"),
    (["--replicas", "2", "--ollama"], "--ollama cannot be used with --replicas"),
    (["--replicas", "auto", "--min-replicas", "3", "--max-replicas", "2"], "--min-replicas (3) is above"),
    (["--replicas", "auto", "--min-replicas", "0"], "--min-replicas must be"),
])
def test_bad_replica_options(tiny_repo, args, says):
    """Refused before Ray or the model is touched: exit 2 and the reason (argparse's usage line first for a value
    that is not a count)."""
    from tests.helpers.server import free_port

    p = run("serve", str(tiny_repo), "--port", str(free_port()), *args, check=False)
    assert p.returncode == 2 and says in p.stderr.strip().splitlines()[-1] and "Traceback" not in p.stderr, p.stderr
