"""Real OS threads and the locks between them, whatever the application monkey-patched.

Once an application has patched everything with gevent.monkey, ``threading.Thread`` starts a
greenlet on its loop, and ``threading.Lock``/``Condition``/``Event`` and ``queue.SimpleQueue``
become gevent objects bound to one loop. rpg's hub thread and session threads must be real
threads (a blocking call in the application must never freeze the hub), and what they share
must be real locks. This module is their one owner: it builds everything from the original
``_thread`` primitives.
"""

from __future__ import annotations

import builtins
import importlib.util
import sys
import types
from time import monotonic
from typing import Any, Callable

from gevent.monkey import get_original, is_anything_patched

_start_new_thread, allocate_lock, get_ident = get_original(
    "_thread", ["start_new_thread", "allocate_lock", "get_ident"])
SimpleQueue = get_original("queue", "SimpleQueue")
Empty = get_original("queue", "Empty")

Lock = allocate_lock


def application_patched() -> bool:
    """True if the application monkey-patched anything: its queues, events and locks may then
    be gevent's, bound to its loop, and code that uses them must run on that loop."""
    return is_anything_patched()


_rpg_idents: set[int] = set()  # threads rpg made (rpg.threads.Thread) or runs lanes on


def mark_current() -> None:
    """Count the calling thread as rpg's (a lane's worker, from its first call)."""
    _rpg_idents.add(get_ident())


def is_rpg_thread() -> bool:
    """True on a thread rpg made or runs its lanes on, or one that an unpatched private copy of
    threading started (paramiko's transport threads on rpg's connections): where code must use
    the original blocking primitives, never the application's patched ones."""
    ident = get_ident()
    if ident in _rpg_idents:
        return True
    private = _originals.get("threading")
    return private is not None and ident in getattr(private, "_active", ())


class Thread:
    """A real OS thread running ``target()``; ``join`` and ``is_alive`` as in threading."""

    def __init__(self, target: Callable[[], Any], name: str) -> None:
        self.name = name
        self._target = target
        self._running = allocate_lock()
        self.ident: int | None = None
        self._started = False

    def start(self) -> None:
        self._running.acquire()
        self._started = True
        try:
            _start_new_thread(self._run, ())
        except BaseException:
            self._running.release()
            raise

    def _run(self) -> None:
        self.ident = get_ident()
        _rpg_idents.add(self.ident)
        _set_os_name(self.name)
        try:
            self._target()
        finally:
            _rpg_idents.discard(self.ident)
            self._target = None  # type: ignore[assignment]  # drop what it held
            self._running.release()

    def is_alive(self) -> bool:
        if not self._started:
            return False
        if self._running.acquire(False):
            self._running.release()
            return False
        return True

    def is_current(self) -> bool:
        return self.ident is not None and get_ident() == self.ident

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; True if it has."""
        if not self._started or self.is_current():
            return not self.is_alive()
        if self._running.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            self._running.release()
            return True
        return False


_originals: dict[str, types.ModuleType] = {}
_originals_lock = allocate_lock()


def original_module(name: str) -> types.ModuleType:
    """The stdlib module ``name`` as it was before any monkey-patching, for code that must use
    real threads, locks and sockets (paramiko on rpg's threads). ``threading`` and ``socket``
    are private copies run from their source over the original ``_thread`` and ``_socket``:
    restoring a few attributes would not do, their classes (Thread, Condition, Timer, socket)
    look up the patched names in their own module at every call. Other modules (``select``,
    ``time``): a copy with every patched attribute set back. Nothing patched: the module
    itself (not kept: the application may patch it later)."""
    if not is_anything_patched():
        return sys.modules.get(name) or importlib.import_module(name)
    with _originals_lock:
        mod = _originals.get(name)
        if mod is None:
            mod = _originals[name] = (_private_copy(name) if name in ("threading", "socket")
                                      else _restored(name))
        return mod


def _restored(name: str) -> types.ModuleType:
    real = sys.modules.get(name) or importlib.import_module(name)
    mod = types.ModuleType(name, real.__doc__)
    for attr, value in vars(real).items():
        mod.__dict__[attr] = get_original(name, attr) if not attr.startswith("__") else value
    return mod


def _private_copy(name: str) -> types.ModuleType:
    """Run stdlib ``name``'s source into a new module whose ``import _thread`` gets the
    original ``_thread``; what else they use (``_socket``, ``os``, ``time.monotonic``) gevent
    does not patch (socket's ``selectors``, patched, serves only ``sendfile``)."""
    deps = {"_thread": _restored("_thread")}

    def imp(mod_name: str, *args: Any, **kw: Any) -> Any:
        return deps.get(mod_name) or builtins.__import__(mod_name, *args, **kw)

    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.loader is not None and spec.origin is not None
    mod = types.ModuleType(f"_rpg_original_{name}")
    mod.__dict__.update(__file__=spec.origin,
                        __builtins__={**vars(builtins), "__import__": imp})
    code = spec.loader.get_code(name)  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod  # socket's enums look their module up there
    exec(code, mod.__dict__)
    return mod


def _set_os_name(name: str) -> None:
    """Name the OS thread (what ``ps -L`` and /proc/<pid>/task/*/comm show)."""
    try:
        with open(f"/proc/self/task/{_native_id()}/comm", "w") as fh:
            fh.write(name[:15])
    except OSError:
        pass


# sched_setattr/sched_getattr by machine (Linux); struct sched_attr, SCHED_ATTR_SIZE_VER1.
_SCHED_CALLS = {"x86_64": (314, 315), "aarch64": (274, 275), "ppc64le": (355, 356),
                "s390x": (345, 346)}
_SCHED_ATTR = "IIQiIQQQII"  # size, policy, flags, nice, priority, runtime, deadline, period, ...
_SCHED_FLAG_RESET_ON_FORK = 0x01  # threads and processes it starts get the default slice


def request_short_slice(seconds: float) -> float | None:
    """Ask the kernel for time slices of ``seconds`` on the calling thread; returns the slice
    the kernel keeps (it clamps to 0.1-100 ms), or None where it has no such request.

    Linux's EEVDF scheduler (6.12 and later) gives a task with a shorter slice an earlier
    deadline, so on waking it preempts a task with a longer one instead of waiting out that
    task's slice; its share of the CPU stays the same, and no privilege is needed. A loop
    thread that sleeps most of the time and must answer at once (the agent's, the hub's) asks
    for this; a compute task would pay for it in context switches. The threads and processes
    the caller starts (lane threads, and through them spawners and units) get the default
    slice (SCHED_FLAG_RESET_ON_FORK). A thread with real-time scheduling or a negative nice
    value (which that flag would not pass on) is left as it is.
    """
    import ctypes
    import os
    import platform
    import struct

    calls = _SCHED_CALLS.get(platform.machine())
    if calls is None or not sys.platform.startswith("linux"):
        return None
    set_call, get_call = calls
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(struct.calcsize(_SCHED_ATTR))
        if libc.syscall(get_call, 0, buf, len(buf), 0) != 0:
            return None
        size, policy, _, nice, prio, *_ = struct.unpack(_SCHED_ATTR, buf.raw)
        if policy != os.SCHED_OTHER or nice < 0:
            return None  # what it was given stays, for it and for what it starts
        want = struct.pack(_SCHED_ATTR, len(buf), policy, _SCHED_FLAG_RESET_ON_FORK, nice, prio,
                           max(1, int(seconds * 1e9)), 0, 0, 0, 0)
        if libc.syscall(set_call, 0, ctypes.c_char_p(want), 0) != 0:
            return None
        if libc.syscall(get_call, 0, buf, len(buf), 0) != 0:
            return None
        runtime = struct.unpack(_SCHED_ATTR, buf.raw)[5]
    except (OSError, AttributeError, struct.error):
        return None
    return runtime / 1e9 if runtime else None


def loop_priority() -> dict[str, int | None]:
    """The calling thread's nice value and its session's autogroup nice value (None where the
    kernel has no autogroups). Both are inherited: an application started from a niced shell,
    or by ``nice``, runs its embedded hub's loop thread at that priority. The pilot's units
    run at ``unit_nice`` (19) in an autogroup of their own. A hub niced like them waits for a
    core behind them and the agent. In one such run its thread waited 447 ms of 1.17 s on a
    run queue while 10,000 units were canceled (loop lag p99 21-212 ms, 6-7 ms unniced)."""
    import os

    try:
        nice: int | None = os.getpriority(os.PRIO_PROCESS, 0)  # Linux: this thread's
    except OSError:
        nice = None
    try:
        with open("/proc/self/autogroup") as fh:  # procfs: memory, never a disk
            autogroup: int | None = int(fh.read().split()[-1])
    except (OSError, ValueError, IndexError):
        autogroup = None
    return {"nice": nice, "autogroup_nice": autogroup}


def _native_id() -> int:
    import threading  # get_native_id is never patched

    return threading.get_native_id()


class Condition:
    """A condition variable over real locks (threading.Condition's algorithm)."""

    def __init__(self) -> None:
        self._lock = allocate_lock()
        self._waiters: list[Any] = []

    def __enter__(self) -> "Condition":
        self._lock.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock, wait for a notify (or ``timeout``), take the lock again."""
        waiter = allocate_lock()
        waiter.acquire()
        self._waiters.append(waiter)
        self._lock.release()
        got = False
        try:
            got = waiter.acquire(True, -1 if timeout is None else max(0.0, timeout))
            return got
        finally:
            self._lock.acquire()
            if not got:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass

    def notify_all(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.release()


class Event:
    """A flag threads can wait on (threading.Event over real locks)."""

    def __init__(self) -> None:
        self._cond = Condition()
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with self._cond:
            self._flag = True
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else monotonic() + timeout
        with self._cond:
            while not self._flag:
                remaining = None if deadline is None else deadline - monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._flag


class Reply:
    """One value handed from one thread to another: ``set`` from any thread, ``wait`` from any
    thread. A waiter on a thread that runs a gevent loop waits on that loop (its greenlets go
    on meanwhile, the loop watch sees no block); any other waiter waits on a real lock."""

    _MISSING = object()

    def __init__(self) -> None:
        self._cond = Condition()
        self._value: Any = self._MISSING
        self._error: BaseException | None = None
        self._loop_waiters: list[Any] = []  # (loop, gevent Event) of waiters on loops

    def set(self, value: Any = None, error: BaseException | None = None) -> None:
        with self._cond:
            self._value, self._error = value, error
            self._cond.notify_all()
            waiters, self._loop_waiters = self._loop_waiters, []
        for loop, ev in waiters:
            loop.run_callback_threadsafe(ev.set)

    def ready(self) -> bool:
        return self._value is not self._MISSING

    def wait(self, timeout: float | None = None) -> bool:
        """True once set (then ``get`` returns at once); False if ``timeout`` ran out."""
        from rpg.internals import hub_of_this_thread

        hub = hub_of_this_thread()
        if hub is None:
            deadline = None if timeout is None else monotonic() + timeout
            with self._cond:
                while self._value is self._MISSING:
                    remaining = None if deadline is None else deadline - monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                return True
        import gevent.event

        entry = (hub.loop, gevent.event.Event())
        with self._cond:
            if self._value is not self._MISSING:
                return True
            self._loop_waiters.append(entry)
        try:
            entry[1].wait(timeout)
        finally:
            with self._cond:
                if entry in self._loop_waiters:
                    self._loop_waiters.remove(entry)
        return self._value is not self._MISSING

    def get(self, timeout: float | None = None, what: str = "reply") -> Any:
        """The value (or raise the error it was set with); TimeoutError if none in time."""
        if not self.wait(timeout):
            raise TimeoutError(f"no {what} within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value
