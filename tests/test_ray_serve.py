"""The Ray Serve deployment on a local Ray cluster (CPU): 2 engine replicas serve 2 concurrent streams."""
from __future__ import annotations

import asyncio
import json
import socket

import pytest

pytest.importorskip("fastapi", reason='needs the serve extra: pip install -e ".[serve]"')
httpx = pytest.importorskip("httpx", reason='needs the serve extra: pip install -e ".[serve]"')
pytest.importorskip("websockets", reason='needs the serve extra: pip install -e ".[serve]"')
ray = pytest.importorskip("ray", reason='needs the ray extra: pip install -e ".[ray]"')
serve = pytest.importorskip("ray.serve", reason='needs the ray extra: pip install -e ".[ray]"')

from websockets.asyncio.client import connect  # noqa: E402

from streamt1_engine.serving.limits import ServerLimits  # noqa: E402
from streamt1_engine.serving.ray_app import app_builder, build_app  # noqa: E402

PROMPT = "a red circle moving right on a blue background"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


async def stream(url: str, request: dict) -> dict:
    frames = 0
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps(request))
        assert json.loads(await ws.recv())["type"] == "accepted"
        while True:
            message = await ws.recv()
            if isinstance(message, bytes):
                frames += 1
                continue
            data = json.loads(message)
            if data["type"] == "done":
                return {"frames": frames, **data}


def test_two_replicas_serve_two_concurrent_streams(ray_cluster):
    # one stream per replica at a time, so two concurrent streams must be routed to both replicas
    app = build_app("tiny", num_replicas=2, gpus_per_replica=0, cpus_per_replica=0.5,
                    limits=ServerLimits(max_streams=1, max_chunks=8), engine_options={"device": "cpu"})
    serve.run(app, name="streamt1", route_prefix="/")
    base = f"http://{ray_cluster}"

    async def two_streams():
        url = f"ws://{ray_cluster}/v1/stream"
        return await asyncio.gather(stream(url, dict(prompt=PROMPT, num_chunks=6, seed=1)),
                                    stream(url, dict(prompt=PROMPT, num_chunks=6, seed=2)))

    first, second = asyncio.run(two_streams())
    for result in (first, second):
        assert result["status"] == "finished" and len(result["record"]["chunks"]) == 6
        assert result["frames"] == 6 * 3
    assert first["record"]["served_by"] != second["record"]["served_by"]
    answer = httpx.post(base + "/v1/generate", json=dict(prompt=PROMPT, num_chunks=2, seed=3), timeout=60)
    assert answer.status_code == 200 and answer.json()["status"] == "finished", answer.text
    refused = httpx.post(base + "/v1/generate", json=dict(prompt=PROMPT, num_chunks=9), timeout=60)
    assert refused.status_code == 422 and "limit of 8" in refused.json()["error"]
    assert httpx.get(base + "/health", timeout=30).json()["status"] == "ok"
    serve.delete("streamt1")


def test_app_builder_reads_serve_run_arguments():
    app = app_builder({"model": "random-tiny", "num_replicas": "3", "gpus_per_replica": "0", "max_chunks": "5"})
    deployment = app._bound_deployment  # what `serve run` would deploy
    assert deployment.num_replicas == 3 and deployment.ray_actor_options["num_gpus"] == 0.0
    with pytest.raises(Exception, match="unknown arguments"):
        app_builder({"replicas": "2"})
