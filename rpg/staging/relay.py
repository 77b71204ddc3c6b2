"""client:// staging for a client of a hub service: its files go through the hub, in chunks.

The hub's agents cannot see the client's machine, so a remote client uploads each client://
input to the session's sandbox on the hub (``client/in/<sha256>``: stored once per content)
before it submits, and the unit reads it from there as the hub's own client:// file; a
client:// output is written on the hub (``client/out/<sha256 of the client path>``) and the
client downloads it when the unit is DONE, before the application sees DONE. Chunks are at most
``CHUNK`` bytes (memory stays bounded whatever the file's size); both ends check the SHA-256 of
the whole file, computed chunk by chunk as it goes (no call reads a whole file). Each transfer
has an id the client chooses, so two of the same file never meet, and a chunk asked again after
a lost reply is answered again. The hub's side of each call is blocking (disk): it runs in a
lane; ``threading`` here is the real module (lane threads are real threads).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
from collections import OrderedDict
from typing import Any, Callable

from rpg import threads

CHUNK = 1 << 20
MAX_FILE = 64 << 30  # bytes one upload may hold
SHA = re.compile(r"[0-9a-f]{64}\Z")
TID = re.compile(r"[0-9a-f]{16,64}\Z")


class RelayError(ValueError):
    """A bad upload or download (its name, offset, size or checksum)."""


def out_name(client_path: str) -> str:
    return hashlib.sha256(client_path.encode()).hexdigest()


# -- the hub's side (blocking; in a lane) ---------------------------------------------------------

TRANSFERS_KEPT = 256  # uploads and downloads under way, per service: the oldest are forgotten
_transfers: "OrderedDict[tuple[str, str], Any]" = OrderedDict()
_transfers_lock = threads.Lock()


def _area(sandbox: str, kind: str, name: str) -> str:
    if not SHA.match(name):
        raise RelayError(f"name must be a sha256 (64 hex digits), got {name[:70]!r}")
    d = os.path.join(sandbox, "client", kind)
    os.makedirs(d, 0o700, exist_ok=True)
    return os.path.join(d, name)


def _transfer_id(tid: str) -> str:
    if not isinstance(tid, str) or not TID.match(tid):
        raise RelayError(f"transfer id must be 16-64 hex digits, got {str(tid)[:70]!r}")
    return tid


def _keep(key: tuple[str, str], state: Any) -> None:
    with _transfers_lock:
        _transfers[key] = state
        _transfers.move_to_end(key)
        while len(_transfers) > TRANSFERS_KEPT:
            _transfers.popitem(last=False)


def _state(key: tuple[str, str]) -> Any:
    with _transfers_lock:
        return _transfers.get(key)


def _drop(key: tuple[str, str]) -> None:
    with _transfers_lock:
        _transfers.pop(key, None)


def hub_out_path(sandbox: str, client_path: str) -> str:
    return _area(sandbox, "out", out_name(client_path))


def write_chunk(sandbox: str, name: str, tid: str, offset: int, data: bytes) -> int:
    """Write a chunk of upload ``tid`` of content ``name`` (its sha256) at ``offset``; returns
    the bytes held (all of them if the hub has that content already). Each upload has a part
    file of its own, so two of the same content never meet; the sha256 is kept up to date
    chunk by chunk, so finishing never reads the file again."""
    if not isinstance(data, bytes) or len(data) > CHUNK:
        raise RelayError(f"data must be bytes, at most {CHUNK} per call")
    key = (sandbox, _transfer_id(tid))
    final = _area(sandbox, "in", name)
    if os.path.exists(final):
        return os.path.getsize(final)
    part = f"{final}.{tid}.part"
    st = _state(key)
    if st is None:
        if offset != 0:
            raise RelayError(f"offset {offset}: upload {tid} is not under way (or was "
                             f"forgotten): start again at offset 0")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        st = {"size": 0, "sha": hashlib.sha256(), "last": (0, 0)}
        _keep(key, st)
    if (offset, len(data)) == st["last"] and offset < st["size"]:
        return st["size"]  # sent again after a lost reply: held already
    if offset != st["size"]:
        raise RelayError(f"offset {offset}: upload {tid} holds {st['size']} bytes")
    if st["size"] + len(data) > MAX_FILE:
        raise RelayError(f"an upload is at most {MAX_FILE} bytes")
    if data:
        fd = os.open(part, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        st["sha"].update(data)
        st["last"] = (offset, len(data))
        st["size"] += len(data)
    return st["size"]


def finish_upload(sandbox: str, name: str, tid: str) -> str:
    """Check the upload against its name (sha256) and keep it; returns its path on the hub."""
    key = (sandbox, _transfer_id(tid))
    final = _area(sandbox, "in", name)
    if os.path.exists(final):
        return final
    part = f"{final}.{tid}.part"
    st = _state(key)
    if st is None or not os.path.exists(part):
        raise RelayError(f"no upload {tid} of {name[:12]} under way")
    _drop(key)
    if st["sha"].hexdigest() != name:
        os.unlink(part)
        raise RelayError(f"upload {name[:12]}: checksum mismatch (the file changed while it "
                         f"was sent?); send it again")
    os.replace(part, final)
    return final


def read_chunk(sandbox: str, client_path: str, tid: str, offset: int) -> dict[str, Any]:
    """Chunk ``offset`` of a unit's output for ``client_path`` (download ``tid``, read in
    order); the first says the size, the last (``eof``) the sha256 of what was sent."""
    path = hub_out_path(sandbox, client_path)
    key = (sandbox, _transfer_id(tid))
    st = _state(key)
    if offset == 0 and (st is None or st["last"] != (0, st["last"][1])):
        st = {"size": 0, "sha": hashlib.sha256(), "last": (-1, 0), "data": b""}
        _keep(key, st)
    if st is None:
        raise RelayError(f"offset {offset}: download {tid} is not under way (or was "
                         f"forgotten): start again at offset 0")
    if (offset, len(st["data"])) == st["last"] and offset + len(st["data"]) == st["size"]:
        data = st["data"]  # asked again after a lost reply
    elif offset == st["size"]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise RelayError(f"no output for {client_path} on the hub") from None
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise RelayError(f"the output for {client_path} is a directory: only files "
                                 f"go through the hub (tar it)")
            if not stat.S_ISREG(mode):
                raise RelayError(f"the output for {client_path} is not a regular file")
            os.lseek(fd, offset, os.SEEK_SET)
            data = os.read(fd, CHUNK)
            total = os.fstat(fd).st_size
        finally:
            os.close(fd)
        st["sha"].update(data)
        st.update(last=(offset, len(data)), size=offset + len(data), data=data, total=total)
    else:
        raise RelayError(f"offset {offset}: download {tid} is at {st['size']}")
    out: dict[str, Any] = {"data": data, "size": st["total"]}
    if not data or st["size"] >= st["total"]:
        out["sha256"] = st["sha"].hexdigest()
        out["eof"] = True
    return out


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
    tid = secrets.token_hex(8)
    offset = call("upload", name, tid, 0, b"")
    if offset == 0:
        with open(path, "rb") as fh:
            while True:
                data = fh.read(CHUNK)
                if not data:
                    break
                offset = call("upload", name, tid, offset, data)
    return call("upload_done", name, tid)


def download(call: Callable[..., Any], client_path: str, create_parents: bool = True) -> None:
    """Fetch a unit's output for ``client_path`` into place (atomically, sha256 checked)."""
    if create_parents:
        os.makedirs(os.path.dirname(client_path) or ".", exist_ok=True)
    tid = secrets.token_hex(8)
    tmp = f"{client_path}.rpg-part"
    h = hashlib.sha256()
    offset = 0
    with open(tmp, "wb") as fh:
        while True:
            chunk = call("download", client_path, tid, offset)
            fh.write(chunk["data"])
            h.update(chunk["data"])
            offset += len(chunk["data"])
            if chunk.get("eof"):
                break
    if h.hexdigest() != chunk["sha256"]:
        os.unlink(tmp)
        raise RelayError(f"download of {client_path}: checksum mismatch")
    os.replace(tmp, client_path)
