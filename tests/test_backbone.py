"""A worker's backbone end, in-process against a ROUTER the test plays: no fork, no sleeps.

The broker answers every HELLO and heartbeat. A worker that hears nothing for three heartbeats
knows its registration did not take and connects afresh, rather than repeating HELLO into a
connection that leads nowhere (a route handed to another connection, a wedged broker).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import zmq

from indibroker.broker import wire
from indibroker.workers.backbone import LIVENESS, Backbone
from indibroker.workers.reactor import Reactor

BEAT = 0.02


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.term()  # fails (hangs: pytest-timeout) if a socket was left open


def hellos(router: zmq.Socket) -> list[tuple[bytes, dict]]:
    """Every HELLO waiting on the router: (identity, payload)."""
    out = []
    while router.poll(0):
        ident, index, body = router.recv_multipart()
        offset = 0
        for head, length in wire.unpack(index):
            if wire.parse_header(head)[0] == wire.HELLO:
                out.append((ident, json.loads(body[offset:offset + length])))
            offset += length
    return out


def run_until(reactor: Reactor, predicate, timeout: float) -> None:
    """Turn the loop until `predicate()` holds (checked on a short timer) or `timeout` passes."""
    state = {"ok": False}

    def check() -> None:
        if predicate():
            state["ok"] = True
            reactor.stop()
        else:
            reactor.call_later(BEAT / 4, check)

    reactor.call_later(0, check)
    reactor.call_later(timeout, reactor.stop)
    reactor.run()
    assert state["ok"], "condition not reached"


def test_a_registration_that_does_not_take_is_repaired_by_a_new_connection(ctx, tmp_path):
    endpoint = f"ipc://{tmp_path}/b.sock"
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    reactor = Reactor()
    backbone = Backbone(reactor, ctx, endpoint, "driver", "exdriver-0", lambda *a: None,
                        lambda: ["CCD"], lambda: [], instance="abcd", heartbeat=BEAT)
    try:
        seen: list[tuple[bytes, dict]] = []
        # The broker stays silent: after LIVENESS beats the worker reconnects and says HELLO again.
        run_until(reactor, lambda: seen.extend(hellos(router)) or len(seen) >= 2, BEAT * LIVENESS * 20)
        assert backbone.reconnects >= 1
        assert all(h["instance"] == "abcd" and h["devices"] == ["CCD"] for _, h in seen)
        # Now it answers: the registration takes and the worker stays on this connection.
        ident = seen[-1][0]
        reconnects = backbone.reconnects
        for _ in range(LIVENESS * 3):  # keep answering its heartbeats for a while
            router.send_multipart([ident, wire.record(wire.header(wire.HB), 0), b""])
            reactor.call_later(BEAT, reactor.stop)
            reactor.run()
        assert backbone.reconnects == reconnects
    finally:
        backbone.close()
        reactor.close()
        router.close(linger=0)


def test_close_leaves_the_backbone_for_good(ctx, tmp_path):
    """A worker whose arbiter died closes its backbone: nothing it does afterwards is sent, and
    it never reconnects."""
    endpoint = f"ipc://{tmp_path}/b.sock"
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    reactor = Reactor()
    backbone = Backbone(reactor, ctx, endpoint, "gateway", "gateway-0", lambda *a: None,
                        lambda: [], lambda: [], heartbeat=BEAT)
    try:
        run_until(reactor, lambda: bool(hellos(router)), 2)
        backbone.close()
        backbone.close()  # idempotent
        backbone.send(wire.MSG, "CCD", "", b"", b"<message/>")
        backbone.flush()
        reactor.call_later(BEAT * LIVENESS * 3, reactor.stop)
        reactor.run()
        assert not router.poll(0)
        assert backbone.reconnects == 0
    finally:
        reactor.close()
        router.close(linger=0)
