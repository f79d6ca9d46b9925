"""The gateway in-process on a fake backbone: real client sockets, no fork, no sleeps.

What the broker would send is handed to `gateway.on_backbone`; what the gateway sends the broker
is read off the `FakeBackbone`. Limits are set small (`dataclasses.replace` on the default
settings) so that a client that does not read (a small receive buffer, never read) reaches them
in a few turns of the loop.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from fakes import FakeBackbone, config, runtime_dir, turn_until

from indibroker.broker import wire
from indibroker.broker.pacing import BLOB_WINDOW
from indibroker.workers import clients
from indibroker.workers.blobroom import STALL_AFTER
from indibroker.workers.clients import Client as Record
from indibroker.workers.codec import StreamDecoder
from indibroker.workers.gateway import Gateway
from indibroker.workers.reactor import Reactor

KB = 1024
MB = 1024 * KB

Make = Callable[..., Gateway]


@pytest.fixture
def make_gateway(tmp_path) -> Iterator[Make]:
    """A gateway with the default settings, `changes` applied; set up and shut down."""
    made: list[Gateway] = []

    def make(**changes) -> Gateway:
        settings = dataclasses.replace(config().gateway_settings(0), **changes)
        gw = Gateway(settings, runtime=runtime_dir(tmp_path), reactor=Reactor())
        gw.connect(FakeBackbone(worker=gw.on_backbone))
        gw.setup()
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.shutdown()
        gw.reactor.close()


@pytest.fixture
def gateway(make_gateway) -> Gateway:
    return make_gateway()


class Client:
    def __init__(self, gw: Gateway, rcvbuf: int = 0):
        """`rcvbuf`: a small receive buffer, for a client that is to fall behind."""
        assert gw.connections.admission.listener is not None
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(gw.connections.admission.listener.getsockname()[:2])
        self.sock.setblocking(False)
        self.decoder = StreamDecoder(max_element=64 * MB)
        self.elements: list = []
        self.data = bytearray()  # what `drain` read, undecoded
        self.closed = False

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def read(self) -> list:
        try:
            self.elements += self.decoder.feed(self.sock.recv(1 << 20))
        except BlockingIOError:
            pass
        return self.elements

    def tags(self, tag: str) -> list:
        return [e for e in self.read() if e.tag == tag]

    def drain(self) -> bool:
        """Read all there is, undecoded; True once the server has closed the connection."""
        while not self.closed:
            try:
                chunk = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            except ConnectionResetError:
                chunk = b""
            self.data += chunk
            self.closed = not chunk
        return self.closed

    def close(self) -> None:
        self.sock.close()


def fake(gw: Gateway) -> FakeBackbone:
    assert isinstance(gw.backbone, FakeBackbone)
    return gw.backbone


def record(gw: Gateway, client: Client) -> Record:
    """The gateway's record of `client` (its peer address is the client's own)."""
    host, port = client.sock.getsockname()[:2]
    return turn_until(gw.reactor, lambda: next((r for r in gw.clients.values() if r.peer == f"{host}:{port}"),
                                               None), what="the client admitted")


def blob(size: int, device: str = "CCD", name: str = "IMG") -> bytes:
    return (f'<setBLOBVector device="{device}" name="{name}"><oneBLOB name="I" size="{size}" format=".fits">'
            .encode() + b"A" * size + b"</oneBLOB></setBLOBVector>")


def number(device: str, name: str, value: int, pad: int = 0) -> bytes:
    return (f'<setNumberVector device="{device}" name="{name}"><oneNumber name="x">{value}</oneNumber>'
            f'{" " * pad}</setNumberVector>').encode()


def flows(gw: Gateway, device: str = "CCD") -> list[tuple[str, bytes]]:
    return [(m.name, m.flags) for m in fake(gw).of(wire.FLOW, device)]


def test_get_properties_goes_up_and_definitions_come_down(gateway):
    client = Client(gateway)
    client.send('<getProperties version="1.7"/>')
    turn_until(gateway.reactor, lambda: fake(gateway).of(wire.GETP), what="GETP to the broker")
    definition = b'<defNumberVector device="D" name="N"><defNumber name="x">1</defNumber></defNumberVector>'
    gateway.on_backbone(wire.DEF, "D", "N", b"", definition)
    got = turn_until(gateway.reactor, lambda: client.tags("defNumberVector"), what="the definition at the client")
    assert got[0].raw == definition  # the bytes as the driver wrote them


def test_a_client_ping_is_answered_by_the_gateway(gateway):
    client = Client(gateway)
    client.send('<pingRequest uid="u1"/>')
    replies = turn_until(gateway.reactor, lambda: client.tags("pingReply"), what="pingReply")
    assert replies[0].get("uid") == "u1"
    assert not fake(gateway).of(wire.NEW)


def test_a_client_sending_garbage_is_dropped_alone(gateway):
    good, bad = Client(gateway), Client(gateway)
    good.send('<getProperties version="1.7"/>')
    turn_until(gateway.reactor, lambda: len(gateway.clients) == 2, what="two clients")
    # What it sent whole before the garbage is still routed.
    bad.send('<newNumberVector device="D" name="N"><oneNumber name="x">2</oneNumber></newNumberVector><<<not xml')
    turn_until(gateway.reactor, lambda: len(gateway.clients) == 1, what="the bad client dropped")
    assert [m.device for m in fake(gateway).of(wire.NEW)] == ["D"]
    gateway.on_backbone(wire.MSG, "", "", b"", b'<message message="hello"/>')
    turn_until(gateway.reactor, lambda: good.tags("message"), what="message")
    assert turn_until(gateway.reactor, bad.drain, what="the bad client closed")


def test_interests_go_up_as_clients_ask_and_leave(gateway):
    up = fake(gateway)
    mount = Client(gateway)
    mount.send('<getProperties version="1.7" device="Mount"/>')
    turn_until(gateway.reactor, lambda: gateway.interests() == [("Mount", "", wire.WANT_PLAIN)],
               what="Mount's interest")
    updates = up.interest_updates
    assert updates
    mount.send('<enableBLOB device="CCD">Also</enableBLOB>')
    turn_until(gateway.reactor, lambda: up.interest_updates > updates, what="an interest update")
    assert gateway.interests() == [("CCD", "", wire.WANT_PLAIN | wire.WANT_BLOB), ("Mount", "", wire.WANT_PLAIN)]
    everything = Client(gateway)
    everything.send('<getProperties version="1.7"/>')
    turn_until(gateway.reactor, lambda: ("", "", wire.WANT_PLAIN) in gateway.interests(), what="all devices")
    updates = up.interest_updates
    mount.close()
    turn_until(gateway.reactor, lambda: len(gateway.clients) == 1, what="the first client gone")
    assert up.interest_updates > updates
    assert gateway.interests() == [("", "", wire.WANT_PLAIN)]


def test_blobs_go_only_to_clients_that_asked(gateway):
    never, also, only = Client(gateway), Client(gateway), Client(gateway)
    never.send('<getProperties version="1.7"/>')
    also.send('<getProperties version="1.7"/><enableBLOB device="CCD">Also</enableBLOB>')
    only.send('<getProperties version="1.7"/><enableBLOB device="CCD">Only</enableBLOB>')
    turn_until(gateway.reactor, lambda: len(gateway.interests()) == 2, what="the three clients' interests")
    gateway.on_backbone(wire.SET, "CCD", "IMG", wire.FLAG_BLOB, blob(1000))
    gateway.on_backbone(wire.SET, "CCD", "TEMP", b"", number("CCD", "TEMP", 1))
    gateway.on_backbone(wire.MSG, "", "", b"", b'<message message="end"/>')  # to all: nothing follows
    for c in (never, also, only):
        turn_until(gateway.reactor, lambda c=c: c.tags("message"), what="the end marker")
    assert [e.tag for e in never.elements] == ["setNumberVector", "message"]
    assert [e.tag for e in also.elements] == ["setBLOBVector", "setNumberVector", "message"]
    assert [e.tag for e in only.elements] == ["setBLOBVector", "message"]


def test_a_slow_client_loses_blobs_past_blob_drop_bytes_not_its_connection(make_gateway):
    gw = make_gateway(blob_drop_bytes=64 * KB, max_queue_bytes=64 * MB)
    reader, slow = Client(gw), Client(gw, rcvbuf=4096)
    for c in (reader, slow):
        c.send('<getProperties version="1.7"/><enableBLOB device="CCD">Also</enableBLOB>')
    slow_record = record(gw, slow)
    turn_until(gw.reactor, lambda: len(gw.clients) == 2 and all(r.interest.blob_device for r in gw.clients.values()),
               what="both clients' enableBLOB")
    sent = 0
    frame = blob(256 * KB)

    def one_more() -> bool:
        nonlocal sent
        gw.on_backbone(wire.SET, "CCD", "IMG", wire.FLAG_BLOB, frame)
        sent += 1
        reader.read()
        return slow_record.blobs_dropped > 2

    turn_until(gw.reactor, one_more, what="BLOBs dropped for the slow client")
    turn_until(gw.reactor, lambda: len(reader.tags("setBLOBVector")) == sent, what="every BLOB at the reader")
    assert not slow_record.closed and slow_record in gw.clients.values()
    # What it holds stays near the threshold: one BLOB being written, at most the threshold behind it.
    assert slow_record.out is not None and slow_record.out.bytes <= 64 * KB + 2 * len(frame)
    assert flows(gw).count(("", wire.FLOW_DONE)) == sent  # a DONE for each, dropped or queued


def test_a_client_past_max_queue_bytes_is_dropped_and_the_others_get_everything(make_gateway):
    gw = make_gateway(blob_drop_bytes=64 * MB, max_queue_bytes=256 * KB)
    good, stalled = Client(gw), Client(gw, rcvbuf=4096)
    for c in (good, stalled):
        c.send('<getProperties version="1.7"/>')
    stalled_record = record(gw, stalled)
    turn_until(gw.reactor, lambda: len(gw.interests()) == 1 and len(gw.clients) == 2, what="two clients")
    updates = fake(gw).interest_updates
    sent = 0

    def one_more() -> bool:
        nonlocal sent
        gw.on_backbone(wire.SET, "D", "N", b"", number("D", "N", sent, pad=64 * KB))
        sent += 1
        good.read()
        return stalled_record.closed

    turn_until(gw.reactor, one_more, what="the stalled client dropped")
    assert stalled_record not in gw.clients.values()
    assert fake(gw).interest_updates > updates
    assert turn_until(gw.reactor, stalled.drain, what="the stalled client's connection closed")
    got = turn_until(gw.reactor, lambda: len(good.tags("setNumberVector")) == sent and good.elements,
                     what="every message at the good client")
    assert [int(float(e.root[0].text)) for e in got] == list(range(sent))


def paced_gateway(make_gateway) -> Gateway:
    """Room for 64 KB of backlog: two 256 KB BLOBs queued for a client are one too many."""
    return make_gateway(blob_drop_bytes=BLOB_WINDOW + 64 * KB, max_queue_bytes=64 * MB)


def fill_until_full(gw: Gateway, client: Client, frame: bytes) -> None:
    """BLOBs to `client` (which does not read) until the gateway says FULL for them."""
    def one_more() -> bool:
        gw.on_backbone(wire.SET, "CCD", "IMG", wire.FLAG_BLOB, frame)
        return ("IMG", wire.FLOW_FULL) in flows(gw)

    turn_until(gw.reactor, one_more, what="FULL")


def test_full_is_said_before_the_done_of_the_same_blob_and_open_when_the_client_has_room(make_gateway):
    gw = paced_gateway(make_gateway)
    client = Client(gw, rcvbuf=4096)
    client.send('<getProperties version="1.7"/><enableBLOB device="CCD">Also</enableBLOB>')
    turn_until(gw.reactor, lambda: gw.interests(), what="the client's interest")
    gw.on_backbone(wire.SET, "Other", "IMG", wire.FLAG_BLOB, blob(10))
    assert flows(gw, "Other") == [("", wire.FLOW_DONE)]  # a BLOB nobody wants is handled too
    fill_until_full(gw, client, blob(256 * KB))
    said = flows(gw)
    assert said[-2:] == [("IMG", wire.FLOW_FULL), ("", wire.FLOW_DONE)]
    assert said[:-2] == [("", wire.FLOW_DONE)] * (len(said) - 2)
    assert gw.connections.on_drained is not None  # flushes matter to pacing while a device is full
    turn_until(gw.reactor, lambda: client.drain() or ("IMG", wire.FLOW_OPEN) in flows(gw),
               what="OPEN as the client reads")
    assert flows(gw)[-1] == ("IMG", wire.FLOW_OPEN)
    assert gw.connections.on_drained is None


def test_a_client_leaving_opens_what_it_held_up(make_gateway):
    gw = paced_gateway(make_gateway)
    client = Client(gw, rcvbuf=4096)
    client.send('<getProperties version="1.7"/><enableBLOB device="CCD">Also</enableBLOB>')
    turn_until(gw.reactor, lambda: gw.interests(), what="the client's interest")
    fill_until_full(gw, client, blob(256 * KB))
    client.close()
    turn_until(gw.reactor, lambda: not gw.clients, what="the client gone")
    assert flows(gw)[-1] == ("IMG", wire.FLOW_OPEN)


def test_a_client_that_stopped_reading_never_asks_for_pacing(make_gateway):
    gw = paced_gateway(make_gateway)
    client = Client(gw, rcvbuf=4096)
    client.send('<getProperties version="1.7"/><enableBLOB device="CCD">Also</enableBLOB>')
    stalled = record(gw, client)
    turn_until(gw.reactor, lambda: gw.interests(), what="the client's interest")
    frame = blob(256 * KB)

    def one_more() -> int:
        if stalled.out is not None:
            stalled.out.moved = time.monotonic() - STALL_AFTER  # as if it took nothing for a while
        gw.on_backbone(wire.SET, "CCD", "IMG", wire.FLAG_BLOB, frame)
        return stalled.blobs_dropped

    turn_until(gw.reactor, one_more, what="BLOBs dropped for the stalled client")
    assert set(flows(gw)) == {("", wire.FLOW_DONE)}


def test_maxconnections_refuses_the_excess_with_a_message_then_admits_again(make_gateway, monkeypatch):
    monkeypatch.setattr(clients, "ADMIT_GRACE", 0.1)  # how long a connection waits for a slot
    gw = make_gateway(maxconnections=1)
    first = Client(gw)
    turn_until(gw.reactor, lambda: len(gw.clients) == 1, what="the first client")
    second = Client(gw)  # waits for a slot a moment, then is told why and closed
    assert turn_until(gw.reactor, second.drain, what="the second client refused")
    assert b"maxconnections is 1" in second.data
    assert len(gw.clients) == 1
    first.close()
    turn_until(gw.reactor, lambda: not gw.clients, what="the first client gone")
    third = Client(gw)
    third.send('<pingRequest uid="3"/>')
    turn_until(gw.reactor, lambda: third.tags("pingReply"), what="the third client served")


def test_unfinished_input_is_bounded_for_all_clients_together(make_gateway):
    gw = make_gateway(max_partial_bytes=100 * KB)
    small, big = Client(gw), Client(gw)
    start = '<newBLOBVector device="CCD" name="UP"><oneBLOB name="B" size="1" format=".z">'
    small.send(start + "A" * 40 * KB)
    turn_until(gw.reactor, lambda: gw.connections.partial_total > 40 * KB, what="the small one's part read")
    big.send(start + "A" * 70 * KB)
    turn_until(gw.reactor, lambda: len(gw.clients) == 1, what="the client holding the most dropped")
    assert turn_until(gw.reactor, big.drain, what="its connection closed")
    small.send("A" * 10 + "</oneBLOB></newBLOBVector>")
    turn_until(gw.reactor, lambda: fake(gw).of(wire.NEW), what="the small one's element routed")
    assert gw.connections.partial_total == 0
