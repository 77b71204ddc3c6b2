"""client:// staging for a client of a hub service: its files go through the hub, in chunks.

The hub's agents cannot see the client's machine, so a remote client uploads each client://
input to the session's sandbox on the hub (``client/in/<sha256>``: stored once per content)
before it submits, and the unit reads it from there as the hub's own client:// file; a
client:// output is written on the hub (``client/out/<sha256 of the client path>``) and the
client downloads it when the unit is DONE, before the application sees DONE. Chunks are at most
``CHUNK`` bytes (memory stays bounded whatever the file's size); both ends check the SHA-256 of
the whole file. The hub's side of each call is blocking (disk): it runs in a lane.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Callable

CHUNK = 1 << 20
MAX_FILE = 64 << 30  # bytes one upload may hold
SHA = re.compile(r"[0-9a-f]{64}\Z")


class RelayError(ValueError):
    """A bad upload or download (its name, offset, size or checksum)."""


def out_name(client_path: str) -> str:
    return hashlib.sha256(client_path.encode()).hexdigest()


# -- the hub's side (blocking; in a lane) ---------------------------------------------------------

def _area(sandbox: str, kind: str, name: str) -> str:
    if not SHA.match(name):
        raise RelayError(f"name must be a sha256 (64 hex digits), got {name[:70]!r}")
    d = os.path.join(sandbox, "client", kind)
    os.makedirs(d, 0o700, exist_ok=True)
    return os.path.join(d, name)


def hub_out_path(sandbox: str, client_path: str) -> str:
    return _area(sandbox, "out", out_name(client_path))


def write_chunk(sandbox: str, name: str, offset: int, data: bytes) -> int:
    """Write a chunk of upload ``name`` (its sha256) at ``offset``; returns the size so far.
    Chunks come in order: one at another offset than the size so far is refused."""
    if not isinstance(data, bytes) or len(data) > CHUNK:
        raise RelayError(f"data must be bytes, at most {CHUNK} per call")
    final = _area(sandbox, "in", name)
    if os.path.exists(final):
        return os.path.getsize(final)
    part = final + ".part"
    size = os.path.getsize(part) if os.path.exists(part) else 0
    if offset == 0 and size:
        size = 0  # a new upload of the same content (the last one broke off): start over
        os.unlink(part)
    if offset < size and offset + len(data) <= size:
        return size  # sent again after a lost reply: held already (the sha256 checks it)
    if offset != size:
        raise RelayError(f"offset {offset}: the upload of {name[:12]} holds {size} bytes")
    if size + len(data) > MAX_FILE:
        raise RelayError(f"an upload is at most {MAX_FILE} bytes")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return size + len(data)


def finish_upload(sandbox: str, name: str) -> str:
    """Check the upload against its name (sha256) and keep it; returns its path on the hub."""
    final = _area(sandbox, "in", name)
    if os.path.exists(final):
        return final
    part = final + ".part"
    if not os.path.exists(part):
        raise RelayError(f"no upload {name[:12]} under way")
    if file_sha256(part) != name:
        os.unlink(part)
        raise RelayError(f"upload {name[:12]}: checksum mismatch (the file changed while it "
                         f"was sent?); send it again")
    os.replace(part, final)
    return final


def read_chunk(sandbox: str, client_path: str, offset: int) -> dict[str, Any]:
    """A chunk of a unit's output for ``client_path``; the first one says size and sha256."""
    path = hub_out_path(sandbox, client_path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise RelayError(f"no output for {client_path} on the hub") from None
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        out: dict[str, Any] = {"data": os.read(fd, CHUNK)}
        if offset == 0:
            out["size"] = os.fstat(fd).st_size
            out["sha256"] = file_sha256(path)
        return out
    finally:
        os.close(fd)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


# -- the client's side (blocking; the application's thread or the session's applier) -------------

def upload(call: Callable[..., Any], path: str) -> str:
    """Send ``path`` to the hub (unless it holds that content already); its path there."""
    name = file_sha256(path)
    offset = call("upload", name, 0, b"")
    if offset == 0:
        with open(path, "rb") as fh:
            while True:
                data = fh.read(CHUNK)
                if not data:
                    break
                offset = call("upload", name, offset, data)
    return call("upload_done", name)


def download(call: Callable[..., Any], client_path: str) -> None:
    """Fetch a unit's output for ``client_path`` into place (atomically, checksum checked)."""
    first = call("download", client_path, 0)
    tmp = f"{client_path}.rpg-part"
    h = hashlib.sha256()
    with open(tmp, "wb") as fh:
        chunk, offset = first, 0
        while True:
            data = chunk["data"]
            fh.write(data)
            h.update(data)
            offset += len(data)
            if offset >= first["size"] or not data:
                break
            chunk = call("download", client_path, offset)
    if h.hexdigest() != first["sha256"] or offset != first["size"]:
        os.unlink(tmp)
        raise RelayError(f"download of {client_path}: checksum mismatch")
    os.replace(tmp, client_path)
