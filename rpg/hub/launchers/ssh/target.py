"""Where an SSH pilot goes (``ssh://[user@]host[:port]``) and which host keys are trusted:
known_hosts, a key pinned at the first connection, or (opted in) an unknown one, logged.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import paramiko


@dataclass(frozen=True)
class SSHTarget:
    """user@host:port of an ``ssh://`` resource."""

    user: str
    host: str
    port: int

    @classmethod
    def parse(cls, resource: str) -> SSHTarget:
        """``ssh://[user@]host[:port]`` or ``slurm+ssh://...`` (the description validated its
        shape). Without a user, the local one, from the environment: a password-database lookup
        could block the loop, so that fallback is left to ``with_user`` on a lane thread."""
        rest = resource.split("://", 1)[1]  # ssh:// or slurm+ssh://
        user, _, hostport = rest.rpartition("@")
        host, _, port = hostport.partition(":")
        user = user or os.environ.get("LOGNAME") or os.environ.get("USER") or ""
        return cls(user, host, int(port) if port else 22)

    def with_user(self) -> SSHTarget:
        """This target with a user name for sure (blocking: may read the password database)."""
        return self if self.user else replace(self, user=getpass.getuser())

    @property
    def label(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint of a key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class UnknownHostKey(Exception):
    """The server's key is in no known_hosts and trusting unknown keys was not asked for."""


class RejectUnknown:
    """The default: an unknown host key ends the connection, with a message saying what to do."""

    def __init__(self, known_hosts: str, missing_file: bool) -> None:
        self.known_hosts = known_hosts
        self.missing_file = missing_file

    def missing_host_key(self, client: Any, hostname: str, key: paramiko.PKey) -> None:
        where = (f"known_hosts file {self.known_hosts} does not exist" if self.missing_file
                 else f"it is not in {self.known_hosts}")
        raise UnknownHostKey(
            f"unknown host key for {hostname} ({key.get_name()} {fingerprint(key)}): {where}; "
            f"refusing to connect. Add the key to known_hosts (ssh-keyscan) or set "
            f"ssh_trust_unknown_host=True to trust it for this pilot")


class TrustUnknown:
    """The explicit opt-in: accept an unknown key for this pilot, log its fingerprint, and
    keep it in memory only (known_hosts is not written)."""

    def __init__(self, log: Any) -> None:
        self.log = log

    def missing_host_key(self, client: Any, hostname: str, key: paramiko.PKey) -> None:
        self.log.warning("ssh_unknown_host_key_trusted", host=hostname, key_type=key.get_name(),
                         fingerprint=fingerprint(key))
        client.get_host_keys().add(hostname, key.get_name(), key)
