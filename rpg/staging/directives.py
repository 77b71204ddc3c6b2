"""A unit's staging directives as both sides carry them out: in order, each named in messages
the same way, and the ``non_fatal`` flag (a failure is logged and the unit goes on) decided
here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from rpg.description import split_url
from rpg.staging.paths import StagingError


def label(directive: dict[str, Any]) -> str:
    """``copy a -> b``: how messages name a directive."""
    return f"{directive['action']} {directive['source']} -> {directive['target']}"


def flags(directive: dict[str, Any]) -> list[str]:
    return directive.get("flags") or []


def is_client(path: str) -> bool:
    """True for a ``client://`` path (on the application's machine)."""
    return split_url(path)[0] == "client"


def inner_outer(directive: dict[str, Any], direction: str) -> tuple[str, str]:
    """(sandbox side, other side) of a directive staged ``direction`` ("in" or "out")."""
    if direction == "in":
        return directive["target"], directive["source"]
    return directive["source"], directive["target"]


def client_directives(desc: dict[str, Any], direction: str) -> list[dict[str, Any]]:
    """The directives of a unit description whose other side is ``client://``."""
    if direction == "in":
        return [d for d in desc.get("input_staging") or [] if is_client(d["source"])]
    return [d for d in desc.get("output_staging") or [] if is_client(d["target"])]


def without_client_staging(desc: dict[str, Any]) -> dict[str, Any]:
    """A copy of a unit description without its client:// directives: what an agent on
    another machine gets, when the hub moves those files itself."""
    out = dict(desc)
    out["input_staging"] = [d for d in desc["input_staging"] if not is_client(d["source"])]
    out["output_staging"] = [d for d in desc["output_staging"] if not is_client(d["target"])]
    return out


def carry_out(directives: Iterable[dict[str, Any]], one: Callable[[dict[str, Any]], Any],
              what: str, log: Any, **context: Any) -> None:
    """``one(directive)`` for each directive, in order. A failure of a ``non_fatal`` one is
    logged (``staging_failed_non_fatal``, with ``context``) and the next one goes on; any other
    raises StagingError ``"<what>: <directive>: <why>"`` and the rest are not tried."""
    for d in directives:
        try:
            one(d)
        except Exception as exc:
            if "non_fatal" in flags(d):
                log.warning("staging_failed_non_fatal", directive=label(d), error=str(exc),
                            **context)
                continue
            raise StagingError(f"{what}: {label(d)}: {exc}") from None
