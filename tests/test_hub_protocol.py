"""The hub service's protocol under attack and abuse: real ``rpg hub serve`` processes, real
zerorpc over TCP on 127.0.0.1, real local pilots; no mocks.

Wrong and missing tokens, one user's calls on another user's session, revoked tokens, malformed
arguments, 1,000 fuzzed messages on one connection, the per-user unit limit and a message past
the hub's zmq MAXMSGSIZE: each refused with the right error class and a clear message, counted
in ``status()['refused']``, and nothing changed that a refused call could have changed.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import secrets
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator

import msgpack
import psutil
import pytest
import zerorpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import rpg
import rpg.client
from rpg.description import DescriptionError, PilotDescription, UnitDescription
from rpg.hub import front
from rpg.hub.front import Front
from rpg.hub.session_api import EVENTS_MAX
from rpg.rpc import no_zero_copy
from rpg.staging import relay
from tests.hub_fixture import HubProcess

TRUE = {"executable": "/bin/true"}
REFUSALS = ("Unauthorized", "ProtocolError", "LimitExceeded")  # what status() counts
# Every public method of Front is a protocol call (and what zerorpc must expose).
PUBLIC = sorted(n for n, f in vars(Front).items() if not n.startswith("_") and callable(f))
PARAMS = {n: list(inspect.signature(getattr(Front, n)).parameters)[1:] for n in PUBLIC}
STOP = next(n for n in PUBLIC if n.startswith("stop"))  # the owner's "stop the service" call


# -- helpers ---------------------------------------------------------------------------------------

@contextmanager
def raw_client(address: str, timeout: float = 10.0) -> Iterator[Any]:
    """A plain zerorpc client with a zmq context of its own (destroyed after: zerorpc's global
    one would keep its I/O thread forever); no heartbeat (it idles in a thread with no loop)."""
    ctx = zerorpc.Context()
    c = zerorpc.Client(context=ctx, timeout=timeout, heartbeat=None)
    no_zero_copy(c)  # no pyzmq garbage-collector thread for big messages
    c.connect(address)
    try:
        yield c
    finally:
        c.close()
        ctx.destroy(linger=0)


def refusal(c: Any, method: str, *args: Any) -> zerorpc.RemoteError:
    with pytest.raises(zerorpc.RemoteError) as info:
        c(method, *args)
    return info.value


def refused(c: Any, token: str) -> Counter:
    return Counter(c("status", token)["refused"])


def load(path: str) -> dict[str, Any]:
    with open(path) as fh:
        return json.load(fh)


def local_pilot(session: rpg.Session, cores: int = 1) -> tuple[Any, Any, Any]:
    pmgr = rpg.PilotManager(session)
    pilot = pmgr.submit_pilots(rpg.PilotDescription(resource="local", cores=cores))
    umgr = rpg.UnitManager(session)
    umgr.add_pilots(pilot)
    return pmgr, pilot, umgr


def usable(hub: HubProcess, name: str) -> str:
    """``rpg hub token`` for ``name``, and wait until the hub takes the new token: it rereads
    users.json every USERS_RELOAD_S (0.5 s), and a token used before then is unknown."""
    path = hub.token_for(name)
    token = load(path)["token"]
    with raw_client(hub.access["address"]) as c:
        deadline = time.monotonic() + 5.0
        while True:
            try:
                assert c("hello", token)["user"] == name
                return path
            except zerorpc.RemoteError as exc:
                assert exc.name == "Unauthorized" and time.monotonic() < deadline, exc.msg
                time.sleep(0.02)


def trues(n: int) -> list[rpg.UnitDescription]:
    return [rpg.UnitDescription(executable="/bin/true") for _ in range(n)]


def test_every_public_front_method_is_a_zerorpc_call(hub_service):
    """zerorpc hides a method whose name is one of its ServerBase's (close, run, stop): each of
    Front's public methods must be reachable, and nothing else of Front's."""
    with raw_client(hub_service.access["address"]) as c:
        exposed = sorted(m for m in c("_zerorpc_list") if not m.startswith("_zerorpc"))
    assert exposed == PUBLIC


# -- 1. tokens -------------------------------------------------------------------------------------

MISSING = [None, "", 12, "x" * 10240, "y" * 257, 3.5, True, b"bytes", ["tok"], {"token": "t"}]


def test_wrong_and_missing_tokens_are_refused_clearly_and_counted(hub_service):
    hub, tok = hub_service, hub_service.access["token"]
    wrong = [secrets.token_urlsafe(32), tok[::-1], tok + "x", tok[:-1], tok.upper(), "t" * 256]
    with raw_client(hub.access["address"]) as c:
        session = c("open_session", tok, {}, "t1-open")["uid"]
        before = refused(c, tok)
        calls = [("hello", ()), ("open_session", ({}, "t1-rid")), ("status", ()),
                 ("events", (session, 0, 10, 0.0)), ("list_sessions", ()), (STOP, ()),
                 ("snapshot", (session,)), ("attach", (session,))]
        n = 0
        for token in MISSING + wrong:
            for method, args in calls:
                exc = refusal(c, method, token, *args)
                assert exc.name == "Unauthorized", (method, token, exc.name, exc.msg)
                if token in wrong:
                    assert exc.msg == "unknown token (wrong, or revoked)", exc.msg
                    assert token not in exc.msg
                elif isinstance(token, str) and len(token) > 256:
                    assert exc.msg.startswith("the token must be a string of 1-256 "
                                              "characters"), exc.msg
                else:
                    assert "a token is required" in exc.msg and "rpg hub token" in exc.msg
                assert len(exc.msg) < 200
                n += 1
        after = refused(c, tok)
        assert after["token"] - before["token"] == n == 16 * len(calls)
        assert after - Counter(token=after["token"]) == before - Counter(token=before["token"])
        st_ = c("status", tok)
        assert [s["uid"] for s in st_["sessions"]] == [session]  # no session was opened
        assert st_["sessions"][0]["closed"] is False
        assert c("hello", tok)["user"] == hub.access["user"]
        c("close_session", tok, session, 5.0)
    log = hub.log().decode()
    assert tok not in log and not any(w in log for w in wrong[:2])  # tokens are never logged
    print(f"\n{n} calls with a wrong or missing token: all Unauthorized, all counted")


# -- 2. two users ----------------------------------------------------------------------------------

def test_users_see_and_touch_only_their_own_sessions(hub_service):
    hub = hub_service
    owner = hub.access["user"]
    paths = {owner: hub.access_path, "alice": usable(hub, "alice"), "bob": usable(hub, "bob")}
    tokens = {u: load(p)["token"] for u, p in paths.items()}
    sessions: dict[str, rpg.Session] = {}
    try:
        for u, p in paths.items():
            sessions[u] = rpg.Session(hub=p)
        runs = {u: (local_pilot(s), s) for u, s in sessions.items()}
        units = {u: mgrs[2].submit_units(trues(4)) for u, (mgrs, _s) in runs.items()}
        for u, (mgrs, _s) in runs.items():
            assert mgrs[2].wait_units(timeout=60) == ["DONE"] * 4, u
        uids = {u: s.uid for u, s in sessions.items()}
        assert len(set(uids.values())) == 3
        (a_pmgr, a_pilot, a_umgr), alice = runs["alice"]
        b_pilot = runs["bob"][0][1]
        a_uid, bob = uids["alice"], tokens["bob"]
        with raw_client(hub.access["address"]) as c:
            # list_sessions and status: each user sees only their own; the owner's status all
            for u, tok in tokens.items():
                assert [d["uid"] for d in c("list_sessions", tok)] == [uids[u]]
                assert all(d["user"] == u for d in c("list_sessions", tok))
                st_ = c("status", tok)
                assert st_["user"] == u and st_["owner"] == owner
                want = sorted(uids.values()) if u == owner else [uids[u]]
                assert sorted(d["uid"] for d in st_["sessions"]) == want
            a_snap = c("snapshot", tokens["alice"], a_uid)
            a_events = c("events", tokens["alice"], a_uid, 0, EVENTS_MAX, 0.0)
            before = refused(c, tokens[owner])
            attempts = [
                ("attach", (a_uid,)),
                ("snapshot", (a_uid,)),
                ("events", (a_uid, 0, 100, 0.0)),
                ("cancel_units", (a_uid, [x.uid for x in units["alice"]], None)),
                ("cancel_units", (a_uid, None, a_umgr.uid)),
                ("cancel_pilots", (a_uid, None, a_pmgr.uid)),
                ("cancel_pilots", (a_uid, [a_pilot.uid], None)),
                ("close_session", (a_uid, 5.0)),
                ("submit_units", (a_uid, a_umgr.uid, [TRUE], "bob-1")),
                ("submit_pilots", (a_uid, a_pmgr.uid, [{}], "bob-2")),
                ("new_manager", (a_uid, "unit", "bob-3")),
                ("add_pilots", (a_uid, a_umgr.uid, [b_pilot.uid])),
                ("remove_pilots", (a_uid, a_umgr.uid, [a_pilot.uid])),
                ("upload", (a_uid, "0" * 64, "ab" * 8, 0, b"")),
                ("upload_done", (a_uid, "0" * 64, "ab" * 8)),
                ("download", (a_uid, "/tmp/x", "ab" * 8, 0)),
            ]
            secrets_of_alice = ["alice", a_umgr.uid, a_pmgr.uid, a_pilot.uid, alice.sandbox,
                                units["alice"][0].uid]
            ghost = refusal(c, "attach", bob, "rpg.session.nope").msg
            for method, args in attempts:
                exc = refusal(c, method, bob, *args)
                assert exc.name == "Unauthorized", (method, exc.name, exc.msg)
                # the same words as for a session that does not exist: existence is not told
                assert exc.msg == ghost.replace("rpg.session.nope", a_uid), exc.msg
                assert not any(x in exc.msg for x in secrets_of_alice), exc.msg
            # the owner's call to stop the service is the owner's only
            exc = refusal(c, STOP, bob)
            assert exc.name == "Unauthorized" and "owner" in exc.msg
            with pytest.raises(rpg.client.Unauthorized, match="no session"):
                rpg.Session(hub=paths["bob"], attach=a_uid)
            after = refused(c, tokens[owner])
            assert after["session"] - before["session"] == len(attempts) + 3
            assert after["token"] == before["token"] and after["call"] == before["call"]
            # nothing changed for alice
            assert c("snapshot", tokens["alice"], a_uid) == a_snap
            assert c("events", tokens["alice"], a_uid, 0, EVENTS_MAX, 0.0) == a_events
            (mine,) = c("list_sessions", tokens["alice"])
            assert mine["closed"] is False
            assert [x.state for x in units["alice"]] == ["DONE"] * 4
            assert a_pilot.state == "ACTIVE"
            assert c("hello", tokens[owner])["user"] == owner
        more = a_umgr.submit_units(trues(3))  # alice's session still works
        assert a_umgr.wait_units(more, timeout=60) == ["DONE"] * 3
    finally:
        for s in sessions.values():
            s.close()
    print(f"\nbob's {len(attempts) + 3} calls on alice's session: all Unauthorized, counted")


# -- 3. revoke -------------------------------------------------------------------------------------

def _token_cli(sandbox: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rpg.cli", "hub", "token", "--sandbox",
                           sandbox, *args], capture_output=True, text=True, timeout=30)


def test_a_revoked_token_is_refused_within_two_seconds(hub_service):
    hub = hub_service
    alice_path = usable(hub, "alice")
    old = load(alice_path)["token"]
    with raw_client(hub.access["address"]) as c:
        assert c("hello", old)["user"] == "alice"
        live = rpg.Session(hub=alice_path)
        try:
            out = _token_cli(hub.sandbox, "--revoke", "alice")
            assert out.returncode == 0 and "alice revoked" in out.stderr, out.stderr
            t0 = time.monotonic()
            while True:
                try:
                    c("hello", old)
                except zerorpc.RemoteError as exc:
                    assert exc.name == "Unauthorized"
                    assert exc.msg == "unknown token (wrong, or revoked)"
                    break
                assert time.monotonic() - t0 < 2.0, "the revoked token still works after 2 s"
                time.sleep(0.05)
            took = time.monotonic() - t0
            # alice's live session: every call refused now, clearly
            with pytest.raises(rpg.client.Unauthorized, match="revoked"):
                rpg.UnitManager(live)
        finally:
            live.close()  # refused on the hub: logged, not raised
        with pytest.raises(rpg.client.Unauthorized, match="revoked"):
            rpg.Session(hub=alice_path)
        assert c("hello", hub.access["token"])["user"] == hub.access["user"]
        # a new token for alice works (within a reload); the old one stays refused
        new = load(hub.token_for("alice"))["token"]
        assert new != old
        t0 = time.monotonic()
        while True:
            try:
                assert c("hello", new)["user"] == "alice"
                break
            except zerorpc.RemoteError:
                assert time.monotonic() - t0 < 2.0, "a new token is not accepted after 2 s"
                time.sleep(0.05)
        assert refusal(c, "hello", old).name == "Unauthorized"
    out = _token_cli(hub.sandbox, "--revoke", "carol")
    assert out.returncode == 1 and "no user 'carol'" in out.stderr
    print(f"\nrevoked token refused {took:.2f} s after `rpg hub token --revoke`")


# -- 4. malformed calls ----------------------------------------------------------------------------

def _malformed(s: str, p: str, u: str) -> list[tuple[str, tuple, list[str]]]:
    """(method, arguments after the token, words the ProtocolError's message must hold)."""
    nan, inf = float("nan"), float("inf")
    sha = "0" * 64
    return [
        ("open_session", ([], "r"), ["options"]),
        ("open_session", ({"bogus": 1}, "r"), ["options", "uid"]),
        ("open_session", ({"uid": "../etc"}, "r"), ["options.uid"]),
        ("open_session", ({"uid": 5}, "r"), ["options.uid"]),
        ("open_session", ({"uid": s}, "r-new"), [s, "exists already"]),
        ("open_session", ({}, ""), ["request_id"]),
        ("open_session", ({}, "x" * 65), ["request_id"]),
        ("open_session", ({}, 5), ["request_id"]),
        ("attach", (5,), ["session"]),
        ("attach", ("../x",), ["session"]),
        ("snapshot", ("x" * 200,), ["session"]),
        ("snapshot", (None,), ["session"]),
        ("events", (["a"], 0, 1, 0), ["session"]),
        ("new_manager", (s, "bogus", "r"), ["kind"]),
        ("new_manager", (s, 5, "r"), ["kind"]),
        ("new_manager", (s, "unit", ""), ["request_id"]),
        ("new_manager", (s, "unit", None), ["request_id"]),
        ("submit_pilots", (s, u, [{}], "r"), ["pilot manager", u]),
        ("submit_pilots", (s, "pmgr.999999", [{}], "r"), ["pmgr.999999"]),
        ("submit_pilots", (s, 5, [{}], "r"), ["pmgr"]),
        ("submit_pilots", (s, p, "x", "r"), ["descriptions"]),
        ("submit_pilots", (s, p, [5], "r"), ["descriptions[0]"]),
        ("submit_pilots", (s, p, [{"cores": 0}], "r"), ["descriptions[0]", "cores"]),
        ("submit_pilots", (s, p, [{"resource": "mars"}], "r"), ["resource"]),
        ("submit_pilots", (s, p, [{"bogus": 1}], "r"), ["bogus", "unknown field"]),
        ("submit_pilots", (s, p, [{"runtime": nan}], "r"), ["runtime"]),
        ("submit_pilots", (s, p, [{}, {"heartbeat_interval": 2, "heartbeat_timeout": 1}], "r"),
         ["descriptions[1]", "heartbeat_timeout"]),
        ("submit_pilots", (s, p, [{}], ""), ["request_id"]),  # valid pilot, launched? no
        ("submit_units", (s, p, [TRUE], "r"), ["unit manager", p]),
        ("submit_units", (s, "umgr.999999", [TRUE], "r"), ["umgr.999999"]),
        ("submit_units", (s, None, [TRUE], "r"), ["umgr"]),
        ("submit_units", (s, u, TRUE, "r"), ["descriptions"]),
        ("submit_units", (s, u, [{"executable": 5}], "r"), ["executable", "string"]),
        ("submit_units", (s, u, [{}], "r"), ["executable"]),
        ("submit_units", (s, u, [dict(TRUE, cores=0)], "r"), ["cores"]),
        ("submit_units", (s, u, [dict(TRUE, bogus=1)], "r"), ["bogus", "unknown field"]),
        ("submit_units", (s, u, [TRUE, dict(TRUE, arguments="-x")], "r"),
         ["descriptions[1]", "arguments"]),
        ("submit_units", (s, u, [dict(TRUE, environment={"1BAD": "x"})], "r"),
         ["environment"]),
        ("submit_units", (s, u, [dict(TRUE, input_staging=[{"source": "/etc/hosts",
                                                            "target": "../../x"}])], "r"),
         ["input_staging", "target", "escapes"]),
        ("submit_units", (s, u, [dict(TRUE, stdout="a/b")], "r"), ["stdout"]),
        ("submit_units", (s, u, [dict(TRUE, timeout=-1)], "r"), ["timeout"]),
        ("submit_units", (s, u, [dict(TRUE, ranks=2)], "r"), ["ranks"]),
        ("submit_units", (s, u, [dict(TRUE, executable="/bin/\x00")], "r"), ["executable"]),
        ("submit_units", (s, u, [TRUE], ""), ["request_id"]),
        ("submit_units", (s, u, [TRUE], "x" * 65), ["request_id"]),
        ("submit_units", (s, u, [TRUE], 7), ["request_id"]),
        ("add_pilots", (s, p, []), ["unit manager", p]),
        ("add_pilots", (s, "umgr.999999", []), ["umgr.999999"]),
        ("add_pilots", (s, u, "pilot.000001"), ["pilots"]),
        ("add_pilots", (s, u, None), ["pilots"]),
        ("add_pilots", (s, u, ["pilot.999999"]), ["pilot.999999"]),
        ("add_pilots", (s, u, [5]), ["pilots[0]"]),
        ("remove_pilots", (s, "umgr.999999", []), ["umgr.999999"]),
        ("remove_pilots", (s, u, ["pilot.999999"]), ["pilot.999999"]),
        ("cancel_units", (s, "unit.000001", None), ["uids"]),
        ("cancel_units", (s, [5], None), ["uids[0]"]),
        ("cancel_units", (s, None, None), ["uids", "umgr"]),
        ("cancel_units", (s, None, p), ["unit manager", p]),
        ("cancel_units", (s, None, "umgr.999999"), ["umgr.999999"]),
        ("cancel_units", (s, ["unit.000001"] * (front.MAX_UIDS + 1), None),
         ["uids", str(front.MAX_UIDS)]),
        ("cancel_pilots", (s, {}, None), ["uids"]),
        ("cancel_pilots", (s, None, None), ["uids", "pmgr"]),
        ("cancel_pilots", (s, None, u), ["pilot manager", u]),
        ("events", (s, -1, 10, 0), ["after"]),
        ("events", (s, True, 10, 0), ["after"]),
        ("events", (s, 1.5, 10, 0), ["after"]),
        ("events", (s, 0, 0, 0), ["limit"]),
        ("events", (s, 0, EVENTS_MAX + 1, 0), ["limit", str(EVENTS_MAX)]),
        ("events", (s, 0, "10", 0), ["limit"]),
        ("events", (s, 0, 10, -1), ["wait"]),
        ("events", (s, 0, 10, 11), ["wait"]),
        ("events", (s, 0, 10, nan), ["wait"]),
        ("events", (s, 0, 10, inf), ["wait"]),
        ("close_session", (s, -1), ["timeout"]),
        ("close_session", (s, "5"), ["timeout"]),
        ("close_session", (s, nan), ["timeout"]),
        ("close_session", (s, 3601), ["timeout"]),
        ("close_session", (s, None), ["timeout"]),
        ("upload", (s, 5, "ab" * 8, 0, b""), ["name"]),
        ("upload", (s, "../../etc/passwd", "ab" * 8, 0, b""), ["name", "sha256"]),
        ("upload", (s, sha, "../x", 0, b""), ["transfer id"]),
        ("upload", (s, sha, "ab" * 8, -1, b""), ["offset"]),
        ("upload", (s, sha, "ab" * 8, 0, "text"), ["data", "bytes"]),
        ("upload", (s, sha, "ab" * 8, 0, b"x" * (relay.CHUNK + 1)),
         ["data", str(relay.CHUNK)]),
        ("upload", (s, sha, "ab" * 8, 5, b"x"), ["offset 5"]),
        ("upload_done", (s, None, "ab" * 8), ["name"]),
        ("upload_done", (s, sha, "ab" * 8), ["upload", sha[:12]]),
        ("download", (s, "relative", "ab" * 8, 0), ["client_path"]),
        ("download", (s, "/etc/passwd", "ab" * 8, 0), ["/etc/passwd"]),
        ("download", (s, "/x", "ab" * 8, -1), ["offset"]),
    ]


def test_malformed_calls_name_the_argument_and_change_nothing(hub_service):
    tok = hub_service.access["token"]
    with raw_client(hub_service.access["address"]) as c:
        s = c("open_session", tok, {}, "t4-open")
        uid = s["uid"]
        p = c("new_manager", tok, uid, "pilot", "t4-p")
        u = c("new_manager", tok, uid, "unit", "t4-u")
        snap0, counts0 = c("snapshot", tok, uid), refused(c, tok)
        cases = _malformed(uid, p, u)
        for method, args, words in cases:
            exc = refusal(c, method, tok, *args)
            assert exc.name == "ProtocolError", (method, args[1:3], exc.name, exc.msg)
            missing = [w for w in words if w not in exc.msg]
            assert not missing, f"{method}: {exc.msg!r} does not name {missing}"
            assert len(exc.msg) < 600, exc.msg
        # calls that are valid but name nothing that exists: accepted, and harmless
        assert c("cancel_units", tok, uid, ["unit.999999"], None) is None
        assert c("cancel_pilots", tok, uid, ["pilot.999999"], None) is None
        assert c("events", tok, uid, 2**63, 10, 0.0) == {"events": [], "closed": False,
                                                           "next": 2**63}
        time.sleep(0.2)  # a cancel is posted to the session's loop: let it run
        counts1 = refused(c, tok)
        assert counts1["call"] - counts0["call"] == len(cases)
        assert counts1 - Counter(call=counts1["call"]) == counts0 - Counter(call=counts0["call"])
        assert c("snapshot", tok, uid) == snap0
        assert snap0["units"] == [] and snap0["pilots"] == []
        assert [d["uid"] for d in c("list_sessions", tok)] == [uid]
        (st_,) = c("status", tok)["sessions"]
        assert st_["units"] == {} and st_["pilots"] == [] and st_["closed"] is False
        inbox = os.path.join(s["sandbox"], "client", "in")
        assert not os.path.isdir(inbox) or os.listdir(inbox) == []
        # and the session works: a valid call after all that
        assert c("submit_units", tok, uid, u, [TRUE], "t4-ok")[0].startswith("unit.")
        c("close_session", tok, uid, 5.0)
    print(f"\n{len(cases)} malformed calls: ProtocolError naming the argument, counted, "
          f"snapshot unchanged")


def test_a_request_id_that_is_not_a_short_string_is_a_protocol_error(hub_service):
    """(It was looked up before it was checked: an unhashable one was a bare TypeError.)"""
    tok = hub_service.access["token"]
    with raw_client(hub_service.access["address"]) as c:
        uid = c("open_session", tok, {}, "t4b")["uid"]
        u = c("new_manager", tok, uid, "unit", "t4b-u")
        p = c("new_manager", tok, uid, "pilot", "t4b-p")
        snap, n0 = c("snapshot", tok, uid), refused(c, tok)["call"]
        calls = [("open_session", ({},)), ("new_manager", (uid, "unit")),
                 ("submit_units", (uid, u, [TRUE])), ("submit_pilots", (uid, p, [{}]))]
        bad = (["r"], {"r": 1}, None, 5, b"r", "", "r" * 65)
        for method, args in calls:
            for rid in bad:
                exc = refusal(c, method, tok, *args, rid)
                assert exc.name == "ProtocolError" and "request_id" in exc.msg, (
                    method, rid, exc.name, exc.msg)
        assert refused(c, tok)["call"] - n0 == len(calls) * len(bad)
        assert c("snapshot", tok, uid) == snap
        assert [d["uid"] for d in c("list_sessions", tok)] == [uid]


def test_a_retried_open_session_with_a_uid_gets_its_first_reply(hub_service):
    """The client repeats a call whose connection dropped, with the same request id: an
    open_session(uid=X) that went through must answer its first reply, not 'exists already'."""
    hub, tok = hub_service, hub_service.access["token"]
    alice = load(usable(hub, "alice"))["token"]
    with raw_client(hub.access["address"]) as c:
        first = c("open_session", tok, {"uid": "mine"}, "t4c")
        assert c("open_session", tok, {"uid": "mine"}, "t4c") == first
        assert c("open_session", tok, {}, "t4c") == first  # the request id decides
        exc = refusal(c, "open_session", tok, {"uid": "mine"}, "t4c-other")
        assert exc.name == "ProtocolError" and "exists already" in exc.msg
        # another user's request id is another request: no session of the owner's is told
        theirs = c("open_session", alice, {}, "t4c")
        assert theirs["uid"] != "mine" and theirs["user"] == "alice"
        assert [d["uid"] for d in c("list_sessions", tok)] == ["mine"]
        exc = refusal(c, "open_session", alice, {"uid": "mine"}, "t4c-a")  # one namespace
        assert exc.name in ("ProtocolError", "Unauthorized")
        assert hub.access["user"] not in exc.msg and first["sandbox"] not in exc.msg
        assert len(c("list_sessions", alice)) == 1


def test_a_closed_session_can_still_be_read_and_attached(hub_service):
    tok = hub_service.access["token"]
    with raw_client(hub_service.access["address"]) as c:
        uid = c("open_session", tok, {}, "t4d")["uid"]
        c("new_manager", tok, uid, "unit", "t4d-m")
        c("close_session", tok, uid, 5.0)
        snap = c("snapshot", tok, uid)
        assert snap["uid"] == uid and [k for _, k in snap["managers"]] == ["unit"]
        exc = refusal(c, "new_manager", tok, uid, "unit", "t4d-m2")
        assert exc.name == "SessionClosed", (exc.name, exc.msg)
    import rpg

    with rpg.Session(hub=hub_service.access_path, attach=uid) as s:
        assert len(s.get_unit_managers()) == 1


# -- 5. fuzz ---------------------------------------------------------------------------------------

FUZZ_MESSAGES = 1000
PER_EXAMPLE = 1
MAX_FUZZ_SESSIONS = 8
UNKNOWN = ["nope", "", "HELLO", "hello ", "_user", "_entry", "_refuse", "_call", "__init__",
           "__class__", "refused", "close", "run", "stop" if "stop" not in PUBLIC else "halt",
           "in_thread", "_zerorpc_list", "_zerorpc_name", "_zerorpc_ping", "_zerorpc_help",
           "_zerorpc_args", "_zerorpc_inspect", "\u00e9", "x" * 300]
# What a reply may be, besides a result: per-method refusals, and what zerorpc itself says.
FRONT_ERRORS = {*REFUSALS, "SessionClosed", "TypeError"}
OTHER_ERRORS = {"NameError", "TypeError", "KeyError", "AttributeError"}
ARITY = re.compile(r"positional argument|takes \d+ positional|were given")
UID_CHARS = "abcXYZ019._-"

I64 = st.integers(-(2**63), 2**64 - 1)  # what msgpack carries at all
SPECIAL = st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 0.0, -0.0,
                           1e308, 5e-324, math.nan, math.inf, -math.inf, "", " ", "\x00",
                           "x" * 5000, b"", b"\x00\xff" * 100, True, False, None, [], {},
                           [[[[[[[[[[[]]]]]]]]]]], list(range(300))])
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-5, 100), I64,
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
                   st.binary(max_size=64), SPECIAL)
JSONISH = st.recursive(SCALAR, lambda kids: st.one_of(
    st.lists(kids, max_size=6), st.dictionaries(st.text(max_size=12), kids, max_size=5)),
    max_leaves=25)
FIELDS = sorted(set(UnitDescription._fields) | set(PilotDescription._fields) | {"bogus"})
DESC = st.one_of(
    st.just(TRUE), st.just({}),
    st.dictionaries(st.sampled_from(FIELDS), st.one_of(
        JSONISH, st.sampled_from(["/bin/true", "local", 1, 2, 0, ["a"], {"A": "b"}, "STDOUT"])),
        max_size=4),
    st.builds(lambda extra: dict(TRUE, **extra), st.dictionaries(
        st.sampled_from(FIELDS), st.one_of(JSONISH, st.sampled_from([1, "x", ["a"]])),
        max_size=2)))


def _number_in(v: Any, low: float, high: float) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and low <= v <= high


def _valid_pilots(descs: Any) -> bool:
    if not isinstance(descs, list) or not descs:
        return False
    try:
        for d in descs:
            PilotDescription(d)
    except (DescriptionError, TypeError, ValueError):
        return False
    return True


class Fuzz:
    """The state of the fuzz: what valid calls made (from their replies), what it sent."""

    def __init__(self, c: Any, token: str, main: str, pmgr: str, umgr: str) -> None:
        self.c, self.token, self.main = c, token, main
        self.first = {"pmgr": pmgr, "umgr": umgr}  # the main session's managers
        self.sessions = [main]
        self.managers: dict[str, dict[str, str]] = {main: {pmgr: "pilot", umgr: "unit"}}
        self.units: dict[str, dict[str, str]] = {main: {}}  # session -> unit -> its umgr
        self.closed: set[str] = set()
        self.outcomes: Counter = Counter()
        self.unexpected: list[Any] = []
        self.known_bugs: Counter = Counter()
        self.defanged = 0
        self.sent = 0

    def mgrs(self, first: str) -> list[str]:
        return sorted({m for ms in self.managers.values() for m in ms},
                      key=lambda m: (not m.startswith(first), m))

    @staticmethod
    def pick(pool: Any) -> Any:
        """One of ``pool()`` as it is when drawn (a fixed strategy: hypothesis wants the same
        draws from the same choices, and the pools grow as the hub makes objects)."""
        return st.integers(0, 63).map(lambda i: (lambda p: p[i % len(p)])(pool()))

    # strategies that know the session's real objects (the rest is junk)
    def plausible(self, name: str, strict: bool = False) -> Any:
        """Values for parameter ``name``: some right, some wrong; ``strict``: mostly right."""
        if name == "token":
            return st.just(self.token) if strict else st.one_of(
                st.just(self.token), st.sampled_from(["", "wrong", self.token[:-1], "t" * 300]))
        if name == "session":
            return st.one_of(st.just(self.main), self.pick(
                lambda: self.sessions if strict else [*self.sessions, "rpg.session.nope"]))
        if name == "kind":
            return st.sampled_from(["pilot", "unit"] if strict else ["pilot", "unit", "Unit", ""])
        if name == "request_id":
            return st.one_of(st.sampled_from(["r1", "r2", "r3"]), st.text(min_size=1,
                                                                         max_size=64),
                             *(() if strict else (st.text(min_size=65, max_size=70),)))
        if name in ("pmgr", "umgr"):  # first the managers of the kind the call wants
            some = self.pick(lambda: self.mgrs(name[0]) if strict else [
                *self.mgrs(name[0]), "umgr.999999", "pmgr.999999", None])
            return st.one_of(st.just(self.first[name]), some) if strict else some
        if name == "descs":
            if strict:  # mostly valid units (no pilot will run them)
                return st.lists(st.integers(0, 3).flatmap(lambda i: st.just(TRUE) if i else DESC),
                                min_size=1, max_size=4)
            return st.lists(DESC, max_size=4)
        if name in ("pilots", "uids"):
            return st.one_of(st.none(), st.lists(st.one_of(
                self.pick(lambda: [*sorted({x for us in self.units.values() for x in us}),
                                   "pilot.000000", "unit.999999"]),
                st.text(max_size=10)), max_size=4))
        if name in ("after", "offset"):
            return st.one_of(st.integers(0, 50), I64)
        if name == "limit":
            return st.integers(-1, EVENTS_MAX + 1)
        if name in ("wait", "timeout"):
            return st.one_of(st.floats(-1, 20), st.integers(-1, 4000))
        if name == "options":
            return st.one_of(st.just({}), st.fixed_dictionaries(
                {"uid": st.text(alphabet=UID_CHARS, min_size=1, max_size=20)}),
                st.dictionaries(st.sampled_from(["uid", "x"]), JSONISH, max_size=2))
        if name == "name":
            return st.one_of(st.sampled_from(["0" * 64, "f" * 64]), st.text(max_size=70))
        if name == "data":
            return st.binary(max_size=2048)
        if name == "client_path":
            return st.one_of(st.just("/tmp/x"), st.text(max_size=30).map(lambda s: "/" + s))
        return JSONISH

    def message(self, data: Any) -> tuple[str, list[Any]]:
        known = data.draw(st.integers(0, 9), label="known") < 8  # 8 in 10: a Front method
        method = data.draw(st.sampled_from(PUBLIC if known else UNKNOWN), label="method")
        if method not in PARAMS:
            return method, data.draw(st.lists(JSONISH, max_size=5), label="args")
        if data.draw(st.booleans(), label="well-formed"):  # every argument plausible
            args = [data.draw(self.plausible(p, strict=True), label=p) for p in PARAMS[method]]
            return method, self.defang(method, args)
        args = [data.draw(self.plausible(p) if data.draw(st.integers(0, 3)) else JSONISH,
                          label=p) for p in PARAMS[method]]
        arity = data.draw(st.sampled_from(["exact"] * 8 + ["fewer", "more"]), label="arity")
        if arity == "fewer" and args:
            args = args[:data.draw(st.integers(0, len(args) - 1))]
        elif arity == "more":
            args += data.draw(st.lists(JSONISH, min_size=1, max_size=3))
        return method, self.defang(method, args)

    def defang(self, method: str, args: list[Any]) -> list[Any]:
        """Make one argument of a call that would do more than this test can account for
        invalid (or cheap): stopping the hub, closing the owner's session, launching pilots,
        a long poll, opening sessions without end."""
        before = list(args)
        mine = len(args) > 1 and args[0] == self.token
        if method == STOP and args and args[0] == self.token:
            args[0] = "not-the-token"
        elif method == "close_session" and mine and args[1] == self.main and len(args) == 3 \
                and _number_in(args[2], 0, 3600):
            args[2] = -1
        elif method == "events" and len(args) == 5 and _number_in(args[4], 0.05, 10):
            args[4] = 0.0
        elif method == "submit_pilots" and len(args) == 5 and _valid_pilots(args[3]):
            args[3] = [*args[3], {"cores": 0}]
        elif method == "open_session" and len(self.sessions) > MAX_FUZZ_SESSIONS and args:
            args[0] = "not-the-token"
        self.defanged += args != before
        return args

    def send(self, method: str, args: list[Any]) -> None:
        msgpack.packb([method, args], use_bin_type=True)  # the generator makes only these
        self.sent += 1
        try:
            result = self.c(method, *args)
        except zerorpc.RemoteError as exc:  # anything else (a timeout: no reply) fails here
            self.outcomes[exc.name] += 1
            self.classify(method, args, exc)
            return
        self.outcomes["result"] += 1
        self.record(method, args, result)

    def classify(self, method: str, args: list[Any], exc: Any) -> None:
        if method in PARAMS:
            assert exc.msg, (method, exc.name)
            ok = exc.name in FRONT_ERRORS and (exc.name != "TypeError" or ARITY.search(exc.msg))
            if exc.name == "SessionClosed" and self.main in args[1:2]:
                ok = False  # the owner's session is never closed here
            if method == "snapshot" and exc.name == "HubError":
                self.known_bugs["snapshot of a closed session -> HubError"] += 1
                return
        else:
            ok = exc.name in OTHER_ERRORS
        if not ok:
            self.unexpected.append((method, repr(args)[:200], exc.name, exc.msg[:200]))

    def record(self, method: str, args: list[Any], result: Any) -> None:
        """What a call that was accepted made: the test checks the hub holds exactly that."""
        if method == "open_session":
            uid = result["uid"]
            if uid not in self.sessions:
                self.sessions.append(uid)
                self.managers[uid], self.units[uid] = {}, {}
        elif method == "new_manager":  # a replayed request id answers the first reply (its
            self.managers[args[1]].setdefault(result, args[2])  # kind, whatever this one asks)
        elif method == "submit_units" and isinstance(result, list):
            for uid in result:
                self.units[args[1]].setdefault(uid, args[2])
        elif method == "close_session":
            assert args[1] != self.main
            self.closed.add(args[1])


def test_fuzzed_messages_get_a_result_or_an_error_and_leave_the_hub_sound(hub_service):
    hub, tok = hub_service, hub_service.access["token"]
    t0 = time.monotonic()
    with raw_client(hub.access["address"], timeout=10) as c:
        main = c("open_session", tok, {}, "fuzz-main")["uid"]
        pmgr = c("new_manager", tok, main, "pilot", "fuzz-p")
        umgr = c("new_manager", tok, main, "unit", "fuzz-u")
        fuzz = Fuzz(c, tok, main, pmgr, umgr)
        counts0 = refused(c, tok)

        @settings(max_examples=FUZZ_MESSAGES // PER_EXAMPLE, deadline=None, database=None,
                  derandomize=True, phases=[Phase.generate], suppress_health_check=list(
                      HealthCheck))
        @given(data=st.data())
        def run(data: Any) -> None:
            for _ in range(PER_EXAMPLE):
                fuzz.send(*fuzz.message(data))

        while fuzz.sent < FUZZ_MESSAGES:  # an example that overran its data sent fewer
            run()
        took = time.monotonic() - t0
        assert fuzz.sent >= FUZZ_MESSAGES
        assert sum(fuzz.outcomes.values()) == fuzz.sent  # each one got a reply
        assert fuzz.unexpected == [], fuzz.unexpected[:10]
        # every refusal was counted, once
        counts1 = refused(c, tok)
        assert sum((counts1 - counts0).values()) == sum(fuzz.outcomes[n] for n in REFUSALS)
        # the hub answers, and holds exactly what the accepted calls made
        assert hub.proc.poll() is None
        assert c("hello", tok)["user"] == hub.access["user"]
        listed = {d["uid"]: d["closed"] for d in c("list_sessions", tok)}
        assert sorted(listed) == sorted(fuzz.sessions)
        assert listed == {s: s in fuzz.closed for s in fuzz.sessions}
        for s in fuzz.sessions:
            if s in fuzz.closed:
                continue
            snap = c("snapshot", tok, s)
            assert dict(map(tuple, snap["managers"])) == fuzz.managers[s]
            assert snap["pilots"] == []  # no valid pilot was let through
            assert {row[0]: row[1] for row in snap["units"]} == fuzz.units[s]
            assert all(v == [] for v in snap["umgr_pilots"].values())
            assert set(snap["umgr_pilots"]) <= set(fuzz.managers[s])
        for d in c("status", tok)["sessions"]:
            assert d["pilots"] == []
            assert not set(d["units"]) & {"EXECUTING", "DONE", "FAILED"}, d["units"]
        assert not hub.descendants(), "no process was started"
    made = sum(map(len, fuzz.units.values()))
    print(f"\n{fuzz.sent} fuzzed messages in {took:.1f} s: {dict(fuzz.outcomes)}; "
          f"{fuzz.defanged} defanged; made {len(fuzz.sessions) - 1} sessions, "
          f"{sum(map(len, fuzz.managers.values())) - 2} managers, {made} units; "
          f"known bugs hit: {dict(fuzz.known_bugs)}")


# -- 6. limits -------------------------------------------------------------------------------------

def test_the_unit_limit_per_user_refuses_clearly_and_frees_with_final_units(tmp_path):
    hub = HubProcess(str(tmp_path / "hub2"), "--max-units-per-user", "50")
    rc = None
    try:
        tok = hub.access["token"]
        with rpg.Session(hub=hub.access_path) as s:
            _pmgr, _pilot, umgr = local_pilot(s)
            with pytest.raises(rpg.client.HubRefused) as info:
                umgr.submit_units(trues(60))
            assert "limit of 50" in str(info.value), info.value
            assert "--max-units-per-user" in str(info.value)
            assert umgr.get_units() == []
            first = umgr.submit_units(trues(10))  # the session still works
            assert umgr.wait_units(first, timeout=60) == ["DONE"] * 10
            # more than MAX_ITEMS through a Session: sent in slices, all or nothing (here the
            # unit limit refuses the first slice); in one raw call: refused, naming MAX_ITEMS
            with pytest.raises(rpg.client.HubRefused, match="limit of 50"):
                umgr.submit_units(trues(front.MAX_ITEMS + 1))
            assert len(umgr.get_units()) == 10
            with raw_client(hub.access["address"], timeout=30) as c:
                exc = refusal(c, "submit_units", tok, s.uid, umgr.uid,
                              [TRUE] * (front.MAX_ITEMS + 1), "t6-big")
                assert exc.name == "ProtocolError" and str(front.MAX_ITEMS) in exc.msg
                # exactly the limit in flight is allowed; one more is not, until they end
                sleepers = umgr.submit_units([rpg.UnitDescription(
                    executable="/bin/sleep", arguments=["30"]) for _ in range(50)])
                exc = refusal(c, "submit_units", tok, s.uid, umgr.uid, [TRUE], "t6-one")
                assert exc.name == "LimitExceeded", (exc.name, exc.msg)
                assert "50 units not final yet" in exc.msg and "limit of 50" in exc.msg
                counted = c("status", tok)["refused"]
                # limit: the 60, the first slice of the 20,001, the 51st; call: the raw 20,001
                assert counted["limit"] == 3 and counted["call"] == 1, counted
                (st_,) = c("status", tok)["sessions"]
                assert sum(st_["units"].values()) == 60  # nothing of the refused submits
            umgr.cancel_units(sleepers)
            assert umgr.wait_units(sleepers, timeout=60) == ["CANCELED"] * 50
            again = umgr.submit_units(trues(10))
            assert umgr.wait_units(again, timeout=60) == ["DONE"] * 10
    finally:
        rc = hub.stop()
    assert rc == 0, hub.log().decode()[-2000:]


def test_open_sessions_per_user_are_limited_and_freed_by_close(hub_service):
    limit = getattr(front, "MAX_SESSIONS", None)
    if limit is None:
        pytest.skip("front.MAX_SESSIONS: no limit of sessions per user")
    hub, tok = hub_service, hub_service.access["token"]
    bob = load(usable(hub, "bob"))["token"]
    with raw_client(hub.access["address"], timeout=30) as c:
        uids = [c("open_session", tok, {}, f"t6s-{i}")["uid"] for i in range(limit)]
        exc = refusal(c, "open_session", tok, {}, "t6s-over")
        assert exc.name == "LimitExceeded" and f"at most {limit}" in exc.msg, exc.msg
        assert len(c("list_sessions", tok)) == limit
        assert c("open_session", bob, {}, "t6s-bob")["user"] == "bob"  # per user
        c("close_session", tok, uids[0], 5.0)
        assert c("open_session", tok, {}, "t6s-again")["uid"] not in uids
        assert refused(c, tok)["limit"] == 1
        for uid in uids[1:]:
            c("close_session", tok, uid, 5.0)


# -- 7. a message past MAXMSGSIZE ------------------------------------------------------------------

def test_a_message_past_the_size_limit_is_dropped_and_the_hub_serves_on(hub_service):
    hub, tok = hub_service, hub_service.access["token"]
    proc = psutil.Process(hub.proc.pid)
    rss0 = proc.memory_info().rss
    big = b"\x00" * (300 << 20)  # past serve.MAX_MESSAGE (256 MiB): zmq drops the peer
    with raw_client(hub.access["address"], timeout=2) as c, \
            raw_client(hub.access["address"]) as other:
        t0 = time.monotonic()
        with pytest.raises(zerorpc.TimeoutExpired):  # never accepted: no reply at all
            c("hello", tok, big)
        took = time.monotonic() - t0
        del big
        t1 = time.monotonic()
        assert other("hello", tok)["user"] == hub.access["user"]
        lag = time.monotonic() - t1
        assert lag < 1.0, lag
        assert c("hello", tok)["user"] == hub.access["user"]  # the dropped peer reconnects
    assert hub.proc.poll() is None
    grew = (proc.memory_info().rss - rss0) >> 20
    assert grew < 64, f"the hub's RSS grew by {grew} MiB"
    assert b"Traceback" not in hub.log()
    print(f"\n300 MiB message: dropped (client timed out after {took:.1f} s); another "
          f"client's hello {lag * 1000:.0f} ms after; hub RSS +{grew} MiB")


def test_a_message_zerorpc_cannot_decode_gets_no_reply_and_the_hub_serves_on(hub_service):
    """msgpack maps with non-string keys: zerorpc's unpacker (strict_map_key) refuses the whole
    message before rpg sees it, logs it and drops it; the caller waits out its timeout. (The
    fuzz above sends string keys only, so that each of its messages gets a reply.)"""
    hub, tok = hub_service, hub_service.access["token"]
    with raw_client(hub.access["address"], timeout=1) as c, \
            raw_client(hub.access["address"]) as other:
        for junk in ({1: 2}, [{None: "x"}], {b"k": {2.5: 1}}):
            with pytest.raises(zerorpc.TimeoutExpired):
                c("hello", junk)
        assert other("hello", tok)["user"] == hub.access["user"]
        assert c("hello", tok)["user"] == hub.access["user"]
    assert hub.proc.poll() is None


def test_a_request_id_reused_for_another_call_is_refused(hub_service):
    tok = hub_service.access["token"]
    with raw_client(hub_service.access["address"]) as c:
        uid = c("open_session", tok, {}, "t8-open")["uid"]
        first = c("new_manager", tok, uid, "unit", "t8-same")
        assert c("new_manager", tok, uid, "unit", "t8-same") == first  # a repeat: its reply
        exc = refusal(c, "new_manager", tok, uid, "pilot", "t8-same")
        assert exc.name == "ProtocolError" and "used for another call" in exc.msg
        c("close_session", tok, uid, 5.0)


def test_the_owner_may_close_a_revoked_users_session(hub_service):
    import subprocess
    import sys

    import rpg

    alice = hub_service.token_for("alice")
    s = rpg.Session(hub=alice)
    uid = s.detach()
    subprocess.run([sys.executable, "-m", "rpg.cli", "hub", "token", "--sandbox",
                    hub_service.sandbox, "--revoke", "alice"], check=True, timeout=30)
    tok = hub_service.access["token"]
    with raw_client(hub_service.access["address"]) as c:
        exc = refusal(c, "attach", tok, uid)  # not the owner's to look into
        assert exc.name == "Unauthorized"
        assert c("close_session", tok, uid, 5.0) == {"closed": True}  # but to close
        (st,) = [x for x in c("status", tok)["sessions"] if x["uid"] == uid]
        assert st["closed"]
