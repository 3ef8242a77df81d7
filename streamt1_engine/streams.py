"""Handles of the streams an engine runs: what a caller holds while its video is generated.

The engine's worker thread produces; the caller consumes. Each handle has a bounded output queue of final
chunks (``max_buffered_chunks``): the worker does not step a stream whose queue is full, so a slow consumer
pauses its own stream only. Everything here is thread-safe.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .errors import StreamT1Error

STATUSES = ("queued", "running", "finished", "stopped", "cancelled", "failed")
ENDED = ("finished", "stopped", "cancelled", "failed")


@dataclass
class StreamRequest:
    """A validated request (the engine fills it in ``submit``)."""

    request_id: str
    prompt: str
    num_chunks: int
    seed: int
    search: Any  # SearchConfig
    stream: Any  # StreamConfig of this request (latent size from height/width)
    rewards: tuple  # (short, long, final) reward callables or None
    prompt_schedule: dict[int, str] = field(default_factory=dict)
    callback_on_chunk_end: Callable | None = None
    max_buffered_chunks: int = 8
    report_progress: bool = False  # stream(): progress events in the queue, called in the consumer's thread


class _Progress:
    __slots__ = ("done", "total")

    def __init__(self, done: int, total: int):
        self.done, self.total = done, total


class StreamHandle:
    """What ``engine.submit`` returns: the stream's status, records and run record, its final chunks as they
    come (``chunks``, ``result``) and the caller's controls (``cancel``, ``stop``, ``switch_prompt``)."""

    def __init__(self, engine, request: StreamRequest, info: dict | None = None):
        self._engine = engine
        self.request = request
        self.request_id = request.request_id
        self.info: dict = info if info is not None else {}
        self.records: list = []  # the search's ChunkRecords, filled as chunks are done
        self._cond = threading.Condition()
        self._status = "queued"
        self._buffer: deque = deque()  # StreamChunk or _Progress, in order
        self._chunks_buffered = 0
        self._ended = False  # nothing more will be put in the buffer
        self._error: BaseException | None = None
        self._released = threading.Event()  # set once the stream holds no pages (or never held any)
        self._taken = 0  # chunks handed to the consumer
        # requests from the caller, read by the worker at the next chunk boundary (a cancel also between steps)
        self.cancel_requested = False
        self.stop_requested = False
        self.prompt_switches: deque[str] = deque()

    # -- the caller's side ------------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self._status

    def chunks(self, timeout: float | None = None) -> Iterator:
        """Final chunks in order as they come (blocking); raises the stream's error if it failed; ends when the
        stream ends (a cancelled stream ends at once). ``timeout``: most seconds to wait for one chunk."""
        for item in self._events(timeout):
            if not isinstance(item, _Progress):
                yield item

    def _events(self, timeout: float | None = None) -> Iterator:
        while True:
            item = self._next(timeout)
            if item is None:
                return
            yield item

    def _next(self, timeout: float | None):
        """The next event, or None at the end; raises the stream's error once the buffer is drained."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._buffer and not self._ended:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"stream {self.request_id}: no chunk within {timeout} s")
                self._cond.wait(timeout=left if left is not None else 0.5)
            if self._status == "cancelled":
                self._buffer.clear()
                return None
            if self._buffer:
                item = self._buffer.popleft()
                if not isinstance(item, _Progress):
                    self._chunks_buffered -= 1
                    self._taken += 1
                self._cond.notify_all()
            else:
                item = None
        if item is not None and not isinstance(item, _Progress):
            self._engine._wake()  # room again: the worker may step this stream
        if item is None and self._error is not None:
            raise self._error
        return item

    def _next_chunk(self, timeout: float | None = None):
        """The next chunk, or None at the end (progress events skipped)."""
        while True:
            item = self._next(timeout)
            if not isinstance(item, _Progress):
                return item

    def result(self, timeout: float | None = None):
        """Wait for the end and return the whole video (a ``GenerationResult``), as ``generate()`` does; only
        before any chunk was taken with ``chunks()``."""
        from .engine import GenerationResult

        if self._taken:
            raise StreamT1Error("result() needs every chunk: some were already taken with chunks()")
        got = list(self.chunks(timeout))
        if self._status == "cancelled":
            raise StreamT1Error(f"stream {self.request_id} was cancelled")
        return GenerationResult.from_chunks(self.request.prompt, got, self.records, self._engine.fps, self.info)

    def cancel(self, wait: bool = True) -> None:
        """Drop the stream at once: the consumer's iterator ends; the worker stops it before its next denoising
        step or forward, and its pages return to the pool before this returns (``wait``; from the worker thread
        itself, e.g. in a callback, right after that step)."""
        self.cancel_requested = True
        self._engine._cancel(self)
        if wait and threading.current_thread() is not self._engine._worker_thread:
            self._wait_released()

    def _wait_released(self) -> None:
        while not self._released.wait(0.2):
            if self._engine._worker_thread is None and not self._released.is_set():
                return  # no worker (closed engine): nothing holds the pages any more

    def stop(self) -> None:
        """Finish early: the final pick runs over the chunks that exist, the remaining final chunks are emitted."""
        self.stop_requested = True
        self._engine._wake()

    def switch_prompt(self, prompt: str) -> None:
        """Switch to ``prompt`` at the next chunk boundary (the window's K/V recomputed with the new prompt)."""
        self._engine._check_prompt(prompt)
        self.prompt_switches.append(prompt)
        self._engine._wake()

    def __repr__(self) -> str:
        return f"StreamHandle({self.request_id!r}, status={self._status!r})"

    # -- the worker's side ------------------------------------------------------------------------
    def has_room(self) -> bool:
        return self._chunks_buffered < self.request.max_buffered_chunks

    def put(self, item) -> None:
        with self._cond:
            self._buffer.append(item)
            if not isinstance(item, _Progress):
                self._chunks_buffered += 1
            self._cond.notify_all()

    def set_status(self, status: str) -> None:
        self._status = status

    def end(self, status: str, error: BaseException | None = None) -> None:
        with self._cond:
            self._status = status
            self._error = error
            self._ended = True
            if status == "cancelled":
                self._buffer.clear()
                self._chunks_buffered = 0
            self._cond.notify_all()

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def released(self) -> bool:
        return self._released.is_set()

    def mark_released(self) -> None:
        self._released.set()
