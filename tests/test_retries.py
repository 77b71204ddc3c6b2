"""UnitDescription(retries=N): a FAILED unit runs again, up to N times, on another pilot when
one fits; each attempt is in its history and the session's profile. Real local pilots (and
one real ``rpg hub serve``); each attempt appends a line to a ledger file, so the runs show."""

from __future__ import annotations

import json
import os
import time
import types

import pytest

import rpg
from rpg.hub.binding import capacity
from rpg.hub.records import Pace


def _attempts(ledger: str) -> list[str]:
    try:
        with open(ledger) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def _flaky(ledger: str, fail_first: int, **kw) -> rpg.UnitDescription:
    """Appends its pilot's uid to ``ledger``; exits 3 on its first ``fail_first`` attempts."""
    script = (f'echo "$RPG_PILOT_UID" >> {ledger}; '
              f'[ "$(wc -l < {ledger})" -gt {fail_first} ] || exit 3')
    return rpg.UnitDescription(executable="/bin/sh", arguments=["-c", script], **kw)


def capacity_of(pilot: rpg.Pilot) -> int:
    """The units of 1 core a pilot holds at once: its cores and its agent's prefetch, while its
    units end slowly (its pace adds nothing)."""
    return capacity(types.SimpleNamespace(cores=pilot.description.cores, pace=Pace()))


def _until(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _pilot(session, cores: int = 1) -> tuple[rpg.UnitManager, rpg.Pilot]:
    pmgr = rpg.PilotManager(session)
    pilot = pmgr.submit_pilots(rpg.PilotDescription(cores=cores, runtime=60))
    umgr = rpg.UnitManager(session)
    umgr.add_pilots(pilot)
    return umgr, pilot


def test_a_unit_that_fails_twice_is_done_on_its_third_attempt(session, tmp_path):
    umgr, pilot = _pilot(session)
    ledger = str(tmp_path / "ledger")
    seen: list[tuple[str, str | None]] = []
    umgr.register_callback(lambda u, st: seen.append((st, u.reason_code)))
    unit = umgr.submit_units(_flaky(ledger, fail_first=2, retries=2))
    assert unit.wait(timeout=60) == "DONE", unit.reason
    assert len(_attempts(ledger)) == 3
    assert unit.retried == 2 and unit.restarts == 2
    assert unit.exit_code == 0
    history = [st for st, _ in unit.history]
    assert history.count("NEW") == 3 and history.count("EXECUTING") == 3, history
    assert "FAILED" not in history  # a retried attempt does not end the unit
    # The callbacks saw each attempt start over, with the retry's code (they run on the
    # callback thread: wait returns once the unit is DONE, maybe before they have all run).
    assert _until(lambda: seen and seen[-1][0] == "DONE", 10), seen
    assert [code for st, code in seen if st == "NEW"] == ["retry", "retry"], seen
    # The profile keeps each failed attempt: its exit code and the words.
    session.close()
    with open(os.path.join(session.sandbox, "profile.jsonl")) as f:
        events = [json.loads(line) for line in f]
    retries = [e for e in events if e.get("uid") == unit.uid and e.get("reason_code") == "retry"]
    assert [e["retried"] for e in retries] == [1, 2]
    assert all(e["exit_code"] == 3 and "exit code 3" in e["reason"] for e in retries), retries
    assert retries[0]["reason"].startswith("retry 1 of 2: ")


def test_a_unit_out_of_retries_fails_with_its_last_attempts_reason(session, tmp_path):
    umgr, _ = _pilot(session)
    ledger = str(tmp_path / "ledger")
    unit = umgr.submit_units(_flaky(ledger, fail_first=10, retries=1))
    assert unit.wait(timeout=60) == "FAILED"
    assert len(_attempts(ledger)) == 2
    assert unit.retried == 1 and unit.exit_code == 3
    assert "exit code 3" in unit.reason and "retry" not in unit.reason, unit.reason
    assert unit.reason_code == "agent"


def test_no_retries_is_one_attempt(session, tmp_path):
    umgr, _ = _pilot(session)
    ledger = str(tmp_path / "ledger")
    unit = umgr.submit_units(_flaky(ledger, fail_first=1))
    assert unit.wait(timeout=60) == "FAILED"
    assert len(_attempts(ledger)) == 1 and unit.retried == 0


def test_a_retry_waits_for_another_pilot_rather_than_rerun_where_it_failed(session, tmp_path):
    pmgr = rpg.PilotManager(session)
    first, other = pmgr.submit_pilots([rpg.PilotDescription(cores=1, runtime=60)
                                       for _ in range(2)])
    umgr = rpg.UnitManager(session)
    umgr.add_pilots([first, other])
    for p in (first, other):
        assert p.wait(state="ACTIVE", timeout=30) == "ACTIVE", p.reason
    # The other pilot is full (its core and its prefetch) until "go" exists ...
    go = tmp_path / "go"
    blockers = umgr.submit_units([rpg.UnitDescription(
        executable="/bin/sh", arguments=["-c", f"while [ ! -e {go} ]; do sleep 0.05; done"],
        tags={"pilot": other.uid}) for _ in range(capacity_of(other))])
    assert blockers[0].wait(state="EXECUTING", timeout=30) == "EXECUTING"
    # ... so the flaky unit's first attempt runs on the first pilot, and fails there.
    ledger = str(tmp_path / "ledger")
    unit = umgr.submit_units(_flaky(ledger, fail_first=1, retries=3))
    assert _until(lambda: unit.retried == 1, 30), (unit.state, unit.reason)
    # Its retry waits for the other pilot, though the first one is idle.
    assert unit.wait(state="BOUND", timeout=1.5) == "NEW", (unit.state, unit.pilot)
    assert _attempts(ledger) == [first.uid]
    go.touch()
    umgr.wait_units(timeout=60)
    assert unit.state == "DONE" and unit.retried == 1, unit.reason
    assert _attempts(ledger) == [first.uid, other.uid]
    assert unit.pilot == other.uid


def test_a_retry_runs_where_it_failed_when_no_other_pilot_fits(session, tmp_path):
    pmgr = rpg.PilotManager(session)
    small, big = pmgr.submit_pilots([rpg.PilotDescription(cores=1, runtime=60),
                                     rpg.PilotDescription(cores=2, runtime=60)])
    umgr = rpg.UnitManager(session)
    umgr.add_pilots([small, big])
    ledger = str(tmp_path / "ledger")
    unit = umgr.submit_units(_flaky(ledger, fail_first=2, retries=2, cores=2))
    assert unit.wait(timeout=60) == "DONE", unit.reason
    assert _attempts(ledger) == [big.uid] * 3


def test_a_unit_canceled_between_attempts_is_not_retried(session, tmp_path):
    umgr, _ = _pilot(session)
    ledger, go = str(tmp_path / "ledger"), tmp_path / "go"
    script = (f'echo x >> {ledger}; while [ ! -e {go} ]; do sleep 0.05; done; exit 3')
    unit = umgr.submit_units(rpg.UnitDescription(executable="/bin/sh", arguments=["-c", script],
                                                 retries=5))
    assert unit.wait(state="EXECUTING", timeout=30) == "EXECUTING"
    assert _until(lambda: len(_attempts(ledger)) == 1, 10)  # its script has begun
    unit.cancel()
    assert unit.wait(timeout=30) == "CANCELED", unit.reason
    go.touch()
    assert len(_attempts(ledger)) == 1 and unit.retried == 0


def test_a_unit_whose_only_pilot_failed_under_it_is_not_retried_into_nothing(session,
                                                                              tmp_path):
    umgr, pilot = _pilot(session)
    unit = umgr.submit_units(rpg.UnitDescription(executable="/bin/sleep", arguments=["30"],
                                                 retries=3))
    assert unit.wait(state="EXECUTING", timeout=30) == "EXECUTING"
    pid = pilot.pid
    os.kill(pid, 9)  # the agent dies: no pilot is left to run a retry
    assert unit.wait(timeout=60) == "FAILED"
    assert unit.retried == 0
    assert pilot.uid in unit.reason, unit.reason  # its pilot's words, not "no pilot left"


@pytest.mark.parametrize("bad", [-1, 101, "2", True, 1.5, None])
def test_bad_retries_are_refused_naming_the_field(bad):
    with pytest.raises(rpg.DescriptionError) as ei:
        rpg.UnitDescription(executable="/bin/true", retries=bad).validate()
    assert ei.value.field == "retries", ei.value


def test_retries_through_a_hub_service(hub_service, tmp_path):
    ledger = str(tmp_path / "ledger")
    with rpg.Session(hub=hub_service.access_path) as s:
        umgr, _ = _pilot(s)
        unit = umgr.submit_units(_flaky(ledger, fail_first=1, retries=1))
        assert unit.wait(timeout=60) == "DONE", unit.reason
        assert unit.retried == 1
    assert len(_attempts(ledger)) == 2
