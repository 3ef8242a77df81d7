"""Prometheus text for ``/metrics``: the engine's own counters, plus the server's requests by outcome and
its recent chunk rate."""
from __future__ import annotations

import threading
import time
from collections import Counter, deque

OUTCOMES = ("finished", "stopped", "disconnected", "invalid", "rejected", "forbidden", "failed")
TRANSPORTS = ("websocket", "http")


class ServerMetrics:
    """Thread-safe counters (chunks are counted from the threads that relay them)."""

    def __init__(self, rate_window_s: float = 30.0):
        self.rate_window_s = rate_window_s
        self._lock = threading.Lock()
        self._requests: Counter = Counter()
        self._chunk_times: deque[float] = deque()
        self.chunks_sent = 0

    def request(self, transport: str, outcome: str) -> None:
        assert transport in TRANSPORTS and outcome in OUTCOMES, (transport, outcome)
        with self._lock:
            self._requests[transport, outcome] += 1

    def requests(self, transport: str, outcome: str) -> int:
        with self._lock:
            return self._requests[transport, outcome]

    def chunk_sent(self) -> None:
        now = time.monotonic()
        with self._lock:
            self.chunks_sent += 1
            self._chunk_times.append(now)
            self._trim(now)

    def chunks_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return len(self._chunk_times) / self.rate_window_s

    def _trim(self, now: float) -> None:
        while self._chunk_times and self._chunk_times[0] < now - self.rate_window_s:
            self._chunk_times.popleft()

    def render(self, stats: dict, streams_in_flight: int) -> str:
        """Prometheus text exposition (version 0.0.4) of the engine ``stats`` and the server's counters."""
        lines: list[str] = []

        def metric(name, kind, help_text, samples):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
                lines.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")

        metric("streamt1_queue_length", "gauge", "streams waiting in the engine's queue", [({}, stats["queued"])])
        metric("streamt1_streams_running", "gauge", "streams the engine is generating now", [({}, stats["running"])])
        metric("streamt1_streams_in_flight", "gauge", "streams this server is serving (running or queued)",
               [({}, streams_in_flight)])
        metric("streamt1_kv_pages_in_use", "gauge", "KV cache pages held by streams", [({}, stats["pages_in_use"])])
        metric("streamt1_kv_pages_total", "gauge", "KV cache pages in the pool", [({}, stats["pages_total"])])
        metric("streamt1_chunks_per_second", "gauge",
               f"final chunks sent to clients per second over the last {self.rate_window_s:g} s",
               [({}, f"{self.chunks_per_second():.6g}")])
        metric("streamt1_chunks_sent_total", "counter", "final chunks sent to clients", [({}, self.chunks_sent)])
        metric("streamt1_engine_chunks_total", "counter", "chunks the engine has generated", [({}, stats["chunks_done"])])
        metric("streamt1_engine_frames_total", "counter", "frames the engine has generated", [({}, stats["frames_done"])])
        metric("streamt1_engine_streams_total", "counter", "streams the engine has ended, by how",
               [({"end": end}, stats[f"streams_{end}"]) for end in ("finished", "cancelled", "failed")])
        with self._lock:
            requests = [({"transport": t, "outcome": o}, self._requests[t, o]) for t in TRANSPORTS for o in OUTCOMES]
        metric("streamt1_requests_total", "counter",
               "requests by transport and outcome (invalid: a 4xx answer; rejected: busy, 429 or 503)", requests)
        return "\n".join(lines) + "\n"
