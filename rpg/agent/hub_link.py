"""The agent's side of its conversation with the hub: it calls in, pulls units in batches
(long poll), pushes state updates in batches (which double as heartbeats), and answers a
restarted hub's question of which units it holds.

``HubLink`` is a part of ``Agent`` (rpg/agent/agent.py), kept here so that the wire and the
unit lifecycle each fit in one file; it uses the agent's identity (``uid``, ``token``,
``cfg``), its clients (``ctx``, ``rpc_pull``, ``rpc_push``), its units (``units``,
``executing``, ``cancel_reasons``, ``_start_unit``), its loop watch (``watch``) and ``stop``.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import gevent
import msgpack
import zerorpc
from gevent.event import Event
from gevent.lock import Semaphore

from rpg import states
from rpg.io_pool import yield_to_loop
from rpg.rpc import no_linger, no_zero_copy, wire_safe

# Updates a push carries: the hub unpacks a push in one go. 10,000 units canceled at once, on
# full cores: 2,000 a push made the hub's loop lag p99 89-198 ms, 500 made it 22-43 ms. (Packing
# 10,000 held the agent's loop for tens of ms.) Pushes at 1,200 units/s carry about 60.
PUSH_BATCH = 500
PUSH_BYTES = 24 << 20  # function results a push carries (the hub takes 64 MiB messages)
PUSH_GATHER_S = 0.005  # updates gathered before a push (as Dask's BatchedSend: 2 ms)
PUSH_GATHER_BUSY_S = 0.012  # after a push of PUSH_BUSY updates or more: a zerorpc call costs
PUSH_BUSY = 64  # ~330 us of CPU on each side, so a busy agent pushes less often, in bulk
CANCEL_SLICE = 128  # units a pull's cancels kill per slice (yield_to_loop between)
PULL_BATCH = 64  # units a pull takes: each begins (its greenlet or first step) in one turn

ENCODING_ERRORS = frozenset({"UnicodeError", "UnicodeEncodeError", "UnicodeDecodeError",
                             "PackException", "PackValueError", "PackOverflowError",
                             "UnpackException", "UnpackValueError", "ExtraData"})


class HubLink:
    """Register, the pull and push loops, and the updates they carry (see the module)."""

    def _link_init(self) -> None:
        self.updates: list[list[Any]] = []
        self.pushing: list[list[Any]] = []  # the batch a push under way carries
        self.have_updates = Event()
        self.last_ok = time.monotonic()
        self.pull_got = 0  # the last pull reply it got (the hub resends one it never got)
        self.last_push = 0  # updates the last push carried (a busy agent gathers longer)
        # One push at a time: the push loop's and the final push's would race at the hub,
        # which applies each in a greenlet that yields, so a unit's states could be reordered.
        self.push_lock = Semaphore()
        self.push_failed: BaseException | None = None  # a push's call that got no answer
        self.hub_silent = False  # the hub has not answered for hb_timeout (stop: "hub_lost")

    def _register(self) -> Exception | None:
        """Call in; returns the _Rejected or _HubLost that ends the agent, or None."""
        info = wire_safe({"pid": os.getpid(), "host": socket.gethostname(),
                          "cores": self.cores, "gpus": self.gpus, "sandbox": self.sandbox})
        deadline = time.monotonic() + self.hb_timeout
        # Each attempt on a connection of its own, for a third of the heartbeat timeout: a
        # first connection stuck in a tunnel (its TCP alive, nothing behind it) is not retried
        # by zmq, and one attempt of the whole timeout left no room for a second.
        attempt = max(1.0, min(5.0, self.hb_timeout / 3))
        tries = 0
        while True:
            tries += 1
            client = zerorpc.Client(context=self.ctx, timeout=attempt, heartbeat=None)
            no_zero_copy(client)
            no_linger(client)  # an attempt given up on must not hold the context's end
            try:
                client.connect(self.cfg.hub_address)
                client.register(self.uid, self.token, info)
                self.last_ok = time.monotonic()
                self.log.info("agent_registered", tries=tries)
                return None
            except zerorpc.RemoteError as exc:
                return _Rejected(f"hub refused register: {exc.msg}")
            except (zerorpc.TimeoutExpired, zerorpc.LostRemote) as exc:
                self.log.warning("register_retry", error=str(exc)[:200], tries=tries)
                if time.monotonic() > deadline:
                    return _HubLost(f"hub did not answer register ({tries} tries): {exc}")
                gevent.sleep(0.2)
            finally:
                client.close()

    def _rpc_failed(self, exc: BaseException) -> None:
        silent = time.monotonic() - self.last_ok
        self.log.warning("hub_call_failed", error=str(exc)[:200], silent_s=round(silent, 2))
        if silent > self.hb_timeout:
            self.hub_silent = True  # also during a stop already under way (its final push)
            self.stop("hub_lost", states.CANCELED, f"hub silent for {silent:.1f} s")
        else:
            gevent.sleep(min(0.5, self.hb_interval))

    def _pull_loop(self) -> None:
        high_water = self.cores * 2 + 256
        while not self.done.is_set():
            waiting = len(self.units) - self.executing
            want = max(0, min(PULL_BATCH, high_water - waiting))
            try:
                resp = self.rpc_pull.pull(self.uid, self.token, want, 0.5, self.pull_got)
            except zerorpc.RemoteError as exc:
                if exc.name in ENCODING_ERRORS:
                    # The hub could not encode its reply (a unit's content): not a refusal of
                    # this pilot. The hub isolates the unit; this agent goes on pulling.
                    self.log.error("pull_reply_unencodable", error=str(exc.msg)[:200])
                    gevent.sleep(min(0.5, self.hb_interval))
                    continue
                self.stop("rejected", states.CANCELED, f"hub rejected pull: {exc.msg}")
                return
            except (zerorpc.TimeoutExpired, zerorpc.LostRemote) as exc:
                self._rpc_failed(exc)
                continue
            self.last_ok = time.monotonic()
            self.counters["pulls"] += 1
            self.pull_got = resp.get("seq", self.pull_got)  # the hub resends a lost reply
            if resp["units"]:
                self.watch.wake()  # its loop-lag ticker rested while it held no unit
            for item in resp["units"]:
                uid = item["uid"]
                if uid not in self.units:
                    self._start_unit(uid, item["description"])
            signaled: list[Any] = []
            for i, uid in enumerate(resp["cancel"]):
                if i and i % CANCEL_SLICE == 0:
                    yield_to_loop()  # 4,000 kills at once held the loop 70 ms
                self.cancel_unit(uid, states.CANCELED, "canceled by the application", signaled)
            if signaled:
                self.escalate_later(signaled)
            if resp["shutdown"]:
                self.stop("shutdown", states.CANCELED, str(resp["shutdown"]))
            elif resp.get("resync") and not self.done.is_set():  # stopping: the final push tells
                self._tell_holding()

    def _tell_holding(self) -> None:
        """A restarted hub asks which units this agent holds (rpg/hub/restore.py): running,
        waiting for cores, or with updates it has not acknowledged yet. Asked again on the
        next pull if this is lost."""
        held = set(self.units) | {u[0] for u in self.updates} | {u[0] for u in self.pushing}
        try:
            resp = self.rpc_pull.holding(self.uid, self.token, sorted(held))
        except zerorpc.RemoteError as exc:
            self.log.error("holding_refused", error=str(exc.msg)[:200])
            return
        except (zerorpc.TimeoutExpired, zerorpc.LostRemote) as exc:
            self._rpc_failed(exc)
            return
        self.last_ok = time.monotonic()
        self.log.info("hub_resynced", held=len(held), moved=resp.get("moved"))

    def _push_loop(self) -> None:
        while True:
            self.have_updates.wait(timeout=self.hb_interval)
            if len(self.updates) < PUSH_BATCH:  # one push for the states of many units
                gevent.sleep(PUSH_GATHER_BUSY_S if self.last_push >= PUSH_BUSY else
                             PUSH_GATHER_S)
            self.have_updates.clear()
            self._push_once()

    def _push_once(self) -> bool:
        with self.push_lock:
            ok = self._push_locked()
        failed, self.push_failed = self.push_failed, None
        if failed is not None:
            self._rpc_failed(failed)  # its pause, outside the lock
        return ok

    def _push_locked(self) -> bool:
        n, size = 0, 0
        for upd in self.updates[:PUSH_BATCH]:  # and results of at most PUSH_BYTES, but one
            size += _result_bytes(upd[3])
            if n and size > PUSH_BYTES:
                break
            n += 1
        batch = self.updates[:n]
        del self.updates[:n]
        self.pushing = batch
        try:
            resp = self.rpc_push.push(self.uid, self.token, batch)
        except (ValueError, TypeError, OverflowError) as exc:
            # Packing failed although report() checked every update: repair them one by one
            # and send again, rather than let the push loop (our heartbeat) die.
            self.log.error("push_unencodable", count=len(batch), error=wire_safe(str(exc))[:200])
            self.updates[:0] = [self._encodable(wire_safe(u)) for u in batch]
            self.have_updates.set()
            return False
        except zerorpc.RemoteError as exc:
            if exc.name in ENCODING_ERRORS:  # the hub could not decode or re-encode it
                self.log.error("push_unencodable", count=len(batch), error=str(exc.msg)[:200],
                               uids=[u[0] for u in batch[:20]])
                return False
            self.updates[:0] = batch
            self.stop("rejected", states.CANCELED, f"hub rejected push: {exc.msg}")
            return False
        except (zerorpc.TimeoutExpired, zerorpc.LostRemote) as exc:
            self.updates[:0] = batch  # keep order; resend next time
            self.have_updates.set()
            self.push_failed = exc
            return False
        finally:
            self.pushing = []
        self.last_ok = time.monotonic()
        self.counters["pushes"] += 1
        self.counters["updates"] += len(batch)
        self.last_push = len(batch)
        if resp.get("errors"):
            self.log.warning("updates_rejected", count=len(resp["errors"]),
                             first=resp["errors"][0])
        if self.updates:
            self.have_updates.set()
        if resp.get("shutdown") and not self.done.is_set():
            self.stop("shutdown", states.CANCELED, str(resp["shutdown"]))
        return True

    def _final_push(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.updates and time.monotonic() < deadline:
            if not self._push_once():
                gevent.sleep(0.1)
        # A push under way (the push loop's) has its answer before this returns.
        if self.push_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self.push_lock.release()

    def _encodable(self, update: list[Any]) -> list[Any]:
        """``update`` if msgpack can encode it; else repaired (strings made UTF-8-safe) or
        stripped to its state, and logged. One unit's content never fails a whole push."""
        try:
            msgpack.packb(update, use_bin_type=True)  # the cheap check: ~1 us; 75 us at 64 KiB
            return update
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        repaired = wire_safe(update)
        try:
            msgpack.packb(repaired, use_bin_type=True)
        except Exception:  # not a text problem: keep the state, drop the fields
            repaired = [str(update[0]), str(update[1]), float(update[2]), {}]
        self.log.error("update_unencodable", uid=wire_safe(str(update[0])), state=repaired[1],
                       error=wire_safe(error)[:300])
        return repaired

    def report(self, uid: str, state: str, **fields: Any) -> None:
        self.updates.append(self._encodable([uid, state, time.time(), fields]))
        self.have_updates.set()



def _result_bytes(fields: dict[str, Any]) -> int:
    results = fields.get("results")
    return sum(len(r[1]) for r in results if r[1] is not None) if results else 0


class _Rejected(Exception):
    pass


class _HubLost(Exception):
    pass
