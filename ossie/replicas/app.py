"""The Ray Serve application: an ingress deployment that runs ossie's server (the FastAPI app of `ossie serve`, every
endpoint, the key check, the chat page, the Responses store) over a `RemoteEngine`, and a deployment of engine
replicas behind the conversation router.

One ingress replica: it holds the Responses store (a `previous_response_id` resolves whichever engine replica the
next turn reaches) and the router's memory of which replica holds which prefix. Its work is light (parsing,
tokenizing in its worker processes, streaming); the engines are where the time goes.

`ossie serve MODEL --replicas N` builds it (cli.py); `serve run ossie.replicas:app_builder model=...` or a Serve
config file whose import_path is `ossie.replicas:app_builder` builds it from plain arguments (README "Replicas").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from ..engine_args import EngineArgs
from ..server import ServerOptions, Serving, default_model_name, serving_app
from .remote import RemoteEngine
from .replica import EngineReplica
from .router import ConversationRouter

HEALTH_CHECK_PERIOD_S = 5.0
ROUTERS = {"conversation": ConversationRouter, "pow2": None}  # None: Ray Serve's own
INGRESS_MAX_ONGOING = 4096  # the ingress only relays: its own limit is the server's queue limit (429s), not Ray's


@dataclass
class ReplicaOptions:
    """How many engine replicas and what each takes. replicas None: autoscaled between min_replicas and
    max_replicas on ongoing requests (target_ongoing_requests per replica). num_cpus: the CPUs Ray reserves for a
    replica (its engine threads; None: engine_args.num_threads, or 1); num_gpus: 1 to give it a GPU. drain_s: how
    long a replica being stopped (scaled down, redeployed) lets its running requests finish. router:
    "conversation" (router.py), or "pow2", Ray Serve's default (the less loaded of two replicas drawn at random:
    what affinity is measured against)."""
    replicas: int | None = 1
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0
    upscale_delay_s: float = 30.0  # Ray's defaults: up after 30 s above the target, down after 10 min below it
    downscale_delay_s: float = 600.0
    num_cpus: float | None = None
    num_gpus: float = 0.0
    drain_s: float = 30.0
    router: str = "conversation"

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {self.router!r}")
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"replicas must be >= 1 or 'auto', got {self.replicas}")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas} and "
                             f"{self.max_replicas}")

    @property
    def most(self) -> int:
        return self.max_replicas if self.replicas is None else self.replicas


@serve.ingress()
class Ingress:
    """ossie's server over the replicas (names: the served model names; None: the checkpoint folder's)."""

    async def __init__(self, replicas: DeploymentHandle, names: list[str] | None, options: ServerOptions,
                       count: int):
        info = await replicas.info.remote()
        self.engine = RemoteEngine(replicas, info, count)
        self.serving = Serving(self.engine, info.config, list(names or [default_model_name(info.path)]), options,
                               model_path=info.path, weight_bytes=info.weight_bytes, device=info.device)

    def __serve_build_asgi_app__(self):
        return serving_app(self.serving)


def build_app(engine_args: EngineArgs, names: list[str] | None = None, options: ServerOptions | None = None,
              replicas: ReplicaOptions | None = None):
    """The application to `serve.run`: engine replicas as `replicas` says, each loading `engine_args`' model."""
    options, replicas = options or ServerOptions(), replicas or ReplicaOptions()
    cpus = replicas.num_cpus or engine_args.num_threads or 1
    scaling: dict[str, Any] = {"num_replicas": replicas.replicas} if replicas.replicas is not None else {
        "autoscaling_config": AutoscalingConfig(min_replicas=replicas.min_replicas,
                                                max_replicas=replicas.max_replicas,
                                                target_ongoing_requests=replicas.target_ongoing_requests,
                                                upscale_delay_s=replicas.upscale_delay_s,
                                                downscale_delay_s=replicas.downscale_delay_s)}
    engines = serve.deployment(EngineReplica, name="OssieEngine").options(
        **scaling, max_ongoing_requests=engine_args.max_num_seqs,
        ray_actor_options={"num_cpus": cpus, "num_gpus": replicas.num_gpus},
        health_check_period_s=HEALTH_CHECK_PERIOD_S, graceful_shutdown_timeout_s=replicas.drain_s,
        **({"request_router_config": RequestRouterConfig(request_router_class=ROUTERS[replicas.router])}
           if ROUTERS[replicas.router] else {}))
    ingress = serve.deployment(Ingress, name="OssieIngress").options(
        num_replicas=1, max_ongoing_requests=INGRESS_MAX_ONGOING, ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=replicas.drain_s)
    return ingress.bind(engines.bind(engine_args), names, options, replicas.most)


def app_builder(args: dict[str, Any]):
    """For `serve run ossie.replicas:app_builder model=PATH replicas=2 ...` and Serve config files: `model` and any
    EngineArgs field, `replicas` (a number or "auto"), min_replicas, max_replicas, num_cpus, num_gpus, drain_s,
    router, api_key, served_model_name."""
    args = dict(args)
    fields = {f for f in EngineArgs.__dataclass_fields__}
    engine = EngineArgs(**{k: _number(v) for k, v in args.items() if k in fields and k != "model"},
                        model=args["model"])
    count = args.get("replicas", 1)
    replicas = ReplicaOptions(replicas=None if count == "auto" else int(count),
                              **{k: _number(args[k]) for k in ("min_replicas", "max_replicas", "num_cpus",
                                                               "num_gpus", "drain_s", "router") if k in args})
    key = args.get("api_key")
    options = ServerOptions(api_keys={key: "default"} if key else {})
    names = [args["served_model_name"]] if args.get("served_model_name") else None
    return build_app(engine, names, options, replicas)


def _number(value: Any) -> Any:
    """`serve run`'s key=value arguments come as text."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)
