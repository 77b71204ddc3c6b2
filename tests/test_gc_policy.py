"""Full collections when rpg's loops are quiet (rpg/gc_policy.py): real collections of real
cycles, driven through the policy with a clock the test moves; a real embedded hub and a real
``rpg hub serve`` ticking it."""

from __future__ import annotations

import gc
import time
import weakref
from collections import Counter

import pytest

import rpg
import rpg.hub.hub as hub_module
from rpg import gc_policy
from rpg.gc_policy import (
    EVERY_S,
    LONGEST_S,
    NO_AUTOMATIC_FULL,
    QUIET_S,
    FullCollections,
)
from rpg.log import read_profile


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
        assert gc.get_threshold() == saved  # no loop has ticked it yet
        started = 0
        # Units start every second: no full collection before LONGEST_S.
        while now[0] - 1000.0 < EVERY_S + 5:
            now[0] += 1.0
            started += 1
            assert not policy.tick(started, held=5)
            assert gc.get_threshold() == (saved[0], saved[1], NO_AUTOMATIC_FULL)
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


@pytest.fixture
def restored_collector():
    """Whatever a test installs, the test process gets CPython's collector back."""
    saved = gc.get_threshold()
    try:
        yield saved
    finally:
        policy = gc_policy.installed()
        if policy is not None:
            policy.uninstall()
        gc.set_threshold(*saved)
        gc.unfreeze()


def test_several_loops_are_quiet_only_together_and_the_last_one_gives_the_collector_back(
        restored_collector):
    saved = restored_collector
    now = [0.0]
    policy = FullCollections(clock=lambda: now[0]).install()
    assert gc_policy.installed() is policy and gc_policy.install() is policy
    with pytest.raises(RuntimeError, match="installed in this process already"):
        FullCollections().install()
    policy.tick(1, held=3, source="hub a")
    policy.tick(1, held=0, source="agent")
    assert gc.get_threshold() == (saved[0], saved[1], NO_AUTOMATIC_FULL)
    # One loop is busy, the other quiet: not quiet (a loop's activity is seen at its ticks).
    for i in range(int(EVERY_S) + 5):
        now[0] += 1.0
        assert not policy.tick(2 + i, held=0, source="agent")
        assert not policy.tick(1, held=3, source="hub a")
    # Both quiet for QUIET_S: one collection. Units are held (hub a): nothing is unfrozen.
    now[0] += QUIET_S + 0.5
    ran = [policy.tick(1, held=3, source="hub a"), policy.tick(2 + i, held=0, source="agent")]
    assert ran.count(True) == 1 and policy.collections == 1 and policy.unfreezes == 0
    assert gc.get_freeze_count() > 0 and policy.stats()["sources"] == 2
    policy.forget("hub a")
    assert gc.get_threshold() == (saved[0], saved[1], NO_AUTOMATIC_FULL)  # the agent ticks on
    policy.forget("agent")  # the last loop: CPython's collector, over every object, again
    assert gc.get_threshold() == saved and gc.get_freeze_count() == 0
    policy.uninstall()
    assert gc_policy.installed() is None


def _wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_an_embedded_hub_ticks_the_installed_policy_and_forgets_it_at_close(
        tmp_path, monkeypatch, restored_collector):
    saved = restored_collector
    monkeypatch.setattr(hub_module, "GC_TICK_S", 0.05)
    now = [0.0]
    policy = FullCollections(clock=lambda: now[0]).install()
    with rpg.Session(sandbox=str(tmp_path / "s")) as s:
        pilot = rpg.PilotManager(s).submit_pilots(rpg.PilotDescription(cores=2, runtime=5))
        umgr = rpg.UnitManager(s)
        umgr.add_pilots(pilot)
        units = umgr.submit_units([rpg.UnitDescription(executable="/bin/true")
                                   for _ in range(4)])
        umgr.wait_units(timeout=60)
        assert [u.state for u in units] == ["DONE"] * 4
        assert _wait(lambda: policy.stats()["sources"] == 1)
        assert gc.get_threshold() == (saved[0], saved[1], NO_AUTOMATIC_FULL)
        assert policy.collections == 0  # its clock has not moved: not due
        # Its clock moves on, the hub's events stop: quiet, and no unit held: unfrozen, then
        # collected.
        def moved_and_collected() -> bool:
            now[0] += QUIET_S / 4
            return policy.collections >= 1

        assert _wait(moved_and_collected)
        assert now[0] >= EVERY_S
        assert policy.unfreezes == 1 and s.hub.stats()["gc"]["full_collections"] == 1
    assert policy.stats()["sources"] == 0  # the hub ended: forgotten
    assert gc.get_threshold() == saved


def test_rpg_hub_serve_runs_the_policy_in_its_own_process(hub_service):
    from tests.test_hub_protocol import raw_client

    with rpg.Session(hub=hub_service.access_path) as s:
        umgr = rpg.UnitManager(s)
        assert umgr is not None
        with raw_client(hub_service.access["address"]) as c:
            assert _wait(lambda: (c("status", hub_service.access["token"])["gc"] or {})
                         .get("sources") == 1, timeout=15)
    # This process's collector was not touched by any of it.
    assert gc_policy.installed() is None and gc.get_threshold()[2] != NO_AUTOMATIC_FULL


def test_what_a_session_keeps_per_unit_is_mostly_out_of_the_collectors_way(tmp_path):
    """The event stream, the profile's buffer and the hub's records keep their fields in
    tuples of strings and numbers, which the collector untracks: with CPython's own collector
    in the application, they are not walked by its full collections, nor do they count toward
    the next one (at 10,000 units they set off one in the middle of a cancel). 14.5 tracked
    objects a unit before; a Unit, its history, the hub's record and its description now."""
    n = 300
    with rpg.Session(sandbox=str(tmp_path / "s")) as s:
        pilot = rpg.PilotManager(s).submit_pilots(rpg.PilotDescription(cores=4, runtime=5))
        umgr = rpg.UnitManager(s)
        umgr.add_pilots(pilot)
        descs = [rpg.UnitDescription(executable="/bin/sh", arguments=["-c", "echo hi"])
                 for _ in range(n)]
        gc.collect()
        before = {id(o) for o in gc.get_objects()}
        units = umgr.submit_units(descs)
        umgr.wait_units(timeout=60)
        assert [u.state for u in units] == ["DONE"] * n
        # Twice: a pass untracks a tuple only if what it holds is untracked already, and an
        # event's outer tuple may come before its flat fields in the pass that untracks those
        # (how many are left so depends on the young collections the run happened to have).
        gc.collect()
        gc.collect()
        new = [o for o in gc.get_objects() if id(o) not in before]
        assert len(new) <= 6 * n, Counter(type(o).__qualname__ for o in new).most_common(8)
        # and every field still reached the application, each state once, in order
        u = units[-1]
        assert (u.exit_code, u.stdout, u.pilot) == (0, "hi\n", pilot.uid)
        assert [st for st, _ in u.history] == ["NEW", "BOUND", "STAGING_IN", "SCHEDULING",
                                               "EXECUTING", "STAGING_OUT", "DONE"]
        profile = s.profile_path
    # the profile's lines, written from the flat buffer, carry the same fields
    mine = {r["state"]: r for r in read_profile(profile) if r["uid"] == u.uid}
    assert mine["BOUND"]["pilot"] == pilot.uid and mine["DONE"]["exit_code"] == 0
