"""The hub as a service, end to end: real ``rpg hub serve`` processes, real zerorpc on 127.0.0.1,
real clients killed, re-attached, cut off and reconnected."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

import rpg
from rpg import states
from tests.hub_fixture import HubProcess

UNIT_PATH = list(states.UNIT_PATH)


def _pilot(session: rpg.Session, cores: int = 2) -> tuple[rpg.Pilot, rpg.UnitManager]:
    pilot = rpg.PilotManager(session).submit_pilots(
        rpg.PilotDescription(resource="local", cores=cores, runtime=10))
    umgr = rpg.UnitManager(session)
    umgr.add_pilots(pilot)
    return pilot, umgr


def _states_of(history: list[tuple[str, float]]) -> list[str]:
    return [s for s, _ in history]


def test_serve_writes_a_private_access_file_and_stores_only_token_hashes(hub_service):
    hub = hub_service
    st = os.stat(hub.access_path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(hub.sandbox).st_mode) == 0o700
    assert hub.access["address"].startswith("tcp://127.0.0.1:")
    with open(os.path.join(hub.sandbox, "users.json")) as fh:
        users = fh.read()
    assert hub.access["token"] not in users  # a hash, never the token
    assert json.loads(users)[hub.access["user"]] != hub.access["token"]


def test_a_remote_session_runs_units_with_callbacks_once_in_order_and_client_staging(
        hub_service, tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # several relay chunks
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    seen: dict[str, list[str]] = {}
    with rpg.Session(hub=hub_service.access_path) as s:
        assert s.sandbox.startswith(hub_service.sandbox)
        _pilot_, umgr = _pilot(s)
        umgr.register_callback(lambda u, st: seen.setdefault(u.uid, []).append(st))
        units = umgr.submit_units([rpg.UnitDescription(executable="/bin/echo",
                                                       arguments=[str(i)]) for i in range(40)])
        twice = umgr.submit_units(rpg.UnitDescription(
            executable="/bin/sh", arguments=["-c", "cat in.bin in.bin > out.bin"],
            input_staging=[{"source": f"client://{src}", "target": "in.bin"}],
            output_staging=[{"source": "out.bin", "target": f"client://{tmp_path}/out.bin"}]))
        assert umgr.wait_units(timeout=60) == ["DONE"] * 41
        assert [u.stdout.strip() for u in units] == [str(i) for i in range(40)]
        # client:// output is in place when DONE is seen
        assert (tmp_path / "out.bin").read_bytes() == data + data
        assert twice.state == "DONE"
        assert s.get_unit_managers() == [umgr]
    for u in units:
        assert _states_of(u.history) == ["NEW", *UNIT_PATH[1:]]
    deadline = time.monotonic() + 5
    while any(len(v) < len(UNIT_PATH) - 1 for v in seen.values()) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(v == UNIT_PATH[1:] for v in seen.values()), "each state once, in table order"


CLIENT = r"""
import sys, rpg
s = rpg.Session(hub=sys.argv[1])
pilot = rpg.PilotManager(s).submit_pilots(rpg.PilotDescription(resource="local", cores=2,
                                                               runtime=10))
umgr = rpg.UnitManager(s)
umgr.add_pilots(pilot)
umgr.submit_units([rpg.UnitDescription(
    executable="/bin/sh", arguments=["-c", f"sleep 0.2; echo {i} >> {sys.argv[2]}"])
    for i in range(30)])
print(s.uid, flush=True)
umgr.wait_units(state="EXECUTING", timeout=30)
print("running", flush=True)
import time; time.sleep(600)
"""


def test_a_client_input_that_is_not_there_is_refused_before_anything_is_accepted(
        hub_service, tmp_path):
    with rpg.Session(hub=hub_service.access_path) as s:
        _p, umgr = _pilot(s)
        ok = rpg.UnitDescription(executable="/bin/true")
        bad = rpg.UnitDescription(executable="/bin/true", input_staging=[
            {"source": f"client://{tmp_path}/missing.txt", "target": "x"}])
        with pytest.raises(rpg.DescriptionError, match="missing.txt.*No such file"):
            umgr.submit_units([ok, bad])
        assert umgr.get_units() == []
        assert umgr.submit_units(ok).wait(timeout=30) == "DONE"


def test_a_client_killed_mid_run_and_a_new_one_attached_sees_every_unit_done(
        hub_service, tmp_path):
    ledger = tmp_path / "ledger"
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, hub_service.access_path,
                             str(ledger)], stdout=subprocess.PIPE, text=True)
    try:
        uid = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    assert uid.startswith("rpg.session.")
    with rpg.Session(hub=hub_service.access_path, attach=uid) as s:
        assert s.uid == uid
        (umgr,) = s.get_unit_managers()
        (pmgr,) = s.get_pilot_managers()
        units = umgr.get_units()
        assert len(units) == 30
        assert pmgr.get_pilots()[0].state == "ACTIVE"
        assert umgr.wait_units(timeout=60) == ["DONE"] * 30
        for u in units:
            hist = _states_of(u.history)
            assert hist == ["NEW", *UNIT_PATH[1:]], (u.uid, hist)  # full, none repeated
    lines = sorted(int(x) for x in ledger.read_text().split())
    assert lines == list(range(30)), "every unit ran, none twice"


def test_detach_leaves_the_work_running_and_attach_finds_it(hub_service, tmp_path):
    s = rpg.Session(hub=hub_service.access_path)
    _p, umgr = _pilot(s)
    umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep", arguments=["1"])
                       for _ in range(4)])
    uid = s.detach()
    with pytest.raises(rpg.SessionClosed):
        umgr.submit_units(rpg.UnitDescription(executable="/bin/true"))
    with rpg.Session(hub=hub_service.access_path, attach=uid) as again:
        (umgr2,) = again.get_unit_managers()
        assert umgr2.wait_units(timeout=30) == ["DONE"] * 4
    s.close()  # after detach: nothing more to do, and no error


class Proxy:
    """A TCP proxy on 127.0.0.1 that can cut every connection through it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.cuts = 0
        self.refuse_until = 0.0
        self._stop = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                socks = [self.lsock] + [s for p in self.pairs for s in p]
            r, _, _ = select.select(socks, [], [], 0.05)
            for sock in r:
                if sock is self.lsock:
                    c, _ = self.lsock.accept()
                    if time.monotonic() < self.refuse_until:
                        c.close()
                        continue
                    up = socket.create_connection(self.target)
                    with self._lock:
                        self.pairs.append((c, up))
                    continue
                with self._lock:
                    pair = next((p for p in self.pairs if sock in p), None)
                if pair is None:
                    continue
                other = pair[1] if sock is pair[0] else pair[0]
                try:
                    data = sock.recv(1 << 16)
                    if data:
                        other.sendall(data)
                        continue
                except OSError:
                    pass
                self._close_pair(pair)

    def _close_pair(self, pair) -> None:
        with self._lock:
            if pair in self.pairs:
                self.pairs.remove(pair)
        for s in pair:
            s.close()

    def cut(self, refuse_s: float = 1.0) -> None:
        self.refuse_until = time.monotonic() + refuse_s
        with self._lock:
            pairs = list(self.pairs)
        for p in pairs:
            self.cuts += 1
            self._close_pair(p)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        for p in list(self.pairs):
            self._close_pair(p)
        self.lsock.close()


def test_a_dropped_connection_reconnects_and_the_stream_resumes_exactly(hub_service, tmp_path):
    host, port = hub_service.access["address"][len("tcp://"):].rsplit(":", 1)
    proxy = Proxy((host, int(port)))
    access = dict(hub_service.access, address=f"tcp://127.0.0.1:{proxy.port}")
    path = tmp_path / "via-proxy.json"
    path.write_text(json.dumps(access))
    seen: dict[str, list[str]] = {}
    try:
        with rpg.Session(hub=str(path), reconnect_timeout=60) as s:
            _p, umgr = _pilot(s)
            umgr.register_callback(lambda u, st: seen.setdefault(u.uid, []).append(st))
            units = umgr.submit_units([rpg.UnitDescription(
                executable="/bin/sh", arguments=["-c", f"sleep 0.{i % 5}"]) for i in range(60)])
            for _ in range(3):
                time.sleep(1.0)
                proxy.cut()
            assert umgr.wait_units(timeout=90) == ["DONE"] * 60
            more = umgr.submit_units([rpg.UnitDescription(executable="/bin/true")
                                      for _ in range(5)])
            assert umgr.wait_units(more, timeout=30) == ["DONE"] * 5
        assert proxy.cuts >= 1
    finally:
        proxy.close()
    deadline = time.monotonic() + 5
    while sum(map(len, seen.values())) < 65 * (len(UNIT_PATH) - 1) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    for u in units + more:
        assert seen[u.uid] == UNIT_PATH[1:], (u.uid, seen[u.uid])
        assert _states_of(u.history) == ["NEW", *UNIT_PATH[1:]]


def test_sigterm_cancels_running_units_with_hub_stopped_and_leaves_nothing(tmp_path):
    hub = HubProcess(str(tmp_path / "hub"))
    try:
        s = rpg.Session(hub=hub.access_path, reconnect_timeout=3)
        pilot, umgr = _pilot(s, cores=4)
        units = umgr.submit_units([rpg.UnitDescription(executable="/bin/sleep",
                                                       arguments=["60"]) for _ in range(4)])
        umgr.wait_units(state="EXECUTING", timeout=30)
        assert hub.descendants(), "the agent and its units run under the hub"
        assert hub.stop(signal.SIGTERM) == 0
        assert umgr.wait_units(timeout=30) == ["CANCELED"] * 4
        assert all("hub stopped" in (u.reason or "") for u in units), [u.reason for u in units]
        assert {u.reason_code for u in units} == {"hub_stopped"}  # the hub's code, not "agent"
        assert pilot.wait(timeout=10) in states.FINAL
        t0 = time.monotonic()
        s.close()  # the hub said the session ended: nothing to wait for
        assert time.monotonic() - t0 < 2
    finally:
        hub.stop()
    assert b"Traceback" not in hub.log()


def test_cli_status_stop_and_run_through_a_hub(tmp_path):
    hub = HubProcess(str(tmp_path / "hub"))
    cli = [sys.executable, "-m", "rpg.cli"]
    try:
        run = subprocess.run([*cli, "run", "--hub", hub.access_path, "--units", "20",
                              "--cores", "2", "--input-kb", "8", "--sandbox",
                              str(tmp_path / "run")], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "20/20 sha256 sums match" in run.stdout
        status = subprocess.run([*cli, "hub", "status", "--hub", hub.access_path, "--json"],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        st = json.loads(status.stdout)
        (sess,) = st["sessions"]
        assert sess["closed"] and sess["units"] == {"DONE": 20}
        assert "lag_p99_ms" in st["loop"]
        text = subprocess.run([*cli, "hub", "status", "--hub", hub.access_path],
                              capture_output=True, text=True, timeout=30).stdout
        assert sess["uid"] in text and "DONE=20" in text
        stop = subprocess.run([*cli, "hub", "stop", "--hub", hub.access_path],
                              capture_output=True, text=True, timeout=30)
        assert stop.returncode == 0, stop.stderr
        assert hub.proc.wait(60) == 0
    finally:
        hub.stop()


def test_one_service_per_sandbox_and_no_new_token_for_the_owner(hub_service):
    cli = [sys.executable, "-m", "rpg.cli", "hub"]
    second = subprocess.run([*cli, "serve", "--sandbox", hub_service.sandbox],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 2
    assert "runs there already" in second.stderr and str(hub_service.proc.pid) in second.stderr
    owner = subprocess.run([*cli, "token", "--sandbox", hub_service.sandbox,
                            hub_service.access["user"]], capture_output=True, text=True,
                           timeout=30)
    assert owner.returncode == 2 and "owner" in owner.stderr
    with rpg.Session(hub=hub_service.access_path) as s:  # the owner's access still works
        assert s.user == hub_service.access["user"]


def test_serve_refuses_a_non_loopback_address(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rpg.cli", "hub", "serve", "--sandbox",
                          str(tmp_path / "hub"), "--address", "tcp://0.0.0.0:5555"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "loopback" in out.stderr and "ssh://" in out.stderr


def test_a_hub_that_is_not_there_is_a_clear_error(tmp_path):
    path = tmp_path / "gone.json"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path.write_text(json.dumps({"address": f"tcp://127.0.0.1:{port}", "token": "t",
                                "user": "u"}))
    t0 = time.monotonic()
    with pytest.raises(rpg.SessionError, match="did not answer"):
        rpg.Session(hub=str(path), reconnect_timeout=2)
    assert time.monotonic() - t0 < 30
    with pytest.raises(rpg.SessionError, match="cannot read the access file"):
        rpg.Session(hub=str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(rpg.SessionError, match="not JSON"):
        rpg.Session(hub=str(tmp_path / "bad.json"))


def test_outputs_of_units_done_before_their_sliced_submit_returns_are_fetched(
        hub_service, tmp_path, monkeypatch):
    """A submit sent in slices adopts its units only when the last slice returns: units of the
    first slices may be DONE by then, and their client:// outputs must still be fetched."""
    from rpg import client

    monkeypatch.setattr(client, "SUBMIT_SLICE", 2)
    call = client.Remote.call

    def slow_slices(self, method, *args):  # a slow network between slices
        out = call(self, method, *args)
        if method == "submit_units" and len(args[1]) <= 2:
            time.sleep(0.4)
        return out

    monkeypatch.setattr(client.Remote, "call", slow_slices)
    with rpg.Session(hub=hub_service.access_path) as s:
        pilot, umgr = _pilot(s, cores=4)
        assert pilot.wait(state="ACTIVE", timeout=30) == "ACTIVE"
        units = umgr.submit_units([rpg.UnitDescription(
            executable="/bin/sh", arguments=["-c", f"echo {i} > out.txt"],
            output_staging=[{"source": "out.txt",
                             "target": f"client://{tmp_path}/out-{i}.txt"}])
            for i in range(12)])
        assert umgr.wait_units(timeout=60) == ["DONE"] * 12
        for i, u in enumerate(units):
            assert (tmp_path / f"out-{i}.txt").read_text() == f"{i}\n", u.uid
