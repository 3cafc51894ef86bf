"""`ConversationRouter`: Ray Serve's request router for ossie's replicas, keeping each conversation on the replica
whose prefix cache holds it.

A request is routed on the keys of its prompt's blocks as the replicas' prefix caches key them (remote.route_keys:
harmony-rendered tokens, `BLOCK_SIZE` to a block, each key chained over the blocks before it and over the owner),
not on raw text: two requests share a key exactly when a replica could serve one's block to the other. The router
remembers which replica each key was sent to; a request goes to the replica that holds its longest remembered
prefix if that prefix is at least half of its prompt's blocks (AFFINITY) and that replica is not full (every slot
taken: its queue length at its max_ongoing_requests). Otherwise it goes to the least loaded replica: a new
conversation shares only the harmony header's first block with the others (the same for every request of a
principal), and once stuck to that block's holder, eight new conversations went to one replica of four; a full
holder would make the request wait, where re-reading the prefix elsewhere costs less. sglang-router's cache-aware
policy decides alike (its cache threshold, 0.5).

Privacy: the keys chain in the request's cache owner (its API principal), so one principal's conversation never
draws another's to its replica: routing reveals no more than the caches do (nothing), and keys are hashes, never
text. The memory of keys is bounded (the oldest forgotten first) and lives in the ingress's process, with its one
router.
"""

from __future__ import annotations

import random
from collections import OrderedDict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

AFFINITY = 0.5  # the share of a prompt's blocks its holder must have for the request to go there
REMEMBERED_KEYS = 200_000  # about 50 MB of the ingress's memory at most


class ConversationRouter(RequestRouter):
    """Without FIFOMixin: a replica chosen for a request serves that request (Ray's default matching), not the
    oldest one waiting, which may belong to another conversation."""

    # Ray drops a replica from a round when its queue length comes later than this (0.1 s by default). A replica in
    # a long step of a big model may answer late, and dropping the holder for it costs the whole prefix read again
    # elsewhere: wait longer.
    queue_len_response_deadline_s = 0.5

    def initialize_state(self, **kwargs) -> None:
        self.holders: OrderedDict[int, ReplicaID] = OrderedDict()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        keys = pending_request.kwargs.get("route", ()) if pending_request is not None else ()
        by_id = {r.replica_id: r for r in candidate_replicas}
        # the longest prefix a live replica holds: `held` blocks, on `holder`
        held, holder = next(((i + 1, by_id[self.holders[k]]) for i, k in reversed(list(enumerate(keys)))
                             if self.holders.get(k) in by_id), (0, None))
        if held < AFFINITY * len(keys):
            holder = None
        others = sorted((r for r in candidate_replicas if r is not holder), key=lambda r: (self._load(r),
                                                                                          random.random()))
        if holder is not None and self._load(holder) < holder.max_ongoing_requests:
            return [[holder], others]
        return [others] if holder is None else [others, [holder]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        for k in pending_request.kwargs.get("route", ()):
            self.holders[k] = replica_id
            self.holders.move_to_end(k)
        while len(self.holders) > REMEMBERED_KEYS:
            self.holders.popitem(last=False)

    def _load(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0
