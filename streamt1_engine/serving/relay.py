"""Reading a stream's final chunks from the event loop: the engine's iterator blocks, so each ``next`` runs
on a worker thread, which also does the per-chunk encoding (JPEG, MP4) off the loop."""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class RelayedChunk:
    index: int
    seed: int
    num_frames: int
    height: int
    width: int
    record: dict | None  # the chunk's search record (JSON-safe), None if the engine has none for it
    payload: Any  # what ``encode`` returned for the chunk's frames


class ChunkRelay:
    """``await relay.next()`` -> the next final chunk of ``handle`` (encoded by ``encode(frames)``), None at
    the end of the stream. An error of the stream (a failed run) is raised from ``next``."""

    def __init__(self, handle, executor: Executor, encode: Callable[[Any], Any]):
        self.handle, self.executor, self.encode = handle, executor, encode
        self._chunks = None

    async def next(self) -> RelayedChunk | None:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._next)

    def _next(self) -> RelayedChunk | None:
        from .frames import json_safe

        if self._chunks is None:
            self._chunks = iter(self.handle.chunks())
        chunk = next(self._chunks, None)
        if chunk is None:
            return None
        records = self.handle.records
        record = json_safe(records[chunk.index].to_dict()) if chunk.index < len(records) else None
        t, h, w = (int(x) for x in chunk.frames.shape[:3])
        return RelayedChunk(chunk.index, int(chunk.seed), t, h, w, record, self.encode(chunk.frames))
