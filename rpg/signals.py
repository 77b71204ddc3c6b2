"""SIGTERM while a session is open: it unwinds the main thread (SystemExit), so that ``with
Session()`` closes cleanly (agents stopped, units canceled, profile flushed) instead of the
process dying at once."""

from __future__ import annotations

import signal
import threading
from typing import Any

from rpg import threads

_sigterm_lock = threads.Lock()
_sigterm_users = 0


def _sigterm_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def hold_sigterm() -> bool:
    """While a session is open, SIGTERM unwinds the main thread (so ``with Session()`` closes
    cleanly: agents stopped, units canceled, profile flushed) instead of killing the process
    outright. Only when SIGTERM has its default action and we are on the main thread."""
    global _sigterm_users
    if threading.current_thread() is not threading.main_thread():
        return False
    with _sigterm_lock:
        current = signal.getsignal(signal.SIGTERM)
        if current is _sigterm_exit:
            _sigterm_users += 1
            return True
        if current != signal.SIG_DFL:
            return False
        signal.signal(signal.SIGTERM, _sigterm_exit)
        _sigterm_users = 1
        return True


def release_sigterm() -> None:
    global _sigterm_users
    with _sigterm_lock:
        _sigterm_users -= 1
        if (_sigterm_users == 0 and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is _sigterm_exit):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
