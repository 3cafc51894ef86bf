"""The README's commands run as written after the README's install (the tiny checkpoint's; the 20b's need 13.8 GB
and minutes, so they are left to `ossie synth --preset 20b` by hand)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def try_it_commands() -> list[str]:
    text = README.read_text()
    block = re.search(r"## Try it\n.*?```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("ossie ")]
    assert len(commands) >= 4, commands
    return commands


def test_try_it_commands_work_as_written(tmp_path):
    import shlex

    ran = []
    for command in try_it_commands():
        if "20b" in command:
            continue
        argv = shlex.split(command)
        p = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600, stdin=subprocess.DEVNULL)
        assert p.returncode == 0 and "Traceback" not in p.stderr, (command, p.stderr[-2000:])
        ran.append(argv[1])
        if "--max-tokens" in argv:  # every generating example says how much it generates
            assert int(argv[argv.index("--max-tokens") + 1]) <= 256
        else:
            assert argv[1] not in ("generate", "chat"), f"{command}: give it a --max-tokens"
    assert {"synth", "generate", "chat"} <= set(ran)
