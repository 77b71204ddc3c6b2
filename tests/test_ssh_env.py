"""SSH pilots that bring their own environment (the real sshd of ``.ci/sshd.sh``): a remote
python with none of rpg's packages gets a virtual environment built once and reused, two
pilots bootstrapping at once share one build, a pip failure fails the pilot with pip's words,
wheels uploaded for a host without an index, and an agent that cannot start says why."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from sshd_fixture import pilot_desc, pilot_leftovers, remote_sh, requires_sshd

import rpg
from rpg import states
from rpg.hub.launchers.ssh import environment

pytestmark = [requires_sshd, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A virtualenv with none of rpg's packages: the python of a fresh cluster login."""
    d = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(d)], check=True)
    py = str(d / "bin" / "python")
    assert subprocess.run([py, "-c", "import gevent"], capture_output=True).returncode != 0
    return py


def nothing_left(session, pilot):
    deadline = time.monotonic() + 10
    while (left := pilot_leftovers(session.uid, pilot.uid, pilot.sandbox)) and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left
    assert remote_sh(f"test -e '{pilot.sandbox}'").returncode != 0, "sandbox left behind"


def active_after(pilot, t0):
    assert pilot.wait(states.ACTIVE, timeout=300) == states.ACTIVE, pilot.reason
    return time.monotonic() - t0


def test_a_bare_python_gets_an_environment_built_once_and_reused(tmp_path, bare):
    cache = str(tmp_path / "envcache")
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    with rpg.Session(sandbox=str(tmp_path / "s")) as s:
        pmgr = rpg.PilotManager(s)
        t0 = time.monotonic()
        # two pilots bootstrapping at once: one builds, the other waits for it
        cold = pmgr.submit_pilots([pilot_desc(remote_python=bare, remote_env_cache=cache)
                                   for _ in range(2)])
        cold_s = [active_after(p, t0) for p in cold]
        umgr = rpg.UnitManager(s)
        umgr.add_pilots(cold)
        units = umgr.submit_units([rpg.UnitDescription(
            executable="/bin/sh", arguments=["-c", f"cat in.txt > out.txt; echo {i} >> out.txt"],
            input_staging=[{"source": f"client://{src}", "target": "in.txt"}],
            output_staging=[{"source": "out.txt",
                             "target": f"client://{tmp_path}/out/{i}.txt"}])
            for i in range(40)])
        assert umgr.wait_units(timeout=120) == [states.DONE] * 40, \
            [u.reason for u in units if u.state != states.DONE][:3]
        for i in range(40):
            assert (tmp_path / "out" / f"{i}.txt").read_text() == f"hello\n{i}\n"
        t1 = time.monotonic()
        warm = pmgr.submit_pilots(pilot_desc(remote_python=bare, remote_env_cache=cache))
        warm_s = active_after(warm, t1)
        t2 = time.monotonic()
        today = pmgr.submit_pilots(pilot_desc(remote_python=sys.executable, remote_env="none"))
        today_s = active_after(today, t2)
        builds = open(os.path.join(cache, "env-builds.log")).read().splitlines()
        envs = [n for n in os.listdir(cache) if n.startswith("env-") and not n.endswith(
            (".lock", ".log"))]
        print(f"\ntime to ACTIVE: cold {cold_s[0]:.1f} s and {cold_s[1]:.1f} s (one build), "
              f"warm {warm_s:.2f} s, remote_env='none' with a full python {today_s:.2f} s")
        assert len(builds) == 1, builds
        assert envs == [f"env-{environment.env_key(environment.pins())}-py"
                        f"{sys.version_info[0]}{sys.version_info[1]}"]
        pmgr.cancel_pilots()
        pmgr.wait_pilots(timeout=60)
    for p in (*cold, warm, today):
        nothing_left(s, p)


def test_a_pip_failure_fails_the_pilot_with_pips_words(tmp_path, bare):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "nothing_useful-1.0-py3-none-any.whl").write_bytes(b"not a wheel")
    with rpg.Session(sandbox=str(tmp_path / "s")) as s:
        pilot = rpg.PilotManager(s).submit_pilots(pilot_desc(
            remote_python=bare, remote_env_cache=str(tmp_path / "envcache"),
            remote_env_wheels=str(wheels)))
        assert pilot.wait(timeout=120) == states.FAILED
        assert "pip install of the agent's packages" in pilot.reason, pilot.reason
        assert "No matching distribution found for" in pilot.reason, pilot.reason
    nothing_left(s, pilot)
    assert not [n for n in os.listdir(tmp_path / "envcache") if n.endswith("-py311")], \
        "a half-built environment was left"


def test_wheels_uploaded_for_a_host_without_an_index(tmp_path, bare):
    wheels = tmp_path / "wheels"
    pins = [f"{k}=={v}" for k, v in environment.pins().items()]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d",
                    str(wheels), *pins], check=True, timeout=300)
    with rpg.Session(sandbox=str(tmp_path / "s")) as s:
        pmgr = rpg.PilotManager(s)
        pilot = pmgr.submit_pilots(pilot_desc(
            remote_python=bare, remote_env_cache=str(tmp_path / "envcache"),
            remote_env_wheels=str(wheels)))
        active_after(pilot, time.monotonic())
        umgr = rpg.UnitManager(s)
        umgr.add_pilots(pilot)
        u = umgr.submit_units(rpg.UnitDescription(function=sum, args=([1, 2, 3],)))
        assert u.wait(timeout=60) == states.DONE and u.result == 6
    nothing_left(s, pilot)
    log = open(tmp_path / "envcache" / "env-builds.log").read()
    assert "built" in log


def test_use_mode_checks_the_python_and_none_says_why_the_agent_ended(tmp_path, bare):
    with rpg.Session(sandbox=str(tmp_path / "s")) as s:
        pmgr = rpg.PilotManager(s)
        use, none = pmgr.submit_pilots([pilot_desc(remote_python=bare, remote_env="use"),
                                        pilot_desc(remote_python=bare, remote_env="none")])
        assert use.wait(timeout=60) == states.FAILED
        assert "lacks what the agent needs: gevent missing" in use.reason, use.reason
        assert none.wait(timeout=60) == states.FAILED
        assert "exit code 1" in none.reason and "ModuleNotFoundError" in none.reason, \
            none.reason
        assert "killed" not in none.reason and "signal" not in none.reason, none.reason
    nothing_left(s, use)
    nothing_left(s, none)


def test_remote_env_fields_are_checked():
    with pytest.raises(rpg.DescriptionError, match="remote_env.*must be one of create, use"):
        rpg.PilotDescription(remote_env="sometimes")
    with pytest.raises(rpg.DescriptionError, match="remote_env_wheels.*absolute path"):
        rpg.PilotDescription(remote_env_wheels="wheels")
