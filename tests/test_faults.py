"""Faults, with real processes and real signals. Each test prints its counts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
from pilots import local_pilot
from procs import wait_no_pilot_processes

import rpg
from rpg import states
from rpg.io_pool.sweep import pilot_key, pilot_processes
from rpg.log import read_profile

wait_gone = wait_no_pilot_processes


def wait_dead(proc: psutil.Process, timeout: float) -> bool:
    """True once ``proc`` has exited (gone, or a zombie its new parent has not reaped yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_agent_killed_mid_run(tmp_path):
    """SIGKILL the agent: pilot FAILED quickly, every unit final with a reason, no orphans;
    restartable units move to another pilot and finish there."""
    interval = 0.5
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pmgr = rpg.PilotManager(session)
        doomed = pmgr.submit_pilots(rpg.PilotDescription(
            cores=4, runtime=5, heartbeat_interval=interval, heartbeat_timeout=2 * interval))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(doomed)
        units = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep", arguments=["60"])
                                   for _ in range(6)])
        restartable = umgr.submit_units([rpg.UnitDescription(
            executable="/bin/sh", arguments=["-c", "sleep 60"], restartable=True)
            for _ in range(2)])
        assert umgr.wait_units([u.uid for u in units[:4]], state="EXECUTING", timeout=30) == [
            "EXECUTING"] * 4
        key = pilot_key(session.uid, doomed.uid)
        assert len(pilot_processes(key)) >= 4
        os.kill(doomed.pid, signal.SIGKILL)
        t0 = time.monotonic()
        assert doomed.wait(timeout=10) == "FAILED"
        noticed = time.monotonic() - t0
        assert "agent died" in doomed.reason and "-9" in doomed.reason, doomed.reason
        assert umgr.wait_units([u.uid for u in units], timeout=20) == ["FAILED"] * 6
        for u in units:
            assert doomed.uid in u.reason and "agent died" in u.reason, u.reason
        orphans = wait_gone(key)
        # The restartable units wait for another pilot, then run there.
        assert [u.state for u in restartable] != ["FAILED", "FAILED"]
        rescue = pmgr.submit_pilots(rpg.PilotDescription(cores=2, runtime=5))
        umgr.add_pilots(rescue)
        umgr.wait_units([u.uid for u in restartable], state="EXECUTING", timeout=30)
        assert {u.pilot for u in restartable} == {rescue.uid}
        umgr.cancel_units([u.uid for u in restartable])
        assert umgr.wait_units([u.uid for u in restartable], timeout=30) == ["CANCELED"] * 2
        lost = sum(1 for u in units + restartable if u.state not in states.FINAL)
    print(f"\nagent SIGKILL: noticed in {noticed:.2f} s (heartbeat interval {interval} s), "
          f"units lost = {lost}, orphan unit processes = {len(orphans)}, "
          f"restarted = {len(restartable)}")
    assert noticed < 2 * interval
    assert lost == 0 and orphans == []


APP = textwrap.dedent("""
    import json, sys, time
    import rpg
    sandbox, mode = sys.argv[1], sys.argv[2]
    with rpg.Session(sandbox=sandbox) as session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(rpg.PilotDescription(
            cores=4, runtime=5, heartbeat_interval=0.5, heartbeat_timeout=2.0))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        units = umgr.submit_units([rpg.UnitDescription(executable="/bin/sh",
                                   arguments=["-c", "sleep 60 & sleep 60"]) for _ in range(4)])
        umgr.wait_units(state="EXECUTING", timeout=30)
        print(json.dumps({"session": session.uid, "pilot": pilot.uid, "agent": pilot.pid,
                          "profile": session.profile_path}), flush=True)
        time.sleep(120)
""")


def _start_app(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(APP)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "s"), "x"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        proc.wait()
        pytest.fail(f"app did not start: {proc.stderr.read()[-2000:]}")
    return proc, json.loads(line)


def test_hub_killed_agents_clean_up(tmp_path):
    """SIGKILL the application (hub and all): its agent notices within its heartbeat timeout,
    kills its unit process groups (with their grandchildren) and exits."""
    proc, info = _start_app(tmp_path)
    key = pilot_key(info["session"], info["pilot"])
    agent = psutil.Process(info["agent"])
    assert len(pilot_processes(key)) >= 8  # 4 units x (sh + 2 sleeps), at least
    proc.kill()
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    t0 = time.monotonic()
    if not wait_dead(agent, 15):
        agent.kill()
        pytest.fail(f"agent did not exit after the hub died: {agent.status()}")
    exited = time.monotonic() - t0
    orphans = wait_gone(key)
    print(f"\nhub SIGKILL: agent exited after {exited:.2f} s (heartbeat timeout 2 s), "
          f"orphan processes = {len(orphans)}")
    assert orphans == []
    assert exited < 2.0 + 8.0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_application_shuts_down_cleanly(tmp_path, sig):
    proc, info = _start_app(tmp_path)
    key = pilot_key(info["session"], info["pilot"])
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    took = time.monotonic() - t0
    events = read_profile(info["profile"])
    last: dict[str, str] = {}
    for ev in events:
        last[ev["uid"]] = ev["state"]
    units = {u: s for u, s in last.items() if u.startswith("unit.")}
    orphans = wait_gone(key)
    print(f"\n{signal.Signals(sig).name}: shut down in {took:.2f} s, units in profile "
          f"{len(units)}, final {sum(s in states.FINAL for s in units.values())}, "
          f"orphans {len(orphans)}")
    assert took < 20
    assert len(units) == 4 and all(s == "CANCELED" for s in units.values()), units
    assert last[info["pilot"]] in states.FINAL
    assert orphans == []
    assert not psutil.pid_exists(info["agent"]) or \
        psutil.Process(info["agent"]).status() == psutil.STATUS_ZOMBIE


def test_stalled_disk_lane_holds_only_its_own_units(tmp_path):
    """A FIFO on another device (tmpfs) never gets a writer: its units stall in their lane and
    end FAILED with an I/O timeout; 1,000 units staging through the other lane all finish, and
    no loop blocks."""
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a device of its own")
    fifo = os.path.join(shm, f"rpg-stall-{os.getpid()}.fifo")
    os.mkfifo(fifo)
    src = tmp_path / "input.txt"
    src.write_text("x" * 1000)
    try:
        with rpg.Session(sandbox=str(tmp_path / "s")) as session:
            pmgr = rpg.PilotManager(session)
            pilot = pmgr.submit_pilots(rpg.PilotDescription(cores=8, runtime=5,
                                                            staging_timeout=3.0))
            umgr = rpg.UnitManager(session)
            umgr.add_pilots(pilot)
            stalled = umgr.submit_units([rpg.UnitDescription(
                executable="/bin/true", input_staging=[{"source": fifo, "target": "in"}])
                for _ in range(3)])
            healthy = umgr.submit_units([rpg.UnitDescription(
                executable="/bin/true", input_staging=[{"source": str(src), "target": "in"}])
                for _ in range(1000)])
            umgr.wait_units(timeout=240)
            hub_blocked = session.hub.stats()["loop"]["blocked_events"]
        with open(tmp_path / "s" / pilot.uid / "agent.stats.json") as fh:
            agent_stats = json.load(fh)
        agent_ticks = np.load(tmp_path / "s" / pilot.uid / "agent.loop_ticks.npy")
    finally:
        _unstick(fifo)
    done = sum(u.state == "DONE" for u in healthy)
    failed = [u for u in stalled if u.state == "FAILED"]
    agent_blocked = agent_stats["loop"]["blocked_events"]
    # Its loop's ticks, each with the time it woke: as many as its stats counted (ring allowing)
    assert agent_ticks.shape == (min(agent_stats["loop"]["ticks"], 8192), 2)
    assert (np.diff(agent_ticks[:, 0]) > 0).all()
    print(f"\nstalled lane: healthy DONE {done}/1000, stalled FAILED {len(failed)}/3, "
          f"loop-blocked events hub={hub_blocked} agent={agent_blocked}")
    assert done == 1000
    assert len(failed) == 3
    for u in failed:
        assert "I/O timeout" in u.reason, u.reason
    assert hub_blocked == 0 and agent_blocked == 0


def _unstick(fifo: str) -> None:
    """Give a FIFO a writer so threads blocked opening it can finish, then remove it."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass
    try:
        os.unlink(fifo)
    except OSError:
        pass


def test_disk_full_and_unwritable_sandbox(tmp_path):
    """ENOSPC while staging out, a sandbox that cannot be created: FAILED with the OS error;
    the hub keeps going."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pmgr = rpg.PilotManager(session)
        bad = pmgr.submit_pilots(rpg.PilotDescription(cores=1, runtime=5,
                                                      sandbox=str(blocker / "sandbox")))
        good = pmgr.submit_pilots(rpg.PilotDescription(cores=2, runtime=5))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(good)
        full = umgr.submit_units(rpg.UnitDescription(
            executable="/bin/sh", arguments=["-c", "head -c 100000 /dev/zero > out.bin"],
            output_staging=[{"source": "out.bin", "target": "/dev/full"}]))
        fine = umgr.submit_units([rpg.UnitDescription(executable="/bin/true") for _ in range(5)])
        assert bad.wait(timeout=20) == "FAILED"
        assert full.wait(timeout=20) == "FAILED"
        assert umgr.wait_units([u.uid for u in fine], timeout=20) == ["DONE"] * 5
    print(f"\nbad sandbox: pilot FAILED ({bad.reason}); ENOSPC unit: {full.reason}")
    assert "Not a directory" in bad.reason
    assert "No space left on device" in full.reason


def test_units_failed_by_a_signal_while_their_pilot_is_canceled_end_canceled(session):
    """The agent stops at a SIGTERM (what scancel sends) and fails its units as their pilot
    ended under them; but the application had canceled that pilot, and the hub was stopping
    it: the units end CANCELED, with the agent's words kept. (CI met this race on SLURM.)"""
    _, pilot, umgr = local_pilot(session, cores=2)
    units = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep", arguments=["300"])
                               for _ in range(2)])
    for u in units:
        assert u.wait(state="EXECUTING", timeout=20) == "EXECUTING", u.reason
    os.kill(pilot.pid, signal.SIGSTOP)  # it will not hear "shutdown" first
    pilot.cancel()
    time.sleep(0.5)
    os.kill(pilot.pid, signal.SIGTERM)
    os.kill(pilot.pid, signal.SIGCONT)
    assert pilot.wait(timeout=30) == "CANCELED"
    assert umgr.wait_units(timeout=20) == ["CANCELED"] * 2, [u.reason for u in units]
    # Mostly the SIGTERM wins (the agent's words are kept); the pull that says "shutdown" may
    # be read first: CANCELED with the pilot's words either way.
    for u in units:
        assert f"pilot {pilot.uid} canceled" in u.reason, u.reason


def test_a_pull_reply_the_agent_never_got_is_sent_again(tmp_path):
    """A connection that drops as a pull reply goes out (an SSH tunnel killed, say) must not
    lose the units in it: they are bound and handed over, and no other pull would take them.
    Here the real agent is frozen (SIGSTOP) and a client with its token takes its units, then
    pulls again as if that reply were lost: the same units come again. The agent, thawed,
    says it never got either reply, gets them a third time, and runs each once."""
    import zerorpc

    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        _, pilot, umgr = local_pilot(session, cores=2)
        assert pilot.wait(state=states.ACTIVE, timeout=30) == states.ACTIVE, pilot.reason
        hub = session.hub
        rec = hub.pilots[pilot.uid]
        token = hub.call(lambda: rec.token)
        os.kill(pilot.pid, signal.SIGSTOP)
        try:
            time.sleep(1.0)  # its last long poll (0.5 s) has returned: no pull of it waits
            seq = hub.call(lambda: rec.pull_seq)  # the agent will say it got this one
            ctx = zerorpc.Context()
            c = zerorpc.Client(context=ctx, timeout=10, heartbeat=None)
            c.connect(session.hub_address)
            try:
                with pytest.raises(zerorpc.RemoteError, match="got must be an integer"):
                    c.pull(pilot.uid, token, 10, 0, "x")
                units = umgr.submit_units([rpg.UnitDescription(
                    executable="/bin/sh", arguments=["-c", f"echo {i} >> {tmp_path}/ran"])
                    for i in range(3)])
                uids = sorted(u.uid for u in units)
                got: list[str] = []
                for _ in range(20):  # the units reach the pilot's room on the hub's loop
                    first = c.pull(pilot.uid, token, 10, 0.5, seq)
                    got += [u["uid"] for u in first["units"]]
                    if first["units"]:
                        break
                assert sorted(got) == uids, got
                again = c.pull(pilot.uid, token, 10, 0, seq)  # "I never got that one"
                assert sorted(u["uid"] for u in again["units"]) == uids
                assert again["seq"] == first["seq"] + 1
            finally:
                c.close()
                ctx.destroy(linger=0)
        finally:
            os.kill(pilot.pid, signal.SIGCONT)
        assert umgr.wait_units(timeout=30) == [states.DONE] * 3, [u.reason for u in units]
        assert sorted((tmp_path / "ran").read_text().split()) == ["0", "1", "2"]  # each once
        assert hub.call(lambda: hub.service.counters["resent"]) == 6  # ours, then the agent's
