"""The client's SSH tunnel to a hub service (rpg/hub/launchers/ssh/forward.py), against the real
test sshd: a real zerorpc server on 127.0.0.1 in a subprocess writes its access file, and a
zerorpc client reaches it through ``open_hub_tunnel``; bad host keys and bad access files fail
clearly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import psutil
import pytest
import zerorpc

from rpg.client import SessionError
from rpg.hub.launchers.ssh.forward import open_hub_tunnel, parse_hub_url, validate_access
from rpg.hub.users import write_private_json
from rpg.rpc import no_zero_copy
from tests.sshd_fixture import (
    free_port,
    kill_ssh_sessions_of_this_process,
    requires_sshd,
    resource,
    ssh_env,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVER = textwrap.dedent("""
    import sys
    import zerorpc
    from rpg.hub.users import write_private_json
    from rpg.internals import bound_address

    class Methods:
        def add(self, a, b):
            return a + b

        def echo(self, data):
            return data

    server = zerorpc.Server(Methods(), heartbeat=None)
    server.bind("tcp://127.0.0.1:*")
    write_private_json(sys.argv[1], {"address": bound_address(server), "token": "t0k3n",
                                     "user": "alice"})
    server.run()
""")


@pytest.fixture
def hub_server(tmp_path) -> Iterator[tuple[subprocess.Popen, str]]:
    """A zerorpc server on 127.0.0.1 in a subprocess, and the access file it wrote (0600)."""
    access = str(tmp_path / "access.json")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, access], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(access):
            if proc.poll() is not None:
                pytest.fail(f"server died: {proc.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "server did not write its access file in 10 s"
            time.sleep(0.02)
        yield proc, access
    finally:
        proc.kill()
        proc.wait(10)
        proc.stderr.close()


def read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def ssh_url(path: str) -> str:
    return resource() + path


def tunnel_for(path: str, **kw):
    e = ssh_env()
    kw.setdefault("key_file", e["RPG_SSH_KEY"])
    kw.setdefault("known_hosts", e["RPG_SSH_KNOWN_HOSTS"])
    return open_hub_tunnel(ssh_url(path), timeout=5.0, **kw)


class Client:
    """A zerorpc client with a zmq context of its own (zerorpc's global one lives forever)."""

    def __init__(self, address: str, timeout: float = 10) -> None:
        self.ctx = zerorpc.Context()
        self.c = zerorpc.Client(timeout=timeout, heartbeat=None, context=self.ctx)
        no_zero_copy(self.c)  # zero-copy sends start pyzmq's never-ending gc thread
        self.c.connect(address)

    def __enter__(self):
        return self.c

    def __exit__(self, *exc) -> None:
        self.c.close()
        self.ctx.destroy(linger=0)


def peers(pid: int, port: int) -> set[int]:
    """The ports of the peers connected to ``port`` of the process ``pid``."""
    return {c.raddr.port for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port}


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_parse_hub_url():
    target, path = parse_hub_url("ssh://bob@example.org:2200/tmp/x/access.json")
    assert (target.user, target.host, target.port, path) == ("bob", "example.org", 2200,
                                                            "/tmp/x/access.json")
    assert parse_hub_url("ssh://bob@example.org/~/hub/access.json")[1] == "hub/access.json"
    assert parse_hub_url("ssh://example.org/a.json")[0].user  # the local user
    for bad in ("ssh://bob@example.org", "ssh://bob@example.org/", "ssh://h/~",
                "ssh://@h/a.json", "ssh://h:0/a.json", "ssh://h:x/a.json", "ssh:///a.json",
                "http://h/a.json"):
        with pytest.raises(SessionError, match="ssh://"):
            parse_hub_url(bad)


@requires_sshd
@pytest.mark.timeout(30)
def test_zerorpc_through_the_tunnel(hub_server):
    proc, access_path = hub_server
    remote = read_json(access_path)
    remote_port = int(remote["address"].rsplit(":", 1)[1])
    threads_before = os.listdir("/proc/self/task")
    with tunnel_for(access_path) as tunnel:
        assert {k: v for k, v in tunnel.access.items() if k != "address"} == {
            "token": "t0k3n", "user": "alice"}
        address = tunnel.access["address"]
        assert address.startswith("tcp://127.0.0.1:") and address != remote["address"]
        with Client(address) as c:
            assert [c.add(i, 1) for i in range(20)] == list(range(1, 21))
            big = os.urandom(5 * 1024 * 1024)
            assert c.echo(big) == big
        # A connection dropped at the local end is closed at the hub's end, and one the hub
        # drops is closed here (zmq reconnects by itself; the tunnel only has to pass it on).
        assert wait_for(lambda: not peers(proc.pid, remote_port))
        local_port = int(address.rsplit(":", 1)[1])
        raw = socket.create_connection(("127.0.0.1", local_port), timeout=5)
        try:
            assert wait_for(lambda: len(peers(proc.pid, remote_port)) == 1)
        finally:
            raw.close()
        assert wait_for(lambda: not peers(proc.pid, remote_port))
        raw = socket.create_connection(("127.0.0.1", local_port), timeout=5)
        try:
            assert wait_for(lambda: len(peers(proc.pid, remote_port)) == 1)
            proc.send_signal(signal.SIGKILL)
            while raw.recv(4096):  # zmq's greeting, then the end
                pass
        finally:
            raw.close()
        tunnel.close()
        tunnel.close()  # idempotent
        with pytest.raises(OSError):  # nothing listens any more
            socket.create_connection(("127.0.0.1", local_port), timeout=2).close()
    # the listener, the pump and paramiko's transport thread are gone (conftest checks
    # sockets and child processes too)
    assert wait_for(lambda: len(os.listdir("/proc/self/task")) <= len(threads_before))


@requires_sshd
@pytest.mark.timeout(30)
def test_home_relative_path_and_reconnect_after_the_ssh_connection_drops(hub_server):
    """``/~/PATH`` is relative to the remote home; a dropped SSH connection is made again
    when the client (zmq) connects again, and calls go through once more."""
    proc, access_path = hub_server
    e = ssh_env()
    if e["RPG_SSH_USER"] != psutil.Process().username():
        pytest.skip("the remote home is another user's")
    rel = os.path.relpath(access_path, os.path.expanduser("~"))
    with tunnel_for("/~/" + rel) as tunnel, Client(tunnel.access["address"]) as c:
        assert c.add(2, 3) == 5
        remote_port = int(read_json(access_path)["address"].rsplit(":", 1)[1])
        before = peers(proc.pid, remote_port)
        assert len(before) == 1
        assert kill_ssh_sessions_of_this_process(int(e["RPG_SSH_PORT"]))
        # zmq connects again through the tunnel, which makes a new SSH connection
        assert wait_for(lambda: len(peers(proc.pid, remote_port) - before) == 1, 10)
        assert c.add(4, 5) == 9


@requires_sshd
def test_unknown_host_key_is_refused(tmp_path):
    other = tmp_path / "known_hosts"
    other.write_text("[127.0.0.1]:2299 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2SrxaaMMhL5zSTHOH"
                     "2ubr6QGNd/5BU1AHFAuCmB0yP\n")
    with pytest.raises(SessionError, match=r"hub ssh://.*unknown host key.*not in .*known_hosts"):
        tunnel_for("/tmp/access.json", known_hosts=str(other))
    with pytest.raises(SessionError, match=r"unknown host key.*does not exist"):
        tunnel_for("/tmp/access.json", known_hosts=str(tmp_path / "missing"))


@requires_sshd
@pytest.mark.parametrize("content, error", [
    (None, r"no access file /\S+/access\.json on root@127\.0\.0\.1:\d+ \(is the hub"),
    ("{not json", r"the access file is not JSON"),
    ({"address": "tcp://10.1.2.3:4000", "token": "t0k3n", "user": "u"},
     r"'address' must be tcp://127\.0\.0\.1:PORT .*, not 'tcp://10\.1\.2\.3:4000'"),
    ("FREE_PORT", r"nothing answers at 127\.0\.0\.1:\d+ on root@\S+, the access file's "
                  r"'address' \(is the hub service running\?\)"),
])
def test_bad_access_files_fail_clearly(tmp_path, content, error):
    """Over SSH and SFTP: a missing file, one that is not JSON, a hub not on loopback, and
    a stale one (nothing listens at its address)."""
    path = str(tmp_path / "access.json")
    if content == "FREE_PORT":
        content = {"address": f"tcp://127.0.0.1:{free_port()}", "token": "t0k3n", "user": "u"}
    if isinstance(content, str):
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
            fh.write(content)
    elif content is not None:
        write_private_json(path, content)
    with pytest.raises(SessionError, match=r"^hub ssh://\S+/access\.json: .*" + error) as info:
        tunnel_for(path)
    assert "t0k3n" not in str(info.value)


@pytest.mark.parametrize("content, error", [
    (b"\xff\xfe", r"not JSON"),
    (b"[1, 2]", r"not a JSON object"),
    ({"token": "t", "user": "u"}, r"has no 'address'"),
    ({"address": 5, "token": "t", "user": "u"}, r"has no 'address'"),
    ({"address": "tcp://0.0.0.0:4000", "token": "t", "user": "u"}, r"'address' must be"),
    ({"address": "tcp://127.0.0.1:99999", "token": "t", "user": "u"}, r"'address' must be"),
    ({"address": "tcp://127.0.0.1:4000/x", "token": "t", "user": "u"}, r"'address' must be"),
    ({"address": "ipc:///tmp/hub", "token": "t", "user": "u"}, r"'address' must be"),
    ({"address": "tcp://127.0.0.1:4000", "token": "", "user": "u"}, r"has no 'token'"),
    ({"address": "tcp://127.0.0.1:4000", "user": "u"}, r"has no 'token'"),
    ({"address": "tcp://localhost:4000", "token": "t", "user": 7}, r"has no 'user'"),
])
def test_access_file_fields_are_checked(content, error):
    raw = content if isinstance(content, bytes) else json.dumps(content).encode()
    with pytest.raises(SessionError, match=r"^hub ssh://h/a\.json: .*" + error):
        validate_access("ssh://h/a.json", raw)
    ok = {"address": "tcp://localhost:4000", "token": "t", "user": "u", "extra": 1}
    assert validate_access("ssh://h/a.json", json.dumps(ok).encode()) == (
        ok, ("127.0.0.1", 4000))
    ok["address"] = "tcp://[::1]:4001"
    assert validate_access("ssh://h/a.json", json.dumps(ok).encode())[1] == ("::1", 4001)


def test_a_monkey_patched_application_is_told_at_once():
    """paramiko cannot run on real threads once socket/threading are gevent's: a clear error
    before any connection, not a client that times out."""
    code = textwrap.dedent("""
        from gevent import monkey
        monkey.patch_all()
        from rpg.client import SessionError
        from rpg.hub.launchers.ssh.forward import open_hub_tunnel
        try:
            open_hub_tunnel("ssh://nobody@192.0.2.1/tmp/access.json")
        except SessionError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=30, env={**os.environ, "PYTHONPATH": REPO})
    assert "monkey-patched socket and threading with gevent" in out.stdout, out.stderr[-2000:]
    assert "ssh -N -L" in out.stdout


@requires_sshd
def test_a_session_on_a_real_hub_service_through_ssh(hub_service, tmp_path):
    """rpg.Session(hub="ssh://...") against a real ``rpg hub serve``: units run, client://
    files go both ways through the tunnel and the hub, and close leaves nothing behind."""
    import rpg

    e = ssh_env()
    src = tmp_path / "in.txt"
    src.write_text("through the tunnel\n")
    url = resource() + hub_service.access_path
    with rpg.Session(hub=url, ssh_key=e["RPG_SSH_KEY"],
                     known_hosts=e["RPG_SSH_KNOWN_HOSTS"]) as s:
        assert s.hub_address != hub_service.access["address"]  # the local end of the tunnel
        pilot = rpg.PilotManager(s).submit_pilots(rpg.PilotDescription(resource="local",
                                                                       cores=1))
        umgr = rpg.UnitManager(s)
        umgr.add_pilots(pilot)
        u = umgr.submit_units(rpg.UnitDescription(
            executable="/bin/sh", arguments=["-c", "tr a-z A-Z < in.txt > out.txt"],
            input_staging=[{"source": f"client://{src}", "target": "in.txt"}],
            output_staging=[{"source": "out.txt", "target": f"client://{tmp_path}/out.txt"}]))
        assert u.wait(timeout=60) == "DONE", u.reason
        assert (tmp_path / "out.txt").read_text() == "THROUGH THE TUNNEL\n"
    with pytest.raises(SessionError, match="host key|known_hosts"):
        rpg.Session(hub=url, ssh_key=e["RPG_SSH_KEY"],
                    known_hosts=str(tmp_path / "empty_known_hosts"))
