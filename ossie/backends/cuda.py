"""The CUDA backend: ossie's Triton kernels (cuda_kernels) for the experts and attention, cuBLAS for the dense
bf16 products, and decode steps replayed as CUDA graphs.

- Experts: MXFP4 read packed, decoded in registers (a GEMV per chosen expert when decoding, a grouped GEMM over
  the tokens sorted by expert for a prompt).
- Attention: the prefill kernel for a prompt chunk, the flash-decoding kernel for single queries.
- Decode steps (every sequence of the batch computes one token): the whole stack of layers runs as one CUDA graph
  per batch-size bucket, so a token costs one graph launch instead of hundreds of kernel launches. What changes
  between steps lives in static device buffers the graph reads: the activations, the rotary factors, and a table
  per layer of each sequence's KV buffer addresses, the row its new key goes to and how many keys it sees. The
  sequences' caches stay where the engine keeps them (a cache that grows only changes its row of the table), so
  one graph serves any batch of its size, whoever is in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..model.checkpoint import LayerWeights, Weights
from ..model.config import ModelConfig
from . import cuda_kernels as K
from .base import Backend
from .torch_ops import TorchBackend

if TYPE_CHECKING:
    from ..engine.kv_cache import KVCache
    from ..model.transformer import Transformer

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # batch sizes a decode graph is captured for
GRAPH_SPLITS = 16  # key splits of full layers in a graph: the key count changes every step, the graph does not


@dataclass
class DecodeStep:
    """The device-side description of a decode step: per layer, each sequence's key and value buffer addresses,
    the row its new key and value go to and how many keys it then attends to ([layers, batch] each)."""

    k_table: torch.Tensor
    v_table: torch.Tensor
    slots: torch.Tensor
    n_keys: torch.Tensor
    splits: list[int]


@dataclass
class DecodeGraph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    meta: torch.Tensor  # [4, layers, bucket] int64: the tables of `step`
    step: DecodeStep
    out: torch.Tensor


class CudaBackend(Backend):
    name = "cuda"
    running = TorchBackend.running
    rms_norm = TorchBackend.rms_norm  # norms, products and the glue in torch (cuBLAS), until fused
    linear = TorchBackend.linear

    def __init__(self, cuda_graphs: bool = True):
        """cuda_graphs=False runs decode steps kernel by kernel (the graphs' oracle, and easier to profile)."""
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, DecodeGraph] = {}
        self._pool = None
        self._scratch: torch.Tensor | None = None

    def prepare(self, weights: Weights) -> None:
        # the kernels address weights by row: they must be dense (they are, as loaded)
        for holder in (weights, *weights.layers):
            for name, t in vars(holder).items():
                if isinstance(t, torch.Tensor) and not t.is_contiguous():
                    setattr(holder, name, t.contiguous())

    # ---- operations --------------------------------------------------------------------------------------------
    def experts(self, x: torch.Tensor, lw: LayerWeights, chosen: torch.Tensor, weight: torch.Tensor,
                cfg: ModelConfig, alone: Sequence[int] = ()) -> torch.Tensor:
        return K.moe(x, lw.w1_blocks, lw.w1_scales, lw.w1_bias, lw.w2_blocks, lw.w2_scales, lw.w2_bias, chosen,
                     weight, cfg.swiglu_alpha, cfg.swiglu_limit)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, q_start: int,
                  k_start: int, window: int) -> torch.Tensor:
        if q.shape[0] > 1:
            return K.attention_prefill(q, k, v, sinks, q_start - k_start, window)
        # one query sees every key from `lo` on, in any order (a sliding layer's ring)
        lo = max(k_start, q_start - window + 1) if window else k_start
        keys, values = k[lo - k_start:].contiguous(), v[lo - k_start:].contiguous()
        table = torch.tensor([keys.data_ptr(), values.data_ptr(), keys.shape[0]], device=q.device)
        return K.attention_decode(q, table[0:1], table[1:2], table[2:3], sinks, k.shape[1],
                                  K.decode_splits(keys.shape[0]))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, window: int,
               caches: list[KVCache], sizes: list[int], state: DecodeStep | None = None,
               checking: Sequence[int] = ()) -> torch.Tensor:
        """Prompts as the reference does (each sequence's keys into its cache, then `attention`); a batched decode
        step (`state`, from `layers`) through its tables: the keys written and read where they lie."""
        step = state
        if step is None:
            return TorchBackend.attend(self, layer, q, k, v, sinks, window, caches, sizes, checking=checking)
        K.write_kv(k, v, step.k_table[layer], step.v_table[layer], step.slots[layer])
        return K.attention_decode(q, step.k_table[layer], step.v_table[layer], step.n_keys[layer], sinks, k.shape[1],
                                  step.splits[layer])

    # ---- decode steps ------------------------------------------------------------------------------------------
    def layers(self, model: Transformer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               caches: list[KVCache], sizes: list[int], checking: Sequence[int] = ()) -> torch.Tensor:
        if max(sizes) != 1:
            return TorchBackend.layers(self, model, x, cos, sin, caches, sizes, checking)
        batch = len(caches)
        bucket = next((b for b in BUCKETS if b >= batch), None)
        if not (self.cuda_graphs and x.device.type == "cuda" and bucket):
            step = self._describe(model, caches, batch, x.device)
            return self._run_layers(model, x, cos, sin, step)
        g = self._graphs.get(bucket)
        fresh = g is None
        if fresh:
            g = self._new_graph(model, bucket, x)
        g.meta.copy_(self._meta(model, caches, bucket, x.device))
        g.x.zero_()[:batch] = x
        g.cos.zero_()[:batch] = cos
        g.sin.zero_()[:batch] = sin
        if fresh:  # the first step of this size runs eagerly (compiling the kernels), then the graph is captured
            out = self._run_layers(model, g.x, g.cos, g.sin, g.step)
            self._capture(model, g)
            return out[:batch].clone()
        g.graph.replay()
        return g.out[:batch].clone()

    def _run_layers(self, model: Transformer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    step: DecodeStep) -> torch.Tensor:
        sizes = [1] * x.shape[0]
        for i in range(len(model.w.layers)):
            x = model.layer(i, x, cos, sin, [], sizes, state=step)
        return x

    def _meta(self, model: Transformer, caches: list[KVCache], bucket: int, device: torch.device) -> torch.Tensor:
        """[4, layers, bucket] int64: key and value buffer addresses, new row, key count. Rows past the batch point
        to a scratch row and see one key, so a graph of a larger bucket computes nothing that matters there."""
        num_layers = len(model.w.layers)
        if self._scratch is None or self._scratch.device != device:
            cfg = model.cfg
            self._scratch = torch.zeros(2, cfg.num_kv_heads, cfg.head_dim, dtype=model.dtype, device=device)
        scratch = self._scratch.data_ptr()
        k_ptr = [[scratch] * bucket for _ in range(num_layers)]
        v_ptr = [[scratch + self._scratch[0].nbytes] * bucket for _ in range(num_layers)]
        slots = [[0] * bucket for _ in range(num_layers)]
        n_keys = [[1] * bucket for _ in range(num_layers)]
        for b, cache in enumerate(caches):
            for i in range(num_layers):
                slot, n = cache.decode_slot(i)  # grows a full layer's buffer when it is full
                k_ptr[i][b], v_ptr[i][b] = cache.k[i].data_ptr(), cache.v[i].data_ptr()
                slots[i][b], n_keys[i][b] = slot, n
        return torch.tensor([k_ptr, v_ptr, slots, n_keys], dtype=torch.int64).to(device, non_blocking=True)

    def _describe(self, model: Transformer, caches: list[KVCache], batch: int, device: torch.device) -> DecodeStep:
        meta = self._meta(model, caches, batch, device)
        window = model.cfg.sliding_window
        longest = max(c.length + 1 for c in caches)
        splits = [K.decode_splits(min(longest, window) if model.cfg.is_sliding(i) else longest)
                  for i in range(len(model.w.layers))]
        return DecodeStep(meta[0], meta[1], meta[2], meta[3], splits)

    def _new_graph(self, model: Transformer, bucket: int, x: torch.Tensor) -> DecodeGraph:
        cfg, num_layers = model.cfg, len(model.w.layers)
        meta = torch.zeros(4, num_layers, bucket, dtype=torch.int64, device=x.device)
        splits = [K.decode_splits(cfg.sliding_window) if cfg.is_sliding(i) else GRAPH_SPLITS
                  for i in range(num_layers)]
        step = DecodeStep(meta[0], meta[1], meta[2], meta[3], splits)
        d = cfg.head_dim
        return DecodeGraph(torch.cuda.CUDAGraph(), x.new_zeros(bucket, x.shape[1]),
                           x.new_zeros(bucket, d), x.new_zeros(bucket, d), meta, step, x)

    def _capture(self, model: Transformer, g: DecodeGraph) -> None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize()
        with torch.cuda.graph(g.graph, pool=self._pool):
            g.out = self._run_layers(model, g.x, g.cos, g.sin, g.step)
        self._graphs[g.x.shape[0]] = g
