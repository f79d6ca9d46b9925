"""Several hosts, one installation (docs/hosts.md): a host joins the central indibroker over
TCP with CURVE, its drivers supervised at home and served to every client of the central server.

Real processes on both sides, each instance with its own runtime directory. Where the machine
allows it the joined host lives in a network namespace joined by a veth pair, so that a
partition is a link brought down (silence, not a reset) and healed by bringing it up.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
from support import (
    Broker,
    IndiServer,
    Joined,
    Netns,
    RawClient,
    fits_header,
    free_port,
    getprop,
    is_,
    make_host_keys,
    new_vector,
    port_open,
    setprop,
    wait_until,
)

from indibroker.broker import wire

SCOPE, CCD, FOCUS = "Telescope Simulator", "CCD Simulator", "Focuser Simulator"
BEAT = 0.5  # the joined host's heartbeat: lost after three silent ones
NETNS = Netns.available()


@dataclass
class Site:
    central: Broker
    host: Joined
    keys: dict[str, Path]
    netns: Netns | None
    endpoint: str


@pytest.fixture
def home(tmp_path) -> dict[str, str]:
    """Simulators keep their config in ~/.indi: a home of the test's own."""
    (tmp_path / "home").mkdir()
    return {"HOME": str(tmp_path / "home")}


@contextlib.contextmanager
def site(tmp_path: Path, home: dict[str, str], *host_args: str, netns: bool = NETNS,
         gateway: bool = False) -> Iterator[Site]:
    """A central server (its own focuser) and host "pier" joined to it with two simulators."""
    keys = make_host_keys(tmp_path / "keys", hosts=("pier", "stranger"), listed=("pier",))
    ns = Netns() if netns else None
    with contextlib.ExitStack() as stack:
        if ns is not None:
            stack.enter_context(ns)
        address = ns.central_ip if ns else "127.0.0.1"
        endpoint = f"tcp://{address}:{free_port()}"
        central = Broker("--exdriver", "indi_simulator_focus", "--hosts-endpoint", endpoint,
                         "--keys", str(keys["server"]), log_dir=tmp_path, runtime_dir=tmp_path / "central",
                         env=home)
        stack.enter_context(central)
        args = ["--exdriver", "indi_simulator_telescope", "--exdriver", "indi_simulator_ccd",
                "--host-heartbeat", str(BEAT), *host_args]
        if gateway:
            args += ["--host", "0.0.0.0"]
        host = Joined(endpoint, keys["pier"], "pier", *args, port=free_port() if gateway else None,
                      log_dir=tmp_path, runtime_dir=tmp_path / "pier", netns=ns.name if ns else None, env=home)
        stack.enter_context(host)
        yield Site(central, host, keys, ns, endpoint)


def defined(client: RawClient, devices: set[str], start: int = 0, timeout: float = 20.0) -> None:
    def seen() -> bool:
        client.pump(0.1)
        return devices <= {e.get("device") for e in client.elements[start:] if e.tag.startswith("def")}

    wait_until(seen, timeout, what=f"definitions of {sorted(devices)}")


def test_a_central_client_sees_sets_and_gets_blobs_from_a_joined_host(tmp_path, home):
    """Must-show 1: the host's simulators are served by the central server; a client sets a
    property on one and receives a BLOB from its CCD. A client of the host's own gateway sees
    the central server's devices too; `status` lists the host, its workers and its drivers."""
    with site(tmp_path, home, gateway=True) as s:
        with contextlib.closing(RawClient(s.central.port)) as c:
            c.send('<getProperties version="1.7"/>')
            defined(c, {SCOPE, CCD, FOCUS})
            c.send(f'<enableBLOB device="{CCD}">Also</enableBLOB>')
            c.send(new_vector("Switch", CCD, "CONNECTION", {"CONNECT": "On"}))
            c.wait_for(is_("defNumberVector", CCD, "CCD_EXPOSURE"), 30, what="CCD_EXPOSURE defined")
            c.send(new_vector("Number", CCD, "CCD_EXPOSURE", {"CCD_EXPOSURE_VALUE": "0.2"}))
            blob = c.wait_for(is_("setBLOBVector", CCD), 30, what="a BLOB from the joined host's CCD")
            assert int(blob.root[0].get("size", "0")) > 0
        setprop(s.central.port, f"{SCOPE}.CONNECTION.CONNECT=On")
        wait_until(lambda: getprop(s.central.port, f"{SCOPE}.CONNECTION.*").get(
            f"{SCOPE}.CONNECTION.CONNECT") == "On", 20, what="the telescope connected through the central server")
        if s.netns is not None:  # the host's own gateway, on the host's address: the whole installation
            with contextlib.closing(RawClient(s.host.port, host=s.netns.host_ip)) as h:
                h.send('<getProperties version="1.7"/>')
                defined(h, {SCOPE, CCD, FOCUS})

        def host_rows() -> list[dict] | None:
            rows = [r for r in s.central.status() if r.get("host") == "pier"]
            drivers = [r for r in rows if r["role"] == "driver"]
            ok = rows and rows[0]["role"] == "host" and rows[0]["state"] == "connected" and len(drivers) == 2 \
                and all(r["rss"] and r["pid"] for r in drivers)
            return rows if ok else None

        rows = wait_until(host_rows, 15, what="the joined host in the central server's status")
        assert {r["name"] for r in rows if r["role"] == "driver"} == \
            {"pier/indi_simulator_telescope", "pier/indi_simulator_ccd"}
        assert set(s.host.drivers().values()) == {r["pid"] for r in rows if r["role"] == "driver"}
        text = s.central.cli("status").stdout
        assert "pier" in text and "link connected" in text, text


def test_python_drivers_and_remote_bridges_join_too(tmp_path, home):
    """A joined host serves a Python driver and a remote INDI server's devices as its own."""
    examples = Path(__file__).parent.parent / "docs" / "examples"
    keys = make_host_keys(tmp_path / "keys")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with IndiServer("indi_simulator_dome") as remote, \
            Broker("--no-demo", "--hosts-endpoint", endpoint, "--keys", str(keys["server"]), log_dir=tmp_path,
                   runtime_dir=tmp_path / "central", env=home) as central, \
            Joined(endpoint, keys["pier"], "pier", "--driver", "dew_heater:make_driver",
                   "--remote", f"localhost:{remote.port}", log_dir=tmp_path, runtime_dir=tmp_path / "pier",
                   env={**home, "PYTHONPATH": str(examples)}), \
            contextlib.closing(RawClient(central.port)) as c:
        c.send('<getProperties version="1.7"/>')
        defined(c, {"Dew Heater", "Dome Simulator"}, timeout=30)
        wait_until(lambda: {"host", "exdriver", "remote", "driver"} <= {
            r["role"] for r in central.status() if r.get("host") == "pier"}, 10, what="the host's workers in status")


def test_a_client_at_the_host_gets_blobs_from_a_central_camera(tmp_path, home):
    """The other way: a client of the joined host's gateway receives BLOBs from the central
    server's CCD simulator (in base64: a shared buffer of the central computer means nothing at
    the host, so an instance serving hosts does not share them)."""
    keys = make_host_keys(tmp_path / "keys")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Broker("--exdriver", "indi_simulator_ccd", "--hosts-endpoint", endpoint, "--keys", str(keys["server"]),
                log_dir=tmp_path, runtime_dir=tmp_path / "central", env=home), \
            Joined(endpoint, keys["pier"], "pier", "--exdriver", "indi_simulator_telescope", port=free_port(),
                   log_dir=tmp_path, runtime_dir=tmp_path / "pier", env=home) as host:
        wait_until(lambda: port_open(host.port), 15, what="the host's gateway")
        with contextlib.closing(RawClient(host.port)) as c:
            c.send('<getProperties version="1.7"/>')
            defined(c, {SCOPE, CCD})
            c.send(f'<enableBLOB device="{CCD}">Also</enableBLOB>')
            c.send(new_vector("Switch", CCD, "CONNECTION", {"CONNECT": "On"}))
            c.wait_for(is_("defNumberVector", CCD, "CCD_EXPOSURE"), 30, what="CCD_EXPOSURE defined")
            c.send(new_vector("Number", CCD, "CCD_EXPOSURE", {"CCD_EXPOSURE_VALUE": "0.2"}))
            blob = c.wait_for(is_("setBLOBVector", CCD), 30, what="a BLOB from the central CCD at the host")
            assert "SIMPLE  =" in fits_header(blob)


def _plain_dealer_hello(endpoint: str) -> None:
    """A 'host' without CURVE: a plain DEALER saying HELLO with a device of its own."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, b"pier/driver:plain")
        sock.connect(endpoint)
        payload = wire.hello_payload("driver", "plain", ["Plain Device"], "", 1.0)
        sock.send_multipart([wire.record(wire.header(wire.HELLO), len(payload)), payload])
        time.sleep(0.3)  # what the test observes is the server's log, waited for below
        sock.close(linger=0)
    finally:
        ctx.term()


def test_unknown_keys_and_plain_connections_are_refused_and_logged(tmp_path, home):
    """Must-show 2: a host whose key the central server does not list, and a connection without
    CURVE, are refused; the log says so; none of their devices appears."""
    with site(tmp_path, home, netns=False) as s:
        stranger = Joined(s.endpoint, s.keys["stranger"], "stranger", "--exdriver", "indi_simulator_dome",
                          "--host-heartbeat", str(BEAT), log_dir=tmp_path, runtime_dir=tmp_path / "stranger",
                          env=home)
        with stranger:
            wait_until(lambda: "refused a host connection" in s.central.log() and "unknown key" in s.central.log(),
                       15, what=f"the central log to refuse the stranger:\n{s.central.log()}")
            _plain_dealer_hello(s.endpoint)
            wait_until(lambda: "without CURVE" in s.central.log(), 15,
                       what=f"the central log to refuse a plain connection:\n{s.central.log()}")
            # The dome runs at the stranger's (its own status says so) and reaches nobody here.
            wait_until(lambda: stranger.drivers().get("indi_simulator_dome"), 15, what="the stranger's dome")
            with contextlib.closing(RawClient(s.central.port)) as c:
                c.send('<getProperties version="1.7"/>')
                defined(c, {SCOPE, CCD, FOCUS})
                c.pump(1.0)
                devices = {e.get("device") for e in c.elements}
                assert "Dome Simulator" not in devices and "Plain Device" not in devices, devices
            devices = json.loads(s.central.cli("status", "--json").stdout)[1].get("devices", [])
            assert "Dome Simulator" not in devices and "Plain Device" not in devices
            assert not [r for r in s.central.status() if r.get("host") == "stranger"]


def _impostor(endpoint: str, keys: Path, identity: bytes) -> None:
    """A listed host ("dome", by its key) claiming to be a worker of another host."""
    from indibroker.broker.hosts import JoinLink, secure_client

    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, identity)
        secure_client(sock, JoinLink(endpoint, "dome", str(keys), 1.0))
        sock.connect(endpoint)
        payload = wire.hello_payload("driver", "evil", ["Evil Device"], "", 1.0)
        sock.send_multipart([wire.record(wire.header(wire.HELLO), len(payload)), payload])
        time.sleep(0.3)  # what the test observes is the server's log, waited for below
        sock.close(linger=0)
    finally:
        ctx.term()


def test_a_host_endpoint_that_cannot_be_had_is_tried_again_and_local_service_goes_on(tmp_path, home):
    """The host endpoint's port is taken when the central server starts: its own devices are
    served at once, the error is logged, and hosts join once the port is free."""
    keys = make_host_keys(tmp_path / "keys")
    port = free_port()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    endpoint = f"tcp://127.0.0.1:{port}"
    with Broker("--exdriver", "indi_simulator_focus", "--hosts-endpoint", endpoint, "--keys", str(keys["server"]),
                log_dir=tmp_path, runtime_dir=tmp_path / "central", env=home) as central:
        try:
            wait_until(lambda: "cannot serve joined hosts" in central.log(), 10, what="the endpoint's error logged")
            with contextlib.closing(RawClient(central.port)) as c:
                c.send('<getProperties version="1.7"/>')
                defined(c, {FOCUS})
        finally:
            squatter.close()
        with Joined(endpoint, keys["pier"], "pier", "--exdriver", "indi_simulator_telescope",
                    log_dir=tmp_path, runtime_dir=tmp_path / "pier", env=home):
            wait_until(lambda: SCOPE in central.row("broker").get("devices", []), 20, what="pier's telescope")


def _pids(host: Joined) -> dict[str, int]:
    return wait_until(lambda: (d := host.drivers()) and len(d) == 2 and all(d.values()) and d, 10,
                      what="the joined host's drivers")


@pytest.mark.skipif(not NETNS, reason="network namespaces not permitted here")
def test_a_partition_deletes_the_hosts_devices_and_healing_brings_them_back(tmp_path, home):
    """Must-show 3: the link goes down; within the heartbeat deadline central clients get
    delProperty and a message naming the host; the host's drivers keep running; the link comes
    back and the devices are defined again, nothing restarted."""
    with site(tmp_path, home) as s, contextlib.closing(RawClient(s.central.port)) as c:
        assert s.netns is not None
        c.send('<getProperties version="1.7"/>')
        defined(c, {SCOPE, CCD})
        pids = _pids(s.host)
        mark = len(c.elements)
        s.netns.cut()
        cut = time.monotonic()
        for device in (SCOPE, CCD):
            c.wait_for(is_("delProperty", device), 10, start=mark, what=f"delProperty {device}")
        gone = time.monotonic() - cut
        told = c.wait_for(lambda e: e.tag == "message" and "host pier lost" in (e.get("message") or ""), 5,
                          start=mark, what="a message naming the host")
        assert gone < 3 * BEAT + 2.0, f"devices deleted {gone:.1f} s after the cut"
        assert told.get("device") in (SCOPE, CCD)
        assert _pids(s.host) == pids  # the drivers run on, at home
        # Only the host's devices go (the server device drops the lost host's rows too).
        assert {e.get("device") for e in c.elements[mark:] if e.tag == "delProperty"} - {"indibroker"} == {SCOPE, CCD}
        wait_until(lambda: any(r.get("host") == "pier" and r["state"] == "lost" for r in s.central.status()), 10,
                   what="the host's link lost in status")
        healing = len(c.elements)
        s.netns.heal()
        healed = time.monotonic()
        defined(c, {SCOPE, CCD}, start=healing, timeout=20)
        assert _pids(s.host) == pids
        assert "restarted" not in s.host.log()
        print(f"deleted {gone:.2f} s after the cut; defined again {time.monotonic() - healed:.2f} s after healing")


def test_the_host_registers_again_after_the_central_broker_is_killed(tmp_path, home):
    """Must-show 4: the central broker dies (SIGKILL) and is restarted by its arbiter; the host
    registers again and clients see its devices again, its drivers untouched. The same when the
    whole central server is stopped and started again."""
    with site(tmp_path, home) as s:
        with contextlib.closing(RawClient(s.central.port)) as c:
            c.send('<getProperties version="1.7"/>')
            defined(c, {SCOPE, CCD, FOCUS})
            pids = _pids(s.host)
            broker = s.central.row("broker")["pid"]
            mark = len(c.elements)
            os.kill(broker, signal.SIGKILL)
            defined(c, {SCOPE, CCD, FOCUS}, start=mark, timeout=20)
            assert s.central.row("broker")["pid"] != broker
            assert _pids(s.host) == pids
            assert not c.closed
        s.central.stop()
        again = Broker(*s.central.args, port=s.central.port, log_dir=tmp_path / "again",
                       runtime_dir=tmp_path / "central", env=home)
        (tmp_path / "again").mkdir()
        with again, contextlib.closing(RawClient(again.port)) as c:
            c.send('<getProperties version="1.7"/>')
            defined(c, {SCOPE, CCD, FOCUS}, timeout=20)
            assert _pids(s.host) == pids


def test_a_host_cannot_take_a_device_another_source_owns(tmp_path, home):
    """One source per device: a second host (listed) serving a telescope of the same name is
    refused that device, and the first host's stays served."""
    keys = make_host_keys(tmp_path / "keys", hosts=("pier", "dome"))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Broker("--no-demo", "--hosts-endpoint", endpoint, "--keys", str(keys["server"]), log_dir=tmp_path,
                runtime_dir=tmp_path / "central", env=home) as central, \
            Joined(endpoint, keys["pier"], "pier", "--exdriver", "indi_simulator_telescope",
                   log_dir=tmp_path, runtime_dir=tmp_path / "pier", env=home):
        wait_until(lambda: SCOPE in central.row("broker").get("devices", []), 15, what="pier's telescope")
        other = {"HOME": str(tmp_path / "home2")}
        with Joined(endpoint, keys["dome"], "dome", "--exdriver", "indi_simulator_telescope",
                    "--exdriver", "indi_simulator_dome", log_dir=tmp_path, runtime_dir=tmp_path / "dome", env=other):
            wait_until(lambda: "Dome Simulator" in central.row("broker").get("devices", []), 15, what="the dome")
            wait_until(lambda: "may not" in central.log(), 10, what="the refused claim logged")
            _impostor(endpoint, keys["dome"], b"pier/driver:evil")
            wait_until(lambda: "speaking as" in central.log(), 10, what="the impostor's messages dropped")
            owners = [r for r in central.status() if r["role"] == "driver" and SCOPE in r.get("devices", [])]
            assert all(r["name"].startswith("pier/") for r in owners), owners
            with contextlib.closing(RawClient(central.port)) as c:
                c.send('<getProperties version="1.7"/>')
                defined(c, {SCOPE, "Dome Simulator"})
                c.pump(0.5)
                assert c.count("defSwitchVector", SCOPE, "CONNECTION") == 1
