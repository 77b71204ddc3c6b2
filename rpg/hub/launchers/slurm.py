"""The SLURM launcher: a pilot is a batch job, and its agent runs on the job's first node.

``launch`` writes the agent's config and a batch script into the pilot sandbox (which must be
on a filesystem the nodes share) and submits the script with ``sbatch --parsable``. The
cluster's follower greenlet asks one ``squeue`` about all the hub's jobs there every second
(``SlurmCluster``); ``queued`` says whether a job still waits in the queue (the bootstrap
timeout does not run meanwhile), ``poll`` whether it ended and how. ``SlurmCluster`` and
``SlurmJob`` serve ``slurm+ssh://`` too (slurm_ssh.py), with the commands run over SSH.
``stop`` lets the agent leave on its own for ``grace`` seconds, then ``scancel``s the job,
waits for it to end, and kills unit processes that outlived it (units run in sessions of their
own, which SLURM's process tracking does not always catch). Every SLURM command runs in the
``slurm`` io_pool lane, so a slow slurmctld holds only that lane.

Assumptions: the pilot sandbox and the Python running the hub are visible on the nodes at the
same paths, and the nodes can reach the hub's address (bind the session to a routable address
on a real cluster). The leftover-process sweep after the job ends looks at this machine only,
which is where the nodes are in the single-node test cluster; on a real cluster it does nothing
for processes on other nodes.
"""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import gevent
from gevent import GreenletExit
from gevent.event import Event

from rpg.hub.launchers.base import AGENT_CONFIG, AgentFile, Launcher, LaunchError
from rpg.hub.launchers.local import _RPG_ROOT, local_sandbox_path, make_local_sandbox
from rpg.io_pool import IOPoolError, blocking
from rpg.io_pool.sweep import kill_pilot_processes
from rpg.io_pool.tails import read_tail

SLURM_LANE = "slurm"
FOLLOW_INTERVAL = 1.0  # s between two looks at the job
COMMAND_TIMEOUT = 30.0  # s for one sbatch / scancel / squeue
CANCEL_WAIT = 15.0  # s, after scancel, for the job to leave the running states
STOP_LIMIT = 45.0  # s a killed pilot greenlet still waits for the job to be stopped
WALLTIME_MARGIN_MIN = 1.0  # SLURM's limit is this much longer than the agent's own runtime

# Waiting for resources, not started (or held): the bootstrap timeout must not run.
QUEUED_STATES = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                           "RESV_DEL_HOLD", "SUSPENDED"})
# The job is over; anything else (RUNNING, COMPLETING, SIGNALING, ...) still holds its nodes.
FINAL_STATES = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL",
                          "PREEMPTED", "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT",
                          "REVOKED"})
GONE = "GONE"  # squeue no longer knows the job (purged after MinJobAge)


class SlurmCommandError(RuntimeError):
    """A SLURM client command could not run or did not finish in time (``timed_out``: it may
    still have done what it was asked)."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


# -- blocking halves (run in the slurm lane) -------------------------------------------------------

def run_command(argv: list[str], timeout: float = COMMAND_TIMEOUT) -> tuple[int, str, str]:
    """Run a SLURM client command: (exit code, stdout, stderr). Blocking: run it in a lane."""
    try:
        proc = blocking.Popen(argv, stdin=blocking.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, close_fds=True)
    except OSError as exc:
        raise SlurmCommandError(f"cannot run {argv[0]}: {exc.strerror or exc} "
                                f"(is SLURM installed and on PATH?)") from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise SlurmCommandError(f"{argv[0]} did not finish within {timeout:g} s "
                                f"(slurmctld busy or unreachable?)", timed_out=True) from None
    return (proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


# -- pure helpers ----------------------------------------------------------------------------------

def walltime_minutes(runtime_min: float) -> int:
    """SLURM's ``--time`` for a pilot: its runtime plus a margin, in whole minutes."""
    return max(1, math.ceil(float(runtime_min) + WALLTIME_MARGIN_MIN))


def describe_end(job_id: str, rec: dict[str, str]) -> str:
    """How a job ended, in SLURM's words: state, reason, exit code or signal."""
    state = rec.get("JobState", "?")
    if state == GONE:
        return f"SLURM job {job_id} left the queue (SLURM no longer knows it)"
    text = f"SLURM job {job_id} ended {state}"
    if state == "TIMEOUT":
        text += f" (walltime limit {rec.get('TimeLimit', '?')} reached)"
    reason = rec.get("Reason", "")
    if reason and reason != "None":
        text += f", reason {reason}"
    code, _, sig = rec.get("ExitCode", "").partition(":")
    if sig and sig != "0":
        text += f", killed by signal {sig}"
    elif code:
        text += f", exit code {code}"
    return text


def _tail_lines(text: str, n: int = 5, width: int = 300) -> list[str]:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return [ln if len(ln) <= width else ln[:width] + "..." for ln in lines[-n:]]


# squeue's own fields (-O), '|' after each: every job of a cluster in one call.
SQUEUE_FIELDS = (("JobId", "JobID"), ("JobState", "State"), ("Reason", "Reason"),
                 ("ExitCode", "exit_code"), ("TimeLimit", "TimeLimit"), ("NodeList", "NodeList"))


def squeue_argv(job_ids: list[str]) -> list[str]:
    """One squeue for all these jobs, finished ones too (while slurmctld remembers them)."""
    return ["squeue", "--noheader", "--states=all", "--jobs=" + ",".join(job_ids),
            "--Format=" + ",".join(f"{f}:|" for _, f in SQUEUE_FIELDS)]


def parse_squeue(text: str) -> dict[str, dict[str, str]]:
    """squeue_argv's output: {job id: record (JobId, JobState, Reason, ExitCode, ...)}.
    squeue's exit_code is the raw wait status (768 is exit 3, 15 is signal 15): made
    ``code:signal`` as scontrol says it."""
    jobs: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        values = line.strip().split("|")
        if len(values) < len(SQUEUE_FIELDS) or not values[0].strip().isdigit():
            continue
        rec = {key: v.strip() for (key, _), v in zip(SQUEUE_FIELDS, values, strict=False)}
        raw = rec.get("ExitCode", "")
        if raw.isdigit():
            status = int(raw)
            rec["ExitCode"] = f"{(status >> 8) & 0xFF}:{status & 0x7F}"
        jobs[rec["JobId"]] = rec
    return jobs


Runner = Callable[..., tuple[int, str, str]]


class SlurmCluster:
    """The SLURM jobs of one hub's pilots on one cluster (this machine's, or one behind a login
    node), followed by one greenlet with one ``squeue`` for all of them every FOLLOW_INTERVAL,
    not one query per pilot. ``run(argv, keep=None)`` runs a SLURM command (hub loop; it puts
    the blocking call in a lane): raises SlurmCommandError or IOPoolError."""

    def __init__(self, name: str, run: Runner, user: str, log: Any) -> None:
        self.name = name
        self.run = run
        self.user = user  # whose jobs: for finding one whose sbatch answer was lost
        self.log = log.bind(cluster=name)
        self.jobs: dict[str, SlurmJob] = {}
        self.polls = 0  # squeue calls made (for the tests and the benchmark)
        self._poke = Event()
        self._follower: Any = None

    def follow(self, job: SlurmJob) -> None:
        assert job.job_id is not None
        self.jobs[job.job_id] = job
        if self._follower is None or self._follower.dead:
            self._follower = gevent.spawn(self._follow)
        self.poke()

    def forget(self, job: SlurmJob) -> None:
        if job.job_id is not None:
            self.jobs.pop(job.job_id, None)
        if not self.jobs and self._follower is not None:
            self._follower.kill(block=False)
            self._follower = None

    def poke(self) -> None:
        """Look now (a job was submitted or canceled)."""
        self._poke.set()

    def _follow(self) -> None:
        failures = 0
        while self.jobs:
            self._poke.clear()  # before the query: a poke during it makes the next one at once
            ids = sorted(self.jobs, key=int)
            self.polls += 1
            try:
                rc, out, err = self.run(squeue_argv(ids))
            except (SlurmCommandError, IOPoolError) as exc:
                rc, out, err = -1, "", str(exc)
            except Exception as exc:  # whatever it was, the follower must go on: jobs wait
                rc, out, err = -1, "", f"{type(exc).__name__}: {exc}"
            if rc == 0 or "Invalid job id" in err:
                failures = 0
                recs = parse_squeue(out) if rc == 0 else {}
                for job_id in ids:
                    job = self.jobs.get(job_id)
                    if job is not None:
                        job.update(recs.get(job_id))
                        if job.ended.is_set():
                            self.jobs.pop(job_id, None)
            else:  # slurmctld busy or away: keep the last states, try again, log now and then
                failures += 1
                if failures % 60 == 1:
                    self.log.warning("slurm_query_failed", jobs=len(ids), failures=failures,
                                     error=" | ".join(_tail_lines(err, 3)))
            self._poke.wait(FOLLOW_INTERVAL)


def stop_in_own_greenlet(stop: Callable[[float], None], grace: float) -> None:
    """A SLURM pilot's stop, in a greenlet of its own: a second kill of the pilot's greenlet
    (a cancel, then the session closing) must not leave the job running. Waits up to
    STOP_LIMIT more for it when killed."""
    g = gevent.spawn(stop, grace)
    try:
        g.get()
    except GreenletExit:
        g.join(timeout=STOP_LIMIT)
        raise


def local_cluster(hub: Any) -> SlurmCluster:
    """This machine's SLURM (sbatch & co. in the ``slurm`` lane), one per hub."""
    clusters = hub.shared.setdefault("slurm_clusters", {})
    cluster = clusters.get("local")
    if cluster is None:
        lane = hub.pool.lane(SLURM_LANE)

        def run(argv: list[str], keep: Any = None) -> tuple[int, str, str]:
            return lane.run(run_command, argv, COMMAND_TIMEOUT, timeout=COMMAND_TIMEOUT + 10,
                            keep=keep)

        cluster = clusters["local"] = SlurmCluster("local", run, str(os.getuid()), hub.log)
    return cluster


class SlurmJob:
    """One pilot's batch job on a cluster: submit, what SLURM says of it, cancel, and how it
    ended. Hub loop only."""

    def __init__(self, cluster: SlurmCluster, pilot_uid: str, comment: str) -> None:
        self.cluster = cluster
        self.pilot_uid = pilot_uid
        self.comment = comment
        self.log = cluster.log.bind(pilot=pilot_uid)
        self.job_id: str | None = None
        self.rec: dict[str, str] = {}  # what squeue said last
        self.ended = Event()
        self.submit_lost = False  # sbatch timed out: the job may exist without its id

    def submit(self, argv: list[str], script: str) -> None:
        """sbatch ``argv``; raises LaunchError in SLURM's words."""
        # sbatch runs in a thread: if this greenlet is killed meanwhile the job may still be
        # submitted, so the lane keeps sbatch's answer for us (the job id; stop() then cancels
        # the job). Until sbatch has answered, a job may exist that we know no id of.
        self.submit_lost = True
        try:
            rc, out, err = self.cluster.run(argv, keep=lambda a: self._keep_sbatch(a, script))
        except IOPoolError as exc:
            raise LaunchError(f"sbatch: {exc}") from None
        except SlurmCommandError as exc:
            self.submit_lost = exc.timed_out
            raise LaunchError(f"sbatch: {exc}") from None
        self.submit_lost = False
        job_id = out.strip().split(";")[0]
        if rc != 0 or not job_id.isdigit():
            text = " | ".join(_tail_lines(err + "\n" + out, 5)) or "no output"
            raise LaunchError(f"sbatch refused the pilot job (exit code {rc}): {text}")
        self._submitted(job_id, script)

    def _keep_sbatch(self, answer: tuple[int, str, str], script: str) -> None:
        """sbatch answered after the pilot's greenlet was killed: keep the job to cancel it."""
        rc, out, _ = answer
        self.submit_lost = False
        job_id = out.strip().split(";")[0]
        if rc == 0 and job_id.isdigit():
            self._submitted(job_id, script)

    def _submitted(self, job_id: str, script: str) -> None:
        self.job_id = job_id
        self.log.info("slurm_job_submitted", job=job_id, script=script)
        self.cluster.follow(self)

    def update(self, rec: dict[str, str] | None) -> None:
        """The cluster's latest look: the job's record, or None if SLURM no longer knows it."""
        before = self.rec.get("JobState")
        if rec is not None and rec.get("JobState"):
            self.rec = rec
        elif before not in FINAL_STATES:
            self.rec = dict(self.rec, JobState=GONE)
        state = self.rec.get("JobState")
        if state != before:
            self.log.info("slurm_job_state", job=self.job_id, state=state,
                          reason=self.rec.get("Reason"), nodes=self.rec.get("NodeList"))
        if state in FINAL_STATES or state == GONE:
            self.ended.set()

    def queued(self) -> bool:
        if self.job_id is None or self.ended.is_set():
            return False
        state = self.rec.get("JobState")
        return state is None or state in QUEUED_STATES

    def describe_end(self) -> str:
        return describe_end(str(self.job_id), self.rec)

    def ended_cleanly(self) -> bool:
        return (self.ended.is_set() and self.rec.get("JobState") == "COMPLETED"
                and self.rec.get("ExitCode") == "0:0")

    def stop(self, grace: float, registered: bool) -> None:
        """Let a started agent leave on its own for ``grace`` s, then scancel and wait."""
        try:
            if self.job_id is None:
                if self.submit_lost:
                    self._cancel_lost_submit()
                return
            if not self.ended.is_set() and not (self.queued() and not registered):
                self.ended.wait(grace)  # the agent heard "shutdown" and may leave on its own
            if not self.ended.is_set():
                self.scancel()
                if not self.ended.wait(CANCEL_WAIT):
                    self.log.warning("slurm_job_still_running", job=self.job_id,
                                     state=self.rec.get("JobState"), waited_s=CANCEL_WAIT)
        finally:
            self.cluster.forget(self)

    def scancel(self) -> None:
        self.log.info("slurm_job_cancel", job=self.job_id, state=self.rec.get("JobState"))
        try:
            rc, _out, err = self.cluster.run(["scancel", str(self.job_id)])
            if rc != 0:
                self.log.error("slurm_scancel_failed", job=self.job_id,
                               error=" | ".join(_tail_lines(err, 3)))
        except (SlurmCommandError, IOPoolError) as exc:
            self.log.error("slurm_scancel_failed", job=self.job_id, error=str(exc))
        self.cluster.poke()

    def _cancel_lost_submit(self) -> None:
        """sbatch timed out: find a job of ours by its comment and cancel it."""
        argv = ["squeue", "--noheader", f"--user={self.cluster.user}", "--format=%i %k"]
        try:
            rc, out, _err = self.cluster.run(argv)
        except (SlurmCommandError, IOPoolError) as exc:
            self.log.error("slurm_lost_job_unknown", error=str(exc))
            return
        for line in out.splitlines() if rc == 0 else []:
            job_id, _, comment = line.strip().partition(" ")
            if comment.strip() == self.comment and job_id.isdigit():
                self.job_id = job_id
                self.scancel()


def sbatch_options(desc: dict[str, Any], uid: str, sandbox: str, comment: str) -> list[str]:
    """sbatch's options for a pilot's job (the script's path goes after them)."""
    out_path = os.path.join(sandbox, "agent.out")
    err_path = os.path.join(sandbox, "agent.err")
    argv = ["sbatch", "--parsable",
            f"--job-name={desc.get('job_name') or 'rpg.' + uid}",
            f"--chdir={sandbox}",
            # sbatch expands %j and friends in file names; %% is a plain %
            f"--output={out_path.replace('%', '%%')}",
            f"--error={err_path.replace('%', '%%')}",
            f"--time={walltime_minutes(desc['runtime'])}",
            "--no-requeue",  # a requeued job would start a second agent with the same token
            f"--comment={comment}"]
    cores = int(desc["cores"])
    if desc.get("nodes"):
        nodes = int(desc["nodes"])
        argv += [f"--nodes={nodes}", "--exclusive", f"--ntasks={max(cores, nodes)}"]
    else:
        argv.append(f"--ntasks={cores}")
    if int(desc.get("gpus") or 0):
        argv.append(f"--gpus={int(desc['gpus'])}")
    if desc.get("queue"):
        argv.append(f"--partition={desc['queue']}")
    if desc.get("project"):
        argv.append(f"--account={desc['project']}")
    return argv


def batch_script(pilot_uid: str, session_uid: str, sandbox: str, rpg_root: str,
                 python: str) -> str:
    """The job's script: the agent on the first node of its allocation, which reads the
    allocation's nodes and cores from SLURM's environment."""
    q = shlex.quote
    cfg_path = os.path.join(sandbox, AGENT_CONFIG)
    return (
        "#!/bin/sh\n"
        f"# rpg pilot {pilot_uid} of session {session_uid}: the batch job\n"
        "# starts the agent on the first node of its allocation; the agent reads the\n"
        "# allocation's nodes and cores from SLURM's environment.\n"
        f"PYTHONPATH={q(rpg_root)}${{PYTHONPATH:+:$PYTHONPATH}}\n"
        "export PYTHONPATH\n"
        f"cd {q(sandbox)} || exit 1\n"
        f"exec {q(python)} -m rpg.agent --config {q(cfg_path)}\n")


class SlurmLauncher(Launcher):
    def __init__(self, hub: Any, pilot: Any) -> None:
        super().__init__(hub, pilot)
        self._paths(pilot.sandbox)  # again in launch, once ~ is expanded
        self._made = False  # the sandbox is ours (made or checked, agent files written)
        self.job = SlurmJob(local_cluster(hub), pilot.uid, f"rpg:{hub.session_uid}:{pilot.uid}")
        self._end_reason: str | None = None

    def _paths(self, sandbox: str) -> None:
        self.sandbox = sandbox
        self.err_path = os.path.join(sandbox, "agent.err")
        self.script_path = os.path.join(sandbox, "agent.slurm")

    @property
    def job_id(self) -> str | None:
        return self.job.job_id

    def sbatch_argv(self) -> list[str]:
        return sbatch_options(self.pilot.desc, self.pilot.uid, self.sandbox,
                              self.job.comment) + [self.script_path]

    def launch(self) -> None:
        hub, p = self.hub, self.pilot
        self._paths(local_sandbox_path(self))
        cfg = self.agent_config(hub.address, self.sandbox)
        cfg.resource_manager = "slurm"
        text = batch_script(p.uid, hub.session_uid, self.sandbox, _RPG_ROOT, sys.executable)
        make_local_sandbox(self, self.sandbox, cfg, [AgentFile("agent.slurm", text.encode(),
                                                               0o700)])
        self._made = True
        self.job.submit(self.sbatch_argv(), self.script_path)

    def queued(self) -> bool:
        # The agent calling in beats a follower that has not seen the job start yet.
        return not self.pilot.registered.is_set() and self.job.queued()

    def poll(self, timeout: float) -> str | None:
        if self.job.job_id is None:
            return "the SLURM job was never submitted"
        if not self.job.ended.wait(timeout):
            return None
        if self._end_reason is None:
            text = self.job.describe_end()
            try:
                tail = self.hub.pool.for_path(self.err_path).run(read_tail, self.err_path, 4000,
                                                                 timeout=10)
            except (IOPoolError, OSError) as exc:
                tail = f"(agent.err unreadable: {exc})"
            lines = _tail_lines(tail)
            self._end_reason = text + (f"; agent.err: {' | '.join(lines)}" if lines else "")
        return self._end_reason

    def ended_cleanly(self) -> bool:
        return self.job.ended_cleanly()

    # -- stop --------------------------------------------------------------------------------------

    def stop(self, grace: float) -> None:
        stop_in_own_greenlet(self._stop, grace)

    def _stop(self, grace: float) -> None:
        log, uid = self.hub.log, self.pilot.uid
        try:
            self.job.stop(grace, self.pilot.registered.is_set())
        finally:
            if self.job.job_id is not None:
                # Units run in sessions of their own and SLURM does not kill those that outlive
                # the job. This scans the hub's machine only (see the module docstring).
                killed = self.hub.pool.spawn.run(kill_pilot_processes, self.key, self.sandbox,
                                                 timeout=30)
                if killed:
                    log.warning("orphan_unit_processes_killed", pilot=uid, count=killed)
            if self._made:  # a job canceled while queued never read its token
                self.forget_token(self.sandbox)
