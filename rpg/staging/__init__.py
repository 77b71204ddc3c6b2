"""Staging, both sides: where a directive's paths lead and the rule that its sandbox side stays
in its sandbox (``paths``), carrying out a unit's directives and ``non_fatal`` (``directives``),
the local copy/link/move an agent does (``local``), SFTP transfers (``sftp``), and the hub's
``client://`` staging for a pilot on another machine (``client``).

Blocking functions stay blocking: callers run them in io_pool lanes.
"""

from rpg.staging.client import ClientStaging, RemoteSandbox
from rpg.staging.directives import carry_out, client_directives, is_client, label
from rpg.staging.local import make_sandbox, stage
from rpg.staging.paths import (
    LOCAL,
    FileSystem,
    StagingError,
    confine,
    other_side,
    sandbox_side,
)

__all__ = [
    "LOCAL",
    "ClientStaging",
    "FileSystem",
    "RemoteSandbox",
    "StagingError",
    "carry_out",
    "client_directives",
    "confine",
    "is_client",
    "label",
    "make_sandbox",
    "other_side",
    "sandbox_side",
    "stage",
]
