"""One request must never take the server down: every numeric field of a request, at the values a client may
send (0, -1, 2**63, 10**18, 10**7, 10**400, NaN, a string, a list), to the POST route, the WebSocket and the
Python API, each answered in one line within a second, under a memory limit, the server healthy after.

The server and the API calls run in a child process whose address space is capped a few GiB above what it
holds after loading the model (``RLIMIT_AS``): a check that allocates in proportion to a client's number (the
seed-collision check once built a dict per candidate: 22 GB for ``num_candidates=10**18``) then fails there
with MemoryError, answered 500 and failing this test, instead of exhausting the machine."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import time
import types
import typing
from pathlib import Path

import pytest

from streamt1_engine.search.config import SearchConfig
from streamt1_engine.search.noise import upstream_seed_collision

HEADROOM = 3 * 1024**3  # address space the child may add to what it holds once the model is loaded
ANSWER_S = 1.0  # the longest a refusal (or a WebSocket's "accepted") may take
GENERATE_S = 20.0  # a valid POST runs a whole 1-chunk stream: bounded, but more than a check
SERVER_MAX_CHUNKS, SERVER_MAX_CANDIDATES = 4, 8

VALUES = {"0": 0, "-1": -1, "2**63": 2**63, "10**18": 10**18, "10**7": 10**7, "10**400": 10**400,
          "NaN": math.nan, "string": "7", "list": [1]}


def integer(low: int, high: int | None = None):
    return lambda v: type(v) is int and v >= low and (high is None or v <= high)


def number(low: float | None = None, high: float | None = None):
    def accepted(v) -> bool:
        if type(v) not in (int, float):
            return False
        try:
            f = float(v)
        except OverflowError:
            return False
        return math.isfinite(f) and (low is None or f >= low) and (high is None or f <= high)
    return accepted


def never(v) -> bool:
    return False


# field: (which fuzz values the server accepts, which the Python API accepts); every other value is refused.
# The search fields are sent with one candidate (beam_size = top_k = 1, num_candidates = 1) unless fuzzed.
SPEC = {
    "num_chunks": (integer(1, SERVER_MAX_CHUNKS), integer(1, 1365)),  # the tiny model's RoPE holds 1365 chunks
    "seed": (integer(0, 2**62 - 1),) * 2,
    "height": (never, never),  # 0, -1: no size; the others need more memory than any machine has
    "width": (never, never),
    "prompt_schedule": (never, never),  # key: a 1-chunk stream has only chunk 0, whose entry must be its prompt
    "beam_size": (integer(1, SERVER_MAX_CANDIDATES), integer(1, 1001)),  # 1002 children reach chunk c+1's seeds
    "top_k": (integer(1, SERVER_MAX_CANDIDATES), integer(1)),  # one child per beam: its seed is its parent's
    "num_candidates": (integer(1, SERVER_MAX_CANDIDATES), integer(1, 1001)),
    "window_chunks": (integer(1),) * 2,
    "noise_sigma": (number(-1, 1),) * 2,
    "short_threshold": (number(),) * 2,
    "long_threshold": (number(),) * 2,
    "fusion_cap": (number(0, 1),) * 2,
    "ema_alpha": (number(0, 1),) * 2,
}
API_SPEC = {  # Python API only: submit's own number, and the server's limits as a config
    "max_buffered_chunks": integer(1), "max_streams": integer(1), "max_chunks": integer(1),
    "max_candidates": integer(1), "max_body_bytes": integer(256), "buffered_chunks": integer(1),
}
PROMPT = "a red circle moving right on a blue background"


def _numeric(tp) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_numeric(t) for t in typing.get_args(tp) if t is not type(None))
    return tp in (int, float)


def search_fields() -> list[str]:
    hints = typing.get_type_hints(SearchConfig)
    return [f.name for f in dataclasses.fields(SearchConfig) if _numeric(hints[f.name])]


def request_fields() -> list[str]:
    from streamt1_engine.serving.schemas import GenerateRequest

    return [name for name, info in GenerateRequest.model_fields.items() if _numeric(info.annotation)]


def search_options(field: str, value) -> dict:
    """The search object of a request fuzzing ``field``: a strategy that reads it, with one candidate."""
    if field in SearchConfig(strategy="best_of_n").ignored_options:
        options = {"strategy": "stream_t1", "beam_size": 1, "top_k": 1}
    else:
        options = {"strategy": "best_of_n", "num_candidates": 1}
    return {**options, field: value}


def request_body(field: str, value) -> dict:
    body = {"prompt": PROMPT, "num_chunks": 1, "seed": 3}
    if field in search_fields():
        body["search"] = search_options(field, value)
    elif field == "prompt_schedule":
        body["prompt_schedule"] = {str(value): "a green square on a black background"}
    else:
        body[field] = value
    return body


CASES = [(field, name) for field in SPEC for name in VALUES]


# ---- the child process: a server, or the API calls, under the memory limit --------------------------------
def _limit_memory() -> None:
    import resource

    with open("/proc/self/status") as f:
        vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm_size + HEADROOM, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _child_engine():
    import torch

    from streamt1_engine import StreamT1Engine

    torch.set_num_threads(1)
    engine = StreamT1Engine.from_pretrained("tiny", max_streams=2, max_queue=2)
    engine.generate(PROMPT, num_chunks=1)  # the first run's one-off allocations happen before the limit
    return engine


def _serve() -> None:
    import socket
    import threading

    import uvicorn

    from streamt1_engine.serving.app import create_app
    from streamt1_engine.serving.limits import ServerLimits

    engine = _child_engine()
    app = create_app(engine, ServerLimits(max_streams=4, max_chunks=SERVER_MAX_CHUNKS,
                                          max_candidates=SERVER_MAX_CANDIDATES, max_body_bytes=16384))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))

    def stop_when_parent_closes_stdin():
        sys.stdin.read()
        server.should_exit = True

    threading.Thread(target=stop_when_parent_closes_stdin, daemon=True).start()
    _limit_memory()
    print(sock.getsockname()[1], flush=True)
    server.run(sockets=[sock])
    engine.close()


def _api_calls(output: str) -> None:
    """Every API case, timed; one JSON line each: the case, the error's class and message (or None)."""
    from streamt1_engine import StreamT1Error
    from streamt1_engine.cli import main
    from streamt1_engine.serving.limits import ServerLimits

    engine = _child_engine()
    _limit_memory()

    def submit(**options):
        engine.submit(PROMPT, **{"num_chunks": 1, **options}).cancel()

    def api_call(field: str, value) -> None:
        """The Python API call that takes ``field``: the search config, the server's limits, or submit."""
        if field in search_fields():
            SearchConfig(**search_options(field, value))
        elif field in ServerLimits.__dataclass_fields__:
            ServerLimits(**{field: value})
        elif field == "prompt_schedule":  # a key of the {chunk: prompt} form; a list is a malformed schedule
            submit(prompt_schedule=value if isinstance(value, list) else {value: "other"})
        else:
            submit(**{field: value})

    calls = [(field, name, lambda f=field, v=value: api_call(f, v))
             for field in [*SPEC, *API_SPEC] for name, value in VALUES.items()]
    for flag in ("--num-candidates", "--beam-size"):  # the command line builds the same SearchConfig
        search = "best_of_n" if flag == "--num-candidates" else "stream_t1"
        argv = ["generate", PROMPT, "-o", str(Path(output).with_name("cli.mp4")), "--search", search, flag,
                str(10**18), "--no-progress"]
        calls.append(("cli " + flag, "10**18", lambda a=argv: main(a)))
    with open(output, "w") as out:
        for field, name, call in calls:
            start = time.monotonic()
            stderr = io.StringIO()
            try:
                with contextlib.redirect_stderr(stderr):
                    result = call()
                error = None
                if field.startswith("cli"):  # a usage error: exit 2 and one line on stderr
                    error = [f"exit {result}", stderr.getvalue().strip()]
            except Exception as exc:  # reported to the parent, which says which class is right
                error = ["StreamT1Error" if isinstance(exc, StreamT1Error) else type(exc).__name__, str(exc)]
            out.write(json.dumps({"field": field, "value": name, "error": error,
                                  "seconds": time.monotonic() - start}) + "\n")
    engine.close()


# ---- the tests ----------------------------------------------------------------------------------------------
def _child(mode: str, *args: str, **popen) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")]), "MALLOC_ARENA_MAX": "2",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), mode, *args], env=env, cwd=root,
                            **popen)


def _memory_limit_available() -> bool:
    return sys.platform.startswith("linux") and os.path.exists("/proc/self/status")


pytestmark = pytest.mark.skipif(not _memory_limit_available(), reason="needs Linux's RLIMIT_AS and /proc")


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("fastapi", reason='needs the serve extra: pip install -e ".[serve]"')
    pytest.importorskip("uvicorn", reason='needs the serve extra: pip install -e ".[serve]"')
    pytest.importorskip("websockets", reason='needs the serve extra: pip install -e ".[serve]"')
    proc = _child("serve", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield proc, port
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_every_field_is_fuzzed():
    assert set(search_fields()) | set(request_fields()) | {"prompt_schedule"} == set(SPEC)


def _health(client, proc) -> None:
    assert proc.poll() is None, "the server process died"
    start = time.monotonic()
    answer = client.get("/health")
    assert answer.status_code == 200 and answer.json()["status"] == "ok", answer.text
    assert time.monotonic() - start < ANSWER_S


def _one_line_refusal(body: dict, status: int) -> None:
    assert 400 <= status < 500 and body.get("status") == status, (status, body)
    assert isinstance(body.get("error"), str) and body["error"] and "\n" not in body["error"], body


def test_post_route(server):
    import httpx

    proc, port = server
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        _health(client, proc)
        for field, name in CASES:
            value, accepted = VALUES[name], SPEC[field][0](VALUES[name])
            start = time.monotonic()
            answer = client.post("/v1/generate", content=json.dumps(request_body(field, value)),
                                 headers={"content-type": "application/json"})
            took = time.monotonic() - start
            if accepted:
                assert answer.status_code == 200 and answer.json()["status"] == "finished", (field, name, answer.text)
                assert took < GENERATE_S, (field, name, took)
            else:
                _one_line_refusal(answer.json(), answer.status_code)
                assert took < ANSWER_S, (field, name, took, answer.text)
            if name == list(VALUES)[-1]:
                _health(client, proc)


def test_websocket_route(server):
    import httpx
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    proc, port = server

    async def first_answer(body: dict):
        async with connect(f"ws://127.0.0.1:{port}/v1/stream", open_timeout=10) as ws:
            start = time.monotonic()
            await ws.send(json.dumps(body))
            message = json.loads(await ws.recv())
            took = time.monotonic() - start
            code = None
            if message["type"] == "error":
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
                code = closed.value.rcvd.code
            return message, took, code  # leaving the block closes an accepted stream, which cancels it

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        for field, name in CASES:
            value, accepted = VALUES[name], SPEC[field][0](VALUES[name])
            message, took, code = asyncio.run(first_answer(request_body(field, value)))
            assert took < ANSWER_S, (field, name, took, message)
            if accepted:
                assert message["type"] == "accepted", (field, name, message)
            else:
                assert message["type"] == "error", (field, name, message)
                _one_line_refusal(message, message["status"])
                assert code == 4000 + message["status"]
            if name == list(VALUES)[-1]:
                _health(client, proc)


def test_python_api(tmp_path):
    output = tmp_path / "api.jsonl"
    proc = _child("api", str(output), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    results = [json.loads(line) for line in output.read_text().splitlines()]
    specs = {**{f: s[1] for f, s in SPEC.items()}, **API_SPEC}
    assert len(results) == len(specs) * len(VALUES) + 2
    for r in results:
        assert r["seconds"] < ANSWER_S, r
        if r["field"].startswith("cli"):  # a usage error, before the model loads
            assert r["error"][0] == "exit 2" and r["error"][1].startswith("error: ") and "\n" not in r["error"][1], r
            continue
        if specs[r["field"]](VALUES[r["value"]]):
            assert r["error"] is None, r
        else:
            assert r["error"] is not None and r["error"][0] == "StreamT1Error", r
            assert r["error"][1] and "\n" not in r["error"][1], r


def test_checks_run_off_the_event_loop(monkeypatch):
    """A slow check (here a SearchConfig that takes a while) delays its own answer only: /health still answers."""
    import threading

    import httpx

    from server_helpers import LoopbackServer
    from streamt1_engine import StreamT1Error
    from streamt1_engine.serving.app import create_app
    from streamt1_engine.serving.limits import ServerLimits
    from streamt1_engine.serving.schemas import GenerateRequest

    building = threading.Event()
    original = GenerateRequest.search_config

    def slow_search_config(self):
        building.set()
        time.sleep(1.5)
        return original(self)

    monkeypatch.setattr(GenerateRequest, "search_config", slow_search_config)
    def refuse(*args, **kwargs):
        raise StreamT1Error("refused by the stub engine")

    stub = types.SimpleNamespace(name="stub", fps=16, submit=refuse)
    with LoopbackServer(create_app(stub, ServerLimits(max_chunks=2))) as server:
        answers = {}
        post = threading.Thread(target=lambda: answers.update(post=httpx.post(
            server.url + "/v1/generate", json={"prompt": PROMPT, "num_chunks": 1}, timeout=30)))
        post.start()
        assert building.wait(10)
        start = time.monotonic()
        health = httpx.get(server.url + "/health", timeout=30)
        waited = time.monotonic() - start
        post.join(30)
    assert health.status_code == 200 and waited < 0.75, waited
    assert answers["post"].json() == {"error": "refused by the stub engine", "status": 422}


def _old_collision(children_per_beam: int, beams: int, first_chunk_candidates: int) -> str | None:
    """The check as an enumeration of every offset (what the arithmetic must agree with)."""
    owner: dict[int, tuple[int, int]] = {}
    for k in range(beams):
        for i in range(1, children_per_beam):
            offset = 100 * k + i
            if offset in owner:
                k2, i2 = owner[offset]
                return f"beam {k} child {i} and beam {k2} child {i2} of one chunk"
            owner[offset] = (k, i)
    for offset, (k, i) in owner.items():
        if offset - 1000 in owner:
            k2, i2 = owner[offset - 1000]
            return f"beam {k} child {i} of chunk c and beam {k2} child {i2} of chunk c+1"
    if owner and min(owner) + 1000 < first_chunk_candidates:
        return f"candidate {min(owner) + 1000} of chunk 0 and a child of chunk 1"
    return None


@pytest.mark.parametrize("beams", [1, 2, 3, 10, 11, 12])
def test_collision_check_is_arithmetic(beams):
    for children in [1, 2, 50, 100, 101, 102, 103, 1001, 1002, 1003]:
        for first in {children * beams, children * beams + 1, 1001, 1002}:
            assert upstream_seed_collision(children, beams, first) == _old_collision(children, beams, first), \
                (children, beams, first)
    start = time.monotonic()
    for big in (10**18, 2**63, 10**400):
        assert upstream_seed_collision(big, beams, big * beams) is not None
        assert upstream_seed_collision(1, big, big) is None  # one child per beam reuses its parent's seed
    assert time.monotonic() - start < 0.1


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        _serve()
    else:
        _api_calls(sys.argv[2])


ENGINE_SPEC = {  # the engine's own numbers: a fixed pool size and the scheduler's limits, and the video's fps
    "fps": integer(1, 1000), "max_streams": integer(1), "max_queue": integer(0), "max_batch": integer(1),
    "kv_pages": lambda v: type(v) is int and 1 <= v <= 64,  # more pages than the machine holds: refused
}


@pytest.mark.parametrize("field", sorted(ENGINE_SPEC))
def test_engine_options(field):
    """Each refused at construction or, for a pool larger than memory, when the stream asks for it: one line."""
    from streamt1_engine import StreamT1Engine, StreamT1Error

    for name, value in VALUES.items():
        if field == "kv_pages" and name == "10**7":
            continue  # a pool that fits this machine's memory but takes a few GB to zero: allowed, not run here
        start = time.monotonic()
        try:
            engine = StreamT1Engine.from_pretrained("tiny", **{field: value})
            try:
                engine.generate(PROMPT, num_chunks=1, height=16, width=16)
            finally:
                engine.close()
            error = None
        except StreamT1Error as exc:
            error = str(exc)
        assert time.monotonic() - start < GENERATE_S, (field, name)
        if ENGINE_SPEC[field](value):
            assert error is None, (field, name, error)
        else:
            assert error and "\n" not in error, (field, name, error)
