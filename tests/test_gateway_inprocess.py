"""The gateway in-process on a fake backbone: real client sockets, no fork, no sleeps."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from fakes import FakeBackbone, config, runtime_dir, turn_until

from indibroker.broker import wire
from indibroker.workers.codec import StreamDecoder
from indibroker.workers.gateway import Gateway
from indibroker.workers.reactor import Reactor


@pytest.fixture
def gateway(tmp_path) -> Iterator[Gateway]:
    gw = Gateway(config().gateway_settings(0), runtime=runtime_dir(tmp_path), reactor=Reactor())
    gw.connect(FakeBackbone())
    gw.setup()
    yield gw
    gw.shutdown()
    gw.reactor.close()


class Client:
    def __init__(self, gw: Gateway):
        assert gw.listener is not None
        self.sock = socket.create_connection(gw.listener.getsockname()[:2])
        self.sock.setblocking(False)
        self.decoder = StreamDecoder()
        self.elements: list = []

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def read(self) -> list:
        try:
            self.elements += self.decoder.feed(self.sock.recv(1 << 20))
        except BlockingIOError:
            pass
        return self.elements


def fake(gw: Gateway) -> FakeBackbone:
    assert isinstance(gw.backbone, FakeBackbone)
    return gw.backbone


def test_get_properties_goes_up_and_definitions_come_down(gateway):
    client = Client(gateway)
    client.send('<getProperties version="1.7"/>')
    turn_until(gateway.reactor, lambda: fake(gateway).of(wire.GETP), what="GETP to the broker")
    definition = b'<defNumberVector device="D" name="N"><defNumber name="x">1</defNumber></defNumberVector>'
    gateway.on_backbone(wire.DEF, "D", "N", b"", definition)
    got = turn_until(gateway.reactor, lambda: [e for e in client.read() if e.tag == "defNumberVector"],
                     what="the definition at the client")
    assert got[0].raw == definition  # the bytes as the driver wrote them


def test_a_client_ping_is_answered_by_the_gateway(gateway):
    client = Client(gateway)
    client.send('<pingRequest uid="u1"/>')
    replies = turn_until(gateway.reactor, lambda: [e for e in client.read() if e.tag == "pingReply"],
                         what="pingReply")
    assert replies[0].get("uid") == "u1"
    assert not fake(gateway).of(wire.NEW)


def test_a_client_sending_garbage_is_dropped_alone(gateway):
    good, bad = Client(gateway), Client(gateway)
    good.send('<getProperties version="1.7"/>')
    turn_until(gateway.reactor, lambda: len(gateway.clients) == 2, what="two clients")
    bad.send("<<<not xml")
    turn_until(gateway.reactor, lambda: len(gateway.clients) == 1, what="the bad client dropped")
    gateway.on_backbone(wire.MSG, "", "", b"", b'<message message="hello"/>')
    turn_until(gateway.reactor, lambda: [e for e in good.read() if e.tag == "message"], what="message")
