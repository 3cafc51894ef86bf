"""A local Ray cluster bound to 127.0.0.1 with ossie's Serve application on it: two engine replicas of the tiny
checkpoint behind the ingress. Without Ray these tests skip, unless OSSIE_REQUIRE_RAY is set (.ci/run installs
the `ray` extra and sets it), when they fail."""

import os

import httpx
import pytest

from tests.helpers.server import free_port

KEYS = {"key-alice": "alice", "key-bob": "bob", **{f"key-probe{i}": f"probe{i}" for i in range(4)}}
ALICE, BOB, *PROBES = ({"authorization": f"Bearer {k}"} for k in KEYS)
SLOTS = 2  # requests generating at once in one replica (max_num_seqs; Ray's max_ongoing_requests)


def _ray():
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        if os.environ.get("OSSIE_REQUIRE_RAY"):
            raise
        pytest.skip(f"Ray Serve is not installed ({e}): pip install -e '.[ray]'")


class Cluster:
    def __init__(self, checkpoint):
        import ray
        from ray import serve

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        for who in ("HANDLE", "REPLICA"):  # the autoscaler hears of requests in flight every second, not every 10
            os.environ.setdefault(f"RAY_SERVE_{who}_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.checkpoint = checkpoint
        ray.init(num_cpus=6, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 object_store_memory=100 * 2**20)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.deploy(2)

    def deploy(self, replicas: int | None, drain_s: float = 60.0, **scaling) -> None:
        """The application with `replicas` engines (None: autoscaled as `scaling` says)."""
        from ray import serve

        from ossie.engine_args import EngineArgs
        from ossie.replicas import ReplicaOptions, build_app
        from ossie.server import ServerOptions

        args = EngineArgs(self.checkpoint, num_threads=1, max_num_seqs=SLOTS)
        serve.run(build_app(args, ["tiny"], ServerOptions(api_keys=KEYS),
                            ReplicaOptions(replicas=replicas, drain_s=drain_s, **scaling)), name="ossie",
                  route_prefix="/")

    def replica_pids(self) -> list[int]:
        """The engine replicas' processes (local: Ray titles each actor's process with its class)."""
        import psutil

        return [p.pid for p in psutil.process_iter(["cmdline"])
                if any("ServeReplica:ossie:OssieEngine" in part for part in p.info["cmdline"] or ())]

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="package")
def cluster(tiny_repo):
    _ray()
    c = Cluster(tiny_repo)
    assert httpx.get(c.url + "/health", timeout=30).status_code == 200
    yield c
    c.close()
