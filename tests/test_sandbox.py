"""The pilot sandbox and the agent's secrets, against a careless or hostile local user: planted
links, a world-writable or shared sandbox, ``~`` in the path, units that look for the token,
and a unit daemon that clears its environment to escape the sweep at pilot end."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import uuid

import psutil
import pytest
from sshd_fixture import pilot_desc, requires_sshd

import rpg

# Run by a unit: can it find the token (in $PROBE) in agent.json, agent.token, anywhere in the
# pilot sandbox tree, or in its environment (other than in PROBE itself)?
LOOK_FOR_TOKEN = (
    'cat "$RPG_PILOT_SANDBOX/agent.json" "$RPG_PILOT_SANDBOX/agent.token" 2>/dev/null'
    ' | grep -cF -e "$PROBE"\n'
    'grep -rlF -e "$PROBE" "$RPG_PILOT_SANDBOX"; echo "tree=$?"\n'
    'env | grep -v "^PROBE=" | grep -cF -e "$PROBE"\n'
    "exit 0\n")


def run_pilot(session, **kw):
    pmgr = rpg.PilotManager(session)
    pilot = pmgr.submit_pilots(rpg.PilotDescription(cores=1, runtime=5, **kw))
    umgr = rpg.UnitManager(session)
    umgr.add_pilots(pilot)
    return pilot, umgr


def token_of(session, pilot) -> str:
    return session.hub.call(lambda: session.hub.pilots[pilot.uid].token)


# -- a sandbox that is not ours alone is refused ---------------------------------------------

@pytest.mark.parametrize("name", ["agent.json", "agent.token"])
def test_link_planted_in_a_world_writable_sandbox_fails_the_pilot_and_its_target_is_untouched(
        tmp_path, name):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # pre-existing, predictable, anyone may plant things in it
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (shared / name).symlink_to(victim)
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pilot, _ = run_pilot(session, sandbox=str(shared))
        assert pilot.wait(timeout=20) == "FAILED"
    print(f"\npilot FAILED: {pilot.reason}")
    assert str(shared) in pilot.reason and "writable by group and others" in pilot.reason
    assert victim.read_text() == "precious\n"
    assert sorted(os.listdir(shared)) == [name] and (shared / name).is_symlink()


def test_world_writable_linked_or_foreign_sandbox_is_refused(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    group_dir = tmp_path / "group"
    group_dir.mkdir()
    group_dir.chmod(0o770)
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)  # nobody's (the tests run as root)
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pilots = {what: run_pilot(session, sandbox=str(path))[0] for what, path in
                  [("open", open_dir), ("group", group_dir), ("link", link),
                   ("foreign", foreign)]}
        for p in pilots.values():
            assert p.wait(timeout=20) == "FAILED"
    for what, p in pilots.items():
        print(f"\n{what}: {p.reason}")
    assert f"{open_dir} is writable by group and others (mode 0777)" in pilots["open"].reason
    assert f"{group_dir} is writable by group (mode 0770)" in pilots["group"].reason
    assert f"{link} is a symbolic link" in pilots["link"].reason
    assert f"{foreign} is owned by uid 65534" in pilots["foreign"].reason
    for d in (open_dir, group_dir, real, foreign):
        assert os.listdir(d) == []


def test_a_fresh_pilot_sandbox_is_private_and_holds_no_token(tmp_path):
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pilot, umgr = run_pilot(session)
        assert pilot.wait(state="ACTIVE", timeout=30) == "ACTIVE", pilot.reason
        token = token_of(session, pilot)
        sb = tmp_path / "s" / pilot.uid
        assert stat.S_IMODE(sb.stat().st_mode) == 0o700
        for name in ("agent.json", "agent.out", "agent.err"):
            assert stat.S_IMODE((sb / name).stat().st_mode) == 0o600, name
        assert not (sb / "agent.token").exists()  # read and deleted by the agent
        assert token not in (sb / "agent.json").read_text()


# -- units cannot find the agent's token ----------------------------------------------------------

def _unit_finds_no_token(session, pilot, umgr) -> None:
    assert pilot.wait(state="ACTIVE", timeout=60) == "ACTIVE", pilot.reason
    token = token_of(session, pilot)
    u = umgr.submit_units(rpg.UnitDescription(executable="/bin/sh",
                                              arguments=["-c", LOOK_FOR_TOKEN],
                                              environment={"PROBE": token}))
    assert u.wait(timeout=60) == "DONE", u.reason
    print(f"\nunit looking for the token: {u.stdout!r}")
    assert token not in u.stdout
    assert u.stdout.split() == ["0", "tree=1", "0"]


def test_a_unit_cannot_read_the_agent_token(tmp_path):
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pilot, umgr = run_pilot(session)
        _unit_finds_no_token(session, pilot, umgr)
        token = token_of(session, pilot).encode()
        agent = session.hub.call(lambda: session.hub.pilots[pilot.uid].launcher.child.pid)
        for what in ("cmdline", "environ"):
            with open(f"/proc/{agent}/{what}", "rb") as fh:
                assert token not in fh.read(), f"the token is in the agent's {what}"
    for root, _dirs, files in os.walk(tmp_path / "s"):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                assert token not in fh.read(), f"the token is in {f}"


@requires_sshd
@pytest.mark.timeout(120)
def test_a_unit_on_an_ssh_pilot_cannot_read_the_agent_token(tmp_path):
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(pilot_desc(sandbox=str(tmp_path / "remote")))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        _unit_finds_no_token(session, pilot, umgr)
        sb = pilot.sandbox
        assert stat.S_IMODE(os.stat(sb).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(os.path.join(sb, "agent.json")).st_mode) == 0o600
        assert not os.path.exists(os.path.join(sb, "agent.token"))


@requires_sshd
@pytest.mark.timeout(120)
def test_an_ssh_pilot_refuses_a_world_writable_remote_sandbox(tmp_path):
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        # The remote sandbox is <sandbox>/<session uid>/<pilot uid>, and uids are predictable:
        # plant the first few beforehand.
        for i in range(20):
            planted = tmp_path / "remote" / session.uid / f"pilot.{i:06d}"
            planted.mkdir(parents=True)
            planted.chmod(0o777)
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(pilot_desc(sandbox=str(tmp_path / "remote")))
        assert pilot.wait(timeout=60) == "FAILED"
    planted = tmp_path / "remote" / session.uid / pilot.uid
    print(f"\nssh pilot FAILED: {pilot.reason}")
    assert f"{planted} is writable by group or others" in pilot.reason
    assert os.listdir(planted) == []


# -- where the sandbox is -------------------------------------------------------------------------

def test_a_sandbox_under_home_with_a_tilde(tmp_path):
    name = f"rpg-test-{uuid.uuid4().hex[:8]}"
    where = os.path.join(os.path.expanduser("~"), name)
    try:
        with rpg.Session(sandbox=str(tmp_path / "s")) as session:
            pilot, umgr = run_pilot(session, sandbox=f"~/{name}")
            u = umgr.submit_units(rpg.UnitDescription(executable="/bin/pwd"))
            assert u.wait(timeout=30) == "DONE", f"{u.reason}; pilot: {pilot.reason}"
        assert pilot.sandbox == where
        assert u.stdout.strip().startswith(where + "/")
        assert os.path.isfile(os.path.join(where, "agent.json"))
        assert not os.path.exists(os.path.join(os.getcwd(), "~"))
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_a_second_pilot_in_a_sandbox_already_in_use_fails_with_a_reason(tmp_path):
    shared = str(tmp_path / "shared")
    with rpg.Session(sandbox=str(tmp_path / "a")) as a, \
            rpg.Session(sandbox=str(tmp_path / "b")) as b:
        first, umgr = run_pilot(a, sandbox=shared)
        assert first.wait(state="ACTIVE", timeout=30) == "ACTIVE", first.reason
        second, _ = run_pilot(b, sandbox=shared)  # the same uid, pilot.000000, in session b
        assert second.wait(timeout=20) == "FAILED"
        u = umgr.submit_units(rpg.UnitDescription(executable="/bin/echo", arguments=["ok"]))
        assert u.wait(timeout=30) == "DONE", u.reason  # the first pilot is unharmed
        assert first.state == "ACTIVE"
    print(f"\nsecond pilot FAILED: {second.reason}")
    assert f"{shared} already holds agent.json" in second.reason
    assert f"of pilot {first.uid} of session {a.uid}" in second.reason


# -- the sweep at pilot end ------------------------------------------------------------------------

def test_a_setsid_daemon_with_a_cleared_environment_is_killed_at_pilot_end(tmp_path):
    daemons: list[psutil.Process] = []
    bystander = None
    try:
        with rpg.Session(sandbox=str(tmp_path / "s")) as session:
            pilot, umgr = run_pilot(session)
            # The daemon says its pid, then becomes the sleep (exec keeps the pid); the unit
            # waits for that (when it exits, whatever is left in its process group is killed).
            daemon = "echo $$ > daemon.pid; exec sleep 307"
            script = (f"env -i setsid sh -c '{daemon}' </dev/null >/dev/null 2>&1 &\n"
                      "while [ ! -s daemon.pid ]; do sleep 0.05; done; sleep 0.2")
            u = umgr.submit_units(rpg.UnitDescription(executable="/bin/sh",
                                                      arguments=["-c", script], timeout=20))
            assert u.wait(timeout=30) == "DONE", u.reason
            with open(os.path.join(u.sandbox, "daemon.pid")) as fh:
                daemons = [psutil.Process(int(fh.read()))]
            assert daemons[0].cmdline() == ["sleep", "307"]
            assert "RPG_PILOT_KEY" not in daemons[0].environ()  # nothing to find it by
            assert daemons[0].cwd() == u.sandbox
            # Not a unit's: in the pilot sandbox itself (which could be a shared place, ~ say),
            # no marker, no terminal. The sweep leaves it alone.
            bystander = subprocess.Popen(["sleep", "311"], cwd=pilot.sandbox, env={},
                                         start_new_session=True)
        gone, alive = psutil.wait_procs(daemons, timeout=5)
        print(f"\ndaemon {daemons[0].pid}: {'killed' if gone else 'still running'}")
        assert alive == [], "the env -i setsid daemon outlived its pilot"
        assert bystander.poll() is None, "a process outside the unit sandboxes was killed"
    finally:
        for p in daemons:
            try:
                p.kill()
            except psutil.Error:
                pass
        if bystander is not None:
            bystander.kill()
            bystander.wait()
