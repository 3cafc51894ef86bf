"""ossie against llama.cpp on the same synthetic gpt-oss checkpoint, taking turns, with the bandwidth beside each.

This machine's memory bandwidth drifts (the same probe reads 25 to 60 GB/s minutes apart), and decoding is
bandwidth-bound, so the two engines are compared in alternating rounds rather than in separate sessions:

    python benchmarks/vs_llamacpp.py CHECKPOINT GGUF --llama-bench PATH [--rounds 3]

Each round runs llama.cpp's `llama-bench` (2 threads, weights read into memory, not mapped) and `ossie bench` on the
same prompt and generation lengths, and probes the read bandwidth just before each. The summary gives the median
of every run of each engine.

`--depth N` computes N tokens of context first in both (llama-bench's -d), so that the timed prompt and decode
attend to them. `--quantization q8` runs ossie's 8-bit mode against the GGUF most users run: `llama-quantize GGUF
OUT MXFP4_MOE` makes it from the bf16 one (Q8_0 outside the experts, which stay MXFP4).

Building llama.cpp (no network beyond PyPI): its source ships in llama-cpp-python's sdist,
`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`, unpacked; in its vendor/llama.cpp,
`cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build -j --target llama-bench llama-quantize`.

Making the GGUF: llama.cpp's `convert_hf_to_gguf.py CHECKPOINT --outtype bf16` keeps the MXFP4 experts as they are
and writes the rest in bf16 (as ossie runs them). It needs a `tokenizer.json` beside the checkpoint, which ossie's
synthetic checkpoints lack: `--write-tokenizer DIR` writes one from the o200k vocabulary ossie uses (with
transformers' TikTokenConverter, which needs `pip install tiktoken`) and the harmony special tokens at their ids.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys


def probe_gb_s(checkpoint: str) -> float:
    """Read bandwidth of all cores, measured as `ossie bench` measures it (over the checkpoint's unembedding)."""
    code = (f"from ossie import LLM, bench; llm = LLM({checkpoint!r}, progress=False); "
            "print(bench.measure_bandwidth(llm.model.w.unembedding))")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def llama_cpp(llama_bench: str, gguf: str, prompt: int, gen: int, reps: int, threads: int,
              depth: int = 0) -> dict[str, list[float]]:
    out = subprocess.run([llama_bench, "-m", gguf, "-p", str(prompt), "-n", str(gen), "-t", str(threads),
                          "-r", str(reps), "-d", str(depth), "-lm", "none", "-o", "jsonl"],
                         capture_output=True, text=True, check=True)
    runs = {}
    for line in out.stdout.splitlines():
        row = json.loads(line)
        runs["prefill" if row["n_prompt"] else "decode"] = row["samples_ts"]
    return runs


def ossie(checkpoint: str, prompt: int, gen: int, reps: int, threads: int, depth: int = 0,
          quantization: str | None = None) -> dict[str, list[float]]:
    out = subprocess.run(["ossie", "bench", checkpoint, "--prompt-tokens", str(prompt), "--gen-tokens", str(gen),
                          "--runs", str(reps), "--threads", str(threads), "--depth", str(depth)]
                         + (["--quantization", quantization] if quantization else []),
                         capture_output=True, text=True, check=True).stdout
    decode = re.search(r"runs: ([\d., ]+)\)", out).group(1)
    return {"prefill": [float(re.search(r"prefill\s+([\d.]+) tok/s", out).group(1))],  # bench prints the median
            "decode": [float(v) for v in decode.split(", ")]}


def write_tokenizer(directory: str) -> None:
    import os

    from tiktoken.load import load_tiktoken_bpe  # noqa: F401  (TikTokenConverter needs it)
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from ossie import tokenizer
    from ossie.special_tokens import NAMES, STARTOFTEXT

    o200k = ("|".join([
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+"]))
    vocab = os.path.join(tokenizer.resolve_vocab(), tokenizer.VOCAB_NAME)
    tok = TikTokenConverter(vocab_file=vocab, pattern=o200k).converted()
    tok.add_special_tokens([AddedToken(NAMES.get(i, f"<|reserved_{i}|>"), special=True, normalized=False)
                            for i in range(STARTOFTEXT, 201088)])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|return|>").save_pretrained(directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("gguf", nargs="?")
    ap.add_argument("--llama-bench", help="path of llama.cpp's llama-bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="runs of each engine per round")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=0, metavar="N",
                    help="tokens of context before the timed prompt and decode, in both engines (llama-bench -d)")
    ap.add_argument("--quantization", choices=["q8"], default=None,
                    help="ossie's 8-bit mode; give the GGUF made by `llama-quantize GGUF OUT MXFP4_MOE` (Q8_0 "
                         "outside the experts, as most users run llama.cpp)")
    ap.add_argument("--write-tokenizer", metavar="DIR", help="write tokenizer.json for the GGUF converter, and exit")
    args = ap.parse_args()
    if args.write_tokenizer:
        write_tokenizer(args.write_tokenizer)
        return
    if not (args.checkpoint and args.gguf and args.llama_bench):
        ap.error("CHECKPOINT, GGUF and --llama-bench are needed")
    runs: dict[str, dict[str, list[float]]] = {"llama.cpp": {"prefill": [], "decode": []},
                                               "ossie": {"prefill": [], "decode": []}}
    for r in range(args.rounds):
        for name in runs:
            bw = probe_gb_s(args.checkpoint)
            if name == "llama.cpp":
                got = llama_cpp(args.llama_bench, args.gguf, args.prompt_tokens, args.gen_tokens, args.reps,
                                args.threads, args.depth)
            else:
                got = ossie(args.checkpoint, args.prompt_tokens, args.gen_tokens, args.reps, args.threads,
                            args.depth, args.quantization)
            for k, v in got.items():
                runs[name][k] += v
            decode = " ".join(f"{v:.2f}" for v in got["decode"])
            print(f"round {r + 1} {name:9s} bandwidth {bw:5.1f} GB/s  prefill "
                  f"{statistics.median(got['prefill']):5.1f} tok/s  decode {decode} tok/s", flush=True)
    for name, got in runs.items():
        print(f"{name:9s} median of all runs: prefill {statistics.median(got['prefill']):.1f} tok/s, decode "
              f"{statistics.median(got['decode']):.2f} tok/s ({len(got['decode'])} runs)")


if __name__ == "__main__":
    main()
