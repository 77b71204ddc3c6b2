"""The simulated disk I/O object server: the seed experiment's line protocol on gevent.

One request per TCP connection. The client sends ``<rc>,<disk_read_ms>,<file_path>\\n``; the
server performs a simulated disk read of ``disk_read_ms`` (a real blocking call), replies
``<rc>,<total_ms>,<file_path>\\n`` and closes. ``total_ms`` is measured from accept, in real
milliseconds. See README.md for the status codes and the edge cases.

``--mode blocking`` reads on the gevent loop (the seed experiment's hang); ``--mode offload``
reads in the io_pool lane of the request's disk (the cure). Run it with
``python -m tools.simulated_disk_io.server --mode offload``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from time import monotonic, perf_counter, time
from typing import Any

import gevent
import gevent.event
from gevent.server import StreamServer

from rpg.io_pool import IOPool, LaneClosed, LaneFull, LoopWatch
from rpg.log import get_logger

from .client import float_flag, int_flag
from .disk import DEFAULT_DISK, SimulatedDisks, disk_of

RC_OK = 0
RC_QUEUE_TIMEOUT = 1
RC_BAD_INPUT = 2

MODES = ("blocking", "offload")
MAX_LINE = 4096
STATS_LINE = b"stats"

_RC_FIELD = re.compile(rb"-?[0-9]{1,9}")
_MS_FIELD = re.compile(rb"[0-9]{1,9}")


@dataclass(frozen=True)
class Request:
    """A parsed request line. ``bad`` requests get rc 2 and echo ``path`` (maybe empty)."""

    read_ms: int
    path: bytes
    bad: bool = False


def parse_request(line: bytes, max_read_ms: int) -> Request:
    """Parse one request line (without its line terminator).

    Exactly three comma-separated fields. The first (the client's rc) must be an integer and is
    otherwise ignored; ``disk_read_ms`` must be decimal digits and at most ``max_read_ms``; the
    path must be non-empty and is echoed byte for byte. Anything else is bad input: the reply
    echoes the path field if the line had exactly three fields, else an empty path.
    """
    fields = line.split(b",")
    if len(fields) != 3:
        return Request(0, b"", bad=True)
    rc, ms, path = fields
    if not path or not _RC_FIELD.fullmatch(rc) or not _MS_FIELD.fullmatch(ms):
        return Request(0, path, bad=True)
    read_ms = int(ms)
    if read_ms > max_read_ms:
        return Request(0, path, bad=True)
    return Request(read_ms, path)


def format_reply(rc: int, total_ms: int, path: bytes) -> bytes:
    return b"%d,%d,%s\n" % (rc, total_ms, path)


def _ms_since(t0: float) -> int:
    return round((perf_counter() - t0) * 1000.0)


class _TimestampingServer(StreamServer):
    """A StreamServer whose handler also gets the moment of accept (queue time starts there)."""

    def do_read(self) -> Any:
        args = super().do_read()
        if args is None:
            return None
        return (*args, perf_counter())


class DiskServer:
    """The object server. Create, ``start`` and ``stop`` it in the thread that runs its loop."""

    def __init__(
        self,
        mode: str = "offload",
        host: str = "127.0.0.1",
        port: int = 7000,
        stall: str = "sleep",
        fifo_min_ms: int = 1000,
        queue_timeout_ms: int = 4000,
        max_read_ms: int = 60_000,
        threads_per_disk: int = 8,
        max_disks: int = 64,
        line_timeout: float = 10.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.mode = mode
        self.host = host
        self.port = port
        self.queue_timeout_ms = queue_timeout_ms
        self.max_read_ms = max_read_ms
        self.threads_per_disk = threads_per_disk
        self.max_disks = max_disks
        self.line_timeout = line_timeout
        self.disks = SimulatedDisks(stall=stall, fifo_min_ms=fifo_min_ms)  # type: ignore[arg-type]
        self.counts = {"requests": 0, "rc0": 0, "rc1": 0, "rc2": 0, "stats": 0,
                       "lane_full": 0, "no_line": 0, "send_failed": 0}
        self.pool: IOPool | None = None
        self.watch: LoopWatch | None = None
        self._server: _TimestampingServer | None = None
        self._started_at = 0.0
        self._disk_lanes: set[str] = set()
        self._log = get_logger("simulated_disk_io.server", mode=mode)

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Bind, start serving, and return the bound (host, port)."""
        self.watch = LoopWatch(f"simdisk-{self.mode}").start()
        self.pool = IOPool(disk_threads=self.threads_per_disk, spawn_threads=1, net_threads=1,
                           queue_limit=10_000)
        self._server = _TimestampingServer((self.host, self.port), self._handle, backlog=1024)
        self._server.start()
        self._started_at = perf_counter()
        host, port = self._server.address[:2]
        self.host, self.port = host, port
        self._log.info("listening", host=host, port=port, stall=self.disks.stall)
        return host, port

    def stop(self, grace: float = 1.0) -> int:
        """Stop accepting, release stalled reads, close the lanes; returns threads left stuck."""
        if self._server is not None:
            self._server.stop(timeout=grace)
            self._server = None
        stuck = 0
        if self.pool is not None:
            try:  # the server's own blocking chore, in a lane of its own
                self.pool.lane("admin", threads=1).run(self.disks.close, timeout=10.0)
            except Exception as exc:  # shutdown goes on regardless
                self._log.warning("release_stalls_failed", error=repr(exc))
            # Reads in flight get up to ``grace`` to finish (released FIFO reads do at once);
            # the lanes count whatever is still running when they close as stuck.
            deadline = monotonic() + grace
            while monotonic() < deadline and any(
                    lane.health()["running"] for lane in self.pool.lanes().values()):
                gevent.sleep(0.01)
            stuck = self.pool.close(wait=grace)
            self.pool = None
        else:
            self.disks.close(wait=0.0)  # never served: nothing can be blocked in it
        if self.watch is not None:
            self.watch.stop()
        return stuck

    # -- requests ------------------------------------------------------------------------------

    def _handle(self, sock: Any, address: Any, accepted: float) -> None:
        try:
            line = self._read_line(sock)
            if line is None:
                self.counts["no_line"] += 1
                return
            if len(line) > MAX_LINE:  # no line end within MAX_LINE bytes: bad input
                self.counts["requests"] += 1
                self.counts["rc2"] += 1
                sock.sendall(format_reply(RC_BAD_INPUT, _ms_since(accepted), b""))
                self._drain(sock)
                return
            if line == STATS_LINE:
                self.counts["stats"] += 1
                sock.sendall(json.dumps(self.stats()).encode() + b"\n")
                return
            self.counts["requests"] += 1
            req = parse_request(line, self.max_read_ms)
            rc = RC_BAD_INPUT if req.bad else self._serve(req, accepted)
            self.counts[f"rc{rc}"] += 1
            sock.sendall(format_reply(rc, _ms_since(accepted), req.path))
        except OSError as exc:
            self.counts["send_failed"] += 1
            self._log.debug("client_gone", error=repr(exc))
        finally:
            sock.close()

    def _read_line(self, sock: Any) -> bytes | None:
        """One request line without its terminator; None if the client sent nothing in time.

        A line ends at ``\\n`` (an optional ``\\r`` before it is dropped) or at EOF, like the
        original server's ``readline``. A longer line than MAX_LINE bytes comes back longer
        than MAX_LINE, unparsed (the caller answers it as bad input).
        """
        buf = b""
        sock.settimeout(self.line_timeout)
        try:
            while b"\n" not in buf and len(buf) <= MAX_LINE:
                chunk = sock.recv(MAX_LINE + 1)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            return None
        if not buf:
            return None
        line = buf.split(b"\n", 1)[0]
        if len(line) > MAX_LINE:
            return line
        return line[:-1] if line.endswith(b"\r") else line

    @staticmethod
    def _drain(sock: Any, limit: int = 1 << 20) -> None:
        # Read what the client is still sending, so that close() does not reset the connection
        # (a reset can make the client lose the reply it has not read yet).
        sock.settimeout(0.5)
        try:
            while limit > 0:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                limit -= len(chunk)
        except OSError:
            return

    def _serve(self, req: Request, accepted: float) -> int:
        if self.mode == "blocking":
            return self._timed_read(accepted, req.read_ms)  # on the loop: the hang
        assert self.pool is not None
        lane = self.pool.lane(self._lane_name(req.path), threads=self.threads_per_disk)
        try:
            return lane.run(self._timed_read, accepted, req.read_ms)
        except (LaneFull, LaneClosed):
            self.counts["lane_full"] += 1
            return RC_QUEUE_TIMEOUT

    def _lane_name(self, path: bytes) -> str:
        name = "disk:" + disk_of(path)
        if name not in self._disk_lanes:
            if len(self._disk_lanes) >= self.max_disks:
                return "disk:" + DEFAULT_DISK  # past --max-disks, new disks share this lane
            self._disk_lanes.add(name)
        return name

    def _timed_read(self, accepted: float, read_ms: int) -> int:
        # Runs where the read runs (the loop in blocking mode, a lane thread in offload mode),
        # so the queue time counts the time spent waiting for the loop or for a lane thread.
        if (perf_counter() - accepted) * 1000.0 >= self.queue_timeout_ms:
            return RC_QUEUE_TIMEOUT
        self.disks.read(read_ms)
        return RC_OK

    # -- stats ---------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        watch = self.watch.stats() if self.watch is not None else {}
        lanes = {}
        if self.pool is not None:
            lanes = {name: h for name, h in self.pool.health().items() if name.startswith("disk:")}
        return {
            "mode": self.mode,
            "pid": os.getpid(),
            "uptime_s": round(perf_counter() - self._started_at, 3),
            "time": round(time(), 3),
            **self.counts,
            "loop_blocked_events": watch.get("blocked_events", 0),
            "loop_lag_p50_ms": watch.get("lag_p50_ms", 0.0),
            "loop_lag_p99_ms": watch.get("lag_p99_ms", 0.0),
            "loop_lag_max_ms": watch.get("lag_max_ms", 0.0),
            "stalls_pending": self.disks.pending(),
            "lanes": lanes,
        }


# -- command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {__package__}.server",
        description="Simulated disk I/O object server (the seed experiment's protocol) on gevent.",
    )
    p.add_argument("--mode", choices=MODES, default="offload",
                   help="blocking: read on the loop (reproduces the hang); "
                        "offload: read in the disk's io_pool lane (the cure). Default: offload")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int_flag(0, 65535), default=7000,
                   help="TCP port (default 7000; 0 picks a free one)")
    p.add_argument("--stall", choices=("sleep", "fifo"), default="sleep",
                   help="blocking primitive of a simulated read: the unpatched time.sleep, or "
                        "(for reads >= --fifo-min-ms) a blocking open/read of a FIFO")
    p.add_argument("--fifo-min-ms", type=int_flag(0), default=1000,
                   help="with --stall fifo, reads this long or longer block on a FIFO")
    p.add_argument("--queue-timeout-ms", type=int_flag(1), default=4000,
                   help="a request that waited this long since accept before its read gets rc 1")
    p.add_argument("--max-read-ms", type=int_flag(0), default=60_000,
                   help="longer disk_read_ms values are bad input (rc 2)")
    p.add_argument("--threads-per-disk", type=int_flag(1, 1024), default=8,
                   help="threads in each disk's lane (offload mode)")
    p.add_argument("--max-disks", type=int_flag(1, 4096), default=64,
                   help="disk lanes at most; requests for further disks use the default disk")
    p.add_argument("--line-timeout", type=float_flag(), default=10.0,
                   help="seconds a client has to send its request line (default 10)")
    p.add_argument("--stats-file", default=None,
                   help="write the final stats (JSON) here on exit")
    p.add_argument("--parent-pid", type=int_flag(1), default=None,
                   help="exit when this process is no longer our parent (used by stress)")
    return p


def _watch_parent(parent: int, stop: gevent.event.Event) -> None:
    while not stop.is_set():
        if os.getppid() != parent:
            stop.set()
            return
        gevent.sleep(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; print ``listening HOST:PORT`` first and ``stats {...}`` last."""
    args = build_parser().parse_args(argv)
    server = DiskServer(
        mode=args.mode, host=args.host, port=args.port, stall=args.stall,
        fifo_min_ms=args.fifo_min_ms, queue_timeout_ms=args.queue_timeout_ms,
        max_read_ms=args.max_read_ms, threads_per_disk=args.threads_per_disk,
        max_disks=args.max_disks, line_timeout=args.line_timeout,
    )
    stop = gevent.event.Event()
    handlers = [gevent.signal_handler(sig, stop.set) for sig in (signal.SIGTERM, signal.SIGINT)]
    try:
        try:
            host, port = server.start()
        except OSError as exc:
            print(f"server: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
        print(f"listening {host}:{port}", flush=True)
        if args.parent_pid is not None:
            gevent.spawn(_watch_parent, args.parent_pid, stop)
        stop.wait()
        final = server.stats()
        stuck = server.stop()
        final["threads_stuck_at_exit"] = stuck
        print("stats " + json.dumps(final), flush=True)
        if args.stats_file:
            with open(args.stats_file, "w", encoding="utf-8") as fh:  # exiting: loop is done
                json.dump(final, fh)
        return 0
    finally:
        for h in handlers:
            h.cancel()
        server.stop(grace=0.1)


if __name__ == "__main__":
    sys.exit(main())
