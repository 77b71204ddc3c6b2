"""Function calls as they travel: packed with cloudpickle by the client, run by a warm worker
(``rpg/agent/worker.py``), and their outcomes back.

A function unit's ``payload`` is ``pickle`` of ``(FORMAT, cloudpickle version, functions,
calls)``: ``functions`` the
cloudpickled callables, each once however many calls use it; ``calls`` a list of
``(function_index, mode, data)``, where ``data`` is cloudpickle of ``(args, kwargs)`` (mode
``call``) or of a list of argument tuples (mode ``map``: one call per tuple, a list back). The
hub carries these bytes and never unpickles them; only the worker and the client do.

A unit's outcome is ``results``: one ``[status, data, text, seconds]`` per call, where ``data``
is the pickled value (OK) or exception (RAISED, when it pickles), and ``text`` the remote
traceback or the reason. This module imports nothing of rpg: the worker loads it alone.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, Iterable, Sequence

import cloudpickle

FORMAT = 1
OK = "ok"
RAISED = "raised"  # the function raised: data is the exception (pickled) or None
ERROR = "error"  # the call ran but its value could not come back (unpicklable, too big)
DIED = "died"  # the worker died (or was killed: timeout, cancel) while running it
NOT_RUN = "not_run"  # it never started: an earlier call of its unit ended the worker
STATUSES = frozenset({OK, RAISED, ERROR, DIED, NOT_RUN})

MAX_PAYLOAD = 32 << 20  # bytes of a unit's packed calls (one zerorpc message must carry it)
MAX_RESULTS = 32 << 20  # bytes of a unit's pickled results, all calls together
INLINE_RESULT = 1 << 20  # a bigger value goes from the worker through a file in the sandbox
MAX_CALLS = 100_000  # calls in one unit


class CallPackError(ValueError):
    """Something of a call cannot be pickled; ``where`` names it (``args[1]``, ...)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, as text (the ``__cause__`` of the
    exception the client sees, as ``concurrent.futures.ProcessPoolExecutor`` does)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class FunctionError(Exception):
    """A call failed and its own exception could not be rebuilt here (or there was none: the
    worker died, the value could not come back); the message says what happened."""


def _dumps(obj: Any, where: str) -> bytes:
    try:
        return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise CallPackError(where, f"cannot be pickled with cloudpickle "
                                   f"({type(exc).__name__}: {exc})") from None


def _culprit(args: Sequence[Any], kwargs: dict[str, Any], prefix: str) -> None:
    """Raise CallPackError naming the first argument that does not pickle."""
    for i, a in enumerate(args):
        _dumps(a, f"{prefix}args[{i}]")
    for k, v in kwargs.items():
        _dumps(v, f"{prefix}kwargs[{k!r}]")


class Packer:
    """Packs calls; each distinct function is pickled once (and remembered for the next units,
    by identity, while it lives)."""

    def __init__(self) -> None:
        self._fns: dict[int, tuple[Any, bytes]] = {}

    def function(self, fn: Callable[..., Any], where: str = "function") -> bytes:
        hit = self._fns.get(id(fn))
        if hit is not None and hit[0] is fn:
            return hit[1]
        if not callable(fn):
            raise CallPackError(where, f"must be callable, got {type(fn).__name__}")
        data = _dumps(fn, where)
        if len(self._fns) > 256:
            self._fns.clear()
        self._fns[id(fn)] = (fn, data)
        return data

    def call(self, fn: Callable[..., Any], mode: str, data: Any,
             prefix: str = "") -> tuple[bytes, str, bytes]:
        """One call packed: ``mode`` "call" with ``data`` = (args, kwargs), or "map" with a list
        of argument tuples. Raises CallPackError naming what does not pickle."""
        f = self.function(fn, f"{prefix}function")
        try:
            blob = cloudpickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            if mode == "call":
                _culprit(data[0], data[1], prefix)
            raise CallPackError(f"{prefix}args", f"cannot be pickled with cloudpickle "
                                                 f"({type(exc).__name__}: {exc})") from None
        return f, mode, blob

    @staticmethod
    def assemble(packed: Sequence[tuple[bytes, str, bytes]], where: str = "payload") -> bytes:
        """A unit's payload from packed calls: each distinct function once."""
        index: dict[bytes, int] = {}
        fns: list[bytes] = []
        out: list[tuple[int, str, bytes]] = []
        for f, mode, blob in packed:
            i = index.get(f)
            if i is None:
                i = index[f] = len(fns)
                fns.append(f)
            out.append((i, mode, blob))
        payload = pickle.dumps((FORMAT, cloudpickle.__version__, fns, out),
                               protocol=pickle.HIGHEST_PROTOCOL)
        if len(payload) > MAX_PAYLOAD:
            raise CallPackError(where, f"the pickled calls are {len(payload)} bytes, over the "
                                       f"limit of {MAX_PAYLOAD} (pass big data as a file: "
                                       f"input_staging)")
        return payload

    def pack(self, calls: Iterable[tuple[Callable[..., Any], str, Any]],
             where: str = "") -> tuple[bytes, int]:
        """Calls as ``(fn, mode, data)`` (see ``call``) -> (payload, number of calls)."""
        packed = [self.call(fn, mode, data, f"{where}[{n}]." if where else "")
                  for n, (fn, mode, data) in enumerate(calls)]
        return self.assemble(packed, where or "args"), len(packed)


def unpack(payload: bytes) -> tuple[str, list[bytes], list[tuple[int, str, bytes]]]:
    """(the client's cloudpickle version, functions, calls) of a payload."""
    fmt, version, fns, calls = pickle.loads(payload)
    if fmt != FORMAT:
        raise ValueError(f"call payload format {fmt!r}, this worker reads {FORMAT}")
    return version, fns, calls


def version_hint(client_version: str) -> str:
    """Words for a call whose function or arguments did not unpickle in the worker: the usual
    cause is another cloudpickle on the pilot's python than the client's."""
    if client_version == cloudpickle.__version__:
        return ""
    return (f" (the client packed this with cloudpickle {client_version}, the pilot's python "
            f"has {cloudpickle.__version__}: install the client's version there)")


def value(record: Sequence[Any]) -> Any:
    """The value of one call's outcome, or raise its exception (with the remote traceback)."""
    if record[0] == OK:
        return cloudpickle.loads(record[1])
    raise exception(record)


def exception(record: Sequence[Any]) -> BaseException | None:
    """The exception of one call's outcome (None if it returned), rebuilt where it can be,
    with the remote traceback as its ``__cause__``."""
    status, data, text = record[0], record[1], record[2]
    if status == OK:
        return None
    exc: Any = None
    if status == RAISED and data is not None:
        try:
            exc = cloudpickle.loads(data)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        last = text.strip().splitlines()[-1] if text and text.strip() else status
        exc = FunctionError(last if status == RAISED else text)
    if status == RAISED and text:
        exc.__cause__ = RemoteTraceback(text)
    return exc
