"""zerorpc settings shared by the hub's server and the agent's clients; what can cross the wire
(``wire_problem``) and how a value is made to (``wire_safe``)."""

from __future__ import annotations

from typing import Any

import msgpack
import zmq

from rpg.internals import zmq_socket

NO_ZERO_COPY = (1 << 31) - 1


def no_zero_copy(endpoint: Any) -> None:
    """Make a zerorpc Server/Client copy large messages instead of sending them zero-copy.

    Zero-copy sends start pyzmq's process-wide garbage-collector thread (and a zmq context of
    its own) that nobody ever stops; a copy of a few MB costs microseconds, a leaked thread per
    process is forever.
    """
    zmq_socket(endpoint).copy_threshold = NO_ZERO_COPY


def no_linger(endpoint: Any) -> None:
    """Let a zerorpc Client's socket drop unsent messages when closed: with zmq's default
    (wait for ever), a call queued to a hub that is gone keeps the context's term() from ever
    returning, and with it the thread that closes the client."""
    zmq_socket(endpoint).setsockopt(zmq.LINGER, 0)


def wire_problem(data: Any) -> str | None:
    """Why ``data`` cannot cross a zerorpc boundary (msgpack, strings as UTF-8), or None.

    A string with a lone surrogate (what ``os.fsdecode`` gives for a non-UTF-8 file name) cannot
    be encoded; sent in a batch, it would fail the whole message, so it is caught per item.
    """
    try:
        msgpack.packb(data, use_bin_type=True)
    except UnicodeEncodeError as exc:
        near = exc.object[max(0, exc.start - 20):exc.end + 20]
        return f"a string cannot be encoded as UTF-8 ({exc.reason}, near {near!r})"
    except (TypeError, ValueError, OverflowError) as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


def wire_safe(value: Any) -> Any:
    """``value`` with every string made encodable as UTF-8: a lone surrogate (what os.fsdecode
    gives for a Latin-1 file name) becomes a backslash escape. Cheap when all is well."""
    if isinstance(value, str):
        if value.isascii():
            return value
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {wire_safe(k): wire_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [wire_safe(v) for v in value]
    return value
