"""The hub's ``client://`` staging for a pilot on another machine: its agent cannot reach the
application's files, so the hub moves them over SFTP, before it hands the unit over (the unit
stays BOUND) and after the agent says it is DONE (the unit stays STAGING_OUT).

The launcher gives access to the remote pilot sandbox (``RemoteSandbox``); which directives,
the confinement, ``non_fatal`` and the profile's TRANSFER events are this module's.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from rpg.staging import sftp
from rpg.staging.directives import carry_out, client_directives
from rpg.staging.paths import StagingError

T = TypeVar("T")


class RemoteSandbox(Protocol):
    """How the hub reaches a pilot sandbox on another machine (a launcher provides it)."""

    def pilot_sandbox(self) -> str:
        """The remote pilot sandbox, once the launch is over (waits for it, on the loop);
        raises if the pilot did not start or is stopping."""
        ...

    def sftp_call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(sftp_client, known_dirs, *args)`` in an SFTP lane (blocking there, waited for
        here); again after a reconnect while the connection is down. ``fn`` is idempotent."""
        ...


class ClientStaging:
    """client:// staging of the units of one remote pilot; runs on each unit's lifecycle
    greenlet, and a failure raises StagingError (the unit FAILS with its words)."""

    def __init__(self, remote: RemoteSandbox, profile: Any, log: Any) -> None:
        self.remote = remote
        self.profile = profile
        self.log = log

    def has_stage_in(self, desc: dict[str, Any]) -> bool:
        return bool(client_directives(desc, "in"))

    def has_stage_out(self, desc: dict[str, Any]) -> bool:
        return bool(client_directives(desc, "out"))

    def stage_in(self, unit: Any) -> None:
        self._stage(unit, "in")

    def stage_out(self, unit: Any) -> None:
        self._stage(unit, "out")

    def _stage(self, unit: Any, direction: str) -> None:
        carry_out(client_directives(unit.desc, direction),
                  lambda d: self._transfer(unit, d, direction),
                  f"client staging {direction}", self.log, unit=unit.uid)

    def _transfer(self, unit: Any, d: dict[str, Any], direction: str) -> None:
        # Units are bound while the pilot is still launching: this waits for its sandbox.
        sandbox = self.remote.pilot_sandbox()
        if d["action"] == "link":
            raise StagingError("'link' cannot reach the application's machine from a remote "
                               "pilot; use 'transfer' or 'copy'")
        unit_sb = posixpath.join(sandbox, unit.uid)
        nbytes, seconds = self.remote.sftp_call(sftp.transfer, d, direction, unit_sb, sandbox)
        self.profile.add(time.time(), unit.uid, "TRANSFER", "hub", direction=direction,
                         bytes=nbytes, seconds=round(seconds, 6), source=d["source"],
                         target=d["target"], via="sftp")
