"""PilotManager and UnitManager: an application's handles on its pilots and units in a Session.

Each manager validates what it is given before anything reaches the hub (one bad description:
none submitted, and the error names its index and field), calls the session's hub, and keeps the
Pilot or Unit objects it made (rpg/entities.py); the session (rpg/session.py) applies their
events and runs the callbacks registered here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, Union

from rpg.client import SessionClosed
from rpg.description import DescriptionError, PilotDescription, UnitDescription
from rpg.entities import Pilot, Unit, _Entity, asked_states

if TYPE_CHECKING:
    from rpg.session import Session

Callback = Callable[[Any, str], Any]


def _as_list(x: Any) -> tuple[list[Any], bool]:
    if isinstance(x, (list, tuple)):
        return list(x), True
    return [x], False


class _Manager:
    _kind = ""
    _entity: Any = None

    def __init__(self, session: Session, _uid: str | None = None) -> None:
        session._check_open()
        self._session = session
        self.uid = _uid or session._call("new_manager", self._kind)
        self._callbacks: list[Callback] = []
        self._mine: dict[str, _Entity] = {}
        session._managers.append(self)

    def register_callback(self, cb: Callback) -> None:
        """Call ``cb(obj, state)`` on the callback thread at every state change."""
        if not callable(cb):
            raise TypeError(f"register_callback: {cb!r} is not callable")
        self._callbacks.append(cb)

    def _select(self, uids: str | Iterable[str] | None) -> list[Any]:
        if uids is None:
            return list(self._mine.values())
        if isinstance(uids, (str, _Entity)):
            uids = [uids]
        out = []
        for uid in uids:
            if isinstance(uid, _Entity):  # Unit/Pilot objects are welcome too
                uid = uid.uid
            if not isinstance(uid, str):
                raise TypeError(f"{type(self).__name__}: expected uids or {self._entity.__name__}"
                                f" objects, got {type(uid).__name__}")
            if uid not in self._mine:
                raise KeyError(f"{type(self).__name__}: unknown uid {uid!r}")
            out.append(self._mine[uid])
        return out

    def _submit(self, desc_cls: type, method: str, descriptions: Any,
                wire: Callable[[Any], dict[str, Any]]) -> tuple[list[Any], bool]:
        """Validate every description first (one bad: none submitted), submit them in one
        call, and make the objects the reply names."""
        s = self._session
        s._check_open()
        descs, many = _as_list(descriptions)
        checked = [_validated(desc_cls, d, i) for i, d in enumerate(descs)]
        uids = s._call(method, self.uid, [wire(d) for d in checked])
        objs = [self._entity(uid, d, self) for uid, d in zip(uids, checked, strict=True)]
        for obj in objs:
            self._mine[obj.uid] = obj
        s._adopt(objs)
        return objs, many

    def _wait(self, uids: str | Iterable[str] | None, state: Any,
              timeout: float | None) -> list[str]:
        asked_states(self._entity, state)
        return self._session._wait(self._select(uids), state, timeout)

    def _cancel(self, method: str, uids: str | Iterable[str] | None) -> None:
        s = self._session
        if s._closed:
            return
        targets = None if uids is None else [o.uid for o in self._select(uids)]
        try:
            s._call(method, targets, self.uid)
        except SessionClosed:
            pass  # close cancels them anyway


class PilotManager(_Manager):
    _kind = "pilot"
    _entity = Pilot

    def submit_pilots(self, descriptions: Union[PilotDescription, dict, Sequence[Any]]
                      ) -> Union[Pilot, list[Pilot]]:
        """Launch pilots; returns at once with Pilot objects (state NEW)."""
        pilots, many = self._submit(PilotDescription, "submit_pilots", descriptions,
                                    PilotDescription.as_dict)
        return pilots if many else pilots[0]

    def wait_pilots(self, uids: str | Iterable[str] | None = None,
                    state: str | Sequence[str] | None = None,
                    timeout: float | None = None) -> list[str]:
        return self._wait(uids, state, timeout)

    def cancel_pilots(self, uids: str | Iterable[str] | None = None) -> None:
        """Cancel pilots (all of this manager's by default); returns at once."""
        self._cancel("cancel_pilots", uids)

    def get_pilots(self, uids: str | Iterable[str] | None = None) -> list[Pilot]:
        return self._select(uids)


class UnitManager(_Manager):
    _kind = "unit"
    _entity = Unit

    def add_pilots(self, pilots: Union[Pilot, Sequence[Pilot]]) -> None:
        """Units of this manager may run on these pilots."""
        s = self._session
        s._check_open()
        lst, _ = _as_list(pilots)
        for p in lst:
            if not isinstance(p, Pilot):
                raise TypeError(f"add_pilots: expected Pilot objects, got {type(p).__name__}")
            if p._mgr._session is not s:
                raise ValueError(f"add_pilots: pilot {p.uid} belongs to another session "
                                 f"({p._mgr._session.uid}); a unit manager takes the pilots "
                                 f"of its own session only")
        s._call("add_pilots", self.uid, [p.uid for p in lst])

    def remove_pilots(self, pilots: Union[Pilot, Sequence[Pilot]]) -> None:
        s = self._session
        s._check_open()
        lst, _ = _as_list(pilots)
        s._call("remove_pilots", self.uid, [p.uid for p in lst])

    def submit_units(self, descriptions: Union[UnitDescription, dict, Sequence[Any]]
                     ) -> Union[Unit, list[Unit]]:
        """Submit units; returns at once with Unit objects (state NEW).

        All descriptions are validated first: if one is bad, none is submitted and the error
        names its index and field.
        """
        units, many = self._submit(UnitDescription, "submit_units", descriptions,
                                   self._session._t.unit_wire)
        return units if many else units[0]

    def wait_units(self, uids: str | Iterable[str] | None = None,
                   state: str | Sequence[str] | None = None,
                   timeout: float | None = None) -> list[str]:
        """Wait until the units reach ``state`` (default: final) or a final state.

        Returns their states (some may not be there yet if ``timeout`` ran out).
        """
        return self._wait(uids, state, timeout)

    def cancel_units(self, uids: str | Iterable[str] | None = None) -> None:
        """Cancel units (all of this manager's by default). Never blocks; works in callbacks."""
        self._cancel("cancel_units", uids)

    def get_units(self, uids: str | Iterable[str] | None = None) -> list[Unit]:
        return self._select(uids)


def _validated(cls: type, d: Any, index: int) -> Any:
    try:
        if isinstance(d, cls):
            d.validate()
            return d
        if isinstance(d, dict):
            return cls(d)
    except DescriptionError as exc:
        raise DescriptionError(f"{exc.where} #{index}", exc.field, exc.problem) from None
    raise TypeError(f"#{index}: expected a {cls.__name__} or a dict, got {type(d).__name__}")
