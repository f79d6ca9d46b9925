"""BLOBs in shared memory, end to end, with libindi's CCD simulator on its socketpair.

The driver hands each frame over as a sealed memfd; its worker keeps it open and names it; the
gateway encodes it once for TCP clients and passes the buffer itself to local-socket clients
(workers/sharedblob.py). Both kinds of client must get the same, whole frames; the buffers must
be closed once taken (by every consumer, or when one dies); and BLOB pacing must still pace.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support import Broker, RawClient, new_vector, wait_until

pytestmark = pytest.mark.timeout(120)

CCD = "CCD Simulator"


@pytest.fixture
def ccd(tmp_path: Path) -> Iterator[tuple[Broker, str]]:
    local = f"/tmp/ib-test-{os.getpid()}-{tmp_path.name}"
    broker = Broker("--no-demo", "--exdriver", "indi_simulator_ccd", "--local-socket", local,
                    runtime_dir=tmp_path / "run", log_dir=tmp_path)
    with broker:
        yield broker, local


def _connected(broker: Broker, local: str) -> tuple[RawClient, RawClient]:
    """A TCP client and a local-socket client, both taking the CCD's BLOBs; the CCD connected."""
    tcp, loc = RawClient(broker.port), RawClient(local=local)
    for client in (tcp, loc):
        client.send("<getProperties version='1.7'/>")
        client.wait_for(lambda e: e.get("name") == "CONNECTION" and e.get("device") == CCD, 15)
        client.send(f"<enableBLOB device='{CCD}'>Also</enableBLOB>")
    tcp.send(new_vector("Switch", CCD, "CONNECTION", {"CONNECT": "On", "DISCONNECT": "Off"}))
    tcp.wait_for(lambda e: e.get("name") == "CCD_EXPOSURE" and e.tag.startswith("def"), 15)
    return tcp, loc


def _frames(client: RawClient) -> list[bytes]:
    """Every frame the client has received (reading what has arrived first)."""
    client.pump(0.02)
    return [client.blobs(i)[0] for i, e in enumerate(client.elements) if e.tag == "setBLOBVector"]


def _worker(broker: Broker, prefix: str) -> psutil.Process:
    return next(p for p in broker.tree() if p.name().startswith(prefix))


def _memfds(proc: psutil.Process) -> int:
    """The shared buffers (memfds) a process holds open."""
    count = 0
    for fd in os.listdir(f"/proc/{proc.pid}/fd"):
        try:
            count += os.readlink(f"/proc/{proc.pid}/fd/{fd}").startswith("/memfd:")
        except OSError:
            pass
    return count


def test_exposures_reach_tcp_and_local_clients_whole_and_alike(ccd: tuple[Broker, str]) -> None:
    broker, local = ccd
    tcp, loc = _connected(broker, local)
    for n in range(1, 4):
        tcp.send(new_vector("Number", CCD, "CCD_EXPOSURE", {"CCD_EXPOSURE_VALUE": "0.05"}))
        for client in (tcp, loc):
            wait_until(lambda c=client, n=n: len(_frames(c)) >= n, 20, what=f"frame {n}")
    tcp_frames, loc_frames = _frames(tcp), _frames(loc)
    assert tcp_frames == loc_frames  # the same bytes, through base64 on one side, a buffer on the other
    for i, frame in enumerate(tcp_frames):
        assert frame.startswith(b"SIMPLE  =") and len(frame) % 2880 == 0  # a whole FITS file
        element = [e for e in tcp.elements if e.tag == "setBLOBVector"][i]
        one = element.root[0]
        assert int(one.get("size")) == len(frame)
        assert one.get("attached") is None and one.get("shared") is None  # indiserver's TCP form
    loc_blob = next(e for e in loc.elements if e.tag == "setBLOBVector").root[0]
    assert loc_blob.get("attached") == "true" and loc_blob.get("shared") is None and not loc_blob.text
    assert len({hashlib.sha256(f).digest() for f in tcp_frames}) == 3  # three exposures, three frames
    # Every buffer was taken by the gateway, then closed by the driver's worker and the gateway.
    wait_until(lambda: _memfds(_worker(broker, "ib-exdriver")) == 0, 10, what="the worker's buffers closed")
    wait_until(lambda: _memfds(_worker(broker, "ib-gateway")) == 0, 10, what="the gateway's buffers closed")


def _stream(tcp: RawClient, on: bool) -> None:
    tcp.send(new_vector("Switch", CCD, "CCD_VIDEO_STREAM",
                        {"STREAM_ON": "On" if on else "Off", "STREAM_OFF": "Off" if on else "On"}))


def test_video_stream_reaches_both_clients_and_buffers_do_not_pile_up(ccd: tuple[Broker, str]) -> None:
    broker, local = ccd
    tcp, loc = _connected(broker, local)
    worker = _worker(broker, "ib-exdriver")
    _stream(tcp, True)
    most = 0
    for client in (tcp, loc):
        def enough(c: RawClient = client) -> bool:
            nonlocal most
            most = max(most, _memfds(worker))
            _frames(tcp if c is loc else loc)  # both keep reading
            return len(_frames(c)) >= 15
        wait_until(enough, 30, what="15 streamed frames")
    _stream(tcp, False)
    tcp_frames, loc_frames = _frames(tcp), _frames(loc)
    count = min(len(tcp_frames), len(loc_frames))
    assert count >= 15 and tcp_frames[:count] == loc_frames[:count]  # same frames, same order
    sizes = [int(e.root[0].get("size")) for e in tcp.elements if e.tag == "setBLOBVector"]
    assert [len(f) for f in tcp_frames] == sizes and min(sizes) > 1_000_000  # whole frames
    assert most <= 16, f"the worker held {most} buffers at once: DONEs do not close them"
    wait_until(lambda: _memfds(worker) == 0, 10, what="the worker's buffers closed after the stream")


def _status(broker: Broker, name: str) -> dict:
    (path,) = glob.glob(str(broker.runtime_dir / "*" / "run-*" / "status" / f"{name}.json"))
    return json.loads(Path(path).read_text())


def test_a_stalled_client_paces_the_stream_and_a_dead_gateway_frees_its_buffers(
        ccd: tuple[Broker, str]) -> None:
    broker, local = ccd
    tcp, loc = _connected(broker, local)
    loc.close()  # the only taker of BLOBs left is a TCP client that stops reading
    worker = _worker(broker, "ib-exdriver")
    _stream(tcp, True)
    wait_until(lambda: _status(broker, "exdriver-0")["drivers"][0]["pauses"] > 0, 30,
               what="the driver paused (BLOB pacing)")
    assert _memfds(worker) <= 16
    gateway = _worker(broker, "ib-gateway")
    gateway.send_signal(signal.SIGKILL)  # its buffers, and its DONEs, die with it
    wait_until(lambda: any(p.name().startswith("ib-gateway") and p.pid != gateway.pid for p in broker.tree()),
               15, what="the gateway restarted")
    wait_until(lambda: _memfds(worker) <= 2, 15, what="the dead gateway's buffers released by the worker")


def test_indilibs_own_client_on_the_local_socket_gets_the_frame_a_tcp_client_gets(ccd: tuple[Broker, str]) -> None:
    """PyIndi (pyindi-client: libindi's BaseClient, which connects to "localhost:/path" over the
    local socket and maps attached buffers) receives the same exposure as a raw TCP client."""
    import threading

    PyIndi = pytest.importorskip("PyIndi")
    broker, local = ccd

    class Client(PyIndi.BaseClient):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.frames: list[bytes] = []
            self.got = threading.Event()

        def updateProperty(self, prop) -> None:  # noqa: N802 - libindi's name
            if prop.getType() == PyIndi.INDI_BLOB:
                for blob in PyIndi.PropertyBlob(prop):
                    self.frames.append(bytes(blob.getblobdata()))
                self.got.set()

    tcp, loc = _connected(broker, local)
    loc.close()
    client = Client()
    client.setServer(f"localhost:{local}", broker.port)
    assert client.connectServer()
    try:
        wait_until(lambda: client.getDevice(CCD) and client.getDevice(CCD).getNumber("CCD_EXPOSURE"), 15,
                   what="PyIndi sees the CCD")
        client.setBLOBMode(PyIndi.B_ALSO, CCD, None)
        # Its enableBLOB goes out on its own thread, with nothing to tell when it is in effect:
        # exposures until one reaches it (bounded), each also taken by the TCP client.
        for _ in range(10):
            tcp.send(new_vector("Number", CCD, "CCD_EXPOSURE", {"CCD_EXPOSURE_VALUE": "0.05"}))
            if client.got.wait(3):
                break
        assert client.frames, "PyIndi got no frame over the local socket"
        frame = client.frames[-1]
        assert frame.startswith(b"SIMPLE  =") and len(frame) % 2880 == 0
        wait_until(lambda: frame in _frames(tcp), 20, what="the same frame at the TCP client")
    finally:
        client.disconnectServer()
