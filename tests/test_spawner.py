"""The agent's spawner process (rpg/agent/spawn_server.py): what a unit gets from it, and what
happens when it or the agent dies."""

from __future__ import annotations

import glob
import json
import marshal
import os
import resource
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

import rpg
from rpg.agent.unit_process import SERVER
from rpg.io_pool.sweep import pilot_key
from tests.pilots import local_pilot, unrun_agent
from tests.procs import wait_no_pilot_processes, wait_pilot_processes


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


def test_the_spawner_leaves_its_account_of_spawns_in_the_pilot_sandbox(tmp_path):
    """As it exits, the spawner writes how many units it started and the wall time it spent in
    posix_spawn (the serial path: bench/throughput.py prints it) and waiting for requests. A
    spawn that fails is not counted."""
    with rpg.Session(sandbox=str(tmp_path / "session")) as session:
        _, pilot, umgr = local_pilot(session, cores=2)
        units = umgr.submit_units([rpg.UnitDescription(executable="/bin/true")
                                   for _ in range(12)] +
                                  [rpg.UnitDescription(executable="/no/such/program")])
        assert umgr.wait_units(timeout=30) == ["DONE"] * 12 + ["FAILED"]
        spawner = spawner_of(pilot).pid
        assert "cannot start" in units[-1].reason, units[-1].reason
    found = list((tmp_path / "session").rglob("spawner.*.stats.json"))
    assert [p.name for p in found] == [f"spawner.{spawner}.stats.json"], found
    stats = json.loads(found[0].read_text())
    assert stats["pid"] == spawner and stats["spawns"] == 12, stats
    assert 0 < stats["spawn_s"] < stats["alive_s"], stats
    assert 0 < stats["select_s"] < stats["alive_s"], stats
    assert stats["spawn_s"] + stats["select_s"] <= stats["alive_s"], stats


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
    assert len(wait_pilot_processes(key, 6)) == 6  # sh and two sleeps each
    os.kill(pilot.pid, signal.SIGKILL)
    spawner.wait(timeout=10)  # it exited by itself (and was reaped by init)
    deadline = time.monotonic() + 5
    while wait_no_pilot_processes(key, timeout=0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert wait_no_pilot_processes(key, timeout=0) == []
    assert pilot.wait(timeout=30) == "FAILED"
    assert umgr.wait_units(timeout=30) == ["FAILED"] * 2


def autogroup_nice(text: str) -> int:
    """The nice value in a /proc/PID/autogroup line: ``/autogroup-123 nice 19``."""
    name, word, value = text.split()
    assert name.startswith("/autogroup-") and word == "nice", text
    return int(value)


def test_units_run_at_the_pilots_unit_nice_and_rpgs_loops_do_not(session):
    """The units' session (the spawner's) gets the pilot's unit_nice (19 unless said), which a
    unit's own children keep; the agent's session and the application's keep theirs. The
    kernel takes one autogroup change per 100 ms machine-wide, so the change can land after
    the first units started (they share the session, so they get it then): the unit here is
    submitted once it has landed (a clean-clone CI run had its first line at 0, its child's
    at 19)."""
    with open("/proc/self/autogroup") as fh:
        ours = fh.read()
    _, pilot, umgr = local_pilot(session)
    assert pilot.wait(state="ACTIVE", timeout=30) == "ACTIVE", pilot.reason
    spawner = spawner_of(pilot)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{spawner.pid}/autogroup") as fh:
            if autogroup_nice(fh.read()) == 19:
                break
        time.sleep(0.05)
    zero_pmgr = rpg.PilotManager(session)
    zero = zero_pmgr.submit_pilots(rpg.PilotDescription(cores=1, unit_nice=0))
    zero_umgr = rpg.UnitManager(session)
    zero_umgr.add_pilots(zero)
    show = rpg.UnitDescription(executable="/bin/sh", arguments=[
        "-c", "cat /proc/self/autogroup; sh -c 'cat /proc/self/autogroup'"])
    unit, = umgr.submit_units([show])
    plain, = zero_umgr.submit_units([show])
    assert unit.wait(timeout=30) == "DONE" and plain.wait(timeout=30) == "DONE"
    assert [autogroup_nice(line) for line in unit.stdout.splitlines()] == [19, 19]
    assert [autogroup_nice(line) for line in plain.stdout.splitlines()] == [0, 0]
    for p in (pilot, zero):
        with open(f"/proc/{p.pid}/autogroup") as fh:
            assert autogroup_nice(fh.read()) == 0  # the agent's loop
    with open("/proc/self/autogroup") as fh:
        assert fh.read() == ours  # the application's session: untouched
    for p in (pilot, zero):
        p.cancel()
        assert p.wait(timeout=30) == "CANCELED"
    stats = [json.loads((Path(session.sandbox) / p.uid / "agent.stats.json").read_text())
             for p in (pilot, zero)]
    assert stats[0]["unit_nice"] == [{"value": 19, "error": None}]
    assert stats[1]["unit_nice"] == [None]  # 0: not asked for


# nobody's interpreter: Debian's (.ci/run installs it); the tests' own may sit under /root
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def server_copy():
    """spawn_server.py (stdlib only) where user nobody can read it: a checkout may sit in a
    directory only root can enter."""
    d = tempfile.mkdtemp(prefix="rpg-spawner-")
    try:
        os.chmod(d, 0o755)
        path = shutil.copy(SERVER, d)
        os.chmod(path, 0o644)
        yield path
    finally:
        shutil.rmtree(d)


class ServerAsNobody:
    """rpg/agent/spawn_server.py run by hand as user nobody, in a session of its own (as the
    agent starts it): frames in, frames out."""

    def __init__(self, server: str) -> None:
        req_r, self.req_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, "-I", "-S", server, str(req_r), str(rep_w)],
            pass_fds=(req_r, rep_w), user=65534, group=65534, extra_groups=[],
            start_new_session=True, cwd=os.path.dirname(server))  # nobody cannot write there
        os.close(req_r)
        os.close(rep_w)
        self.buf = b""

    def send(self, *messages: list) -> None:
        body = marshal.dumps(list(messages))
        os.write(self.req_w, len(body).to_bytes(4, "little") + body)

    def reply(self, timeout: float = 10.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.buf) < 4 or len(self.buf) < 4 + int.from_bytes(self.buf[:4], "little"):
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.rep_r], [], [], left)[0], "no reply"
            chunk = os.read(self.rep_r, 65536)
            assert chunk, f"the server exited: {self.proc.wait(timeout=5)}"
            self.buf += chunk
        size = int.from_bytes(self.buf[:4], "little")
        messages, self.buf = marshal.loads(self.buf[4:4 + size]), self.buf[4 + size:]
        return messages

    def close(self) -> int:
        os.close(self.req_w)  # the agent is gone: the server kills what runs and exits
        try:
            return self.proc.wait(timeout=10)
        finally:
            os.close(self.rep_r)


def test_the_spawner_sets_its_nice_as_an_ordinary_user_through_the_kernels_rate_limit(
        server_copy):
    """Unprivileged, the kernel takes one autogroup nice change per 100 ms machine-wide (EAGAIN
    otherwise): two spawners starting together both get theirs, the second a moment later. A
    value the kernel refuses is reported, and the spawner goes on serving."""
    servers = [ServerAsNobody(server_copy), ServerAsNobody(server_copy)]
    try:
        for s in servers:
            s.send(["nice", 19])
        assert [s.reply() for s in servers] == [[["niced", 19, None]]] * 2
        for s in servers:
            with open(f"/proc/{s.proc.pid}/autogroup") as fh:
                assert autogroup_nice(fh.read()) == 19
        first = servers[0]
        first.send(["nice", 99], ["nice", "x"])  # out of range; not a number
        assert [m[:2] for m in first.reply()] == [["niced", "x"]]  # the later ask wins
        first.send(["nice", 99])
        (op, value, error), = first.reply()
        assert (op, value) == ("niced", 99) and "Invalid argument" in error, error
        with open(f"/proc/{first.proc.pid}/autogroup") as fh:
            assert autogroup_nice(fh.read()) == 19  # as it was
        first.send(["env", {"PATH": "/usr/bin:/bin"}],
                   ["spawn", 1, ["/bin/true"], "/tmp", {}, os.devnull, os.devnull])
        got = []
        while not any(m[0] == "exited" for m in got):
            got += first.reply()
        assert [m[0] for m in got] == ["started", "exited"] and got[1][2] == 0, got
    finally:
        assert [s.close() for s in servers] == [0, 0]


def test_a_kernel_without_autogroups_is_said_so_and_the_spawner_serves_on(server_copy):
    """No /proc/self/autogroup (a kernel built without it): the reply says so, at once."""
    text = Path(server_copy).read_text()
    assert 'AUTOGROUP = "/proc/self/autogroup"' in text
    Path(server_copy).write_text(text.replace('AUTOGROUP = "/proc/self/autogroup"',
                                              'AUTOGROUP = "/proc/self/no-autogroup-here"'))
    server = ServerAsNobody(server_copy)
    try:
        server.send(["nice", 19], ["env", {}],
                    ["spawn", 1, ["/bin/true"], "/tmp", {}, os.devnull, os.devnull])
        got = []
        while not any(m[0] == "exited" for m in got):
            got += server.reply()
        niced = [m for m in got if m[0] == "niced"]
        assert len(niced) == 1 and niced[0][1] == 19, got
        assert "No such file" in niced[0][2] and "no autogroup scheduling" in niced[0][2], got
        assert [m[0] for m in got if m[0] != "niced"] == ["started", "exited"], got
    finally:
        assert server.close() == 0


def test_a_second_kill_while_a_unit_is_terminated_sends_sigkill_and_returns(tmp_path):
    """A unit's greenlet that was killed waits up to ``kill_grace`` for its process to take
    SIGTERM. A second kill meanwhile (a cancel, the escalation, the agent's stop) must not
    leave the unit unreported: the wait ends at once and the group gets SIGKILL."""
    import signal as sig

    import gevent

    from rpg.agent.unit_process import Spawner
    from rpg.log import get_logger

    agent = unrun_agent(str(tmp_path), kill_grace=20)
    spawner = Spawner(dict(os.environ), str(tmp_path), os.environ, get_logger("test"),
                      lambda *a: None)
    spawner.start()
    spawner.run()
    try:
        ready = tmp_path / "ready"
        proc = spawner.spawn("unit.000001",
                             ["/bin/sh", "-c", f'trap "" TERM; touch {ready}; sleep 30'],
                             str(tmp_path), {}, str(tmp_path / "out"), str(tmp_path / "err"),
                             10)
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:  # SIGTERM is ignored now
            gevent.sleep(0.02)
        ender = gevent.spawn(agent._terminate, proc)
        gevent.sleep(0.3)  # SIGTERM sent and ignored; it waits out its 20 s grace
        assert not ender.ready() and proc.returncode is None
        t0 = time.monotonic()
        ender.kill(block=True, timeout=5)  # the second kill
        assert time.monotonic() - t0 < 1
        assert ender.dead
        assert proc.wait(timeout=5) == -sig.SIGKILL
    finally:
        spawner.close()


def _log_count(pilot, event: str) -> int:
    """How many times the agent logged ``event`` so far (its log is agent.out or agent.err)."""
    n = 0
    for name in ("agent.out", "agent.err"):
        try:
            with open(os.path.join(pilot.sandbox, name), errors="replace") as fh:
                n += fh.read().count(event)
        except FileNotFoundError:
            pass
    return n


def test_a_spawner_whose_fd_table_is_full_still_starts_units(session, tmp_path):
    """The spawner's soft RLIMIT_NOFILE is lowered (prlimit, from outside) to its lowest free
    fd, so it cannot open one more file. Units start all the same, on both paths (a plain
    unit, and one with staging, which runs as a greenlet): each start only replaces fds 0-2
    (glibc's posix_spawn closes a target fd before its open), and the spawner opens nothing of
    its own per unit. So "too many open files" never reaches a unit from its spawn here (the
    agent's FD_SHORT retry is left for ENFILE, the system's table full). The spawner also
    exits cleanly at the pilot's end with its table full."""
    _, pilot, umgr = local_pilot(session, cores=1)
    first = umgr.submit_units(rpg.UnitDescription(executable="/bin/true"))
    assert first.wait(timeout=30) == "DONE", first.reason  # the spawner is in its loop now
    spawner = spawner_of(pilot)
    held = {int(n) for n in os.listdir(f"/proc/{spawner.pid}/fd")}
    lowest_free = min(set(range(len(held) + 1)) - held)
    _, hard = resource.prlimit(spawner.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(spawner.pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
    src = tmp_path / "in.txt"
    src.write_text("staged\n")
    plain, staged = umgr.submit_units([
        rpg.UnitDescription(executable="/bin/sh", arguments=["-c", "echo ran; ls"]),
        rpg.UnitDescription(executable="/bin/sh", arguments=["-c", "echo ran; ls"],
                            input_staging=[{"source": str(src), "target": "in.txt"}])])
    assert umgr.wait_units([plain.uid, staged.uid], timeout=30) == ["DONE", "DONE"], \
        (plain.reason, staged.reason)
    assert plain.stdout.split() == ["ran", "STDERR", "STDOUT"]
    assert staged.stdout.split() == ["ran", "STDERR", "STDOUT", "in.txt"]
    assert spawner_of(pilot).pid == spawner.pid  # the same spawner served them
    assert _log_count(pilot, "spawn_fds_short") == 0
    pilot.cancel()
    assert pilot.wait(timeout=30) in rpg.FINAL
    assert not spawner.is_running()
    stats = glob.glob(os.path.join(pilot.sandbox, f"spawner.{spawner.pid}.stats.json"))
    assert len(stats) == 1, os.listdir(pilot.sandbox)  # written with its fd table full


@pytest.mark.parametrize("kind", ["plain", "greenlet"])
def test_a_unit_whose_exit_is_not_seen_at_the_pilots_end_is_reported_by_the_agent(session,
                                                                                  tmp_path,
                                                                                  kind):
    """The spawner is stopped (SIGSTOP) under a running unit, so neither the stop's SIGTERM and
    SIGKILL nor the unit's exit get through; then the pilot's walltime runs out. The agent
    waits kill_grace + STOP_WAIT_S for the exit, then reports the unit itself (both paths: a
    plain unit, and one with staging, a greenlet), with the stop's words and no exit code: the
    final push carries it (without that, the hub ended it with its own words). "plain" leaves
    the spawner stopped: the agent SIGKILLs it at its exit and then kills the unit's group,
    which the spawner can no longer do, and its heartbeat goes on meanwhile."""
    from rpg.agent.ending import STOP_WAIT_S

    src = tmp_path / "in.txt"
    src.write_text("staged\n")
    staging = [{"source": str(src), "target": "in.txt"}] if kind == "greenlet" else []
    pmgr = rpg.PilotManager(session)
    pilot = pmgr.submit_pilots(rpg.PilotDescription(resource="local", cores=1, runtime=0.05,
                                                    kill_grace=0.5, heartbeat_timeout=4))
    umgr = rpg.UnitManager(session)
    umgr.add_pilots(pilot)
    unit = umgr.submit_units(rpg.UnitDescription(executable="/bin/sleep", arguments=["60"],
                                                 input_staging=staging))
    assert unit.wait(state="EXECUTING", timeout=30) == "EXECUTING", (unit.state, unit.reason)
    spawner = spawner_of(pilot)
    spawner.suspend()
    try:
        assert unit.wait(timeout=3 + 0.5 + STOP_WAIT_S + 15) == "FAILED", unit.state
        assert unit.reason == "pilot walltime: its runtime of 3 s ran out", unit.reason
        assert unit.exit_code is None
        if kind == "plain":
            # The agent's pushes go on while it waits 10 s for the stalled spawner at its exit:
            # its heartbeat, or the hub would end the pilot FAILED after 4 s of silence.
            assert pilot.wait(timeout=40) == "DONE", (pilot.state, pilot.reason)
            assert pilot.reason == "agent finished (runtime ended)", pilot.reason
            killed = [json.loads(line)["units_killed"] for name in ("agent.out", "agent.err")
                      for line in open(os.path.join(pilot.sandbox, name))
                      if "spawner_killed_at_close" in line]
            assert killed == [1]  # the sleep 60, killed by the agent itself
    finally:
        try:
            spawner.resume()
        except psutil.NoSuchProcess:
            pass
    assert pilot.wait(timeout=30) in rpg.FINAL
    assert _log_count(pilot, "units_not_seen_to_exit") == 1
    assert wait_no_pilot_processes(pilot_key(session.uid, pilot.uid)) == []
