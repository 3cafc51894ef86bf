"""The CUDA backend's Triton kernels against the torch reference. Without a GPU they run under Triton's interpreter
on CPU tensors (TRITON_INTERPRET=1, set before triton is imported), in float32: the interpreter's bf16 arithmetic is
not the GPU's (it truncates conversions, and its tl.dot of bf16 tiles is wrong). gpu_tests/ runs them at the real
shapes in bf16 on a GPU, with the CUDA graphs."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402

import ossie  # noqa: E402
from ossie.backends import select_backend  # noqa: E402
from ossie.backends import torch_ops as ref  # noqa: E402
from ossie.backends.cuda import CudaBackend  # noqa: E402
from ossie.backends.cuda_kernels import GEMM_FEW, GEMM_MANY, GEMV, Tiles, attention_decode, attention_prefill, moe  # noqa: E402,E501
from ossie.engine import Sequence  # noqa: E402
from ossie.special_tokens import N_ORDINARY  # noqa: E402
from tests.helpers import RecordingRunner, greedy, step_together  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter computes SwiGLU's sigmoid as 1 / (1 + exp(-x)) in numpy: exp overflows to inf, the result is 0
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
CFG = SimpleNamespace(swiglu_alpha=1.702, swiglu_limit=7.0)


def rel(y: torch.Tensor, expected: torch.Tensor) -> float:
    return ((y.float() - expected.float()).norm() / expected.float().norm()).item()


def random_experts(num_experts: int, hidden: int, inter: int, gen: torch.Generator) -> SimpleNamespace:
    def mx(out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = torch.randint(0, 256, (num_experts, out, n_in // 32, 16), dtype=torch.uint8, generator=gen)
        return blocks, torch.randint(118, 130, (num_experts, out, n_in // 32), dtype=torch.uint8, generator=gen)

    (w1b, w1s), (w2b, w2s) = mx(2 * inter, hidden), mx(hidden, inter)
    layer = SimpleNamespace(w1_blocks=w1b, w1_scales=w1s, w1_bias=torch.randn(num_experts, 2 * inter, generator=gen),
                            w2_blocks=w2b, w2_scales=w2s, w2_bias=torch.randn(num_experts, hidden, generator=gen))
    return SimpleNamespace(**{k: v.to(DEVICE) for k, v in vars(layer).items()})


# tokens: 1-2 take the GEMV path (pairs <= 8), 5 and 40 the grouped GEMM (40 tokens: several row blocks per expert,
# and experts nobody chose). hidden 96 and 160 are not multiples of the kernels' K tiles: the masked tails.
@pytest.mark.parametrize("tokens", [1, 2, 5, 40])
@pytest.mark.parametrize("hidden,inter", [(96, 64), (160, 96)])
def test_moe_matches_reference(tokens, hidden, inter, tiles=None):
    gen = torch.Generator().manual_seed(tokens * 100 + hidden)
    lw, k, num_experts = random_experts(8, hidden, inter, gen), 2, 8
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE)
    chosen = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(tokens)]).to(DEVICE)
    weight = torch.softmax(torch.randn(tokens, k, generator=gen), -1).to(DEVICE)
    y = moe(x, lw.w1_blocks, lw.w1_scales, lw.w1_bias, lw.w2_blocks, lw.w2_scales, lw.w2_bias, chosen, weight,
            CFG.swiglu_alpha, CFG.swiglu_limit, tiles)
    expected = ref.TorchBackend().experts(x, lw, chosen, weight, CFG)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert rel(y, expected) < 2e-6


# Every launch shape the kernels use (and other legal ones), each over masked tails: K tiles wider than the rows,
# row blocks wider than the matrix, 64-pair blocks mostly padding.
@pytest.mark.parametrize("tokens,tiles", [(2, GEMV), (2, Tiles(rows=64, k=1024, warps=8, stages=1)),
                                          (40, GEMM_FEW[0]), (40, GEMM_MANY[0]), (40, GEMM_MANY[1]),
                                          (5, Tiles(rows=32, k=64, m=32))])
def test_moe_launch_shapes(tokens, tiles):
    test_moe_matches_reference(tokens, 160, 96, tiles)


def qkv(t: int, s: int, heads: int, kv: int, d: int, gen: torch.Generator):
    q = torch.randn(t, heads, d, generator=gen)
    return (q.to(DEVICE), torch.randn(s, kv, d, generator=gen).to(DEVICE), torch.randn(s, kv, d, generator=gen).to(
        DEVICE), torch.randn(heads, generator=gen).to(DEVICE))


# (queries, keys, offset of the first query among the keys, window). The window cases put queries right at the band's
# edge: the oldest key a query still sees (SGLang #32087 dropped it) and the blocks of values wholly outside the band
# (vLLM PR #30887 read them) must come out as the reference has them.
@pytest.mark.parametrize("t,s,offset,window", [(5, 5, 0, 0), (40, 70, 30, 0), (40, 200, 160, 16), (70, 70, 0, 16),
                                               (130, 300, 170, 128), (17, 145, 128, 128)])
@pytest.mark.parametrize("heads,kv,d", [(8, 2, 16), (8, 1, 64)])
def test_prefill_attention_matches_reference(t, s, offset, window, heads, kv, d):
    q, k, v, sinks = qkv(t, s, heads, kv, d, torch.Generator().manual_seed(t + s + d))
    y = attention_prefill(q, k, v, sinks, offset, window)
    assert rel(y, ref.attention(q, k, v, sinks, offset, 0, window)) < 1e-5


def test_prefill_attention_reads_strided_queries():
    """The model hands over q and k as views into the fused qkv product (rows longer than the heads)."""
    gen = torch.Generator().manual_seed(9)
    fused = torch.randn(33, 12, 16, generator=gen).to(DEVICE)
    q, k, v = fused[:, :8], fused[:, 8:10], fused[:, 10:12]
    sinks = torch.randn(8, generator=gen).to(DEVICE)
    assert rel(attention_prefill(q, k, v, sinks, 0, 8), ref.attention(q, k, v, sinks, 0, 0, 8)) < 1e-5


@pytest.mark.parametrize("splits", [1, 4, 16])
def test_decode_attention_over_a_batch_of_caches(splits):
    """One query for each of three sequences whose keys live in separate buffers (1, 7 and 300 keys): with 16
    splits most of the short ones' splits are empty and must add nothing."""
    gen = torch.Generator().manual_seed(splits)
    heads, kv, d, lengths = 8, 2, 16, (1, 7, 300)
    keys = [torch.randn(n, kv, d, generator=gen).to(DEVICE) for n in lengths]
    values = [torch.randn(n, kv, d, generator=gen).to(DEVICE) for n in lengths]
    q, sinks = torch.randn(3, heads, d, generator=gen).to(DEVICE), torch.randn(heads, generator=gen).to(DEVICE)
    table = torch.tensor([[t.data_ptr() for t in keys], [t.data_ptr() for t in values], list(lengths)]).to(DEVICE)
    y = attention_decode(q, table[0], table[1], table[2], sinks, kv, splits)
    for b, n in enumerate(lengths):
        assert rel(y[b:b + 1], ref.attention(q[b:b + 1], keys[b], values[b], sinks, n - 1, 0, 0)) < 1e-5


def test_auto_backend_on_a_gpu_is_cuda():
    assert select_backend(torch.device("cpu"), "auto").name != "cuda"
    with pytest.raises(ValueError, match="NVIDIA GPU"):
        select_backend(torch.device("cpu"), "cuda")
    if DEVICE == "cuda":
        assert select_backend(torch.device("cuda"), "auto").name == "cuda"


@pytest.fixture(scope="module")
def tiny_pair(tiny_repo):
    """The tiny model on the torch reference backend and on the CUDA backend, float32."""
    kw = dict(dtype="float32", progress=False, device=DEVICE, enable_prefix_caching=False)
    return ossie.LLM(tiny_repo, backend="torch", **kw), ossie.LLM(tiny_repo, backend=CudaBackend(), **kw)


def test_model_logits_match_reference(tiny_pair):
    """A 150-token prompt: past the 128-token window, so the sliding layers' band mask matters."""
    torch_llm, cuda_llm = tiny_pair
    ids = torch.randint(0, N_ORDINARY, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    assert rel(cuda_llm.logits(ids), torch_llm.logits(ids)) < 1e-5


def test_batched_decode_steps_match_reference(tiny_pair):
    """Three sequences (5, 126 and 140 prompt tokens: the ring of the sliding layers fills and wraps while they
    decode) step together: prompt chunks first, then decode steps, where the CUDA backend writes every new key and
    attends through its table of cache addresses. Logits of every step match the reference backend's."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, N_ORDINARY, (n,), generator=gen).tolist() for n in (5, 126, 140)]
    seen = []
    for llm in tiny_pair:
        runner = RecordingRunner(llm.model)
        seqs = [Sequence(p, greedy(6)) for p in prompts]
        step_together(runner, seqs)
        seen.append(([s.output for s in seqs], [torch.stack(runner.by_sequence[s.id]) for s in seqs]))
    (ref_out, ref_logits), (out, logits) = seen
    assert out == ref_out
    for got, expected in zip(logits, ref_logits, strict=True):
        assert rel(got, expected) < 1e-5
