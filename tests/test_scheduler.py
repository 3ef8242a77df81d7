"""The admission rules alone (host values, no tensors): queue order, budgets, refusals."""
import pytest

from streamt1_engine import StreamT1Error
from streamt1_engine.scheduler import Demand, Scheduler

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


def test_another_page_layout_waits_until_the_pool_is_empty():
    s = Scheduler(max_streams=8, max_queue=10)
    s.submit("a", demand())
    s.submit("wide", demand(key=(3, 8, 16)))
    s.submit("b", demand())
    assert s.admit() == ["a"] and s.page_key == KEY
    s.finish("a")
    assert s.page_key is None
    assert s.admit() == ["wide"] and s.page_key == (3, 8, 16)
    s.finish("wide")
    assert s.admit() == ["b"]


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
