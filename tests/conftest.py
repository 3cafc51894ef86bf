import os
import tempfile

import pytest

from ossie.backends.cpu_kernels import PATHS
from ossie.model.config import PRESETS
from ossie.synth import write_checkpoint

# Tests never touch the network or the user's cache: the vocabulary is rebuilt offline into a temp dir.
os.environ["OSSIE_OFFLINE"] = "1"
os.environ.setdefault("OSSIE_CACHE_DIR", tempfile.mkdtemp(prefix="ossie-cache-"))
os.environ.pop("TIKTOKEN_ENCODINGS_BASE", None)

# tiny preset: 4 layers (2 sliding, 2 full), GQA 8 query / 2 KV heads, top-2 of 8 experts, real vocabulary.
TINY = PRESETS["tiny"]


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory):
    """A repo-like folder: HF layout at the root, original layout under original/, same weights."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), TINY, "both", seed=1, progress=False)


@pytest.fixture(scope="session")
def tiny_llm(tiny_repo):
    import ossie

    return ossie.LLM(tiny_repo, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def server(tiny_repo):
    """`ossie serve` on the tiny checkpoint (one per test module), whose log must show no traceback at the end."""
    from tests.helpers.server import Server

    s = Server(tiny_repo)
    yield s
    log = s.stop()
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def scripted(tiny_repo, tmp_path_factory):
    """`ossie serve` whose runner replays tests/helpers/server.py's SCRIPT (scripted completions of known shapes)."""
    import json

    from tests.helpers.server import SCRIPT, Server

    path = tmp_path_factory.mktemp("script") / "script.json"
    path.write_text(json.dumps(SCRIPT))
    s = Server(tiny_repo, script=path)
    yield s
    log = s.stop()
    assert "Traceback" not in log, log


@pytest.fixture(params=PATHS)
def path(request):
    """Each code path of ossie's C kernels this CPU has, in turn (the others are skipped)."""
    from ossie.backends import cpu_kernels as kernels

    before = kernels.kernel_path()  # the best, or what OSSIE_CPU_PATH chose
    kernels.set_path(request.param)
    if kernels.kernel_path() != request.param:
        kernels.set_path(before)
        pytest.skip(f"this CPU has no {request.param}")
    yield request.param
    kernels.set_path(before)
