"""The hub service's journal (rpg/hub/journal.py) and restart (rpg/hub/restore.py): a real
``rpg hub serve`` SIGKILLed mid-run and started again on the same sandbox, a real client that
carries on, real local agents that outlive the hub; each unit appends its uid to a ledger file,
so a unit that ran twice shows."""

from __future__ import annotations

import collections
import os
import signal
import time

import gevent
import psutil
import pytest

import rpg
from rpg.hub.journal import Journal, _pack, read_journal, restore
from rpg.io_pool import IOPool
from tests.hub_fixture import HubProcess


def test_a_journal_cut_mid_record_is_read_to_its_last_whole_one(tmp_path):
    path = str(tmp_path / "journal")
    records = [["session", {"uid": "s", "owner": "me", "address": "tcp://127.0.0.1:1"}],
               ["mgr", "umgr.000001", "unit"],
               ["units", "umgr.000001", 1.0, [["unit.000002", {"cores": 1, "b": b"\0\xff"}]]],
               ["ev", "unit", "unit.000002", "BOUND", 2.0, {"pilot": "pilot.000003"}]]
    data = b"".join(_pack(r) for r in records)
    whole = len(data) - len(_pack(records[-1]))
    with open(path, "wb") as fh:
        fh.write(data[:-3])  # killed mid-write of the last record
    got, good, size = read_journal(path)
    assert got == records[:-1] and good == whole and size == len(data) - 3
    r = restore(path)
    assert r.units["unit.000002"][1]["b"] == b"\0\xff" and r.events == [] and r.torn == size - good
    assert r.last_uid == 2
    # A bit flipped inside a record: read up to the record before it.
    with open(path, "r+b") as fh:
        fh.seek(whole - 2)
        fh.write(b"\x00\x00")
    got, good2, _ = read_journal(path)
    assert got == records[:2] and good2 < whole
    # The writer cuts the torn tail and appends after the last whole record.
    pool = IOPool()
    try:
        def write() -> None:
            j = Journal(path, pool.for_path(path), good=good2)
            j.add("closing")
            j.sync(10)
            j.close()
        gevent.spawn(write).get(timeout=30)
    finally:
        pool.close(wait=2.0)
    got, good3, size3 = read_journal(path)
    assert got == records[:2] + [["closing"]] and good3 == size3


def _ledger_unit(ledger: str, then: str, **kw) -> rpg.UnitDescription:
    return rpg.UnitDescription(executable="/bin/sh",
                               arguments=["-c", f'echo "$RPG_UNIT_UID" >> {ledger}; {then}'],
                               **kw)


def _runs(ledger: str) -> collections.Counter:
    with open(ledger) as f:
        return collections.Counter(f.read().split())


def _pilot_of(s: rpg.Session) -> tuple[rpg.PilotManager, rpg.UnitManager, rpg.Pilot]:
    """A 4-core local pilot whose agent waits a minute for a hub that went away."""
    pmgr, umgr = rpg.PilotManager(s), rpg.UnitManager(s)
    pilot = pmgr.submit_pilots(rpg.PilotDescription(cores=4, runtime=10, heartbeat_timeout=60))
    umgr.add_pilots(pilot)
    return pmgr, umgr, pilot


def _kill_hub(hub: HubProcess) -> None:
    os.kill(hub.proc.pid, signal.SIGKILL)
    hub.proc.wait(10)
    hub._log.close()


@pytest.mark.timeout(180)
def test_a_hub_killed_mid_run_comes_back_and_every_unit_runs_once(tmp_path):
    sandbox, ledger = str(tmp_path / "hub"), str(tmp_path / "ledger")
    hub = HubProcess(sandbox)
    try:
        with rpg.Session(hub=hub.access_path) as s:
            pmgr, umgr, pilot = _pilot_of(s)
            units = umgr.submit_units([_ledger_unit(ledger, "sleep 0.3") for _ in range(60)])
            deadline = time.monotonic() + 60
            while sum(u.state == "DONE" for u in units) < 8 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert any(u.state == "EXECUTING" for u in units)
            _kill_hub(hub)  # 60 units in flight: some done, some running, most waiting
            agent = psutil.Process(pilot.pid)
            assert agent.is_running()  # it outlives the hub
            time.sleep(1.0)
            hub = HubProcess(sandbox)  # the same sandbox: the same addresses and tokens
            assert umgr.wait_units(timeout=120) == ["DONE"] * 60, \
                [(u.uid, u.state, u.reason) for u in units if u.state != "DONE"]
            assert _runs(ledger) == collections.Counter(u.uid for u in units)  # once each
            for u in units:  # each state once, in order: nothing missed or repeated
                seen = [st for st, _ in u.history]
                assert seen == ["NEW", "BOUND", "STAGING_IN", "SCHEDULING", "EXECUTING",
                                "STAGING_OUT", "DONE"], (u.uid, seen)
            assert pilot.state == "ACTIVE"  # adopted, not relaunched
            assert psutil.Process(pilot.pid).pid == agent.pid
    finally:
        assert hub.stop() == 0


@pytest.mark.timeout(180)
def test_units_whose_agent_died_while_the_hub_was_down_fail_or_move(tmp_path):
    sandbox, ledger = str(tmp_path / "hub"), str(tmp_path / "ledger")
    hub = HubProcess(sandbox)
    try:
        with rpg.Session(hub=hub.access_path) as s:
            pmgr, umgr, pilot = _pilot_of(s)
            plain = umgr.submit_units([_ledger_unit(ledger, "sleep 60") for _ in range(2)])
            again = umgr.submit_units([_ledger_unit(
                ledger, f'[ "$(grep -c "$RPG_UNIT_UID" {ledger})" -gt 1 ] || sleep 60',
                restartable=True) for _ in range(2)])
            umgr.wait_units([u.uid for u in plain + again], state="EXECUTING", timeout=60)
            _kill_hub(hub)
            agent = psutil.Process(pilot.pid)
            agent.kill()  # the agent dies too, while no hub listens
            agent.wait(10)
            hub = HubProcess(sandbox)
            assert pilot.wait(timeout=60) == "FAILED", pilot.reason
            assert "agent died" in pilot.reason, pilot.reason
            for u in plain:
                assert u.wait(timeout=30) == "FAILED"
                assert u.reason_code == "pilot_ended" and pilot.uid in u.reason, u.reason
            # The restartable ones wait for a pilot, and run again there.
            rescue = pmgr.submit_pilots(rpg.PilotDescription(cores=2, runtime=10))
            umgr.add_pilots(rescue)
            for u in again:
                assert u.wait(timeout=60) == "DONE", u.reason
                assert u.pilot == rescue.uid and u.restarts == 1
            runs = _runs(ledger)
            assert runs == collections.Counter({**{u.uid: 1 for u in plain},
                                                **{u.uid: 2 for u in again}})
    finally:
        hub.stop()


def test_an_agents_call_outwaits_the_hubs_journal_wait():
    """A push whose reply waits for a stalled journal disk (JOURNAL_WAIT_S) is answered before
    the agent gives up on it (CALL_TIMEOUT_S), not sent a second time."""
    from rpg.agent.agent import CALL_TIMEOUT_S
    from rpg.hub.service import JOURNAL_WAIT_S

    assert CALL_TIMEOUT_S >= JOURNAL_WAIT_S + 2.0
