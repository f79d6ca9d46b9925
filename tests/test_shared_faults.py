"""Shared BLOB buffers when things go wrong: every buffer is closed once, whatever fails, and no
peer can make a process of ours open a descriptor it did not name itself. (Found by a review of
the shared-memory BLOBs; each test failed before its fix.)"""

from __future__ import annotations

import base64
import dataclasses
import os
import socket
from collections.abc import Iterator

import pytest
from fakes import FakeBackbone, config, runtime_dir, turn_until
from test_exdriver_inprocess import driver, fake, flow, make, started, turn  # noqa: F401  (fixture)
from test_hosts_inprocess import as_host
from test_inprocess_broker_arbiter import Backbone, registered

from indibroker.broker import wire
from indibroker.broker.hosts import host_rows
from indibroker.broker.listening import local_address
from indibroker.workers import devicemodel, sharedblob
from indibroker.workers.gateway import Gateway
from indibroker.workers.reactor import Reactor

CCD = "CCD"
SETB = b'<setBLOBVector device="CCD" name="IMG"><oneBLOB name="I" size="4" format=".f" shared="1:2:3"/></setBLOBVector>'
DEFB = b'<defBLOBVector device="CCD" name="IMG"><defBLOB name="I"/></defBLOBVector>'
ATTACHED = ('<setBLOBVector device="{dev}" name="IMG" state="Ok"><oneBLOB name="I" size="4" format=".f" '
            'attached="true"/></setBLOBVector>\n')


def memfds() -> int:
    """Our own open memfds (the gateway's and the test's buffers are in this process)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
        except OSError:
            pass
    return n


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def memfd(size: int = 4) -> int:
    fd = os.memfd_create("test-blob", os.MFD_CLOEXEC)
    os.write(fd, b"x" * size)
    return fd


# -- the broker: DONEs for shared BLOBs ---------------------------------------------------------
@pytest.fixture
def bb() -> Iterator[Backbone]:
    b = Backbone()
    yield b
    b.close()


def dones(peer) -> list:
    return [m for m in peer.take() if m[0] == wire.FLOW and m[3] == wire.FLOW_DONE]


def sub(bb: Backbone, peer, device: str = "") -> None:
    peer.say(wire.SUB, payload=wire.encode_interests([(device, "", wire.WANT_PLAIN | wire.WANT_BLOB)]))
    bb.settle()


def test_a_worker_snooping_its_own_drivers_blobs_does_not_hold_back_its_dones(bb) -> None:
    owner = registered(bb, bb.peer("driver", "exdriver-0"), [CCD])
    gw = registered(bb, bb.peer("gateway", "gateway-0"))
    sub(bb, gw)
    sub(bb, owner, CCD)  # another driver in the same worker snoops the camera
    owner.say(wire.DEF, CCD, "IMG", b"", DEFB)
    bb.settle()
    gw.take()
    owner.take()
    for _ in range(3):
        owner.say(wire.SET, CCD, "IMG", wire.FLAG_SHARED, SETB)
        bb.settle()
        gw.say(wire.FLOW, CCD, "", wire.FLOW_DONE)
        owner.say(wire.FLOW, CCD, "", wire.FLOW_DONE)
        bb.settle()
    assert len(dones(owner)) == 3


def test_a_done_after_its_drivers_exit_still_counts(bb) -> None:
    owner = registered(bb, bb.peer("driver", "exdriver-0"), [CCD])
    g0 = registered(bb, bb.peer("gateway", "gateway-0"))
    g1 = registered(bb, bb.peer("gateway", "gateway-1"))
    sub(bb, g0)
    sub(bb, g1)
    owner.say(wire.DEF, CCD, "IMG", b"", DEFB)
    bb.settle()
    owner.say(wire.SET, CCD, "IMG", wire.FLAG_SHARED, SETB)
    bb.settle()
    g0.say(wire.FLOW, CCD, "", wire.FLOW_DONE)
    bb.settle()
    owner.say(wire.DEL, CCD, "", b"", b'<delProperty device="CCD"/>')  # the driver crashed
    bb.settle()
    g1.say(wire.FLOW, CCD, "", wire.FLOW_DONE)  # its DONE comes after the DEL
    bb.settle()
    assert len(dones(owner)) == 1  # told to the worker that sent it, owner of nothing now
    g1.say(wire.SUB, payload=wire.encode_interests([("", "", wire.WANT_PLAIN)]))
    owner.say(wire.DEF, CCD, "IMG", b"", DEFB)  # restarted
    bb.settle()
    owner.take()
    for _ in range(5):
        owner.say(wire.SET, CCD, "IMG", wire.FLAG_SHARED, SETB)
        bb.settle()
        g0.say(wire.FLOW, CCD, "", wire.FLOW_DONE)
        bb.settle()
    assert len(dones(owner)) == 5


def test_no_shared_buffer_from_a_host_or_without_a_device_is_routed(bb) -> None:
    local = registered(bb, bb.peer("gateway", "gateway-0"))
    sub(bb, local)
    far = registered(bb, bb.peer("driver", "pier-exdriver"), ["Scope"])
    as_host(bb, far, "pier")
    mine = registered(bb, bb.peer("driver", "exdriver-0"), [CCD])
    bb.settle()
    local.take()
    evil = (b'<setBLOBVector name="X"><oneBLOB name="I" size="64" format=".f" attached="true" '
            b'shared="1234:5:678"/></setBLOBVector>')
    far.say(wire.SET, "Scope", "X", wire.FLAG_SHARED, evil)
    far.say(wire.SET, "", "X", wire.FLAG_SHARED, evil)
    far.say(wire.MSG, "", "", wire.FLAG_SHARED, evil)
    mine.say(wire.SET, "", "X", wire.FLAG_SHARED, evil)
    bb.settle()
    assert [m for m in local.take() if m[3] == wire.FLAG_SHARED] == []


def test_a_hosts_report_of_odd_shapes_makes_plain_rows() -> None:
    reports = [{"role": "exdriver", "name": "exdriver-0", "pid": "1",
                "drivers": [{"name": "indi_x", "pid": 2, "state": 3, "devices": [1, "Scope"], "restarts": "x"}]},
               {"role": "gateway", "name": "gateway-0", "clients": "many"}, "not a dict"]
    rows = host_rows({"pier": {"link": "connected", "since": "0", "workers": reports}})
    devicemodel.build(rows, devicemodel.Names(), version="x", address="*:7624")  # no exception
    driver_row = next(r for r in rows if r["role"] == "driver")
    assert driver_row["devices"] == ["Scope"] and driver_row["pid"] == 2 and driver_row["restarts"] == 0
    assert sum(r.get("clients", 0) for r in rows if r.get("role") == "gateway") == 0


# -- the driver's worker: the buffers it holds ------------------------------------------------
def test_a_blob_in_flight_when_its_driver_exits_is_closed_by_its_done(make) -> None:  # noqa: F811
    w = make(driver())
    d = started(w)
    cam = w.drivers["cam"]
    fd = memfd()
    cam.process.buffers.append(fd)
    d.say(ATTACHED.format(dev="CCD"))
    turn(w, lambda: any(m.flags == wire.FLAG_SHARED for m in fake(w).of(wire.SET, "CCD")), "the shared BLOB sent")
    d.exit(0)
    turn(w, lambda: fake(w).of(wire.DEL, "CCD"), "the exit handled")
    flow(w, wire.FLOW_DONE)
    assert not is_open(fd) and cam.held_count == 0


def test_a_shared_blob_without_a_device_is_dropped_and_its_buffer_closed(make) -> None:  # noqa: F811
    w = make(driver())
    d = started(w)
    cam = w.drivers["cam"]
    fd = memfd()
    cam.process.buffers.append(fd)
    d.say(ATTACHED.replace(' device="{dev}"', "") + '<message device="CCD" message="after"/>\n')
    turn(w, lambda: fake(w).of(wire.MSG, "CCD"), "the next message, still handled")
    assert not is_open(fd) and cam.held_count == 0
    assert not [m for m in fake(w).sent if m.flags == wire.FLAG_SHARED]


# -- the gateway: buffers queued for local clients ----------------------------------------------
@pytest.fixture
def gw(tmp_path) -> Iterator[Gateway]:
    path = f"/tmp/ib-test-{os.getpid()}-{tmp_path.name}"
    settings = dataclasses.replace(config().gateway_settings(0), local_socket=path)
    g = Gateway(settings, runtime=runtime_dir(tmp_path), reactor=Reactor())
    g.connect(FakeBackbone(worker=g.on_backbone))
    g.setup()
    g.test_path = path  # type: ignore[attr-defined]
    yield g
    g.shutdown()
    g.reactor.close()


def b64blob(*texts: bytes) -> bytes:
    ones = b"".join(b'<oneBLOB name="I%d" size="%d" format=".f">' % (i, len(t)) + t + b"</oneBLOB>"
                    for i, t in enumerate(texts))
    return b'<setBLOBVector device="CCD" name="IMG">' + ones + b"</setBLOBVector>"


def test_a_local_client_that_stops_reading_gives_up_its_queued_buffers(gw) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(local_address(gw.test_path))  # type: ignore[attr-defined]
    s.sendall(b'<getProperties version="1.7"/><enableBLOB device="CCD">Also</enableBLOB>')
    turn_until(gw.reactor, lambda: any(i[2] & wire.WANT_BLOB for i in gw.interests()), what="blob interest")
    s.shutdown(socket.SHUT_RD)  # our sendmsg gets EPIPE, and there is no EOF to read
    before = memfds()
    for _ in range(5):
        gw.on_backbone(wire.SET, "CCD", "IMG", wire.FLAG_BLOB, b64blob(base64.b64encode(b"x" * 1000)))
        for _ in range(3):
            gw.reactor.turn(max_wait=0.01)
    assert memfds() == before
    s.close()


def test_to_attached_closes_what_it_made_when_a_later_blob_fails() -> None:
    before = memfds()
    with pytest.raises(sharedblob.SharedBufferError):
        sharedblob.to_attached(b64blob(base64.b64encode(b"x" * 1000), b"abcde"))  # the 2nd: bad padding
    assert memfds() == before


def test_a_shared_message_without_a_device_opens_nothing(gw, tmp_path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"TOP-SECRET-KEY-MATERIAL")
    fd = os.open(secret, os.O_RDONLY)
    tcp = socket.create_connection(gw.connections.admission.listener.getsockname()[:2])
    tcp.sendall(b'<getProperties version="1.7"/><enableBLOB>Also</enableBLOB>')
    turn_until(gw.reactor, lambda: len(gw.clients) == 1 and gw.interests(), what="client")
    payload = (b'<setBLOBVector name="X"><oneBLOB name="I" size="23" format=".f" attached="true" shared="%s"/>'
               b'</setBLOBVector>' % sharedblob.reference(fd).encode())
    gw.on_backbone(wire.SET, "", "X", wire.FLAG_SHARED, payload)
    got = b""
    tcp.settimeout(0.05)
    for _ in range(20):
        gw.reactor.turn(max_wait=0.01)
        try:
            got += tcp.recv(65536)
        except TimeoutError:
            pass
    assert base64.b64encode(b"TOP-SECRET-KEY-MATERIAL") not in got
    tcp.close()
    os.close(fd)
