"""The broker's bounds for joined hosts, in-process (tests/test_inprocess_broker_arbiter.py's rig):
a joined host's gateway is sent at most HOST_BLOB_BYTES of BLOBs it has not yet said DONE for,
so what a slow link cannot carry is dropped in the broker instead of piling up in its queues;
a lost host's devices are deleted with a message naming it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from test_inprocess_broker_arbiter import Backbone, Peer, registered

from indibroker.broker import wire
from indibroker.broker.router import HOST_BLOB_BYTES

pytestmark = pytest.mark.timeout(10)

BLOB = b"<setBLOBVector device='CCD' name='IMG'>" + b"x" * (3 * 1024 * 1024) + b"</setBLOBVector>"


@pytest.fixture
def bb() -> Iterator[Backbone]:
    backbone = Backbone()
    yield backbone
    backbone.close()


def as_host(bb: Backbone, peer: Peer, host: str) -> None:
    """Make `peer` one of host `host`'s workers, as a message on the host socket would (its
    key's User-Id checked): the rest of the broker treats it as such."""
    ident = f"{peer.role}:{peer.name}".encode()
    bb.broker._host_of[ident] = host
    bb.broker._host_heard[ident] = time.monotonic()
    bb.broker.table.peers[ident].host = host


def test_a_slow_hosts_gateway_gets_a_bounded_share_of_blobs(bb: Backbone) -> None:
    camera = registered(bb, bb.peer("driver", "exdriver-0"), ["CCD"])
    local = registered(bb, bb.peer("gateway", "gateway-0"))
    far = registered(bb, bb.peer("gateway", "gateway-pier"))
    as_host(bb, far, "pier")
    for gw in (local, far):
        gw.say(wire.SUB, payload=wire.encode_interests([("CCD", "", wire.WANT_BLOB | wire.WANT_PLAIN)]))
    bb.settle()
    fit = HOST_BLOB_BYTES // len(BLOB)
    for _ in range(fit + 3):  # the far gateway says no DONE: a link that carries nothing
        camera.say(wire.SET, "CCD", "IMG", wire.FLAG_BLOB, BLOB)
    bb.until(lambda: sum(m[0] == wire.SET for m in local.got) == fit + 3, "every BLOB at the local gateway")
    bb.settle()
    assert sum(m[0] == wire.SET for m in far.take()) == fit
    assert bb.broker.host_blobs_dropped == 3
    # It says DONE for one: one more BLOB may go its way.
    far.say(wire.FLOW, "CCD", "IMG", wire.FLOW_DONE)
    bb.settle()
    camera.say(wire.SET, "CCD", "IMG", wire.FLAG_BLOB, BLOB)
    camera.say(wire.SET, "CCD", "IMG", wire.FLAG_BLOB, BLOB)
    bb.settle()
    assert sum(m[0] == wire.SET for m in far.take()) == 1
    assert bb.broker.host_blobs_dropped == 4


def test_a_lost_hosts_devices_are_deleted_with_a_message_naming_it(bb: Backbone) -> None:
    gateway = registered(bb, bb.peer("gateway", "gateway-0"))
    gateway.say(wire.SUB, payload=wire.encode_interests([("", "", wire.WANT_PLAIN)]))
    pier = registered(bb, bb.peer("driver", "pier-exdriver"), ["Scope", "CCD"])
    as_host(bb, pier, "pier")
    bb.settle()
    bb.broker._lose_host_peer(b"driver:pier-exdriver", "silent for 1.6 s")
    bb.broker.flush()
    bb.until(lambda: sum(m[0] == wire.DEL for m in gateway.got) == 2, "both devices deleted")
    messages = [m for m in gateway.got if m[0] == wire.MSG]
    assert {m[1] for m in messages} == {"Scope", "CCD"}
    assert all(b"host pier lost (silent for 1.6 s)" in m[4] for m in messages)
    assert bb.broker.table.owner("Scope") is None
    assert bb.broker.status()["peers"] == 1
