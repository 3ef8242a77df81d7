"""What one server accepts: concurrent streams, chunks and candidates per request, request size."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import StreamT1Error, require
from ..search.config import STRATEGIES, SearchConfig, search_shape
from ..validation import at_least, validate_fields

_RULES = {"max_streams": at_least(1), "max_chunks": at_least(1), "max_candidates": at_least(1),
          "max_body_bytes": at_least(256), "buffered_chunks": at_least(1)}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class LimitExceeded(StreamT1Error):
    """A request over one of the server's limits (answered 413/422/429, never queued)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServerLimits:
    """``max_streams``: streams this server serves at once (running or waiting in the engine's queue); one
    more is answered 429. ``max_chunks`` / ``max_candidates``: most chunks, and candidates per chunk (the
    search's first-chunk candidates, B*K for stream_t1), one request may ask for. ``max_body_bytes``: the
    largest request body or WebSocket request message. ``buffered_chunks``: final chunks a stream may run
    ahead of its client (small, so that a switched prompt shows within a few chunks of what is on screen)."""

    max_streams: int = 4
    max_chunks: int = 64
    max_candidates: int = 16
    max_body_bytes: int = 64 * 1024
    buffered_chunks: int = 2

    def __post_init__(self):
        validate_fields(self, _RULES)

    def check_requested(self, num_chunks, search_options: dict) -> None:
        """The request's own numbers against the limits, before any config is built from them (so that no
        check does work in proportion to a number this server would refuse). Values of a wrong type or an
        unknown strategy are left to the engine's checks, which answer them in one line."""
        self._check_chunks(num_chunks)
        defaults = SearchConfig.__dataclass_fields__
        shape = {k: search_options.get(k, defaults[k].default) for k in ("strategy", "beam_size", "top_k",
                                                                        "num_candidates")}
        if shape["strategy"] not in STRATEGIES or not all(_is_int(shape[k]) for k in shape if k != "strategy"):
            return
        children, survivors = search_shape(**shape)
        self._check_candidates(shape["strategy"], children * survivors)

    def check(self, num_chunks, search: SearchConfig) -> None:
        """Chunks and candidates within the limits (types and ranges are the engine's checks)."""
        self._check_chunks(num_chunks)
        self._check_candidates(search.strategy, search.first_chunk_candidates)

    def _check_chunks(self, num_chunks) -> None:
        if _is_int(num_chunks) and num_chunks > self.max_chunks:
            raise LimitExceeded(f"num_chunks {num_chunks} is above this server's limit of {self.max_chunks}", 422)

    def _check_candidates(self, strategy: str, candidates: int) -> None:
        if candidates > self.max_candidates:
            raise LimitExceeded(f"search {strategy!r} asks for {candidates} candidates per chunk, above this "
                                f"server's limit of {self.max_candidates}", 422)

    def check_size(self, size: int) -> None:
        if size > self.max_body_bytes:
            raise LimitExceeded(f"request is {size} bytes, above this server's limit of {self.max_body_bytes}", 413)


class StreamSlots:
    """Counts the streams in flight against ``max_streams`` (used from the event loop only)."""

    def __init__(self, limit: int):
        require(limit >= 1, f"max_streams must be >= 1, got {limit}")
        self.limit, self.used = limit, 0

    def take(self) -> None:
        if self.used >= self.limit:
            raise LimitExceeded(f"server is busy: {self.used} streams in flight, its limit is {self.limit}; "
                                "retry later", 429)
        self.used += 1

    def give_back(self) -> None:
        self.used -= 1


class BodyLimit:
    """ASGI middleware: an HTTP body over ``limit`` bytes (by Content-Length, or counted as it arrives) is
    answered 413 before the route parses it."""

    def __init__(self, app, limit: int, on_reject=None):
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException

        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            if self.on_reject is not None:
                self.on_reject(scope)
            return await _send_too_large(send, int(declared), self.limit)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # FastAPI passes an HTTPException raised while reading the body through
                    raise HTTPException(413, f"request body is larger than this server's limit of {self.limit} "
                                             "bytes")
            return message

        return await self.app(scope, counted, send)


async def _send_too_large(send, size: int, limit: int) -> None:
    import json

    body = json.dumps({"error": f"request body is {size} bytes, above this server's limit of {limit}",
                       "status": 413}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
