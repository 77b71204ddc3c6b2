"""The slow-disk stress harness: start the server in a mode, run the clients, measure, reap.

``python -m tools.simulated_disk_io.stress --mode blocking`` (installed: ``python -m
simulated_disk_io.stress``) reproduces the seed experiment's hang (client timeouts, loop
blocked); ``--mode offload`` shows the cure (no timeouts, fast reads as fast as without stalls).
``--json`` prints one JSON object. ``main(argv, prog)`` is the entry point ``rpg stress`` calls;
``run(...)`` returns the same dict for benchmarks and tests, and ``server_running(...)`` gives a
started server that is always stopped and reaped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from time import perf_counter
from typing import Any

import gevent
import psutil

from rpg.io_pool import Child, IOPool, IOTimeout, blocking
from rpg.io_pool.process import watch
from rpg.log import get_logger

from .client import (
    add_load_flags,
    format_summary,
    int_flag,
    load_kwargs,
    request_once,
    run_clients,
)
from .server import MODES


def _import_root() -> str:
    """The sys.path entry this package was imported from: the repository root when it is
    ``tools.simulated_disk_io``, site-packages (or a ``--target`` dir) when it is the installed
    ``simulated_disk_io``. The server subprocess imports the harness from the same place."""
    path = os.path.dirname(os.path.abspath(__file__))
    for _ in __package__.split("."):
        path = os.path.dirname(path)
    return path


IMPORT_ROOT = _import_root()
SERVER_MODULE = f"{__package__}.server"  # the server under the name this harness was imported as
REQUIRED_KEYS = ("mode", "clients", "requests", "timeouts", "errors", "fast_p50_ms",
                 "fast_p99_ms", "loop_blocked_events", "server_cpu_s", "server_peak_rss_mb")

_log = get_logger("simulated_disk_io.stress")


class HarnessError(RuntimeError):
    """The server could not be started."""


class ServerProcess:
    """The server as a child process (own process group), started and reaped through io_pool.

    Use ``server_running(...)``, which always stops and reaps it.
    """

    def __init__(self, pool: IOPool, argv: list[str], log_path: str) -> None:
        self.pool = pool
        self.argv = argv
        self.log_path = log_path
        self.child: Child | None = None
        self._popen: Any = None
        self._proc: psutil.Process | None = None
        self._sampler: Any = None
        self._peak_rss = 0.0
        self.host = ""
        self.port = 0
        self.startup_s = 0.0
        self.final_stats: dict[str, Any] | None = None
        self.exit_code: int | None = None

    def _start_blocking(self) -> Child:
        # Runs in the spawn lane: Popen and pidfd_open are blocking calls.
        env = dict(os.environ)
        env["PYTHONPATH"] = IMPORT_ROOT + (os.pathsep + env["PYTHONPATH"]
                                           if env.get("PYTHONPATH") else "")
        with open(self.log_path, "ab") as log:
            popen = blocking.Popen(
                self.argv, stdin=blocking.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                cwd=IMPORT_ROOT, env=env, start_new_session=True, close_fds=True,
            )
        self._popen = popen
        return watch(popen)

    def _keep_child(self, child: Child) -> None:
        self.child = child

    def start(self, ready_timeout: float = 20.0) -> tuple[str, int]:
        """Start the server and wait for its ``listening HOST:PORT`` line."""
        t0 = perf_counter()
        # A start interrupted here (Ctrl-C) still hands its Child to stop(): the spawn may
        # complete after the caller has been interrupted.
        self.child = self.pool.spawn.run(self._start_blocking, timeout=30.0,
                                         keep=self._keep_child)
        try:
            line = self.pool.spawn.run(self._popen.stdout.readline, timeout=ready_timeout)
        except IOTimeout:
            raise HarnessError(f"server did not say it was listening within {ready_timeout:g} s"
                               f"{self._log_tail()}") from None
        text = line.decode("utf-8", "replace").strip()
        if not text.startswith("listening "):
            raise HarnessError(f"server failed to start: {text or 'no output'}{self._log_tail()}")
        host, _, port = text[len("listening "):].rpartition(":")
        self.host, self.port = host, int(port)
        self.startup_s = perf_counter() - t0
        self._proc = psutil.Process(self.child.pid)
        self._sampler = gevent.spawn(self._sample_rss)
        return self.host, self.port

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def _sample_rss(self) -> None:
        assert self._proc is not None
        while True:
            try:  # procfs: memory, not disk; cheap enough for the loop
                self._peak_rss = max(self._peak_rss, self._proc.memory_info().rss / 2**20)
            except psutil.Error:
                return
            gevent.sleep(0.1)

    def stats(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """The running server's stats (the ``stats`` request line); None if it cannot say."""
        try:
            reply, _ = request_once(self.host, self.port, b"stats\n", timeout)
            return json.loads(reply)
        except (OSError, ValueError):
            return None

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server has used so far."""
        assert self._proc is not None
        cpu = self._proc.cpu_times()
        return cpu.user + cpu.system

    def peak_rss_mb(self) -> float:
        """The kernel's high-water mark of the server's RSS (VmHWM), else the sampled peak."""
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as fh:  # procfs: memory
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return max(int(line.split()[1]) / 1024.0, self._peak_rss)
        except OSError:
            pass
        return self._peak_rss

    def stop(self, grace: float = 3.0) -> int | None:
        """SIGTERM the server's group, SIGKILL it after ``grace`` s; reap it; keep its stats."""
        if self._sampler is not None:
            self._sampler.kill()
            self._sampler = None
        if self.child is None:
            return None
        try:
            self.exit_code = self.child.terminate(grace=grace)
            rest = self.pool.spawn.run(self._popen.stdout.read, timeout=10.0)
            for line in rest.decode("utf-8", "replace").splitlines():
                if line.startswith("stats "):
                    self.final_stats = json.loads(line[len("stats "):])
        finally:
            if self.child.returncode is None:  # terminate was interrupted: kill and reap anyway
                self.child.kill_group(signal.SIGKILL)
                self.child.wait(timeout=10.0)
            self._popen.stdout.close()
        return self.exit_code

    def _log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                tail = fh.read().splitlines()[-lines:]
        except OSError:
            return ""
        return ("\nserver log (" + self.log_path + "):\n  " + "\n  ".join(tail)) if tail else ""


@contextmanager
def server_running(mode: str = "offload", host: str = "127.0.0.1", port: int = 0,
                   threads_per_disk: int = 8, stall: str = "sleep",
                   queue_timeout_ms: int = 4000, max_read_ms: int = 60_000,
                   server_log: str | None = None) -> Iterator[ServerProcess]:
    """A started server subprocess; stopped and reaped on exit, also on errors and Ctrl-C.

    Runs on the calling thread's gevent loop. The server's stderr (structlog JSON lines) goes to
    ``server_log``, or to a temp file that is removed unless something failed.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    own_log = server_log is None
    if server_log is None:
        fd, server_log = tempfile.mkstemp(prefix="rpg-simdisk-server-", suffix=".log")
        os.close(fd)
    argv = [sys.executable, "-m", SERVER_MODULE, "--mode", mode,
            "--host", host, "--port", str(port), "--threads-per-disk", str(threads_per_disk),
            "--stall", stall, "--queue-timeout-ms", str(queue_timeout_ms),
            "--max-read-ms", str(max_read_ms), "--parent-pid", str(os.getpid())]
    pool = IOPool(disk_threads=1, spawn_threads=2, net_threads=1)
    server = ServerProcess(pool, argv, server_log)
    failed = True
    try:
        server.start()
        yield server
        failed = False
    except (KeyboardInterrupt, gevent.GreenletExit):
        failed = False  # interrupted, not broken: no log to keep
        raise
    finally:
        try:
            server.stop()
        finally:
            pool.close(wait=2.0)
            if own_log and not failed:
                os.unlink(server_log)
            elif failed:
                _log.warning("stress_failed", server_log=server_log)


def run(mode: str = "offload", clients: int = 5, requests: int = 20, fast_ms: int = 10,
        stall_ms: int = 4000, stall_every: int = 20, disks: int = 4, timeout: float = 5.0,
        stallers: int = 0, host: str = "127.0.0.1", port: int = 0,
        threads_per_disk: int | None = None, stall: str = "sleep",
        queue_timeout_ms: int = 4000, server_log: str | None = None) -> dict[str, Any]:
    """Start the server, run the clients against it, stop and reap it; return the measurements.

    The result has at least the keys in REQUIRED_KEYS; ``requests`` is per client.
    """
    tpd = threads_per_disk or max(8, clients + stallers)
    with server_running(mode, host=host, port=port, threads_per_disk=tpd, stall=stall,
                        queue_timeout_ms=queue_timeout_ms,
                        max_read_ms=max(60_000, stall_ms, fast_ms),
                        server_log=server_log) as server:
        res = run_clients(host=server.host, port=server.port, clients=clients,
                          requests=requests, fast_ms=fast_ms, stall_ms=stall_ms,
                          stall_every=stall_every, disks=disks, timeout=timeout,
                          stallers=stallers)
        # A blocking server may still be working off reads whose clients gave up: give it time.
        stats = server.stats(timeout=max(10.0, (clients + stallers) * stall_ms / 1000.0 + 5.0))
        cpu_s = server.cpu_s()
        peak_mb = server.peak_rss_mb()
    if stats is None:
        stats = server.final_stats or {}
    summary = res.summary()
    return {
        "mode": mode,
        "clients": clients,
        "requests": requests,
        "timeouts": summary["timeouts"],
        "errors": summary["errors"],
        "fast_p50_ms": summary["fast_p50_ms"],
        "fast_p99_ms": summary["fast_p99_ms"],
        "loop_blocked_events": stats.get("loop_blocked_events"),
        "server_cpu_s": round(cpu_s, 3),
        "server_peak_rss_mb": round(peak_mb, 1),
        **summary,
        "loop_lag_max_ms": stats.get("loop_lag_max_ms"),
        "server_requests": stats.get("requests"),
        "disks": disks,
        "fast_ms": fast_ms,
        "stall_ms": stall_ms,
        "stall_every": stall_every,
        "stallers": stallers,
        "timeout_s": timeout,
        "threads_per_disk": tpd,
        "stall": stall,
        "server_startup_s": round(server.startup_s, 3),
        "server_exit_code": server.exit_code,
    }


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or f"python -m {__package__}.stress",
        description="Start the simulated disk I/O server in a mode, load it with clients that "
                    "hit one stalling disk, and report timeouts, fast-read latency, loop blocks, "
                    "server CPU and memory.",
    )
    p.add_argument("--mode", choices=MODES, default="offload",
                   help="server mode: blocking (the hang) or offload (the cure). Default offload")
    p.add_argument("--port", type=int_flag(0, 65535), default=0,
                   help="server port (default 0: a free port)")
    add_load_flags(p)
    p.add_argument("--threads-per-disk", type=int_flag(1, 1024), default=None,
                   help="threads in each disk lane of the server "
                        "(default max(8, clients + stallers))")
    p.add_argument("--stall", choices=("sleep", "fifo"), default="sleep",
                   help="the server's blocking primitive for reads (default sleep)")
    p.add_argument("--queue-timeout-ms", type=int_flag(1), default=4000,
                   help="the server's queue timeout (rc 1), ms (default 4000)")
    p.add_argument("--server-log", default=None,
                   help="keep the server's stderr (structlog JSON lines) in this file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def format_report(r: dict[str, Any]) -> str:
    stalls = (f"every {r['stall_every']}th read of a client stalls {r['stall_ms']} ms on disk sdb"
              if r["stall_every"] else "no stalls")
    if r.get("stallers"):
        stalls += f", {r['stallers']} staller(s) keep sdb stalled"
    head = (f"simulated disk I/O stress: mode={r['mode']}, {r['clients']} clients x "
            f"{r['requests']} requests, {r['disks']} disks, fast reads {r['fast_ms']} ms, "
            f"{stalls}, client timeout {r['timeout_s']:g} s")
    server = (f"  server     loop blocked events {r['loop_blocked_events']}, "
              f"max loop lag {r['loop_lag_max_ms']} ms, CPU {r['server_cpu_s']:.2f} s, "
              f"peak RSS {r['server_peak_rss_mb']:.1f} MB")
    if r["timeouts"]:
        verdict = "  verdict    PROBLEM: requests timed out while one disk stalled"
    elif r["errors"]:
        verdict = "  verdict    no timeouts, but errors (see above)"
    else:
        verdict = "  verdict    no timeouts: the stalling disk held only its own lane"
    return "\n".join([head, format_summary(r), server, verdict])


def _wake_for_signals(period: float = 0.2) -> None:
    # CPython runs signal handlers on the main thread between bytecodes. A signal the kernel
    # delivers to a lane thread does not interrupt the loop's epoll_wait, so without some event
    # Ctrl-C could wait for the next timer (up to a minute); this greenlet is that event.
    while True:
        gevent.sleep(period)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The CLI (and ``rpg stress``): 0 when the run completed, 2 if the server would not start,
    130 when interrupted. Prints the human summary, or one JSON object with ``--json``."""
    args = build_parser(prog).parse_args(argv)
    restore = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so the server is stopped and reaped on the way out.
        def _on_term(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        restore = signal.signal(signal.SIGTERM, _on_term)
    waker = gevent.spawn(_wake_for_signals)
    try:
        result = run(mode=args.mode, host=args.host, port=args.port,
                     threads_per_disk=args.threads_per_disk, stall=args.stall,
                     queue_timeout_ms=args.queue_timeout_ms, server_log=args.server_log,
                     **load_kwargs(args))
    except HarnessError as exc:
        print(f"stress: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stress: interrupted; server stopped and reaped", file=sys.stderr)
        return 130
    finally:
        waker.kill()
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
