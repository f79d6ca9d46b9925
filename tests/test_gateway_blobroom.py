"""The gateway's half of BLOB pacing (workers/blobroom.py): pure, checked on its own.

Clients here are plain records: what a client holds, how far behind it is, when it last took
bytes, which devices' BLOBs it wants. The property tests replay random histories against a
reference model that says the rules the simple way, from the history itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from indibroker.broker.pacing import BLOB_WINDOW
from indibroker.broker.wire import FLOW_DONE, FLOW_FULL, FLOW_OPEN
from indibroker.workers.blobroom import STALL_AFTER, BlobRoom

ROOM = 100  # the backlog a client with room may have
NOW = 1000.0


@dataclass(eq=False)
class Queue:
    bytes: int
    behind: int  # what it holds beyond the message being written
    moved: float

    def backlog(self) -> int:
        return self.behind


@dataclass(eq=False)
class Wants:
    devices: frozenset[str]

    def wants(self, device: str, name: str, blob: bool) -> bool:
        return blob and device in self.devices


@dataclass(eq=False)
class Client:
    name: str
    devices: frozenset[str] = frozenset({"CCD"})
    out: Queue | None = None
    interest: Wants = field(init=False)

    def __post_init__(self) -> None:
        self.interest = Wants(self.devices)

    def holds(self, held: int, behind: int | None = None, age: float = 0.0) -> Client:
        """It holds `held` bytes, `behind` of them beyond the one being written, and took bytes
        `age` seconds ago."""
        self.out = Queue(held, held if behind is None else behind, NOW - age) if held else None
        return self


def room() -> BlobRoom:
    return BlobRoom(BLOB_WINDOW + ROOM)


def full(device: str = "CCD", name: str = "IMG") -> tuple:
    return (device, name, FLOW_FULL)


def done(device: str = "CCD") -> tuple:
    return (device, "", FLOW_DONE)


def opened(device: str = "CCD", name: str = "IMG") -> tuple:
    return (device, name, FLOW_OPEN)


def test_room_is_the_drop_threshold_less_what_may_be_in_flight() -> None:
    assert room().room == ROOM
    assert BlobRoom(BLOB_WINDOW // 2).room == 0


def test_full_only_for_a_client_that_is_draining_without_room_and_before_done() -> None:
    r = room()
    fast = Client("fast").holds(ROOM)  # at the limit: still has room
    assert r.blob_handled("CCD", "IMG", [fast], NOW) == (done(),)
    stalled = Client("stalled").holds(10 * ROOM, age=STALL_AFTER)
    assert r.blob_handled("CCD", "IMG", [fast, stalled], NOW) == (done(),)  # a stalled client never counts
    assert not r.full
    behind = Client("behind").holds(10 * ROOM, age=STALL_AFTER / 2)
    assert r.blob_handled("CCD", "IMG", [fast, stalled, behind], NOW) == (full(), done())
    assert r.full == {"CCD": "IMG"}
    # What is being written now does not count: one big BLOB being read at full speed is not behind.
    r2 = room()
    assert r2.blob_handled("CCD", "IMG", [Client("big").holds(10 * ROOM, behind=ROOM)], NOW) == (done(),)


def test_open_when_every_draining_client_has_room() -> None:
    r = room()
    a, b = Client("a").holds(5 * ROOM), Client("b").holds(5 * ROOM)
    stalled = Client("stalled").holds(10 * ROOM, age=2 * STALL_AFTER)
    everyone = [a, b, stalled]
    r.blob_handled("CCD", "IMG", everyone, NOW)
    assert r.drained(a.holds(2 * ROOM), everyone, NOW) == []  # still no room
    assert r.drained(a.holds(ROOM), everyone, NOW) == []  # room, but b has none: a sets the pace
    assert r.pacesetter["CCD"] == (a, ROOM // 2)
    assert r.drained(b.holds(ROOM), everyone, NOW) == [opened()]  # the stalled one does not count
    assert not r.full and not r.pacesetter
    assert r.drained(b.holds(0), everyone, NOW) == []  # nothing is full: nothing to open


def test_the_pacesetter_opens_halfway_through_what_it_held() -> None:
    r = room()
    fast, slow = Client("fast").holds(5 * ROOM), Client("slow").holds(5 * ROOM)
    both = [fast, slow]
    assert r.blob_handled("CCD", "IMG", both, NOW)[0] == full()
    assert r.drained(fast.holds(80), both, NOW) == []  # first with room: its mark is 40
    assert r.drained(fast.holds(41), both, NOW) == []
    assert r.drained(slow.holds(ROOM + 1), both, NOW) == []  # not the pacesetter
    assert r.drained(fast.holds(40), both, NOW) == [opened()]  # slow still has no room


def test_a_full_said_again_chooses_the_pacesetter_afresh() -> None:
    r = room()
    a, b = Client("a").holds(5 * ROOM), Client("b").holds(5 * ROOM)
    r.blob_handled("CCD", "IMG", [a, b], NOW)
    r.drained(a.holds(80), [a, b], NOW)
    r.blob_handled("CCD", "IMG", [a, b], NOW)  # b still behind: FULL again
    assert "CCD" not in r.pacesetter
    assert r.drained(a.holds(40), [a, b], NOW) == []  # a's old mark no longer counts...
    assert r.pacesetter["CCD"] == (a, 20)  # ...it sets the pace again, from what it holds now


def test_a_client_gone_opens_what_it_wanted_and_nothing_else() -> None:
    r = room()
    ccd = Client("ccd", frozenset({"CCD"})).holds(5 * ROOM)
    guider = Client("guider", frozenset({"Guider"})).holds(5 * ROOM)
    r.blob_handled("CCD", "IMG", [ccd], NOW)
    r.blob_handled("Guider", "IMG", [guider], NOW)
    assert r.gone(ccd) == [opened("CCD")]
    assert r.full == {"Guider": "IMG"}
    assert r.drained(ccd, [guider], NOW) == []  # a client that does not want Guider's BLOBs


def test_open_names_the_property_of_the_last_full() -> None:
    r = room()
    c = Client("c").holds(5 * ROOM)
    r.blob_handled("CCD", "IMG", [c], NOW)
    r.blob_handled("CCD", "STACK", [c], NOW)
    assert r.drained(c.holds(0), [c], NOW) == [opened("CCD", "STACK")]


# -- against a reference model -------------------------------------------------------------------

DEVICES = ("CCD", "Guider")
N_CLIENTS = 3
DROP = 3 * ROOM  # the simulated gateway drops a BLOB for a client this far behind


@dataclass(eq=False)
class Pipe:
    """A simulated client queue: the sizes of what it holds, the first being written."""

    chunks: list[int]
    moved: float

    @property
    def bytes(self) -> int:
        return sum(self.chunks)

    def backlog(self) -> int:
        return self.bytes - self.chunks[0] if self.chunks else 0


class World:
    """Clients given BLOBs (dropped past DROP, as the gateway does) and taking bytes as they
    please, on a clock that moves; each event is told to `room`, and to `model` if given."""

    def __init__(self, wanted: list[frozenset[str]], stalled: int = 0):
        self.now = NOW
        self.clients = [Client(f"c{i}", d) for i, d in enumerate(wanted)]
        self.live = list(self.clients)
        if stalled:  # far behind, wants everything, never takes a byte
            self.live.append(Client("stalled", frozenset(DEVICES)))
            self.live[-1].out = Pipe([stalled, stalled], NOW - STALL_AFTER)
        self.said: list[list] = []

    def run(self, room: BlobRoom, model: Model | None, history: list) -> list[list]:
        for event in history:
            kind = event[0]
            if kind == "tick":
                self.now += event[1]
                continue
            if kind == "blob":
                device, size = event[1], event[2]
                takers = [c for c in self.live if device in c.devices]
                for c in takers:
                    if c.out is None:
                        c.out = Pipe([], self.now)  # a new queue counts as moving, as OutQueue's
                    if c.out.backlog() <= DROP:
                        c.out.chunks.append(size)
                got = list(room.blob_handled(device, "IMG", takers, self.now))
                want = model.blob(device, self.now) if model else None
                assert got[-1] == done(device) and FLOW_DONE not in [s[2] for s in got[:-1]]  # FULL first
            else:
                c = self.clients[event[1]]
                if c not in self.live:
                    continue
                if kind == "drain":
                    self.take(c, event[2])
                    got = room.drained(c, self.live, self.now)
                    want = model.drain(c, self.now) if model else None
                else:
                    self.live.remove(c)
                    got = room.gone(c)
                    want = model.gone(c) if model else None
            if model:
                assert sorted(got) == sorted(want), (event, got, want)
                assert set(room.full) == set(model.full)
            self.said.append(got)
        return self.said

    def take(self, c: Client, n: int) -> None:
        """`c` takes up to `n` bytes; its queue goes when empty (an idle client holds none)."""
        out = c.out
        if out is None:
            return
        if n:
            out.moved = self.now
        while n and out.chunks:
            first = min(n, out.chunks[0])
            out.chunks[0] -= first
            n -= first
            if not out.chunks[0]:
                out.chunks.pop(0)
        if not out.chunks:
            c.out = None


class Model:
    """The rules, said simply: each decision is read off the history (every drain, with what
    the client held then), not kept as running state like the pacesetter."""

    def __init__(self, world: World):
        self.world = world
        self.history: list[tuple[str, Client | None, int]] = []  # (event, client, what it held)
        self.full: dict[str, tuple[str, int]] = {}  # device -> (name, index of its FULL)

    @staticmethod
    def has_room(c: Client) -> bool:
        return c.out is None or c.out.backlog() <= ROOM

    def held_up(self, device: str, now: float) -> bool:
        """A client wants its BLOBs, has taken bytes lately and has no room."""
        return any(device in c.devices and c.out is not None and now - c.out.moved < STALL_AFTER
                   and not self.has_room(c) for c in self.world.live)

    def blob(self, device: str, now: float) -> list:
        self.history.append(("blob", None, 0))
        if self.held_up(device, now):
            self.full[device] = ("IMG", len(self.history) - 1)
            return [full(device), done(device)]
        return [done(device)]

    def drain(self, c: Client, now: float) -> list:
        held = c.out.bytes if c.out is not None else 0
        opens = []
        for device, (name, since) in list(self.full.items()):
            if device not in c.devices:
                continue
            # The pacesetter: the first client wanting the device to drain with room since FULL.
            first = next(((who, then) for event, who, then in self.history[since + 1:]
                          if event == "drain-room" and who is not None and device in who.devices), None)
            if (first is not None and first[0] is c and held <= first[1] // 2) or (
                    self.has_room(c) and not self.held_up(device, now)):
                del self.full[device]
                opens.append(opened(device, name))
        self.history.append(("drain-room" if self.has_room(c) else "drain", c, held))
        return opens

    def gone(self, c: Client) -> list:
        opens = [opened(d, name) for d, (name, _) in self.full.items() if d in c.devices]
        for d in c.devices:
            self.full.pop(d, None)
        self.history.append(("gone", c, 0))
        return opens


KINDS = {
    "blob": st.tuples(st.just("blob"), st.sampled_from(DEVICES), st.sampled_from([ROOM // 2, ROOM, 2 * ROOM])),
    "drain": st.tuples(st.just("drain"), st.integers(0, N_CLIENTS - 1),
                       st.sampled_from([0, ROOM // 4, ROOM // 2, ROOM, 3 * ROOM])),
    "tick": st.tuples(st.just("tick"), st.sampled_from([STALL_AFTER / 4, STALL_AFTER])),
    "gone": st.tuples(st.just("gone"), st.integers(0, N_CLIENTS - 1)),
}
events = st.sampled_from(["blob"] * 4 + ["drain"] * 8 + ["tick"] * 2 + ["gone"]).flatmap(KINDS.__getitem__)
histories = st.lists(events, min_size=10, max_size=100)
wanted = st.lists(st.frozensets(st.sampled_from(DEVICES), min_size=1), min_size=N_CLIENTS, max_size=N_CLIENTS)


@settings(max_examples=200)
@given(wanted, histories)
def test_full_and_open_follow_the_rules(devices: list[frozenset[str]], history: list) -> None:
    world = World(devices)
    world.run(room(), Model(world), history)


@given(wanted, histories)
def test_open_only_what_is_full_and_full_only_before_done(devices: list[frozenset[str]], history: list) -> None:
    state: dict[str, bool] = {}
    for signals in World(devices).run(room(), None, history):
        for device, _name, flag in signals:
            if flag == FLOW_OPEN:
                assert state.get(device), "OPEN for a device not full"
                state[device] = False
            elif flag == FLOW_FULL:
                state[device] = True


@given(wanted, histories, st.integers(ROOM + 1, 50 * ROOM))
def test_a_client_that_stopped_reading_changes_nothing(devices: list[frozenset[str]], history: list,
                                                        behind: int) -> None:
    """However far behind, a client that has taken nothing for STALL_AFTER never counts."""
    alone = World(devices).run(room(), None, history)
    assert World(devices, stalled=behind).run(room(), None, history) == alone
