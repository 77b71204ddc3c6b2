"""SLURM pilots against a real slurmctld + slurmd (one node, 127.0.0.1; see .ci/slurm.sh).

The tests that need the cluster skip, saying why, when SLURM_CONF is unset or sinfo fails; the
pure ones (nodelists, SLURM's environment, srun layout, job records) always run.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import time
import uuid

import gevent
import pytest

import rpg
from rpg.agent.resources import (
    ResourceError,
    SrunPlacer,
    expand_counts,
    expand_nodelist,
    nodes_from_environment,
    srun_layout,
)
from rpg.agent.scheduler import Scheduler
from rpg.hub.launchers.slurm import (
    describe_end,
    parse_squeue,
    walltime_minutes,
)
from rpg.hub.lifecycle import PilotLifecycle
from rpg.io_pool.sweep import pilot_key, pilot_processes

PARTITION = os.environ.get("RPG_SLURM_PARTITION", "debug")


def _slurm_missing() -> str | None:
    if not os.environ.get("SLURM_CONF"):
        return ("SLURM_CONF is not set: start the test cluster with `bash .ci/slurm.sh start` "
                "and `eval \"$(bash .ci/slurm.sh env)\"`")
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%a %D"], capture_output=True, text=True,
                           timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    if r.returncode != 0 or not r.stdout.strip():
        return f"sinfo failed (exit {r.returncode}): {r.stderr.strip() or 'no partition'}"
    return None


SLURM_MISSING = _slurm_missing()
needs_slurm = pytest.mark.skipif(SLURM_MISSING is not None, reason=str(SLURM_MISSING))


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout


def node_cpus() -> int:
    return int(_run(["sinfo", "-h", "-N", "-o", "%c"]).split()[0])


def jobs_named(name: str) -> dict[str, str]:
    """{job id: state} of every job SLURM still knows by this name (finished ones too)."""
    out = _run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i %T"])
    return dict(line.split() for line in out.splitlines() if line.strip())


def queued_jobs_named(name: str) -> list[str]:
    """Job ids by this name that still pend or run (plain squeue)."""
    return _run(["squeue", "-h", "-n", name, "-o", "%i"]).split()


def wait_for(cond, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def unit_processes(session, pilot) -> list[int]:
    """Live processes of this pilot's units (by the session-scoped key they carry)."""
    return pilot_processes(pilot_key(session.uid, pilot.uid))


def unique_name(tag: str) -> str:
    return f"rpg-test-{tag}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def session(tmp_path):
    with rpg.Session(sandbox=str(tmp_path / "session")) as s:
        yield s


def slurm_pilot(session, **kw):
    kw.setdefault("cores", 2)
    kw.setdefault("queue", PARTITION)
    kw.setdefault("runtime", 5)
    pmgr = rpg.PilotManager(session)
    pilot = pmgr.submit_pilots(rpg.PilotDescription(resource="slurm", **kw))
    umgr = rpg.UnitManager(session)
    umgr.add_pilots(pilot)
    return pmgr, pilot, umgr


@pytest.fixture
def occupied_node():
    """A job holding every CPU of the node, so the next job pends; canceled afterwards."""
    name = unique_name("blocker")
    job = _run(["sbatch", "--parsable", f"--partition={PARTITION}", f"--ntasks={node_cpus()}",
                f"--job-name={name}", "--time=5", "--output=/dev/null",
                "--wrap", "sleep 300"]).strip().split(";")[0]
    try:
        wait_for(lambda: jobs_named(name).get(job) == "RUNNING", 30, "blocker job running")
        yield job
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30, check=False)
        wait_for(lambda: not queued_jobs_named(name), 30, "blocker job gone")


# -- against the cluster -----------------------------------------------------------------------

@needs_slurm
@pytest.mark.timeout(150)
def test_100_units_and_the_job_leaves_the_queue_on_close(tmp_path):
    name = unique_name("hundred")
    with rpg.Session(sandbox=str(tmp_path / "session")) as session:
        _, pilot, umgr = slurm_pilot(session, job_name=name)
        units = umgr.submit_units([
            rpg.UnitDescription(executable="/bin/sh", arguments=["-c", f"echo unit {i}"])
            for i in range(100)])
        assert umgr.wait_units(timeout=100) == ["DONE"] * 100
        assert [u.stdout for u in units] == [f"unit {i}\n" for i in range(100)]
        assert pilot.state == "ACTIVE"
        jobs = jobs_named(name)
        assert list(jobs.values()) == ["RUNNING"], jobs
    assert pilot.state == "DONE", pilot.reason
    assert queued_jobs_named(name) == []
    # The agent heard "shutdown" and left on its own: the job completed, nobody canceled it.
    assert set(jobs_named(name).values()) <= {"COMPLETED"}


@needs_slurm
@pytest.mark.timeout(90)
def test_cancel_while_pending(session, occupied_node):
    name = unique_name("pending")
    _, pilot, umgr = slurm_pilot(session, job_name=name)
    units = umgr.submit_units([rpg.UnitDescription(executable="/bin/true") for _ in range(5)])
    assert pilot.wait(state="PENDING", timeout=30) == "PENDING"
    job = wait_for(lambda: [j for j, st in jobs_named(name).items() if st == "PENDING"], 30,
                   "pilot job pending")[0]
    time.sleep(2)  # a few follower rounds: still pending, the pilot still waits
    assert pilot.state == "PENDING"
    t0 = time.monotonic()
    pilot.cancel()
    assert pilot.wait(timeout=30) == "CANCELED"
    assert time.monotonic() - t0 < 15  # a pending job is canceled at once, without a grace
    assert umgr.wait_units(timeout=20) == ["CANCELED"] * 5
    assert all(u.reason for u in units)
    assert jobs_named(name).get(job) in (None, "CANCELLED")
    assert queued_jobs_named(name) == []


@needs_slurm
@pytest.mark.timeout(120)
def test_pending_longer_than_the_bootstrap_timeout_then_runs(session, occupied_node,
                                                             monkeypatch):
    # The bootstrap timeout only counts once the job runs: queued() holds it off.
    monkeypatch.setattr(PilotLifecycle, "BOOTSTRAP_TIMEOUT", 3.0)
    name = unique_name("longpend")
    _, pilot, umgr = slurm_pilot(session, job_name=name)
    u = umgr.submit_units(rpg.UnitDescription(executable="/bin/echo", arguments=["late"]))
    assert pilot.wait(state="PENDING", timeout=30) == "PENDING"
    time.sleep(6)
    assert pilot.state == "PENDING"
    assert "PENDING" in jobs_named(name).values()
    subprocess.run(["scancel", occupied_node], capture_output=True, timeout=30, check=True)
    assert pilot.wait(state="ACTIVE", timeout=60) == "ACTIVE", pilot.reason
    assert u.wait(timeout=30) == "DONE" and u.stdout == "late\n"


@needs_slurm
@pytest.mark.timeout(120)
def test_cancel_while_active(session):
    name = unique_name("active")
    _, pilot, umgr = slurm_pilot(session, job_name=name)
    units = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep", arguments=["300"])
                               for _ in range(4)])
    assert pilot.wait(state="ACTIVE", timeout=60) == "ACTIVE", pilot.reason
    wait_for(lambda: sum(u.state == "EXECUTING" for u in units) == 2, 30, "two units executing")
    wait_for(lambda: len(unit_processes(session, pilot)) >= 2, 10, "unit processes seen")
    t0 = time.monotonic()
    pilot.cancel()
    assert pilot.wait(timeout=40) == "CANCELED"
    assert time.monotonic() - t0 < 20
    assert umgr.wait_units(timeout=20) == ["CANCELED"] * 4
    assert queued_jobs_named(name) == []
    assert unit_processes(session, pilot) == []


@needs_slurm
@pytest.mark.timeout(120)
def test_cancel_while_active_with_a_stuck_agent_scancels(session):
    """An agent that does not leave when told to: after the grace, scancel ends the job, and
    the unit processes (in sessions of their own, outliving the job) are killed."""
    name = unique_name("stuck")
    _, pilot, umgr = slurm_pilot(session, job_name=name)
    units = umgr.submit_units([rpg.UnitDescription(
        executable="/bin/sh", arguments=["-c", "trap '' TERM; sleep 300 & wait"])
        for _ in range(2)])
    assert pilot.wait(state="ACTIVE", timeout=60) == "ACTIVE", pilot.reason
    wait_for(lambda: all(u.state == "EXECUTING" for u in units), 30, "units executing")
    wait_for(lambda: len(unit_processes(session, pilot)) >= 4, 10, "unit processes seen")
    os.kill(pilot.pid, signal.SIGSTOP)  # the agent hears nothing now (SLURM sends SIGCONT)
    t0 = time.monotonic()
    pilot.cancel()
    assert pilot.wait(timeout=60) == "CANCELED"
    took = time.monotonic() - t0
    assert 4 < took < 40, took  # the grace first, then scancel
    assert umgr.wait_units(timeout=20) == ["CANCELED"] * 2, [u.reason for u in units]
    assert set(jobs_named(name).values()) <= {"CANCELLED"}
    assert queued_jobs_named(name) == []
    assert unit_processes(session, pilot) == []


@needs_slurm
@pytest.mark.timeout(120)
def test_runtime_ends_the_pilot_and_no_unit_is_lost(session):
    name = unique_name("runtime")
    _, pilot, umgr = slurm_pilot(session, job_name=name, runtime=0.1)
    units = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep", arguments=["60"])
                               for _ in range(6)])
    assert pilot.wait(state="ACTIVE", timeout=60) == "ACTIVE", pilot.reason
    t_active = time.monotonic()
    assert pilot.wait(timeout=60) in ("DONE", "FAILED")
    assert time.monotonic() - t_active < 40  # the agent's own 6 s timer, not SLURM's limit
    assert pilot.reason and "runtime" in pilot.reason, pilot.reason
    assert umgr.wait_units(timeout=20) == ["FAILED"] * 6
    for u in units:
        assert u.reason and "runtime" in u.reason, u.reason
        assert u.reason_code == "pilot_walltime", (u.reason_code, u.reason)
    assert queued_jobs_named(name) == []
    assert unit_processes(session, pilot) == []


@needs_slurm
@pytest.mark.timeout(90)
def test_killed_agent_fails_the_pilot_with_slurms_words(session):
    name = unique_name("killed")
    _, pilot, umgr = slurm_pilot(session, job_name=name)
    u = umgr.submit_units(rpg.UnitDescription(executable="/bin/sleep", arguments=["300"]))
    assert u.wait(state="EXECUTING", timeout=60) == "EXECUTING", pilot.reason
    os.kill(pilot.pid, signal.SIGKILL)
    assert pilot.wait(timeout=40) == "FAILED"
    assert "SLURM job" in pilot.reason and "FAILED" in pilot.reason, pilot.reason
    assert "signal 9" in pilot.reason, pilot.reason
    assert u.wait(timeout=20) == "FAILED" and pilot.uid in u.reason
    assert unit_processes(session, pilot) == []


@needs_slurm
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kw, words", [
    ({"queue": "nope"}, "invalid partition specified: nope"),
    ({"cores": 64}, "More processors requested than permitted"),
])
def test_impossible_request_fails_quickly_with_slurms_error(session, kw, words):
    t0 = time.monotonic()
    _, pilot, umgr = slurm_pilot(session, **kw)
    u = umgr.submit_units(rpg.UnitDescription(executable="/bin/true"))
    assert pilot.wait(timeout=30) == "FAILED"
    assert time.monotonic() - t0 < 15
    assert words in pilot.reason, pilot.reason
    assert "sbatch" in pilot.reason
    assert u.wait(timeout=20) == "FAILED"


@needs_slurm
@pytest.mark.timeout(60)
def test_a_world_writable_sandbox_is_refused_before_anything_is_submitted(session, tmp_path):
    name = unique_name("open")
    shared = tmp_path / "open"
    shared.mkdir()
    shared.chmod(0o777)
    _, pilot, _ = slurm_pilot(session, sandbox=str(shared), job_name=name)
    assert pilot.wait(timeout=30) == "FAILED"
    assert f"{shared} is writable by group and others" in pilot.reason, pilot.reason
    assert jobs_named(name) == {}
    assert os.listdir(shared) == []


@needs_slurm
@pytest.mark.timeout(90)
def test_a_sandbox_with_a_tilde_is_under_home_and_private(session):
    name = unique_name("home")
    where = os.path.join(os.path.expanduser("~"), name)
    try:
        _, pilot, umgr = slurm_pilot(session, sandbox=f"~/{name}", job_name=name)
        u = umgr.submit_units(rpg.UnitDescription(executable="/bin/pwd"))
        assert u.wait(timeout=60) == "DONE", f"{u.reason}; pilot: {pilot.reason}"
        assert pilot.sandbox == where and u.stdout.startswith(where + "/")
        assert oct(os.stat(where).st_mode & 0o777) == "0o700"
        assert oct(os.stat(os.path.join(where, "agent.slurm")).st_mode & 0o777) == "0o700"
        assert not os.path.exists(os.path.join(where, "agent.token"))  # the agent took it
        pilot.cancel()
        assert pilot.wait(timeout=40) == "CANCELED"
    finally:
        shutil.rmtree(where, ignore_errors=True)


@needs_slurm
@pytest.mark.timeout(90)
def test_srun_unit_runs_as_a_job_step(session):
    # nodes=1: a whole node (--exclusive); project goes to --account (no accounting here).
    _, _pilot, umgr = slurm_pilot(session, cores=2, nodes=1, project="rpg-ci")
    script = ('echo "step=$SLURM_STEP_ID task=$SLURM_PROCID of $SLURM_NTASKS '
              'cpus=$SLURM_CPUS_PER_TASK"')
    two = umgr.submit_units(rpg.UnitDescription(executable="/bin/sh", arguments=["-c", script],
                                                launch="srun", cores=2, ranks=2))
    one = umgr.submit_units(rpg.UnitDescription(executable="/bin/sh", arguments=["-c", script],
                                                launch="srun", cores=2))
    plain = umgr.submit_units(rpg.UnitDescription(
        executable="/bin/sh", arguments=["-c", 'echo "step=${SLURM_STEP_ID:-none} $RPG_NODE"']))
    assert umgr.wait_units(timeout=60) == ["DONE"] * 3, [two.reason, one.reason, plain.reason]
    lines = sorted(two.stdout.splitlines())
    assert len(lines) == 2, two.stdout
    for rank, line in enumerate(lines):
        assert line.startswith("step=") and line.split()[0][5:].isdigit(), line
        assert f"task={rank} of 2 cpus=1" in line
    assert "task=0 of 1 cpus=2" in one.stdout, one.stdout
    # Outside srun a unit runs in the batch step; the agent named its node after SLURM's
    # nodelist (not the machine's hostname).
    node = _run(["sinfo", "-h", "-N", "-o", "%N"]).split()[0]
    assert plain.stdout.split() in (["step=batch", node], ["step=none", node]), plain.stdout


@needs_slurm
@pytest.mark.timeout(120)
def test_start_latency_against_a_local_pilot(session, record_property):
    """Submit-to-ACTIVE of a SLURM pilot vs a local pilot, measured in the same run."""
    pmgr = rpg.PilotManager(session)
    lat: dict[str, list[float]] = {"local": [], "slurm": []}
    for _ in range(3):
        for resource in ("local", "slurm"):
            kw = {"queue": PARTITION} if resource == "slurm" else {}
            p = pmgr.submit_pilots(rpg.PilotDescription(resource=resource, cores=1, runtime=5,
                                                        **kw))
            assert p.wait(state="ACTIVE", timeout=60) == "ACTIVE", p.reason
            ts = dict(p.history)
            lat[resource].append(ts["ACTIVE"] - ts["NEW"])
            p.cancel()
            assert p.wait(timeout=40) == "CANCELED"
    local, slurm = statistics.median(lat["local"]), statistics.median(lat["slurm"])
    record_property("start_to_active_local_s", round(local, 3))
    record_property("start_to_active_slurm_s", round(slurm, 3))
    record_property("start_to_active_ratio", round(slurm / local, 2))
    print(f"\nstart-to-ACTIVE: local {local:.2f} s, slurm {slurm:.2f} s, "
          f"ratio {slurm / local:.2f}  (all: {lat})")
    assert slurm < 30


# -- no cluster needed ----------------------------------------------------------------------------

def test_srun_unit_on_a_local_pilot_fails_with_a_reason(session):
    pmgr = rpg.PilotManager(session)
    p = pmgr.submit_pilots(rpg.PilotDescription(resource="local", cores=2, runtime=5))
    umgr = rpg.UnitManager(session)
    umgr.add_pilots(p)
    u = umgr.submit_units(rpg.UnitDescription(executable="/bin/true", launch="srun"))
    assert u.wait(timeout=30) == "FAILED"
    assert "needs a pilot on SLURM" in u.reason


def test_expand_nodelist():
    assert expand_nodelist("localhost") == ["localhost"]
    assert expand_nodelist("node[01-03,05]") == ["node01", "node02", "node03", "node05"]
    assert expand_nodelist("a[8-10],b,c[1]") == ["a8", "a9", "a10", "b", "c1"]
    assert expand_nodelist("r[1-2]-n[1,3]") == ["r1-n1", "r1-n3", "r2-n1", "r2-n3"]
    assert expand_nodelist("gpu-[009-011]") == ["gpu-009", "gpu-010", "gpu-011"]
    for bad in ("n[1-", "n]1[", "n[3-1]", "n[a-b]"):
        with pytest.raises(ResourceError):
            expand_nodelist(bad)


def test_expand_counts():
    assert expand_counts("2") == [2]
    assert expand_counts("72(x2),36") == [72, 72, 36]
    with pytest.raises(ResourceError):
        expand_counts("2(y3)")


def test_nodes_from_environment():
    env = {"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_JOB_NUM_NODES": "3",
           "SLURM_JOB_CPUS_PER_NODE": "8(x2),4", "SLURM_GPUS_ON_NODE": "2"}
    assert nodes_from_environment(env, 1, 0) == [("n1", 8, 2), ("n2", 8, 2), ("n3", 4, 2)]
    env = {"SLURM_JOB_NODELIST": "localhost", "SLURM_CPUS_ON_NODE": "2"}
    assert nodes_from_environment(env, 1, 0) == [("localhost", 2, 0)]
    env = {"SLURM_JOB_NODELIST": "a,b", "SLURM_JOB_GPUS": "0,1"}
    assert nodes_from_environment(env, 5, 0) == [("a", 3, 2), ("b", 2, 2)]
    env = {"SLURM_JOB_NODELIST": "a", "SLURM_GPUS_PER_NODE": "tesla:4"}
    assert nodes_from_environment(env, 1, 0) == [("a", 1, 4)]
    with pytest.raises(ResourceError, match="not inside a SLURM allocation"):
        nodes_from_environment({}, 1, 0)
    with pytest.raises(ResourceError, match="SLURM_JOB_NUM_NODES"):
        nodes_from_environment({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "3"},
                               1, 0)


def test_srun_layout():
    assert srun_layout(2, 0, 1, [(2, 0)]) == (1, 2, 0)
    assert srun_layout(8, 0, 8, [(4, 0)] * 3) == (2, 4, 0)
    assert srun_layout(6, 0, 2, [(4, 0)] * 3) == (2, 3, 0)
    with pytest.raises(ResourceError, match="divide evenly"):
        srun_layout(6, 0, 3, [(4, 0)] * 3)
    with pytest.raises(ResourceError, match="has 2 such node"):
        srun_layout(12, 0, 12, [(4, 0), (4, 0), (2, 0)])
    with pytest.raises(ResourceError, match="multiple of ranks"):
        srun_layout(3, 0, 2, [(4, 0)])


def test_srun_placer_spreads_a_big_unit_over_distinct_nodes():
    sched = Scheduler([("n1", 4, 0), ("n2", 4, 0), ("n3", 4, 0)])
    placer = SrunPlacer(sched)
    small = sched.allocate(1)  # n1 has 3 free: a 4-core share must go elsewhere
    extra: list = []

    def place():
        return placer.place({"cores": 8, "gpus": 0, "ranks": 8}, ["a.out", "-x"], extra)

    slots, argv = gevent.spawn(place).get(timeout=5)
    assert sorted(sched.node_names[s.node] for s in (slots, *extra)) == ["n2", "n3"]
    assert argv == ["srun", "--nodes=2", "--nodelist=n2,n3", "--ntasks=8",
                    "--ntasks-per-node=4", "--cpus-per-task=1", "--exact",
                    "--kill-on-bad-exit=1", "a.out", "-x"]
    for s in (slots, *extra, small):
        sched.free(s)
    assert sched.free_cores.tolist() == [4, 4, 4]


def test_job_records_and_how_jobs_end():
    # squeue -O JobID:|,State:|,Reason:|,exit_code:|,TimeLimit:|,NodeList:| (raw wait status)
    recs = parse_squeue("7|TIMEOUT|TimeLimit|15|00:02:00|localhost|\n"
                        "8|FAILED|NonZeroExitCode|768|1:00|node[1-2]|\n"
                        "garbage line\n")
    assert set(recs) == {"7", "8"} and recs["8"]["ExitCode"] == "3:0"
    assert recs["8"]["NodeList"] == "node[1-2]"
    rec = recs["7"]
    assert rec["JobState"] == "TIMEOUT" and rec["ExitCode"] == "0:15"
    assert rec["NodeList"] == "localhost" and rec["TimeLimit"] == "00:02:00"
    text = describe_end("7", rec)
    assert text.startswith("SLURM job 7 ended TIMEOUT (walltime limit 00:02:00 reached)")
    assert "reason TimeLimit" in text and "killed by signal 15" in text
    assert describe_end("8", {"JobState": "FAILED", "Reason": "NonZeroExitCode",
                              "ExitCode": "3:0"}) == (
        "SLURM job 8 ended FAILED, reason NonZeroExitCode, exit code 3")
    assert "left the queue" in describe_end("9", {"JobState": "GONE"})
    assert walltime_minutes(0.1) == 2 and walltime_minutes(5) == 6 and walltime_minutes(59.5) == 61
