"""The SLURM launcher: a pilot is a batch job, and its agent runs on the job's first node.

``launch`` writes the agent's config and a batch script into the pilot sandbox (which must be
on a filesystem the nodes share) and submits the script with ``sbatch --parsable``. A follower
greenlet asks ``scontrol show job`` about the job every second; ``queued`` says whether it still
waits in the queue (the bootstrap timeout does not run meanwhile), ``poll`` whether it ended and
how. ``stop`` lets the agent leave on its own for ``grace`` seconds, then ``scancel``s the job,
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
import re
import shlex
import subprocess
import sys
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
COMMAND_TIMEOUT = 30.0  # s for one sbatch / scontrol / scancel / squeue
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
GONE = "GONE"  # scontrol no longer knows the job (purged after MinJobAge)


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

_FIELD = re.compile(r"(?:^|\s)(JobId|JobState|Reason|ExitCode|NodeList|BatchHost|TimeLimit|"
                    r"RunTime)=(\S*)")


def parse_job_record(text: str) -> dict[str, str]:
    """The fields rpg needs from one line of ``scontrol show job -o``."""
    return {m.group(1): m.group(2) for m in _FIELD.finditer(text)}


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


class SlurmLauncher(Launcher):
    def __init__(self, hub: Any, pilot: Any) -> None:
        super().__init__(hub, pilot)
        self._paths(pilot.sandbox)  # again in launch, once ~ is expanded
        self._made = False  # the sandbox is ours (made or checked, agent files written)
        self.comment = f"rpg:{hub.session_uid}:{pilot.uid}"
        self.job_id: str | None = None
        self.job: dict[str, str] = {}  # last scontrol record
        self._submit_lost = False  # sbatch timed out: the job may exist without its id
        self._ended = Event()
        self._poke = Event()
        self._follower: Any = None
        self._end_reason: str | None = None

    def _paths(self, sandbox: str) -> None:
        self.sandbox = sandbox
        self.err_path = os.path.join(sandbox, "agent.err")
        self.out_path = os.path.join(sandbox, "agent.out")
        self.script_path = os.path.join(sandbox, "agent.slurm")
        self.cfg_path = os.path.join(sandbox, AGENT_CONFIG)

    @property
    def lane(self) -> Any:
        return self.hub.pool.lane(SLURM_LANE)

    # -- launch ----------------------------------------------------------------------------------

    def sbatch_argv(self) -> list[str]:
        d = self.pilot.desc
        argv = ["sbatch", "--parsable",
                f"--job-name={d.get('job_name') or 'rpg.' + self.pilot.uid}",
                f"--chdir={self.sandbox}",
                # sbatch expands %j and friends in file names; %% is a plain %
                f"--output={self.out_path.replace('%', '%%')}",
                f"--error={self.err_path.replace('%', '%%')}",
                f"--time={walltime_minutes(d['runtime'])}",
                "--no-requeue",  # a requeued job would start a second agent with the same token
                f"--comment={self.comment}"]
        cores = int(d["cores"])
        if d.get("nodes"):
            nodes = int(d["nodes"])
            argv += [f"--nodes={nodes}", "--exclusive", f"--ntasks={max(cores, nodes)}"]
        else:
            argv.append(f"--ntasks={cores}")
        if int(d.get("gpus") or 0):
            argv.append(f"--gpus={int(d['gpus'])}")
        if d.get("queue"):
            argv.append(f"--partition={d['queue']}")
        if d.get("project"):
            argv.append(f"--account={d['project']}")
        return argv + [self.script_path]

    def batch_script(self) -> str:
        q = shlex.quote
        return (
            "#!/bin/sh\n"
            f"# rpg pilot {self.pilot.uid} of session {self.hub.session_uid}: the batch job\n"
            "# starts the agent on the first node of its allocation; the agent reads the\n"
            "# allocation's nodes and cores from SLURM's environment.\n"
            f"PYTHONPATH={q(_RPG_ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}\n"
            "export PYTHONPATH\n"
            f"cd {q(self.sandbox)} || exit 1\n"
            f"exec {q(sys.executable)} -m rpg.agent --config {q(self.cfg_path)}\n")

    def launch(self) -> None:
        hub, p = self.hub, self.pilot
        if p.desc["resource"].startswith("slurm+ssh://"):
            raise LaunchError(f"resource {p.desc['resource']!r}: submitting through an SSH login "
                              f"node is not supported yet; use resource='slurm' where sbatch "
                              f"runs on this machine")
        self._paths(local_sandbox_path(self))
        cfg = self.agent_config(hub.address, self.sandbox)
        cfg.resource_manager = "slurm"
        script = AgentFile("agent.slurm", self.batch_script().encode(), 0o700)
        make_local_sandbox(self, self.sandbox, cfg, [script])
        self._made = True
        argv = self.sbatch_argv()
        # sbatch runs in a thread: if this greenlet is killed meanwhile the job may still be
        # submitted, so the lane keeps sbatch's answer for us (the job id; stop() then cancels
        # the job). Until sbatch has answered, a job may exist that we know no id of.
        self._submit_lost = True
        try:
            rc, out, err = self.lane.run(run_command, argv, COMMAND_TIMEOUT,
                                         timeout=COMMAND_TIMEOUT + 10, keep=self._keep_sbatch)
        except IOPoolError as exc:
            raise LaunchError(f"sbatch: {exc}") from None
        except SlurmCommandError as exc:
            self._submit_lost = exc.timed_out
            raise LaunchError(f"sbatch: {exc}") from None
        self._submit_lost = False
        job_id = out.strip().split(";")[0]
        if rc != 0 or not job_id.isdigit():
            text = " | ".join(_tail_lines(err + "\n" + out, 5)) or "no output"
            raise LaunchError(f"sbatch refused the pilot job (exit code {rc}): {text}")
        self._submitted(job_id)

    def _keep_sbatch(self, answer: tuple[int, str, str]) -> None:
        """sbatch answered after the pilot's greenlet was killed: keep the job to cancel it."""
        rc, out, _ = answer
        self._submit_lost = False
        job_id = out.strip().split(";")[0]
        if rc == 0 and job_id.isdigit():
            self._submitted(job_id)

    def _submitted(self, job_id: str) -> None:
        self.job_id = job_id
        self.hub.log.info("slurm_job_submitted", pilot=self.pilot.uid, job=job_id,
                          script=self.script_path)
        self._follower = gevent.spawn(self._follow)

    # -- following the job -------------------------------------------------------------------------

    def _follow(self) -> None:
        """Ask scontrol about the job every FOLLOW_INTERVAL s until it is over."""
        log = self.hub.log
        argv = ["scontrol", "show", "job", "-o", str(self.job_id)]
        last = None
        failures = 0
        while True:
            try:
                rc, out, err = self.lane.run(run_command, argv, COMMAND_TIMEOUT,
                                             timeout=COMMAND_TIMEOUT + 10)
            except (SlurmCommandError, IOPoolError) as exc:
                rc, out, err = -1, "", str(exc)
            rec = parse_job_record(out) if rc == 0 else {}
            if rec.get("JobState"):
                self.job = rec
                failures = 0
            elif "Invalid job id" in err:
                if self.job.get("JobState") not in FINAL_STATES:
                    self.job = dict(self.job, JobState=GONE)
            else:  # slurmctld busy or away: keep the last state, try again, log now and then
                failures += 1
                if failures % 60 == 1:
                    log.warning("slurm_query_failed", pilot=self.pilot.uid, job=self.job_id,
                                failures=failures, error=" | ".join(_tail_lines(err, 3)))
            state = self.job.get("JobState")
            if state != last:
                log.info("slurm_job_state", pilot=self.pilot.uid, job=self.job_id, state=state,
                         reason=self.job.get("Reason"), nodes=self.job.get("NodeList"))
                last = state
            if state in FINAL_STATES or state == GONE:
                self._ended.set()
                return
            self._poke.wait(FOLLOW_INTERVAL)
            self._poke.clear()

    def queued(self) -> bool:
        # The agent calling in beats a follower that has not seen the job start yet.
        if self.job_id is None or self._ended.is_set() or self.pilot.registered.is_set():
            return False
        state = self.job.get("JobState")
        return state is None or state in QUEUED_STATES

    def poll(self, timeout: float) -> str | None:
        if self.job_id is None:
            return "the SLURM job was never submitted"
        if not self._ended.wait(timeout):
            return None
        if self._end_reason is None:
            text = describe_end(self.job_id, self.job)
            try:
                tail = self.hub.pool.for_path(self.err_path).run(read_tail, self.err_path, 4000,
                                                                 timeout=10)
            except (IOPoolError, OSError) as exc:
                tail = f"(agent.err unreadable: {exc})"
            lines = _tail_lines(tail)
            self._end_reason = text + (f"; agent.err: {' | '.join(lines)}" if lines else "")
        return self._end_reason

    def ended_cleanly(self) -> bool:
        return (self._ended.is_set() and self.job.get("JobState") == "COMPLETED"
                and self.job.get("ExitCode") == "0:0")

    # -- stop --------------------------------------------------------------------------------------

    def stop(self, grace: float) -> None:
        # Runs in its own greenlet: a second kill of the pilot's greenlet (cancel, then the
        # session closing) must not leave the job running.
        g = gevent.spawn(self._stop, grace)
        try:
            g.get()
        except GreenletExit:
            g.join(timeout=STOP_LIMIT)
            raise

    def _stop(self, grace: float) -> None:
        log, uid = self.hub.log, self.pilot.uid
        try:
            if self.job_id is None:
                if self._submit_lost:
                    self._cancel_lost_submit()
                return
            if not self._ended.is_set() and not self.queued():
                self._ended.wait(grace)  # the agent heard "shutdown" and may leave on its own
            if not self._ended.is_set():
                self._scancel()
                if not self._ended.wait(CANCEL_WAIT):
                    log.warning("slurm_job_still_running", pilot=uid, job=self.job_id,
                                state=self.job.get("JobState"), waited_s=CANCEL_WAIT)
        finally:
            if self._follower is not None:
                self._follower.kill(block=False)
            if self.job_id is not None:
                # Units run in sessions of their own and SLURM does not kill those that outlive
                # the job. This scans the hub's machine only (see the module docstring).
                killed = self.hub.pool.spawn.run(kill_pilot_processes, self.key, self.sandbox,
                                                 timeout=30)
                if killed:
                    log.warning("orphan_unit_processes_killed", pilot=uid, count=killed)
            if self._made:  # a job canceled while queued never read its token
                self.forget_token(self.sandbox)

    def _scancel(self) -> None:
        log = self.hub.log
        log.info("slurm_job_cancel", pilot=self.pilot.uid, job=self.job_id,
                 state=self.job.get("JobState"))
        try:
            rc, _out, err = self.lane.run(run_command, ["scancel", str(self.job_id)],
                                          COMMAND_TIMEOUT, timeout=COMMAND_TIMEOUT + 10)
            if rc != 0:
                log.error("slurm_scancel_failed", pilot=self.pilot.uid, job=self.job_id,
                          error=" | ".join(_tail_lines(err, 3)))
        except (SlurmCommandError, IOPoolError) as exc:
            log.error("slurm_scancel_failed", pilot=self.pilot.uid, job=self.job_id,
                      error=str(exc))
        self._poke.set()

    def _cancel_lost_submit(self) -> None:
        """sbatch timed out: find a job of ours by its comment and cancel it."""
        argv = ["squeue", "--noheader", f"--user={os.getuid()}", "--format=%i %k"]
        try:
            rc, out, _err = self.lane.run(run_command, argv, COMMAND_TIMEOUT,
                                          timeout=COMMAND_TIMEOUT + 10)
        except (SlurmCommandError, IOPoolError) as exc:
            self.hub.log.error("slurm_lost_job_unknown", pilot=self.pilot.uid, error=str(exc))
            return
        for line in out.splitlines() if rc == 0 else []:
            job_id, _, comment = line.strip().partition(" ")
            if comment.strip() == self.comment and job_id.isdigit():
                self.job_id = job_id
                self._scancel()
