"""What several test files use to drive the engine: a runner that records logits, and the engine run to its end."""

import threading
from collections.abc import Iterator

import torch

from ossie.engine import Engine, Finished, ModelRunner, SamplingParams, Sequence, Token


class RecordingRunner(ModelRunner):
    """The model runner, keeping the logits every token was sampled from (per sequence id)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []
        self.by_sequence: dict[int, list[torch.Tensor]] = {}

    def sample(self, seq, logits):
        self.seen.append(logits.float().clone())
        self.by_sequence.setdefault(seq.id, []).append(self.seen[-1])
        return super().sample(seq, logits)


def use_runner(llm, runner):
    """Make `llm` run on `runner` (a scripted or recording one): its engine is made anew around it, with the old
    one's request limit (--max-running). Returns llm."""
    llm.runner, llm.engine = runner, Engine(runner, max_running=llm.engine.max_running)
    return llm


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=kw.pop("temperature", 0), stop_token_ids=[], **kw)


def run_engine(engine: Engine, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams,
               on_token=None) -> tuple[list[list[int]], list]:
    """Submit the prompts at once; (their tokens, their handles) when every one has ended. on_token(i, n, handles)
    is called on the engine thread after request i's n-th token."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    done, out, ended, handles = threading.Event(), [[] for _ in prompts], [], []

    def record(i, event):
        if isinstance(event, Token):
            out[i].append(event.id)
            if on_token is not None:
                on_token(i, len(out[i]), handles)
        else:
            ended.append((i, event))
            if len(ended) == len(prompts):
                done.set()

    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        handles.append(engine.submit(prompt, p, None, lambda event, i=i: record(i, event)))
    assert done.wait(300), "the engine did not finish"
    assert all(isinstance(e, Finished) for _, e in ended) or on_token is not None, ended
    return out, handles


def stream(runner: ModelRunner, seq: Sequence) -> Iterator[int]:
    """Step one sequence to its end through the runner alone (no engine), yielding its tokens: the reference that
    the engine's scheduling is held to."""
    try:
        while not seq.finished:
            (tok,) = runner.run([seq])
            if tok is not None:
                seq.append(tok)
                yield tok
    finally:
        runner.kv.free(seq)


def alone(runner: ModelRunner, prompt: list[int], params: SamplingParams) -> list[int]:
    """What a prompt gives by itself (its own sequence stepped to its end)."""
    return list(stream(runner, Sequence(list(prompt), params)))


def step_together(runner: ModelRunner, seqs: list[Sequence]) -> None:
    """Step sequences as one batch (each computing all it has left) until every one has finished."""
    while any(not s.finished for s in seqs):
        batch = [s for s in seqs if not s.finished]
        for seq, tok in zip(batch, runner.run(batch), strict=True):
            if tok is not None:
                seq.append(tok)
