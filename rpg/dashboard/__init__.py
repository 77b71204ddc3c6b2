"""The live dashboard: a web page served from the hub's own loop by gevent's WSGI server.

One ``Dashboard`` serves one embedded session's hub (``Session(dashboard="127.0.0.1:0")``) or
every session of a hub service (``rpg hub serve --dashboard HOST:PORT``). It reads the hubs'
in-memory state only, never a database: the ledger's counts of units by state (kept as units
move, so a snapshot costs O(states + pilots + lanes), not O(units)), the latest failures, the
pilots, the io_pool lanes' health and the loop's lag. A sampler greenlet records one point a
second per session (units executing, final, failed), kept for ``HISTORY_S``; throughput and
concurrency over time come from those points, downsampled to at most ``MAX_POINTS``.

Routes: ``/`` the page (static; it asks for a token if the address carries none),
``/api/state?token=T`` the snapshot as JSON, ``/api/stream?token=T`` the same as server-sent
events, one a second, ``/api/output?token=T&unit=U&offset=N`` a chunk of a unit's output (the
page's tail of a selected unit; ``name=`` another sandbox file). The token is the session's
own (a random one, in ``dashboard_url``) or, on a service, a user's: a user sees the sessions
they own (the owner sees all). A wrong token is refused (403) and counted. The server binds
127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from rpg import states
from rpg.log import get_logger

HISTORY_S = 3600  # points kept per session (one a second)
MAX_POINTS = 300  # points a snapshot carries
STREAM_EVERY_S = 1.0
FAILURES_SHOWN = 20
MAX_CONNECTIONS = 64  # open at once; more wait for a free one
OUTPUT_CHUNK = 64 * 1024  # bytes of a unit's output one /api/output call returns
_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")

# token -> the hubs it may see, or None: refused
Resolver = Callable[[str], "list[Any] | None"]


class DashboardError(ValueError):
    """A dashboard address that cannot be used."""


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (port 0: any free one); raises DashboardError naming the problem."""
    if not isinstance(address, str) or ":" not in address:
        raise DashboardError(f"dashboard: must be 'HOST:PORT' (e.g. '127.0.0.1:0'), "
                             f"got {address!r}")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise DashboardError(f"dashboard: must be 'HOST:PORT' with a port 0-65535, "
                             f"got {address!r}")
    return host.strip("[]"), int(port)


class Series:
    """One point a second of one session: (time, executing, final, failed)."""

    def __init__(self) -> None:
        self.points: deque[tuple[float, int, int, int]] = deque(maxlen=HISTORY_S)

    def sample(self, hub: Any) -> None:
        c = hub.ledger.unit_counts
        final = c[states.DONE] + c[states.FAILED] + c[states.CANCELED]
        self.points.append((round(time.time(), 3), c[states.EXECUTING], final,
                            c[states.FAILED]))

    def downsampled(self) -> list[tuple[float, int, int, int]]:
        pts = list(self.points)
        step = max(1, -(-len(pts) // MAX_POINTS))
        out = pts[::step]
        if pts and out[-1] is not pts[-1]:
            out.append(pts[-1])
        return out

    def throughput(self, window_s: float = 5.0) -> float:
        """Units reaching a final state per second, over the last ``window_s`` s."""
        if len(self.points) < 2:
            return 0.0
        last = self.points[-1]
        first = next((p for p in self.points if last[0] - p[0] <= window_s), self.points[0])
        dt = last[0] - first[0]
        return round((last[2] - first[2]) / dt, 2) if dt > 0 else 0.0


def snapshot(hub: Any, series: Series | None) -> dict[str, Any]:
    """What the page shows of one session's hub, as JSON-able data. Hub loop only."""
    counts = {st: n for st, n in hub.ledger.unit_counts.items() if n}
    pilots = []
    for p in hub.pilots.values():
        pilots.append({"uid": p.uid, "state": p.state, "resource": p.desc.get("resource"),
                       "cores": p.desc.get("cores"), "cores_busy": p.load_cores,
                       "queued": len(p.queue), "in_flight": len(p.in_flight),
                       "reason": p.reason})
    failures = [{"time": ts, "uid": uid, "pilot": pilot, "reason": reason}
                for ts, uid, pilot, reason in list(hub.ledger.failures)[-FAILURES_SHOWN:]]
    failures.reverse()
    return {
        "session": hub.session_uid,
        "closed": hub.closed,
        "time": time.time(),
        "units": {"total": len(hub.units), "by_state": counts},
        "pilots": pilots,
        "failures": failures,
        "series": series.downsampled() if series is not None else [],
        "throughput_per_s": series.throughput() if series is not None else 0.0,
        "lanes": hub.pool.health() if hub.pool is not None else {},
        "loop": hub.watch.stats() if hub.watch is not None else {},
    }


class Dashboard:
    """The page and its JSON for the hubs ``resolve(token)`` allows, on this loop."""

    def __init__(self, address: str, resolve: Resolver, hubs: Callable[[], list[Any]],
                 name: str) -> None:
        self.host, self.port = parse_address(address)
        self.resolve = resolve
        self.hubs = hubs  # every hub to sample
        self.log = get_logger("dashboard", name=name)
        self.series: dict[str, Series] = {}
        self.refused = 0  # requests with a wrong token
        self.served = 0
        self.streams = 0  # event streams open now
        self._server: WSGIServer | None = None
        self._sampler: Any = None
        with open(_PAGE, "rb") as fh:
            self._page = fh.read()

    # -- life ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind and serve on the current loop (DashboardError if the address is taken)."""
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            self.log.warning("dashboard_binds_non_loopback", host=self.host)
        # A pool: connections are bounded, and stop() ends the open streams with the server.
        server = WSGIServer((self.host, self.port), self._app, log=None,
                            error_log=_ErrorLog(self.log), spawn=Pool(MAX_CONNECTIONS))
        failed = None
        try:
            server.start()
        except OSError as exc:  # raised outside: its traceback would keep the socket open
            failed = exc.strerror or str(exc)
        if failed is not None:
            raise DashboardError(f"dashboard {self.host}:{self.port}: cannot listen there: "
                                 f"{failed}")
        self._server = server
        self.port = server.server_port
        self._sampler = gevent.spawn(self._sample)
        self.log.info("dashboard_started", url=self.url())

    def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.kill(block=True, timeout=2)
            self._sampler = None
        if self._server is not None:
            self._server.stop(timeout=0.5)  # the pool's open streams are killed with it
            self._server = None

    def url(self, token: str | None = None, session: str | None = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = "&".join(f"{k}={v}" for k, v in (("token", token), ("session", session)) if v)
        return f"http://{host}:{self.port}/" + (f"?{query}" if query else "")

    def _sample(self) -> None:
        while True:
            live = set()
            for hub in self.hubs():
                live.add(hub.session_uid)
                self.series.setdefault(hub.session_uid, Series()).sample(hub)
            for uid in [u for u in self.series if u not in live]:
                del self.series[uid]  # an ended session of a service
            gevent.sleep(1.0)

    # -- requests --------------------------------------------------------------------------------

    def state(self, hubs: list[Any], session: str | None = None) -> dict[str, Any]:
        shown = [h for h in hubs if session is None or h.session_uid == session]
        return {"sessions": [snapshot(h, self.series.get(h.session_uid)) for h in shown]}

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", {"error": "GET only"})
        if path in ("/", "/index.html"):
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                      ("Cache-Control", "no-store"),
                                      ("Content-Length", str(len(self._page)))])
            return [self._page]
        if path not in ("/api/state", "/api/stream", "/api/output"):
            return _reply(start_response, "404 Not Found", {"error": f"no such page: {path}"})
        query = parse_qs(environ.get("QUERY_STRING", ""))
        token = (query.get("token") or [""])[0]
        session = (query.get("session") or [None])[0]
        hubs = self.resolve(token) if token else None
        if hubs is None:
            self.refused += 1
            return _reply(start_response, "403 Forbidden",
                          {"error": "a valid token is needed (the one in dashboard_url, or "
                                    "your user's token on a hub service)"})
        self.served += 1
        if path == "/api/output":
            return self._output(start_response, hubs, session, query)
        if path == "/api/state":
            return _reply(start_response, "200 OK", self.state(hubs, session))
        start_response("200 OK", [("Content-Type", "text/event-stream"),
                                  ("Cache-Control", "no-store"), ("X-Accel-Buffering", "no")])
        return self._stream(token, session)

    def _output(self, start_response: Any, hubs: list[Any], session: str | None,
                query: dict[str, list[str]]) -> list[bytes]:
        """A chunk of a unit's output from ``offset`` (the page's tail of a selected unit):
        the same bounded read as Unit.follow (rpg/hub/output.py)."""
        from rpg.hub.service import ProtocolError

        uid = (query.get("unit") or [""])[0]
        name = (query.get("name") or [""])[0]
        raw = (query.get("offset") or ["0"])[0]
        offset = int(raw) if raw.isdigit() else -1
        hub = next((h for h in hubs if h.units.get(uid) is not None
                    and (session is None or h.session_uid == session)), None)
        if hub is None:
            return _reply(start_response, "404 Not Found", {"error": f"no unit {uid!r} here"})
        unit = hub.units[uid]
        try:
            r = hub.read_output(uid, name or unit.desc.get("stdout") or "STDOUT", offset,
                                OUTPUT_CHUNK)
        except (ProtocolError, OSError) as exc:
            return _reply(start_response, "400 Bad Request", {"error": str(exc)})
        except Exception as exc:  # the pilot's machine out of reach, a lane timeout
            return _reply(start_response, "503 Service Unavailable",
                          {"error": f"{type(exc).__name__}: {exc}"})
        return _reply(start_response, "200 OK", {
            "unit": uid, "state": r["state"], "offset": r["offset"], "eof": r["eof"],
            "text": r["data"].decode("utf-8", "replace")})

    def _stream(self, token: str, session: str | None) -> Iterator[bytes]:
        self.streams += 1
        try:
            while True:
                hubs = self.resolve(token)
                if hubs is None:  # the token was revoked meanwhile
                    return
                yield b"data: " + json.dumps(self.state(hubs, session)).encode() + b"\n\n"
                gevent.sleep(STREAM_EVERY_S)
        finally:
            self.streams -= 1


def _reply(start_response: Any, status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Cache-Control", "no-store"),
                            ("Content-Length", str(len(data)))])
    return [data]


class _ErrorLog:
    """pywsgi's error log (a file-like object) into structlog."""

    def __init__(self, log: Any) -> None:
        self.log = log

    def write(self, text: str) -> None:
        text = text.strip()
        if text:
            self.log.warning("dashboard_server_error", error=text[-500:])

    def flush(self) -> None:
        pass


def token_matches(given: str, expected: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())
