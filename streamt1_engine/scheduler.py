"""Admission of streams into one engine and whose chunk runs next (host only: no tensors).

A request reserves, at admission, the worst-case pages of its stream layout and search
(``PagedKVCache.pages_needed``), so an admitted stream never fails midway for lack of pages; its candidates
count against ``max_batch`` (the most rows of one forward). Admission is strictly first in, first out: a
request that does not fit yet waits, and the requests behind it wait too (no overtaking, so a large request is
never starved).

Pages of one pool have one layout (``page_key``: latent size and chunk frames). Each layout has a pool of its
own, and streams of every layout run at once under the one ``max_streams`` and memory budget: streams of one
layout share their forwards, the layouts take turns chunk by chunk (``RoundRobin``), so a small request waits
for at most about one chunk of a large one.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .errors import EngineBusy, StreamT1Error, require
from .validation import short_repr

MAX_PAGES = 2**31 - 1  # page ids are int32 in the page tables


@dataclass(frozen=True)
class Demand:
    """What one stream holds while it runs."""

    pages: int  # worst-case KV pages (reserved at admission)
    candidates: int  # most rows it puts into one forward
    page_key: tuple  # layout of its pages; streams of one pool share it
    memory: int = 0  # bytes its run needs besides the weights (the engine's up-front estimate)


class Scheduler:
    """Which requests run and which wait; every method is O(streams) host work, no tensors.

    ``kv_pages``: fixed size of each layout's pool (None: a pool grows to what its admitted streams reserve).
    ``max_batch``: most candidates in one forward, that is per layout (None: no cap beyond ``max_streams``).
    ``memory_budget``: bytes the running streams' estimates may add up to (None: no check); a stream alone is
    always admitted (a request that cannot fit alone is refused before it is queued), a second one waits
    until the sum fits, so several streams never take more than one of them was allowed."""

    def __init__(self, max_streams: int = 4, max_queue: int = 64, kv_pages: int | None = None,
                 max_batch: int | None = None):
        for name, value, least in (("max_streams", max_streams, 1), ("max_queue", max_queue, 0)):
            require(isinstance(value, int) and not isinstance(value, bool) and value >= least,
                    f"{name} must be an integer >= {least}, got {short_repr(value)}")
        for name, value, most in (("kv_pages", kv_pages, MAX_PAGES), ("max_batch", max_batch, None)):
            require(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
                    f"{name} must be None or a positive integer, got {short_repr(value)}")
            require(value is None or most is None or value <= most,
                    f"{name} must be at most {most} (page tables hold int32 ids), got {short_repr(value)}")
        self.max_streams, self.max_queue = max_streams, max_queue
        self.kv_pages, self.max_batch = kv_pages, max_batch
        self.memory_budget: int | None = None
        self._queue: OrderedDict[str, Demand] = OrderedDict()
        self._running: dict[str, Demand] = {}

    # -- requests ---------------------------------------------------------------------------------
    def submit(self, request_id: str, demand: Demand) -> None:
        """Queue a request, or refuse it now: a full queue, a duplicate id, or a demand that can never fit.

        The queue counts the requests that will still wait once the worker admits what fits (it admits at its
        next chunk boundary): requests that arrived together while the worker was busy are not refused for
        the room they are about to free."""
        require(request_id not in self._queue and request_id not in self._running,
                f"request id {request_id!r} is already in use")
        if self.kv_pages is not None and demand.pages > self.kv_pages:
            raise StreamT1Error(f"request {request_id!r} needs up to {demand.pages} KV pages, the pool has "
                                f"{self.kv_pages} (kv_pages); use a smaller search or a larger pool")
        if self.max_batch is not None and demand.candidates > self.max_batch:
            raise StreamT1Error(f"request {request_id!r} runs {demand.candidates} candidates per forward, more "
                                f"than max_batch={self.max_batch}; use a smaller search or raise max_batch")
        waiting = len(self._queue) + 1 - self._admissible([*self._queue.values(), demand])
        if waiting > self.max_queue:
            raise EngineBusy(f"the request queue is full ({self.max_queue} waiting, {len(self._running)} "
                             "running); retry later or raise max_queue")
        self._queue[request_id] = demand

    def admit(self) -> list[str]:
        """Move the requests that fit now from the head of the queue to the running set, in order."""
        admitted = list(self._queue)[:self._admissible(list(self._queue.values()))]
        for request_id in admitted:
            self._running[request_id] = self._queue.pop(request_id)
        return admitted

    def finish(self, request_id: str) -> None:
        """A stream ended (finished, stopped, cancelled or failed) or a queued request was dropped: its
        reservation is free at once."""
        self._running.pop(request_id, None)
        self._queue.pop(request_id, None)

    def _admissible(self, demands: list[Demand]) -> int:
        """How many of ``demands`` (queue order, from the head) fit beside the running streams now, each
        counted as running once it fits: what ``admit`` moves, and what ``submit`` counts as about to leave."""
        running = list(self._running.values())
        for i, demand in enumerate(demands):
            if not self._fits(demand, running):
                return i
            running.append(demand)
        return len(demands)

    def _fits(self, demand: Demand, running: list[Demand]) -> bool:
        if len(running) >= self.max_streams:
            return False
        same = [d for d in running if d.page_key == demand.page_key]  # the streams of its pool
        if self.kv_pages is not None and sum(d.pages for d in same) + demand.pages > self.kv_pages:
            return False
        if self.max_batch is not None and sum(d.candidates for d in same) + demand.candidates > self.max_batch:
            return False
        if self.memory_budget is not None and running and \
                sum(d.memory for d in running) + demand.memory > self.memory_budget:
            return False
        return True

    # -- views ------------------------------------------------------------------------------------
    @property
    def queued(self) -> list[str]:
        return list(self._queue)

    @property
    def running(self) -> list[str]:
        return list(self._running)

    def is_queued(self, request_id: str) -> bool:
        return request_id in self._queue

    @property
    def pages_reserved(self) -> int:
        return sum(d.pages for d in self._running.values())

    def pages_reserved_for(self, page_key: tuple) -> int:
        """Pages the running streams of one layout reserve: what that layout's pool must hold."""
        return sum(d.pages for d in self._running.values() if d.page_key == page_key)

    @property
    def page_keys(self) -> list[tuple]:
        """Layouts of the running streams, each once, in order of admission."""
        return list(dict.fromkeys(d.page_key for d in self._running.values()))


class RoundRobin:
    """Which layout's streams take the next chunk step: each ready layout in turn, in the order they first
    became ready, so streams that cannot share a forward all make progress."""

    def __init__(self):
        self._order: list = []  # every layout seen, first seen first
        self._last = None

    def pick(self, ready: list):
        """The layout after the last picked one (cyclically) among ``ready`` (not empty)."""
        require(len(ready) > 0, "no layout is ready")
        for key in ready:
            if key not in self._order:
                self._order.append(key)
        start = self._order.index(self._last) + 1 if self._last in self._order else 0
        ready_set = set(ready)
        for i in range(len(self._order)):
            key = self._order[(start + i) % len(self._order)]
            if key in ready_set:
                self._last = key
                return key
        raise AssertionError("unreachable: a ready layout is always in the order")

    def forget(self, keys_in_use) -> None:
        """Drop layouts no stream uses any more (the order stays bounded on a long-running server)."""
        keep = set(keys_in_use)
        self._order = [k for k in self._order if k in keep or k == self._last]
