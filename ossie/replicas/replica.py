"""`EngineReplica`: one ossie engine in a Ray Serve replica. It loads the model once, steps it on its engine thread,
and streams each request's events back to the ingress (remote.py) as `Update`s: the events that came since the
last update, and whether the request is admitted and how much of its prompt the prefix cache served (what the
server's `Run` reads of a local handle).

Events are batched: an update carries every event that arrived while the last one was in flight, so a fast model
does not pay Ray's per-item cost for each token. Closing the stream (the client left, a stop string, a drain
deadline at the ingress) cancels the request here and frees its KV memory at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..engine import CacheScope, Cancelled, EngineStats, Event, Failed, Finished, SamplingParams
from ..engine_args import EngineArgs
from ..model.config import ModelConfig

ADMIT_POLL_S = 0.05  # how often a waiting request's admission is looked for (a long prompt's first token is late)


@dataclass
class Update:
    """cached_tokens: as the handle said when the update was made (0 may still be told just after the admission: the
    engine looks the prompt up in the prefix cache after it admits it; an update with a token says it right)."""
    events: list[Event] = field(default_factory=list)
    admitted: bool = False
    cached_tokens: int = 0


@dataclass(frozen=True)
class ReplicaInfo:
    """What the ingress needs to know of the model: it holds no weights itself."""
    config: ModelConfig
    path: Path
    weight_bytes: int
    device: str
    max_running: int


class EngineReplica:
    """The deployment's class (app.py wraps it in `serve.deployment`): `engine_args` as `ossie.LLM` takes them."""

    def __init__(self, engine_args: EngineArgs):
        from ..chat import constraints
        from ..llm import LLM

        options = dataclasses.asdict(engine_args)
        self.llm = LLM(options.pop("model"), progress=False, **options)
        self.engine = self.llm.engine.start()
        constraints.prepare()

    def info(self) -> ReplicaInfo:
        return ReplicaInfo(self.llm.config, self.llm.path, self.llm.model.w.nbytes(), str(self.llm.device),
                           self.engine.max_running)

    def snapshot(self) -> EngineStats:
        return self.engine.snapshot()

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine thread died serves nothing (its requests would wait for
        ever); raising here has Ray replace it."""
        if not self.engine.background:
            raise RuntimeError("the engine thread is not running")

    async def generate(self, prompt: list[int], params: SamplingParams, steering, timeout_s: float | None,
                       scope: CacheScope, route: tuple[int, ...] = ()):
        """The request's updates, up to its last event (route: the router's, read there and not here)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        handle = self.engine.submit(prompt, params, steering, lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                                    timeout_s, scope)
        admitted = False
        try:
            while True:
                try:
                    first = await asyncio.wait_for(events.get(), None if admitted else ADMIT_POLL_S)
                    batch = [first]
                except TimeoutError:
                    batch = []
                while not events.empty():
                    batch.append(events.get_nowait())
                if not batch and (admitted or handle.waiting):
                    continue
                admitted = True
                yield Update(batch, True, handle.cached_tokens)
                if batch and isinstance(batch[-1], Finished | Failed | Cancelled):
                    return
        finally:
            handle.cancel()  # a no-op once it ended; else the stream was closed early: stop generating
