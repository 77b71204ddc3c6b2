"""The state tables: the single source of truth for hub, agent, API and docs.

Units and pilots move forward along one ordered path; any non-final state may jump to a final
state (a unit may be canceled or may fail at any point). A transition not in the table raises
``IllegalTransition``. When a component reports a state further along the path than the next
one (the agent reports in batches), ``path`` fills in the skipped intermediates, so each
callback fires once per state, in order.
"""

from __future__ import annotations

from enum import Enum


class IllegalTransition(ValueError):
    """A state change that the table does not allow."""


# Unit states
NEW = "NEW"
BOUND = "BOUND"
STAGING_IN = "STAGING_IN"
SCHEDULING = "SCHEDULING"
EXECUTING = "EXECUTING"
STAGING_OUT = "STAGING_OUT"
DONE = "DONE"
FAILED = "FAILED"
CANCELED = "CANCELED"

# Pilot states (NEW, DONE, FAILED, CANCELED are shared names)
LAUNCHING = "LAUNCHING"
PENDING = "PENDING"
ACTIVE = "ACTIVE"

FINAL = frozenset({DONE, FAILED, CANCELED})

UNIT_PATH = (NEW, BOUND, STAGING_IN, SCHEDULING, EXECUTING, STAGING_OUT, DONE)
PILOT_PATH = (NEW, LAUNCHING, PENDING, ACTIVE, DONE)

UNIT_STATES = frozenset(UNIT_PATH) | FINAL
PILOT_STATES = frozenset(PILOT_PATH) | FINAL


def _table(path: tuple[str, ...]) -> dict[str, frozenset[str]]:
    table: dict[str, frozenset[str]] = {}
    for i, state in enumerate(path[:-1]):
        table[state] = frozenset({path[i + 1], FAILED, CANCELED})
    for final in FINAL:
        table[final] = frozenset()
    return table


UNIT_TRANSITIONS = _table(UNIT_PATH)
PILOT_TRANSITIONS = _table(PILOT_PATH)


def is_final(state: str) -> bool:
    return state in FINAL


def check(kind: str, old: str, new: str) -> None:
    """Raise IllegalTransition unless ``old -> new`` is a single step of the table."""
    table = UNIT_TRANSITIONS if kind == "unit" else PILOT_TRANSITIONS
    if old not in table:
        raise IllegalTransition(f"{kind} state {old!r} is not a {kind} state")
    if new not in table[old]:
        raise IllegalTransition(f"{kind}: illegal transition {old} -> {new}")


def path(kind: str, old: str, new: str) -> list[str]:
    """The states from ``old`` (exclusive) to ``new`` (inclusive), skipped ones filled in.

    ``new`` must be ahead of ``old`` on the path, or final (reached from wherever ``old`` is).
    Raises IllegalTransition otherwise (a step backwards, leaving a final state, unknown state).

    The hub asks this about twice per state change (an agent's update is checked, then
    applied): the answer for each (kind, old, new) of known states is worked out once.
    """
    try:
        steps = _PATHS[(kind, old, new)]
    except KeyError:
        steps = _remember(kind, old, new)
    except TypeError:  # an unhashable state (a malformed report): no such state
        return _path(kind, old, new)
    if type(steps) is str:
        raise IllegalTransition(steps)
    return list(steps)


_PATHS: dict[tuple[str, str, str], tuple[str, ...] | str] = {}  # or the IllegalTransition's text


def _remember(kind: str, old: str, new: str) -> tuple[str, ...] | str:
    try:
        answer: tuple[str, ...] | str = tuple(_path(kind, old, new))
    except IllegalTransition as exc:
        answer = str(exc)
    known = UNIT_STATES if kind == "unit" else PILOT_STATES
    if kind in ("unit", "pilot") and old in known and new in known:  # bounded: 2 x 9 x 9
        _PATHS[(kind, old, new)] = answer
    return answer


def _path(kind: str, old: str, new: str) -> list[str]:
    order = UNIT_PATH if kind == "unit" else PILOT_PATH
    states = UNIT_STATES if kind == "unit" else PILOT_STATES
    if new not in states:
        raise IllegalTransition(f"{kind}: unknown state {new!r}")
    if old not in states:
        raise IllegalTransition(f"{kind} state {old!r} is not a {kind} state")
    if old in FINAL:
        raise IllegalTransition(f"{kind}: illegal transition {old} -> {new} (already final)")
    if new in (FAILED, CANCELED):
        steps = [new]
    else:
        i, j = order.index(old), order.index(new)
        if j <= i:
            raise IllegalTransition(f"{kind}: illegal transition {old} -> {new} (backwards)")
        steps = list(order[i + 1 : j + 1])
    prev = old
    for st in steps:  # every step is one the table allows
        check(kind, prev, st)
        prev = st
    return steps


RESTARTABLE_FROM = frozenset({BOUND, STAGING_IN, SCHEDULING, EXECUTING, STAGING_OUT})


def check_restart(kind: str, old: str) -> None:
    """A unit whose pilot died may start over at NEW (if its description allows restart): the
    one edge that goes back. Its callbacks then see the states of the new attempt."""
    if kind != "unit" or old not in RESTARTABLE_FROM:
        raise IllegalTransition(f"{kind}: cannot restart from {old}")


class Why(str, Enum):
    """The code a reason carries beside its words: what decides, where the words only tell."""

    CANCELED = "canceled"  # the application asked
    SESSION_CLOSED = "session_closed"
    HUB_STOPPED = "hub_stopped"  # the hub service was stopped (SIGTERM, rpg hub stop)
    NO_PILOT = "no_pilot"  # no pilot of its unit manager is left, or none can ever fit it
    UNSENDABLE = "unsendable"  # its description cannot be encoded for an agent
    CLIENT_STAGING = "client_staging"  # the launcher could not move its client:// files
    PILOT_ENDED = "pilot_ended"  # its pilot ended under it
    NOT_STARTED = "not_started"  # agent: its pilot ended before it started (it may go elsewhere)
    RESTART = "restart"  # its pilot died; it starts over
    PILOT_WALLTIME = "pilot_walltime"  # its pilot's time ran out under it, or would have
    DRAINED = "drained"  # agent: its runtime would overrun the pilot's; not started (may move)
    RETRY = "retry"  # it failed and has retries left (UnitDescription.retries); it starts over
    AGENT = "agent"  # the agent's words: exit code, timeout, staging, signal
    RUNTIME_ENDED = "runtime_ended"  # pilot: its runtime or walltime ran out
    AGENT_DIED = "agent_died"  # pilot: the agent ended without being asked
    HEARTBEAT_LOST = "heartbeat_lost"
    BOOTSTRAP = "bootstrap"  # pilot: the agent never called in
    LAUNCH_FAILED = "launch_failed"
    INTERNAL = "internal"
