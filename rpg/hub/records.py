"""The hub's bookkeeping for one unit and one pilot (owned by the hub loop only)."""

from __future__ import annotations

from collections import deque
from typing import Any

from gevent.event import Event

from rpg import states


class UnitRecord:
    __slots__ = ("uid", "umgr", "desc", "state", "pilot", "greenlet", "final", "reason",
                 "exit_code", "stdout", "stderr", "sandbox", "at_agent", "cancel_reason",
                 "wake", "done_at_agent", "restart", "restarts")

    def __init__(self, uid: str, umgr: str, desc: dict[str, Any]) -> None:
        self.uid = uid
        self.umgr = umgr
        self.desc = desc
        self.state = states.NEW
        self.pilot: str | None = None
        self.greenlet: Any = None
        self.final = Event()
        self.reason: str | None = None
        self.exit_code: int | None = None
        self.stdout: str | None = None
        self.stderr: str | None = None
        self.sandbox: str | None = None
        self.at_agent = False  # handed to the agent (pulled); cancel must go through it
        self.cancel_reason: str | None = None
        self.wake = Event()  # the lifecycle greenlet has something to look at
        self.done_at_agent: tuple[str, float, dict[str, Any]] | None = None
        self.restart = False  # its pilot died; the lifecycle binds it again
        self.restarts = 0


class PilotRecord:
    __slots__ = ("uid", "pmgr", "desc", "state", "token", "sandbox", "queue", "in_flight",
                 "cancels", "wake", "last_seen", "registered", "launcher", "greenlet",
                 "load_cores", "agent_info", "stopping", "reason", "final_state_hint",
                 "rejected_calls", "stop_reason")

    def __init__(self, uid: str, pmgr: str, desc: dict[str, Any], token: str,
                 sandbox: str) -> None:
        self.uid = uid
        self.pmgr = pmgr
        self.desc = desc
        self.state = states.NEW
        self.token = token
        self.sandbox = sandbox
        self.queue: deque[str] = deque()  # bound, not yet pulled by the agent
        self.in_flight: set[str] = set()  # pulled by the agent, not final
        self.cancels: list[str] = []  # to tell the agent on its next pull
        self.wake = Event()  # wakes the agent's long poll
        self.last_seen = 0.0
        self.registered = Event()
        self.launcher: Any = None
        self.greenlet: Any = None
        self.load_cores = 0  # cores of units bound here and not final
        self.agent_info: dict[str, Any] = {}
        self.stopping = False  # the hub asked the agent to shut down
        self.reason: str | None = None
        self.final_state_hint: str | None = None
        self.rejected_calls = 0
        self.stop_reason = ""  # told to the agent with "shutdown"; its units end with it

    @property
    def cores(self) -> int:
        return int(self.desc["cores"])

    def active(self) -> bool:
        return not states.is_final(self.state) and not self.stopping
