"""The agent process's own full collections (rpg/agent/gc_policy.py): real collections of real
cycles, driven through the policy with a clock the test moves."""

from __future__ import annotations

import gc
import weakref

from rpg.agent.gc_policy import (
    EVERY_S,
    LONGEST_S,
    NO_AUTOMATIC_FULL,
    QUIET_S,
    FullCollections,
)


class _Node:
    other: "_Node | None" = None


def _cycle() -> weakref.ref:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a), (a, b)  # type: ignore[return-value]


def test_full_collections_wait_for_quiet_and_frozen_cycles_die_at_an_unfreeze():
    saved = gc.get_threshold()
    now = [1000.0]
    policy = FullCollections(clock=lambda: now[0]).install()
    try:
        assert gc.get_threshold() == (saved[0], saved[1], NO_AUTOMATIC_FULL)
        started = 0
        # Units start every second: no full collection before LONGEST_S.
        while now[0] - 1000.0 < EVERY_S + 5:
            now[0] += 1.0
            started += 1
            assert not policy.tick(started, held=5)
        # A second with no unit started is not yet quiet; QUIET_S of them is.
        ref, held_cycle = _cycle()
        now[0] += QUIET_S / 2
        assert not policy.tick(started, held=5)
        now[0] += QUIET_S
        assert policy.tick(started, held=5)
        assert policy.collections == 1 and gc.get_freeze_count() > 0
        # The cycle lived through that collection and was frozen; now it dies.
        del held_cycle
        gc.collect()
        assert ref() is not None  # frozen: a collection does not walk it
        now[0] += EVERY_S + QUIET_S
        assert policy.tick(started, held=5) and policy.unfreezes == 0
        assert ref() is not None
        # The agent holds no unit: the next collection unfreezes first and reclaims it.
        now[0] += EVERY_S + QUIET_S
        assert policy.tick(started, held=0) and policy.unfreezes == 1
        assert ref() is None
        # A pilot that never rests still gets one every LONGEST_S.
        last = policy.collections
        t0 = now[0]
        while now[0] - t0 < LONGEST_S - 1:
            now[0] += 1.0
            started += 1
            assert not policy.tick(started, held=5)
        now[0] += 1.0
        started += 1
        assert policy.tick(started, held=5) and policy.collections == last + 1
        assert policy.stats()["full_collections"] == last + 1
    finally:
        policy.uninstall()
        gc.set_threshold(*saved)
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == saved
