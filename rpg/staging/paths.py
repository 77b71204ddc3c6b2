"""Where a staging directive's paths lead, and the rule that the sandbox side stays inside its
sandbox (symlinks too), for a local file system and a remote one (over SFTP) alike.

A directive has a sandbox side (the target of input staging, the source of output staging):
relative, ``unit://`` (the unit sandbox) or ``pilot://`` (the pilot sandbox), never absolute nor
``..`` above its root. The other side may also be an absolute path or ``client://`` (the
application's machine). Path arithmetic here is pure; the confinement check asks a
``FileSystem`` (``os.path`` here, an SFTP session in ``rpg.staging.sftp``) what the paths resolve
to.
"""

from __future__ import annotations

import os
import posixpath
from typing import Protocol

from rpg.description import escapes, split_url


class StagingError(OSError):
    """A staging directive failed; the message says why."""


class FileSystem(Protocol):
    """What the confinement check needs from the file system the sandbox is on."""

    def realpath(self, path: str) -> str:
        """``path`` with every symlink resolved."""
        ...

    def lexists(self, path: str) -> bool:
        """True if ``path`` exists (a dangling symlink does)."""
        ...


class LocalFileSystem:
    """This machine's file system. Blocking: call it from a lane."""

    def realpath(self, path: str) -> str:
        return os.path.realpath(path)

    def lexists(self, path: str) -> bool:
        return os.path.lexists(path)


LOCAL = LocalFileSystem()


def sandbox_side(path: str, unit_sandbox: str, pilot_sandbox: str) -> tuple[str, str]:
    """(absolute path, root it must stay inside) for the sandbox side of a directive. Refuses
    (StagingError) an absolute path, ``..`` above the root, and any scheme but unit:// and
    pilot://; the description refuses them too; this holds whatever reaches staging."""
    scheme, rel = split_url(path)
    if scheme not in ("", "unit", "pilot"):
        raise StagingError(f"the sandbox side must be relative, unit:// or pilot://, "
                           f"got {path!r}")
    if escapes(rel):
        raise StagingError(f"{path!r} escapes its sandbox (absolute or '..' above it)")
    root = pilot_sandbox if scheme == "pilot" else unit_sandbox
    return posixpath.normpath(posixpath.join(root, rel)), root


def other_side(path: str, unit_sandbox: str, pilot_sandbox: str) -> str:
    """The absolute path of the other side of a directive, on the agent's machine: an absolute
    path as it is, ``client://`` as on this machine (a local pilot's agent shares it with the
    application), pilot:// and relative ones in their sandbox."""
    scheme, rel = split_url(path)
    if scheme == "client":
        return os.path.abspath(rel)
    if scheme == "pilot":
        return posixpath.normpath(posixpath.join(pilot_sandbox, rel))
    if rel.startswith("/"):
        return rel
    return posixpath.normpath(posixpath.join(unit_sandbox, rel))


def within(path: str, root: str) -> bool:
    """True if ``path`` is ``root`` or below it (both already resolved)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def confine(path: str, root: str, what: str, fs: FileSystem = LOCAL) -> None:
    """Raise StagingError unless ``path`` resolves (symlinks too) inside ``root``. A path that
    does not exist yet is judged by its parent directory, where it would be created."""
    probe = path if fs.lexists(path) else posixpath.dirname(path)
    real, real_root = fs.realpath(probe), fs.realpath(root)
    if not within(real, real_root):
        raise StagingError(f"{what} {path!r} escapes its sandbox (resolves to {real!r})")


def confine_sandbox_side(path: str, root: str, direction: str, fs: FileSystem = LOCAL) -> None:
    """``confine`` for the sandbox side of a directive, named as messages name it."""
    confine(path, root, "staging target" if direction == "in" else "staging source", fs)
