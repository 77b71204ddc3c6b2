"""``Unit.follow``: a running unit's output as it is written, from the embedded session, from a
client of a real ``rpg hub serve``, and over SFTP from an SSH pilot; bad names refused."""

from __future__ import annotations

import time

import pytest
from sshd_fixture import pilot_desc, requires_sshd

import rpg
from rpg import states

WRITER = ("i=1; while [ $i -le 100 ]; do echo line $i; i=$((i+1)); sleep 0.02; done; "
          "echo done > side.txt")
EXPECTED = "".join(f"line {i}\n" for i in range(1, 101))


def follow_and_check(session, pilot):
    umgr = rpg.UnitManager(session)
    umgr.add_pilots(pilot)
    [u] = umgr.submit_units([rpg.UnitDescription(executable="/bin/sh", arguments=["-c", WRITER])])
    got, arrivals = [], []
    for chunk in u.follow(poll=0.05, timeout=60):
        got.append(chunk)
        arrivals.append((time.monotonic(), u.state))
    text = b"".join(got).decode()
    assert text == EXPECTED  # every line, in order, once
    assert u.wait(timeout=10) == states.DONE
    # it came while the unit ran, in several pieces, not all at the end
    during = [st for _, st in arrivals if st not in states.FINAL]
    assert len(arrivals) >= 3 and len(during) >= 2, arrivals
    assert b"".join(u.follow("side.txt", timeout=10)) == b"done\n"  # any sandbox file
    return u


def test_follow_a_unit_of_the_embedded_session(tmp_path):
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pilot = rpg.PilotManager(session).submit_pilots(
            rpg.PilotDescription(resource="local", cores=1))
        follow_and_check(session, pilot)


def test_follow_from_a_client_of_the_hub_service(hub_service):
    with rpg.Session(hub=hub_service.access_path) as session:
        pilot = rpg.PilotManager(session).submit_pilots(
            rpg.PilotDescription(resource="local", cores=1))
        u = follow_and_check(session, pilot)
        with pytest.raises(ValueError, match="leaves the unit sandbox"):
            next(u.follow("../../../etc/passwd"))


@requires_sshd
def test_follow_a_unit_on_an_ssh_pilot(tmp_path):
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pilot = rpg.PilotManager(session).submit_pilots(pilot_desc(cores=1))
        follow_and_check(session, pilot)


def test_bad_names_and_links_are_refused(tmp_path):
    with rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pilot = rpg.PilotManager(session).submit_pilots(
            rpg.PilotDescription(resource="local", cores=1))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        [u] = umgr.submit_units([rpg.UnitDescription(
            executable="/bin/sh", arguments=["-c", "ln -s /etc/passwd link; echo x"])])
        assert u.wait(timeout=30) == states.DONE
        for name, words in (("/etc/passwd", "must be relative"), ("../x", "leaves the unit"),
                            ("link", "symbolic link"), (".", "leaves the unit")):
            with pytest.raises(ValueError, match=words):
                next(u.follow(name))
        assert list(u.follow("never-written.txt")) == []  # the unit ended: nothing, at once
        [waiting] = rpg.UnitManager(session).submit_units(
            [rpg.UnitDescription(executable="/bin/true")])  # no pilot: unbound
        assert list(waiting.follow(timeout=0.5)) == []
        waiting.cancel()
