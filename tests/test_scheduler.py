"""The admission rules alone (host values, no tensors): queue order, budgets, refusals."""
import pytest

from streamt1_engine import StreamT1Error
from streamt1_engine.scheduler import Demand, RoundRobin, Scheduler

KEY = (3, 8, 8)


def demand(pages=4, candidates=1, key=KEY, memory=0):
    return Demand(pages, candidates, key, memory)


def test_fifo_admission_up_to_max_streams():
    s = Scheduler(max_streams=2, max_queue=10)
    for name in "abcd":
        s.submit(name, demand())
    assert s.admit() == ["a", "b"] and s.queued == ["c", "d"]
    assert s.admit() == []  # nothing finished: nothing more runs
    s.finish("b")
    assert s.admit() == ["c"] and s.running == ["a", "c"] and s.queued == ["d"]
    s.finish("a")
    s.finish("c")
    assert s.admit() == ["d"] and s.queued == []


def test_page_budget_reserves_worst_case_and_frees_at_once():
    s = Scheduler(max_streams=8, max_queue=10, kv_pages=10)
    s.submit("a", demand(pages=4))
    s.submit("b", demand(pages=5))
    s.submit("c", demand(pages=2))
    assert s.admit() == ["a", "b"] and s.pages_reserved == 9
    # c would fit the page budget only after one of them ends
    assert s.admit() == []
    s.finish("a")
    assert s.pages_reserved == 5
    assert s.admit() == ["c"] and s.pages_reserved == 7


def test_memory_budget_lets_a_stream_run_alone_and_the_next_wait_for_room():
    s = Scheduler(max_streams=8, max_queue=10)
    s.memory_budget = 10
    for name, memory in (("a", 6), ("b", 5), ("c", 4)):
        s.submit(name, demand(memory=memory))
    assert s.admit() == ["a"]  # 6 + 5 > 10: b waits, and c behind it (no overtaking)
    s.finish("a")
    assert s.admit() == ["b", "c"]  # 5 + 4 <= 10
    s.finish("b")
    s.finish("c")
    s.submit("big", demand(memory=12))  # more than the budget alone: the engine refused it before; runs alone
    assert s.admit() == ["big"]
    s.memory_budget = None
    s.submit("d", demand(memory=100))
    assert s.admit() == ["d"]


def test_no_overtaking_a_large_request_at_the_head():
    s = Scheduler(max_streams=8, max_queue=10, kv_pages=10)
    s.submit("a", demand(pages=6))
    s.submit("big", demand(pages=8))
    s.submit("small", demand(pages=1))
    assert s.admit() == ["a"]
    assert s.queued == ["big", "small"]  # small fits the pages but waits behind big
    s.finish("a")
    assert s.admit() == ["big", "small"]


def test_batch_budget_counts_candidates():
    s = Scheduler(max_streams=8, max_queue=10, max_batch=6)
    s.submit("a", demand(candidates=4))
    s.submit("b", demand(candidates=4))
    s.submit("c", demand(candidates=2))
    assert s.admit() == ["a"]
    s.finish("a")
    assert s.admit() == ["b", "c"]


def test_other_page_layouts_run_beside_each_other_each_with_its_own_page_and_batch_budget():
    s = Scheduler(max_streams=8, max_queue=10, kv_pages=6, max_batch=4)
    wide = (3, 8, 16)
    s.submit("a", demand(pages=4, candidates=3))
    s.submit("w", demand(pages=5, candidates=4, key=wide))  # its own pool: a's pages and rows do not count
    s.submit("b", demand(pages=2, candidates=1))
    s.submit("c", demand(pages=1))  # a + b fill their pool's 6 pages: c waits
    assert s.admit() == ["a", "w", "b"] and s.page_keys == [KEY, wide]
    assert s.pages_reserved_for(KEY) == 6 and s.pages_reserved_for(wide) == 5
    s.finish("w")
    assert s.admit() == [] and s.page_keys == [KEY]
    s.finish("b")
    assert s.admit() == ["c"]


def test_the_queue_limit_counts_only_requests_that_will_still_wait():
    """Requests that arrive together before the worker admits any are not refused for the slots they are about
    to take: exactly max_streams + max_queue are accepted, then the queue is full."""
    s = Scheduler(max_streams=2, max_queue=2)
    for name in "abcd":
        s.submit(name, demand())
    with pytest.raises(StreamT1Error, match="queue is full"):
        s.submit("e", demand())
    assert s.admit() == ["a", "b"] and s.queued == ["c", "d"]
    s.finish("a")  # a slot is free but not yet taken: one more arrival fits
    s.submit("e", demand())
    with pytest.raises(StreamT1Error, match="queue is full"):
        s.submit("f", demand())
    assert s.admit() == ["c"] and s.queued == ["d", "e"]


def test_round_robin_gives_every_ready_layout_a_turn():
    turns = RoundRobin()
    picks = [turns.pick(["big", "small"]) for _ in range(4)]
    assert picks == ["big", "small", "big", "small"]
    assert turns.pick(["big"]) == "big" and turns.pick(["big"]) == "big"  # alone: every turn
    assert turns.pick(["small", "big", "third"]) == "small"  # the order is first-seen, not the caller's
    assert turns.pick(["small", "big", "third"]) == "third"
    assert turns.pick(["small", "big", "third"]) == "big"
    turns.forget(["third"])  # big and small are gone from the engine: the order stays bounded
    assert turns.pick(["new", "third"]) == "third" and turns.pick(["new", "third"]) == "new"
    with pytest.raises(StreamT1Error):
        turns.pick([])


def test_refusals_are_clear_and_leave_the_queue_unchanged():
    s = Scheduler(max_streams=1, max_queue=2, kv_pages=10, max_batch=4)
    s.submit("a", demand())
    s.admit()
    s.submit("b", demand())
    s.submit("c", demand())
    with pytest.raises(StreamT1Error, match="queue is full"):
        s.submit("d", demand())
    with pytest.raises(StreamT1Error, match="already in use"):
        s.submit("a", demand())
    s.finish("c")  # a queued request dropped (cancelled): room again, order kept
    with pytest.raises(StreamT1Error, match="kv_pages"):
        s.submit("huge", demand(pages=11))
    with pytest.raises(StreamT1Error, match="max_batch"):
        s.submit("wide", demand(candidates=5))
    s.submit("e", demand())
    assert s.queued == ["b", "e"] and s.running == ["a"]


@pytest.mark.parametrize("kwargs", [dict(max_streams=0), dict(max_queue=-1), dict(kv_pages=0), dict(max_batch=1.5),
                                    dict(max_streams=True)])
def test_bad_limits_are_refused(kwargs):
    with pytest.raises(StreamT1Error):
        Scheduler(**kwargs)
