"""Delivery of state changes to the application's callbacks: in order, each state once, never
holding back the states themselves (the session's applier thread has applied them already).

Two ways, one interface: a real OS thread of rpg's (``ThreadDelivery``, the default), or a
greenlet on the application's own gevent loop when the application monkey-patched threads
(``LoopDelivery``): its callbacks then use its patched primitives (a patched ``queue.Queue``,
``threading.Event``) as the rest of its code does. A callback that raises anything is logged
and counted; the next one still runs.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

import gevent
from gevent import GreenletExit
from gevent.queue import Queue

from rpg import internals, threads

RETURN_S = 0.5  # at stop, after the delivery time: how long a running callback may take


class _Delivery:
    def __init__(self, log: Any) -> None:
        self.log = log
        self.errors = 0
        self.dropped = 0
        self._drop = False

    def _run(self, obj: Any, state: str) -> None:
        if self._drop:
            self.dropped += 1
            return
        for cb in list(obj._mgr._callbacks):
            try:
                cb(obj, state)
            except BaseException as exc:  # SystemExit, KeyboardInterrupt too: never fatal
                if isinstance(exc, GreenletExit) and self._killed():
                    raise
                self.errors += 1
                self.log.error("callback_failed", uid=obj.uid, state=state,
                               callback=getattr(cb, "__qualname__", repr(cb)),
                               error=repr(exc)[:500], exc_info=isinstance(exc, Exception))

    def _killed(self) -> bool:
        return False


class ThreadDelivery(_Delivery):
    """Callbacks on a real thread of rpg's."""

    def __init__(self, name: str, log: Any) -> None:
        super().__init__(log)
        self._q: Any = threads.SimpleQueue()
        self._thread = threads.Thread(self._loop, name)
        self._thread.start()

    def put(self, items: list[tuple[Any, str]]) -> None:
        """From the applier thread: a batch of (object, state), in order."""
        for item in items:
            self._q.put(item)

    def is_current(self) -> bool:
        return self._thread.is_current()

    def _loop(self) -> None:
        get = self._q.get
        while True:
            item = get()
            if item is None:
                return
            self._run(*item)

    def stop(self, callback_timeout: float) -> None:
        """Deliver what is queued for up to ``callback_timeout`` s, then drop (and count) the
        rest; wait RETURN_S more for a callback still running. Not from a callback."""
        self._q.put(None)
        if self.is_current():
            return  # close() from inside a callback: the thread ends when the callback returns
        if not self._thread.join(callback_timeout):
            self._drop = True
            if not self._thread.join(RETURN_S):
                left = self._q.qsize()
                self.dropped += left
                self.log.error("callback_still_running", timeout=callback_timeout,
                               queued_left=left)


class LoopDelivery(_Delivery):
    """Callbacks in a greenlet of the application's own loop (a monkey-patched application)."""

    def __init__(self, log: Any) -> None:
        super().__init__(log)
        self._hub = gevent.get_hub()
        self._inbox: Queue = Queue()
        self._ended = threads.Event()
        self._greenlet = gevent.spawn(self._loop)

    def put(self, items: list[tuple[Any, str]]) -> None:
        """From the applier thread: handed to the application's loop, in order."""
        self._hub.loop.run_callback_threadsafe(self._put_all, items)

    def _put_all(self, items: list[Any]) -> None:
        for item in items:
            self._inbox.put(item)

    def is_current(self) -> bool:
        return gevent.getcurrent() is self._greenlet

    _stop_now = False

    def _killed(self) -> bool:
        return self._stop_now

    def _loop(self) -> None:
        try:
            while True:
                item = self._inbox.get()
                if item is None:
                    return
                self._run(*item)
        finally:
            self._ended.set()

    def stop(self, callback_timeout: float) -> None:
        self._hub.loop.run_callback_threadsafe(self._inbox.put, None)
        if self.is_current():
            return
        if internals.hub_of_this_thread() is self._hub:
            # The application's own thread: wait cooperatively, its loop runs the callbacks.
            self._greenlet.join(callback_timeout)
            if not self._greenlet.dead:
                self._drop = True
                self._greenlet.join(RETURN_S)
            if not self._greenlet.dead:
                self.dropped += self._inbox.qsize()
                self.log.error("callback_still_running", timeout=callback_timeout,
                               queued_left=self._inbox.qsize())
                self._stop_now = True
                self._greenlet.kill(block=True, timeout=RETURN_S)
            return
        deadline = monotonic() + callback_timeout  # another thread: the loop runs on its own
        if not self._ended.wait(callback_timeout):
            self._drop = True
            self._ended.wait(max(RETURN_S, deadline - monotonic()))
