"""The gateway's half of BLOB pacing: what it tells the broker about its clients' room for BLOBs.

broker/pacing.py holds the broker's half and the why (docs/architecture.md, "BLOB pacing"). Here,
per device, a gateway decides when to say FULL (the next BLOB would be dropped for a client that is
still reading), OPEN (there is room again) and DONE (one BLOB handled, queued or dropped). The words
used below, each with one meaning:

- A client *has room* while its backlog (what it holds beyond the message being written now) is at
  most `room` bytes: the BLOB drop threshold less `BLOB_WINDOW`, so that BLOBs already on their
  way when the driver pauses still fit.
- A client is *draining* if it took bytes in the last `STALL_AFTER` seconds, else it has
  *stalled*. A stalled client never holds a device up: it cannot pace a driver.
- A client *holds a device up* when it wants the device's BLOBs, is draining and has no room.
- A device is *full* from the FULL we say for it until the OPEN that follows. FULL is said when a
  BLOB of the device has just been handled and a client holds the device up; it is said before
  that BLOB's DONE, so an owner never sees its window move before it learns there is no room.
- The *pacesetter* of a full device is the first client that wants its BLOBs to be seen with room
  after the FULL; its *mark* is half of what it held then.

A full device opens when a client that wants its BLOBs has drained and, with room, finds that
nobody holds the device up any more; or when the pacesetter has drained down to its mark (the
fastest client never waits: the next BLOB arrives while it still writes, and clients a little
behind it have room by then); or when a client that wants its BLOBs has gone (it may be what held
the device up; if another still does, the next BLOB says FULL again). A client more than half a
BLOB behind the pacesetter still loses BLOBs.

Pure: no sockets and no clock of its own (the caller says what time it is).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from indibroker.broker.pacing import BLOB_WINDOW
from indibroker.broker.wire import FLOW_DONE, FLOW_FULL, FLOW_OPEN

__all__ = ["BlobRoom", "Receiver", "Signal", "STALL_AFTER"]

STALL_AFTER = 1.0  # seconds without taking bytes after which a client has stalled

Signal = tuple[str, str, bytes]  # (device, property name, FLOW flag) to send the broker


class Queue(Protocol):
    """What pacing reads of a client's output queue (`workers.outqueue.OutQueue`)."""

    @property
    def bytes(self) -> int: ...  # queued, not yet written

    @property
    def moved(self) -> float: ...  # when the client last took bytes

    def backlog(self) -> int: ...


class Wants(Protocol):
    def wants(self, device: str, name: str, blob: bool) -> bool: ...


class Receiver(Protocol):
    """A client as pacing sees it: its output queue (None when empty) and its interest."""

    @property
    def out(self) -> Queue | None: ...

    @property
    def interest(self) -> Wants: ...


class BlobRoom:
    """One gateway's FULL, OPEN and DONE, per device, from what its clients hold (the words above)."""

    def __init__(self, blob_drop_bytes: int):
        self.room = max(0, blob_drop_bytes - BLOB_WINDOW)  # the backlog a client with room may have
        self.full: dict[str, str] = {}  # device -> the BLOB property named in its FULL
        self.pacesetter: dict[str, tuple[Receiver, int]] = {}  # full device -> (client, its mark)

    def has_room(self, client: Receiver) -> bool:
        out = client.out
        return out is None or out.backlog() <= self.room

    def holds_up(self, client: Receiver, device: str, name: str, now: float) -> bool:
        out = client.out
        return (out is not None and now - out.moved < STALL_AFTER and out.backlog() > self.room
                and client.interest.wants(device, name, True))

    # -- events -------------------------------------------------------------------------------
    def blob_handled(self, device: str, name: str, clients: Iterable[Receiver], now: float) -> tuple[Signal, ...]:
        """A BLOB of (device, name) has just been queued or dropped for each of `clients` (those
        that want it): the signals to send, in order."""
        for client in clients:
            if self.holds_up(client, device, name, now):
                self.full[device] = name
                self.pacesetter.pop(device, None)  # a FULL said again starts afresh
                return ((device, name, FLOW_FULL), (device, "", FLOW_DONE))
        return ((device, "", FLOW_DONE),)

    def drained(self, client: Receiver, clients: Iterable[Receiver], now: float) -> list[Signal]:
        """`client` has written what its socket took (perhaps nothing); `clients` are all of them:
        the OPENs due now."""
        opens: list[Signal] = []
        if not self.full:
            return opens
        out = client.out
        room = self.has_room(client)
        for device, name in list(self.full.items()):
            if not client.interest.wants(device, name, True):
                continue
            lead = self.pacesetter.get(device)
            if lead is not None and lead[0] is client and (out is None or out.bytes <= lead[1]):
                opens.append(self._open(device, name))
            elif room:
                if lead is None:
                    self.pacesetter[device] = (client, out.bytes // 2 if out is not None else 0)
                if not any(self.holds_up(c, device, name, now) for c in clients):
                    opens.append(self._open(device, name))
        return opens

    def gone(self, client: Receiver) -> list[Signal]:
        """`client` has gone: the full devices whose BLOBs it wanted open."""
        return [self._open(device, name) for device, name in list(self.full.items())
                if client.interest.wants(device, name, True)]

    def _open(self, device: str, name: str) -> Signal:
        del self.full[device]
        self.pacesetter.pop(device, None)
        return (device, name, FLOW_OPEN)
