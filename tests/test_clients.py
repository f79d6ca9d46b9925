"""Issue 6: many clients, slow clients and bad input never hurt anyone else.

Real indibroker processes, test drivers that stream BLOBs or misbehave, raw TCP clients.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import psutil
import pytest
from support import RawClient, clients, is_, member, ping, wait_until

PYSCRIPTS = Path(__file__).parent / "pyscripts"
STREAMER = str(PYSCRIPTS / "blob_streamer.py")
BAD = str(PYSCRIPTS / "bad_driver.py")
MB = 1024 * 1024


def tree_rss(b) -> int:
    total = 0
    for p in b.tree():
        try:
            if "blob_streamer" not in " ".join(p.cmdline()):
                total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def seqs(c: RawClient) -> list[int]:
    return [int(float(member(e, "N"))) for e in c.elements if is_("setNumberVector", "Streamer", "SEQ")(e)]


def seq_at_least(n: int):
    """The Streamer's SEQ number n or a later one: each comes right after the BLOB of that number."""
    return lambda e: is_("setNumberVector", "Streamer", "SEQ")(e) and int(float(member(e, "N"))) >= n


def stalled_client(port: int, blobs: bool = True) -> socket.socket:
    """A client that asks for everything and then never reads: its receive buffer stays small."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b'<getProperties version="1.7"/>')
    if blobs:
        s.sendall(b'<enableBLOB device="Streamer">Also</enableBLOB>')
    return s


def closed_by_peer(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        while True:
            data = s.recv(1 << 20)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_stalled_client_is_disconnected_and_others_get_everything(broker_factory):
    # -d above -m: BLOBs are never dropped first, so the queue reaches the disconnect threshold.
    b = broker_factory("--exdriver", STREAMER, "-d", "64", "-m", "16",
                       env={"STREAM_BLOB_BYTES": "500000", "STREAM_INTERVAL": "0.02"})
    with clients(b.port, 1) as (good,):
        good.send('<getProperties version="1.7"/><enableBLOB device="Streamer">Also</enableBLOB>')
        good.wait_for(is_("setBLOBVector", "Streamer"), 20)
        base_rss = tree_rss(b)
        stalled = stalled_client(b.port)
        try:
            wait_until(lambda: good.pump(0.05) >= 0 and "too slow" in b.log(), 60,
                       what="the stalled client to be dropped")
            wait_until(lambda: good.pump(0.05) >= 0 and closed_by_peer(stalled), 10,
                       what="the stalled socket to be closed")
            peak = tree_rss(b)
        finally:
            stalled.close()
        # The stream goes on for the good client after the drop.
        good.wait_for(seq_at_least(seqs(good)[-1] + 10), 20, what="the stream after the drop")
        got = seqs(good)
        assert got == list(range(got[0], got[0] + len(got))), "the good client lost messages"
        assert good.count("setBLOBVector") >= len(got) - 2
        assert not good.closed
        assert peak - base_rss < 80 * MB, (peak - base_rss) / MB  # bounded by -m, not by the stream


def test_slow_client_loses_streaming_blobs_not_its_connection(broker_factory):
    b = broker_factory("--exdriver", STREAMER, "-d", "2", "-m", "16",
                       env={"STREAM_BLOB_BYTES": "500000", "STREAM_INTERVAL": "0.02"})
    with clients(b.port, 1) as (good,):
        good.send('<getProperties version="1.7"/><enableBLOB device="Streamer">Also</enableBLOB>')
        good.wait_for(is_("setBLOBVector", "Streamer"), 20)
        stalled = stalled_client(b.port)
        try:
            wait_until(lambda: good.pump(0.05) >= 0 and "streaming BLOB(s) dropped" in b.log(), 30,
                       what="BLOBs dropped for the slow one")
            # Then three times -m (16 MB) of BLOBs for the stalled one (about 670 kB each on the
            # wire): queued rather than dropped, they would have had it disconnected. The gateway
            # hands SEQ n to the good client after BLOB n to both.
            good.wait_for(seq_at_least(seqs(good)[-1] + 75), 60, what="75 more BLOBs through the gateway")
            assert "too slow" not in b.log()
            assert not closed_by_peer(stalled)
        finally:
            stalled.close()
        got = seqs(good)
        assert got == list(range(got[0], got[0] + len(got)))


def slow_reader(port: int, blobs: int, timeout: float, chunk: int = 64 * 1024, pause: float = 0.003) -> bytes:
    """A client that wants the BLOBs and reads them steadily but slowly (about 20 MB/s), until it
    holds `blobs` whole BLOBs (or `timeout` seconds have passed)."""
    end_tag = b"</setBLOBVector>"
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b'<getProperties version="1.7"/><enableBLOB device="Streamer">Also</enableBLOB>')
    got = bytearray()
    done = 0
    end = time.monotonic() + timeout
    try:
        while done < blobs and time.monotonic() < end:
            data = s.recv(chunk)
            if not data:
                break
            # Count end tags that end in this chunk (the tail is shorter than the tag: none twice).
            done += (bytes(got[-(len(end_tag) - 1):]) + data).count(end_tag)
            got += data
            time.sleep(pause)
    finally:
        s.close()
    return bytes(got)


def test_a_blob_flood_is_paced_to_its_reader_not_dropped(broker_factory):
    # The driver writes BLOBs as fast as its pipe takes them; the one client reads ~20 MB/s.
    # Read at full speed, most BLOBs would be dropped for being over -d (5 MB) behind; paced, the
    # driver waits on its pipe and the client gets every one.
    b = broker_factory("--exdriver", STREAMER, env={"STREAM_BLOB_BYTES": "2000000", "STREAM_INTERVAL": "0"})
    data = slow_reader(b.port, blobs=16, timeout=60)
    blobs = [int(n) for n in re.findall(rb'<oneBLOB name="IMAGE" size="\d+" format=".bin" seq="(\d+)"', data)]
    numbers = [int(n) for n in re.findall(rb'name="SEQ" state="Ok"><oneNumber name="N">(\d+)<', data)]
    assert len(blobs) >= 16, len(blobs)
    assert blobs == list(range(blobs[0], blobs[0] + len(blobs))), "BLOBs were dropped"
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    # A BLOB held back for its turn holds back what the driver wrote after it: each BLOB's number
    # (written right after it) arrives after it and before the next BLOB.
    events = [(b"B", int(bl)) if bl else (b"N", int(n))
              for bl, n in re.findall(rb'seq="(\d+)"|<oneNumber name="N">(\d+)<', data)]
    first = events.index((b"B", blobs[0]))
    expect = [(kind, k) for k in blobs for kind in (b"B", b"N")]
    assert events[first:first + len(expect) - 1] == expect[:-1]
    assert "streaming BLOB(s) dropped" not in b.log()


def test_a_stalled_blob_client_does_not_hold_the_driver_back_for_others(broker_factory):
    # Pacing follows clients that are draining: one that has stopped reading must not make the
    # driver wait for it, or a client of the same device's numbers would see them slow to a trickle.
    b = broker_factory("--exdriver", STREAMER, env={"STREAM_BLOB_BYTES": "500000", "STREAM_INTERVAL": "0.02"})
    with clients(b.port, 1) as (numbers,):
        numbers.send('<getProperties version="1.7"/>')  # no BLOBs
        numbers.wait_for(is_("setNumberVector", "Streamer", "SEQ"), 20)
        stalled = stalled_client(b.port)
        try:
            # The stalled one fills its buffers and falls behind: its BLOBs are being dropped (it
            # stops counting as draining a second after it last took bytes).
            wait_until(lambda: numbers.pump(0.05) >= 0 and "streaming BLOB(s) dropped" in b.log(), 30,
                       what="the stalled client to fall behind")
            mark = len(seqs(numbers))
            # 50 a second are sent: 100 take 2 s. Held back by a pause per BLOB (at most 0.5 s,
            # workers/exdriver.py MAX_PAUSE) they would take 50 s.
            wait_until(lambda: numbers.pump(0.05) >= 0 and len(seqs(numbers)) - mark >= 100, 25,
                       what="100 numbers at (nearly) the driver's pace")
            got = seqs(numbers)[mark:]
        finally:
            stalled.close()
    assert got == list(range(got[0], got[0] + len(got)))


@pytest.mark.parametrize("bad", [
    b"\x00\xff\xfe\x01binary garbage",
    b'<newNumberVector device="x" name="y"><oneNumber name="n">1</oneText></newNumberVector>',
    b'<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]><getProperties version="1.7"/>',
    b'<getProperties version="1.7" device="&lol2;"/>',
    b"<newTextVector>" + b"<a>" * 100,
    b'<newTextVector device="x" name="y"><oneText name="t">' + b"x" * (2 * MB),
], ids=["binary", "malformed", "entity-bomb", "undefined-entity", "deep-nesting", "oversize"])
def test_bad_client_input_drops_only_the_offender(broker_factory, bad):
    b = broker_factory("--exdriver", STREAMER, env={"STREAM_BLOB_BYTES": "1000", "STREAM_INTERVAL": "0.05"},
                       start=False)
    b.args += ["--config", str(write_config(b, "client_max_element_mb = 1.0\n"))]
    b.start()
    with clients(b.port, 2) as (good, offender):
        good.send('<getProperties version="1.7"/>')
        good.wait_for(is_("setNumberVector", "Streamer", "SEQ"), 20)
        offender.send(bad)
        offender.wait_closed(10)
        mark = len(good.elements)
        good.wait_for(is_("setNumberVector", "Streamer", "SEQ"), 10, start=mark)
        assert not good.closed
        assert "malformed input" in b.log()


def test_half_a_message_then_silence_harms_nobody(broker_factory):
    b = broker_factory("--exdriver", STREAMER, env={"STREAM_BLOB_BYTES": "1000", "STREAM_INTERVAL": "0.05"})
    with clients(b.port, 2) as (good, half):
        good.send('<getProperties version="1.7"/>')
        half.send('<getProperties version="1.7"/><newNumberVector device="Streamer" name="SEQ"><oneNum')
        for _ in range(3):
            mark = len(good.elements)
            good.wait_for(is_("setNumberVector", "Streamer", "SEQ"), 10, start=mark)
        half.wait_for(is_("setNumberVector", "Streamer", "SEQ"), 10,
                      what="the half-message client still served")  # and harmless
        assert not good.closed and not half.closed


def write_config(b, text: str) -> Path:
    path = b.log_path.parent / f"extra-{b.port}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("kind", ["garbage", "malformed", "bomb", "deep", "oversize"])
def test_bad_driver_output_is_skipped_and_harms_nobody(broker_factory, kind):
    b = broker_factory(start=False, env={"BAD_KIND": kind, "STREAM_BLOB_BYTES": "1000", "STREAM_INTERVAL": "0.05"})
    b.args += ["--config", str(write_config(b, "driver_max_element_mb = 1.0\n")),
               "--exdriver", BAD, "--exdriver", STREAMER]
    b.start()
    with clients(b.port, 1) as (c,):
        c.send('<getProperties version="1.7"/>')
        c.wait_for(is_("setNumberVector", "Bad", "TICK"), 20)
        first = c.wait_for(is_("setNumberVector", "Streamer", "SEQ"), 20)
        mark = len(c.elements)
        # The bad driver's good output still gets through, and the other driver kept going.
        wait_until(lambda: c.pump(0.2) >= 0 and c.count("setNumberVector", "Bad", "TICK", start=mark) >= 5, 15,
                   what="ticks after bad output")
        c.wait_for(seq_at_least(int(float(member(first, "N"))) + 1), 15, start=mark, what="the other driver")
        rows = {r["name"]: r for r in b.status() if r["role"] == "driver"}
        assert all(r["restarts"] == 0 for r in rows.values())
        assert "sent bad XML" in b.log()
        for p in b.tree():
            if "bad_driver" in " ".join(p.cmdline()):
                assert p.memory_info().rss < 200 * MB


def test_gateways_share_the_port_and_all_clients_are_served(broker_factory):
    b = broker_factory("--gateways", "2", "--exdriver", STREAMER,
                       env={"STREAM_BLOB_BYTES": "1000", "STREAM_INTERVAL": "0.05"})
    gateways = wait_until(lambda: [r["pid"] for r in b.status() if r["role"] == "gateway" and r["pid"]], 10)
    assert len(gateways) == 2
    with clients(b.port, 16) as cs:
        for c in cs:
            c.send('<getProperties version="1.7"/>')
        for c in cs:
            c.wait_for(is_("setNumberVector", "Streamer", "SEQ"), 20)
        ports = {c.sock.getsockname()[1]: c for c in cs}
        served_by = {}
        for pid in gateways:
            for conn in psutil.Process(pid).net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port in ports:
                    served_by[conn.raddr.port] = pid
        assert set(served_by) == set(ports)
        assert set(served_by.values()) == set(gateways), "one gateway served every client"
        marks = [len(c.elements) for c in cs]
        for c, mark in zip(cs, marks, strict=True):
            c.wait_for(is_("setNumberVector", "Streamer", "SEQ"), 10, start=mark)
            got = seqs(c)
            assert got == list(range(got[0], got[0] + len(got)))


def test_questions_about_unknown_devices_cost_bounded_memory(broker_factory):
    b = broker_factory()
    gateway = next(p for p in b.tree() if p.name().startswith("ib-gateway"))
    with clients(b.port, 2) as (spammer, later):
        spammer.send(b'<getProperties version="1.7"/>')
        spammer.wait_for(is_("defSwitchVector", "LED"), 20)
        before = gateway.memory_info().rss
        for chunk in range(20):
            spammer.send(b"".join(b'<getProperties version="1.7" device="nobody-%d"/>' % (chunk * 5000 + i)
                                  for i in range(5000)))
            ping(spammer)  # answered once the gateway has handled this chunk
        later.send(b'<getProperties version="1.7"/>')
        later.wait_for(is_("defSwitchVector", "LED"), 20)  # still answered
        assert not spammer.closed
        assert gateway.memory_info().rss - before < 40 * MB
