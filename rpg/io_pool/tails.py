"""Output tails: the last bytes of a file as text, never silently empty (blocking; run in the
file's disk lane). The agent reads its units' stdout/stderr with them, launchers an agent's
stderr."""

from __future__ import annotations

import errno
import os
import stat

TAIL_BYTES = 64 * 1024


def read_tail(path: str, limit: int = TAIL_BYTES) -> str:
    """The last ``limit`` bytes of a file as text ('' if it is missing). Blocking.

    Only a missing file reads as ''; any other error raises OSError, so output is never
    dropped silently. A FIFO, device or directory is refused (never read): opening is
    non-blocking, so a unit that leaves a FIFO in place of its output cannot hang the reading
    thread. A symbolic link is not followed (as staging never leaves the sandbox through one).
    An empty regular file (most units' stderr, a null unit's both) costs one ``lstat``.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ""
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        return ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symbolic link (not followed)", path) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise OSError(errno.EISDIR, "Is a directory", path)
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - limit))
        return fh.read(limit).decode("utf-8", "replace")


def read_outputs(sandbox: str, stdout_name: str, stderr_name: str,
                 limit: int = TAIL_BYTES) -> tuple[str, str, list[str]]:
    """(stdout tail, stderr tail, problems): the last ``limit`` bytes of the unit's output.

    A stream that cannot be read is '' and adds "cannot read stdout: <error>" to problems,
    which the agent makes the unit's reason. Blocking.
    """
    texts, problems = [], []
    for what, name in (("stdout", stdout_name), ("stderr", stderr_name)):
        try:
            texts.append(read_tail(os.path.join(sandbox, name), limit))
        except OSError as exc:
            texts.append("")
            problems.append(f"cannot read {what}: {exc}")
    return texts[0], texts[1], problems
