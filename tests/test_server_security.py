"""No web page may drive a local server: Host (DNS rebinding), Origin (a foreign page's WebSocket or POST) and the
optional API key, checked on a real uvicorn server with real httpx / websockets clients."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason='needs the serve extra: pip install -e ".[serve]"')
pytest.importorskip("uvicorn", reason='needs the serve extra: pip install -e ".[serve]"')
httpx = pytest.importorskip("httpx", reason='needs the serve extra: pip install -e ".[serve]"')
pytest.importorskip("websockets", reason='needs the serve extra: pip install -e ".[serve]"')

from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402

from streamt1_engine import StreamT1Error  # noqa: E402
from streamt1_engine.serving.app import create_app  # noqa: E402
from streamt1_engine.serving.limits import ServerLimits  # noqa: E402
from streamt1_engine.serving.security import AccessPolicy, exposure_warning  # noqa: E402

from server_helpers import LoopbackServer, metric_value, tiny_engine_one_thread  # noqa: E402

PROMPT = "a red circle moving right on a blue background"
KEY = "s3cret-Token_42"
TRUSTED = "http://trusted.example:3000"
REQUEST = dict(prompt=PROMPT, num_chunks=1, seed=1)


class LateApp:
    """An ASGI app set once the server's socket has its port (the policy names the port it listens on)."""

    app = None

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def engine():
    with tiny_engine_one_thread(max_streams=2, max_queue=2) as engine:
        yield engine


@pytest.fixture(scope="module")
def keyed(engine):
    """A server bound to 127.0.0.1 on its port, with an API key and one more allowed origin."""
    late = LateApp()
    server = LoopbackServer(late)  # bound here, started below
    policy = AccessPolicy(bind_host="127.0.0.1", bind_port=server.port, allowed_origins=(TRUSTED,), api_key=KEY)
    late.app = create_app(engine, ServerLimits(max_streams=2, max_chunks=4), access=policy)
    with server:
        yield server


@pytest.fixture(scope="module")
def open_server(engine):
    """A server with the default policy (as ``create_app(engine)`` builds it) and no key."""
    with LoopbackServer(create_app(engine, ServerLimits(max_streams=2, max_chunks=4))) as server:
        yield server


def one_line(answer: httpx.Response, status: int, text: str) -> None:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["status"] == status and text in body["error"] and "\n" not in body["error"], body


async def ws_handshake(url: str, *, origin: str | None = None, headers: dict | None = None, host: str | None = None,
                       port: int | None = None):
    """Open the stream route and send a request: ("accepted", message) or ("refused", status, body).
    ``host``: the name the client uses in its Host header (its socket still goes to 127.0.0.1)."""
    options = dict(origin=origin, additional_headers=headers or {}, open_timeout=10)
    if host is not None:
        sock = socket.create_connection(("127.0.0.1", port))
        url = url.replace("127.0.0.1", host)
        options["sock"] = sock
    try:
        async with connect(url, **options) as ws:
            await ws.send(json.dumps(REQUEST))
            return "accepted", json.loads(await ws.recv())
    except InvalidStatus as exc:
        body = json.loads(exc.response.body.decode())
        return "refused", exc.response.status_code, body


def test_policy_rules():
    loop = AccessPolicy(bind_host="127.0.0.1", bind_port=8000)
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST:8000", "[::1]:8000"):
        assert loop.host_allowed(host, "http"), host
    for host in ("127.0.0.1:8001", "evil.example:8000", "localhost", "", "127.0.0.1:x", "192.168.1.5:8000",
                 "local host:8000", "localhost:8000/x"):
        assert not loop.host_allowed(host, "http"), host
    assert AccessPolicy(bind_host="127.0.0.1", bind_port=80).host_allowed("localhost", "http")
    listed = AccessPolicy(bind_host="127.0.0.1", bind_port=8000, allowed_hosts=("box.lan", "other.lan:9000"))
    assert listed.host_allowed("box.lan:1234", "http") and listed.host_allowed("other.lan:9000", "ws")
    assert not listed.host_allowed("other.lan:9001", "http")
    wildcard = AccessPolicy(bind_host="0.0.0.0", bind_port=8000)
    for host in ("10.1.2.3:8000", "10.1.2.3:9999", "localhost:1", "[fe80::1]:8000", f"{socket.gethostname()}:8000"):
        assert wildcard.host_allowed(host, "http"), host
    assert not wildcard.host_allowed("rebind.attacker.example:8000", "http")  # a name of the attacker's
    assert AccessPolicy(bind_host="0.0.0.0", allowed_hosts=("*",)).host_allowed("anything.example", "http")
    specific = AccessPolicy(bind_host="192.168.1.5", bind_port=8000)
    assert specific.host_allowed("192.168.1.5:8000", "http") and not specific.host_allowed("127.0.0.1:8000", "http")

    own = "127.0.0.1:8000"
    assert loop.origin_allowed("http://127.0.0.1:8000", own, "ws")
    assert loop.origin_allowed("https://127.0.0.1:8000", own, "wss")
    for origin in ("http://evil.example", "http://127.0.0.1:8001", "https://127.0.0.1:8000", "null", "garbage"):
        assert not loop.origin_allowed(origin, own, "ws"), origin
    assert AccessPolicy(allowed_origins=("http://app.example/",)).origin_allowed("http://APP.example:80", own, "ws")
    assert AccessPolicy(allowed_origins="*").origin_allowed("http://anything.example", own, "ws")

    for bad in (dict(allowed_origins=("ftp://x",)), dict(allowed_hosts=("box.lan:99999",)), dict(allowed_hosts=("a b",)), dict(api_key=""),
                dict(api_key=" padded "), dict(bind_port=99999), dict(allowed_hosts=(3,))):
        with pytest.raises(StreamT1Error):
            AccessPolicy(**bad)


def test_api_key_from_environment_and_exposure_warning(monkeypatch):
    monkeypatch.setenv("STREAMT1_API_KEY", KEY)
    assert AccessPolicy.from_environment().api_key == KEY
    assert AccessPolicy.from_environment(api_key="given").api_key == "given"
    monkeypatch.setenv("STREAMT1_API_KEY", "")
    assert AccessPolicy.from_environment().api_key is None
    warning = exposure_warning(AccessPolicy(bind_host="0.0.0.0", bind_port=8000), "0.0.0.0", 8000)
    assert "without an API key" in warning and "STREAMT1_API_KEY" in warning and "\n" not in warning
    assert exposure_warning(AccessPolicy(bind_host="0.0.0.0", api_key=KEY), "0.0.0.0", 8000) is None
    assert exposure_warning(AccessPolicy(bind_host="127.0.0.1"), "127.0.0.1", 8000) is None
    assert exposure_warning(AccessPolicy(bind_host="::1"), "::1", 8000) is None


def test_foreign_host_is_refused_on_every_route(open_server, keyed):
    with httpx.Client(timeout=30) as client:
        for server in (open_server, keyed):
            for path in ("/", "/health", "/metrics", "/openapi.json"):
                answer = client.get(server.url + path, headers={"Host": f"rebind.attacker.example:{server.port}"})
                one_line(answer, 400, "does not name this server")
            answer = client.post(server.url + "/v1/generate", json=REQUEST, headers={"Host": "rebind.attacker.example"})
            one_line(answer, 400, "does not name this server")
        # the keyed server is bound to 127.0.0.1 on its port: another port of the same name is another server
        one_line(client.get(keyed.url + "/health", headers={"Host": f"127.0.0.1:{keyed.port + 1}"}), 400, "Host")
        assert client.get(keyed.url + "/health", headers={"Host": f"localhost:{keyed.port}"}).status_code == 200
    refused = asyncio.run(ws_handshake(open_server.ws_url + "/v1/stream", host="rebind.attacker.example",
                                       port=open_server.port))
    assert refused[:2] == ("refused", 400) and "does not name this server" in refused[2]["error"], refused


def test_foreign_origin_is_refused(open_server, keyed):
    stream = open_server.ws_url + "/v1/stream"
    refused = asyncio.run(ws_handshake(stream, origin="http://evil.example"))
    assert refused[:2] == ("refused", 403) and "evil.example" in refused[2]["error"], refused
    assert asyncio.run(ws_handshake(stream, origin="null"))[:2] == ("refused", 403)
    # the page's own origin, and a client that sends none (a command-line client), are served
    accepted = asyncio.run(ws_handshake(stream, origin=open_server.url))
    assert accepted[0] == "accepted" and accepted[1]["type"] == "accepted", accepted
    assert asyncio.run(ws_handshake(stream))[0] == "accepted"
    # a page's POST carries its Origin too (a simple POST needs no preflight)
    answer = httpx.post(open_server.url + "/v1/generate", json=REQUEST, headers={"Origin": "http://evil.example"},
                        timeout=30)
    one_line(answer, 403, "evil.example")
    # listed origins are served, over the keyed server
    auth = {"Authorization": f"Bearer {KEY}"}
    accepted = asyncio.run(ws_handshake(keyed.ws_url + "/v1/stream", origin=TRUSTED, headers=auth))
    assert accepted[0] == "accepted", accepted
    refused = asyncio.run(ws_handshake(keyed.ws_url + "/v1/stream", origin="http://trusted.example:3001",
                                       headers=auth))
    assert refused[:2] == ("refused", 403), refused
    metrics = httpx.get(open_server.url + "/metrics").text
    assert metric_value(metrics, "streamt1_requests_total", transport="websocket", outcome="forbidden") >= 2
    assert metric_value(metrics, "streamt1_requests_total", transport="http", outcome="forbidden") >= 1


def test_api_key_is_required_on_every_route_but_health(keyed):
    with httpx.Client(base_url=keyed.url, timeout=60) as client:
        assert client.get("/health").json()["status"] == "ok"  # a probe has no key
        for path in ("/", "/metrics", "/openapi.json", "/docs"):
            missing = client.get(path)
            one_line(missing, 401, "requires an API key")
            assert missing.headers["www-authenticate"].startswith("Bearer")
            one_line(client.get(path, headers={"Authorization": "Bearer wrong"}), 401, "wrong API key")
            one_line(client.get(path, headers={"Authorization": f"Basic {KEY}"}), 401, "wrong API key")
            one_line(client.get(path, params={"token": KEY + "x"}), 401, "wrong API key")
            assert client.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path
            assert client.get(path, params={"token": KEY}).status_code == 200, path
        one_line(client.post("/v1/generate", json=REQUEST), 401, "requires an API key")
        one_line(client.post("/v1/generate", json=REQUEST, headers={"Authorization": "Bearer nope"}), 401, "wrong")
        answer = client.post("/v1/generate", json=REQUEST, headers={"Authorization": f"Bearer {KEY}"})
        assert answer.status_code == 200 and answer.json()["status"] == "finished", answer.text
        page = client.get("/", params={"token": KEY}).text
        assert "encodeURIComponent(token)" in page  # the page passes its token on to the WebSocket

    stream = keyed.ws_url + "/v1/stream"
    for kwargs in (dict(), dict(headers={"Authorization": "Bearer wrong"})):
        refused = asyncio.run(ws_handshake(stream, **kwargs))
        assert refused[:2] == ("refused", 401), refused
    refused = asyncio.run(ws_handshake(stream + "?token=wrong", origin=keyed.url))
    assert refused[:2] == ("refused", 401) and refused[2]["error"] == "wrong API key", refused
    # as the page connects: its own origin, the token in the query
    accepted = asyncio.run(ws_handshake(stream + f"?token={KEY}", origin=keyed.url))
    assert accepted[0] == "accepted" and accepted[1]["type"] == "accepted", accepted
    assert asyncio.run(ws_handshake(stream, headers={"Authorization": f"Bearer {KEY}"}))[0] == "accepted"


def test_serve_warns_when_exposed_without_a_key_and_refuses_bad_options(tmp_path):
    from streamt1_engine.cli import main

    # every access option is checked before the model loads
    assert main(["serve", "--allowed-origins", "ftp://nowhere", "--port", "1"]) == 2
    assert main(["serve", "--port", "99999"]) == 2
    assert main(["serve", "--api-key", " spaced ", "--port", "1"]) == 2
    assert main(["serve", "--allowed-hosts", "a b", "--port", "1"]) == 2

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "STREAMT1_API_KEY": ""}
    # a port nothing listens on is not needed: the warning comes before uvicorn binds; stopped right after it
    proc = subprocess.Popen([sys.executable, "-c", "from streamt1_engine.cli import main; main()", "serve",
                             "--host", "0.0.0.0", "--port", "0", "--threads", "1", "--log-level", "error"],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        deadline, seen = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if "without an API key" in line:
                break
        assert any("warning: serving on 0.0.0.0:0, beyond loopback, without an API key" in s for s in seen), seen
    finally:
        proc.terminate()
        proc.wait(timeout=20)
