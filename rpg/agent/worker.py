"""A warm function worker: ``python -m rpg.agent.worker IN_FD OUT_FD``.

The agent (``rpg/agent/function_workers.py``) starts one per function slot and keeps it for
the pilot's life. It reads jobs, ``(uid, sandbox, environment, payload)``, from IN_FD, runs their
calls in order in the unit's sandbox, and writes one frame per call as soon as it returns
(so when a worker dies, the agent knows exactly which call was running), then an end frame
with its RSS. Values over ``calls.INLINE_RESULT`` go through a file in the sandbox. It never
runs a loop and imports only the standard library, cloudpickle and ``rpg.calls``. It exits
when IN_FD closes, and on its own if the agent is gone.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
import threading
import time
import traceback
from typing import Any

import cloudpickle

from rpg import calls

HEADER = struct.Struct(">I")
MAX_FRAME = calls.MAX_PAYLOAD + (1 << 20)


def write_frame(fd: int, obj: Any) -> None:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(HEADER.pack(len(body)) + body)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_exact(fd: int, n: int) -> bytes | None:
    parts = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def read_frame(fd: int) -> Any:
    head = read_exact(fd, HEADER.size)
    if head is None:
        return None
    (size,) = HEADER.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    body = read_exact(fd, size)
    return None if body is None else pickle.loads(body)


def rss_mb() -> float:
    with open("/proc/self/statm", "rb") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _watch_parent(parent: int) -> None:
    """The agent is gone (killed with SIGKILL, say) while a call runs: do not outlive it."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(70)


class Worker:
    def __init__(self, out_fd: int) -> None:
        self.out = out_fd
        self.functions: dict[bytes, Any] = {}
        self.home = os.getcwd()

    def function(self, blob: bytes) -> Any:
        fn = self.functions.get(blob)
        if fn is None:
            if len(self.functions) > 256:
                self.functions.clear()
            fn = self.functions[blob] = cloudpickle.loads(blob)
        return fn

    def run(self, uid: str, sandbox: str, environment: dict[str, str], payload: bytes) -> None:
        saved = {k: os.environ.get(k) for k in environment}
        os.environ.update(environment)
        try:
            os.makedirs(sandbox, exist_ok=True)
            os.chdir(sandbox)
            version, fns, todo = calls.unpack(payload)
            sent = 0
            for index, (fi, mode, data) in enumerate(todo):
                sent += self.call(uid, index, sandbox, fns[fi], mode, data, sent, version)
        except BaseException as exc:  # the payload itself: cannot start any call
            write_frame(self.out, ("r", uid, -1, calls.ERROR, None, None,
                                   f"the worker could not read the unit's calls: "
                                   f"{type(exc).__name__}: {exc}", 0.0))
        finally:
            os.chdir(self.home)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            sys.stdout.flush()
            sys.stderr.flush()
        write_frame(self.out, ("e", uid, rss_mb()))

    def call(self, uid: str, index: int, sandbox: str, blob: bytes, mode: str, data: bytes,
             sent: int, version: str) -> int:
        """Run one call and report it; returns the bytes of its value sent."""
        t0 = time.perf_counter()
        status, value, text = calls.OK, None, ""
        try:
            try:
                fn = self.function(blob)
                todo = cloudpickle.loads(data)
            except Exception as exc:  # not the function's fault: say what usually is
                hint = calls.version_hint(version)
                if hint:
                    raise RuntimeError(f"cannot unpickle the call: {type(exc).__name__}: "
                                       f"{exc}{hint}") from exc
                raise
            if mode == "map":
                value = [fn(*a) for a in todo]
            else:
                args, kwargs = todo
                value = fn(*args, **kwargs)
        except BaseException as exc:  # SystemExit too: it ends the call, not the worker
            status, text = calls.RAISED, traceback.format_exc()
            try:
                value = cloudpickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:
                value = None
        seconds = time.perf_counter() - t0
        path = None
        if status == calls.OK:
            try:
                value = cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                status, value = calls.ERROR, None
                text = (f"the function returned a value that cannot be pickled: "
                        f"{type(exc).__name__}: {exc}")
        if value is not None and sent + len(value) > calls.MAX_RESULTS:
            if status == calls.OK:
                text = (f"the function returned {len(value)} bytes (pickled); a unit's results "
                        f"may be at most {calls.MAX_RESULTS} (write big results to a file and "
                        f"stage it out)")
                status = calls.ERROR
            value = None
        if value is not None and len(value) > calls.INLINE_RESULT:
            path = os.path.join(sandbox, f".rpg-result-{index}")
            with open(path, "wb") as fh:
                fh.write(value)
            size, value = len(value), None
        else:
            size = len(value) if value is not None else 0
        write_frame(self.out, ("r", uid, index, status, value, path, text, seconds))
        return size


def main(argv: list[str]) -> int:
    in_fd, out_fd = int(argv[0]), int(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides when a worker ends
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    worker = Worker(out_fd)
    while True:
        job = read_frame(in_fd)
        if job is None:
            return 0
        worker.run(*job)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
