"""The private gevent/zerorpc names rpg relies on (rpg/internals.py) still exist."""

from __future__ import annotations

from importlib.metadata import version

from rpg import internals


def test_private_names_rpg_uses_are_all_there():
    missing = internals.check()
    installed = {name: version(name) for name in internals.WRITTEN_FOR}
    assert missing == [], (f"rpg/internals.py was written for {internals.WRITTEN_FOR}; "
                           f"installed {installed} lacks {missing}")
