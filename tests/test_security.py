"""Intruders and garbage: the hub's RPC checks tokens and validates every payload; secrets stay
out of logs and profiles; the hub stays on loopback unless told otherwise."""

from __future__ import annotations

import glob
import os
import time

import pytest
import structlog
import zerorpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rpg
from rpg import states
from rpg.hub.service import MAX_TEXT, UNIT_FIELDS


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One session with an ACTIVE local pilot and a few units, shared by this module."""
    d = tmp_path_factory.mktemp("sec")
    session = rpg.Session(sandbox=str(d / "s"))
    try:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(rpg.PilotDescription(cores=2, runtime=5))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        assert pilot.wait(state="ACTIVE", timeout=30) == "ACTIVE", pilot.reason
        yield session, pilot, umgr, Intruder(session.hub.address)
    finally:
        session.close()


class Intruder:
    """Calls the hub's zerorpc service from outside, a fresh connection per call (a zerorpc
    client left idle in a thread that runs no gevent loop loses its heartbeats)."""

    def __init__(self, address: str) -> None:
        self.address = address

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args):
            ctx = zerorpc.Context()  # its own, destroyed after: zerorpc's global one is forever
            c = zerorpc.Client(timeout=10, heartbeat=5, context=ctx)
            c.connect(self.address)
            try:
                return getattr(c, method)(*args)
            finally:
                c.close()
                ctx.destroy(linger=0)
        return call


def snapshot(session):
    hub = session.hub
    return hub.call(lambda: ({u: r.state for u, r in hub.units.items()},
                             {p: r.state for p, r in hub.pilots.items()}))


def rejected(session) -> int:
    return session.hub.service.counters["rejected"]


def test_wrong_or_missing_token_is_rejected_and_changes_nothing(live):
    session, pilot, umgr, client = live
    u = umgr.submit_units(rpg.UnitDescription(executable="/bin/sleep", arguments=["30"]))
    assert u.wait(state="EXECUTING", timeout=20) == "EXECUTING"
    before, r0 = snapshot(session), rejected(session)
    attempts = [
        ("register", (pilot.uid, "wrong-token", {"pid": 1})),
        ("register", (pilot.uid, "", {})),
        ("pull", (pilot.uid, "x" * 43, 10, 0)),
        ("pull", ("pilot.999999", "whatever", 10, 0)),
        ("push", (pilot.uid, None, [[u.uid, "DONE", time.time(), {}]])),
        ("push", (pilot.uid, "a" * 43, [[u.uid, "CANCELED", time.time(), {}]])),
    ]
    refused = 0
    for method, args in attempts:
        with pytest.raises(zerorpc.RemoteError, match="unknown pilot or bad token|must be"):
            getattr(client, method)(*args)
        refused += 1
    after = snapshot(session)
    counted = rejected(session) - r0
    print(f"\nbad-token calls refused = {refused}, counted by the hub = {counted}")
    assert counted == len(attempts)
    assert after == before
    assert u.state == "EXECUTING"
    u.cancel()
    assert u.wait(timeout=20) == "CANCELED"


I64 = st.integers(-(2**63), 2**63 - 1)  # what msgpack can carry at all

update = st.one_of(
    st.lists(st.one_of(st.none(), I64, st.text(max_size=40), st.floats(),
                       st.binary(max_size=20)), max_size=6),
    st.tuples(st.sampled_from(["unit.000001", "unit.999999", "", "pilot.000001"]),
              st.sampled_from(sorted(states.UNIT_STATES) + ["BOGUS", "", "NEW", "BOUND"]),
              st.one_of(st.floats(allow_nan=True), st.integers(-5, 5), st.text(max_size=5)),
              st.one_of(st.dictionaries(st.sampled_from(["exit_code", "stdout", "reason",
                                                         "secret", "x" * 300]),
                                        st.one_of(I64, st.text(max_size=2000),
                                                  st.none(), st.booleans()), max_size=3),
                        st.none(), I64)).map(list),
    st.text(max_size=100),
    I64,
    st.none(),
)


@settings(max_examples=250, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kind=st.sampled_from(["register", "pull", "push"]),
       payload=st.one_of(st.lists(update, max_size=20), st.text(max_size=2000),
                         st.dictionaries(st.text(max_size=8), I64, max_size=70),
                         I64, st.none(), st.binary(max_size=3000)),
       extra=st.one_of(st.integers(-3, 0), st.floats(max_value=0.01), st.text(max_size=5),
                       st.none()))
def test_malformed_messages_get_clear_errors_and_change_nothing(live, kind, payload, extra):
    session, pilot, umgr, client = live
    token = session.hub.call(lambda: session.hub.pilots[pilot.uid].token)
    try:
        if kind == "register":
            out = client.register(pilot.uid, token, payload)
        elif kind == "pull":
            out = client.pull(pilot.uid, token, payload, extra)
        else:
            out = client.push(pilot.uid, token, payload)
    except zerorpc.RemoteError as exc:
        assert exc.name in ("ProtocolError", "TypeError"), (exc.name, exc.msg)
        assert exc.msg
        return
    # Accepted calls must have been harmless: nothing of ours is in flight to be touched.
    if kind == "push":
        assert out["applied"] == 0
        assert len(out["errors"]) == len(payload)
        for _uid, why in out["errors"]:
            assert why
    elif kind == "pull":
        assert out["units"] == [] and out["cancel"] == []


LONG = "x" * (MAX_TEXT + 1)  # one character past what an update field may hold
field_value = st.one_of(st.none(), st.booleans(), I64, st.floats(), st.text(max_size=8),
                        st.sampled_from(["canceled", "agent", "bogus", LONG]),
                        st.lists(st.lists(st.one_of(st.sampled_from(["ok", "error"]),
                                                    st.binary(max_size=4), st.text(max_size=4),
                                                    st.floats()), max_size=4), max_size=2))
@st.composite
def agent_update(draw):
    """An update as the agent sends it for the unit in flight, most often with one part of it
    wrong: another unit, a state, a time, a field."""
    upd = ["mine", draw(st.sampled_from([states.STAGING_OUT, states.DONE, states.FAILED,
                                         states.CANCELED])), time.time(), {}]
    upd[3] = draw(st.dictionaries(st.sampled_from(sorted(UNIT_FIELDS)), field_value,
                                  max_size=3))
    part = draw(st.integers(0, 4))
    if part == 0:
        upd[0] = draw(st.sampled_from(["ended", "unit.999999", None, 7]))
    elif part == 1:
        upd[1] = draw(st.sampled_from(sorted(states.UNIT_STATES) + ["BOGUS", 3]))
    elif part == 2:
        upd[2] = draw(st.one_of(st.floats(allow_nan=True), st.integers(-2, 2), st.booleans()))
    elif part == 3:
        upd[3] = draw(st.one_of(st.dictionaries(st.sampled_from(["x", 1, "reason"]),
                                                field_value, min_size=1, max_size=2),
                                st.none(), I64))
    return upd


@pytest.fixture(scope="module")
def in_flight(live):
    """A unit of the live session running on its pilot (the updates below name it)."""
    session, pilot, umgr, _ = live
    u = umgr.submit_units(rpg.UnitDescription(executable="/bin/sleep", arguments=["60"]))
    assert u.wait(state="EXECUTING", timeout=20) == "EXECUTING"
    ended = umgr.submit_units(rpg.UnitDescription(executable="/bin/true"))
    assert ended.wait(timeout=20) == "DONE"
    yield u, ended
    u.cancel()
    assert u.wait(timeout=20) == "CANCELED"


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(upd=st.one_of(agent_update(), agent_update().map(lambda u: u[:3]), st.none()))
def test_the_hubs_quick_check_of_an_update_agrees_with_its_full_check(live, in_flight, upd):
    """HubService._valid_update takes a well-formed update without the checks that name the
    problem (rpg/hub/service.py); what it accepts, and how it refuses, must be theirs."""
    session, pilot, _, _ = live
    running, ended = in_flight
    if isinstance(upd, list) and upd and upd[0] in ("mine", "ended"):
        upd[0] = running.uid if upd[0] == "mine" else ended.uid
    svc = session.hub.service

    def outcome(check):
        p = svc._hub.pilots[pilot.uid]
        try:
            return "ok", check(p, list(upd) if isinstance(upd, list) else upd)
        except Exception as exc:
            return type(exc).__name__, str(exc)

    quick = session.hub.call(lambda: outcome(svc._valid_update))
    full = session.hub.call(lambda: outcome(svc._checked_update))
    assert quick == full
    assert running.state == "EXECUTING"  # checking changes nothing


def test_the_hub_survives_the_garbage_and_runs_normally(live):
    session, pilot, umgr, client = live
    units = umgr.submit_units([rpg.UnitDescription(executable="/bin/echo", arguments=[str(i)])
                               for i in range(20)])
    assert umgr.wait_units([u.uid for u in units], timeout=60) == ["DONE"] * 20
    assert [u.stdout for u in units] == [f"{i}\n" for i in range(20)]
    assert pilot.state == "ACTIVE"
    print(f"\nrejected hub calls/updates over this module: {rejected(session)}")


def test_secrets_never_reach_logs_or_profiles(tmp_path):
    with structlog.testing.capture_logs() as logs, \
            rpg.Session(sandbox=str(tmp_path / "s")) as session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(rpg.PilotDescription(cores=1, runtime=5))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        u = umgr.submit_units(rpg.UnitDescription(executable="/bin/true"))
        assert u.wait(timeout=30) == "DONE"
        token = session.hub.call(lambda: session.hub.pilots[pilot.uid].token)
        # An intruder's call is logged (rejected) without echoing what it sent.
        with pytest.raises(zerorpc.RemoteError):
            Intruder(session.hub.address).pull(pilot.uid, token[::-1], 1, 0)
    sandbox = tmp_path / "s"
    texts = {"logs": repr(logs), "profile": (sandbox / "profile.jsonl").read_text()}
    for name in glob.glob(str(sandbox / "*" / "agent.*")):
        if not name.endswith("agent.json"):  # the agent's config holds it, readable by owner only
            texts[os.path.basename(name)] = open(name, errors="replace").read()
    cfg = sandbox / pilot.uid / "agent.json"
    assert oct(cfg.stat().st_mode & 0o777) == "0o600"
    leaks = [k for k, v in texts.items() if token in v or token[::-1] in v]
    print(f"\nsecret leaks in {sorted(texts)}: {len(leaks)}")
    assert leaks == []
    assert any(e.get("event") == "rpc_rejected" for e in logs)


def test_hub_binds_loopback_and_warns_otherwise(tmp_path):
    with structlog.testing.capture_logs() as logs:
        with rpg.Session(sandbox=str(tmp_path / "a")) as s:
            assert s.hub_address.startswith("tcp://127.0.0.1:")
        quiet = [e for e in logs if e.get("event") == "hub_binds_non_loopback"]
        with rpg.Session(sandbox=str(tmp_path / "b"), hub_address="tcp://0.0.0.0:0") as s:
            assert s.hub_address.startswith("tcp://0.0.0.0:")
    warned = [e for e in logs if e.get("event") == "hub_binds_non_loopback"]
    print(f"\nnon-loopback bind warnings: {len(warned)}")
    assert quiet == [] and len(warned) == 1 and warned[0]["log_level"] == "warning"
    with pytest.raises(rpg.hub.hub.HubError, match="hub_address"):
        rpg.Session(sandbox=str(tmp_path / "c"), hub_address="udp://127.0.0.1:5")
