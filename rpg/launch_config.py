"""The configuration a launcher hands to the agent it launches (``agent.json``): one typed
definition, written by the launchers on the hub's side and read by the agent, so neither
repeats the other's keys or defaults.

The pilot token is not part of the file: launchers write it to a file of its own
(``token_file``) that the agent reads and deletes at start; ``token`` holds it in memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class AgentConfigError(ValueError):
    """agent.json is missing a key, has an unknown one, or one of the wrong type."""


@dataclass
class AgentConfig:
    pilot_uid: str
    session_uid: str
    hub_address: str
    sandbox: str
    cores: int
    gpus: int
    runtime_s: float  # 0: no end of its own
    heartbeat_interval: float
    heartbeat_timeout: float
    staging_timeout: float
    kill_grace: float
    environment: dict[str, str] = field(default_factory=dict)
    resource_manager: str = "local"  # "slurm": nodes from SLURM_* variables, srun launches
    nodes: list[list[Any]] | None = None  # [[name, cores, gpus], ...]; None: from the resource
    token_file: str | None = None
    token: str | None = None  # in memory (read from token_file), or inline in a test's config
    hub_pid: int | None = None  # an embedded hub's process: when it is gone, stop at once
    function_workers: int | None = None  # warm function workers; None: one per core
    function_worker_memory: float = 4096.0  # MiB of RSS after a unit that retires a worker
    exit_code_file: str | None = None  # for launchers that watch the agent from afar (ssh)
    unit_nice: int = 0  # the units' autogroup nice value (spawn_server.py); 0: left as it is

    def to_json(self) -> dict[str, Any]:
        """What goes into agent.json: every key but the token, None values left out."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None and k != "token"}

    @classmethod
    def from_json(cls, data: Any) -> "AgentConfig":
        if not isinstance(data, dict):
            raise AgentConfigError(f"agent config must be a JSON object, got "
                                   f"{type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise AgentConfigError(f"unknown key {unknown[0]!r} (known: {', '.join(fields)})")
        missing = [n for n, f in fields.items() if n not in data
                   and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
        if missing:
            raise AgentConfigError(f"missing key(s): {', '.join(missing)}")
        for name in ("cores", "gpus", "hub_pid", "function_workers"):
            v = data.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise AgentConfigError(f"{name} must be an integer, got {v!r}")
        for name in ("runtime_s", "heartbeat_interval", "heartbeat_timeout", "staging_timeout",
                     "kill_grace"):
            v = data[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise AgentConfigError(f"{name} must be a number, got {v!r}")
        nice = data.get("unit_nice", 0)  # not optional: null is refused too
        if isinstance(nice, bool) or not isinstance(nice, int):
            raise AgentConfigError(f"unit_nice must be an integer, got {nice!r}")
        if not 0 <= nice <= 19:
            raise AgentConfigError(f"unit_nice must be in 0..19, got {nice!r}")
        return cls(**data)
