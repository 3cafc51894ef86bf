"""The `ossie` command line: synth, bench, generate, chat, serve."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .defaults import DEFAULT_BUDGET_GB, NUM_SPECULATIVE_TOKENS, PREFILL_CHUNK

MODEL_HELP = "a local checkpoint folder, a Hugging Face repo id such as openai/gpt-oss-20b, or gpt-oss:20b"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--layout", choices=["hf", "original"], help="which layout to load when the folder has both")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="non-expert weight dtype")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--backend", default=None, choices=["auto", "cpu", "cuda", "torch"],  # = backends.BACKENDS
                   help="cpu: ossie's C kernels (the default on a CPU); cuda: its Triton kernels and CUDA graphs "
                        "(the default with --device cuda); torch: the reference ops (default: $OSSIE_KERNELS, "
                        "else auto)")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, metavar="N",
                   help="tokens computed per step: a prompt chunk, and in the server the budget of all requests "
                        f"together, decoding ones first (default {PREFILL_CHUNK})")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the KV of computed tokens so that a prompt that starts like an earlier one (a "
                        "conversation, an agent loop) computes only the rest (default: on)")
    p.add_argument("--kv-cache-gb", type=float, default=DEFAULT_BUDGET_GB, metavar="GB",
                   help="KV memory in GiB for the running requests and cached prefixes together (default: "
                        f"{DEFAULT_BUDGET_GB:g})")
    p.add_argument("--quantization", choices=["q8"], default=None,
                   help="q8: hold the attention projections and the unembedding in 8 bits (llama.cpp's q8_0), made "
                        "at load; decoding reads ~2.5 GB a token instead of ~3.7 (the 20b) at a small cost in "
                        "accuracy (CPU; default: exact, as the checkpoint is)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "q8"], default="auto",  # = engine_args.KV_CACHE_DTYPES
                   help="q8: cache keys and values in 8 bits (int8 and a float16 scale per 32; 13 KiB a token "
                        "for the 20b instead of 24), so that a 131,072-token context fits beside the 20b in 16 GiB, "
                        "at a small cost in accuracy (CPU; default auto: the model's dtype, exact)")


MAX_THREADS = 4096
INF = float("inf")
# Each numeric option's range, checked before anything loads (a bad --port was a traceback after a minute's load):
# dest -> (lowest, highest, whether the lowest itself is refused).
RANGES: dict[str, tuple[float, float, bool]] = {
    "threads": (1, MAX_THREADS, False), "prefill_chunk": (1, INF, False), "kv_cache_gb": (0, INF, False),
    "port": (1, 65535, False), "max_running": (1, INF, False), "max_queued": (0, INF, False),
    "prefill_while_decoding": (1, INF, False), "max_prompt_tokens": (1, INF, False),
    "num_speculative_tokens": (1, 64, False),
    "default_max_tokens": (1, INF, False), "request_timeout": (0, INF, True), "max_body_mb": (0, INF, True),
    "shutdown_timeout": (0, INF, False), "python_timeout": (0, INF, True), "max_tool_calls": (1, INF, False),
    "max_tokens": (0, INF, False), "temperature": (0, 2, False), "top_p": (0, 1, True),
    "prompt_tokens": (1, INF, False), "gen_tokens": (1, INF, False), "runs": (1, INF, False), "depth": (0, INF, False),
    "min_replicas": (1, INF, False), "max_replicas": (1, INF, False),
}


def check_ranges(args: argparse.Namespace) -> None:
    """ValueError naming the first option outside its range (RANGES)."""
    for dest, (low, high, strict) in RANGES.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if value < low or (strict and value == low) or value > high:
            flag = "--" + dest.replace("_", "-")
            above = f"above {low:g}" if strict else f"at least {low:g}"
            want = above if high == INF else f"{above} and at most {high:g}"
            raise ValueError(f"{flag} must be {want}, got {value:g}")


def load_llm(args: argparse.Namespace):
    """The model a command runs, loaded as its options say."""
    from dataclasses import asdict

    from .engine_args import EngineArgs
    from .llm import LLM

    options = asdict(EngineArgs.from_cli_args(args))
    return LLM(options.pop("model"), progress=sys.stderr.isatty(), **options)


def cmd_pull(args: argparse.Namespace) -> int:
    from .model.checkpoint import download, partial_downloads, repo_id

    repo, started = repo_id(args.model), time.time()

    def interrupted(*_: Any) -> None:
        # Ctrl-C: leave at once (a KeyboardInterrupt would wait for huggingface_hub's download threads, which
        # hold the exit until their sockets time out), deleting this pull's partial files: huggingface_hub
        # writes each download to a file of its own process, which a later pull would not take up.
        for f in partial_downloads(repo, since=started):
            f.unlink(missing_ok=True)
        print("\ninterrupted: run `ossie pull` again to finish (files already complete are kept)", file=sys.stderr,
              flush=True)
        os._exit(130)

    signal.signal(signal.SIGINT, interrupted)
    path = download(repo, args.layout, verify=True)
    print(f"{args.model}: {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .local_models import local_models

    models = local_models()
    if not models:
        print("no gpt-oss model on this machine yet: ossie pull gpt-oss:20b (or ossie synth DIR)")
        return 0
    rows = [("NAME", "LAYOUT", "SIZE", "PATH")] + [
        (m.repo, "+".join(m.layouts), f"{m.size / 1e9:.1f} GB", str(m.path)) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[3])
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from .local_models import remove

    freed = remove(args.model)
    print(f"deleted {args.model} ({freed / 1e9:.1f} GB freed)")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    import shutil

    from .model.config import PRESETS
    from .synth import checkpoint_bytes, write_checkpoint

    folder = Path(args.dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"cannot create {folder}: {existing} is not a folder")
    need, free = checkpoint_bytes(PRESETS[args.preset], args.layout), shutil.disk_usage(existing).free
    if need > free:  # checked first: 13.8 GB written and then a full disk is a poor way to find out
        raise ValueError(f"{folder}: the {args.preset} checkpoint needs {need / 1e9:.1f} GB, the disk has "
                         f"{free / 1e9:.1f} GB free")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {folder}: {e.strerror}") from None
    t0 = time.perf_counter()
    folder = write_checkpoint(args.dir, args.preset, args.layout, seed=args.seed)
    print(f"wrote a random gpt-oss-{args.preset} checkpoint ({args.layout} layout, seed {args.seed}) to {folder} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    if args.depth and args.speculative != "off":
        raise ValueError("--depth and --speculative cannot go together (speculating decodes go through the engine, "
                         "which reads the whole prompt at once)")
    llm = load_llm(args)
    res = run_bench(llm, args.prompt_tokens, args.gen_tokens, args.runs, depth=args.depth)
    print(res.report(llm, args.prompt_tokens, args.gen_tokens))
    return 0


def _add_speculative_args(p: argparse.ArgumentParser) -> None:
    """the commands that decode through the engine, and ossie bench (with speculation, its decodes go through the
    engine too and it reports the guesses; benchmarks/speculative.py measures what they cost and gain)"""
    p.add_argument("--speculative", choices=["off", "ngram"], default="off",  # = engine_args.SPECULATIVE
                   help="ngram: requests guess what follows from their own text (prompt lookup) and check the "
                        "guesses in one step where that pays; greedy output is the same token for token, sampled "
                        "output has the same distribution (default: off)")
    p.add_argument("--num-speculative-tokens", type=int, default=NUM_SPECULATIVE_TOKENS, metavar="N",
                   help=f"guesses a step checks at most for one request (default {NUM_SPECULATIVE_TOKENS})")


def _add_chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="instructions (the harmony developer message)")
    p.add_argument("--reasoning-effort", default="medium", choices=["low", "medium", "high"])
    p.add_argument("--tools", metavar="FILE.json|python,browser",
                   help="OpenAI function tool definitions (a JSON list), or built-in tools to run: python, browser "
                        "or both (as --builtin-tools)")
    _add_tool_args(p)
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per answer (default 4096; 0 = to the "
                                                                 "end of the context)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _add_tool_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--builtin-tools", metavar="python,browser", default=None,
                   help="run gpt-oss's built-in tools when the model calls them: python (a sandboxed stateful "
                        "interpreter), browser (web search and pages)")
    p.add_argument("--search-backend", choices=["exa", "you", "ddgs"], default=None,
                   help="the browser's search: exa ($EXA_API_KEY), you ($YDC_API_KEY) or ddgs (no key; pip install "
                        "ddgs) (default: the first whose key is set, else ddgs)")
    p.add_argument("--browser-allow-private", action="store_true",
                   help="let the browser open loopback and private-network addresses (off: a page cannot make "
                        "ossie read this machine's services)")
    p.add_argument("--python-timeout", type=float, default=120.0, metavar="S",
                   help="seconds a python tool call may run before its sandbox is killed (default 120)")
    p.add_argument("--max-tool-calls", type=int, default=32, metavar="N",
                   help="built-in tool calls one answer may make (default 32)")
    p.add_argument("--dangerously-run-python-unsandboxed", action="store_true",
                   help="run the model's python code as this user, with no sandbox, where bubblewrap cannot start "
                        "(DANGEROUS: the model's code can read and change your files and reach the network)")


def _builtin_tools(args: argparse.Namespace) -> tuple[list[str], Any]:
    """The built-in tools asked for (--builtin-tools, or --tools python,browser) and their settings, checked now:
    a sandbox that cannot start or a search backend without its key is a one-line error before loading."""
    from .tools import NAMES, TOOLS, Limits, ToolSettings

    spec = args.builtin_tools
    tools_arg = getattr(args, "tools", None)
    if tools_arg and all(n.strip() in NAMES for n in tools_arg.split(",")):
        spec, args.tools = ",".join(filter(None, [spec, tools_arg])), None
    names = list(dict.fromkeys(n.strip() for n in (spec or "").split(",") if n.strip()))
    for n in names:
        if n not in NAMES:
            raise ValueError(f"--builtin-tools: unknown tool {n!r} ({', '.join(NAMES)})")
    settings = ToolSettings(python=Limits(timeout_s=args.python_timeout),
                            dangerously_unsandboxed=args.dangerously_run_python_unsandboxed,
                            search_backend=args.search_backend, allow_private=args.browser_allow_private,
                            max_calls=args.max_tool_calls)
    for n in names:
        TOOLS[n].check(settings)
    return names, settings


def _read_tools(path: str | None) -> list[dict] | None:
    if not path:
        return None
    try:
        tools = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--tools {path}: {e}") from None
    if isinstance(tools, dict) and "tools" in tools:
        tools = tools["tools"]
    if not isinstance(tools, list):
        raise ValueError(f"--tools {path}: expected a JSON list of function tools")
    return tools


def _chat_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"reasoning_effort": args.reasoning_effort, "max_tokens": args.max_tokens or None,
            "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    builtin, settings = _builtin_tools(args)
    llm = load_llm(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}]
    tools = _read_tools(args.tools)
    kwargs = dict(_chat_kwargs(args), builtin_tools=builtin, tool_settings=settings)
    if not (args.json or args.no_stream):  # the answer as it comes (the reasoning too, with --show-reasoning)
        for d in llm.chat(messages, tools=tools, stream=True, **kwargs):
            if d.kind == "content":
                print(d.text, end="", flush=True)
            elif d.kind == "reasoning" and args.show_reasoning:
                print(d.text, end="", file=sys.stderr, flush=True)
            elif d.kind in ("builtin_call", "builtin_result") and args.show_reasoning:
                label = f"[{d.name}]" if d.kind == "builtin_call" else f"[{d.name} result]"
                print(f"\n{label}\n{d.text}", file=sys.stderr, flush=True)
            elif d.kind == "finish":
                for c in d.result.tool_calls:
                    print(f"[tool call] {c.name}({c.arguments})")
        print()
        return 0
    r = llm.chat(messages, tools=tools, **kwargs)
    if args.json:
        print(json.dumps({"reasoning": r.reasoning, "content": r.content,
                          "tool_calls": [c.to_dict() for c in r.tool_calls],
                          "builtin_calls": [{"recipient": c.recipient, "arguments": c.arguments, "output": c.output}
                                            for c in r.builtin_calls], "finish_reason": r.finish_reason,
                          "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                                    "reasoning_tokens": r.reasoning_tokens}, "warnings": r.warnings}, indent=2))
    else:
        if args.show_reasoning and r.reasoning:
            print(r.reasoning, file=sys.stderr)
        for c in r.tool_calls:
            print(f"[tool call] {c.name}({c.arguments})")
        print(r.content)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat_cli import run_chat

    builtin, settings = _builtin_tools(args)
    return run_chat(load_llm(args), args, _read_tools(args.tools), _chat_kwargs(args), builtin, settings)


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from .bench import peak_rss_gib
    from .server import OLLAMA_PORT, ServerOptions, create_app, default_model_name, run_server

    builtin, settings = _builtin_tools(args)
    keys = api_keys(args.api_key or os.environ.get("OSSIE_API_KEY"), args.api_keys)
    shared = tuple(_read_text(path, "--shared-prefix") for path in args.shared_prefix or ())
    ports = [args.port] + ([OLLAMA_PORT] if args.ollama and args.port != OLLAMA_PORT else [])
    for port in ports:
        _check_listen(args.host, port)
    options = ServerOptions(
        api_keys=keys, trust_cache_salt=args.trust_cache_salt, shared_prefixes=shared,
        allowed_origins=tuple(args.allowed_origins or ()),
        max_queued=args.max_queued, max_prompt_tokens=args.max_prompt_tokens,
        default_max_tokens=args.default_max_tokens, request_timeout_s=args.request_timeout,
        max_body_bytes=int(args.max_body_mb * 2**20), drain_s=args.shutdown_timeout,
        builtin_tools=tuple(builtin), tool_settings=settings, webui=not args.no_webui)
    if args.replicas is not None:
        return _serve_replicas(args, options)
    llm = load_llm(args)
    names = args.served_model_name or [default_model_name(llm.path)]
    app = create_app(llm, names, options)
    log = logging.getLogger("ossie")
    log.info("model %s (%s layout, %d layers, %d experts, %s), served as %s", llm.path, llm.layout,
             llm.config.num_layers, llm.config.num_experts, args.dtype, ", ".join(names))
    log.info("memory: %.2f GiB of weights, peak RSS %.2f GiB", llm.model.w.nbytes() / 2**30, peak_rss_gib())
    if llm.backend.name == "cpu":
        from .backends.cpu_kernels import path_summary

        log.info("%s", path_summary())

    def ready() -> None:
        if not args.no_webui:
            shown = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host  # what a browser can open
            log.info("chat page: http://%s:%d/", shown, args.port)
        log.info("serving the OpenAI API at http://%s:%d/v1 (chat/completions, responses, completions, models)",
                 args.host, args.port)
        log.info("serving Ollama's API at %s (/api/chat, /api/generate, /api/tags, /api/show, /api/ps)",
                 ", ".join(f"http://{args.host}:{p}/api" for p in ports))

    run_server(app, args.host, ports, "info" if args.verbose else "warning", ready)
    return 0


def _serve_replicas(args: argparse.Namespace, options: Any) -> int:
    """`ossie serve --replicas`: the same server, its engines on Ray Serve (ossie.replicas)."""
    if args.ollama:
        raise ValueError("--ollama cannot be used with --replicas (Ray Serve listens on one port): Ollama's API is "
                         "served on --port too, so give --port 11434 for Ollama's clients")
    if args.replicas == "auto" and args.min_replicas > args.max_replicas:
        raise ValueError(f"--min-replicas ({args.min_replicas}) is above --max-replicas ({args.max_replicas})")
    try:
        from .replicas.serve import serve_replicas
    except ImportError as e:
        raise ValueError(f"--replicas needs Ray Serve ({e}): pip install 'ossie[ray]'") from None
    return serve_replicas(args, options)


def _replica_count(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be a number of replicas (1 or more) or 'auto', got {text!r}")
    return count


def api_keys(key: str | None, path: str | None) -> dict[str, str]:
    """The server's keys and their principals' names: --api-key's is "default"; an --api-keys file has a `name:key`
    line per principal (blank lines and # comments skipped)."""
    keys = {key: "default"} if key else {}
    if path:
        for n, line in enumerate(_read_text(path, "--api-keys").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, secret = (part.strip() for part in line.partition(":"))
            if not (sep and name and secret):
                raise ValueError(f"--api-keys {path}, line {n}: expected name:key")
            if secret in keys or name in keys.values():
                raise ValueError(f"--api-keys {path}, line {n}: the {'key' if secret in keys else 'name'} "
                                 "is given twice")
            keys[secret] = name
        if not keys:
            raise ValueError(f"--api-keys {path}: no name:key line")
    return keys


def _read_text(path: str, option: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{option} {path}: {getattr(e, 'strerror', None) or e}") from None


def _check_listen(host: str, port: int) -> None:
    """ValueError when the server could not listen there: found before the model loads, not after."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host}: {e}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
        try:
            sock.bind(address)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ossie", description="Run OpenAI's gpt-oss models, exactly and fast.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"ossie {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("synth", help="write a random checkpoint in the exact published format",
                       description="Write a random gpt-oss checkpoint with the published format, shapes and "
                                   "sharding (MXFP4 experts, bf16 elsewhere): for tests, benchmarks and trying ossie.")
    p.add_argument("dir", metavar="DIR", help="folder to write")
    p.add_argument("--preset", default="tiny", choices=["tiny", "20b", "120b"], help="model shape (default tiny)")
    p.add_argument("--layout", default="hf", choices=["hf", "original", "both"],
                   help="hf: the repo root's files; original: the reference implementation's; both: like the repo")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed = same model in every layout)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("pull", help="download a model (a repo id, or gpt-oss:20b / gpt-oss:120b)",
                       description="Download MODEL's files of one layout into the Hugging Face cache, with a progress "
                                   "bar; an interrupted download resumes, and what is fetched is checked.")
    p.add_argument("model", metavar="MODEL", help="a Hugging Face repo id (openai/gpt-oss-20b) or gpt-oss:20b")
    p.add_argument("--layout", choices=["hf", "original"], default="hf",
                   help="hf: the repo root's files (default); original: the reference implementation's")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="the gpt-oss models on this machine",
                       description="The gpt-oss models in the Hugging Face cache: name, layouts, size, folder.")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("rm", help="delete a model from this machine",
                       description="Delete MODEL's snapshots from the Hugging Face cache.")
    p.add_argument("model", metavar="MODEL", help="a repo id or gpt-oss:20b, as ossie list shows it")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("bench", help="measure load time, memory, prefill and decode speed",
                       description="Load MODEL, time prefills of a random prompt and greedy decodes, and measure "
                                   "the machine's memory bandwidth and bf16 matmul rate to report the speeds "
                                   "against.")
    _add_model_args(p)
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default 64)")
    p.add_argument("--gen-tokens", type=int, default=32, help="tokens to decode per run (default 32)")
    p.add_argument("--depth", type=int, default=0, metavar="N",
                   help="tokens of context computed before each timed run, untimed (llama-bench's -d; default 0)")
    p.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up; medians are reported (default 5)")
    _add_speculative_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("generate", help="answer one prompt and exit (script-friendly)",
                       description="Answer one prompt with MODEL in the harmony chat format and print the answer.")
    _add_model_args(p)
    _add_speculative_args(p)
    p.add_argument("--prompt", required=True, help="the user's message ('-' reads standard input)")
    _add_chat_args(p)
    p.add_argument("--json", action="store_true", help="print reasoning, content, tool calls and usage as JSON")
    p.add_argument("--show-reasoning", action="store_true", help="print the reasoning to standard error")
    p.add_argument("--no-stream", action="store_true", help="print the answer once it is complete (for scripts)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal",
                       description="Chat with MODEL. Commands: /effort low|medium|high, /system TEXT, /reset, "
                                   "/save FILE, /load FILE, /help, /bye. Start and end multi-line input with \"\"\". "
                                   "Ctrl-C stops an answer; Ctrl-D exits.")
    _add_model_args(p)
    _add_speculative_args(p)
    _add_chat_args(p)
    p.add_argument("--no-reasoning", action="store_true", help="hide the model's reasoning")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat completions, responses, completions)",
                       description="Serve MODEL over HTTP with OpenAI's API: /v1/chat/completions, /v1/responses, "
                                   "/v1/completions, /v1/models, plus /health and /metrics.")
    _add_model_args(p)
    _add_speculative_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", action="append", metavar="NAME",
                   help="the model name clients must ask for (default: the checkpoint folder's name, or the repo id "
                        "of a downloaded model, e.g. openai/gpt-oss-20b); repeat for aliases")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every path but /health (also: "
                                     "$OSSIE_API_KEY); without any key, every client shares one prefix cache")
    p.add_argument("--api-keys", metavar="FILE",
                   help="several keys, one 'name:key' line per API principal: each principal's cached prompts and "
                        "stored responses are its own, and the access log names it (never the key)")
    p.add_argument("--trust-cache-salt", action="store_true",
                   help="requests' cache_salt comes from a trusted gateway: requests with different salts share no "
                        "cached prefix, even under one key (default: cache_salt is ignored)")
    p.add_argument("--shared-prefix", action="append", metavar="FILE",
                   help="a system prompt (a text file) whose cached tokens every principal may share; repeat for "
                        "several (default: no prefix is shared between principals)")
    p.add_argument("--ollama", action="store_true",
                   help="also listen on Ollama's port 11434, so clients set up for Ollama work unchanged")
    p.add_argument("--max-running", "--max-num-seqs", dest="max_running", type=int, default=16,
                   help="requests generating at once, batched into one forward pass a step; more wait in a "
                        "queue (default 16)")
    p.add_argument("--max-queued", type=int, default=256,
                   help="requests waiting beyond --max-running; more are answered 429 with Retry-After "
                        "(default 256)")
    p.add_argument("--prefill-while-decoding", type=int, default=64, metavar="N",
                   help="prompt tokens a step computes while other requests are decoding: smaller steps keep their "
                        "tokens coming while a long prompt is read, which then takes longer (default 64; "
                        "--prefill-chunk applies when nothing decodes)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                   help="the longest prompt accepted, in tokens (default: the model's context)")
    p.add_argument("--default-max-tokens", type=int, default=None, metavar="N",
                   help="tokens a request that gives no max_tokens may generate (default: the rest of the context)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="S",
                   help="seconds a request may take, waiting included; then it ends as at max_tokens "
                        "(finish_reason length) (default: no limit)")
    p.add_argument("--max-body-mb", type=float, default=16, metavar="MB",
                   help="largest request body, in MiB; larger ones get 413 (default 16)")
    p.add_argument("--shutdown-timeout", type=float, default=30, metavar="S",
                   help="on SIGTERM or Ctrl-C, seconds requests in flight may take to finish; then streams end "
                        "with an error event and other requests get 503 (default 30)")
    p.add_argument("--no-webui", action="store_true", help="no chat page at / (the API alone)")
    p.add_argument("--allowed-origins", nargs="+", metavar="ORIGIN",
                   help="let browser apps from these origins call the server (CORS); '*' allows any")
    _add_tool_args(p)
    p.add_argument("--replicas", type=_replica_count, metavar="N|auto",
                   help="run N engine replicas on Ray Serve behind this address, each conversation routed to the "
                        "replica that holds its prefix ('auto': scaled on load between --min-replicas and "
                        "--max-replicas); each takes --threads CPUs (default: this machine's cores shared among "
                        "them); needs pip install 'ossie[ray]'")
    p.add_argument("--min-replicas", type=int, default=1, metavar="N", help="with --replicas auto (default 1)")
    p.add_argument("--max-replicas", type=int, default=2, metavar="N", help="with --replicas auto (default 2)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="with --replicas: the Ray cluster to join (e.g. HEAD:6379, after `ray start --head` there); "
                        "default: a local one, started here")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from .chat.harmony import ChatFormatError
    from .model.checkpoint import CheckpointError, ModelNotFoundError
    from .model.config import ConfigError
    from .tokenizer import VocabularyError

    try:
        check_ranges(args)
        return args.func(args)
    except (CheckpointError, ConfigError, ModelNotFoundError, ChatFormatError, VocabularyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
