"""The one place rpg touches private attributes of gevent and zerorpc.

Written against gevent 26.9.0 (greenlet 3.5), zerorpc 0.6.3 and pyzmq 27.3. Each use is a small
function here; ``check()`` verifies that every private name still exists, and the test-suite
calls it, so an upgrade that moves one fails loudly in one place instead of quietly elsewhere.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

import zmq
from gevent import config as GEVENT_CONFIG
from gevent._hub_local import get_hub_if_exists  # private module
from gevent._monitor import PeriodicMonitoringThread  # private module
from gevent.events import EventLoopBlocked
from zope.event import notify

WRITTEN_FOR = {"gevent": "26.9.0", "zerorpc": "0.6.3", "pyzmq": "27.3.0"}


# -- zerorpc: the zmq socket under a Server or Client --

def zmq_socket(endpoint: Any) -> Any:
    """The pyzmq socket of a zerorpc Server/Client (``endpoint._events._socket``)."""
    return endpoint._events._socket


def bound_address(server: Any) -> str:
    """The address a zerorpc Server bound (with the port the kernel chose for ``:*``)."""
    return zmq_socket(server).getsockopt(zmq.LAST_ENDPOINT).decode()


# -- gevent: the hub of the calling thread, without making one --

def hub_of_this_thread() -> Any:
    """This thread's gevent hub if it has one, else None (``gevent.get_hub`` would make one)."""
    return get_hub_if_exists()


# -- gevent: errors of greenlets that die of an exception --

def route_loop_errors(hub: Any, report: Any) -> None:
    """Errors the hub would print to stderr (a greenlet that died of an exception, e.g. one of
    zerorpc's on a malformed message) go to ``report(context=..., error=...)`` instead. Uses
    the overridable ``Hub.print_exception``."""
    def print_exception(context: Any, type_: Any, value: Any, tb: Any) -> None:
        report(context=repr(context)[:200], error=f"{getattr(type_, '__name__', type_)}: "
                                                  f"{str(value)[:300]}")

    hub.print_exception = print_exception


# -- gevent: the loop's monitoring thread --

class QuietMonitor(PeriodicMonitoringThread):
    """gevent's monitor thread without the stderr dump (rpg logs the event instead), and with a
    cheap report: the blocked thread's own stack only. gevent's report renders the tree of
    every greenlet, with the GIL held: with thousands of lifecycle greenlets that took 27 % of
    a busy hub service's samples (py-spy --gil), and lengthened the very block it reported.
    ``monitor_blocking`` is the public hook; ``_greenlet_tracer`` is private."""

    def monitor_blocking(self, hub: Any) -> Any:
        did_block = self._greenlet_tracer.did_block_hub(hub)
        if not did_block:
            return None
        active = did_block[1]
        frame = sys._current_frames().get(getattr(hub, "thread_ident", None))
        report = traceback.format_stack(frame) if frame is not None else []
        notify(EventLoopBlocked(active, GEVENT_CONFIG.max_blocking_time, report, hub=hub))
        return (active, report)


def check() -> list[str]:
    """The private names rpg relies on that this installation no longer has."""
    missing = []
    from gevent.hub import Hub

    if not callable(getattr(Hub, "print_exception", None)):
        missing.append("gevent.hub.Hub.print_exception")
    if not hasattr(PeriodicMonitoringThread, "monitor_blocking"):
        missing.append("gevent._monitor.PeriodicMonitoringThread.monitor_blocking")
    from gevent import get_hub

    mon = PeriodicMonitoringThread.__new__(PeriodicMonitoringThread)
    try:
        PeriodicMonitoringThread.__init__(mon, get_hub())
        tracer = getattr(mon, "_greenlet_tracer", None)
        if tracer is None or not callable(getattr(tracer, "did_block_hub", None)):
            missing.append("gevent._monitor.PeriodicMonitoringThread._greenlet_tracer"
                           ".did_block_hub")
    finally:
        mon.kill()
    import zerorpc

    ctx = zerorpc.Context()
    client = zerorpc.Client(context=ctx, heartbeat=None)
    try:
        events = getattr(client, "_events", None)
        if events is None or not hasattr(events, "_socket"):
            missing.append("zerorpc.Client._events._socket")
    finally:
        client.close()
        ctx.destroy(linger=0)
    return missing
