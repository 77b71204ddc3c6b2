"""The agent at the edges of its resources: few open files, huge core counts, unreadable or
unstageable output, strings that cannot cross the wire, and a hub process that vanishes.

Everything runs real agents and real unit processes; limits are set with setrlimit in a child
Python process that then runs an ordinary application script (the agent inherits the limit).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import psutil
import pytest
from pilots import local_pilot as shared_local_pilot
from pilots import unrun_agent
from procs import wait_no_pilot_processes

import rpg
from rpg.agent.scheduler import Scheduler, format_ids
from rpg.hub.binding import capacity
from rpg.hub.records import Pace
from rpg.io_pool.sweep import pilot_key
from rpg.rpc import wire_safe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def local_pilot(session, cores=4, **kw):
    _, pilot, umgr = shared_local_pilot(session, cores, **kw)
    return pilot, umgr


def run_app(tmp_path, body: str, preamble: str = "") -> subprocess.Popen:
    """Start ``body`` (an application script) in a fresh Python; its last stdout line is JSON,
    its stderr goes to app.err."""
    script = tmp_path / "app.py"
    script.write_text("import json, os, resource, sys, time\n" + textwrap.dedent(preamble)
                      + "import rpg\n" + textwrap.dedent(body))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(tmp_path / "app.err", "wb") as err:
        return subprocess.Popen([sys.executable, str(script)], cwd=str(tmp_path), env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)


def app_result(tmp_path, proc: subprocess.Popen, timeout: float) -> dict:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"application did not finish in {timeout} s: "
                    f"{(tmp_path / 'app.err').read_text()[-3000:]}")
    assert proc.returncode == 0, (tmp_path / "app.err").read_text()[-3000:]
    return json.loads(out.strip().splitlines()[-1])


MANY_SLEEPS = """
t0 = time.monotonic()
with rpg.Session(sandbox=os.path.abspath("session")) as s:
    pm = rpg.PilotManager(s)
    p = pm.submit_pilots(rpg.PilotDescription(resource="local", cores=__N__, runtime=5))
    um = rpg.UnitManager(s)
    um.add_pilots(p)
    units = um.submit_units([rpg.UnitDescription(executable="/bin/sleep", arguments=["__SLEEP__"])
                             for _ in range(__N__)])
    um.wait_units(timeout=__TIMEOUT__)
    states = {}
    for u in units:
        states[u.state] = states.get(u.state, 0) + 1
    bad = [u.reason for u in units if u.state != "DONE"][:5]
print(json.dumps({"states": states, "bad": bad, "seconds": time.monotonic() - t0,
                  "limit": resource.getrlimit(resource.RLIMIT_NOFILE)}))
"""


def agent_stats(tmp_path) -> dict:
    """The agent.stats.json the (one) agent left in its pilot sandbox."""
    found = [os.path.join(root, "agent.stats.json")
             for root, _, files in os.walk(tmp_path / "session") if "agent.stats.json" in files]
    assert len(found) == 1, found
    with open(found[0]) as fh:
        return json.load(fh)


def test_400_units_at_once_under_a_256_fd_hard_limit(tmp_path):
    """The agent cannot raise a 256/256 limit, and needs not: a running unit holds none of its
    fds (the spawner process reports exits), so 400 run at once and none waits or fails."""
    body = MANY_SLEEPS.replace("__N__", "400").replace("__SLEEP__", "0.5").replace(
        "__TIMEOUT__", "60")
    proc = run_app(tmp_path, body, preamble="""
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    """)
    res = app_result(tmp_path, proc, 90)
    assert res["limit"] == [256, 256]
    assert res["states"] == {"DONE": 400}, res
    stats = agent_stats(tmp_path)
    fd = stats["fd_limit"]
    assert fd["soft"] == fd["hard"] == 256, fd
    assert stats["counters"]["fd_waits"] == 0  # no spawn met "too many open files"
    assert stats["counters"].get("spawner_restarts", 0) == 0
    print("400 units:", res, fd, stats["counters"])


def test_1500_units_at_once_with_a_1024_soft_limit(tmp_path):
    """A 1,024 soft limit under a higher hard one: the agent raises it and runs them all. The
    sleeps outlast the spawning, so all 1,500 run at once."""
    body = MANY_SLEEPS.replace("__N__", "1500").replace("__SLEEP__", "4").replace(
        "__TIMEOUT__", "90")
    proc = run_app(tmp_path, body, preamble="""
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 8192))
    """)
    res = app_result(tmp_path, proc, 120)
    assert res["states"] == {"DONE": 1500}, res
    stats = agent_stats(tmp_path)
    assert stats["fd_limit"]["soft_before"] == 1024 and stats["fd_limit"]["soft"] == 8192, stats
    print("1500 units:", res, stats["fd_limit"], stats["counters"])


def test_unreadable_stdout_fails_the_unit_with_the_reason(session):
    """Output that exists but cannot be read is the unit's reason, never a silent ''."""
    _, umgr = local_pilot(session)
    as_dir, as_fifo, missing, fine = umgr.submit_units([
        # The unit replaces its own stdout file with a directory...
        rpg.UnitDescription(executable="/bin/sh",
                            arguments=["-c", "echo hi; rm STDOUT; mkdir STDOUT"]),
        # ...or with a FIFO nobody writes (reading it must not hang the agent)...
        rpg.UnitDescription(executable="/bin/sh",
                            arguments=["-c", "echo hi; rm STDOUT; mkfifo STDOUT; echo e >&2"]),
        # ...while a missing file still reads as empty, and a normal one as its content.
        rpg.UnitDescription(executable="/bin/sh", arguments=["-c", "echo hi; rm STDOUT"]),
        rpg.UnitDescription(executable="/bin/echo", arguments=["hi"]),
    ])
    umgr.wait_units(timeout=20)
    assert as_dir.state == "FAILED", (as_dir.state, as_dir.reason)
    assert as_dir.reason.startswith("cannot read stdout: ") and "Is a directory" in \
        as_dir.reason, as_dir.reason
    assert as_dir.exit_code == 0
    assert as_fifo.state == "FAILED", (as_fifo.state, as_fifo.reason)
    assert "cannot read stdout: " in as_fifo.reason and "not a regular file" in \
        as_fifo.reason, as_fifo.reason
    assert as_fifo.stderr == "e\n"  # the readable stream is kept
    assert (missing.state, missing.stdout) == ("DONE", "")
    assert (fine.state, fine.stdout) == ("DONE", "hi\n")


def test_failed_output_staging_keeps_exit_code_and_output(session, tmp_path):
    _, umgr = local_pilot(session)
    (unit,) = umgr.submit_units([rpg.UnitDescription(
        executable="/bin/sh", arguments=["-c", "echo out; echo err >&2"],
        output_staging=[{"source": "never-made.txt", "target": str(tmp_path / "x.txt")}])])
    umgr.wait_units(timeout=20)
    assert unit.state == "FAILED"
    assert "never-made.txt" in unit.reason, unit.reason
    assert (unit.exit_code, unit.stdout, unit.stderr) == (0, "out\n", "err\n")


# -- RPG_CORES -------------------------------------------------------------------------------------

def _ranges(ids):
    out = []
    for i in sorted(set(int(i) for i in ids)):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def test_core_ids_format_as_ranges():
    assert format_ids([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert format_ids([11, 10, 3, 2, 1, 0, 8]) == "0-3,8,10-11"  # the order a stack gives
    assert format_ids([5]) == "5"
    assert format_ids([]) == ""
    assert format_ids(np.array([4, 6, 8])) == "4,6,8"
    assert format_ids(np.arange(1_000_000)) == "0-999999"
    assert format_ids([3, 3, 4, 9, 9]) == "3-4,9"  # repeats dropped, on both paths:
    assert format_ids([3, 3, 4] + [9] * 100) == "3-4,9"  # small (plain Python) and numpy
    rng = np.random.default_rng(7)
    for n in (1, 2, 30, 64, 65, 200):  # each side of the small/numpy switch
        ids = rng.integers(0, 2 * n, n)
        expect = ",".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in _ranges(ids))
        assert format_ids(ids) == format_ids(list(ids)) == expect, ids
    # A million-core unit on a million-core node: allocating and formatting stay fast.
    sched = Scheduler([("n", 1_000_000, 0)])
    t0 = time.perf_counter()
    slots = sched.allocate(1_000_000)
    assert format_ids(slots.cores) == "0-999999"
    sched.free(slots)
    assert time.perf_counter() - t0 < 1.0


def test_a_200000_core_unit_gets_its_cores_as_one_range(session):
    _, umgr = local_pilot(session, cores=200_000)
    (unit,) = umgr.submit_units([rpg.UnitDescription(
        executable="/bin/sh", arguments=["-c", 'echo "$RPG_CORES"'], cores=200_000)])
    umgr.wait_units(timeout=30)
    assert unit.state == "DONE", (unit.state, unit.reason)
    assert unit.stdout == "0-199999\n"


# -- strings that cannot be encoded ----------------------------------------------------------------

def test_wire_safe_repairs_lone_surrogates_only():
    bad = os.fsdecode(b"caf\xe9.dat")
    fixed = wire_safe({"reason": f"cannot open {bad}", "exit_code": 1, "ok": "café ✓"})
    assert fixed == {"reason": "cannot open caf\\udce9.dat", "exit_code": 1, "ok": "café ✓"}
    fixed["reason"].encode("utf-8")
    same = "plain"
    assert wire_safe(same) is same


def test_a_latin1_sandbox_path_does_not_fail_the_pilot(tmp_path):
    """The agent reports its sandbox (and units' sandboxes) as strings: a Latin-1 directory
    name, a lone surrogate once decoded, used to make register fail and the pilot FAIL."""
    root = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")
    with rpg.Session(sandbox=root) as s:
        pilot, umgr = local_pilot(s, cores=2)
        (unit,) = umgr.submit_units([rpg.UnitDescription(executable="/bin/echo",
                                                         arguments=["hi"])])
        umgr.wait_units(timeout=20)
        assert (unit.state, unit.stdout) == ("DONE", "hi\n"), (unit.state, unit.reason)
        assert pilot.state == "ACTIVE", pilot.reason


# -- the hub's process goes ------------------------------------------------------------------------

HUB_PID_APP = """
s = rpg.Session(sandbox=os.path.abspath("session"))
pm = rpg.PilotManager(s)
p = pm.submit_pilots(rpg.PilotDescription(resource="local", cores=4, runtime=5,
                                          heartbeat_interval=5, heartbeat_timeout=30))
um = rpg.UnitManager(s)
um.add_pilots(p)
units = um.submit_units([rpg.UnitDescription(executable="/bin/sleep", arguments=["60"])
                         for _ in range(3)])
um.wait_units(state="EXECUTING", timeout=30)
print(json.dumps({"session": s.uid, "pilot": p.uid}), flush=True)
time.sleep(120)
"""


def running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_agent_stops_at_once_when_the_hub_process_is_killed(tmp_path):
    """An application holding an embedded hub is SIGKILLed: its local agent (given hub_pid)
    kills its units and exits at once, not after heartbeat_timeout (30 s here)."""
    proc = run_app(tmp_path, HUB_PID_APP)
    try:
        ids = json.loads(proc.stdout.readline())
        key = pilot_key(ids["session"], ids["pilot"])
        app = psutil.Process(proc.pid)
        agents = [c for c in app.children() if "rpg.agent" in " ".join(c.cmdline())]
        assert len(agents) == 1
        units = wait_no_pilot_processes(key, timeout=0)
        assert len(units) == 3
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        t0 = time.monotonic()
        alive = agents
        while alive and time.monotonic() - t0 < 5:
            time.sleep(0.02)
            alive = [a for a in alive if running(a)]  # an orphan's zombie waits for init
        agent_s = time.monotonic() - t0
        left = wait_no_pilot_processes(key, timeout=5)
        units_s = time.monotonic() - t0
        assert not alive and not left, (alive, left)
        assert agent_s < 3 and units_s < 3, (agent_s, units_s)
        print(f"agent gone {agent_s:.2f} s, units gone {units_s:.2f} s after the hub's process")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        for p in psutil.process_iter():  # nothing of this test may outlive it
            try:
                if "rpg.agent" in " ".join(p.cmdline()) and str(tmp_path) in " ".join(
                        p.cmdline()):
                    p.kill()
            except psutil.Error:
                pass


def test_agent_with_a_hub_pid_already_gone_stops_at_once(tmp_path):
    """Given a hub_pid that no longer exists, the agent does not wait out heartbeat_timeout
    trying to call in."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    sandbox = tmp_path / "pilot"
    sandbox.mkdir()
    cfg = {"pilot_uid": "pilot.000000", "session_uid": "s", "token": "t" * 43,
           "hub_address": "tcp://127.0.0.1:9", "sandbox": str(sandbox), "cores": 1, "gpus": 0,
           "heartbeat_interval": 1.0, "heartbeat_timeout": 30.0, "hub_pid": dead.pid,
           "runtime_s": 0, "staging_timeout": 10.0, "kill_grace": 1.0}
    (sandbox / "agent.json").write_text(json.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.monotonic()
    agent = subprocess.run([sys.executable, "-m", "rpg.agent", "--config",
                            str(sandbox / "agent.json")], env=env, capture_output=True,
                           text=True, timeout=20)
    assert time.monotonic() - t0 < 5
    assert agent.returncode == 3, agent.stderr[-2000:]  # EXIT_HUB_LOST
    assert "hub_process_gone" in agent.stderr + agent.stdout


def test_an_update_that_cannot_be_encoded_is_repaired_alone(tmp_path):
    """Every update the agent reports is checked: one msgpack refuses (a lone surrogate, a
    value of a type it cannot pack) is repaired or stripped to its state, alone."""

    agent = unrun_agent(str(tmp_path))
    bad = os.fsdecode(b"caf\xe9")
    good = ["unit.1", "DONE", 1.0, {"exit_code": 0, "stdout": "ok ✓"}]
    assert agent._encodable(good) is good
    assert agent._encodable(["unit.2", "FAILED", 2.0, {"reason": bad}]) == \
        ["unit.2", "FAILED", 2.0, {"reason": "caf\\udce9"}]
    assert agent._encodable(["unit.3", "DONE", 3.0, {"stdout": {1, 2}}]) == \
        ["unit.3", "DONE", 3.0, {}]
    agent.report("unit.4", "FAILED", reason=f"cannot open {bad}", exit_code=None)
    assert agent.updates[-1][3] == {"reason": "cannot open caf\\udce9", "exit_code": None}


def test_a_stdout_replaced_by_a_symlink_is_not_followed(tmp_path):
    """A unit that makes STDOUT a link to a file elsewhere got that file as its stdout."""
    secret = tmp_path / "elsewhere.txt"
    secret.write_text("not the unit's output\n")
    with rpg.Session(sandbox=str(tmp_path / "s")) as s:
        pilot, umgr = local_pilot(s, cores=1)
        (unit,) = umgr.submit_units([rpg.UnitDescription(
            executable="/bin/sh", arguments=["-c", f"rm -f STDOUT; ln -s {secret} STDOUT"])])
        umgr.wait_units(timeout=30)
    assert unit.state == "FAILED", (unit.state, unit.stdout)
    assert "symbolic link" in unit.reason and "STDOUT" in unit.reason
    assert "not the unit's output" not in (unit.stdout or "")


# -- the unit sandbox, made before the spawn -------------------------------------------------------

def test_units_find_their_sandbox_and_output_files_and_a_blocked_sandbox_fails_one_unit(
        session, tmp_path):
    """The agent makes each unit's sandbox and empty STDOUT/STDERR in a disk lane before the
    spawn. A unit whose sandbox path is taken by a file FAILS saying so; the others run."""
    pilot, umgr = local_pilot(session, cores=1)
    go = tmp_path / "go"
    # Fill the pilot's room (its core and prefetch), so that the next unit waits in the hub.
    room = capacity(types.SimpleNamespace(cores=1, pace=Pace()))
    blockers = umgr.submit_units([rpg.UnitDescription(
        executable="/bin/sh", arguments=["-c", f"while [ ! -e {go} ]; do sleep 0.05; done"])
        for _ in range(room)])
    assert blockers[0].wait(state="EXECUTING", timeout=30) == "EXECUTING"
    victim, ok = umgr.submit_units([
        rpg.UnitDescription(executable="/bin/true"),
        rpg.UnitDescription(executable="/bin/sh", arguments=["-c", "ls; echo err >&2"])])
    assert victim.state == "NEW" and ok.state == "NEW"
    taken = os.path.join(pilot.sandbox, victim.uid)
    with open(taken, "w") as fh:
        fh.write("not a directory")
    go.touch()
    umgr.wait_units(timeout=60)
    assert victim.state == "FAILED" and "File exists" in victim.reason, victim.reason
    assert ok.state == "DONE", ok.reason
    assert ok.stdout.split() == ["STDERR", "STDOUT"] and ok.stderr == "err\n"
    assert all(u.state == "DONE" for u in blockers)
    with open(taken) as fh:
        assert fh.read() == "not a directory"  # left as it was


@pytest.mark.parametrize("value, problem", [(20, "in 0..19"), (-1, "in 0..19"),
                                            ("19", "an integer"), (True, "an integer"),
                                            (None, "an integer")])
def test_agent_json_with_a_bad_unit_nice_is_refused_naming_it(value, problem):
    from rpg.launch_config import AgentConfig, AgentConfigError

    cfg = {"pilot_uid": "pilot.000000", "session_uid": "s", "hub_address": "tcp://127.0.0.1:9",
           "sandbox": "/tmp/x", "cores": 1, "gpus": 0, "heartbeat_interval": 1.0,
           "heartbeat_timeout": 30.0, "runtime_s": 0, "staging_timeout": 10.0,
           "kill_grace": 1.0}
    assert AgentConfig.from_json(cfg).unit_nice == 0  # not given: left as it is
    assert AgentConfig.from_json({**cfg, "unit_nice": 19}).unit_nice == 19
    with pytest.raises(AgentConfigError, match=f"unit_nice must be {problem}"):
        AgentConfig.from_json({**cfg, "unit_nice": value})


def test_a_unit_killed_before_its_greenlet_first_ran_is_still_reported(tmp_path):
    """A unit and its cancel can come in one pull reply (the hub resends a lost reply). A unit
    with staging runs as a greenlet; killed before its first step, the greenlet never runs its
    body, which is what reports a unit. It is reported CANCELED all the same, and let go."""
    import gevent


    agent = unrun_agent(str(tmp_path))
    desc = {"executable": "/bin/true", "arguments": [], "cores": 1, "gpus": 0,
            "stdout": "STDOUT", "stderr": "STDERR", "timeout": None,
            "input_staging": [{"source": str(tmp_path / "in"), "target": "in"}],
            "output_staging": []}
    agent._start_unit("unit.000001", desc)
    assert "unit.000001" in agent.units
    agent.cancel_unit("unit.000001", "CANCELED", "canceled by the application", [])
    gevent.sleep(0)
    gevent.sleep(0)
    assert agent.units == {} and agent.cancel_reasons == {}
    assert [(u[0], u[1], u[3]) for u in agent.updates] == [
        ("unit.000001", "CANCELED", {"reason": "canceled by the application", "exit_code": None})]


def test_an_unforeseen_error_in_a_units_greenlet_fails_the_unit_saying_so(tmp_path):
    """Whatever a unit's step raises, the unit ends FAILED with the error's words: it is never
    left unreported. Here an agent that was never run has no lanes, so the first step that
    needs one raises AttributeError, an error no step expects."""
    import gevent


    agent = unrun_agent(str(tmp_path))
    desc = {"executable": "/bin/true", "arguments": [], "cores": 1, "gpus": 0,
            "stdout": "STDOUT", "stderr": "STDERR", "timeout": None,  # staging: a greenlet
            "input_staging": [{"source": str(tmp_path / "in"), "target": "in"}],
            "output_staging": []}
    agent._start_unit("unit.000001", desc)
    gevent.joinall([agent.units["unit.000001"]], timeout=5)
    assert agent.units == {}
    states_seen = [(u[1], u[3].get("reason")) for u in agent.updates]
    assert states_seen[0] == ("STAGING_IN", None)
    assert states_seen[-1][0] == "FAILED" and "has no attribute" in states_seen[-1][1]


@pytest.mark.parametrize("why, code", [("runtime", "pilot_walltime"), ("signal", "not_started")])
def test_a_unit_that_comes_after_the_stop_began_is_reported_not_started(tmp_path, why, code):
    """A pull under way when the agent's stop began can still bring units (its reply comes
    during the stop). Such a unit is not started, on either path (a plain unit; one with
    staging, a greenlet): it is reported at once with the stop's state and reason, and a code
    that lets the hub give it to another pilot. (Before, it started, and only the agent's last
    kill, after the final push, ended it: its report never reached the hub.)"""
    agent = unrun_agent(str(tmp_path))
    agent.stop(why, "FAILED", "the stop's reason")
    plain = {"executable": "/bin/true", "arguments": [], "cores": 1, "gpus": 0,
             "stdout": "STDOUT", "stderr": "STDERR", "timeout": None, "input_staging": [],
             "output_staging": []}
    staged = {**plain, "input_staging": [{"source": str(tmp_path / "in"), "target": "in"}]}
    agent._start_unit("unit.000001", plain)
    agent._start_unit("unit.000002", staged)
    assert agent.units == {} and agent.cancel_reasons == {}
    assert [(u[0], u[1], u[3]) for u in agent.updates] == [
        (uid, "FAILED", {"reason": "the stop's reason", "reason_code": code,
                         **({"exit_code": None} if why == "runtime" else {})})
        for uid in ("unit.000001", "unit.000002")]
    assert not (tmp_path / "unit.000001").exists()  # nothing was done for it
