"""A plain executable unit runs as a PlainUnit in the agent, driven by callbacks, with no
greenlet of its own (rpg/agent/plain_unit.py). These tests cancel such units at each of its
steps, on a real local pilot, and check that each ends once, in order, with its cores back."""

from __future__ import annotations

import os
import random
import time
import types

import pytest
from pilots import local_pilot, record_states, unrun_agent
from procs import wait_no_pilot_processes
from test_units import check_callback_order

import rpg
from rpg.hub.binding import capacity
from rpg.hub.records import Pace
from rpg.io_pool.sweep import pilot_key


@pytest.mark.parametrize("step", ["sandbox", "start"])
def test_a_plain_unit_canceled_while_a_step_is_stuck_ends_canceled_at_once(session, tmp_path,
                                                                           step):
    """A FIFO holds one step of a unit as a stalled disk would. "sandbox": its STDOUT is a
    FIFO, so making its empty output files blocks the disk lane. "start": its STDOUT is a
    symbolic link to a FIFO, which the agent's sandbox step does not follow and the spawner's
    open does, so its start blocks the spawner. A cancel ends the unit at once; what the stuck
    step does later changes nothing (a process started after its cancel is killed), and the
    unit behind it runs once the step is free."""
    _, pilot, umgr = local_pilot(session, cores=1)
    go = str(tmp_path / "go")
    # Fill the pilot's room (its core and prefetch), so that the next units wait in the hub.
    room = capacity(types.SimpleNamespace(cores=1, pace=Pace()))
    blockers = umgr.submit_units([rpg.UnitDescription(
        executable="/bin/sh", arguments=["-c", f"while [ ! -e {go} ]; do sleep 0.05; done"])
        for _ in range(room)])
    assert blockers[0].wait(state="EXECUTING", timeout=30) == "EXECUTING"
    victim, after = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep",
                                                           arguments=["30"]),
                                       rpg.UnitDescription(executable="/bin/echo",
                                                           arguments=["after"])])
    assert victim.state == "NEW" and after.state == "NEW"
    sandbox = os.path.join(pilot.sandbox, victim.uid)
    os.makedirs(sandbox)
    fifo = os.path.join(sandbox, "STDOUT") if step == "sandbox" else str(tmp_path / "fifo")
    os.mkfifo(fifo)
    if step == "start":
        os.symlink(fifo, os.path.join(sandbox, "STDOUT"))
    stuck_in = "STAGING_IN" if step == "sandbox" else "SCHEDULING"
    open(go, "w").close()
    try:
        assert victim.wait(state=stuck_in, timeout=30) == stuck_in, victim.state
        time.sleep(0.3)  # the step is in open() of the FIFO now
        assert victim.state == stuck_in
        t0 = time.monotonic()
        umgr.cancel_units(victim.uid)
        assert victim.wait(timeout=10) == "CANCELED", (victim.state, victim.reason)
        took = time.monotonic() - t0
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
    assert took < 5, f"the cancel took {took:.1f} s"
    assert victim.reason == "canceled by the application"
    assert [s for s, _ in victim.history][-2:] == [stuck_in, "CANCELED"], victim.history
    assert all(u.wait(timeout=30) == "DONE" for u in blockers)
    assert after.wait(timeout=30) == "DONE", (after.state, after.reason)
    assert after.stdout == "after\n"
    assert wait_no_pilot_processes(pilot_key(session.uid, pilot.uid)) == []  # no sleep 30
    assert victim.state == "CANCELED" and victim.history[-1][0] == "CANCELED"
    assert pilot.state == "ACTIVE"


def test_cancels_at_every_step_of_plain_units_end_each_once_in_order_with_cores_back(session):
    """400 plain units of three kinds on a 2-core pilot; 16 waves of cancels at random
    moments land on units waiting in the hub, being prepared, waiting for cores, starting,
    running and being collected. Each unit ends once, with its states in order, the outcome its
    kind and its cancel call for; then a unit that needs both cores still runs."""
    rng = random.Random(16)
    _, pilot, umgr = local_pilot(session, cores=2)
    seen = record_states(umgr)
    assert pilot.wait(state="ACTIVE", timeout=30) == "ACTIVE", pilot.reason
    kinds = [i % 3 for i in range(400)]
    descs = [rpg.UnitDescription(executable="/bin/true") if k == 0 else
             rpg.UnitDescription(executable="/bin/sh", arguments=["-c", "echo x; exit 3"])
             if k == 1 else
             rpg.UnitDescription(executable="/bin/sleep", arguments=["0.05"]) for k in kinds]
    units = umgr.submit_units(descs)
    asked: set[str] = set()
    for _ in range(16):
        time.sleep(rng.uniform(0.01, 0.15))
        wave = [u.uid for u in rng.sample(units, 10)]
        umgr.cancel_units(wave)
        asked.update(wave)
    final = umgr.wait_units(timeout=120)
    assert all(s in rpg.FINAL for s in final), {s for s in final if s not in rpg.FINAL}
    deadline = time.monotonic() + 5  # the callbacks' thread may still be delivering
    while time.monotonic() < deadline and any(
            seen.get(u.uid, [None])[-1] != u.state for u in units):
        time.sleep(0.02)
    canceled = 0
    for u, kind in zip(units, kinds, strict=True):
        history = [s for s, _ in u.history]
        assert history.count(u.state) == 1, (u.uid, history)
        check_callback_order(seen[u.uid], u.state)
        assert history[1:] == seen[u.uid], (u.uid, history, seen[u.uid])
        if u.state == "CANCELED":
            canceled += 1
            assert u.uid in asked, (u.uid, u.reason)
            assert u.reason == "canceled by the application", u.reason
        elif kind == 1:
            assert u.state == "FAILED" and u.exit_code == 3 and u.stdout == "x\n", \
                (u.uid, u.state, u.reason)
            assert u.reason == "exit code 3"
        else:
            assert u.state == "DONE" and u.exit_code == 0, (u.uid, u.state, u.reason)
    assert canceled > 0
    assert pilot.state == "ACTIVE"
    whole = umgr.submit_units(rpg.UnitDescription(executable="/bin/echo", arguments=["both"],
                                                  cores=2))
    assert whole.wait(timeout=30) == "DONE", (whole.state, whole.reason)
    assert whole.stdout == "both\n"
    assert wait_no_pilot_processes(pilot_key(session.uid, pilot.uid)) == []


def test_a_plain_unit_ended_by_another_greenlet_wakes_its_joiners(tmp_path):
    """The agent's ``_stop_units`` waits for its units with ``gevent.joinall``, while another
    greenlet (a cancel's escalation) may end one. A PlainUnit calls its waiters from the hub,
    as a greenlet's end does: ended from a greenlet, it wakes the join at once."""
    import gevent

    from rpg.agent.plain_unit import PlainUnit

    agent = unrun_agent(str(tmp_path))
    unit = agent.units["unit.000001"] = PlainUnit(agent, "unit.000001",
                                                   {"stdout": "STDOUT", "stderr": "STDERR"})
    agent.cancel_reasons["unit.000001"] = ("CANCELED", "canceled by the application")
    t0 = time.monotonic()
    joiner = gevent.spawn(gevent.joinall, [unit], timeout=5)
    gevent.sleep(0)  # the joiner waits now
    ender = gevent.spawn(unit.kill)
    ender.join(timeout=5)
    assert ender.successful(), ender.exception
    assert joiner.get(timeout=5) == [unit]
    assert time.monotonic() - t0 < 1
    assert unit.ready() and agent.units == {}
    assert [(u[0], u[1]) for u in agent.updates] == [("unit.000001", "CANCELED")]
    assert gevent.joinall([unit], timeout=1) == [unit]  # one that has ended: at once


def test_a_plain_unit_that_ignores_sigterm_past_its_timeout_is_killed_and_fails_saying_so(
        session):
    """A unit's timeout is a timer of the agent's loop: SIGTERM when it runs out, SIGKILL after
    the pilot's kill_grace. The unit FAILS naming its timeout, with the exit code of the kill,
    and its core goes to the next unit."""
    _, pilot, umgr = local_pilot(session, cores=1, kill_grace=1.0)
    u, after = umgr.submit_units([
        rpg.UnitDescription(executable="/bin/sh", arguments=["-c", "trap '' TERM; sleep 60"],
                            timeout=0.5),
        rpg.UnitDescription(executable="/bin/echo", arguments=["next"])])
    assert u.wait(timeout=30) == "FAILED", (u.state, u.reason)
    assert u.reason == "timed out after 0.5 s; killed", u.reason
    assert u.exit_code == -9
    assert [s for s, _ in u.history][-3:] == ["EXECUTING", "STAGING_OUT", "FAILED"]
    assert after.wait(timeout=30) == "DONE" and after.stdout == "next\n"
    assert wait_no_pilot_processes(pilot_key(session.uid, pilot.uid)) == []


def test_a_plain_unit_canceled_while_its_timeout_ends_it_ends_canceled(session):
    """Its timeout ran out and its process, ignoring SIGTERM, waits out the grace; a cancel
    then ends it CANCELED (the application's word wins), by SIGKILL after the grace."""
    _, pilot, umgr = local_pilot(session, cores=1, kill_grace=2.0)
    u = umgr.submit_units(rpg.UnitDescription(
        executable="/bin/sh", arguments=["-c", "trap '' TERM; echo ready; sleep 60"],
        timeout=0.3))
    assert u.wait(state="EXECUTING", timeout=30) == "EXECUTING"
    time.sleep(1.0)  # its timeout has run out: SIGTERM was sent and ignored
    assert u.state == "EXECUTING"
    t0 = time.monotonic()
    umgr.cancel_units(u.uid)
    assert u.wait(timeout=30) == "CANCELED", (u.state, u.reason)
    assert time.monotonic() - t0 < 10
    assert u.reason == "canceled by the application"
    assert u.exit_code == -9
    assert wait_no_pilot_processes(pilot_key(session.uid, pilot.uid)) == []
    assert pilot.state == "ACTIVE"
