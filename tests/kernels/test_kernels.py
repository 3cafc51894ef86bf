"""The C kernels against the torch reference path, on every code path this CPU has, for the shapes gpt-oss uses."""

import dataclasses

import pytest
import torch

from ossie.backends import cpu_kernels as kernels
from ossie.backends.torch_ops import attention, swiglu
from ossie.model.mxfp4 import mxfp4_linear

pytestmark = pytest.mark.skipif(not kernels.available(), reason="C kernels not built (no compiler)")



def random_mxfp4(out: int, n_in: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.randint(0, 256, (out, n_in // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(118, 130, (out, n_in // 32), dtype=torch.uint8, generator=gen)
    return blocks, scales


def on_one_thread(call):
    """call()'s result with the kernels on one thread (the thread count restored after)"""
    before = kernels.kernel_threads()
    try:
        kernels.set_num_threads(1)
        return call()
    finally:
        kernels.set_num_threads(before)


def close(y: torch.Tensor, ref: torch.Tensor) -> None:
    # float32 sums in a different order: relative error at float32 rounding level times sqrt(in)
    err = ((y - ref).norm() / ref.norm()).item()
    assert err < 2e-6, err


# (out, in): w1 (5760 x 2880), w2 (2880 x 2880), qkv (5120 x 2880), out (2880 x 4096), and odd group counts
# (in/32 not a multiple of 4) that take the tail path. The full-size shapes run with one token (decoding) and
# nine (two tiles, one partial); the small ones with every token count.
LARGE = [(5760, 2880), (2880, 2880)]
SMALL = [(96, 4096), (40, 96), (33, 160), (17, 32)]
CASES = [(o, i, t) for o, i in LARGE for t in (1, 9, 70)] + [(o, i, t) for o, i in SMALL for t in (1, 3, 8, 9, 20)]


@pytest.mark.parametrize("out,n_in,tokens", CASES)
@pytest.mark.parametrize("bf16", [False, True])
def test_mxfp4_matmul_matches_torch(path, out, n_in, tokens, bf16):
    gen = torch.Generator().manual_seed(out * 7 + n_in + tokens)
    blocks, scales = random_mxfp4(out, n_in, gen)
    bias = torch.randn(out, generator=gen)
    x = torch.randn(tokens, n_in, generator=gen)
    if bf16:  # activations of a bf16 model: bf16 values, which the bf16 dot-product path multiplies exactly
        x = x.bfloat16().float()
    for b in (bias, None):
        y = kernels.mxfp4_matmul(x, blocks, scales, b, bf16_activations=bf16)
        ref = mxfp4_linear(x.double(), blocks, scales, None if b is None else b.double())
        close(y.double(), ref)


@pytest.mark.parametrize("tokens", [2, 20])
def test_mxfp4_matmul_edge_scales(path, tokens):
    """Scale bytes at the ends of the range (0 is 2**-127, far below any sum; 254 is 2**127) and every code. From
    16 tokens the bf16 path folds scales into decoded weights, which stay exact for scale bytes 2..252: the rows
    of a panel with others take the tile kernel (rows 0-7 here), the rest (rows 8-79) the panel."""
    gen = torch.Generator().manual_seed(1)
    blocks = torch.arange(256, dtype=torch.uint8).repeat(80).view(80, 16, 16)  # [80 rows, 16 groups, 16 bytes]
    scales = torch.randint(100, 150, (80, 16), dtype=torch.uint8, generator=gen)
    scales[0, 0], scales[1, 3], scales[2, 5] = 0, 1, 170
    scales[70, :2] = torch.tensor([2, 230], dtype=torch.uint8)  # the smallest foldable, and a large one
    x = torch.randn(tokens, 512, generator=gen).bfloat16().float()
    for bf16 in (False, True):
        y = kernels.mxfp4_matmul(x, blocks, scales, None, bf16_activations=bf16)
        ref = mxfp4_linear(x.double(), blocks, scales, None)
        assert torch.allclose(y.double(), ref, rtol=2e-6, atol=1e-30 + 2e-6 * ref.abs().max().item())


@pytest.mark.parametrize("out,n_in", [(5120, 2880), (2880, 4096), (1000, 2880), (7, 64), (13, 96)])
@pytest.mark.parametrize("tokens", [1, 2, 5, 8])
def test_bf16_matmul_matches_torch(path, out, n_in, tokens):
    gen = torch.Generator().manual_seed(out + n_in + tokens)
    w = torch.randn(out, n_in, generator=gen).bfloat16()
    bias = torch.randn(out, generator=gen)
    x = torch.randn(tokens, n_in, generator=gen).bfloat16().float()
    y = kernels.bf16_matmul(x, w, bias)
    ref = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    close(y.double(), ref)


def test_products_of_tokens_together_equal_each_alone(path):
    """Continuous batching reads each weight once for several sequences' tokens: the products must give each token
    exactly, bit for bit, what it gets alone (each token's sum runs in the same order whatever the token count)."""
    gen = torch.Generator().manual_seed(4)
    w, bias = torch.randn(300, 2880, generator=gen).bfloat16(), torch.randn(300, generator=gen)
    blocks, scales = random_mxfp4(300, 2880, gen)
    x = torch.randn(7, 2880, generator=gen).bfloat16().float()
    together = kernels.bf16_matmul(x, w, bias), kernels.mxfp4_matmul(x, blocks, scales, bias, True)
    alone = (torch.cat([kernels.bf16_matmul(x[t:t + 1], w, bias) for t in range(7)]),
             torch.cat([kernels.mxfp4_matmul(x[t:t + 1], blocks, scales, bias, True) for t in range(7)]))
    assert torch.equal(together[0], alone[0]) and torch.equal(together[1], alone[1])


def test_many_token_products_do_not_depend_on_the_token_count(path):
    """From 16 tokens MXFP4 products take the panel GEMM: each token's sum runs in one order whatever the token
    count, so a prompt's tokens get the same products however the engine cuts its chunks."""
    gen = torch.Generator().manual_seed(5)
    blocks, scales = random_mxfp4(200, 2880, gen)
    x = torch.randn(40, 2880, generator=gen).bfloat16().float()
    together = kernels.mxfp4_matmul(x, blocks, scales, None, True)
    assert torch.equal(together[:17], kernels.mxfp4_matmul(x[:17], blocks, scales, None, True))
    assert torch.equal(together[17:], kernels.mxfp4_matmul(x[17:], blocks, scales, None, True))


def test_threads_do_not_change_results():
    gen = torch.Generator().manual_seed(3)
    blocks, scales = random_mxfp4(777, 2880, gen)
    x = torch.randn(3, 2880, generator=gen)
    before = kernels.kernel_threads()
    try:
        kernels.set_num_threads(1)
        one = kernels.mxfp4_matmul(x, blocks, scales)
        kernels.set_num_threads(3)
        three = kernels.mxfp4_matmul(x, blocks, scales)
    finally:
        kernels.set_num_threads(before)
    assert torch.equal(one, three)  # rows are split over threads, each row's sum is the same


def test_moe_experts_match_reference():
    """The CPU backend's experts (packed kernels) equal the reference backend's (decode-then-matmul), for tokens
    grouped on experts and for the single-call decode path."""
    from ossie.backends.cpu import CpuBackend
    from ossie.backends.torch_ops import TorchBackend
    from ossie.model.checkpoint import LayerWeights
    from ossie.model.config import ModelConfig
    from ossie.model.transformer import route

    gen = torch.Generator().manual_seed(5)
    cfg = ModelConfig(num_layers=1, num_experts=8, experts_per_token=3, hidden_size=96, intermediate_size=64,
                      vocab_size=100, num_heads=2, num_kv_heads=1, head_dim=32)
    e, h, i = 8, 96, 64
    w1b, w1s = random_mxfp4(e * 2 * i, h, gen)
    w2b, w2s = random_mxfp4(e * h, i, gen)
    lw = LayerWeights(
        attn_norm=torch.ones(h), qkv_w=torch.zeros(1), qkv_b=torch.zeros(1), sinks=torch.zeros(1),
        out_w=torch.zeros(1), out_b=torch.zeros(1), mlp_norm=torch.ones(h),
        gate_w=torch.randn(e, h, generator=gen), gate_b=torch.randn(e, generator=gen),
        w1_blocks=w1b.view(e, 2 * i, h // 32, 16), w1_scales=w1s.view(e, 2 * i, h // 32),
        w1_bias=torch.randn(e, 2 * i, generator=gen),
        w2_blocks=w2b.view(e, h, i // 32, 16), w2_scales=w2s.view(e, h, i // 32),
        w2_bias=torch.randn(e, h, generator=gen))
    cpu, reference = CpuBackend(), TorchBackend()

    def experts(backend, x):
        chosen, weight = route(torch.nn.functional.linear(x, lw.gate_w.to(x.dtype), lw.gate_b.to(x.dtype)), 3)
        return backend.experts(x, lw, chosen, weight, cfg).double()

    for tokens in (1, 2, 11):  # one token takes the single-call decode path, more the grouped path
        x = torch.randn(tokens, h, generator=gen) * 0.1
        close(experts(cpu, x), experts(reference, x))
    # bf16 model: the same up to bf16 rounding of the products' outputs (which the reference rounds, the kernels not)
    x = (torch.randn(1, h, generator=gen) * 0.1).bfloat16()
    fused, ref = experts(cpu, x), experts(reference, x)
    assert ((fused - ref).norm() / ref.norm()).item() < 1e-2


def random_experts(gen: torch.Generator, e: int = 6, h: int = 320, i: int = 192):
    w1b, w1s = random_mxfp4(e * 2 * i, h, gen)
    w2b, w2s = random_mxfp4(e * h, i, gen)
    return (w1b.view(e, 2 * i, h // 32, 16), w1s.view(e, 2 * i, h // 32), torch.randn(e, 2 * i, generator=gen),
            w2b.view(e, h, i // 32, 16), w2s.view(e, h, i // 32), torch.randn(e, h, generator=gen))


@pytest.mark.parametrize("bf16", [False, True])
def test_moe_one_token_matches_reference(path, bf16):
    """The MoE call for one token against a float64 reference of the same math, with the residual add: hidden and
    intermediate sizes whose group counts have both 4-group chunks (the permuted avx512bf16 order) and tails;
    experts given out of order; threads splitting one expert's rows."""
    gen = torch.Generator().manual_seed(11 + bf16)
    h, alpha, limit = 320, 1.702, 7.0
    weights_ = random_experts(gen)
    w1b, w1s, b1, w2b, w2s, b2 = weights_
    x, residual = torch.randn(1, h, generator=gen), torch.randn(1, h, generator=gen)
    if bf16:
        x, residual = x.bfloat16().float(), residual.bfloat16().float()
    experts, weights = torch.tensor([[4, 0, 3]]), torch.softmax(torch.randn(1, 3, generator=gen), -1)
    y = kernels.moe(x, *weights_, experts, weights, alpha, limit, bf16, residual=residual)
    plain = kernels.moe(x, *weights_, experts, weights, alpha, limit, bf16)
    ref = torch.zeros(1, h, dtype=torch.float64)
    for n in experts[0].argsort().tolist():  # ascending experts, as the kernel adds them
        ex = int(experts[0, n])
        up = mxfp4_linear(x.double(), w1b[ex], w1s[ex], b1[ex].double())
        act = swiglu(up, alpha, limit)
        if bf16:  # the activation is a bf16 tensor in a bf16 model
            act = act.float().bfloat16().double()
        ref += weights[0, n].double() * mxfp4_linear(act, w2b[ex], w2s[ex], b2[ex].double())
    close(plain.double(), ref)
    if bf16:  # a bf16 model's residual add: bf16(residual + bf16(moe)), as torch computes it on bf16 tensors
        assert torch.equal(y, (residual.bfloat16() + plain.bfloat16()).float())
    else:
        close(y.double(), residual.double() + ref)


def moe_reference(x, weights_, experts, weights, alpha, limit, bf16):
    """The MoE block in float64, expert by expert in ascending order as the kernel adds them"""
    w1b, w1s, b1, w2b, w2s, b2 = weights_
    ref = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for n in experts[t].argsort().tolist():
            ex = int(experts[t, n])
            act = swiglu(mxfp4_linear(x[t:t + 1].double(), w1b[ex], w1s[ex], b1[ex].double()), alpha, limit)
            if bf16:  # the activation is a bf16 tensor in a bf16 model
                act = act.float().bfloat16().double()
            ref[t] += weights[t, n].double() * mxfp4_linear(act, w2b[ex], w2s[ex], b2[ex].double())[0]
    return ref


@pytest.mark.parametrize("bf16", [False, True])
def test_moe_of_a_prompt_matches_reference(path, bf16):
    """A prompt's MoE block in one call: experts chosen by many tokens (the panel GEMM, x in both orders on the avx2
    path), by a few (the tile kernel) and by one, their products handed to the threads piece by piece; against the
    float64 reference, and the same bits on one thread as on several."""
    gen = torch.Generator().manual_seed(31 + bf16)
    weights_ = random_experts(gen)
    tokens = 40
    x = torch.randn(tokens, 320, generator=gen)
    if bf16:
        x = x.bfloat16().float()
    experts = torch.stack([torch.tensor([0, 1 + t % 2, 3 + (t % 7 == 0) + 2 * (t == 5)]) for t in range(tokens)])
    counts = torch.bincount(experts.flatten(), minlength=6).tolist()
    assert counts[0] == tokens and 1 < counts[4] < 16 and counts[5] == 1  # panel, tile, one token
    weights = torch.softmax(torch.randn(tokens, 3, generator=gen), -1)
    y = kernels.moe(x, *weights_, experts, weights, 1.702, 7.0, bf16)
    ref = moe_reference(x, weights_, experts, weights, 1.702, 7.0, bf16)
    if bf16:
        # a bf16 model rounds each activation to bf16: where the float32 sum lies within its last bit of a rounding
        # boundary it rounds the other way than the float64 one (23,040 activations here), and one such activation
        # moves its token's output by 2^-8 of its share, ~1e-5 of the whole: a bound of flips, not of sums
        assert ((y.double() - ref).norm() / ref.norm()).item() < 3e-5
    else:
        close(y.double(), ref)
    assert torch.equal(on_one_thread(lambda: kernels.moe(x, *weights_, experts, weights, 1.702, 7.0, bf16)), y)


@pytest.mark.parametrize("bf16", [False, True])
def test_moe_tokens_together_equal_each_alone(path, bf16):
    """Continuous batching's MoE: 7 tokens in one call (sharing some experts, each expert read once) give every
    token exactly, bit for bit, what it gets alone."""
    gen = torch.Generator().manual_seed(21 + bf16)
    weights_ = random_experts(gen)
    x, residual = torch.randn(7, 320, generator=gen), torch.randn(7, 320, generator=gen)
    if bf16:
        x, residual = x.bfloat16().float(), residual.bfloat16().float()
    experts = torch.stack([torch.randperm(6, generator=gen)[:3] for _ in range(7)])
    experts[1] = experts[0]  # two tokens with the same experts, in the same order
    weights = torch.softmax(torch.randn(7, 3, generator=gen), -1)
    together = kernels.moe(x, *weights_, experts, weights, 1.702, 7.0, bf16, residual=residual)
    for t in range(7):
        alone = kernels.moe(x[t:t + 1], *weights_, experts[t:t + 1], weights[t:t + 1], 1.702, 7.0, bf16,
                            residual=residual[t:t + 1])
        assert torch.equal(together[t:t + 1], alone), t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keys", [1, 7, 128, 300])
@pytest.mark.parametrize("h,kv,d", [(8, 2, 64), (16, 2, 64), (6, 2, 32)])
def test_attention_one_query_matches_torch(path, dtype, keys, h, kv, d):
    """Decoding's attention (C) against the blocked torch attention, over keys in shuffled (ring) order: query heads
    per KV head as in gpt-oss (8) and fewer (4) take the AVX-512 kernel where the CPU has it, 3 and head_dim 32 the
    head-by-head one."""
    gen = torch.Generator().manual_seed(keys)
    q = torch.randn(1, h, d, generator=gen).to(dtype)
    k = torch.randn(keys, kv, d, generator=gen).to(dtype)
    v = torch.randn(keys, kv, d, generator=gen).to(dtype)
    sinks = torch.randn(h, generator=gen)
    ref = attention(q.float(), k.float(), v.float(), sinks, keys - 1, 0, 0)
    perm = torch.randperm(keys, generator=gen)
    out = kernels.attention_one_query(q[0], k[perm], v[perm], sinks)
    close(out.double().view(1, -1), ref.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keys", [2048, 2500, 5003])
def test_long_context_decoding_attention(dtype, keys):
    """From 2,048 keys the AVX-512 kernel goes KV head by KV head, its quads taking the keys block by block in turn
    (each block read from memory once): the torch reference's result, and bit for bit the one quad by quad (with
    more threads than KV heads, the kernel takes the quads as its units)."""
    gen = torch.Generator().manual_seed(keys)
    h, kv, d = 64, 8, 64
    q = torch.randn(h, d, generator=gen).to(dtype)
    k, v = (torch.randn(keys, kv, d, generator=gen).to(dtype) for _ in range(2))
    sinks = torch.randn(h, generator=gen)
    out = kernels.attention_one_query(q, k, v, sinks)
    close(out.double().view(1, -1), attention(q[None].float(), k.float(), v.float(), sinks, keys - 1, 0, 0).double())
    threads = kernels.kernel_threads()
    kernels.set_num_threads(kv + 1)
    try:
        by_quads = kernels.attention_one_query(q, k, v, sinks)
    finally:
        kernels.set_num_threads(threads)
    assert torch.equal(out, by_quads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries,past,window", [(7, 0, 0), (40, 0, 0), (40, 25, 0), (300, 0, 128), (40, 100, 16)])
@pytest.mark.parametrize("h,kv", [(8, 2), (16, 2)])
def test_attention_prefill_matches_torch(path, dtype, queries, past, window, h, kv):
    """Prefill's attention (C, each query over the keys it sees) against the blocked torch attention: causal, with
    keys from before the block (a cache), with and without a sliding window, queries past a 256-query block; on
    AVX2 queries in units of 8 whose keys start anywhere in a 16-key block."""
    gen = torch.Generator().manual_seed(queries + past + window)
    d, keys = 64, past + queries
    q = torch.randn(queries, h, d, generator=gen).to(dtype)
    k = torch.randn(keys, kv, d, generator=gen).to(dtype)
    v = torch.randn(keys, kv, d, generator=gen).to(dtype)
    sinks = torch.randn(h, generator=gen)
    out = kernels.attention_prefill(q, k, v, sinks, past, window)
    if path == "scalar":  # no portable kernel: the torch path serves there
        assert out is None
        return
    # float32 math on the bf16 values, as the torch path computes attention on the CPU
    ref = attention(q.float(), k.float(), v.float(), sinks, 1000 + past, 1000, window)
    close(out.double(), ref.double())


@pytest.mark.parametrize("window", [0, 128])
def test_attention_prefill_does_not_depend_on_the_chunk(path, window):
    """A prompt's queries get the same attention bit for bit whether they are read in one chunk or in several (the
    engine cuts prompts at --prefill-chunk and around cached prefixes): nothing in a query's sums depends on the
    queries beside it."""
    gen = torch.Generator().manual_seed(7 + window)
    q = torch.randn(300, 16, 64, generator=gen).bfloat16()
    k, v = (torch.randn(300, 2, 64, generator=gen).bfloat16() for _ in range(2))
    sinks = torch.randn(16, generator=gen)
    whole = kernels.attention_prefill(q, k, v, sinks, 0, window)
    if path == "scalar":  # no portable prefill kernel: the torch path serves, whose queries go in fixed blocks
        assert whole is None
        return
    for cut in (1, 37, 200):
        first = kernels.attention_prefill(q[:cut], k[:cut], v[:cut], sinks, 0, window)
        rest = kernels.attention_prefill(q[cut:], k, v, sinks, cut, window)
        assert torch.equal(torch.cat([first, rest]), whole), cut


def test_wrong_calls_raise_instead_of_corrupting_memory(tiny_repo):
    """The C kernels take raw pointers: their Python entry points check every shape, dtype and layout first."""
    import ossie

    gen = torch.Generator().manual_seed(9)
    blocks, scales = random_mxfp4(64, 96, gen)
    x = torch.randn(2, 96, generator=gen)
    with pytest.raises(ValueError, match="blocks"):
        kernels.mxfp4_matmul(x, blocks[:, :2].contiguous(), scales)
    with pytest.raises(ValueError, match="x must be"):
        kernels.mxfp4_matmul(torch.randn(2, 50), blocks, scales)
    with pytest.raises(ValueError, match="bias"):
        kernels.mxfp4_matmul(x, blocks, scales, torch.randn(63))
    with pytest.raises(ValueError, match="w must be a contiguous CPU bfloat16"):
        kernels.bf16_matmul(x, torch.randn(64, 96))
    with pytest.raises(ValueError, match="not contiguous"):
        kernels.bf16_matmul(x, torch.randn(96, 64).bfloat16().t())
    q, k = torch.randn(8, 64), torch.randn(10, 2, 64)
    with pytest.raises(ValueError, match="values"):
        kernels.attention_one_query(q, k, torch.randn(9, 2, 64), torch.randn(8))
    with pytest.raises(ValueError, match="values"):
        kernels.attention_one_query(q, k, k.bfloat16(), torch.randn(8))
    with pytest.raises(ValueError, match="sinks"):
        kernels.attention_one_query(q, k, k, torch.randn(4))
    with pytest.raises(ValueError, match="keys must be"):
        kernels.attention_one_query(q, torch.randn(10, 3, 64), torch.randn(10, 3, 64), torch.randn(8))
    with pytest.raises(ValueError, match="do not fit"):
        kernels.attention_prefill(torch.randn(5, 8, 64), k, k, torch.randn(8), 6, 0)

    e, h, i = 4, 64, 32
    w1b, w1s = random_mxfp4(e * 2 * i, h, gen)
    w2b, w2s = random_mxfp4(e * h, i, gen)
    args = [torch.randn(1, h), w1b.view(e, 2 * i, h // 32, 16), w1s.view(e, 2 * i, h // 32), torch.randn(e, 2 * i),
            w2b.view(e, h, i // 32, 16), w2s.view(e, h, i // 32), torch.randn(e, h), torch.tensor([[0, 3]]),
            torch.tensor([[0.5, 0.5]])]
    kernels.moe(*args, 1.702, 7.0, False)  # the right call works
    for n, bad, match in [(7, torch.tensor([[0, 4]]), "outside"), (8, torch.tensor([[1.0]]), "weights"),
                          (3, torch.randn(e, 2 * i).bfloat16(), "w1_bias"), (0, torch.randn(1, h + 32), "x must be"),
                          (5, w2s.view(e, h, i // 32)[:, :-1], "w2_scales"), (7, torch.tensor([0, 3]), "experts"),
                          (0, torch.randn(h), "x must be")]:
        wrong = list(args)
        wrong[n] = bad
        with pytest.raises(ValueError, match=match):
            kernels.moe(*wrong, 1.702, 7.0, False)

    llm = ossie.LLM(tiny_repo, dtype="bfloat16", progress=False)
    cfg, lw = llm.config, llm.model.w.layers[0]
    cache = torch.zeros(4, cfg.num_kv_heads, cfg.head_dim, dtype=torch.bfloat16)
    rope = torch.ones(cfg.head_dim)
    block = [cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps]
    x = torch.randn(cfg.hidden_size).bfloat16().float()
    kernels.attention_block_one_token(x, lw, rope, rope, cache, cache.clone(), 1, 2, *block)  # works
    with pytest.raises(ValueError, match="slot"):
        kernels.attention_block_one_token(x, lw, rope, rope, cache, cache.clone(), 4, 4, *block)
    with pytest.raises(ValueError, match="k_cache"):
        kernels.attention_block_one_token(x, lw, rope, rope, cache.float(), cache, 1, 2, *block)
    with pytest.raises(ValueError, match="v_cache"):
        kernels.attention_block_one_token(x, lw, rope, rope, cache, cache[:3], 1, 2, *block)
    with pytest.raises(ValueError, match="cos2"):
        kernels.attention_block_one_token(x, lw, rope[:8], rope, cache, cache.clone(), 1, 2, *block)
    with pytest.raises(ValueError, match="qkv_w"):
        kernels.attention_block_one_token(x, dataclasses.replace(lw, qkv_w=lw.qkv_w.float()), rope, rope, cache,
                                          cache.clone(), 1, 2, *block)


@pytest.mark.parametrize("path,prompt_products", [("avx2", "panel"), ("neon", "panel"), ("dotprod", "panel"),
                                                  ("i8mm", "panel"), ("scalar", "float32")])
def test_a_cpu_without_avx512_bf16_runs_no_bf16_gemm(tiny_repo, monkeypatch, path, prompt_products):
    """torch's bf16 GEMM is pathological without AVX-512 BF16 (26.5 s for a 32 x 2880 x 5760 product on a Zen 3): on
    AVX2 and ARM64 a prompt's bf16 products take the kernels' panel GEMM, elsewhere torch's float32 GEMM; either
    gives the bf16 values the reference gives."""
    import torch.nn.functional as F

    import ossie
    from ossie.backends import cpu as cpu_backend

    before = kernels.kernel_path()
    kernels.set_path(path)
    if kernels.kernel_path() != path:
        kernels.set_path(before)
        pytest.skip(f"this CPU has no {path}")
    try:
        llm = ossie.LLM(tiny_repo, dtype="bfloat16", progress=False, enable_prefix_caching=False)
        assert not llm.backend.bf16_gemm and llm.backend.bf16_panel == (prompt_products == "panel")
        dtypes, kernel_rows = [], []
        linear, bf16_matmul = F.linear, cpu_backend.K.bf16_matmul

        def recording(x, w, bias=None):
            dtypes.append(w.dtype)
            return linear(x, w, bias)

        def kernel(x, w, bias=None):
            kernel_rows.append(x.shape[0])
            return bf16_matmul(x, w, bias)

        monkeypatch.setattr(cpu_backend.F, "linear", recording)  # torch.nn.functional's, wherever it is called
        monkeypatch.setattr(cpu_backend.K, "bf16_matmul", kernel)
        tokens = list(range(1000, 1040))  # 40 rows: past the decode kernels' 8
        ours = llm.logits(tokens)
        assert torch.bfloat16 not in dtypes, dtypes
        if prompt_products == "panel":
            assert not dtypes and 40 in kernel_rows
        else:
            assert dtypes and 40 not in kernel_rows
    finally:
        kernels.set_path(before)
    reference = ossie.LLM(tiny_repo, dtype="bfloat16", progress=False, backend="torch").logits(tokens)
    assert ((ours - reference).norm() / reference.norm()) < 0.05


def test_bf16_prompt_rows_do_not_depend_on_the_chunk(path):
    """The AVX2 panel GEMM sums each row as it is summed among any other number of rows (from 9, where it takes over
    from the decode kernels; the scalar and NEON kernels always): a prompt read in other chunks of 9 tokens or more
    gives its rows the same products, bit for bit."""
    if path not in ("avx2", "avxvnni", "scalar", "neon", "dotprod", "i8mm"):
        pytest.skip("the AVX-512 path's prompts go through torch's bf16 GEMM")
    gen = torch.Generator().manual_seed(3)
    w, bias = torch.randn(70, 640, generator=gen).bfloat16(), torch.randn(70, generator=gen)
    x = torch.randn(40, 640, generator=gen).bfloat16().float()
    whole = kernels.bf16_matmul(x, w, bias)
    parts = torch.cat([kernels.bf16_matmul(x[a:b], w, bias) for a, b in ((0, 9), (9, 21), (21, 40))])
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kv_head_grouped_decoding_attention_equals_head_by_head(path, dtype):
    """The AVX2 decoding attention takes a KV head's query heads together (each key row read once for them) where
    every thread gets a KV head; with more threads than KV heads it goes head by head. The loops are swapped, not
    the sums: the two give the same numbers bit for bit."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(64, 64, generator=gen).bfloat16().float()
    k, v = (torch.randn(300, 8, 64, generator=gen).to(dtype) for _ in range(2))
    sinks = torch.randn(64, generator=gen)
    threads = kernels.kernel_threads()
    try:
        kernels.set_num_threads(16)  # more threads than KV heads: head by head
        by_head = kernels.attention_one_query(q, k, v, sinks)
        kernels.set_num_threads(2)
        grouped = kernels.attention_one_query(q, k, v, sinks)
    finally:
        kernels.set_num_threads(threads)
    assert torch.equal(grouped, by_head)
