"""A real uvicorn server on a free loopback port, in a thread, for the serving tests."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager


class LoopbackServer:
    """``with LoopbackServer(app) as server: server.url`` -- uvicorn serving ``app`` on 127.0.0.1."""

    def __init__(self, app, ws_max_size: int = 1 << 20):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", ws_max_size=ws_max_size, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def wait_until(condition, timeout: float = 10.0, interval: float = 0.02):
    """``condition()``'s first truthy value within ``timeout`` seconds, else its last value."""
    deadline = time.monotonic() + timeout
    value = condition()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = condition()
    return value


def metric_value(text: str, name: str, **labels) -> float:
    """One sample of a Prometheus text exposition (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{want}}}" if want else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        if sample == key:
            return float(value)
    return 0.0


@contextmanager
def tiny_engine_one_thread(**options):
    """The embedded engine with torch at one thread: its work is small, and more threads only contend with the
    server and the client on a shared CPU."""
    import torch

    from streamt1_engine import StreamT1Engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = StreamT1Engine.from_pretrained("tiny", **options)
    try:
        yield engine
    finally:
        engine.close()
        torch.set_num_threads(threads)

