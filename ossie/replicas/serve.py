"""`ossie serve MODEL --replicas N`: join a Ray cluster (or start a local one), run the application (app.py) on
it at --host:--port, and take it down again on SIGTERM or Ctrl-C, the replicas' running requests drained first
(--shutdown-timeout)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time

import ray
from ray import serve

from ..engine_args import EngineArgs
from ..server import ServerOptions
from .app import ReplicaOptions, build_app

log = logging.getLogger("ossie")
APP_NAME = "ossie"


def serve_replicas(args: argparse.Namespace, options: ServerOptions) -> int:
    count = None if args.replicas == "auto" else args.replicas
    if args.threads is None:  # each engine would take every core (and Ray reserve one): share this machine's
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        args.threads = max(1, cores // (count or args.max_replicas))
        log.info("each replica takes %d threads (--threads to choose)", args.threads)
    engine_args = EngineArgs.from_cli_args(args)
    replicas = ReplicaOptions(replicas=count, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                              num_cpus=args.threads, drain_s=args.shutdown_timeout,
                              num_gpus=1.0 if str(engine_args.device).startswith("cuda") else 0.0)
    t0 = time.time()
    if args.ray_address:
        log.info("joining the Ray cluster at %s", args.ray_address)
        ray.init(address=args.ray_address, log_to_driver=args.verbose)
    else:
        log.info("starting a local Ray cluster")
        ray.init(include_dashboard=False, log_to_driver=args.verbose)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        shown = f"auto-scaled {args.min_replicas}-{args.max_replicas}" if count is None else str(count)
        log.info("deploying %s replicas of %s (each loads the model)", shown, engine_args.model)
        serve.run(build_app(engine_args, args.served_model_name, options, replicas), name=APP_NAME,
                  route_prefix="/")
        log.info("ready in %.0f s: serving the OpenAI API at http://%s:%d/v1 and Ollama's at /api, through %s "
                 "replicas", time.time() - t0, args.host, args.port, shown)
        if options.webui:
            log.info("chat page: http://%s:%d/", "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host,
                     args.port)
        while not stop.wait(1.0):  # a wait that signals can interrupt on every Python
            pass
        log.info("stopping: the replicas' requests in flight have %.0f s to finish", args.shutdown_timeout)
        serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
