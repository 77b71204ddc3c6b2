"""SSH pilots against a real OpenSSH server (``.ci/sshd.sh``): bootstrap over SSH, the agent
tunnelled back to the hub, SFTP staging of client:// files, failures that end a pilot fast
with a reason, a dropped connection mid-run, and nothing left behind on the remote."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time

import pytest
from sshd_fixture import (
    free_port,
    kill_ssh_sessions_of_this_process,
    pilot_desc,
    pilot_leftovers,
    remote_sh,
    requires_sshd,
    resource,
    ssh_env,
)

import rpg
from rpg import states
from rpg.log import read_profile

pytestmark = [requires_sshd, pytest.mark.timeout(150)]

FAIL_FAST_S = 20.0


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def start(tmp_path, desc, name="session"):
    session = rpg.Session(sandbox=str(tmp_path / name))
    pmgr = rpg.PilotManager(session)
    pilot = pmgr.submit_pilots(desc)
    umgr = rpg.UnitManager(session)
    umgr.add_pilots(pilot)
    return session, pilot, umgr


def assert_nothing_left(session, pilot):
    sandbox = pilot.sandbox
    deadline = time.monotonic() + 10
    while True:
        left = pilot_leftovers(session.uid, pilot.uid, sandbox)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"remote processes left behind: {left}"


def remote_exists(path) -> bool:
    r = remote_sh(f"test -e '{path}' && echo yes || echo no")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip() == "yes"


# -- the happy path ------------------------------------------------------------------------------

def test_100_units_with_sftp_staging_in_and_out(tmp_path):
    data = tmp_path / "data"
    out = tmp_path / "out"
    data.mkdir()
    big = data / "big.bin"
    big.write_bytes(os.urandom(6 * 1024 * 1024 + 123))
    descs, expect = [], {}
    for i in range(100):
        small = data / f"in_{i}.txt"
        small.write_bytes(os.urandom(2048 + 37 * i))
        inputs = [{"source": f"client://{small}", "target": "in.bin", "action": "transfer"}]
        outputs = [{"source": "copy.bin", "target": f"client://{out}/copy_{i}.bin",
                    "action": "transfer"}]
        expect[f"{out}/copy_{i}.bin"] = sha256(small)
        cmd = "cp in.bin copy.bin && sha256sum in.bin"
        if i == 7:  # one unit carries a few MB both ways, through a sub-directory
            inputs.append({"source": f"client://{big}", "target": "sub/big.bin"})
            outputs.append({"source": "sub/big_copy.bin", "target": f"client://{out}/big_copy.bin"})
            cmd += " && cp sub/big.bin sub/big_copy.bin"
            expect[f"{out}/big_copy.bin"] = sha256(big)
        descs.append(rpg.UnitDescription(executable="/bin/sh", arguments=["-c", cmd],
                                         input_staging=inputs, output_staging=outputs))
    t0 = time.monotonic()
    session, pilot, umgr = start(tmp_path, pilot_desc(cores=4))
    with session:
        units = umgr.submit_units(descs)
        final = umgr.wait_units(timeout=100)
        elapsed = time.monotonic() - t0
        bad = [(u.uid, u.state, u.reason, u.stderr) for u in units if u.state != states.DONE]
        assert not bad, bad[:5]
        assert final == [states.DONE] * 100
        assert pilot.state == states.ACTIVE
        sandbox = pilot.sandbox
        assert sandbox and sandbox.startswith("/") and pilot.uid in sandbox
        assert not sandbox.startswith(session.sandbox), "pilot.sandbox must be the remote one"
        for u in units[:3]:
            assert u.sandbox == f"{sandbox}/{u.uid}"
        assert units[7].stdout.split()[0] == sha256(data / "in_7.txt")
        loop_blocks = session.hub.stats()["loop"]["blocked_events"]
    assert pilot.state == states.DONE, pilot.reason
    for path, digest in expect.items():
        assert sha256(path) == digest, path
    transfers = [e for e in read_profile(session.profile_path) if e.get("state") == "TRANSFER"]
    assert len(transfers) == 202, len(transfers)  # 100 + 1 in, 100 + 1 out
    from rpg.report import analyze

    counted = analyze(read_profile(session.profile_path))["transfers"]  # what rpg report says
    assert (counted["in"], counted["out"]) == (101, 101), counted
    assert counted["bytes_out"] == sum(os.path.getsize(p) for p in expect)
    big_in = [e for e in transfers if e["direction"] == "in" and e["bytes"] == big.stat().st_size]
    assert big_in and big_in[0]["seconds"] > 0
    assert sum(e["bytes"] for e in transfers if e["direction"] == "out") == \
        sum(os.path.getsize(p) for p in expect)
    assert not remote_exists(sandbox), "the remote sandbox must be removed"
    assert_nothing_left(session, pilot)
    assert loop_blocks == 0, f"the hub loop was blocked {loop_blocks} times"
    print(f"100 units with SFTP staging in {elapsed:.1f} s")


PATCHED_APP = r"""
from gevent import monkey
monkey.patch_all()

import hashlib, json, os, sys
import gevent
import rpg
from rpg import states

desc, tmp = rpg.PilotDescription(**json.loads(sys.argv[1])), sys.argv[2]
ticks = [0]

def ticker():  # the application's own greenlet: its loop must keep running
    while True:
        ticks[0] += 1
        gevent.sleep(0.05)

t = gevent.spawn(ticker)
big = os.path.join(tmp, "big.bin")
with open(big, "wb") as fh:
    fh.write(os.urandom(6 * 1024 * 1024 + 7))
with rpg.Session(sandbox=os.path.join(tmp, "session")) as session:
    pmgr = rpg.PilotManager(session)
    pilot = pmgr.submit_pilots(desc)
    umgr = rpg.UnitManager(session)
    umgr.add_pilots(pilot)
    units = umgr.submit_units([rpg.UnitDescription(
        executable="/bin/sh", arguments=["-c", "cp in.bin copy.bin && sha256sum in.bin"],
        input_staging=[{"source": "client://" + big, "target": "in.bin"}],
        output_staging=[{"source": "copy.bin", "target": "client://%s/out_%d.bin" % (tmp, i)}])
        for i in range(20)])
    slow = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep", arguments=["60"])])
    final = umgr.wait_units([u.uid for u in units], timeout=120)
    umgr.wait_units([slow[0].uid], state=states.EXECUTING, timeout=60)
    slow[0].cancel()
    slow_final = slow[0].wait(timeout=30)
    sandbox = pilot.sandbox
digest = hashlib.sha256(open(big, "rb").read()).hexdigest()
outs = [hashlib.sha256(open(os.path.join(tmp, "out_%d.bin" % i), "rb").read()).hexdigest()
        for i in range(20)]
t.kill()
print(json.dumps({"final": final, "slow": slow_final, "pilot": pilot.state,
                  "reason": pilot.reason, "same": outs == [digest] * 20, "ticks": ticks[0],
                  "stdout": units[0].stdout.split()[0] == digest, "sandbox": sandbox}))
"""


def test_the_core_case_in_a_monkey_patched_application(tmp_path):
    """patch_all() first, then an SSH pilot with client:// staging both ways, a cancel and the
    close: paramiko must stay on real threads (patched, its transport would be a greenlet of
    one lane thread's hub, and the others would cross hubs: InvalidThreadUseError)."""
    import json
    import sys

    fields = {k: v for k, v in pilot_desc(cores=2).as_dict().items() if v is not None}
    env = dict(os.environ, RPG_LOG_LEVEL="warning")
    r = subprocess.run([sys.executable, "-c", PATCHED_APP, json.dumps(fields), str(tmp_path)],
                       capture_output=True, text=True, timeout=150, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "InvalidThreadUseError" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["final"] == [states.DONE] * 20 and out["same"] and out["stdout"], out
    assert out["slow"] == states.CANCELED and out["pilot"] == states.DONE, out
    assert out["ticks"] > 20, out  # the application's loop ran meanwhile
    assert not remote_exists(out["sandbox"])


@pytest.mark.parametrize("where", ["absolute", "home"])
def test_the_remote_sandbox_honours_the_description(tmp_path, where):
    import uuid

    name = f"rpg-test-sandbox-{uuid.uuid4().hex[:8]}"
    home = remote_sh("cd && pwd -P").stdout.strip()
    root, wanted = ((str(tmp_path / name), str(tmp_path / name)) if where == "absolute"
                    else (f"~/{name}", f"{home}/{name}"))
    session, pilot, umgr = start(tmp_path, pilot_desc(sandbox=root))
    with session:
        [u] = umgr.submit_units([rpg.UnitDescription(executable="/bin/pwd")])
        assert umgr.wait_units(timeout=60) == [states.DONE], u.reason
        assert pilot.sandbox == f"{wanted}/{session.uid}/{pilot.uid}"
        assert u.stdout.strip() == f"{pilot.sandbox}/{u.uid}"
        mode = remote_sh(f"stat -c %a '{pilot.sandbox}'").stdout.strip()
        assert mode == "700", mode
    assert not remote_exists(pilot.sandbox)
    assert not remote_exists(f"{wanted}/{session.uid}")  # the session's level too, once empty
    remote_sh(f"rmdir '{wanted}'")


def test_staging_errors_fail_the_unit_with_a_reason(tmp_path):
    secret = tmp_path / "secret.txt"  # stands for a file outside the sandbox on the remote
    secret.write_text("not yours\n")
    session, pilot, umgr = start(tmp_path, pilot_desc())
    with session:
        missing, escape, optional = umgr.submit_units([
            rpg.UnitDescription(executable="/bin/true", input_staging=[
                {"source": f"client://{tmp_path}/nope.txt", "target": "in.txt"}]),
            rpg.UnitDescription(executable="/bin/ln", arguments=["-s", str(secret), "out.txt"],
                                output_staging=[{"source": "out.txt",
                                                 "target": f"client://{tmp_path}/stolen.txt"}]),
            rpg.UnitDescription(executable="/bin/true", output_staging=[
                {"source": "never_made.txt", "target": f"client://{tmp_path}/x.txt",
                 "flags": ["non_fatal"]}]),
        ])
        umgr.wait_units(timeout=60)
        assert missing.state == states.FAILED and "nope.txt" in missing.reason, missing.reason
        assert escape.state == states.FAILED and "escapes its sandbox" in escape.reason, \
            escape.reason
        assert not (tmp_path / "stolen.txt").exists()
        assert optional.state == states.DONE, optional.reason
        assert pilot.state == states.ACTIVE
    assert_nothing_left(session, pilot)


def test_keep_sandbox_and_pilot_staging(tmp_path):
    src = tmp_path / "shared.txt"
    src.write_text("shared input\n")
    session, pilot, umgr = start(tmp_path, pilot_desc(keep_sandbox=True))
    with session:
        u = umgr.submit_units(rpg.UnitDescription(
            executable="/bin/cat", arguments=["../shared.txt"],
            input_staging=[{"source": f"client://{src}", "target": "pilot://shared.txt"}]))
        assert umgr.wait_units(timeout=60) == [states.DONE], u.reason
        assert u.stdout == "shared input\n"
        sandbox = pilot.sandbox
    try:
        assert remote_exists(f"{sandbox}/shared.txt")
        assert_nothing_left(session, pilot)
    finally:
        remote_sh(f"rm -rf '{sandbox}' && rmdir \"$(dirname '{sandbox}')\"")


def test_pilot_runtime_end_is_done(tmp_path):
    # The agent exits 0 when its runtime ends; the launcher reads that through its exit-code file.
    session, pilot, _umgr = start(tmp_path, pilot_desc(runtime=0.05))
    with session:
        assert pilot.wait(timeout=60) == states.DONE, pilot.reason
        assert "runtime" in pilot.reason
    assert_nothing_left(session, pilot)


def test_cancel_pilot_kills_remote_units(tmp_path):
    session, pilot, umgr = start(tmp_path, pilot_desc(cores=2))
    with session:
        units = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep", arguments=["300"])
                                   for _ in range(3)])
        umgr.wait_units([u.uid for u in units[:2]], state=states.EXECUTING, timeout=60)
        t0 = time.monotonic()
        pilot.cancel()
        assert pilot.wait(timeout=60) == states.CANCELED
        assert umgr.wait_units(timeout=30) == [states.CANCELED] * 3
        assert all(u.reason for u in units)
        assert time.monotonic() - t0 < 20
        sandbox = pilot.sandbox
    assert_nothing_left(session, pilot)
    assert not remote_exists(sandbox)


def test_agent_killed_hard_units_swept(tmp_path):
    # SIGKILL the agent on the remote: its units (own process groups) are orphans now. The launcher
    # notices, the pilot ends FAILED with the reason, and the sweep kills the orphans.
    session, pilot, umgr = start(tmp_path, pilot_desc(cores=2))
    with session:
        units = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep", arguments=["300"])
                                   for _ in range(2)])
        umgr.wait_units(state=states.EXECUTING, timeout=60)
        assert pilot.pid
        r = remote_sh(f"kill -KILL {pilot.pid}")
        assert r.returncode == 0, r.stderr
        t0 = time.monotonic()
        assert pilot.wait(timeout=FAIL_FAST_S) == states.FAILED
        assert time.monotonic() - t0 < FAIL_FAST_S
        assert "without an exit code" in pilot.reason, pilot.reason
        assert umgr.wait_units(timeout=30) == [states.FAILED] * 2
        assert all(pilot.uid in u.reason for u in units)
    assert_nothing_left(session, pilot)
    assert not remote_exists(pilot.sandbox)


@pytest.mark.parametrize("delay", [0.0, 0.4, 0.9, 1.5])
def test_cancel_during_bootstrap_leaves_nothing(tmp_path, delay):
    # Cancel lands somewhere in connect / sandbox / upload / start / calling in. (It waits for
    # LAUNCHING first: a cancel before the pilot's lifecycle has started is a hub matter.)
    src = tmp_path / "in.txt"
    src.write_text("x\n")
    session, pilot, umgr = start(tmp_path, pilot_desc())
    with session:
        units = umgr.submit_units([rpg.UnitDescription(
            executable="/bin/sleep", arguments=["300"],
            input_staging=[{"source": f"client://{src}", "target": "in.txt"}])
            for _ in range(3)])
        assert pilot.wait(state=states.LAUNCHING, timeout=30) in (
            states.LAUNCHING, states.PENDING, states.ACTIVE)
        time.sleep(delay)
        pilot.cancel()
        assert pilot.wait(timeout=FAIL_FAST_S) == states.CANCELED, pilot.reason
        final = umgr.wait_units(timeout=30)
        assert all(s in (states.CANCELED, states.FAILED) for s in final), final
        assert all(u.reason for u in units)
    assert_nothing_left(session, pilot)
    if pilot.sandbox and not pilot.sandbox.startswith(session.sandbox):
        assert not remote_exists(pilot.sandbox)
    r = remote_sh(f"ls -d ~/rpg/{session.uid} 2>/dev/null || true")
    assert not r.stdout.strip(), f"left on the remote: {r.stdout}"


# -- host keys -------------------------------------------------------------------------------------

def test_unknown_host_key_refused_by_default(tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    t0 = time.monotonic()
    session, pilot, _umgr = start(tmp_path, pilot_desc(ssh_known_hosts=str(empty)))
    with session:
        assert pilot.wait(timeout=FAIL_FAST_S) == states.FAILED
        assert time.monotonic() - t0 < FAIL_FAST_S
        assert "host key" in pilot.reason and "SHA256:" in pilot.reason, pilot.reason
        assert "ssh_trust_unknown_host" in pilot.reason


def test_unknown_host_key_accepted_only_when_trusted(tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    session, _pilot, umgr = start(tmp_path, pilot_desc(ssh_known_hosts=str(empty),
                                                     ssh_trust_unknown_host=True))
    with session:
        u = umgr.submit_units(rpg.UnitDescription(executable="/bin/echo", arguments=["ok"]))
        assert umgr.wait_units(timeout=60) == [states.DONE], u.reason
        assert u.stdout == "ok\n"
    assert empty.read_text() == "", "a trusted unknown key must not be written to known_hosts"


def test_missing_known_hosts_file_is_refused(tmp_path):
    session, pilot, _umgr = start(tmp_path, pilot_desc(ssh_known_hosts=str(tmp_path / "nope")))
    with session:
        assert pilot.wait(timeout=FAIL_FAST_S) == states.FAILED
        assert "does not exist" in pilot.reason and "host key" in pilot.reason, pilot.reason


# -- failures end the pilot fast, with a reason ---------------------------------------------------

def _fails_fast(tmp_path, desc, *needles):
    t0 = time.monotonic()
    session, pilot, umgr = start(tmp_path, desc)
    with session:
        u = umgr.submit_units(rpg.UnitDescription(executable="/bin/true"))
        assert pilot.wait(timeout=FAIL_FAST_S + 10) == states.FAILED
        took = time.monotonic() - t0
        assert took < FAIL_FAST_S, f"took {took:.1f} s"
        for needle in needles:
            assert needle in pilot.reason, pilot.reason
        assert umgr.wait_units(timeout=10) == [states.FAILED]
        assert u.reason
    return session, pilot


def test_bad_key(tmp_path):
    key = tmp_path / "not_authorized"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    _fails_fast(tmp_path, pilot_desc(ssh_key_file=str(key)), "authentication failed", str(key))


def test_wrong_port(tmp_path):
    port = free_port()
    _fails_fast(tmp_path, pilot_desc(resource=resource(port)), "cannot connect", str(port))


def test_remote_without_python(tmp_path):
    _fails_fast(tmp_path, pilot_desc(remote_python="/nonexistent/python3"),
                "/nonexistent/python3", "not found")


def test_bad_sandbox_path(tmp_path):
    _fails_fast(tmp_path, pilot_desc(sandbox="/proc/rpg-cannot-be-here"),
                "cannot create the remote pilot sandbox", "/proc/rpg-cannot-be-here")


def test_remote_python_without_the_agent_dependencies(tmp_path):
    python = "/usr/bin/python3"
    check = remote_sh(f"{python} -c 'import gevent, zerorpc'")
    if check.returncode == 0 or "No module named" not in check.stderr:
        pytest.skip(f"{python} on the test host has gevent/zerorpc (or is missing)")
    session, pilot = _fails_fast(tmp_path, pilot_desc(remote_python=python, remote_env="none"),
                                 "agent ended before calling in", "No module named",
                                 "exit code 1")
    assert "killed" not in pilot.reason, pilot.reason
    assert_nothing_left(session, pilot)
    assert not remote_exists(pilot.sandbox)


# -- a dropped connection ------------------------------------------------------------------------

def test_connection_killed_mid_run(tmp_path):
    port = int(ssh_env()["RPG_SSH_PORT"])
    src = tmp_path / "in.txt"
    src.write_text("payload\n")
    session, pilot, umgr = start(tmp_path, pilot_desc(cores=4, heartbeat_timeout=30.0))
    with session:
        units = umgr.submit_units([rpg.UnitDescription(
            executable="/bin/sh", arguments=["-c", "sleep 4; cat in.txt > out.txt"],
            input_staging=[{"source": f"client://{src}", "target": "in.txt"}],
            output_staging=[{"source": "out.txt", "target": f"client://{tmp_path}/out_{i}.txt"}])
            for i in range(8)])
        umgr.wait_units([u.uid for u in units[:4]], state=states.EXECUTING, timeout=60)
        killed = kill_ssh_sessions_of_this_process(port)
        assert killed, "found no sshd process serving the pilot's connection"
        t_kill = time.monotonic()
        final = umgr.wait_units(timeout=90)
        assert all(s in states.FINAL for s in final), final
        lost = [(u.uid, u.state) for u in units if u.state != states.DONE and not u.reason]
        assert not lost, f"units ended without a reason: {lost}"
        done = [u for u in units if u.state == states.DONE]
        # The agent kept its units running and the launcher reconnected: they all finish.
        assert len(done) == 8, [(u.uid, u.state, u.reason) for u in units]
        outs = sorted(tmp_path.glob("out_*.txt"))
        assert len(outs) == 8 and all(p.read_text() == "payload\n" for p in outs)
        assert pilot.state == states.ACTIVE, pilot.reason
        assert session.hub.pilots[pilot.uid].launcher.reconnects >= 1
        print(f"recovered {time.monotonic() - t_kill:.1f} s after the kill of sshd {killed}")
        sandbox = pilot.sandbox
    assert_nothing_left(session, pilot)
    assert not remote_exists(sandbox)


def _ssh_connections(port: int) -> int:
    """This process's established TCP connections to the sshd."""
    import psutil

    return sum(1 for c in psutil.Process().net_connections(kind="tcp")
               if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def test_pilots_on_one_host_share_one_connection_through_a_reconnect_and_a_cancel(tmp_path):
    port = int(ssh_env()["RPG_SSH_PORT"])
    base = _ssh_connections(port)
    with rpg.Session(sandbox=str(tmp_path / "session")) as session:
        pmgr = rpg.PilotManager(session)
        pilots = pmgr.submit_pilots([pilot_desc(cores=2, heartbeat_timeout=30.0)
                                     for _ in range(3)])
        umgrs = []
        for p in pilots:
            umgr = rpg.UnitManager(session)
            umgr.add_pilots(p)
            umgrs.append(umgr)
        for p in pilots:
            assert p.wait(state=states.ACTIVE, timeout=60) == states.ACTIVE, p.reason
        assert _ssh_connections(port) - base == 1  # three pilots, one connection
        hosts = list(session.hub.shared["ssh_hosts"].values())
        assert len(hosts) == 1 and hosts[0].users == 3 and hosts[0].connects == 1
        units = [um.submit_units([rpg.UnitDescription(executable="/bin/sh",
                                                      arguments=["-c", "sleep 3; echo ok"])
                                  for _ in range(2)]) for um in umgrs]
        for um, us in zip(umgrs, units, strict=True):
            um.wait_units([u.uid for u in us], state=states.EXECUTING, timeout=60)
        assert kill_ssh_sessions_of_this_process(port)  # one kill drops all three pilots' way
        for um in umgrs:
            assert um.wait_units(timeout=90) == [states.DONE] * 2
        assert hosts[0].connects == 2, hosts[0].connects  # one reconnect served them all
        assert all(p.state == states.ACTIVE for p in pilots), [p.reason for p in pilots]
        pilots[0].cancel()  # its forward goes; the others keep theirs and the connection
        assert pilots[0].wait(timeout=30) == states.CANCELED
        assert hosts[0].users == 2
        more = [um.submit_units([rpg.UnitDescription(executable="/bin/echo", arguments=["x"])
                                 for _ in range(3)]) for um in umgrs[1:]]
        for um in umgrs[1:]:
            assert um.wait_units(timeout=60) == [states.DONE] * 5
        assert all(u.stdout.strip() == "x" for us in more for u in us)
        assert _ssh_connections(port) - base == 1
        sandboxes = [p.sandbox for p in pilots]
    assert hosts[0].users == 0 and hosts[0].conn is None
    deadline = time.monotonic() + 10
    while _ssh_connections(port) > base and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ssh_connections(port) == base
    for p, sb in zip(pilots, sandboxes, strict=True):
        assert_nothing_left(session, p)
        assert not remote_exists(sb)


def test_slow_bootstraps_do_not_hold_back_a_running_pilot_on_the_same_host(tmp_path):
    """Bootstraps (an environment build, or the wait for one) run in a lane of their own: the
    status checks and stops of pilots already running on the host never queue behind them."""
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nsleep 12\nexec python3 \"$@\"\n")
    slow.chmod(0o755)
    with rpg.Session(sandbox=str(tmp_path / "session")) as session:
        pmgr = rpg.PilotManager(session)
        a = pmgr.submit_pilots(pilot_desc(cores=1, heartbeat_timeout=8.0))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(a)
        assert a.wait(state=states.ACTIVE, timeout=60) == states.ACTIVE, a.reason
        [u] = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep",
                                                     arguments=["6"])])
        slow_pilots = pmgr.submit_pilots([pilot_desc(cores=1, remote_python=str(slow))
                                          for _ in range(4)])
        launcher = session.hub.pilots[a.uid].launcher
        deadline = time.monotonic() + 20
        while session.hub.call(lambda: launcher.boot.health()["running"]) < 4:
            assert time.monotonic() < deadline, "the slow bootstraps did not start"
            time.sleep(0.1)
        t0 = time.monotonic()
        state, _code, _err = session.hub.call(lambda: launcher.ctl.run(launcher._b_status,
                                                                       timeout=30))
        took = time.monotonic() - t0
        assert state == "alive" and took < 5, (state, took)  # not behind 4 x 12 s
        assert u.wait(timeout=30) == states.DONE, u.reason
        assert a.state == states.ACTIVE, a.reason
        a.cancel()  # a stop goes through at once, too
        assert a.wait(timeout=20) == states.CANCELED
        for p in slow_pilots:
            assert p.wait(state=states.ACTIVE, timeout=60) == states.ACTIVE, p.reason


def test_connection_frozen_ends_the_pilot_with_a_reason(tmp_path):
    # The sshd serving the pilot stops answering (SIGSTOP): the TCP connection stays up and the
    # old session keeps the forwarded port. The launcher notices (status check times out),
    # reconnects, cannot get the agent's port back, and ends the pilot FAILED with a reason; the
    # agent meanwhile loses the hub and cancels its units. Nothing is left behind.
    port = int(ssh_env()["RPG_SSH_PORT"])
    session, pilot, umgr = start(tmp_path, pilot_desc(cores=2, heartbeat_timeout=8.0))
    stopped: list[int] = []
    try:
        with session:
            units = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep",
                                                           arguments=["300"]) for _ in range(2)])
            umgr.wait_units(state=states.EXECUTING, timeout=60)
            stopped = kill_ssh_sessions_of_this_process(port, signal.SIGSTOP)
            assert stopped, "found no sshd process serving the pilot's connection"
            t0 = time.monotonic()
            assert pilot.wait(timeout=60) == states.FAILED
            took = time.monotonic() - t0
            assert took < 40, f"noticed after {took:.1f} s"
            assert "ssh connection" in pilot.reason and "lost" in pilot.reason, pilot.reason
            assert umgr.wait_units(timeout=30) == [states.FAILED] * 2
            assert all(u.reason for u in units)
            print(f"pilot FAILED {took:.1f} s after the freeze: {pilot.reason}")
    finally:
        for pid in stopped:  # the frozen sshd session: end it (it is ours)
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
    assert_nothing_left(session, pilot)
