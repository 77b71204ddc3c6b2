"""Late binding (rpg/hub/binding.py): units go to pilots as they have room, and move when a
pilot ends before it ran them. Real local pilots; each unit appends its uid to a ledger file,
so a unit that ran twice shows."""

from __future__ import annotations

import collections
import os
import time
import types

import rpg
from rpg.hub.binding import PREFETCH_MIN, PREFETCH_S, capacity
from rpg.hub.records import Pace


def _ledgered(ledger: str, then: str = "", **kw) -> rpg.UnitDescription:
    return rpg.UnitDescription(executable="/bin/sh",
                               arguments=["-c", f'echo "$RPG_UNIT_UID" >> {ledger}; {then}'],
                               **kw)


def _runs(ledger: str) -> collections.Counter:
    try:
        with open(ledger) as f:
            return collections.Counter(f.read().split())
    except FileNotFoundError:
        return collections.Counter()


def _ran(ledger: str, unit: rpg.Unit, timeout: float = 10.0) -> bool:
    """EXECUTING means its process exists; this waits until its script wrote its line."""
    deadline = time.monotonic() + timeout
    while not _runs(ledger)[unit.uid]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_pilot_that_joins_later_takes_the_units_the_first_has_no_room_for(session, tmp_path):
    ledger = str(tmp_path / "ledger")
    pmgr = rpg.PilotManager(session)
    small = pmgr.submit_pilots(rpg.PilotDescription(cores=1, runtime=60))
    umgr = rpg.UnitManager(session)
    umgr.add_pilots(small)
    assert small.wait(state="ACTIVE", timeout=30) == "ACTIVE", small.reason
    units = umgr.submit_units([_ledgered(ledger, "sleep 0.1") for _ in range(200)])
    big = pmgr.submit_pilots(rpg.PilotDescription(cores=4, runtime=60))
    umgr.add_pilots(big)
    umgr.wait_units(timeout=120)
    assert {u.state for u in units} == {"DONE"}
    on = collections.Counter(u.pilot for u in units)
    # Bound at submit, all 200 went to the small pilot; now it never holds more than its room
    # (1 core + 32 ready), and the big one, with 4 times its cores, runs most of them.
    assert on[big.uid] > 2 * on[small.uid] > 0, on
    assert _runs(ledger) == collections.Counter(u.uid for u in units)  # each ran once
    for u in units:
        assert [st for st, _ in u.history].count("BOUND") == 1


def test_a_canceled_pilot_gives_its_waiting_and_restartable_units_to_another(session, tmp_path):
    ledger, go = str(tmp_path / "ledger"), tmp_path / "go"
    pmgr = rpg.PilotManager(session)
    first = pmgr.submit_pilots(rpg.PilotDescription(cores=1, runtime=60))
    umgr = rpg.UnitManager(session)
    umgr.add_pilots(first)
    # One core: the restartable unit runs (until "go" exists), the other 6 wait on the agent.
    runner = umgr.submit_units(_ledgered(ledger, f"while [ ! -e {go} ]; do sleep 0.05; done",
                                         restartable=True))
    assert runner.wait(state="EXECUTING", timeout=30) == "EXECUTING", runner.reason
    assert _ran(ledger, runner)
    waiting = umgr.submit_units([_ledgered(ledger) for _ in range(6)])
    for u in waiting:
        assert u.wait(state="SCHEDULING", timeout=30) == "SCHEDULING", (u.uid, u.state)
        assert u.pilot == first.uid
    second = pmgr.submit_pilots(rpg.PilotDescription(cores=2, runtime=60))
    umgr.add_pilots(second)
    assert second.wait(state="ACTIVE", timeout=30) == "ACTIVE", second.reason
    first.cancel()
    assert first.wait(timeout=30) == "CANCELED"
    go.touch()
    umgr.wait_units(timeout=60)
    units = [runner, *waiting]
    assert {u.state for u in units} == {"DONE"}, [(u.uid, u.state, u.reason) for u in units]
    assert {u.pilot for u in units} == {second.uid}
    assert runner.restarts == 1
    assert [st for st, _ in runner.history].count("EXECUTING") == 2
    runs = _runs(ledger)
    # The restartable one ran twice (its first run was lost); the others never ran on the
    # canceled pilot, so exactly once each, on the second.
    assert runs == collections.Counter({runner.uid: 2, **{u.uid: 1 for u in waiting}})
    for u in waiting:
        seen = [st for st, _ in u.history]
        moved = seen.index("NEW", 1)  # back to NEW: moved to another pilot
        assert "EXECUTING" not in seen[:moved] and u.restarts == 1, seen


def test_a_canceled_pilot_with_no_other_cancels_its_units(session, tmp_path):
    ledger = str(tmp_path / "ledger")
    pmgr = rpg.PilotManager(session)
    only = pmgr.submit_pilots(rpg.PilotDescription(cores=1, runtime=60))
    umgr = rpg.UnitManager(session)
    umgr.add_pilots(only)
    units = umgr.submit_units([_ledgered(ledger, "sleep 30") for _ in range(3)])
    assert units[0].wait(state="EXECUTING", timeout=30) == "EXECUTING"
    assert _ran(ledger, units[0])
    only.cancel()
    assert only.wait(timeout=30) == "CANCELED"
    umgr.wait_units(timeout=30)
    assert {u.state for u in units} == {"CANCELED"}, [(u.state, u.reason) for u in units]
    assert all(u.restarts == 0 for u in units)
    assert sum(_runs(ledger).values()) == 1  # the waiting two never started


def test_units_wait_unbound_until_a_pilot_has_room(session, tmp_path):
    pmgr = rpg.PilotManager(session)
    pilot = pmgr.submit_pilots(rpg.PilotDescription(cores=1, runtime=60))
    umgr = rpg.UnitManager(session)
    umgr.add_pilots(pilot)
    n = capacity_of(1) + 20
    units = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep", arguments=["30"])
                               for _ in range(n)])
    assert units[0].wait(state="EXECUTING", timeout=30) == "EXECUTING"
    deadline = 50
    while deadline and sum(u.state != "NEW" for u in units) < capacity_of(1):
        units[0].wait(state="DONE", timeout=0.1)
        deadline -= 1
    bound = [u for u in units if u.state != "NEW"]
    assert len(bound) == capacity_of(1)  # the rest wait, bound to nothing
    assert all(u.pilot is None for u in units if u.state == "NEW")
    assert session.hub.call(session.hub.stats)["waiting_for_a_pilot"] >= 20
    umgr.cancel_units()
    umgr.wait_units(timeout=30)
    assert {u.state for u in units} == {"CANCELED"}
    assert os.path.isdir(session.sandbox)


def capacity_of(cores: int) -> int:
    # a function of a pilot's cores only, while its units free cores slowly (sleep 30)
    return capacity(types.SimpleNamespace(cores=cores, pace=Pace()))


def test_prefetch_follows_the_pace_at_which_a_pilot_frees_cores():
    """A pilot that gets through units fast holds PREFETCH_S of its work ready, not a fixed
    number; when its units stop ending, it falls back to its cores' prefetch."""
    pace = Pace()
    pilot = types.SimpleNamespace(cores=2, pace=pace)
    assert capacity(pilot) == 2 + PREFETCH_MIN
    pace.start -= Pace.WINDOW_S  # 4,000 cores freed in the last window: 8,000 a second
    pace.add(4000)
    assert 7000 < pace.rate < 8100
    assert capacity(pilot) == 2 + int(pace.rate * PREFETCH_S) > 2 + 500
    for _ in range(10):  # a slow window after it: the pace is the new one
        pace.add(1)
    pace.start -= Pace.WINDOW_S
    pace.add(1)
    assert pace.rate < 100 and capacity(pilot) == 2 + PREFETCH_MIN
    pace.add(3000)  # a burst, then a stall of two windows: the stall counts at once
    assert capacity(pilot) == 2 + PREFETCH_MIN  # the window is not over: the old rate
    pace.start -= 2 * Pace.WINDOW_S
    assert 2 + 200 < capacity(pilot) <= 2 + int(3000 / (2 * Pace.WINDOW_S) * PREFETCH_S)
