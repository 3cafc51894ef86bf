"""The C kernels without Python: csrc/tests/kernels_test.c built with this machine's compiler and run on every
path this CPU has, and the ARM64 kernels cross-compiled and run under qemu for CPU models with and without each
extension (csrc/tests/qemu.sh). CI installs the cross compiler and qemu (.ci/run) and sets OSSIE_REQUIRE_QEMU, so
there the ARM64 check cannot be skipped."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ["tests/kernels_test.c", "kernels.c", "pool.c", "x86_avx2.c", "x86_avx2_attention.c", "x86_avx512.c",
           "x86_q8_prompts.c", "neon.c", "neon_attention.c", "prompt_attention.c"]


def test_every_native_path_against_the_scalar_path(tmp_path):
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (ossie then runs on its torch path)")
    exe = tmp_path / "kernels_test"
    subprocess.run([cc, "-O2", "-std=gnu11", "-ffp-contract=off", "-Wall", "-Werror", "-o", str(exe), *SOURCES,
                    "-lpthread", "-lm"], cwd=CSRC, check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
    lines = run.stdout.splitlines()
    assert lines[0].startswith("paths:") and lines[-1] == "0 mismatches"
    assert sum(line.endswith(" ok") for line in lines) >= 9  # the scalar path's own checks at least


@pytest.mark.skipif(sys.platform != "linux", reason="qemu-user runs Linux binaries")
def test_arm64_paths_under_qemu():
    tools = ["aarch64-linux-gnu-gcc", "qemu-aarch64"]
    if not all(shutil.which(t) for t in tools) and not os.environ.get("OSSIE_REQUIRE_QEMU"):
        pytest.skip("no ARM64 cross compiler or qemu-aarch64 (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    run = subprocess.run(["bash", str(CSRC / "tests" / "qemu.sh")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    expected = {"cortex-a53": ["neon"], "cortex-a76": ["neon", "dotprod"], "max": ["neon", "dotprod", "i8mm"]}
    for model, paths in expected.items():
        for path in paths:
            assert any(line.split()[:2] == [model, path] and line.endswith(", 0 mismatches")
                       for line in run.stdout.splitlines()), (model, path, run.stdout)
