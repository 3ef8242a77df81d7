"""Ray Serve: the same FastAPI app (``serving.app``), one engine per replica, one replica per GPU.

Ray's HTTP proxy routes each request (a POST, or a whole WebSocket stream) to a replica with room
(``max_ongoing_requests``, by default the replica's stream limit) and streams the replica's answer back.
Each replica loads its own engine on the GPU Ray gives it (``CUDA_VISIBLE_DEVICES``, so device "auto" is
that GPU); the run records say which replica made them (``served_by``).

From Python: ``serve.run(build_app("tiny", num_replicas=2))``. From the command line, with Ray's CLI:
``serve run streamt1_engine.serving.ray_app:app_builder model=tiny num_replicas=2 gpus_per_replica=1``
(every ``build_app`` argument below as ``key=value``; ``allowed_hosts`` and ``allowed_origins`` comma-separated;
``api_key``, else ``$STREAMT1_API_KEY`` where ``serve run`` runs)."""
from __future__ import annotations

from ..errors import require
from .limits import ServerLimits
from .security import AccessPolicy


class StreamT1Replica:
    """The deployment's class; its ASGI app (engine and routes) is built on the replica by ``build_app``."""


def build_app(model: str = "tiny", *, num_replicas: int = 1, gpus_per_replica: float = 1.0,
              cpus_per_replica: float = 1.0, engine_options: dict | None = None, limits: ServerLimits | None = None,
              submit_options: dict | None = None, max_ongoing_requests: int | None = None,
              name: str = "streamt1", access: AccessPolicy | None = None):
    """A Ray Serve application of ``num_replicas`` engine replicas. ``gpus_per_replica``: 1 gives each replica a
    GPU of its own (0 on a CPU cluster). ``engine_options``: ``StreamT1Engine.from_pretrained`` keywords
    (``max_streams`` defaults to the server's stream limit). ``limits`` / ``submit_options`` as for
    ``create_app``. ``max_ongoing_requests``: requests Ray sends one replica at once (default
    ``limits.max_streams``; more wait in Ray's queue for a free replica). ``access``: Host, Origin and token
    checks as for ``create_app`` (default: its defaults, the API key from ``$STREAMT1_API_KEY`` where this
    runs); the replicas do not know the proxy's address, so names other than loopback and IP addresses
    need ``allowed_hosts``."""
    from ray import serve

    limits = limits or ServerLimits()
    require(isinstance(num_replicas, int) and num_replicas >= 1, f"num_replicas must be >= 1, got {num_replicas!r}")
    require(gpus_per_replica >= 0 and cpus_per_replica >= 0, "gpus_per_replica and cpus_per_replica must be >= 0")
    options = {"max_streams": limits.max_streams, **(engine_options or {})}
    submit = dict(submit_options or {})
    access = access if access is not None else AccessPolicy.from_environment()

    def build_asgi_app():  # runs on each replica, inside its Ray actor
        from ..engine import StreamT1Engine
        from .app import create_app

        engine = StreamT1Engine.from_pretrained(model, **options)
        replica = serve.get_replica_context().replica_id.unique_id
        return create_app(engine, limits, submit_options=submit, instance=replica, close_engine=True, access=access)

    deployment = serve.deployment(
        serve.ingress(build_asgi_app)(StreamT1Replica), name=name, num_replicas=num_replicas,
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
        max_ongoing_requests=max_ongoing_requests or limits.max_streams)
    return deployment.bind()


def app_builder(args: dict):
    """For ``serve run streamt1_engine.serving.ray_app:app_builder key=value ...`` (values arrive as text)."""
    known = {"model": str, "num_replicas": int, "gpus_per_replica": float, "cpus_per_replica": float,
             "max_streams": int, "max_chunks": int, "max_candidates": int, "max_ongoing_requests": int,
             "device": str, "dtype": str, "short_reward": str, "long_reward": str, "final_reward": str,
             "allowed_hosts": str, "allowed_origins": str, "api_key": str}
    unknown = sorted(set(args) - set(known))
    require(not unknown, f"unknown arguments {unknown}; known: {sorted(known)}")
    values = {k: known[k](v) for k, v in args.items()}
    limits = ServerLimits(**{k: values.pop(k) for k in ("max_streams", "max_chunks", "max_candidates") if k in values})
    engine_options = {k: values.pop(k) for k in ("device", "dtype") if k in values}
    submit_options = {k: values.pop(k) for k in ("short_reward", "long_reward", "final_reward") if k in values}
    access = AccessPolicy.from_environment(**{k: values.pop(k) for k in ("allowed_hosts", "allowed_origins",
                                                                          "api_key") if k in values})
    return build_app(limits=limits, engine_options=engine_options, submit_options=submit_options, access=access,
                     **values)
