"""broker/transport.py calls pyzmq's compiled socket methods directly (zmq.backend.Socket.send,
recv, get with positional integer flags), which are not pyzmq's public API. These tests fail
loudly if a pyzmq release changes them; pyproject.toml pins the range they were measured on."""

from __future__ import annotations

import inspect

import pytest
import zmq
from zmq.backend import Socket as Compiled

from indibroker.broker.transport import ZERO_COPY_BYTES, readable, recv_frames, send_frames


def test_the_compiled_methods_we_bind_exist_with_the_arguments_we_pass():
    for name, params in (("send", ["data", "flags", "copy"]), ("recv", ["flags", "copy"]), ("get", ["option"])):
        method = getattr(Compiled, name, None)
        assert method is not None, f"zmq.backend.Socket.{name} is gone (pyzmq {zmq.__version__})"
        try:
            names = list(inspect.signature(method).parameters)[1:]  # after self
        except (TypeError, ValueError):  # a compiled method without a signature: the call test decides
            continue
        assert names[:len(params)] == params, f"zmq.backend.Socket.{name}{names} (pyzmq {zmq.__version__})"


@pytest.fixture
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.ROUTER)
    for s in (a, b):
        s.setsockopt(zmq.LINGER, 0)
    b.bind("inproc://t")
    a.setsockopt(zmq.IDENTITY, b"w")
    a.connect("inproc://t")
    yield a, b
    a.close()
    b.close()
    ctx.term()


def test_frames_round_trip_small_copied_and_large_by_reference(pair):
    dealer, router = pair
    big = b"x" * (ZERO_COPY_BYTES + 1)
    assert not readable(router)
    send_frames(dealer, [b"index", b"body", big])
    assert router.poll(2000)
    assert readable(router)
    frames = recv_frames(router)  # frames, as the broker takes them
    assert [f.bytes for f in frames] == [b"w", b"index", b"body", big]
    send_frames(router, [b"w", frames[2], frames[3]])  # passed on as they came
    assert dealer.poll(2000)
    assert recv_frames(dealer, copy=True) == [b"body", big]
    with pytest.raises(zmq.Again):
        recv_frames(dealer, copy=True)
