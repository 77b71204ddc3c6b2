"""zerorpc settings shared by the hub's server and the agent's clients."""

from __future__ import annotations

from typing import Any

NO_ZERO_COPY = (1 << 31) - 1


def no_zero_copy(endpoint: Any) -> None:
    """Make a zerorpc Server/Client copy large messages instead of sending them zero-copy.

    Zero-copy sends start pyzmq's process-wide garbage-collector thread (and a zmq context of
    its own) that nobody ever stops; a copy of a few MB costs microseconds, a leaked thread per
    process is forever.
    """
    endpoint._events._socket.copy_threshold = NO_ZERO_COPY
