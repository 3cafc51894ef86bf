"""Generation through the model runner: chunked prefill and cached decode steps give the logits of one full
forward pass (ring buffer, rope offsets, chunks smaller than the window, prompts longer than both); generate,
chat and sampling."""

import gc
import weakref

import pytest
import torch

import ossie
from ossie.backends.cpu import CpuBackend
from ossie.backends.cpu_kernels import available as kernels_built
from ossie.engine import ModelRunner, SamplingParams, Sequence, sample
from ossie.model.config import ModelConfig
from ossie.special_tokens import CALL, N_ORDINARY
from ossie.synth import write_checkpoint
from tests.helpers import RecordingRunner

PROMPT = torch.randint(0, N_ORDINARY, (300,), generator=torch.Generator().manual_seed(3)).tolist()


def run_greedy(runner: ModelRunner, prompt: list[int], steps: int) -> tuple[Sequence, int]:
    """Step one greedy sequence to its end; returns it and how many steps read its prompt."""
    seq = Sequence(list(prompt), SamplingParams(max_tokens=steps, temperature=0, stop_token_ids=[]))
    prefill_steps = 0
    while not seq.finished:
        (tok,) = runner.run([seq])
        if tok is None or not seq.output:
            prefill_steps += 1
        if tok is not None:
            seq.append(tok)
    return seq, prefill_steps


def check_steps_equal_full_forward(llm: ossie.LLM, chunk: int, prompt: list[int], steps: int) -> None:
    runner = RecordingRunner(llm.model, prefill_chunk=chunk)
    seq, prefill_steps = run_greedy(runner, prompt, steps)
    assert prefill_steps == -(-len(prompt) // chunk)  # the prompt was read chunk by chunk
    full = llm.logits(prompt + seq.output[:-1])
    stepped = torch.stack(runner.seen)  # logits at positions len(prompt)-1 ..
    err = (stepped - full[len(prompt) - 1:]).abs().max()
    assert torch.allclose(stepped, full[len(prompt) - 1:], rtol=1e-4, atol=1e-4), err


@pytest.mark.parametrize("chunk", [512, 300, 129, 128, 50, 7])
def test_chunked_prefill_and_steps_equal_full_forward(tiny_llm, chunk):
    """A 300-token prompt (longer than the 128-token window) read in chunks smaller than, equal to and larger than
    the window (7 divides neither), then 40 decode steps: every sampled position's logits equal the full forward
    pass. Chunks that start past the window on a sliding layer must still see its last 127 keys."""
    check_steps_equal_full_forward(tiny_llm, chunk, PROMPT, 40)


@pytest.fixture(scope="module")
def wide_llm(tmp_path_factory):
    """A small model with gpt-oss's head_dim (64) and 4 query heads per KV head, the shape for which the CPU
    backend reads prefill attention with its AVX-512 kernel (where the CPU has it)."""
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=2, head_dim=64, num_experts=4,
                      experts_per_token=2, intermediate_size=64)
    folder = write_checkpoint(tmp_path_factory.mktemp("wide"), cfg, "hf", seed=2, progress=False)
    return ossie.LLM(folder, dtype="float32", progress=False)


@pytest.mark.parametrize("chunk", [50, 7])
def test_chunked_prefill_with_head_dim_64(wide_llm, chunk):
    check_steps_equal_full_forward(wide_llm, chunk, PROMPT, 20)


def test_cache_sizes(tiny_llm):
    """The ring of a sliding layer holds the window only; full layers grow from a small start as tokens come
    (max_tokens defaults to the rest of a 131k context in chat and the server: the cache must not reserve it)."""
    runner = tiny_llm.runner
    seq = Sequence(PROMPT[:10], SamplingParams(max_tokens=130_000, temperature=0, stop_token_ids=[]))
    runner.run([seq])
    full = [i for i, sliding in enumerate(seq.cache.sliding) if not sliding]
    assert all(seq.cache.k[i].shape[0] <= 10 + 256 for i in full)
    assert all(seq.cache.k[i].shape[0] == 128 for i, s in enumerate(seq.cache.sliding) if s)
    runner.kv.free(seq)
    assert seq.cache is None
    tokens = list(tiny_llm.generate(PROMPT[:10], max_tokens=300, temperature=0, stop_token_ids=[]))
    assert tokens == list(ossie.LLM(tiny_llm.path, dtype="float32", progress=False, prefill_chunk=3).generate(
        PROMPT[:10], max_tokens=300, temperature=0, stop_token_ids=[]))


def test_generate_greedy_matches_argmax_of_full_forward(tiny_llm):
    out = list(tiny_llm.generate(PROMPT[:20], max_tokens=12, temperature=0.0, stop_token_ids=[]))
    assert len(out) == 12 and all(isinstance(t, int) for t in out)
    full = tiny_llm.logits(PROMPT[:20] + out)
    assert full[19:-1].argmax(-1).tolist() == out


def test_generate_and_chat_with_small_chunks(tiny_repo, tiny_llm):
    """generate and chat on an LLM reading prompts 50 tokens at a time give what the default (one chunk) gives,
    on prompts longer than the window."""
    small = ossie.LLM(tiny_repo, dtype="float32", progress=False, prefill_chunk=50)
    assert list(small.generate(PROMPT, max_tokens=16, temperature=0, stop_token_ids=[])) == \
        list(tiny_llm.generate(PROMPT, max_tokens=16, temperature=0, stop_token_ids=[]))
    messages = [{"role": "user", "content": "Tell me about the sea. " * 30}]
    assert len(tiny_llm.render(messages)) > 200
    a, b = small.chat(messages, max_tokens=24, temperature=0), tiny_llm.chat(messages, max_tokens=24, temperature=0)
    assert (a.reasoning, a.content, a.completion_tokens) == (b.reasoning, b.content, b.completion_tokens)


def test_generate_seed_reproducible_and_stops(tiny_llm):
    a = list(tiny_llm.generate(PROMPT[:10], max_tokens=16, temperature=1.0, seed=7, stop_token_ids=[]))
    b = list(tiny_llm.generate(PROMPT[:10], max_tokens=16, temperature=1.0, seed=7, stop_token_ids=[]))
    assert a == b and len(a) == 16
    # stop at the third generated token: it is yielded and generation ends there
    c = list(tiny_llm.generate(PROMPT[:10], max_tokens=16, temperature=1.0, seed=7, stop_token_ids=[a[2]]))
    assert c == a[: a.index(a[2]) + 1]


def test_generate_default_stops_at_harmony_tokens(tiny_llm, monkeypatch):
    """stop_token_ids=None stops at <|call|> (and <|return|>): a runner that always samples <|call|> stops at once."""
    monkeypatch.setattr(tiny_llm.runner, "sample", lambda seq, logits: CALL)
    assert list(tiny_llm.generate(PROMPT[:5], max_tokens=10)) == [CALL]


def test_stopping_early_frees_the_cache(tiny_llm, monkeypatch):
    seqs = []
    run = tiny_llm.runner.run

    def spy(batch, sizes=None):
        seqs.extend(batch)
        return run(batch, sizes)

    monkeypatch.setattr(tiny_llm.runner, "run", spy)
    tokens = tiny_llm.generate(PROMPT[:10], max_tokens=50, temperature=0)
    next(tokens)
    assert seqs[-1].cache is not None
    tokens.close()  # the consumer stops early
    assert seqs[-1].cache is None


def test_a_discarded_llm_frees_its_weights(tiny_repo):
    """Loading freezes what it made out of the garbage collector's walks (gc.freeze): that must not keep a model
    alive once its user lets it go (reference counting frees it; nothing of it may sit in a reference cycle)."""
    llm = ossie.LLM(tiny_repo, progress=False)
    list(llm.generate(PROMPT[:5], max_tokens=3))
    model, weights = weakref.ref(llm.model), weakref.ref(llm.model.w.unembedding)
    del llm
    gc.collect()
    assert model() is None and weights() is None


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
    with pytest.raises(ValueError, match="prefill_chunk"):
        ModelRunner(tiny_llm.model, prefill_chunk=0)


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


@pytest.mark.skipif(not kernels_built(), reason="the C kernels were not built (no C compiler at install)")
def test_fused_decode_step_equals_op_by_op(tiny_repo, path):
    """bf16 decoding on the CPU runs each layer as two C calls; it must give the op-by-op path's logits bit for bit
    (a batch decodes op by op), across the sliding window's ring buffer (100-token prompt + 40 steps > 128), on
    every kernel path. (The norms were torch's op by op and C's in the fused blocks: at the 20b's width their
    sums' last bits differed often enough to change tokens.)"""
    fused = ossie.LLM(tiny_repo, dtype="bfloat16", progress=False, backend=CpuBackend(fused_decode=True))
    plain = ossie.LLM(tiny_repo, dtype="bfloat16", progress=False, backend=CpuBackend(fused_decode=False))

    def run(llm: ossie.LLM) -> tuple[list[int], torch.Tensor]:
        runner = RecordingRunner(llm.model)
        seq, _ = run_greedy(runner, PROMPT[:100], 41)
        return seq.output, torch.stack(runner.seen[1:])  # the decode steps' logits

    fused_tokens, fused_logits = run(fused)
    plain_tokens, plain_logits = run(plain)
    assert fused_tokens == plain_tokens
    assert torch.equal(fused_logits, plain_logits), (fused_logits - plain_logits).abs().max()
