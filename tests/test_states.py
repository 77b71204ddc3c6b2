"""The states table and the Ledger that enforces it (no processes, no hub thread)."""

from __future__ import annotations

import itertools

import pytest

from rpg import states
from rpg.hub.records import Ledger
from rpg.states import IllegalTransition, Why


class _Profile:
    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def add(self, ts, uid, state, component, **extra):
        self.rows.append((uid, state, extra))


class _Events(list):
    put = list.append


def ledger() -> tuple[Ledger, _Events]:
    ev = _Events()
    return Ledger(_Profile(), ev), ev


def test_every_single_step_of_the_table_and_nothing_else():
    for kind, table, names in (("unit", states.UNIT_TRANSITIONS, states.UNIT_STATES),
                               ("pilot", states.PILOT_TRANSITIONS, states.PILOT_STATES)):
        for old, new in itertools.product(names, names):
            if new in table[old]:
                states.check(kind, old, new)
            else:
                with pytest.raises(IllegalTransition):
                    states.check(kind, old, new)


def test_path_fills_skipped_states_and_refuses_backwards_and_after_final():
    assert states.path("unit", states.BOUND, states.EXECUTING) == [
        states.STAGING_IN, states.SCHEDULING, states.EXECUTING]
    assert states.path("unit", states.EXECUTING, states.CANCELED) == [states.CANCELED]
    for old, new in ((states.EXECUTING, states.BOUND), (states.DONE, states.FAILED),
                     (states.SCHEDULING, states.SCHEDULING), (states.NEW, "RUNNING"),
                     ("RUNNING", states.DONE)):
        with pytest.raises(IllegalTransition):
            states.path("unit", old, new)
    assert states.path("pilot", states.NEW, states.ACTIVE) == [
        states.LAUNCHING, states.PENDING, states.ACTIVE]
    with pytest.raises(IllegalTransition):
        states.path("pilot", states.ACTIVE, states.EXECUTING)


def test_restart_is_the_one_backward_edge():
    for st in states.RESTARTABLE_FROM:
        states.check_restart("unit", st)
    for st in (states.NEW, *states.FINAL):
        with pytest.raises(IllegalTransition):
            states.check_restart("unit", st)
    with pytest.raises(IllegalTransition):
        states.check_restart("pilot", states.ACTIVE)


def test_ledger_moves_through_the_table_and_raises_on_an_illegal_change():
    led, ev = ledger()
    unit = led.new_unit("unit.000001", "umgr.0", {"cores": 1}, 1.0)
    pilot = led.new_pilot("pilot.000000", "pmgr.0", {"cores": 4, "resource": "local"}, "t", "/x")
    led.move("pilot", pilot, states.ACTIVE, "test")
    led.bind(unit, pilot)
    assert pilot.load_cores == 1
    led.move("unit", unit, states.EXECUTING, "test")
    with pytest.raises(IllegalTransition):
        led.move("unit", unit, states.STAGING_IN, "test")  # backwards
    assert unit.state == states.EXECUTING  # the refused change changed nothing
    pilot.in_flight.add(unit.uid)
    assert led.end_unit(unit, states.DONE, "agent", None, exit_code=0)
    assert not led.end_unit(unit, states.FAILED, "hub", Why.INTERNAL, "late")  # once only
    assert unit.state == states.DONE and unit.reason is None
    assert pilot.load_cores == 0 and not pilot.in_flight
    with pytest.raises(IllegalTransition):
        led.move("unit", unit, states.EXECUTING, "test")  # after final
    got = [e[2] for e in ev if e[1] == unit.uid]
    assert got == [states.BOUND, states.STAGING_IN, states.SCHEDULING, states.EXECUTING,
                   states.STAGING_OUT, states.DONE]


def test_ledger_end_carries_the_code_and_restart_releases_the_pilot():
    led, ev = ledger()
    pilot = led.new_pilot("pilot.000000", "pmgr.0", {"cores": 2, "resource": "local"}, "t", "/x")
    unit = led.new_unit("unit.000001", "umgr.0", {"cores": 2}, 1.0)
    led.bind(unit, pilot)
    pilot.in_flight.add(unit.uid)
    led.restart_unit(unit, "pilot died")
    assert unit.state == states.NEW and unit.pilot is None and pilot.load_cores == 0
    assert ev[-1][4]["reason_code"] == Why.RESTART.value
    led.end_unit(unit, states.FAILED, "hub", Why.NO_PILOT, "no pilot left")
    assert (unit.reason_code, ev[-1][4]["reason_code"]) == ("no_pilot", "no_pilot")
    led.end_pilot(pilot, states.DONE, Why.RUNTIME_ENDED, "runtime ended")
    assert pilot.state == states.DONE and pilot.reason_code == "runtime_ended"
