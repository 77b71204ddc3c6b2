"""Users of a hub service and their access files.

``DIR/users.json`` maps each user name to the SHA-256 of their token: the hub stores hashes,
never tokens. An access file (``address``, ``token``, ``user``; mode 0600) is what a client
needs; ``rpg hub serve`` writes the owner's as ``DIR/access.json``, ``rpg hub token`` prints
one for another user. Both commands and the running hub change users.json with a lock and an
atomic rename, so a token added or revoked while the hub runs is seen at its next reload.
Blocking (disk): the hub calls these in a lane.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from contextlib import contextmanager
from typing import Any, Iterator

USERS_FILE = "users.json"
ACCESS_FILE = "access.json"
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


class UsersError(ValueError):
    """A bad user name, or a users file that cannot be used."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not USER_NAME.match(name):
        raise UsersError(f"user name {str(name)[:70]!r}: 1-64 letters, digits, '.', '_' or "
                         f"'-', starting with a letter or digit")
    return name


def write_private_json(path: str, data: Any) -> None:
    """Write ``data`` to ``path`` atomically, mode 0600 from the start."""
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class Users:
    def __init__(self, sandbox: str) -> None:
        self.path = os.path.join(sandbox, USERS_FILE)
        self._lock_path = self.path + ".lock"
        self.hashes: dict[str, str] = {}
        self._mtime: Any = None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict[str, str]:
        try:
            with open(self.path) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise UsersError(f"{self.path} is not JSON: {exc}") from None
        if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and len(v) == 64
                for k, v in data.items()):
            raise UsersError(f"{self.path}: expected {{user: sha256 of the token}}")
        return data

    def reload(self) -> bool:
        """Read the file again if it changed; True if it did."""
        try:
            st = os.stat(self.path)
            mtime: Any = (st.st_ino, st.st_mtime_ns, st.st_size)  # each write is a new inode
        except FileNotFoundError:
            mtime = None
        if mtime == self._mtime:
            return False
        self.hashes = self._read()
        self._mtime = mtime
        return True

    def add(self, name: str, token: str | None = None) -> str:
        """Give ``name`` a new token (replacing any old one); returns the token."""
        check_name(name)
        token = token or secrets.token_urlsafe(32)
        with self._locked():
            data = self._read()
            data[name] = token_hash(token)
            write_private_json(self.path, data)
        self.reload()
        return token

    def revoke(self, name: str) -> bool:
        with self._locked():
            data = self._read()
            if name not in data:
                return False
            del data[name]
            write_private_json(self.path, data)
        self.reload()
        return True

    def who(self, token: str) -> str | None:
        """The user whose token this is, or None; compares against every hash (constant
        time in the token)."""
        h = token_hash(token)
        found = None
        for name, expected in self.hashes.items():
            if hmac.compare_digest(h, expected):
                found = name
        return found


def access(address: str, token: str, user: str) -> dict[str, str]:
    return {"address": address, "token": token, "user": user}


def read_access_file(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
