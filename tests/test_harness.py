"""tools.simulated_disk_io: the protocol byte for byte, rc 1 / rc 2, blocking vs offload, stress,
and its packaging (installed as ``simulated_disk_io``, never as a top-level ``tools``).

Real server subprocesses on 127.0.0.1 (port 0), real sockets, real blocking reads, a real wheel
built and installed. Stalls are short (about a second) with proportionally short client timeouts
so the file runs quickly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from time import monotonic, perf_counter, sleep
from typing import Any

import psutil
import pytest

from tools.simulated_disk_io import stress
from tools.simulated_disk_io.client import plan
from tools.simulated_disk_io.disk import disk_of
from tools.simulated_disk_io.server import parse_request

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO_ROOT)

pytestmark = pytest.mark.timeout(90)


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Any) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.log_text: str | None = None  # set when the server has been stopped
        self.final_stats: dict | None = None

    def stderr(self) -> str:
        """The server's stderr (structlog JSON lines, tracebacks), for failure messages."""
        if self.log_text is None:
            self.log.seek(0)
            return self.log.read().decode(errors="replace")[-4000:]
        return self.log_text


@contextlib.contextmanager
def running_server(*flags: str) -> Iterator[Server]:
    """A server subprocess on a free port; always terminated and reaped."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tools.simulated_disk_io.server", "--port", "0", *flags],
            cwd=REPO_ROOT, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=log,
        )
        server = None
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 30.0)
            assert ready, "server did not start within 30 s"
            line = proc.stdout.readline().decode()
            m = re.fullmatch(r"listening 127\.0\.0\.1:(\d+)\n", line)
            assert m, f"unexpected first line {line!r}"
            server = Server(proc, int(m.group(1)), log)
            yield server
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            if server is not None:
                server.log_text = server.stderr()
                for text in out.decode().splitlines():
                    if text.startswith("stats "):
                        server.final_stats = json.loads(text[6:])


def exchange(port: int, data: bytes, timeout: float = 10.0, half_close: bool = False) -> bytes:
    """Send ``data`` on a fresh connection and read everything up to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_to_eof(sock)


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# -- the protocol ---------------------------------------------------------------------------------


def test_replies_match_the_protocol_byte_for_byte():
    with running_server("--mode", "offload") as srv:
        path = "sdb/objects/a b ü;x".encode()
        t0 = perf_counter()
        reply = exchange(srv.port, b"0,120," + path + b"\n")
        took_ms = (perf_counter() - t0) * 1000
        m = re.fullmatch(rb"0,(\d+)," + re.escape(path) + rb"\n", reply)
        assert m, reply
        assert 120 <= int(m.group(1)) <= took_ms + 1
        # CRLF line ends are accepted; the path is echoed without the CR.
        assert re.fullmatch(rb"0,\d+,sdc/x\n", exchange(srv.port, b"0,0,sdc/x\r\n"))
        # Like `nc host 7000 < file_list.txt`: a line, then EOF (no newline needed).
        assert re.fullmatch(rb"0,\d+,some_file\n",
                            exchange(srv.port, b"0,5,some_file", half_close=True))
        # The client's rc field is any integer and does not change the server's status.
        assert re.fullmatch(rb"0,\d+,some_file\n", exchange(srv.port, b"7,5,some_file\n"))
        stats = json.loads(exchange(srv.port, b"stats\n"))
        assert stats["mode"] == "offload"
        assert stats["rc0"] == 4 and stats["loop_blocked_events"] == 0
        assert set(stats["lanes"]) == {"disk:sdb", "disk:sdc", "disk:default"}
    assert srv.proc.returncode == 0, srv.stderr()
    assert srv.final_stats is not None and srv.final_stats["threads_stuck_at_exit"] == 0


@pytest.mark.parametrize("line, echoed", [
    (b"a,b\n", b""),  # two fields
    (b"0,1,2,3\n", b""),  # four fields
    (b"\n", b""),  # empty line
    (b"0,abc,sdb/x\n", b"sdb/x"),  # non-integer disk_read_ms
    (b"0,1.5,sdb/x\n", b"sdb/x"),
    (b"0,-5,sdb/x\n", b"sdb/x"),
    (b"0, 5,sdb/x\n", b"sdb/x"),
    (b"x,5,sdb/x\n", b"sdb/x"),  # non-integer rc field
    (b"0,5,\n", b""),  # empty path
    (b"0,9999999,sdb/x\n", b"sdb/x"),  # longer than --max-read-ms
])
def test_bad_input_gets_rc_2(line, echoed):
    req = parse_request(line.rstrip(b"\n"), max_read_ms=60_000)
    assert req.bad and req.path == echoed


def test_bad_lines_on_the_wire_get_rc_2():
    with running_server("--mode", "blocking", "--max-read-ms", "1000") as srv:
        assert re.fullmatch(rb"2,\d+,\n", exchange(srv.port, b"a,b\n"))
        assert re.fullmatch(rb"2,\d+,sdb/x\n", exchange(srv.port, b"0,abc,sdb/x\n"))
        assert re.fullmatch(rb"2,\d+,sdb/x\n", exchange(srv.port, b"0,1001,sdb/x\n"))
        assert re.fullmatch(rb"2,\d+,\n", exchange(srv.port, b"0,5," + b"p" * 5000 + b"\n"))
        assert re.fullmatch(rb"0,\d+,sdb/x\n", exchange(srv.port, b"0,1000,sdb/x\n"))
        stats = json.loads(exchange(srv.port, b"stats\n"))
        assert stats["rc2"] == 4 and stats["rc0"] == 1


def test_paths_map_to_disks():
    assert disk_of(b"sdb/objects/1") == "sdb"
    assert disk_of(b"/sdc/objects/1") == "sdc"
    assert disk_of(b"some_file") == "default"
    assert disk_of(b"sdb") == "default"
    assert plan(2, 4, 10, 1000, 2, 3)[0][0].path.startswith(b"sdb/")  # stalls on the first disk


# -- queue timeouts (rc 1) ------------------------------------------------------------------------


def test_queue_timeout_in_blocking_mode_gives_rc_1():
    # Queue time runs from accept (as in the original), so A must send its line well within the
    # queue timeout, and B, accepted at the same time, waits behind A's 1 s read on the loop.
    with running_server("--mode", "blocking", "--queue-timeout-ms", "800") as srv:
        a = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        b = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        try:
            sleep(0.2)  # the server has accepted both; their queue time runs from here
            a.sendall(b"0,1000,sdb/a\n")
            sleep(0.1)  # A's read now blocks the loop; B waits behind it
            b.sendall(b"0,5,sdb/b\n")
            ra, rb = read_to_eof(a), read_to_eof(b)
        finally:
            a.close()
            b.close()
        ma = re.fullmatch(rb"0,(\d+),sdb/a\n", ra)
        mb = re.fullmatch(rb"1,(\d+),sdb/b\n", rb)
        assert ma and mb, (ra, rb)
        assert int(ma.group(1)) >= 1000 and int(mb.group(1)) >= 1000
        stats = json.loads(exchange(srv.port, b"stats\n"))
        assert stats["rc1"] == 1 and stats["loop_blocked_events"] >= 1


def test_queue_timeout_in_a_lane_gives_rc_1_and_other_disks_go_on():
    flags = ("--mode", "offload", "--threads-per-disk", "1", "--queue-timeout-ms", "300")
    with running_server(*flags) as srv:
        socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(3)]
        try:
            socks[0].sendall(b"0,1000,sdb/slow\n")
            sleep(0.1)
            t0 = perf_counter()
            socks[1].sendall(b"0,5,sdb/queued\n")  # same disk: waits for its only thread
            socks[2].sendall(b"0,5,sdc/fast\n")  # another disk: not held by sdb's stall
            fast = read_to_eof(socks[2])
            fast_s = perf_counter() - t0
            replies = [read_to_eof(s) for s in socks[:2]]
        finally:
            for s in socks:
                s.close()
        assert re.fullmatch(rb"0,\d+,sdc/fast\n", fast) and fast_s < 0.5
        assert re.fullmatch(rb"0,\d+,sdb/slow\n", replies[0])
        m = re.fullmatch(rb"1,(\d+),sdb/queued\n", replies[1])
        assert m and int(m.group(1)) >= 800, replies[1]


def test_fifo_stalls_are_real_reads_and_are_released_at_exit():
    flags = ("--mode", "offload", "--stall", "fifo", "--fifo-min-ms", "100")
    with running_server(*flags) as srv:
        reply = exchange(srv.port, b"0,300,sdb/fifo\n")
        m = re.fullmatch(rb"0,(\d+),sdb/fifo\n", reply)
        assert m and int(m.group(1)) >= 300
        # A FIFO read still blocked when the server is told to stop is released, not left stuck.
        hung = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        try:
            hung.sendall(b"0,30000,sdb/dying\n")
            sleep(0.3)
            stats = json.loads(exchange(srv.port, b"stats\n"))
            assert stats["stalls_pending"] == 1
            assert stats["lanes"]["disk:sdb"]["running"] == 1
            assert stats["loop_blocked_events"] == 0, srv.stderr()
        finally:
            hung.close()
    assert srv.proc.returncode == 0, srv.stderr()
    assert srv.final_stats["threads_stuck_at_exit"] == 0


# -- blocking vs offload under the client mix -----------------------------------------------------

MIX = {"clients": 4, "requests": 3, "fast_ms": 5, "stall_ms": 1200, "stall_every": 3, "disks": 2,
       "timeout": 2.0}


def test_blocking_mode_produces_timeouts():
    # Two clients stall on their first request at once: on a blocked loop the second waits for
    # the first, 2.4 s > the 2 s client timeout.
    r = stress.run(mode="blocking", **MIX)
    assert r["timeouts"] >= 1, r
    assert r["loop_blocked_events"] >= 1
    assert r["server_exit_code"] == 0


def test_offload_mode_produces_no_timeouts():
    r = stress.run(mode="offload", **MIX)
    assert r["timeouts"] == 0, r
    assert r["errors"] == 0, r
    assert r["loop_blocked_events"] == 0
    assert r["stalled_requests"] == 4 and r["ok"] == 12
    assert r["fast_p99_ms"] < 1000


# -- the stress command ---------------------------------------------------------------------------


def run_module(module: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"tools.simulated_disk_io.{module}", *args],
                          cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_stress_json_emits_all_required_keys():
    p = run_module("stress", "--json", "--mode", "offload", "--clients", "3", "--requests",
                   "4", "--fast-ms", "2", "--stall-ms", "300", "--stall-every", "2",
                   "--disks", "3", "--timeout", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout)
    for key in stress.REQUIRED_KEYS:
        assert key in r, key
    assert r["mode"] == "offload" and r["clients"] == 3 and r["requests"] == 4
    assert r["requests_total"] == 12 and r["timeouts"] == 0 and r["errors"] == 0
    assert r["loop_blocked_events"] == 0
    assert r["server_cpu_s"] > 0 and r["server_peak_rss_mb"] > 5
    assert 2 <= r["fast_p50_ms"] <= r["fast_p99_ms"]


def test_stress_human_summary():
    p = run_module("stress", "--clients", "2", "--requests", "2", "--fast-ms", "1",
                   "--stall-every", "0")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "mode=offload" in p.stdout and "timeouts   0" in p.stdout


@pytest.mark.parametrize("module, args, flag", [
    ("stress", ["--clients", "0"], "--clients"),
    ("stress", ["--mode", "fast"], "--mode"),
    ("client", ["--timeout", "soon"], "--timeout"),
    ("client", ["--port", "0"], "--port"),
    ("server", ["--port", "70000"], "--port"),
    ("server", ["--queue-timeout-ms", "x"], "--queue-timeout-ms"),
])
def test_bad_cli_input_names_the_flag(module, args, flag):
    p = run_module(module, *args, timeout=30)
    assert p.returncode == 2
    assert f"argument {flag}:" in p.stderr, p.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stress_stops_and_reaps_the_server_when_interrupted(sig):
    # A shell that starts a job in the background makes it ignore SIGINT, and children inherit
    # that; restore Python's Ctrl-C handler, as an interactive shell would have it.
    code = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler);"
            " sys.argv[0] = 'stress';"
            " runpy.run_module('tools.simulated_disk_io.stress', run_name='__main__')")
    p = subprocess.Popen(
        [sys.executable, "-c", code, "--clients", "2", "--requests", "50", "--stall-every", "1",
         "--stall-ms", "3000", "--timeout", "5"],
        cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        me = psutil.Process(p.pid)
        deadline = monotonic() + 30
        servers: list[psutil.Process] = []
        while not servers and monotonic() < deadline:
            servers = [c for c in me.children() if "simulated_disk_io.server" in " ".join(
                c.cmdline())]
            sleep(0.05)
        assert servers, "stress never started its server"
        sleep(1.0)  # the clients are in their stalled reads now
        t0 = monotonic()
        p.send_signal(sig)
        _, err = p.communicate(timeout=20)
        assert p.returncode == 130, err
        assert monotonic() - t0 < 10
        assert b"interrupted" in err
        assert not psutil.pid_exists(servers[0].pid) or \
            servers[0].status() == psutil.STATUS_ZOMBIE and servers[0].ppid() != p.pid
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


# -- packaging: installed as simulated_disk_io, with no top-level "tools" -------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of the working tree, built offline (no index, no build isolation) from a copy of
    what the build reads: setuptools writes build/ and *.egg-info into the tree it builds, and a
    stale build/lib would leak old files into later wheels."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(os.path.join(REPO_ROOT, name), src / name)
    for name in ("rpg", "tools"):
        shutil.copytree(os.path.join(REPO_ROOT, name), src / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    p = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=80, check=False)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (whl,) = (tmp / "dist").glob("rpg-*.whl")
    return whl


def test_wheel_has_the_harness_as_simulated_disk_io_and_no_tools_package(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    top = {n.split("/", 1)[0] for n in names}
    (dist_info,) = [t for t in top if t.endswith(".dist-info")]
    assert top == {"rpg", "simulated_disk_io", dist_info}, top
    assert not [n for n in names if n.startswith("tools/")]
    harness = os.path.join(REPO_ROOT, "tools", "simulated_disk_io")
    for module in sorted(f for f in os.listdir(harness) if f.endswith(".py")):
        assert f"simulated_disk_io/{module}" in names, module
    # Every module under rpg/ ships, so a new subpackage (rpg/staging/, ...) needs no listing.
    for root, dirs, files in os.walk(os.path.join(REPO_ROOT, "rpg")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), REPO_ROOT).replace(os.sep, "/")
                assert rel in names, rel


def test_rpg_stress_runs_from_the_installed_wheel_outside_the_repo(wheel, tmp_path):
    site = tmp_path / "site"
    p = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
         str(site), str(wheel)], capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert (site / "simulated_disk_io" / "server.py").is_file()
    assert not (site / "tools").exists()
    env = dict(os.environ, PYTHONPATH=str(site))  # the installed copy, not the checkout
    where = subprocess.run(
        [sys.executable, "-c", "import json, rpg.cli, simulated_disk_io.stress as s;"
         " print(json.dumps([rpg.cli.__file__, s.__file__, s.IMPORT_ROOT, s.SERVER_MODULE]))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert where.returncode == 0, where.stderr[-2000:]
    cli_file, stress_file, root, server_module = json.loads(where.stdout)
    assert cli_file.startswith(str(site)) and stress_file.startswith(str(site))
    assert root == str(site) and server_module == "simulated_disk_io.server"

    def rpg_stress(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "rpg.cli", "stress", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=60, check=False)

    usage = rpg_stress("--help")
    assert usage.returncode == 0 and usage.stdout.startswith("usage: rpg stress"), usage.stdout
    p = rpg_stress("--json", "--clients", "2", "--requests", "4", "--fast-ms", "2",
                   "--stall-ms", "300", "--stall-every", "2", "--timeout", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout)
    assert r["requests_total"] == 8 and r["ok"] == 8, r
    assert r["timeouts"] == 0 and r["errors"] == 0 and r["loop_blocked_events"] == 0, r
    assert r["server_exit_code"] == 0, r
