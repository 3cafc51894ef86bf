"""ossie on Ray Serve: replicas of the engine behind one address, each conversation routed to the replica that holds
its prefix (`pip install -e ".[ray]"`; `ossie serve MODEL --replicas N`). app: the Serve application (an ingress
running ossie's server, the engine replicas); replica: one engine in a replica; remote: the ingress's engine client;
router: the conversation router."""

__all__ = ["ReplicaOptions", "app_builder", "build_app"]


def __getattr__(name: str):
    """app.py's names, imported when asked for (it imports Ray: the other modules here do not need it)."""
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
