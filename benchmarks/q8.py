"""What the 8-bit mode (quantization="q8") costs in accuracy: its logits against the exact mode's over a random
prompt, as relative error and top-1 agreement, beside what bf16 rounding alone costs (the exact mode against
float32, where the machine holds the float32 model).

    python benchmarks/q8.py                       # the tiny synthetic checkpoint, made in a temporary folder
    python benchmarks/q8.py --mid                 # a mid-size one: the 20b's widths, 2 layers (3.4 GB on disk)
    python benchmarks/q8.py /tmp/m20b --tokens 256 --no-float32   # the 20b's shapes (float32 would need 52 GB)
    python benchmarks/q8.py --kv-cache            # the 8-bit KV cache (kv_cache_dtype="q8") instead

The 8-bit KV cache needs head_dim a multiple of 32: its default checkpoint is the tiny one with gpt-oss's head
shape (head_dim 64, 8 query heads per KV head).

Random synthetic weights amplify every rounding far more than a trained model does, so these figures bound the
cost from above; they are comparable between modes, not with published perplexities. The first line is the floor:
the exact mode decoding against its own prompt rows differs only in the order of float32 sums, and the random 20b
amplifies even that to unrelated logits (so it says nothing about q8 there: measure the tiny model, or a trained
checkpoint).
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import shutil
import tempfile

import torch

import ossie
from ossie.special_tokens import N_ORDINARY


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="a checkpoint folder (default: a tiny synthetic one)")
    p.add_argument("--tokens", type=int, default=512, help="prompt length")
    p.add_argument("--no-float32", action="store_true", help="skip the float32 model (large checkpoints)")
    p.add_argument("--kv-cache", action="store_true", help="measure the 8-bit KV cache instead")
    p.add_argument("--mid", action="store_true", help="a mid-size synthetic checkpoint: the 20b's widths, 2 layers")
    args = p.parse_args()
    path = args.checkpoint
    if path is None:
        from ossie.model.config import PRESETS
        from ossie.synth import write_checkpoint

        cfg = dataclasses.replace(PRESETS["20b"], num_layers=2, layer_types=()) if args.mid else PRESETS["tiny"]
        if args.kv_cache and not args.mid:
            cfg = dataclasses.replace(cfg, head_dim=64, num_kv_heads=1)
        path = tempfile.mkdtemp()
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        write_checkpoint(path, cfg, "hf", seed=1, progress=False)
    ids = torch.randint(0, N_ORDINARY, (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    load = dict(progress=False, enable_prefix_caching=False)

    def decoding(llm: ossie.LLM) -> torch.Tensor:
        """Each position's logits as generation computes them: one token a step over the cache."""
        cache = llm.runner.kv.new_cache(len(ids))
        return torch.stack([llm.model.forward(torch.tensor([t]), cache)[-1].float() for t in ids])

    if args.kv_cache:
        return measure_kv_cache(path, ids, load, decoding, not args.no_float32)
    exact_llm = ossie.LLM(path, **load)
    exact = exact_llm.logits(ids)
    floor = decoding(exact_llm)  # the exact mode decoding: other float32 sums, the same bf16 weights
    del exact_llm
    q8 = ossie.LLM(path, quantization="q8", **load)
    prefill = q8.logits(ids)  # a prompt's rows: the checkpoint's bf16 matrices, the experts on int8 activations
    decoded = decoding(q8)  # the 8-bit kernels
    print(f"{path}: {args.tokens}-token prompt")
    for name, logits in (("exact, decoding (the noise floor)", floor), ("q8, prompt rows (int8 experts)", prefill),
                         ("q8, decoding (8-bit weights)", decoded)):
        agree = (logits.argmax(-1) == exact.argmax(-1)).float().mean().item()
        print(f"  {name:32s} vs exact: relative logit error {rel(logits, exact):.4f}, top-1 agreement {agree:.1%}")
    if not args.no_float32:
        f32 = ossie.LLM(path, dtype="float32", **load).logits(ids)
        agree = (exact.argmax(-1) == f32.argmax(-1)).float().mean().item()
        print(f"  {'exact (bf16)':32s} vs float32: relative logit error {rel(exact, f32):.4f}, "
              f"top-1 agreement {agree:.1%}")
        for name, logits in (("q8, prompt rows", prefill), ("q8, decoding", decoded)):
            agree = (logits.argmax(-1) == f32.argmax(-1)).float().mean().item()
            print(f"  {name:32s} vs float32: relative logit error {rel(logits, f32):.4f}, top-1 agreement {agree:.1%}")


def measure_kv_cache(path: str, ids: list[int], load: dict, decoding, float32: bool) -> None:
    """The q8 KV cache against the exact one, in bf16 and (unless large) float32, decoding token by token."""
    print(f"{path}: {len(ids)}-token prompt, decoded token by token")
    for dtype in ("bfloat16", "float32") if float32 else ("bfloat16",):
        exact = decoding(ossie.LLM(path, dtype=dtype, **load))
        kv8 = ossie.LLM(path, dtype=dtype, kv_cache_dtype="q8", **load)
        quantized = decoding(kv8)
        agree = (quantized.argmax(-1) == exact.argmax(-1)).float().mean().item()
        cache = kv8.runner.kv.new_cache(len(ids))
        print(f"  {dtype}: q8 KV cache vs exact: relative logit error {rel(quantized, exact):.4f}, top-1 agreement "
              f"{agree:.1%}; cache {cache.nbytes() / 2**20:.2f} MiB against "
              f"{ossie.LLM(path, dtype=dtype, **load).runner.kv.new_cache(len(ids)).nbytes() / 2**20:.2f}")
        if dtype == "float32":
            bf16 = decoding(ossie.LLM(path, **load))
            agree = (bf16.argmax(-1) == exact.argmax(-1)).float().mean().item()
            print(f"  bf16 rounding alone (bf16 vs float32, exact cache): relative logit error {rel(bf16, exact):.4f}, "
                  f"top-1 agreement {agree:.1%}")


if __name__ == "__main__":
    main()
