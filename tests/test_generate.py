"""Generation with the KV cache: step-by-step logits equal a full forward pass (ring buffer, rope offsets)."""

import pytest
import torch

import ossie.llm
from ossie.sampling import SamplingParams, sample

PROMPT = torch.randint(0, 199_998, (100,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.mark.parametrize("chunk", [512, 7, 128])
def test_cached_steps_equal_full_forward(tiny_llm, monkeypatch, chunk):
    """Prefill in chunks (7 does not divide the window), then decode past the window: every step's logits
    must equal the full forward pass over the whole sequence."""
    monkeypatch.setattr(ossie.llm, "PREFILL_CHUNK", chunk)
    cache = tiny_llm.new_cache(4)  # deliberately small: full-attention buffers must grow
    steps = [tiny_llm.prefill(torch.tensor(PROMPT), cache)]
    seq = list(PROMPT)
    for _ in range(60):  # positions 100..160: crosses 128 and wraps the ring buffer
        tok = int(steps[-1].argmax())
        seq.append(tok)
        steps.append(tiny_llm.model.forward(torch.tensor([tok]), cache, last_only=True)[-1])
    full = tiny_llm.logits(seq)
    stepped = torch.stack(steps)  # logits at positions 99..159
    assert torch.allclose(stepped, full[len(PROMPT) - 1:], rtol=1e-4, atol=1e-4), (stepped - full[99:]).abs().max()
    assert cache.k[0].shape[0] == 128  # sliding layer: the ring holds the window only
    assert cache.k[1].shape[0] >= 160


def test_generate_greedy_matches_argmax_of_full_forward(tiny_llm):
    out = list(tiny_llm.generate(PROMPT[:20], max_tokens=12, temperature=0.0, stop_token_ids=[]))
    assert len(out) == 12 and all(isinstance(t, int) for t in out)
    full = tiny_llm.logits(PROMPT[:20] + out)
    assert full[19:-1].argmax(-1).tolist() == out


def test_generate_seed_reproducible_and_stops(tiny_llm):
    a = list(tiny_llm.generate(PROMPT[:10], max_tokens=16, temperature=1.0, seed=7, stop_token_ids=[]))
    b = list(tiny_llm.generate(PROMPT[:10], max_tokens=16, temperature=1.0, seed=7, stop_token_ids=[]))
    assert a == b and len(a) == 16
    # stop at the third generated token: it is yielded and generation ends there
    c = list(tiny_llm.generate(PROMPT[:10], max_tokens=16, temperature=1.0, seed=7, stop_token_ids=[a[2]]))
    assert c == a[: a.index(a[2]) + 1]


def test_generate_default_stops_at_harmony_tokens(tiny_llm, monkeypatch):
    def fake_sample(logits, params, generator=None):
        return 200012  # <|call|>

    monkeypatch.setattr(ossie.engine, "sample", fake_sample)
    assert list(tiny_llm.generate(PROMPT[:5], max_tokens=10)) == [200012]


def test_bad_token_ids_raise(tiny_llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_llm.logits([1, 2, 201088])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_llm.generate([-1])
    with pytest.raises(ValueError, match="empty"):
        tiny_llm.logits([])
    with pytest.raises(ValueError, match="max_tokens"):
        tiny_llm.generate([1], max_tokens=0)
    with pytest.raises(ValueError, match="context"):
        tiny_llm.generate([1], max_tokens=200_000)


def test_sampling_filters():
    logits = torch.tensor([5.0, 4.0, 3.0, -10.0])
    g = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingParams(temperature=0)) == 0
    assert {sample(logits, SamplingParams(top_k=1), g) for _ in range(20)} == {0}
    assert {sample(logits, SamplingParams(top_k=2), g) for _ in range(200)} == {0, 1}
    # probabilities ~0.665, 0.245, 0.090: top_p=0.8 keeps two tokens, min_p=0.3 keeps those >= 0.2
    assert {sample(logits, SamplingParams(top_p=0.8), g) for _ in range(200)} == {0, 1}
    assert {sample(logits, SamplingParams(min_p=0.3), g) for _ in range(200)} == {0, 1}
    assert {sample(logits, SamplingParams(temperature=100.0), g) for _ in range(400)} == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        SamplingParams(top_p=0).validate()


def test_kv_cache_grows_instead_of_reserving_max_tokens(tiny_llm):
    """max_tokens defaults to the rest of a 131k context in chat and the server: the cache must not reserve it."""
    from ossie.engine import Generation
    from ossie.sampling import SamplingParams

    prompt = torch.tensor(PROMPT[:10])
    gen = Generation(tiny_llm, prompt, SamplingParams(max_tokens=130_000, temperature=0, stop_token_ids=[]))
    full = [i for i, sliding in enumerate(gen.cache.sliding) if not sliding]
    assert all(gen.cache.k[i].shape[0] <= 10 + 256 for i in full)
    for _ in range(300):  # past the initial room: the cache grows, and decoding stays exact
        gen.step()
    assert all(gen.cache.k[i].shape[0] >= 300 for i in full)
    assert gen.tokens == list(tiny_llm.generate(PROMPT[:10], max_tokens=300, temperature=0, stop_token_ids=[]))


def test_fused_decode_step_equals_op_by_op(tiny_repo, monkeypatch):
    """bf16 decoding on the CPU runs each attention block as one C call; it must give the op-by-op path's logits,
    across the sliding window's ring buffer (100-token prompt + 40 steps > 128)."""
    from ossie import kernels, model

    if not kernels.fast_kernels():
        pytest.skip("C kernels not built")
    llm = ossie.LLM(tiny_repo, dtype="bfloat16", progress=False)
    prompt = torch.tensor(PROMPT)

    def run(fused: bool) -> tuple[list[int], torch.Tensor]:
        monkeypatch.setattr(model, "FUSED_DECODE", fused)
        cache = llm.new_cache(200)
        logits = llm.model.forward(prompt, cache, last_only=True)[-1]
        tokens, steps = [], []
        for _ in range(40):
            tokens.append(int(logits.argmax()))
            logits = llm.model.forward(torch.tensor(tokens[-1:]), cache, last_only=True)[-1]
            steps.append(logits)
        return tokens, torch.stack(steps)

    fused_tokens, fused_logits = run(True)
    plain_tokens, plain_logits = run(False)
    assert fused_tokens == plain_tokens
    # the same bf16 roundings in the same places; only float32 sums may differ in order
    err = (fused_logits - plain_logits).norm(dim=-1) / plain_logits.norm(dim=-1)
    assert err.max() < 1e-3, err
