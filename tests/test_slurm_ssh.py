"""``slurm+ssh://``: SLURM reached through a login node, against the real sshd and the one-node
cluster CI starts (sshd's SetEnv gives an SSH login the cluster's SLURM_CONF, as a login node's
profile would). sbatch, squeue and scancel run over SSH; the agent on the "compute node" calls
the hub through the relay on the login node and the reverse tunnel."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from sshd_fixture import (
    kill_ssh_sessions_of_this_process,
    pilot_leftovers,
    remote_sh,
    requires_sshd,
    ssh_env,
)
from test_slurm import (
    PARTITION,
    jobs_named,
    needs_slurm,
    occupied_node,  # noqa: F401  (a fixture)
    queued_jobs_named,
    unique_name,
    unit_processes,
)

import rpg
from rpg import states
from rpg.hub.launchers import slurm as slurm_launcher

pytestmark = [requires_sshd, needs_slurm, pytest.mark.timeout(200)]


def login() -> str:
    e = ssh_env()
    return f"slurm+ssh://{e['RPG_SSH_USER']}@{e['RPG_SSH_HOST']}:{e['RPG_SSH_PORT']}"


def desc(**kw) -> rpg.PilotDescription:
    e = ssh_env()
    fields = dict(resource=login(), cores=2, runtime=5, queue=PARTITION,
                  ssh_key_file=e["RPG_SSH_KEY"], ssh_known_hosts=e["RPG_SSH_KNOWN_HOSTS"],
                  relay_address="127.0.0.1", heartbeat_interval=0.5, heartbeat_timeout=20.0)
    fields.update(kw)
    return rpg.PilotDescription(**fields)


def relays_of(sandbox: str) -> list[int]:
    """Relay processes serving this sandbox (by their command line)."""
    out = subprocess.run(["pgrep", "-f", f"relay.py .* {sandbox} [0-9]+$"], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def nothing_left(session, pilot, sandbox, name=None):
    deadline = time.monotonic() + 10
    while (left := pilot_leftovers(session.uid, pilot.uid, sandbox) + relays_of(sandbox)) and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"left on the login node: {left}"
    assert remote_sh(f"test -e '{sandbox}'").returncode != 0, "remote sandbox left behind"
    assert unit_processes(session, pilot) == []
    if name:
        assert queued_jobs_named(name) == []


def test_100_units_with_client_staging_through_the_login_node(tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(os.urandom(100_000))
    names = [unique_name("ssh-a"), unique_name("ssh-b")]
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pmgr = rpg.PilotManager(session)
        t0 = time.monotonic()
        pilots = pmgr.submit_pilots([desc(job_name=n, cores=1) for n in names])  # 2 CPUs
        for p in pilots:
            assert p.wait(state=states.ACTIVE, timeout=90) == states.ACTIVE, p.reason
        print(f"\ntwo slurm+ssh pilots ACTIVE in {time.monotonic() - t0:.1f} s")
        launchers = [session.hub.pilots[p.uid].launcher for p in pilots]
        # one connection, one cluster, one squeue per second for both jobs
        assert launchers[0].host is launchers[1].host and launchers[0].host.connects == 1
        cluster = launchers[0].job.cluster
        assert cluster is launchers[1].job.cluster
        assert set(cluster.jobs) == {la.job_id for la in launchers}
        for la in launchers:  # the agent calls through the relay, not the login's loopback
            assert la.relay and la.relay.startswith("127.0.0.1:")
            assert not la.relay.endswith(f":{la.fwd_port}")
            assert relays_of(la.sandbox)
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilots)
        polls0, t1 = cluster.polls, time.monotonic()
        units = umgr.submit_units([rpg.UnitDescription(
            executable="/bin/sh", arguments=["-c", f"cat in.txt > out.bin; echo {i} >> out.bin"],
            input_staging=[{"source": f"client://{src}", "target": "in.txt"}],
            output_staging=[{"source": "out.bin", "target": f"client://{tmp_path}/out/{i}.bin"}])
            for i in range(100)])
        assert umgr.wait_units(timeout=120) == [states.DONE] * 100, \
            [u.reason for u in units if u.state != states.DONE][:3]
        elapsed, polls = time.monotonic() - t1, cluster.polls - polls0
        # both pilots' jobs followed by one query per FOLLOW_INTERVAL (not one per pilot)
        assert polls <= elapsed / slurm_launcher.FOLLOW_INTERVAL + 3, (polls, elapsed)
        data = src.read_bytes()
        for i in range(100):
            assert (tmp_path / "out" / f"{i}.bin").read_bytes() == data + f"{i}\n".encode()
        assert {u.pilot for u in units} == {p.uid for p in pilots}
        sandboxes = [p.sandbox for p in pilots]
    for p, sb, n in zip(pilots, sandboxes, names, strict=True):
        assert p.state == states.DONE, p.reason
        nothing_left(session, p, sb, n)
        assert set(jobs_named(n).values()) <= {"COMPLETED"}
    assert launchers[0].host.users == 0 and launchers[0].host.conn is None
    assert not cluster.jobs


def test_a_bare_login_python_gets_its_environment_and_runs_units(tmp_path):
    bare = tmp_path / "bare"
    subprocess.run(["python3", "-m", "venv", "--without-pip", str(bare)], check=True)
    cache = tmp_path / "envcache"  # shared with the compute node, as a home directory is
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(desc(remote_python=str(bare / "bin" / "python"),
                                        remote_env_cache=str(cache)))
        assert pilot.wait(state=states.ACTIVE, timeout=300) == states.ACTIVE, pilot.reason
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        [u] = umgr.submit_units([rpg.UnitDescription(executable="/bin/sh",
                                                     arguments=["-c", "echo $SLURM_JOB_ID"])])
        assert umgr.wait_units(timeout=60) == [states.DONE], u.reason
        assert u.stdout.strip() == session.hub.pilots[pilot.uid].launcher.job_id
        sandbox = pilot.sandbox
    envs = [n for n in os.listdir(cache) if n.startswith("env-") and n[-1].isdigit()]
    assert len(envs) == 1 and (cache / envs[0] / ".rpg-ready").exists()
    nothing_left(session, pilot, sandbox)


def test_the_login_connection_dropped_mid_run(tmp_path):
    port = int(ssh_env()["RPG_SSH_PORT"])
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(desc(heartbeat_timeout=30.0))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        units = umgr.submit_units([rpg.UnitDescription(executable="/bin/sh",
                                                       arguments=["-c", "sleep 3; echo ok"])
                                   for _ in range(4)])
        umgr.wait_units([u.uid for u in units[:2]], state=states.EXECUTING, timeout=60)
        assert kill_ssh_sessions_of_this_process(port)  # the tunnel, squeue's way: all of it
        assert umgr.wait_units(timeout=90) == [states.DONE] * 4, [u.reason for u in units]
        assert all(u.stdout.strip() == "ok" for u in units)
        launcher = session.hub.pilots[pilot.uid].launcher
        assert launcher.host.connects >= 2 and pilot.state == states.ACTIVE, pilot.reason
        more = umgr.submit_units([rpg.UnitDescription(executable="/bin/true")])
        assert umgr.wait_units([u.uid for u in more], timeout=30) == [states.DONE]
        sandbox = pilot.sandbox
    nothing_left(session, pilot, sandbox)


def test_a_relay_killed_on_the_login_node_is_started_again(tmp_path):
    import signal

    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(desc(heartbeat_timeout=30.0))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        assert pilot.wait(state=states.ACTIVE, timeout=60) == states.ACTIVE, pilot.reason
        launcher = session.hub.pilots[pilot.uid].launcher
        units = umgr.submit_units([rpg.UnitDescription(executable="/bin/sh",
                                                       arguments=["-c", "sleep 4; echo ok"])
                                   for _ in range(4)])
        umgr.wait_units([u.uid for u in units[:2]], state=states.EXECUTING, timeout=60)
        [old] = relays_of(pilot.sandbox)
        os.kill(old, signal.SIGKILL)  # what a login node's process reaper does
        assert umgr.wait_units(timeout=90) == [states.DONE] * 4, [u.reason for u in units]
        assert launcher.relay_restarts >= 1
        [new] = relays_of(pilot.sandbox)
        assert new != old
        more = umgr.submit_units([rpg.UnitDescription(executable="/bin/true")])
        assert umgr.wait_units([u.uid for u in more], timeout=30) == [states.DONE]
        assert pilot.state == states.ACTIVE, pilot.reason
        sandbox = pilot.sandbox
    nothing_left(session, pilot, sandbox)


def test_cancel_while_pending(tmp_path, occupied_node):  # noqa: F811
    name = unique_name("ssh-pending")
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(desc(job_name=name))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        units = umgr.submit_units([rpg.UnitDescription(executable="/bin/true")
                                   for _ in range(5)])
        assert pilot.wait(state=states.PENDING, timeout=60) == states.PENDING, pilot.reason
        deadline = time.monotonic() + 30
        while "PENDING" not in jobs_named(name).values():
            assert time.monotonic() < deadline, jobs_named(name)
            time.sleep(0.2)
        time.sleep(2)
        assert pilot.state == states.PENDING
        launcher = session.hub.pilots[pilot.uid].launcher
        assert launcher.queued()
        t0 = time.monotonic()
        pilot.cancel()
        assert pilot.wait(timeout=30) == states.CANCELED
        assert time.monotonic() - t0 < 15
        assert umgr.wait_units(timeout=20) == [states.CANCELED] * 5
        assert all(u.reason for u in units)
        sandbox = pilot.sandbox
        assert queued_jobs_named(name) == []
    nothing_left(session, pilot, sandbox, name)


@pytest.mark.timeout(220)
def test_walltime_kill_fails_the_pilot_in_slurms_words(tmp_path, monkeypatch):
    """SLURM's limit below the agent's own runtime (not what rpg asks for; forced here): the
    walltime kill ends the pilot FAILED, in SLURM's words, and its units FAILED, never lost.
    SLURM takes 60-80 s to act, so one wait serves both launchers: a ``slurm`` pilot and a
    ``slurm+ssh`` one (a CPU each) in the same session."""
    monkeypatch.setattr(slurm_launcher, "WALLTIME_MARGIN_MIN", -2.0)  # --time=1 for 2.5 min
    names = {"slurm": unique_name("walltime"), "ssh": unique_name("ssh-walltime")}
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pmgr = rpg.PilotManager(session)
        pilots = {
            "slurm": pmgr.submit_pilots(rpg.PilotDescription(
                resource="slurm", cores=1, queue=PARTITION, runtime=2.5,
                job_name=names["slurm"])),
            "ssh": pmgr.submit_pilots(desc(job_name=names["ssh"], cores=1, runtime=2.5)),
        }
        units = {}
        for kind, pilot in pilots.items():
            umgr = rpg.UnitManager(session)
            umgr.add_pilots(pilot)
            units[kind] = (umgr, umgr.submit_units([rpg.UnitDescription(
                executable="/bin/sleep", arguments=["300"]) for _ in range(3)]))
        for pilot in pilots.values():
            assert pilot.wait(state=states.ACTIVE, timeout=60) == states.ACTIVE, pilot.reason
        for kind, pilot in pilots.items():
            assert pilot.wait(timeout=150) == states.FAILED, (kind, pilot.state, pilot.reason)
            assert "TIMEOUT" in pilot.reason and "walltime limit" in pilot.reason, pilot.reason
            # SLURM signals the agent (its units FAIL with that reason) and may kill units
            # directly (they FAIL as killed by a signal): FAILED either way.
            umgr, us = units[kind]
            assert umgr.wait_units(timeout=30) == [states.FAILED] * 3, [u.reason for u in us]
            assert all(u.reason for u in us)
        sandbox = pilots["ssh"].sandbox
    assert queued_jobs_named(names["slurm"]) == []
    assert unit_processes(session, pilots["slurm"]) == []
    nothing_left(session, pilots["ssh"], sandbox, names["ssh"])


@pytest.mark.parametrize("kw, words", [
    ({"queue": "no-such-partition"}, "sbatch refused the pilot job"),
    ({"relay_address": "192.0.2.1"}, "the relay for the compute nodes did not start"),
])
def test_refusals_fail_the_pilot_with_the_reason_and_leave_nothing(tmp_path, kw, words):
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(desc(**kw))
        assert pilot.wait(timeout=60) == states.FAILED
        assert words in pilot.reason, pilot.reason
        launcher = session.hub.pilots[pilot.uid].launcher
        sandbox = launcher.sandbox
    assert sandbox
    nothing_left(session, pilot, sandbox)
