"""The broker and the arbiter in-process: no fork, no sleep, each test well under a second.

The broker (`broker/router.Broker`) routes real ZeroMQ frames: its ROUTER is bound to an inproc
endpoint, the test's DEALERs play the workers, and the broker is served on a `Reactor` that the
test turns by hand. The arbiter is built with a fake forker (nothing is started) and driven
through its command handling, its FIFO lines and its control socket, on its own reactor.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import zmq
from fakes import turn_until

from indibroker.broker import arbiter as arbiter_module
from indibroker.broker import wire
from indibroker.broker.arbiter import Arbiter, Child
from indibroker.broker.config import Config, DriverConfig
from indibroker.broker.control import ControlServer
from indibroker.broker.fifo import FifoReader
from indibroker.broker.oscalls import ForkedProcess
from indibroker.broker.router import BATCH, Broker
from indibroker.broker.runtime import RuntimeDir, StatusFile, statusfile_write
from indibroker.broker.transport import recv_frames, send_frames
from indibroker.workers.reactor import Reactor

pytestmark = pytest.mark.timeout(10)

INSTANCE = "inproc"
Message = tuple[bytes, str, str, bytes, bytes]  # verb, device, name, flags, payload
_endpoints = itertools.count()


# -- the broker --------------------------------------------------------------------------------------
class Peer:
    """A worker's end of the backbone, by hand: a DEALER with the identity `role:name`."""

    def __init__(self, ctx: zmq.Context, endpoint: str, role: str, name: str):
        self.role, self.name = role, name
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"{role}:{name}".encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.got: list[Message] = []

    def send(self, *messages: tuple[bytes, str, str, bytes, bytes]) -> None:
        """One batch (one ZeroMQ message) of (verb, device, name, flags, payload)."""
        index = b"\n".join(wire.record(wire.header(v, d, n, f), len(p)) for v, d, n, f, p in messages)
        send_frames(self.sock, [index, b"".join(p for *_, p in messages)])

    def say(self, verb: bytes, device: str = "", name: str = "", flags: bytes = b"",
            payload: bytes = b"") -> None:
        self.send((verb, device, name, flags, payload))

    def hello(self, devices: Sequence[str] = (), instance: str = INSTANCE) -> None:
        self.say(wire.HELLO, payload=wire.hello_payload(self.role, self.name, devices, instance))

    def receive(self) -> int:
        """Take what the broker sent; the number of ZeroMQ messages (batches) taken."""
        batches = 0
        while self.sock.poll(0):
            index, body = recv_frames(self.sock, copy=True)
            batches += 1
            offset = 0
            for head, length in wire.unpack(index):
                verb, device, name, flags = wire.parse_header(head)
                self.got.append((verb, device, name, flags, body[offset:offset + length]))
                offset += length
        return batches

    def verbs(self) -> list[bytes]:
        return [m[0] for m in self.got]

    def take(self) -> list[Message]:
        got, self.got = self.got, []
        return got


class Backbone:
    """A broker on an inproc endpoint, served on a reactor the test turns."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.endpoint = f"inproc://broker-{next(_endpoints)}"
        self.broker = Broker(self.ctx, self.endpoint, INSTANCE)
        self.changes = 0
        self.broker.on_change = self._changed
        self.reactor = Reactor()
        self.broker.attach(self.reactor)
        self.peers: list[Peer] = []

    def _changed(self) -> None:
        self.changes += 1

    def peer(self, role: str, name: str) -> Peer:
        peer = Peer(self.ctx, self.endpoint, role, name)
        self.peers.append(peer)
        return peer

    def until(self, predicate: Callable[[], Any], what: str) -> Any:
        """Turn the broker's loop until `predicate()`, taking what the peers were sent."""
        def check() -> Any:
            for peer in self.peers:
                peer.receive()
            return predicate()
        return turn_until(self.reactor, check, timeout=2.0, what=what)

    def settle(self) -> None:
        """Turn until the broker has nothing left to read (inproc delivers at once)."""
        self.until(lambda: not self.broker.sock.poll(0), "the broker to read everything")
        self.reactor.turn(max_wait=0)
        for peer in self.peers:
            peer.receive()

    def close(self) -> None:
        self.reactor.remove_zmq(self.broker.sock)
        for peer in self.peers:
            peer.sock.close(linger=0)
        self.broker.close()
        self.reactor.close()
        self.ctx.term()


@pytest.fixture
def bb() -> Iterator[Backbone]:
    backbone = Backbone()
    yield backbone
    backbone.close()


def registered(bb: Backbone, peer: Peer, devices: Sequence[str] = ()) -> Peer:
    peer.hello(devices)
    bb.until(lambda: wire.HB in peer.verbs(), f"the broker's answer to {peer.name}'s HELLO")
    peer.take()
    return peer


DEF = b'<defNumberVector device="Scope" name="EQ"><defNumber name="RA">1</defNumber></defNumberVector>'
SET = b'<setNumberVector device="Scope" name="EQ"><oneNumber name="RA">2</oneNumber></setNumberVector>'
NEW = b'<newNumberVector device="Scope" name="EQ"><oneNumber name="RA">3</oneNumber></newNumberVector>'


def test_hello_is_answered_and_registers_the_peer(bb: Backbone) -> None:
    scope = registered(bb, bb.peer("driver", "exdriver-0"), ["Scope"])
    assert bb.broker.status() == {"peers": 1, "devices": ["Scope"], "dropped": 0, "echoes": 0,
                                  "messages": 1, "bytes": 0}  # the answer: a header, no payload
    assert bb.changes >= 1  # the status file is told
    scope.say(wire.HB)
    bb.until(lambda: scope.verbs() == [wire.HB], "a heartbeat answered")


def test_def_and_set_reach_interested_gateways_only(bb: Backbone) -> None:
    scope = registered(bb, bb.peer("driver", "exdriver-0"), [])
    everything = registered(bb, bb.peer("gateway", "gateway-0"))
    other = registered(bb, bb.peer("gateway", "gateway-1"))
    everything.say(wire.SUB, payload=wire.encode_interests([("", "", wire.WANT_PLAIN)]))
    other.say(wire.SUB, payload=wire.encode_interests([("Focuser", "", wire.WANT_PLAIN)]))
    bb.settle()
    changes = bb.changes

    scope.send((wire.DEF, "Scope", "EQ", b"", DEF), (wire.SET, "Scope", "EQ", b"", SET))
    got = bb.until(lambda: len(everything.got) == 2 and everything.take(), "DEF and SET at the gateway")
    assert got == [(wire.DEF, "Scope", "EQ", b"", DEF), (wire.SET, "Scope", "EQ", b"", SET)]
    bb.settle()
    assert other.got == [] and scope.got == []
    assert bb.broker.table.owner("Scope") == b"driver:exdriver-0"  # claimed by its first DEF
    assert bb.changes == changes + 1


def test_getproperties_and_new_go_to_the_owner(bb: Backbone) -> None:
    scope = registered(bb, bb.peer("driver", "exdriver-0"), ["Scope"])
    focuser = registered(bb, bb.peer("driver", "exdriver-1"), ["Focuser"])
    client = registered(bb, bb.peer("gateway", "gateway-0"))
    getp = b'<getProperties version="1.7" device="Scope"/>'

    client.say(wire.GETP, "Scope", payload=getp)
    assert bb.until(lambda: scope.take(), "GETP at the owner") == [(wire.GETP, "Scope", "", b"", getp)]
    client.say(wire.GETP, payload=b'<getProperties version="1.7"/>')
    bb.until(lambda: scope.got and focuser.got, "a device-less GETP at every driver")
    assert [m[0] for m in scope.take() + focuser.take()] == [wire.GETP, wire.GETP]
    client.say(wire.NEW, "Scope", "EQ", payload=NEW)
    assert bb.until(lambda: scope.take(), "NEW at the owner") == [(wire.NEW, "Scope", "EQ", b"", NEW)]
    client.say(wire.NEW, "Nobody", "EQ", payload=NEW)  # an unknown device: held a while, not sent
    client.say(wire.GETP, "Nobody", payload=getp)  # a device nobody defined: dropped
    bb.settle()
    assert scope.got == focuser.got == client.got == []


def test_a_command_sent_before_its_device_is_defined_waits_for_the_definition(bb: Backbone) -> None:
    """indi_setprop right after a driver starts: its new*Vector can reach the broker before the
    driver's definitions (they cross other processes); it waits for them instead of vanishing."""
    scope = registered(bb, bb.peer("driver", "exdriver-0"), [])
    client = registered(bb, bb.peer("gateway", "gateway-0"))
    client.say(wire.NEW, "Scope", "EQ", payload=NEW)
    bb.settle()
    assert scope.got == []
    scope.say(wire.DEF, "Scope", "EQ", payload=DEF)
    assert bb.until(lambda: scope.take(), "the held NEW at the new owner") == [(wire.NEW, "Scope", "EQ", b"", NEW)]


def test_a_command_for_a_device_never_defined_is_dropped_after_a_while(
        bb: Backbone, monkeypatch: pytest.MonkeyPatch) -> None:
    from indibroker.broker import router

    scope = registered(bb, bb.peer("driver", "exdriver-0"), [])
    client = registered(bb, bb.peer("gateway", "gateway-0"))
    client.say(wire.NEW, "Scope", "EQ", payload=NEW)
    bb.settle()
    monkeypatch.setattr(router, "AWAIT_DEFINITION", 0.0)  # the wait is over
    client.say(wire.NEW, "Other", "EQ", payload=NEW)  # what expires the first
    bb.settle()
    assert "Scope" not in bb.broker._awaiting
    scope.say(wire.DEF, "Scope", "EQ", payload=DEF)
    bb.settle()
    assert scope.got == []


def test_an_unknown_peer_is_told_who(bb: Backbone) -> None:
    stranger = bb.peer("driver", "exdriver-9")
    stranger.say(wire.DEF, "Scope", "EQ", payload=DEF)
    assert bb.until(lambda: stranger.take(), "WHO") == [(wire.WHO, "", "", b"", b"")]
    assert bb.broker.status()["peers"] == 0 and bb.broker.table.owner("Scope") is None


def test_a_hello_from_another_instance_is_refused(bb: Backbone) -> None:
    ghost = bb.peer("driver", "exdriver-0")
    ghost.hello(["Scope"], instance="killed-instance")
    bb.settle()
    assert ghost.got == []  # no heartbeat: not registered
    assert bb.broker.status()["peers"] == 0
    ghost.say(wire.SET, "Scope", "EQ", payload=SET)
    assert bb.until(lambda: ghost.take(), "WHO for the refused peer") == [(wire.WHO, "", "", b"", b"")]


def test_one_turn_reads_a_bounded_batch_and_flushes_it_once(bb: Backbone) -> None:
    scope = registered(bb, bb.peer("driver", "exdriver-0"), ["Scope"])
    client = registered(bb, bb.peer("gateway", "gateway-0"))
    client.say(wire.SUB, payload=wire.encode_interests([("", "", wire.WANT_PLAIN)]))
    bb.settle()
    routed = bb.broker.routed
    for _ in range(BATCH + 500):  # one ZeroMQ message each
        scope.say(wire.SET, "Scope", "EQ", payload=SET)
    bb.reactor.turn(max_wait=1.0)
    assert bb.broker.routed - routed == BATCH
    assert client.receive() == 1 and len(client.take()) == BATCH  # one batch for the whole turn
    bb.reactor.turn(max_wait=1.0)
    assert bb.broker.routed - routed == BATCH + 500
    assert client.receive() == 1 and len(client.take()) == 500


# -- the arbiter -------------------------------------------------------------------------------------
PID_MAX = int(Path("/proc/sys/kernel/pid_max").read_text())


class FakeProcess(ForkedProcess):
    """A worker that was never forked: its pid names no process (beyond pid_max)."""

    def poll(self) -> int | None:
        return self.returncode


class FakeForker:
    """`fork_child`'s stand-in: records each start and keeps a read end of its lifeline."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.lifelines: dict[str, int] = {}
        self.pids = itertools.count(PID_MAX + 1000)

    def __call__(self, target: Callable[[], int], env: Mapping[str, str], keep_fds: Sequence[int] = (),
                 name: str = "") -> ForkedProcess:
        assert callable(target)
        assert env["INDIBROKER_LIFELINE"] == str(keep_fds[0])
        self.started.append(name)
        old = self.lifelines.pop(name, None)
        if old is not None:
            os.close(old)
        self.lifelines[name] = os.dup(keep_fds[0])  # the arbiter closes its copy at once
        os.set_blocking(self.lifelines[name], False)
        return FakeProcess(next(self.pids))

    def told(self, name: str) -> list[dict[str, Any]]:
        """The commands written down `ib-<name>`'s lifeline since last asked."""
        try:
            data = os.read(self.lifelines[f"ib-{name}"], 1 << 20)
        except BlockingIOError:
            return []
        return [json.loads(line) for line in data.splitlines()]

    def close(self) -> None:
        for fd in self.lifelines.values():
            os.close(fd)


@pytest.fixture
def runtime() -> Iterator[RuntimeDir]:
    base = Path(tempfile.mkdtemp(prefix="ib-", dir="/tmp"))  # short: the control socket's path
    rt = RuntimeDir(base / "7624", INSTANCE)
    rt.status_dir.mkdir(parents=True)
    yield rt
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def no_zmq(monkeypatch: pytest.MonkeyPatch) -> None:
    """The arbiter forks its workers: it must never make a ZeroMQ context."""
    def refuse(*args: object, **kw: object) -> None:
        raise AssertionError("the arbiter created a ZeroMQ context")
    monkeypatch.setattr(zmq, "Context", refuse)


ArbiterMaker = Callable[..., tuple[Arbiter, FakeForker]]


@pytest.fixture
def make_arbiter(runtime: RuntimeDir, no_zmq: None) -> Iterator[ArbiterMaker]:
    made: list[tuple[Arbiter, FakeForker]] = []

    def make(config: Config | None = None, settle: bool = True) -> tuple[Arbiter, FakeForker]:
        forker = FakeForker()
        config = config or Config(host="127.0.0.1", port=0)
        config.assign_names()
        arbiter = Arbiter(config, runtime, reactor=Reactor(), forker=forker)
        arbiter.start()
        made.append((arbiter, forker))
        if settle:
            drivers_defined(arbiter, runtime)
        return arbiter, forker

    yield make
    for arbiter, forker in made:
        arbiter.close()
        forker.close()


def drivers_defined(arbiter: Arbiter, runtime: RuntimeDir) -> None:
    """Each driver worker says (in its status file) that its drivers have defined a device; the
    arbiter then starts the gateways."""
    for worker in arbiter._exdriver_workers():
        assert worker.proc is not None
        statusfile_write(runtime, worker.name, {"pid": worker.proc.pid, "drivers": [
            {"name": d.name, "state": "RUNNING", "devices": [d.name.upper()]} for d in worker.drivers]})
    turn_until(arbiter.reactor, lambda: all(c.proc is not None for c in arbiter.children if c.role == "gateway"),
               timeout=2, what="the gateways started")


def child(arbiter: Arbiter, name: str) -> Child:
    return next(c for c in arbiter.children if c.name == name)


def test_start_forks_every_child_broker_first(make_arbiter: ArbiterMaker) -> None:
    config = Config(host="127.0.0.1", port=0, gateways=2, exdriver_workers=2,
                    drivers=[DriverConfig(argv=["indi_a"]), DriverConfig(argv=["indi_b"])])
    arbiter, forker = make_arbiter(config, settle=False)
    # Clients wait in the listening socket's backlog until the drivers have defined their devices.
    assert forker.started == ["ib-broker", "ib-exdriver-0", "ib-exdriver-1"]
    arbiter.reactor.turn(max_wait=0.05)
    assert forker.started == ["ib-broker", "ib-exdriver-0", "ib-exdriver-1"]
    drivers_defined(arbiter, arbiter.runtime)
    assert forker.started[3:] == ["ib-gateway-0", "ib-gateway-1"]
    # The first gateway hosts the server device; no process of its own.
    assert [c.settings.server_device is not None for c in arbiter.children if c.role == "gateway"] == [True, False]
    assert all(c.proc is not None and c.lifecycle.state.value == "RUNNING" for c in arbiter.children)
    assert [d.name for d in child(arbiter, "exdriver-1").drivers] == ["indi_b"]


def test_status_command_merges_status_files(make_arbiter: ArbiterMaker, runtime: RuntimeDir) -> None:
    arbiter, _ = make_arbiter()  # the demo driver, in exdriver-0
    (runtime.status_dir / "exdriver-0.json").write_text(json.dumps({"drivers": [
        {"name": "demo", "pid": None, "state": "RUNNING", "restarts": 2, "devices": ["LED"]}]}))
    (runtime.status_dir / "gateway-0.json").write_text(json.dumps({"clients": 3}))
    reply = arbiter._command({"cmd": "status"})
    assert reply["ok"] is True
    rows = {r["name"]: r for r in reply["status"]}
    assert [r["role"] for r in reply["status"]] == ["arbiter", "broker", "gateway", "exdriver", "driver"]
    assert rows["arbiter"]["pid"] == os.getpid()
    assert rows["gateway-0"]["clients"] == 3 and rows["gateway-0"]["state"] == "RUNNING"
    assert rows["demo"]["worker"] == "exdriver-0" and rows["demo"]["devices"] == ["LED"]
    assert rows["demo"]["restarts"] == 2
    assert arbiter._command({"cmd": "bogus"}) == {"ok": False, "error": "unknown command 'bogus'"}


def test_status_without_usage_reads_no_cpu_or_memory(make_arbiter: ArbiterMaker) -> None:
    arbiter, _ = make_arbiter()
    rows = arbiter._command({"cmd": "status", "usage": False})["status"]
    assert rows and all("cpu_percent" not in r and "rss" not in r for r in rows)
    assert rows[0]["log_level"] == "INFO"
    assert all("cpu_percent" in r for r in arbiter._command({"cmd": "status"})["status"])


def test_loglevel_is_set_here_and_told_to_every_child(make_arbiter: ArbiterMaker) -> None:
    arbiter, forker = make_arbiter()
    root = logging.getLogger()
    before = root.level
    try:
        assert arbiter._command({"cmd": "loglevel", "level": "debug"}) == {"ok": True, "level": "DEBUG"}
        assert root.level == logging.DEBUG and arbiter.config.log_level == "DEBUG"
        for c in arbiter.children:
            assert forker.told(c.name)[-1] == {"cmd": "loglevel", "level": "DEBUG"}
        assert arbiter._command({"cmd": "status", "usage": False})["status"][0]["log_level"] == "DEBUG"
        refused = arbiter._command({"cmd": "loglevel", "level": "LOUD"})
        assert refused["ok"] is False and "expected one of" in refused["error"]
    finally:
        root.setLevel(before)


def test_driver_stop_start_restart_are_told_to_its_worker(make_arbiter: ArbiterMaker) -> None:
    arbiter, forker = make_arbiter()
    worker = child(arbiter, "exdriver-0")

    assert arbiter._command({"cmd": "driver", "action": "stop", "name": "demo"}) == {"ok": True, "name": "demo"}
    assert forker.told("exdriver-0") == [{"cmd": "driver", "action": "stop", "name": "demo"}]
    assert worker.inheritance.stopped == {"demo"}  # a restarted worker keeps it stopped

    assert arbiter._driver_command("start", "demo", None, {}) == {"ok": True, "name": "demo"}
    assert forker.told("exdriver-0") == [{"cmd": "driver", "action": "start", "name": "demo"}]
    assert worker.inheritance.stopped == set()

    assert arbiter._driver_command("restart", "demo", None, {})["ok"] is True
    assert forker.told("exdriver-0") == [{"cmd": "driver", "action": "restart", "name": "demo"}]

    assert arbiter._driver_command("stop", "nobody", None, {}) == {"ok": False, "error": "no driver named 'nobody'"}
    assert arbiter._driver_command("pause", "demo", None, {}) == \
        {"ok": False, "error": "unknown driver action 'pause'"}
    assert arbiter._driver_command("start", "nobody", None, {})["ok"] is False  # no argv: nothing to start
    assert forker.told("exdriver-0") == []
    assert forker.started.count("ib-exdriver-0") == 1  # told, never restarted


def test_a_new_driver_goes_to_the_least_loaded_worker(make_arbiter: ArbiterMaker) -> None:
    config = Config(host="127.0.0.1", port=0, exdriver_workers=2,
                    drivers=[DriverConfig(argv=["indi_a"]), DriverConfig(argv=["indi_b"]),
                             DriverConfig(argv=["indi_c"])])
    arbiter, forker = make_arbiter(config)
    reply = arbiter._command({"cmd": "driver", "action": "start", "name": "", "argv": ["/usr/bin/indi_a"],
                              "env": {}})
    assert reply == {"ok": True, "name": "indi_a-2"}  # the name is taken: numbered
    [told] = forker.told("exdriver-1")
    assert told["action"] == "add" and told["settings"]["name"] == "indi_a-2"
    assert told["settings"]["argv"] == ["/usr/bin/indi_a"]
    assert forker.told("exdriver-0") == []


def test_fifo_lines_start_and_stop_drivers(make_arbiter: ArbiterMaker, runtime: RuntimeDir) -> None:
    fifo = runtime.path.parent / "indi.fifo"
    arbiter, forker = make_arbiter(Config(host="127.0.0.1", port=0, fifo=str(fifo)))
    assert forker.started == ["ib-broker", "ib-gateway-0"]  # a FIFO instance: no demo driver

    arbiter._fifo_line("start", "indi_simulator_ccd", {"INDIDEV": "My CCD"})
    assert forker.started[-1] == "ib-exdriver-0"  # the first driver brings its worker
    worker = child(arbiter, "exdriver-0")
    [driver] = worker.drivers
    assert (driver.name, driver.argv, driver.env) == ("My CCD", ("indi_simulator_ccd",), {"INDIDEV": "My CCD"})

    arbiter._fifo_line("stop", "indi_simulator_ccd", {"INDIDEV": "My CCD"})
    assert forker.told("exdriver-0") == [{"cmd": "driver", "action": "stop", "name": "My CCD"}]
    arbiter._fifo_line("start", "indi_simulator_ccd", {"INDIDEV": "My CCD"})  # the same driver again
    assert forker.told("exdriver-0") == [{"cmd": "driver", "action": "start", "name": "My CCD"}]
    assert len(worker.drivers) == 1

    arbiter._fifo_line("start", "indi_simulator_telescope", {})
    [added] = forker.told("exdriver-0")
    assert added["action"] == "add" and added["settings"]["name"] == "indi_simulator_telescope"
    arbiter._fifo_line("stop", "/usr/bin/indi_simulator_telescope", {})  # by the program's name
    assert forker.told("exdriver-0") == [{"cmd": "driver", "action": "stop", "name": "indi_simulator_telescope"}]
    arbiter._fifo_line("stop", "indi_nothing", {})  # logged, nothing told
    assert forker.told("exdriver-0") == []

    # And through the FIFO itself, read on the arbiter's loop; a line may come in pieces.
    with open(fifo, "wb", buffering=0) as fh:
        fh.write(b'start indi_simulator_dome -n "My ')
        arbiter.reactor.turn(max_wait=0.05)
        assert len(worker.drivers) == 2  # half a line: nothing yet
        fh.write(b'Dome"\nbogus line\nstop indi_simulator_dome -n "My Dome"\n')
        told = turn_until(arbiter.reactor, lambda: forker.told("exdriver-0"), timeout=2.0, what="the FIFO's lines")
    assert [t["action"] for t in told] == ["add", "stop"]
    assert worker.drivers[-1].name == "My Dome"
    assert worker.inheritance.stopped == {"My Dome", "indi_simulator_telescope"}


def test_stop_all_goes_in_order_and_forgets_its_children(make_arbiter: ArbiterMaker,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    arbiter, _ = make_arbiter(Config(host="127.0.0.1", port=0, gateways=2))
    names = {c.proc.pid: c.name for c in arbiter.children if c.proc is not None}
    signalled: list[tuple[str, int]] = []

    def signal_group(pid: int, sig: int) -> bool:
        if pid in names:
            signalled.append((names[pid], sig))
        return True

    monkeypatch.setattr(arbiter_module, "signal_group", signal_group)
    arbiter.stop_all()
    assert [n for n, sig in signalled if sig == signal.SIGTERM] == \
        ["gateway-0", "gateway-1", "exdriver-0", "broker"]
    assert all(c.proc is None and c.lifeline == -1 and c.lifecycle.state.value == "STOPPED"
               for c in arbiter.children)
    assert all(c.restart_timer is None for c in arbiter.children)


# -- the control socket ------------------------------------------------------------------------------
def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.setblocking(False)
    return sock


def read_reply(reactor: Reactor, sock: socket.socket) -> dict[str, Any]:
    data = bytearray()

    def whole() -> bool:
        try:
            data.extend(sock.recv(1 << 20))
        except BlockingIOError:
            pass
        return data.endswith(b"\n")

    turn_until(reactor, whole, timeout=2.0, what="the reply")
    return dict(json.loads(data))


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        while sock.recv(1 << 20):
            pass
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    return True


def test_control_socket_serves_the_arbiters_commands(make_arbiter: ArbiterMaker, runtime: RuntimeDir) -> None:
    arbiter, _ = make_arbiter()
    with connect(runtime.control_path) as sock:
        sock.sendall(b'{"cmd": "status"}\n')
        reply = read_reply(arbiter.reactor, sock)
    assert reply["ok"] and [r["name"] for r in reply["status"]][:2] == ["arbiter", "broker"]
    with connect(runtime.control_path) as sock:
        sock.sendall(b"not json\n")
        assert read_reply(arbiter.reactor, sock)["error"].startswith("bad request")
    with connect(runtime.control_path) as sock:
        sock.sendall(b'{"cmd": "stop"}\n')
        assert read_reply(arbiter.reactor, sock) == {"ok": True}  # answered before the loop ends
    assert arbiter._stopping


def test_control_socket_drops_a_half_request_after_its_timeout(make_arbiter: ArbiterMaker,
                                                               runtime: RuntimeDir) -> None:
    arbiter, _ = make_arbiter()
    arbiter.control.timeout = 0.05
    with connect(runtime.control_path) as sock:
        sock.sendall(b'{"cmd": "sta')
        turn_until(arbiter.reactor, lambda: closed_by_peer(sock), timeout=2.0, what="the connection dropped")
    assert arbiter.control._conns == {}


def test_a_client_that_does_not_read_its_reply_never_stalls_the_loop(tmp_path: Path) -> None:
    reactor = Reactor()
    big = "x" * (1 << 20)  # more than a socket buffer holds
    server = ControlServer(tmp_path / "c.sock", lambda request: {"ok": True, "big": big}, timeout=0.2)
    server.attach(reactor)
    ticks: list[int] = []
    reactor.call_later(0.02, lambda: ticks.append(1))
    try:
        with connect(tmp_path / "c.sock") as lazy, connect(tmp_path / "c.sock") as other:
            lazy.sendall(b'{"cmd": "status"}\n')  # and never reads
            turn_until(reactor, lambda: ticks, timeout=2.0, what="a timer while the reply waits")
            assert len(server._conns) >= 1
            other.sendall(b'{"cmd": "status"}\n')  # the next client is served meanwhile
            reply = read_reply(reactor, other)
            assert reply["ok"] and len(reply["big"]) == len(big)
            turn_until(reactor, lambda: not server._conns, timeout=2.0, what="the lazy client dropped")
    finally:
        server.close()
        reactor.close()
    assert not (tmp_path / "c.sock").exists()


# -- the FIFO and the status file, on their own --------------------------------------------------------
def test_fifo_reader_splits_lines_across_reads(tmp_path: Path) -> None:
    reactor = Reactor()
    seen: list[tuple[str, str, dict[str, str]]] = []
    fifo = FifoReader(tmp_path / "f", lambda *line: seen.append(line))
    fifo.attach(reactor)
    try:
        with open(tmp_path / "f", "wb", buffering=0) as fh:
            fh.write(b"start indi_a -n ")
            reactor.turn(max_wait=0.05)
            assert seen == []
            fh.write(b'"A B"\n\nnonsense\nstop indi_b\n')
            turn_until(reactor, lambda: len(seen) == 2, timeout=2.0, what="two lines")
        assert seen == [("start", "indi_a", {"INDIDEV": "A B"}), ("stop", "indi_b", {})]
    finally:
        fifo.close()
        reactor.close()


def test_status_file_is_written_on_change_and_kept_fresh(runtime: RuntimeDir) -> None:
    reactor = Reactor()
    data = {"n": 0}
    status = StatusFile(runtime, "w", lambda: dict(data), reactor, liveness=0.06)
    path = runtime.status_dir / "w.json"
    try:
        status.start()
        assert json.loads(path.read_text()) == {"n": 0}
        data["n"] = 1
        status.changed()
        status.changed()  # coalesced
        turn_until(reactor, lambda: json.loads(path.read_text()) == {"n": 1}, timeout=2.0, what="the change")
        data["n"] = 2  # unannounced: the next refresh writes it
        turn_until(reactor, lambda: json.loads(path.read_text()) == {"n": 2}, timeout=2.0, what="a refresh")
        os.utime(path, (0, 0))
        turn_until(reactor, lambda: path.stat().st_mtime > 0, timeout=2.0, what="a sign of life")
    finally:
        reactor.close()
