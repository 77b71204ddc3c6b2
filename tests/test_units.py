"""Units end to end on a real local pilot: real agent process, real executables, real files,
zerorpc over 127.0.0.1."""

from __future__ import annotations

import errno
import hashlib
import os
import time

import psutil
import pytest
from pilots import local_pilot, record_states
from procs import wait_no_pilot_processes

import rpg
from rpg import states
from rpg.io_pool.sweep import pilot_key
from rpg.log import read_profile

UNIT_ORDER = [s for s in states.UNIT_PATH if s != states.NEW]


def no_pilot_processes(pilot, timeout: float = 5.0) -> list[int]:
    """Processes carrying the pilot's marker, once the kills have had time to land."""
    return wait_no_pilot_processes(pilot_key(pilot._mgr._session.uid, pilot.uid), timeout)


def check_callback_order(history: list[str], final: str) -> None:
    """Every state once, in table order, ending in ``final``."""
    assert history[-1] == final, history
    assert len(history) == len(set(history)), f"a state twice: {history}"
    path = [s for s in history if s not in states.FINAL]
    assert path == UNIT_ORDER[: len(path)], f"out of order: {history}"


def test_200_units_of_several_kinds(session, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    big = data / "big.bin"
    big.write_bytes(os.urandom(256 * 1024))
    big_sha = hashlib.sha256(big.read_bytes()).hexdigest()
    (data / "linkme.txt").write_text("linked\n")
    outdir = tmp_path / "out"

    _, pilot, umgr = local_pilot(session, cores=4)
    seen = record_states(umgr)
    descs, expect = [], []
    for i in range(200):
        kind = i % 5
        if kind == 0:
            d = rpg.UnitDescription(executable="/bin/sh",
                                    arguments=["-c", 'echo "$GREETING $1"', "sh", str(i)],
                                    environment={"GREETING": "hello"})
            expect.append(("DONE", 0, f"hello {i}\n"))
        elif kind == 1:
            d = rpg.UnitDescription(executable="/bin/sh", arguments=["-c", "echo oops >&2; exit 3"])
            expect.append(("FAILED", 3, None))
        elif kind == 2:
            d = rpg.UnitDescription(executable="/bin/sh", arguments=["-c", 'echo "$PRE"'],
                                    pre_exec=["export PRE=ready"])
            expect.append(("DONE", 0, "ready\n"))
        elif kind == 3:  # copy and link in, copy out
            d = rpg.UnitDescription(
                executable="/bin/sh",
                arguments=["-c", "cat in/linked.txt; sha256sum big.bin | cut -c1-64 > sum.txt"],
                input_staging=[{"source": str(big), "target": "big.bin", "action": "copy"},
                               {"source": str(data / "linkme.txt"), "target": "in/linked.txt",
                                "action": "link"}],
                output_staging=[{"source": "sum.txt", "target": str(outdir / f"{i}.sum")}])
            expect.append(("DONE", 0, "linked\n"))
        else:  # move in (a file made for this unit), move out
            src = data / f"move-{i}.txt"
            src.write_text(f"payload {i}\n")
            d = rpg.UnitDescription(
                executable="/bin/cp", arguments=["moved.txt", "result.txt"],
                input_staging=[{"source": str(src), "target": "moved.txt", "action": "move"}],
                output_staging=[{"source": "result.txt", "target": str(outdir / f"{i}.res"),
                                 "action": "move"}])
            expect.append(("DONE", 0, ""))
        descs.append(d)
    units = umgr.submit_units(descs)
    assert len(units) == 200 and len({u.uid for u in units}) == 200
    umgr.wait_units(timeout=90)
    for i, (u, (state, code, out)) in enumerate(zip(units, expect, strict=True)):
        assert u.state == state, (i, u.state, u.reason, u.stderr)
        assert u.exit_code == code, (i, u.exit_code, u.reason)
        if out is not None:
            assert u.stdout == out, (i, u.stdout)
        assert u.pilot == pilot.uid
        assert u.sandbox and u.sandbox.endswith(u.uid)
        if i % 5 == 1:
            assert u.stderr == "oops\n" and "exit code 3" in u.reason
        if i % 5 == 3:
            assert (outdir / f"{i}.sum").read_text().strip() == big_sha
            assert os.path.islink(os.path.join(u.sandbox, "in/linked.txt"))
        if i % 5 == 4:
            assert (outdir / f"{i}.res").read_text() == f"payload {i}\n"
            assert not (data / f"move-{i}.txt").exists()
            assert not os.path.exists(os.path.join(u.sandbox, "result.txt"))
    # Callbacks run on the callback thread; give the last ones a moment to land.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sum(len(v) for v in seen.values()) < 200 * 6:
        time.sleep(0.02)
    for u in units:
        check_callback_order(seen[u.uid], u.state)
        assert [s for s, _ in u.history][1:] == seen[u.uid]


def test_profile_records_every_transition(tmp_path):
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        _, pilot, umgr = local_pilot(session, cores=2)
        units = umgr.submit_units([rpg.UnitDescription(executable="/bin/true") for _ in range(10)])
        umgr.wait_units(timeout=30)
        path = session.profile_path
    events = read_profile(path)  # complete after close
    by_uid: dict[str, list[str]] = {}
    for ev in events:
        assert {"time", "uid", "state", "component"} <= set(ev)
        by_uid.setdefault(ev["uid"], []).append(ev["state"])
    for u in units:
        assert by_uid[u.uid] == list(states.UNIT_PATH), by_uid[u.uid]
    assert by_uid[pilot.uid][:4] == ["NEW", "LAUNCHING", "PENDING", "ACTIVE"]
    assert by_uid[pilot.uid][-1] == "DONE"
    text = open(path).read()
    assert "token" not in text


def test_session_and_pilot_active_quickly_and_close_cleans_up(tmp_path):
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        _, pilot, umgr = local_pilot(session, cores=1)
        assert pilot.wait(state="ACTIVE", timeout=15) == "ACTIVE"
        agent_pid = pilot.pid
        assert psutil.pid_exists(agent_pid)
        u = umgr.submit_units(rpg.UnitDescription(executable="/bin/sleep", arguments=["30"]))
        assert u.wait(state="EXECUTING", timeout=15) == "EXECUTING"
    assert pilot.state == "DONE"
    assert u.state == "CANCELED" and "closed" in u.reason
    assert not psutil.pid_exists(agent_pid) or psutil.Process(agent_pid).status() == "zombie"
    assert no_pilot_processes(pilot) == []


def test_cancel_executing_queued_and_staging(session, tmp_path):
    fifo = tmp_path / "stall.fifo"
    os.mkfifo(fifo)
    _, pilot, umgr = local_pilot(session, cores=1)
    running = umgr.submit_units(rpg.UnitDescription(executable="/bin/sleep", arguments=["60"]))
    assert running.wait(state="EXECUTING", timeout=20) == "EXECUTING"
    queued = umgr.submit_units(rpg.UnitDescription(executable="/bin/sleep", arguments=["60"]))
    assert queued.wait(state="SCHEDULING", timeout=20) == "SCHEDULING"
    staging = umgr.submit_units(rpg.UnitDescription(
        executable="/bin/true", input_staging=[{"source": str(fifo), "target": "f"}]))
    assert staging.wait(state="STAGING_IN", timeout=20) == "STAGING_IN"
    t0 = time.monotonic()
    umgr.cancel_units([running.uid, queued.uid, staging.uid])
    assert time.monotonic() - t0 < 0.5, "cancel must not block"
    try:
        assert umgr.wait_units([running.uid, queued.uid, staging.uid], timeout=20) == [
            "CANCELED"] * 3, [running.reason, queued.reason, staging.reason]
    finally:
        # The staging thread is stuck opening the FIFO; give it a writer so it can finish.
        _release_reader(fifo)
    for u in (running, queued, staging):
        assert u.reason == "canceled by the application"
    assert running.exit_code is not None and running.exit_code < 0  # killed by a signal
    assert pilot.state == "ACTIVE"
    assert no_pilot_processes(pilot) == []


def _release_reader(fifo) -> None:
    """Open and close the FIFO's write end once: a reader stuck in open() returns, and reads
    EOF. No reader (ENXIO): nothing to release. (It used to check with one such open, which
    already released the reader, and then open again: ENXIO once the reader had gone.)"""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise


def test_cancel_from_inside_a_callback(session):
    _, pilot, umgr = local_pilot(session, cores=2)
    canceled_in_cb = []

    def on_state(unit, state):
        if state == "EXECUTING":
            t0 = time.monotonic()
            unit.cancel()
            canceled_in_cb.append(time.monotonic() - t0)

    umgr.register_callback(on_state)
    umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep", arguments=["60"])
                       for _ in range(3)])
    assert umgr.wait_units(timeout=30) == ["CANCELED"] * 3
    assert len(canceled_in_cb) == 3 and max(canceled_in_cb) < 0.5


def test_wait_inside_a_callback_is_refused(session):
    _, pilot, umgr = local_pilot(session, cores=1)
    errors = []

    def on_state(unit, state):
        if state == "DONE":
            try:
                unit.wait()
            except RuntimeError as exc:
                errors.append(str(exc))

    umgr.register_callback(on_state)
    u = umgr.submit_units(rpg.UnitDescription(executable="/bin/true"))
    assert u.wait(timeout=20) == "DONE"
    deadline = time.monotonic() + 5
    while not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    assert errors and "callback" in errors[0]


def test_unit_timeout_kills_the_whole_tree(session):
    _, pilot, umgr = local_pilot(session, cores=1)
    u = umgr.submit_units(rpg.UnitDescription(
        executable="/bin/sh", arguments=["-c", "sleep 60 & sleep 60; wait"], timeout=1.0))
    assert u.wait(timeout=30) == "FAILED"
    assert "timed out after 1 s" in u.reason, u.reason
    assert u.exit_code is not None and u.exit_code < 0
    assert no_pilot_processes(pilot) == []


def test_sigterm_ignoring_unit_is_killed_after_grace(session):
    _, pilot, umgr = local_pilot(session, cores=1)
    u = umgr.submit_units(rpg.UnitDescription(
        executable="/bin/sh", arguments=["-c", "trap '' TERM; echo ready; sleep 60"]))
    assert u.wait(state="EXECUTING", timeout=20) == "EXECUTING"
    time.sleep(0.3)
    t0 = time.monotonic()
    u.cancel()
    assert u.wait(timeout=30) == "CANCELED", u.reason
    assert time.monotonic() - t0 < 15
    assert u.exit_code == -9
    assert no_pilot_processes(pilot) == []


def test_units_canceled_then_their_pilot_canceled_during_the_grace_end_canceled(session):
    """A canceled unit's process gets SIGTERM and its greenlet waits for the exit; the pilot's
    cancel then comes within the kill grace and ends the waiting units itself."""
    pmgr, pilot, umgr = local_pilot(session, cores=3, kill_grace=2.0)
    stubborn = umgr.submit_units([rpg.UnitDescription(
        executable="/bin/sh", arguments=["-c", "trap '' TERM; echo ready; sleep 60"])
        for _ in range(2)])
    polite = umgr.submit_units(rpg.UnitDescription(executable="/bin/sleep", arguments=["60"]))
    for u in (*stubborn, polite):
        assert u.wait(state="EXECUTING", timeout=20) == "EXECUTING"
    time.sleep(0.3)  # the shells have set their trap
    umgr.cancel_units()
    assert polite.wait(timeout=10) == "CANCELED" and polite.exit_code == -15  # SIGTERM: at once
    assert [u.state for u in stubborn] == ["EXECUTING"] * 2  # their grace runs
    pilot.cancel()
    assert pilot.wait(timeout=30) == "CANCELED"
    assert umgr.wait_units(timeout=30) == ["CANCELED"] * 3
    assert [u.exit_code for u in stubborn] == [-9, -9]
    assert all(u.reason == "canceled by the application" for u in (*stubborn, polite))
    assert no_pilot_processes(pilot) == []


def test_pilot_cancel_with_units_running(session):
    pmgr, pilot, umgr = local_pilot(session, cores=2)
    units = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep", arguments=["60"])
                               for _ in range(4)])
    assert units[0].wait(state="EXECUTING", timeout=20) == "EXECUTING"
    pilot.cancel()
    assert pilot.wait(timeout=30) == "CANCELED"
    assert umgr.wait_units(timeout=30) == ["CANCELED"] * 4
    assert no_pilot_processes(pilot) == []
    # Units submitted after the only pilot ended fail with a reason, not hang.
    late = umgr.submit_units(rpg.UnitDescription(executable="/bin/true"))
    assert late.wait(timeout=10) == "FAILED" and "pilot" in late.reason


def test_bad_units_fail_alone_and_the_pilot_goes_on(session):
    _, pilot, umgr = local_pilot(session, cores=2)
    bad = umgr.submit_units([
        rpg.UnitDescription(executable="/no/such/program"),
        rpg.UnitDescription(executable="/bin/true",
                            input_staging=[{"source": "/no/such/input", "target": "x"}]),
        rpg.UnitDescription(executable="/bin/true", cores=64),
        rpg.UnitDescription(executable="/bin/true", output_staging=[
            {"source": "missing.txt", "target": "/tmp/rpg-never-written"}]),
    ])
    good = umgr.submit_units([rpg.UnitDescription(executable="/bin/true") for _ in range(5)])
    assert umgr.wait_units([u.uid for u in bad], timeout=30) == ["FAILED"] * 4
    assert "/no/such/program" in bad[0].reason
    assert "/no/such/input" in bad[1].reason
    assert "64 cores" in bad[2].reason
    assert "missing.txt" in bad[3].reason
    assert umgr.wait_units([u.uid for u in good], timeout=30) == ["DONE"] * 5
    assert pilot.state == "ACTIVE"


def test_symlink_out_of_the_sandbox_is_refused(session, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    _, pilot, umgr = local_pilot(session, cores=1)
    # The unit makes a symlink pointing out; staging "through" it must be refused.
    u = umgr.submit_units(rpg.UnitDescription(
        executable="/bin/ln", arguments=["-s", str(outside / "secret"), "escape"],
        output_staging=[{"source": "escape", "target": str(tmp_path / "got")}]))
    assert u.wait(timeout=20) == "FAILED"
    assert "escapes its sandbox" in u.reason


def test_wait_units_with_state_and_timeout(session):
    _, pilot, umgr = local_pilot(session, cores=1)
    u = umgr.submit_units(rpg.UnitDescription(executable="/bin/sleep", arguments=["30"]))
    assert umgr.wait_units(u.uid, state="EXECUTING", timeout=20) == ["EXECUTING"]
    t0 = time.monotonic()
    assert umgr.wait_units(u.uid, timeout=0.3) == ["EXECUTING"]
    assert 0.25 < time.monotonic() - t0 < 3
    with pytest.raises(KeyError, match="unknown uid"):
        umgr.wait_units(["unit.999999"])
    u.cancel()
    assert u.wait(timeout=20) == "CANCELED"


def test_units_spread_over_two_pilots_and_tags_pin_them(session):
    pmgr = rpg.PilotManager(session)
    p1, p2 = pmgr.submit_pilots([rpg.PilotDescription(cores=2, runtime=5),
                                 rpg.PilotDescription(cores=2, runtime=5, tags={"site": "b"})])
    umgr = rpg.UnitManager(session)
    umgr.add_pilots([p1, p2])
    # More than one pilot has room for (2 cores + 32 ready): a pull takes no more than that
    free = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep", arguments=["0.05"])
                              for _ in range(80)])
    pinned = umgr.submit_units([rpg.UnitDescription(executable="/bin/true", tags={"site": "b"})
                                for _ in range(5)])
    umgr.wait_units(timeout=40)
    assert {u.state for u in free + pinned} == {"DONE"}
    assert {u.pilot for u in free} == {p1.uid, p2.uid}
    assert {u.pilot for u in pinned} == {p2.uid}


def test_bad_descriptions_are_rejected_with_the_field_named(session):
    _, pilot, umgr = local_pilot(session, cores=1)
    cases = [
        (dict(executable=""), "executable"),
        (dict(executable="/bin/true", cores=0), "cores"),
        (dict(executable="/bin/true", colour="red"), "colour"),
        (dict(executable="/bin/true", arguments="not a list"), "arguments"),
        (dict(executable="/bin/true", environment={"BAD NAME": "x"}), "environment"),
        (dict(executable="/bin/true", timeout=0), "timeout"),
        (dict(executable="/bin/true", input_staging=[{"source": "/a", "target": "../../etc/x"}]),
         "target"),
        (dict(executable="/bin/true", input_staging=[{"source": "/a", "target": "/etc/x"}]),
         "target"),
        (dict(executable="/bin/true", output_staging=[{"source": "../x", "target": "/tmp/x"}]),
         "source"),
        (dict(executable="/bin/true", input_staging=[{"source": "/a", "action": "teleport"}]),
         "action"),
        (dict(executable="/bin/true", input_staging=[{"source": "ftp://x/y"}]), "source"),
        (dict(executable="/bin/true", stdout="a/b"), "stdout"),
    ]
    for kw, field in cases:
        with pytest.raises(rpg.DescriptionError) as ei:
            rpg.UnitDescription(**kw)
        assert ei.value.field.endswith(field), (kw, str(ei.value))
        assert field in str(ei.value)
    with pytest.raises(rpg.DescriptionError, match="resource"):
        rpg.PilotDescription(resource="moon://base")
    with pytest.raises(rpg.DescriptionError, match="heartbeat_timeout"):
        rpg.PilotDescription(heartbeat_interval=5, heartbeat_timeout=1)
    # One bad description in a list: nothing of that call is submitted, earlier work is kept.
    ok = umgr.submit_units(rpg.UnitDescription(executable="/bin/true"))
    good = rpg.UnitDescription(executable="/bin/true")
    bad = rpg.UnitDescription(executable="/bin/true")
    bad.cores = -1  # set after construction: checked again at submit
    with pytest.raises(rpg.DescriptionError, match=r"#1.*cores"):
        umgr.submit_units([good, bad])
    assert len(umgr.get_units()) == 1
    assert ok.wait(timeout=20) == "DONE"
    with pytest.raises(TypeError):
        umgr.submit_units(["/bin/true"])


def test_closed_session_refuses_work(tmp_path):
    s = rpg.Session(sandbox=str(tmp_path / "s"))
    umgr = rpg.UnitManager(s)
    s.close()
    s.close()  # idempotent
    with pytest.raises(rpg.SessionClosed):
        umgr.submit_units(rpg.UnitDescription(executable="/bin/true"))
    umgr.cancel_units()  # never raises, never blocks


def test_cancel_right_after_submit(session):
    """A lifecycle canceled before its greenlet ever ran still ends, with its reason."""
    pmgr = rpg.PilotManager(session)
    early = pmgr.submit_pilots(rpg.PilotDescription(cores=1, runtime=5))
    early.cancel()
    pilot = pmgr.submit_pilots(rpg.PilotDescription(cores=1, runtime=5))
    umgr = rpg.UnitManager(session)
    umgr.add_pilots(pilot)
    u = umgr.submit_units(rpg.UnitDescription(executable="/bin/true"))
    u.cancel()
    assert early.wait(timeout=10) == "CANCELED"
    assert u.wait(timeout=10) == "CANCELED"
    assert u.reason == "canceled by the application"
    assert [s for s, _ in u.history] == ["NEW", "CANCELED"]


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.1, 0.3])
def test_close_while_the_pilot_is_launching_leaves_no_agent(tmp_path, delay):
    """Close at any moment of a pilot's launch: its agent (maybe mid-spawn) is stopped and
    reaped (the leak check after this test sees every child process)."""
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(rpg.PilotDescription(cores=1, runtime=5))
        time.sleep(delay)
    assert pilot.state in ("DONE", "CANCELED", "FAILED"), pilot.state
