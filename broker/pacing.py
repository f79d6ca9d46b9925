"""BLOB pacing: when to stop reading a driver whose BLOBs nobody can take right now.

A driver that produces BLOBs faster than any client drains them (a camera streaming, a flood)
would otherwise be read at full speed only for its BLOBs to be dropped at every gateway (the
slow-client policy), burning the CPU those clients need. Gateways say when the next BLOB would
be dropped for a client of theirs that is still draining (FULL), and when they have room again
(OPEN: soon, since the fastest client never waits for more than half of what it holds). While
every peer that wants the device's BLOBs is full, the owner is told to pause that driver; the
first OPEN resumes it. A stalled client never counts (the gateway only reports clients that are
moving), the owner resumes on its own after a short bound, and any peer that never reports (a
remote bridge, a snooping driver) keeps the driver read at full speed: so the pace is set by the
fastest client that keeps up, never by a slow one, and clients a little behind it still get
every BLOB.

FULL comes late, though: by the time a gateway sees its clients full, the BLOBs a driver worker
read meanwhile are already on their way (and would be dropped on arrival). So an owner also
keeps a window: it stops reading a driver with more than BLOB_WINDOW bytes of BLOBs not yet handled by
every gateway they went to. Gateways say DONE for each BLOB they handle (queued or dropped: they
never wait for a client), and the broker tells the owner when a BLOB is done everywhere. That
bounds what is in flight between processes, so memory stays bounded too. The owner is told in
the order it sent them (a BLOB done before an older one is told after it): its n-th DONE of a
device means its n oldest BLOBs of that device are done, so it knows when it may close a shared
buffer that every peer has taken (workers/sharedblob.py); a shared buffer's peers are all its
targets, not gateways only, and each says DONE once it has taken it. A paused owner still
reads its driver up to the next BLOB and holds it ready (the driver worker), so a pause costs
the clients no time once it ends.

Pure data, no sockets, like the routing table.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Collection

__all__ = ["BlobPacing", "BLOB_WINDOW"]

# BLOB bytes a driver worker lets be on their way to the gateways before it waits for DONEs: one
# big BLOB at a time, many small ones. A gateway says FULL this much before its clients' drop
# threshold, so what is in flight when a driver is paused still finds room.
BLOB_WINDOW = 1024 * 1024


class BlobPacing:
    def __init__(self) -> None:
        self.full: dict[str, set[bytes]] = {}  # device -> peers that said FULL, no OPEN since
        self.paused: set[str] = set()  # devices whose owner was told to pause
        # device -> BLOB number -> gateways that have not said DONE for it
        self.outstanding: dict[str, dict[int, int]] = {}
        self.owed: dict[tuple[bytes, str], deque[int]] = {}  # (gateway, device) -> its BLOB numbers
        self._numbers = itertools.count()

    # -- the window ---------------------------------------------------------------------------
    def routed(self, device: str, gateways: Collection[bytes]) -> int:
        """A BLOB of `device` went to `gateways`: how many of the device's BLOBs are now done,
        oldest first (1 when it went nowhere and none older is waiting, else 0)."""
        waiting = self.outstanding.get(device)
        if not gateways and not waiting:
            return 1
        number = next(self._numbers)
        if waiting is None:
            waiting = self.outstanding[device] = {}
        waiting[number] = len(gateways)
        for gateway in gateways:
            self.owed.setdefault((gateway, device), deque()).append(number)
        return self._done_in_order(device) if not gateways else 0

    def done(self, gateway: bytes, device: str) -> int:
        """`gateway` handled its oldest BLOB of `device` (each gateway handles them in order):
        how many of the device's oldest BLOBs that made done by every gateway they went to."""
        numbers = self.owed.get((gateway, device))
        if not numbers:
            return 0
        number = numbers.popleft()
        if not numbers:
            del self.owed[(gateway, device)]
        return self._settle(device, number)

    def _settle(self, device: str, number: int) -> int:
        self.outstanding[device][number] -= 1
        return self._done_in_order(device)

    def _done_in_order(self, device: str) -> int:
        """Drop the device's oldest BLOBs that are done (numbers ascend in insertion order)."""
        waiting = self.outstanding[device]
        count = 0
        while waiting:
            number, left = next(iter(waiting.items()))
            if left:
                break
            del waiting[number]
            count += 1
        if not waiting:
            del self.outstanding[device]
        return count

    def drop_device(self, device: str) -> None:
        """The peer that sent the device's BLOBs has registered again (restarted, or reconnected:
        it has forgotten them too): their numbering starts afresh."""
        self.outstanding.pop(device, None)
        for key in [k for k in self.owed if k[1] == device]:
            del self.owed[key]

    def on_full(self, peer: bytes, device: str, targets: Collection[bytes]) -> bool:
        """`peer` is full for `device`, whose BLOBs go to `targets`: True when the owner should
        pause (again: the owner's own bound may have resumed it meanwhile)."""
        peers = self.full.setdefault(device, set())
        peers.add(peer)
        if targets and peers.issuperset(targets):
            self.paused.add(device)
            return True
        return False

    def on_open(self, peer: bytes, device: str) -> bool:
        """`peer` has room for `device` again: True when the owner should resume."""
        peers = self.full.get(device)
        if peers is not None:
            peers.discard(peer)
            if not peers:
                del self.full[device]
        if device in self.paused:
            self.paused.discard(device)
            return True
        return False

    def forget(self, peer: bytes) -> tuple[list[str], list[tuple[str, int]]]:
        """A peer has gone: what it said no longer holds. Returns the devices to resume, and per
        device how many BLOBs are done everywhere now that it is not waited for."""
        done: dict[str, int] = {}
        for gateway, device in [key for key in self.owed if key[0] == peer]:
            for number in self.owed.pop((gateway, device)):
                done[device] = done.get(device, 0) + self._settle(device, number)
        finished = [(device, n) for device, n in done.items() if n]
        resume = []
        for device in [d for d, peers in self.full.items() if peer in peers]:
            self.full[device].discard(peer)
            if not self.full[device]:
                del self.full[device]
            if device in self.paused:
                self.paused.discard(device)
                resume.append(device)
        return resume, finished
