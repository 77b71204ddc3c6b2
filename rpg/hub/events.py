"""A session's event stream: every state change the Ledger makes, with a sequence number.

Event ``n`` (1-based) is ``(kind, uid, state, ts, fields)``; a reader asks for what comes after
the last number it saw, so a client that reconnects, or re-attaches from another process,
resumes exactly where it stopped: nothing missed, nothing repeated. The stream is kept for the
session's life (re-attach replays it from 0 to rebuild every object's history).

Written on the hub loop only (by the Ledger); read from any thread. Readers are woken once per
loop iteration that wrote something, not once per event.

Kept compact: an event's fields are stored as one flat tuple (``rpg.gc_policy.flat_fields``)
and made a dict again for each reader. A tuple that holds a dict stays tracked by Python's
cyclic collector for as long as it lives: the stream of 10,000 units was 4-6 tracked objects a
unit, walked by every full collection of the application's process (which holds the GIL, so
the embedded hub's loop waits); flat, it is untracked at the first collection.

A journaled stream (a hub service's session, rpg/hub/journal.py) shows readers only what the
journal has written: ``journal`` gets every event as it is put, and ``release(n)`` makes the
first ``n`` visible once they are in the file, so that a client never sees an event that a
restarted hub would not have.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

import gevent.event

from rpg import threads
from rpg.gc_policy import fields_of, flat_fields
from rpg.internals import hub_of_this_thread
from rpg.log import get_logger

Event = tuple  # (kind, uid, state, ts, fields)


def _compact(event: Event) -> Event:
    kind, uid, state, ts, fields = event
    return (kind, uid, state, ts, flat_fields(fields))  # the flat tuple first: both untracked


def _expanded(events: list[Event]) -> list[Event]:
    return [(kind, uid, state, ts, fields_of(f)) for kind, uid, state, ts, f in events]


class EventLog:
    def __init__(self, events: list[Event] | None = None) -> None:
        self._events: list[Event] = [_compact(e) for e in events or ()]
        self.journal: Any = None  # a Journal: readers see events once it has written them
        self._visible = len(self._events)
        self._cond = threads.Condition()
        self._loop_waiters: list[tuple[Any, Any]] = []  # (loop, gevent Event) of loop readers
        self._wake_pending = False
        self.closed = False  # the session ended: no event will come after the last one

    def __len__(self) -> int:
        return len(self._events)

    def visible(self) -> int:
        """How many events readers may see."""
        return len(self._events) if self.journal is None else self._visible

    def release(self, n: int) -> None:
        """The journal has written the first ``n`` events: readers may see them (hub loop)."""
        if n > self._visible:
            self._visible = n
            self._wake()

    def put(self, event: Event) -> None:
        """Append (hub loop only); readers are woken at the end of this loop iteration."""
        if self.closed:  # the hub ends every record before it ends the stream: a bug
            get_logger("events").error("event_after_stream_end", uid=event[1], state=event[2])
            return
        self._events.append(_compact(event))
        if self.journal is not None:
            self.journal.add("ev", *event)
            return  # readers are woken by release, once it is written
        if not self._wake_pending:
            self._wake_pending = True
            hub = hub_of_this_thread()
            if hub is None:
                self._wake()
            else:
                hub.loop.run_callback(self._wake)

    def close(self) -> None:
        """The end of the stream (the hub is gone); readers get what is left, then ``closed``."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        with self._cond:
            self._wake_pending = False
            self._cond.notify_all()
            waiters, self._loop_waiters = self._loop_waiters, []
        for loop, ev in waiters:
            loop.run_callback_threadsafe(ev.set)

    def read(self, after: int, limit: int, wait: float) -> tuple[list[Event], bool]:
        """Events ``after+1 ..`` (at most ``limit``), waiting up to ``wait`` s for the first;
        and whether the stream has ended with them. On a gevent loop, waits on that loop."""
        deadline = monotonic() + max(0.0, wait)
        hub = hub_of_this_thread()
        while True:
            with self._cond:
                seen = self.visible() if not self.closed else len(self._events)
                if seen > after or self.closed:
                    out = self._events[after:min(seen, after + limit)]
                    ended = self.closed and after + len(out) >= len(self._events)
                    break
                remaining = deadline - monotonic()
                if remaining <= 0:
                    return [], False
                if hub is None:
                    self._cond.wait(remaining)
                    continue
                entry = (hub.loop, gevent.event.Event())
                self._loop_waiters.append(entry)
            entry[1].wait(remaining)
            with self._cond:
                if entry in self._loop_waiters:
                    self._loop_waiters.remove(entry)
        return _expanded(out), ended  # outside the lock: the writer never waits for it
