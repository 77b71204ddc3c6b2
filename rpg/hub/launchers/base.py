"""The launcher interface, the agent configuration every launcher hands to its agent, and the
one way a launcher on this machine makes a pilot sandbox and writes the agent's files into it.

The pilot token goes in a file of its own (``agent.token``, not ``agent.json``), which the agent
reads and deletes before it registers or runs a unit: units run as the same user, in the pilot
sandbox, and must not find it there.
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
from contextlib import suppress
from typing import TYPE_CHECKING, NamedTuple

from rpg.io_pool.sweep import pilot_key
from rpg.launch_config import AgentConfig
from rpg.sandbox import SandboxError, check_private_dir, make_private_dir

if TYPE_CHECKING:
    from rpg.hub.hub import Hub
    from rpg.hub.records import PilotRecord
    from rpg.staging import ClientStaging


AGENT_CONFIG = "agent.json"
AGENT_TOKEN = "agent.token"


class LaunchError(RuntimeError):
    """The agent could not be started; the message is the pilot's FAILED reason."""


class AgentFile(NamedTuple):
    """One file a launcher puts in a fresh pilot sandbox: its name, content and mode."""

    name: str
    data: bytes
    mode: int = 0o600


def prepare_sandbox(path: str, files: list[AgentFile]) -> None:
    """Create the pilot sandbox ``path`` (mode 0700; parents as needed), or accept a pre-existing
    one only if it is a real directory of ours that nobody else can write to, and create each of
    ``files`` in it exclusively (O_EXCL|O_NOFOLLOW: never through a planted link, never over
    another pilot's files). Raises LaunchError saying what is wrong with the sandbox, or OSError.
    Blocking: run it in the sandbox's disk lane."""
    try:
        make_private_dir(path, "pilot sandbox")
    except SandboxError as exc:
        raise LaunchError(str(exc)) from None
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:  # the directory we opened, too: it may have been swapped since
            check_private_dir(path, os.fstat(dfd), "pilot sandbox")
        except SandboxError as exc:
            raise LaunchError(str(exc)) from None
        _check_unused(path, dfd, files)
        created: list[str] = []
        try:
            for f in files:
                try:
                    fd = os.open(f.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=dfd)
                except FileExistsError:
                    raise LaunchError(f"pilot sandbox {path}: {f.name} appeared in it while the "
                                      f"pilot was being set up; refusing it") from None
                created.append(f.name)
                try:
                    os.fchmod(fd, f.mode)  # exactly this mode, whatever the umask; before data
                    view = memoryview(f.data)
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
        except BaseException:
            for name in created:
                with suppress(OSError):
                    os.unlink(name, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)


def expand_sandbox(path: str) -> str:
    """``~`` and ``~user`` expanded, made absolute. Blocking (may read the password database)."""
    full = os.path.expanduser(path)
    if full.startswith("~"):
        raise LaunchError(f"sandbox {path!r}: cannot expand {full.split('/')[0]!r} "
                          f"(no such user, or no home directory)")
    return os.path.abspath(full)


def remove_agent_token(sandbox: str) -> None:
    """Delete agent.token if the agent never came to read it (it deletes it itself). Blocking."""
    with suppress(FileNotFoundError):
        os.unlink(os.path.join(sandbox, AGENT_TOKEN))


def _check_unused(path: str, dfd: int, files: list[AgentFile]) -> None:
    """A sandbox that holds agent files already is (or was) another pilot's: refuse it."""
    for f in files:
        try:
            st = os.lstat(f.name, dir_fd=dfd)
        except FileNotFoundError:
            continue
        what = " (a symbolic link)" if stat.S_ISLNK(st.st_mode) else \
            _config_owner(dfd) if f.name == AGENT_CONFIG and stat.S_ISREG(st.st_mode) else ""
        raise LaunchError(f"pilot sandbox {path} already holds {f.name}{what}: it is, or was, "
                          f"another pilot's sandbox; give each pilot a sandbox of its own, or "
                          f"remove this one")


def _config_owner(dfd: int) -> str:
    try:
        fd = os.open(AGENT_CONFIG, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        with os.fdopen(fd, "rb") as fh:
            cfg = json.loads(fh.read(1 << 20))
        return f" (of pilot {cfg['pilot_uid']} of session {cfg['session_uid']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


class Launcher:
    """Starts, watches and stops one pilot's agent. All methods run on the hub loop and
    put their blocking work in io_pool lanes."""

    # The hub's client:// staging for an agent that cannot reach the application's machine (on
    # another one): rpg.staging.ClientStaging over what the launcher gives it. None: the agent
    # stages client:// paths itself, and gets them.
    client_staging: ClientStaging | None = None

    def __init__(self, hub: "Hub", pilot: "PilotRecord") -> None:
        self.hub = hub
        self.pilot = pilot

    def agent_config(self, hub_address: str, sandbox: str) -> AgentConfig:
        """The agent's agent.json. The token is not in it: see ``agent_files``."""
        d = self.pilot.desc
        return AgentConfig(
            pilot_uid=self.pilot.uid,
            session_uid=self.hub.session_uid,
            token_file=posixpath.join(sandbox, AGENT_TOKEN),
            hub_address=hub_address,
            sandbox=sandbox,
            cores=d["cores"],
            gpus=d["gpus"],
            runtime_s=float(d["runtime"]) * 60.0,
            heartbeat_interval=d["heartbeat_interval"],
            heartbeat_timeout=d["heartbeat_timeout"],
            staging_timeout=d["staging_timeout"],
            kill_grace=d["kill_grace"],
            environment=d["environment"],
            function_workers=d.get("function_workers"),
            function_worker_memory=float(d.get("function_worker_memory") or 4096.0),
            unit_nice=d.get("unit_nice", 0),  # a pilot journaled before it: as it is
        )

    def agent_files(self, cfg: AgentConfig) -> list[AgentFile]:
        """agent.json and agent.token (owner-only), for prepare_sandbox."""
        return [AgentFile(AGENT_CONFIG, json.dumps(cfg.to_json()).encode()),
                AgentFile(AGENT_TOKEN, self.pilot.token.encode())]

    def forget_token(self, sandbox: str) -> None:
        """At stop: delete agent.token from a local sandbox if the agent never read it."""
        try:
            self.hub.pool.for_path(sandbox).run(remove_agent_token, sandbox, timeout=30)
        except Exception as exc:
            self.hub.log.warning("agent_token_not_removed", pilot=self.pilot.uid,
                                 sandbox=sandbox, error=f"{type(exc).__name__}: {exc}")

    @property
    def key(self) -> str:
        """RPG_PILOT_KEY of this pilot's unit processes (for rpg.io_pool.sweep)."""
        return pilot_key(self.hub.session_uid, self.pilot.uid)

    def launch(self) -> None:
        raise NotImplementedError

    def queued(self) -> bool:
        """True while the resource has not started the agent yet (a batch job in the queue)."""
        return False

    def poll(self, timeout: float) -> str | None:
        """Wait up to ``timeout`` s; None while the agent runs, else how it ended."""
        raise NotImplementedError

    def ended_cleanly(self) -> bool:
        return False

    def stop(self, grace: float) -> None:
        raise NotImplementedError
