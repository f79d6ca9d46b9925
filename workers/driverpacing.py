"""BLOB pacing on the driver's side: when to hold a driver's BLOBs back, and when to stop reading it.

The broker tells a driver's worker what it learns from the gateways (broker/pacing.py): DONE when
one of the driver's BLOBs has been handled by every gateway it went to, FULL when every client
that wants the device's BLOBs has no room, OPEN when one has room again. A `DriverPacer` turns
that, and what the worker sends, into the driver's pace:

- *Window*: while `window` bytes of its BLOBs are on their way (sent, not yet DONE), or while the
  broker says FULL, the driver is paused.
- *Read ahead*: a paused driver is still read. Its other messages pass; its next BLOB is held, and
  so is everything it wrote after that BLOB (in order), and then the worker stops reading it (the
  driver waits on its pipe). The moment there is room, what was held goes on, in order, up to the
  next BLOB that finds the driver paused again.
- *A pause is bounded*: each pause asks for a timer of `MAX_PAUSE`; when it expires, what the
  broker said no longer holds (a lost OPEN or DONE cannot stall a driver).

Pure data, like `broker.pacing.BlobPacing`: the worker feeds it events and applies its decisions
(send this element now or not; read the driver or not; arm or cancel the pause timer). Elements
are opaque to it but for the one question it is given to ask of them: is this a BLOB?
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Generic, TypeVar

from indibroker.broker.pacing import BLOB_WINDOW

__all__ = ["DriverPacer", "PauseTimer", "MAX_PAUSE"]

MAX_PAUSE = 0.5  # seconds a pause may last before the driver is read at full speed again

T = TypeVar("T")


class PauseTimer(Enum):
    """What to do with the pause's timer after an event (None: nothing)."""

    ARM = "arm"  # a pause began: end it after MAX_PAUSE unless it ends before
    CANCEL = "cancel"  # the pause ended


class DriverPacer(Generic[T]):
    """One driver's BLOB pacing: the window, the broker's FULL, the elements read ahead."""

    def __init__(self, is_blob: Callable[[T], bool], window: int = BLOB_WINDOW):
        self.is_blob = is_blob  # asked only while paused: the common case costs no call
        self.window = window
        self.full = False  # the broker said every client of its BLOBs is full, and no OPEN since
        self.in_flight: dict[str, deque[int]] = {}  # device -> sizes of its BLOBs not yet DONE
        self.in_flight_bytes = 0
        self.paused = False
        self.pauses = 0  # how many pauses began, for status
        self.read_ahead: deque[T] = deque()  # held: a BLOB and what was read after it, oldest first

    # -- decisions ----------------------------------------------------------------------------
    def admit(self, item: T) -> bool:
        """An element just read from the driver: True to send it on now. False: it is held, to go
        when there is room (a BLOB while paused, or anything behind one already held)."""
        if self.read_ahead or (self.paused and self.is_blob(item)):
            self.read_ahead.append(item)
            return False
        return True

    @property
    def should_read(self) -> bool:
        """Read the driver's output? Not while something is held: the driver waits on its pipe."""
        return not self.read_ahead

    def releasable(self) -> Iterator[T]:
        """What is held and may go now, oldest first. Lazy on purpose: the caller reports each BLOB
        it sends (`sent`) before taking the next, and a BLOB that fills the window stops the rest."""
        held = self.read_ahead
        while held and not (self.paused and self.is_blob(held[0])):
            yield held.popleft()

    # -- events -------------------------------------------------------------------------------
    def sent(self, device: str, size: int) -> PauseTimer | None:
        """A BLOB of `size` bytes for `device` went to the broker."""
        self.in_flight.setdefault(device, deque()).append(size)
        self.in_flight_bytes += size
        return self._update_pause()

    def done(self, device: str) -> PauseTimer | None:
        """The broker: the oldest BLOB of `device` still on its way is done everywhere."""
        sizes = self.in_flight.get(device)
        if sizes:
            self.in_flight_bytes -= sizes.popleft()
        return self._update_pause()

    def on_full(self) -> PauseTimer | None:
        """The broker: every client that wants these BLOBs is full."""
        self.full = True
        return self._update_pause()

    def on_open(self) -> PauseTimer | None:
        """The broker: a client has room again."""
        self.full = False
        return self._update_pause()

    def expired(self) -> PauseTimer | None:
        """The pause's timer fired: what the broker said about its BLOBs no longer holds."""
        self._forget()
        return self._update_pause()

    def release_all(self) -> list[T]:
        """Everything held, whatever the pacing says (the driver's pipes are closing)."""
        held = list(self.read_ahead)
        self.read_ahead.clear()
        return held

    def reset(self) -> PauseTimer | None:
        """The driver's process is gone: pacing starts afresh for the next one."""
        self.read_ahead.clear()
        self._forget()
        return self._update_pause()

    # -- state --------------------------------------------------------------------------------
    def _forget(self) -> None:
        self.full = False
        self.in_flight.clear()
        self.in_flight_bytes = 0

    def _update_pause(self) -> PauseTimer | None:
        paused = self.full or self.in_flight_bytes >= self.window
        if paused == self.paused:
            return None
        self.paused = paused
        if paused:
            self.pauses += 1
            return PauseTimer.ARM
        return PauseTimer.CANCEL
