"""Private directories: how rpg makes a session or pilot sandbox on this machine.

A sandbox holds what others must not touch (the profile, agent files, unit outputs), so it is
created 0700, and a pre-existing one is taken only if it is a real directory of ours that
nobody else can write to: anyone who can write there could plant a link where rpg writes.
Blocking (disk): run these in the path's io_pool lane.
"""

from __future__ import annotations

import os
import stat


class SandboxError(ValueError):
    """A sandbox that rpg will not use; the message says which and why."""


def check_private_dir(path: str, st: os.stat_result, what: str) -> None:
    """Raise SandboxError unless ``st`` (of ``path``) is a directory owned by us that neither
    group nor others can write to."""
    if stat.S_ISLNK(st.st_mode):
        raise SandboxError(f"{what} {path} is a symbolic link: refusing it (rpg writes its "
                           f"secrets there; give the real directory)")
    if not stat.S_ISDIR(st.st_mode):
        raise SandboxError(f"{what} {path} exists and is not a directory")
    me = os.geteuid()
    if st.st_uid != me:
        raise SandboxError(f"{what} {path} is owned by uid {st.st_uid}, not by this user "
                           f"(uid {me}): refusing it (its owner could plant or read files in it)")
    if st.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002))
                           if st.st_mode & bit)
        raise SandboxError(f"{what} {path} is writable by {who} (mode "
                           f"{stat.S_IMODE(st.st_mode):04o}): refusing it (anyone who can write "
                           f"there can plant links where rpg's files go); remove it, "
                           f"`chmod go-w` it, or choose another sandbox")


def make_private_dir(path: str, what: str) -> None:
    """Create ``path`` 0700 (parents as usual), or accept an existing private one."""
    if os.path.islink(path):
        check_private_dir(path, os.lstat(path), what)
    os.makedirs(path, 0o700, exist_ok=True)
    check_private_dir(path, os.lstat(path), what)
