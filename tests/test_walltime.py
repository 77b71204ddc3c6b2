"""Walltime-aware draining: a pilot does not take (hub) or start (agent) a unit whose
``runtime`` estimate would overrun what is left of its own runtime, and leaves it for a pilot
that has the time; at its walltime its running units FAIL "pilot walltime", which never counts
against their retries. Real local pilots; each run appends to a ledger file."""

from __future__ import annotations

import types

import pytest

import rpg
from rpg.hub.binding import capacity
from rpg.hub.records import Pace


def _runs(ledger) -> list[str]:
    try:
        return ledger.read_text().split()
    except FileNotFoundError:
        return []


def _unit(ledger, then: str = "", **kw) -> rpg.UnitDescription:
    return rpg.UnitDescription(executable="/bin/sh", arguments=[
        "-c", f'echo "$RPG_PILOT_UID" >> {ledger}; {then}'], **kw)


def _active(pmgr, umgr, *descs) -> list[rpg.Pilot]:
    pilots = pmgr.submit_pilots(list(descs))
    umgr.add_pilots(pilots)
    for p in pilots:
        assert p.wait(state="ACTIVE", timeout=30) == "ACTIVE", p.reason
    return pilots


def test_a_pilot_without_the_time_leaves_long_units_to_one_that_has_it(session, tmp_path):
    pmgr, umgr = rpg.PilotManager(session), rpg.UnitManager(session)
    short, long_ = _active(pmgr, umgr, rpg.PilotDescription(cores=1, runtime=0.5),
                           rpg.PilotDescription(cores=1, runtime=60))
    # The long pilot is full (its core and its prefetch) until "go" exists.
    go = tmp_path / "go"
    full = capacity(types.SimpleNamespace(cores=1, pace=Pace()))  # blockers free none
    blockers = umgr.submit_units([rpg.UnitDescription(
        executable="/bin/sh", arguments=["-c", f"while [ ! -e {go} ]; do sleep 0.05; done"],
        tags={"pilot": long_.uid}) for _ in range(full)])
    assert blockers[0].wait(state="EXECUTING", timeout=30) == "EXECUTING"
    ledger = tmp_path / "ledger"
    longs = umgr.submit_units([_unit(ledger, runtime=120) for _ in range(3)])
    quick = umgr.submit_units(_unit(ledger, runtime=2))
    # The short pilot (30 s) is idle: it runs the unit that fits its time, not the others.
    assert quick.wait(timeout=30) == "DONE" and quick.pilot == short.uid, quick.reason
    assert [u.wait(state="BOUND", timeout=1.0) for u in longs] == ["NEW"] * 3
    go.touch()
    umgr.wait_units(timeout=60)
    assert [(u.state, u.pilot) for u in longs] == [("DONE", long_.uid)] * 3
    assert sorted(_runs(ledger)) == sorted([short.uid] + [long_.uid] * 3)


def test_a_unit_no_pilot_has_the_time_for_fails_at_once(session, tmp_path):
    pmgr, umgr = rpg.PilotManager(session), rpg.UnitManager(session)
    _active(pmgr, umgr, rpg.PilotDescription(cores=1, runtime=1))
    unit = umgr.submit_units(rpg.UnitDescription(executable="/bin/true", runtime=3600))
    assert unit.wait(timeout=10) == "FAILED"
    assert unit.reason_code == "no_pilot"
    assert "no pilot has time for it: its runtime is 3600 s" in unit.reason, unit.reason
    ok = umgr.submit_units(rpg.UnitDescription(executable="/bin/true", runtime=5))
    assert ok.wait(timeout=30) == "DONE", ok.reason


def _agent_drains(session, tmp_path, rescue: bool) -> tuple[rpg.Unit, rpg.Pilot, list]:
    """A 1-core pilot of 6 s takes a 3.5 s unit and a unit of runtime 4 s at once (both fit
    then); when the first ends, the second would overrun: the agent does not start it."""
    pmgr, umgr = rpg.PilotManager(session), rpg.UnitManager(session)
    (short,) = _active(pmgr, umgr, rpg.PilotDescription(cores=1, runtime=0.1))
    ledger = tmp_path / "ledger"
    first = umgr.submit_units(_unit(ledger, "sleep 3.5", runtime=3.5))
    late = umgr.submit_units(_unit(ledger, runtime=4))
    assert late.wait(state="SCHEDULING", timeout=10) == "SCHEDULING", late.reason
    assert late.pilot == short.uid
    others = _active(pmgr, umgr, rpg.PilotDescription(cores=1, runtime=60)) if rescue else []
    assert first.wait(timeout=30) == "DONE", first.reason
    assert late.wait(timeout=30) in ("DONE", "FAILED")
    return late, short, others + [_runs(ledger)]


def test_an_agent_does_not_start_a_unit_that_would_overrun_its_walltime(session, tmp_path):
    late, short, (runs,) = _agent_drains(session, tmp_path, rescue=False)
    assert late.state == "FAILED" and late.reason_code == "pilot_walltime", late.reason
    assert "would overrun the pilot's" in late.reason, late.reason
    assert "EXECUTING" not in [st for st, _ in late.history]
    assert runs == [short.uid]  # only the first unit ran


def test_a_unit_drained_by_one_agent_runs_on_a_pilot_with_the_time(session, tmp_path):
    late, short, (rescue, runs) = _agent_drains(session, tmp_path, rescue=True)
    assert late.state == "DONE" and late.pilot == rescue.uid, late.reason
    assert late.restarts == 1 and late.retried == 0
    assert runs == [short.uid, rescue.uid]
    seen = [st for st, _ in late.history]
    assert seen.index("SCHEDULING") < seen.index("NEW", 1), seen  # moved before it ran


def test_the_pilot_walltime_fails_running_units_but_not_their_retries(session, tmp_path):
    pmgr, umgr = rpg.PilotManager(session), rpg.UnitManager(session)
    (short,) = _active(pmgr, umgr, rpg.PilotDescription(cores=2, runtime=0.1))
    ledger_a, ledger_b = tmp_path / "a", tmp_path / "b"
    # Its first attempt outlives the pilot; a second one ends at once.
    again = umgr.submit_units(_unit(ledger_a, f'[ "$(wc -l < {ledger_a})" -gt 1 ] || sleep 60',
                                    retries=1))
    plain = umgr.submit_units(_unit(ledger_b, "sleep 60", retries=0))
    umgr.wait_units([again.uid, plain.uid], state="EXECUTING", timeout=30)
    (rescue,) = _active(pmgr, umgr, rpg.PilotDescription(cores=1, runtime=60))
    assert plain.wait(timeout=30) == "FAILED"
    assert plain.reason_code == "pilot_walltime" and "pilot walltime" in plain.reason, \
        plain.reason
    assert again.wait(timeout=30) == "DONE", again.reason
    assert again.pilot == rescue.uid and _runs(ledger_a) == [short.uid, rescue.uid]
    assert again.retried == 0 and again.restarts == 1, again.history  # walltime: no retry used
    assert short.wait(timeout=30) == "DONE", short.reason


@pytest.mark.parametrize("bad", [-1, "5", True, float("nan")])
def test_bad_runtime_is_refused_naming_the_field(bad):
    with pytest.raises(rpg.DescriptionError) as ei:
        rpg.UnitDescription(executable="/bin/true", runtime=bad)
    assert ei.value.field == "runtime", ei.value
