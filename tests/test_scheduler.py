"""The agent's Scheduler and the io_pool Batcher, on a gevent loop, without processes."""

from __future__ import annotations

import gevent
import numpy as np
import pytest

from rpg.agent.scheduler import Scheduler, format_ids
from rpg.io_pool import Batcher, Lane


def test_allocate_and_free_keep_every_core_once():
    s = Scheduler([("a", 4, 1), ("b", 2, 0)])
    got = [s.allocate(1) for _ in range(6)]
    held = sorted((g.node, int(c)) for g in got for c in g.cores)
    assert held == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert s.try_allocate(1, 0) is None
    for g in got:
        s.free(g)
    assert s.free_cores.tolist() == [4, 2]
    big = s.allocate(4, 1)
    assert big.node == 0 and sorted(big.cores.tolist()) == [0, 1, 2, 3] and big.gpus.tolist() == [0]


def test_fits_ever_and_waiters_served_in_order():
    s = Scheduler([("a", 2, 0)])
    assert s.fits_ever(2, 0) and not s.fits_ever(3, 0) and not s.fits_ever(1, 1)
    first = s.allocate(2)
    order = []
    waiters = [gevent.spawn(lambda i=i: order.append((i, s.allocate(1)))) for i in range(3)]
    gevent.sleep(0)
    assert order == []
    s.free(first)
    gevent.sleep(0)
    assert [i for i, _ in order] == [0, 1]
    s.free(order[0][1])
    gevent.joinall(waiters, timeout=1)
    assert [i for i, _ in order] == [0, 1, 2]


def test_a_killed_waiter_gives_back_nothing_it_did_not_get():
    s = Scheduler([("a", 1, 0)])
    held = s.allocate(1)
    g = gevent.spawn(s.allocate, 1)
    gevent.sleep(0)
    g.kill()
    s.free(held)
    assert s.free_cores.tolist() == [1]


@pytest.mark.parametrize("ids,text", [
    ([], ""), ([5], "5"), ([0, 1, 2, 3], "0-3"), ([3, 1, 2, 0, 8, 10, 11], "0-3,8,10-11"),
    ([7, 7, 8], "7-8"), (np.arange(1_000_000), "0-999999"),
])
def test_format_ids(ids, text):
    assert format_ids(ids) == text


def test_batcher_carries_calls_in_batches_and_keeps_failures_apart():
    lane = Lane("test", threads=2)
    try:
        def fn(x):
            if x == 3:
                raise ValueError("three")
            return x * 10

        b = Batcher(lane, fn, max_batch=8, parallel=1)
        results = [b.submit(i) for i in range(20)]
        gevent.joinall([gevent.spawn(r.get) for r in results], timeout=5)
        assert [r.value for r in results if r.successful()] == [i * 10 for i in range(20) if i != 3]
        assert isinstance(results[3].exception, ValueError)
        assert b.calls == 20 and b.batches <= 4  # 20 calls in at most ceil(20/8)+1 hand-offs
    finally:
        lane.close()


def test_batcher_withdraw_takes_back_a_call_not_yet_picked_up():
    lane = Lane("test", threads=1)
    try:
        import threading
        gate = threading.Event()
        b = Batcher(lane, lambda x: gate.wait(5) and x, max_batch=1, parallel=1)
        first = b.submit(1)
        second = b.submit(2)
        gevent.sleep(0.05)
        assert b.withdraw(second) is True
        assert b.withdraw(first) is False  # already running
        gate.set()
        assert first.get(timeout=5) == 1
        assert b.calls == 1
    finally:
        lane.close()


def test_batcher_gather_carries_calls_that_trickle_in_together():
    """Calls 1 ms apart: without gather_s each goes alone; with 50 ms they share hand-offs,
    and a batch whose callers all withdrew during the wait sends nothing to the lane."""
    lane = Lane("test", threads=2)
    try:
        def trickle(b):
            results = []
            for i in range(10):
                results.append(b.submit(i))
                gevent.sleep(0.001)
            assert [r.get(timeout=5) for r in results] == list(range(10))

        alone = Batcher(lane, lambda x: x, max_batch=64, parallel=1)
        trickle(alone)
        gathered = Batcher(lane, lambda x: x, max_batch=64, parallel=1, gather_s=0.05)
        trickle(gathered)
        assert alone.batches >= 5 and gathered.batches <= 2, (alone.batches, gathered.batches)
        lone = gathered.submit(99)
        assert gathered.withdraw(lone) is True  # within the gather: taken back, never run
        gevent.sleep(0.1)
        assert gathered.calls == 10 and lane.completed == alone.batches + gathered.batches
    finally:
        lane.close()
