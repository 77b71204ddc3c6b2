"""The agent's spawner process (rpg/agent/spawn_server.py): what a unit gets from it, and what
happens when it or the agent dies."""

from __future__ import annotations

import os
import signal
import time

import psutil

import rpg
from rpg.io_pool.sweep import pilot_key
from tests.pilots import local_pilot
from tests.procs import wait_no_pilot_processes


def spawner_of(pilot) -> psutil.Process:
    agent = psutil.Process(pilot.pid)
    found = [c for c in agent.children() if "spawn_server.py" in " ".join(c.cmdline())]
    assert len(found) == 1, [c.cmdline() for c in agent.children()]
    return found[0]


def test_a_unit_gets_its_path_sandbox_and_default_signals(session, tmp_path):
    """PATH is the unit's own (as subprocess does it), a relative executable is relative to the
    sandbox, SIGPIPE/SIGINT/SIGTERM are not ignored in the unit although Python and the
    spawner ignore them, and stdin is /dev/null."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "my-tool"
    tool.write_text("#!/bin/sh\necho tool in $PWD\n")
    tool.chmod(0o755)
    _, _, umgr = local_pilot(session)
    path = f"{bindir}:{os.environ['PATH']}"
    units = umgr.submit_units([
        rpg.UnitDescription(executable="my-tool", environment={"PATH": path}),
        rpg.UnitDescription(executable="./local.sh", input_staging=[
            {"source": str(tool), "target": "local.sh", "action": "link"}]),
        rpg.UnitDescription(executable="/bin/sh", arguments=[
            "-c", "grep -E '^Sig(Ign|Blk)' /proc/self/status"]),
        rpg.UnitDescription(executable="/bin/sh", arguments=["-c", "yes | head -n 1"]),
        rpg.UnitDescription(executable="/bin/cat"),
    ])
    on_path, relative, dispositions, pipe, stdin = units
    assert umgr.wait_units(timeout=30) == ["DONE"] * 5, [u.reason for u in units]
    assert on_path.stdout.strip() == f"tool in {on_path.sandbox}"
    assert relative.stdout.strip() == f"tool in {relative.sandbox}"
    masks = dict(line.split(":") for line in dispositions.stdout.splitlines())
    ignored = int(masks["SigIgn"].strip(), 16)
    for sig in (signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGXFSZ):
        assert not ignored & (1 << (sig - 1)), (sig, masks)
    assert int(masks["SigBlk"].strip(), 16) == 0
    assert pipe.stdout == "y\n" and pipe.stderr == ""  # yes died of SIGPIPE, quietly
    assert stdin.stdout == ""


def test_each_unit_leads_its_own_group_in_the_spawners_session_without_a_terminal(session):
    """Its own process group: cancel kills the whole tree. The spawner's session, not one of
    its own: with autogroup scheduling every session is a scheduling entity, and a unit a
    session each made 4,000 starting or dying units outweigh the agent's and hub's loops."""
    _, pilot, umgr = local_pilot(session, cores=2)
    units = umgr.submit_units([rpg.UnitDescription(
        executable="/bin/sh", arguments=["-c", "read -r line < /proc/$$/stat; echo $line; "
                                                "sh -c 'read -r l < /proc/$$/stat; echo $l'"])
        for _ in range(2)])
    assert umgr.wait_units(timeout=30) == ["DONE"] * 2, [u.reason for u in units]
    spawner = spawner_of(pilot).pid
    groups = []
    for u in units:
        lines = u.stdout.splitlines()
        # /proc/PID/stat: pid (name) state ppid pgrp session tty_nr ...
        leader, child = ([int(f) for f in line.rsplit(")", 1)[1].split()[1:5]] for line in lines)
        ppid, pgrp, sid, tty = leader
        assert pgrp == int(lines[0].split(" (", 1)[0]), lines  # it leads its group
        assert ppid == spawner and sid == spawner and tty == 0, leader
        assert child[1:] == [pgrp, sid, 0], (leader, child)  # its child: same group
        groups.append(pgrp)
    assert len(set(groups)) == 2 and spawner not in groups


def test_a_killed_spawner_fails_its_running_units_and_a_new_one_serves(session):
    _, pilot, umgr = local_pilot(session)
    sleepers = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep", arguments=["60"])
                                  for _ in range(3)])
    for u in sleepers:
        assert u.wait(state="EXECUTING", timeout=20) == "EXECUTING", u.reason
    first = spawner_of(pilot)
    first.kill()
    for u in sleepers:
        assert u.wait(timeout=20) == "FAILED"
        assert "spawner process died" in u.reason, u.reason
    # their processes are gone (swept), and units after it run on a new spawner
    key = pilot_key(session.uid, pilot.uid)
    assert wait_no_pilot_processes(key, timeout=10) == []
    later = umgr.submit_units([rpg.UnitDescription(executable="/bin/echo", arguments=["again"])
                               for _ in range(5)])
    assert umgr.wait_units(later, timeout=30) == ["DONE"] * 5, [u.reason for u in later]
    assert [u.stdout for u in later] == ["again\n"] * 5
    assert spawner_of(pilot).pid != first.pid


def test_an_agent_killed_hard_takes_its_units_with_it(session):
    """SIGKILL the agent: its spawner sees the request pipe close, kills every unit's group
    (children of units included) and exits by itself: no sweep finds it (it carries no
    RPG_PILOT_KEY and never stays in a unit sandbox)."""
    _, pilot, umgr = local_pilot(session, cores=2)
    units = umgr.submit_units([rpg.UnitDescription(
        executable="/bin/sh", arguments=["-c", "sleep 60 & sleep 60"]) for _ in range(2)])
    for u in units:
        assert u.wait(state="EXECUTING", timeout=20) == "EXECUTING", u.reason
    spawner = spawner_of(pilot)
    key = pilot_key(session.uid, pilot.uid)
    assert len(wait_no_pilot_processes(key, timeout=0)) == 6  # sh and two sleeps each
    os.kill(pilot.pid, signal.SIGKILL)
    spawner.wait(timeout=10)  # it exited by itself (and was reaped by init)
    deadline = time.monotonic() + 5
    while wait_no_pilot_processes(key, timeout=0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert wait_no_pilot_processes(key, timeout=0) == []
    assert pilot.wait(timeout=30) == "FAILED"
    assert umgr.wait_units(timeout=30) == ["FAILED"] * 2
