"""Clients for the simulated disk I/O server: N concurrent clients, M requests each.

Each request is a fresh TCP connection (as in the seed experiment's ``make_requests.py``):
send ``0,<ms>,<path>\\n``, read the reply to EOF, flag it as a client timeout if it took longer
than ``--timeout`` (5 s by default). Most requests are fast reads; every ``--stall-every``-th
request of a client is a long stall. With ``--disks`` N >= 2 the stalls all go to the first disk
(the dying one) and fast reads are spread over the other N-1 disks. Run it with
``python -m tools.simulated_disk_io.client --port 7000``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import socket as _stdsocket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import gevent
import gevent.socket
import numpy as np

from .disk import disk_name

_REPLY = re.compile(rb"(-?[0-9]+),([0-9]+),(.*)\n", re.DOTALL)
MAX_REPLY = 1 << 16


@dataclass(frozen=True)
class Planned:
    """One request a client will make."""

    client: int
    index: int
    read_ms: int
    path: bytes
    stalled: bool

    @property
    def line(self) -> bytes:
        return b"0,%d,%s\n" % (self.read_ms, self.path)


def plan(clients: int, requests: int, fast_ms: int, stall_ms: int, stall_every: int,
         disks: int) -> list[list[Planned]]:
    """The requests of every client, in order.

    Client ``c``'s request ``i`` stalls when ``(i + offset_c) % stall_every == 0``. Clients
    stall in pairs: clients 2k and 2k+1 share an offset, and the pairs' offsets are spread over
    one period. So two stalls are in flight together (on a blocked loop the second waits for the
    first, as when every client of the seed experiment stalled), and the other clients' fast
    reads overlap the stalls. ``stall_every`` 0 means no stalls.
    """
    out = []
    fast_disks = max(disks - 1, 1)
    pairs = (clients + 1) // 2
    for c in range(clients):
        offset = ((c // 2) * stall_every) // pairs if stall_every else 0
        mine = []
        for i in range(requests):
            stalled = bool(stall_every) and (i + offset) % stall_every == 0
            disk = disk_name(0 if stalled or disks == 1 else 1 + (c + i) % fast_disks)
            path = f"{disk}/objects/{c}-{i}".encode()
            mine.append(Planned(c, i, stall_ms if stalled else fast_ms, path, stalled))
        out.append(mine)
    return out


@dataclass
class Outcome:
    """What happened to one request."""

    planned: Planned
    latency_ms: float
    rc: int | None = None  # the server's status; None when no valid reply came
    client_timeout: bool = False
    error: str | None = None


class RequestTimeout(TimeoutError):
    """No complete reply within the client timeout."""


def request_once(host: str, port: int, line: bytes, timeout: float) -> tuple[bytes, float]:
    """Send one request line on a fresh connection; return (reply bytes up to EOF, seconds).

    Cooperative (gevent sockets, explicit; no monkey-patching). Raises ``RequestTimeout`` if
    the whole exchange (connect, send, reply to EOF) takes longer than ``timeout`` seconds.
    """
    t0 = perf_counter()
    sock = gevent.socket.socket(_stdsocket.AF_INET, _stdsocket.SOCK_STREAM)
    timer = gevent.Timeout(timeout)
    timer.start()
    try:
        sock.connect((host, port))
        sock.sendall(line)
        chunks = []
        size = 0
        while size <= MAX_REPLY:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks), perf_counter() - t0
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        raise RequestTimeout(f"no reply within {timeout:g} s") from None
    finally:
        timer.close()
        sock.close()


def _one(host: str, port: int, p: Planned, timeout: float) -> Outcome:
    t0 = perf_counter()
    try:
        reply, took = request_once(host, port, p.line, timeout)
    except RequestTimeout:
        return Outcome(p, (perf_counter() - t0) * 1000.0, client_timeout=True)
    except OSError as exc:
        return Outcome(p, (perf_counter() - t0) * 1000.0, error=f"{type(exc).__name__}: {exc}")
    ms = took * 1000.0
    m = _REPLY.fullmatch(reply)
    if m is None:
        return Outcome(p, ms, error=f"malformed reply {reply[:80]!r}")
    rc = int(m.group(1))
    if m.group(3) != p.path:
        return Outcome(p, ms, rc=rc, error=f"reply path {m.group(3)[:80]!r} != {p.path!r}")
    if took > timeout:  # the reply came, but too late (as make_requests.py judged it)
        return Outcome(p, ms, rc=rc, client_timeout=True)
    return Outcome(p, ms, rc=rc)


def _percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3) if values else 0.0


@dataclass
class Results:
    """Every outcome of a client run, and the summary the harness reports."""

    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Counts and fast-request latency percentiles.

        ``timeouts`` counts requests not served in time: the client gave up (``client_timeouts``)
        or the server answered rc 1 (``queue_timeouts``). ``errors``: no connection, a malformed
        reply, a wrong path echoed, or rc 2. The fast latencies include timed-out fast requests
        (at the time the client gave up), so a stalled loop shows in fast_p99_ms.
        """
        fast = [o for o in self.outcomes if not o.planned.stalled]
        client_to = sum(1 for o in self.outcomes if o.client_timeout)
        queue_to = sum(1 for o in self.outcomes if o.rc == 1 and not o.client_timeout)
        errors = [o for o in self.outcomes if o.error is not None or o.rc == 2]
        fast_lat = [o.latency_ms for o in fast if o.error is None]
        stall_lat = [o.latency_ms for o in self.outcomes if o.planned.stalled and o.error is None]
        return {
            "requests_total": len(self.outcomes),
            "fast_requests": len(fast),
            "stalled_requests": len(self.outcomes) - len(fast),
            "ok": sum(1 for o in self.outcomes
                      if o.rc == 0 and not o.client_timeout and o.error is None),
            "timeouts": client_to + queue_to,
            "client_timeouts": client_to,
            "queue_timeouts": queue_to,
            "errors": len(errors),
            "error_examples": sorted({o.error or f"rc {o.rc}" for o in errors})[:5],
            "fast_p50_ms": _percentile(fast_lat, 50),
            "fast_p99_ms": _percentile(fast_lat, 99),
            "fast_max_ms": round(max(fast_lat), 3) if fast_lat else 0.0,
            "stall_p50_ms": _percentile(stall_lat, 50),
            "client_wall_s": round(self.wall_s, 3),
        }


def run_clients(host: str = "127.0.0.1", port: int = 7000, clients: int = 5,
                requests: int = 20, fast_ms: int = 10, stall_ms: int = 4000,
                stall_every: int = 20, disks: int = 4, timeout: float = 5.0,
                stallers: int = 0) -> Results:
    """Run the clients as greenlets of the calling thread's loop until all are done.

    ``stallers`` adds that many clients that make nothing but stalled reads on the first disk,
    one after another, for as long as the other clients run (their last, unfinished read is
    abandoned then): the first disk's lane stays stalled for the whole run.
    """
    schedule = plan(clients, requests, fast_ms, stall_ms, stall_every, disks)
    results = Results()

    def one_client(mine: list[Planned]) -> None:
        for p in mine:
            results.outcomes.append(_one(host, port, p, timeout))

    def one_staller(k: int) -> None:
        for n in itertools.count():
            path = f"{disk_name(0)}/objects/staller{k}-{n}".encode()
            p = Planned(clients + k, n, stall_ms, path, stalled=True)
            results.outcomes.append(_one(host, port, p, timeout))

    t0 = perf_counter()
    workers = [gevent.spawn(one_client, mine) for mine in schedule]
    extra = [gevent.spawn(one_staller, k) for k in range(stallers)]
    try:
        gevent.joinall(workers, raise_error=True)
        for g in extra:
            if g.dead:
                g.get()  # a staller that died raises here
    finally:
        gevent.killall(workers + extra)  # no client greenlet outlives the run
        results.wall_s = perf_counter() - t0
    return results


# -- command line ---------------------------------------------------------------------------------


def int_flag(lo: int = 1, hi: int | None = None) -> Any:
    """An argparse type: an integer in [lo, hi] (argparse names the flag in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def float_flag() -> Any:
    """An argparse type: a positive number (argparse names the flag in its error)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not 0 < value < 1e6:
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
        return value

    return parse


def add_load_flags(p: argparse.ArgumentParser) -> None:
    """The load-shape flags shared by client and stress."""
    p.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    p.add_argument("--clients", type=int_flag(1, 10_000), default=5,
                   help="concurrent clients (default 5)")
    p.add_argument("--requests", type=int_flag(1), default=20,
                   help="requests per client (default 20)")
    p.add_argument("--fast-ms", type=int_flag(0, 60_000), default=10,
                   help="disk read time of a fast request, ms (default 10)")
    p.add_argument("--stall-ms", type=int_flag(0, 60_000), default=4000,
                   help="disk read time of a stalled request, ms (default 4000)")
    p.add_argument("--stall-every", type=int_flag(0), default=20,
                   help="every Nth request of a client stalls; 0: none (default 20)")
    p.add_argument("--disks", type=int_flag(1, 1000), default=4,
                   help="simulated disks; stalls go to the first only (default 4)")
    p.add_argument("--timeout", type=float_flag(), default=5.0,
                   help="client timeout per request, seconds (default 5)")
    p.add_argument("--stallers", type=int_flag(0, 1000), default=0,
                   help="extra clients that only make stalled reads on the first disk, "
                        "keeping it stalled while the others run (default 0)")


def load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = ("clients", "requests", "fast_ms", "stall_ms", "stall_every", "disks", "timeout",
             "stallers")
    return {name: getattr(args, name) for name in names}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {__package__}.client",
        description="Concurrent clients for the simulated disk I/O server.",
    )
    p.add_argument("--port", type=int_flag(1, 65535), default=7000,
                   help="server port (default 7000)")
    add_load_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        (f"  requests   {s['requests_total']} ({s['fast_requests']} fast, "
         f"{s['stalled_requests']} stalled), ok {s['ok']}"),
        (f"  timeouts   {s['timeouts']} (client gave up {s['client_timeouts']}, "
         f"server queue timeout {s['queue_timeouts']}), errors {s['errors']}"),
        (f"  fast reads p50 {s['fast_p50_ms']:.1f} ms, p99 {s['fast_p99_ms']:.1f} ms, "
         f"max {s['fast_max_ms']:.1f} ms"),
    ]
    if s.get("error_examples"):
        lines.append("  errors e.g. " + "; ".join(s["error_examples"]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    res = run_clients(host=args.host, port=args.port, **load_kwargs(args))
    summary = {"clients": args.clients, "requests": args.requests, **res.summary()}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{args.clients} clients x {args.requests} requests against "
              f"{args.host}:{args.port} in {summary['client_wall_s']:.1f} s")
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
