"""Driver-side BLOB pacing (workers/driverpacing.py): pure data, checked on its own and against a
reference model of the rule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from indibroker.workers.driverpacing import DriverPacer, PauseTimer

W = 100  # a small window keeps the examples readable


@dataclass(frozen=True)
class El:
    n: int  # its place in what the driver wrote
    device: str = "CCD"
    size: int = 0  # > 0: a BLOB of this many bytes

    @property
    def blob(self) -> bool:
        return self.size > 0


class Worker:
    """Plays the exdriver worker: sends what the pacer lets through and reports each BLOB sent."""

    def __init__(self, window: int = W):
        self.pacer: DriverPacer[El] = DriverPacer(lambda el: el.blob, window)
        self.out: list[El] = []
        self.timer = False  # the MAX_PAUSE timer is armed

    def apply(self, action: PauseTimer | None) -> None:
        if action is PauseTimer.ARM:
            assert not self.timer, "a second timer for one pause"
            self.timer = True
        elif action is PauseTimer.CANCEL:
            self.timer = False  # (already gone when it is the timer that fired)

    def send(self, el: El) -> None:
        self.out.append(el)
        if el.blob:
            self.apply(self.pacer.sent(el.device, el.size))

    def read(self, *chunk: El) -> None:
        """One read of the driver's output: it may hold several elements."""
        assert self.pacer.should_read, "read while holding"
        for el in chunk:
            if self.pacer.admit(el):
                self.send(el)

    def release(self, action: PauseTimer | None) -> None:
        self.apply(action)
        for el in self.pacer.releasable():
            self.send(el)

    def done(self, device: str = "CCD") -> None:
        self.release(self.pacer.done(device))

    def full(self) -> None:
        self.release(self.pacer.on_full())

    def open(self) -> None:
        self.release(self.pacer.on_open())

    def expire(self) -> None:
        assert self.timer
        self.timer = False
        self.release(self.pacer.expired())

    def restart(self) -> None:
        for el in self.pacer.release_all():
            self.send(el)
        self.apply(self.pacer.reset())


def test_full_holds_the_next_blob_and_what_follows_until_open() -> None:
    w = Worker()
    w.read(El(0, size=10))
    w.full()
    assert w.pacer.paused and w.timer
    w.read(El(1))  # not a BLOB: passes while paused
    w.read(El(2, size=10), El(3))  # held, and what follows it
    assert w.out == [El(0, size=10), El(1)]
    assert not w.pacer.should_read  # the driver now waits on its pipe
    w.open()
    assert [e.n for e in w.out] == [0, 1, 2, 3] and w.pacer.should_read and not w.timer


def test_a_full_window_pauses_until_done() -> None:
    w = Worker()
    w.read(El(0, size=60))
    assert not w.pacer.paused
    w.read(El(1, size=60), El(2, size=10), El(3))  # 120 >= W in flight: paused, the rest held
    assert w.pacer.paused and w.timer and w.pacer.pauses == 1
    assert [e.n for e in w.out] == [0, 1]
    w.done()  # 60 left: room
    assert [e.n for e in w.out] == [0, 1, 2, 3] and not w.pacer.paused and not w.timer


def test_a_released_blob_that_fills_the_window_stops_the_rest() -> None:
    w = Worker()
    w.read(El(0, size=W), El(1, size=W), El(2), El(3, size=W), El(4))
    assert [e.n for e in w.out] == [0]
    w.done()  # El(1) goes and fills the window again; El(2) is no BLOB: it goes too
    assert [e.n for e in w.out] == [0, 1, 2] and w.pacer.paused and w.timer
    assert not w.pacer.should_read
    w.done()
    assert [e.n for e in w.out] == [0, 1, 2, 3, 4] and w.pacer.paused  # paused, nothing held:
    assert w.pacer.should_read  # read ahead up to the next BLOB
    w.done()
    assert not w.pacer.paused and not w.timer


def test_a_pause_ends_when_its_timer_fires() -> None:
    w = Worker()
    w.full()
    w.read(El(0, size=W), El(1))
    w.expire()  # a lost OPEN: what the broker said is forgotten
    assert [e.n for e in w.out] == [0, 1]
    assert not w.pacer.full and w.pacer.in_flight_bytes == W  # the BLOB released counts again
    assert w.pacer.paused and w.timer  # ...and fills the window: a new pause, with its own timer


def test_a_restart_sends_what_was_held_and_starts_afresh() -> None:
    w = Worker()
    w.full()
    w.read(El(0, size=10), El(1))
    w.restart()
    assert [e.n for e in w.out] == [0, 1]
    p = w.pacer
    assert not p.paused and not p.full and not w.timer and p.in_flight_bytes == 0 and p.should_read


def test_done_for_an_unknown_device_changes_nothing() -> None:
    p: DriverPacer[El] = DriverPacer(lambda el: el.blob, W)
    assert p.done("nobody") is None and p.in_flight_bytes == 0
    assert p.on_open() is None  # not paused: nothing to cancel


# -- against a reference model ------------------------------------------------------------------
@dataclass
class Model:
    """The rule, written as plainly as it is said: paused while FULL or `W` bytes of BLOBs are in
    flight; a paused driver is read up to its next BLOB, which is held with all that follows it
    and released, in order, the moment there is room; the pause timer runs exactly while paused."""

    full: bool = False
    flight: list[tuple[str, int]] = field(default_factory=list)
    held: list[El] = field(default_factory=list)
    out: list[El] = field(default_factory=list)

    @property
    def paused(self) -> bool:
        return self.full or sum(size for _, size in self.flight) >= W

    def emit(self, el: El) -> None:
        if el.blob:
            assert not self.paused  # no BLOB goes out while paused
            self.flight.append((el.device, el.size))
        self.out.append(el)

    def read(self, el: El) -> None:
        if self.held or (el.blob and self.paused):
            self.held.append(el)
        else:
            self.emit(el)

    def release(self) -> None:
        while self.held and not (self.paused and self.held[0].blob):
            self.emit(self.held.pop(0))

    def done(self, device: str) -> None:
        for i, (d, _) in enumerate(self.flight):
            if d == device:
                del self.flight[i]
                break
        self.release()

    def forget(self) -> None:
        self.full = False
        self.flight = []


devices = st.sampled_from(["A", "B"])
elements = st.tuples(devices, st.sampled_from([0, 0, 1, 30, 60, W, 2 * W]))  # size 0: not a BLOB
events = st.one_of(
    st.tuples(st.just("read"), st.lists(elements, min_size=1, max_size=3)),  # one read: a few elements
    st.tuples(st.just("done"), devices),
    st.tuples(st.sampled_from(["full", "open", "expire", "restart"]), st.just("")),
)


@settings(max_examples=400)
@given(st.lists(events, max_size=60))
def test_the_pacer_follows_the_rule(script: list[tuple[str, Any]]) -> None:
    w, m = Worker(), Model()
    written = 0  # what the driver has written so far (it is read only while nothing is held)
    for kind, arg in script:
        if kind == "read":
            if not w.pacer.should_read:
                continue  # the driver waits on its pipe
            chunk = [El(written + i, device, size) for i, (device, size) in enumerate(arg)]
            written += len(chunk)
            w.read(*chunk)
            for el in chunk:
                m.read(el)
        elif kind == "done":
            w.done(arg)
            m.done(arg)
        elif kind == "full":
            w.full()
            m.full = True
            m.release()
        elif kind == "open":
            w.open()
            m.full = False
            m.release()
        elif kind == "expire":
            if not w.timer:
                continue  # no pause, no timer
            w.expire()
            m.forget()
            m.release()
        else:  # the process restarts: what was held goes, then pacing starts afresh
            w.restart()
            for el in m.held:
                m.out.append(el)
                if el.blob:
                    m.flight.append((el.device, el.size))
            m.held = []
            m.forget()
        assert w.out == m.out
        assert [e.n for e in w.out] == list(range(len(w.out)))  # in order, nothing lost or repeated
        assert w.pacer.paused == m.paused
        assert w.timer == m.paused  # every pause has its timer: none outlasts MAX_PAUSE
        assert w.pacer.should_read == (not m.held)
        held = list(w.pacer.read_ahead)
        assert held == m.held and (not held or (held[0].blob and m.paused))  # held: a BLOB first
        assert w.pacer.in_flight_bytes == sum(size for _, size in m.flight)
