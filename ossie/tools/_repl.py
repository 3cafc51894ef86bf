"""The interpreter inside the python tool's sandbox: run as `python -I _repl.py`, it reads one JSON request per line
on stdin ({"code": ...}) and answers one JSON line ({"output": ...}) on the stdout it had at start. Code runs in one
namespace that lives as long as the process (the stateful notebook gpt-oss was trained with); what it prints,
whether through sys.stdout, os.write or a child process, goes to a file that becomes the output, followed by the
value of a last expression (as a notebook shows it) or the traceback.

This file runs under the sandbox's Python with nothing of ossie importable: standard library only.
"""

import ast
import json
import os
import resource
import sys
import tempfile
import traceback


def drop_privileges(uid: int) -> None:
    """Under a sandbox started by root: become an ordinary user, so that the process limit applies (the kernel
    exempts root from RLIMIT_NPROC) and nothing runs with root's rights."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def limit(memory_bytes: int, processes: int, cpu_seconds: int, file_bytes: int) -> None:
    for which, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_NPROC, processes),
                         (resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_FSIZE, file_bytes)):
        if value > 0:
            resource.setrlimit(which, (value, value))


def run(code: str, namespace: dict, out) -> str:
    """Execute code; what it printed (into the file `out`), then its last expression's value or its traceback."""
    out.seek(0)
    out.truncate()
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
    try:
        tree = ast.parse(code, "<python>")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<python>", "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<python>", "eval"), namespace)
            if value is not None:
                print(repr(value))
    except BaseException as e:  # the code's own errors, SystemExit and KeyboardInterrupt included
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != "<python>":
            tb = tb.tb_next  # leave out this file's frames: the model sees only its code's
        sys.stderr.write("".join(traceback.format_exception(type(e), e, tb)))
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # the code closed or replaced it
                pass
    out.seek(0)
    return out.read().decode("utf-8", errors="backslashreplace")


def main() -> None:
    settings = json.loads(sys.argv[1])
    if os.getuid() == 0 and settings.get("uid"):
        drop_privileges(settings["uid"])
    limit(settings["memory_bytes"], settings["processes"], settings["cpu_seconds"], settings["file_bytes"])
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    requests = os.fdopen(os.dup(0), "r")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the code reads an empty stdin, never the requests
    namespace = {"__name__": "__main__"}
    out = tempfile.TemporaryFile()
    for line in requests:
        output = run(json.loads(line)["code"], namespace, out)
        reply.write(json.dumps({"output": output}) + "\n")


if __name__ == "__main__":
    main()
