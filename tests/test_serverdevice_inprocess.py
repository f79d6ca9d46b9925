"""The server device's worker in-process: a real control socket served on the same reactor by a
fake arbiter, the backbone faked (tests/fakes.py), the reactor turned by the test."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeBackbone, config, runtime_dir, turn_until
from lxml import etree
from support import new_vector

from indibroker.broker import wire
from indibroker.broker.control import ControlServer
from indibroker.workers.reactor import Reactor
from indibroker.workers.serverdevice import ServerDevice

DEV = "indibroker"


class FakeArbiter:
    """Answers the control socket as the arbiter does, from rows the test sets."""

    def __init__(self) -> None:
        self.level = "INFO"
        self.drivers = {"indi_simulator_ccd": "RUNNING"}
        self.commands: list[dict[str, Any]] = []
        self.refuse = False
        self.clients = 1

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["cmd"] == "status":
            return {"ok": True, "status": [
                {"role": "arbiter", "name": "arbiter", "pid": 1, "state": "RUNNING", "log_level": self.level},
                {"role": "gateway", "name": "gateway-0", "pid": 2, "state": "RUNNING", "clients": self.clients},
                *({"role": "driver", "name": n, "pid": 3, "state": s, "restarts": 0, "devices": []}
                  for n, s in self.drivers.items())]}
        self.commands.append(request)
        if self.refuse:
            return {"ok": False, "error": "no such thing"}
        if request["cmd"] == "loglevel":
            self.level = request["level"]
        elif request["action"] == "start" and request.get("argv"):
            self.drivers[request["name"]] = "RUNNING"
        return {"ok": True}


@pytest.fixture
def device(tmp_path: Path) -> tuple[ServerDevice, FakeArbiter, FakeBackbone]:
    reactor = Reactor()
    runtime = runtime_dir(tmp_path)
    arbiter = FakeArbiter()
    server = ControlServer(runtime.control_path, arbiter)
    server.attach(reactor)
    worker = ServerDevice(config().server_device_settings(), runtime=runtime, reactor=reactor)
    backbone = FakeBackbone()
    worker.connect(backbone)
    worker.setup()
    turn_until(reactor, lambda: worker.polls, what="the first poll")
    yield worker, arbiter, backbone
    worker.shutdown()
    server.close()
    reactor.close()


def sent(backbone: FakeBackbone, verb: bytes, name: str) -> list[etree._Element]:
    return [etree.fromstring(m.payload) for m in backbone.of(verb, DEV) if m.name == name]


def values(el: etree._Element) -> dict[str, str]:
    return {one.get("name"): (one.text or "") for one in el}


def test_getproperties_is_answered_with_definitions_before_updates(device) -> None:
    worker, arbiter, backbone = device
    assert worker.owned_devices() == [DEV]
    for _ in range(20):  # nobody asked: no poll after the first (which defined the device)
        worker.reactor.turn(max_wait=0.05)
    assert worker.polls == 1 and not worker.status()["watched"]
    backbone.sent.clear()
    worker.on_backbone(wire.GETP, "", "", b"", b"")
    turn_until(worker.reactor, lambda: sent(backbone, wire.DEF, "DRIVERS"), what="the definitions")
    assert values(sent(backbone, wire.DEF, "DRIVERS")[0]) == {"indi_simulator_ccd": "On"}
    arbiter.drivers["indi_simulator_ccd"] = "FATAL"
    turn_until(worker.reactor, lambda: sent(backbone, wire.SET, "DRIVER_STATES"), what="an update while watched")
    assert values(sent(backbone, wire.SET, "DRIVER_STATES")[-1]) == {"indi_simulator_ccd": "Alert"}
    kinds = [m.verb for m in backbone.sent]
    assert kinds.index(wire.SET) > max(i for i, k in enumerate(kinds) if k == wire.DEF)


def test_log_level_and_start_driver_become_the_arbiters_commands(device) -> None:
    worker, arbiter, backbone = device
    worker.on_backbone(wire.GETP, DEV, "", b"", b"")
    worker.on_backbone(wire.NEW, DEV, "LOG_LEVEL", b"",
                       new_vector("Switch", DEV, "LOG_LEVEL", {"DEBUG": "On"}).encode())
    busy = sent(backbone, wire.SET, "LOG_LEVEL")[-1]
    assert busy.get("state") == "Busy" and values(busy)["DEBUG"] == "On"
    turn_until(worker.reactor, lambda: (s := sent(backbone, wire.SET, "LOG_LEVEL")) and s[-1].get("state") == "Ok",
               what="the level set")
    assert arbiter.commands == [{"cmd": "loglevel", "level": "DEBUG"}]

    worker.on_backbone(wire.NEW, DEV, "START_DRIVER", b"", new_vector(
        "Text", DEV, "START_DRIVER", {"DRIVER": "indi_simulator_focus -v", "INDIDEV": "Focus"}).encode())
    turn_until(worker.reactor, lambda: "Focus" in worker.shown.get("DRIVERS", {}).values(),  # type: ignore[union-attr]
               what="the new driver's switch")
    assert arbiter.commands[-1] == {"cmd": "driver", "action": "start", "name": "Focus",
                                    "argv": ["indi_simulator_focus", "-v"], "env": {"INDIDEV": "Focus"}}
    # The member set of DRIVERS changed: deleted and defined again, so clients learn the new driver.
    assert sent(backbone, wire.DEL, "DRIVERS") and len(sent(backbone, wire.DEF, "DRIVERS")) >= 2


def test_a_refused_command_shows_alert_and_says_why(device) -> None:
    worker, arbiter, backbone = device
    worker.on_backbone(wire.GETP, "", "", b"", b"")
    arbiter.refuse = True
    worker.on_backbone(wire.NEW, DEV, "RESTART", b"",
                       new_vector("Switch", DEV, "RESTART", {"indi_simulator_ccd": "On"}).encode())
    turn_until(worker.reactor, lambda: backbone.of(wire.MSG, DEV), what="a message")
    assert "no such thing" in etree.fromstring(backbone.of(wire.MSG, DEV)[-1].payload).get("message")
    assert sent(backbone, wire.SET, "RESTART")[-1].get("state") == "Alert"
    assert arbiter.commands == [{"cmd": "driver", "action": "restart", "name": "indi_simulator_ccd"}]
    # A property that is not writable, or unknown, changes nothing.
    worker.on_backbone(wire.NEW, DEV, "SERVER_INFO", b"",
                       new_vector("Text", DEV, "SERVER_INFO", {"VERSION": "x"}).encode())
    worker.on_backbone(wire.NEW, DEV, "NOPE", b"", b"<newTextVector device='indibroker' name='NOPE'/>")
    assert len(arbiter.commands) == 1


def test_polling_stops_when_no_client_is_left_and_starts_again_when_one_asks(device) -> None:
    worker, arbiter, backbone = device
    worker.on_backbone(wire.GETP, "", "", b"", b"")
    turn_until(worker.reactor, lambda: worker.polls >= 3, what="polls while watched")
    arbiter.clients = 0  # past the grace for the gateways' count, the next poll stops it
    turn_until(worker.reactor, lambda: not worker.status()["watched"], 5, what="polling to stop")
    polls = worker.polls
    deadline = time.monotonic() + 1.5  # three poll intervals: none may come
    while time.monotonic() < deadline:
        worker.reactor.turn(max_wait=0.1)
    assert worker.polls == polls
    arbiter.clients = 1
    worker.on_backbone(wire.GETP, DEV, "DRIVERS", b"", b"")
    turn_until(worker.reactor, lambda: worker.polls > polls + 1, what="polling again for a new client")


def test_out_of_descriptors_a_poll_fails_and_the_next_one_is_made(device, monkeypatch) -> None:
    """The device lives in a gateway, whose clients may take every descriptor: a poll that
    cannot open a socket is a failed poll (logged), never an exception in the gateway's loop, and
    polling goes on once descriptors are back."""
    import errno
    import socket as socket_module

    worker, _arbiter, _backbone = device
    real = socket_module.socket

    def no_descriptors(*args: Any, **kw: Any) -> socket_module.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(socket_module, "socket", no_descriptors)
    worker.on_backbone(wire.GETP, "", "", b"", b"")  # a client watches: polls begin
    before = worker.polls
    turn_until(worker.reactor, lambda: worker.polls >= before + 2, what="failed polls, answered")
    monkeypatch.setattr(socket_module, "socket", real)
    failed = worker.polls
    turn_until(worker.reactor, lambda: worker.polls > failed and worker.base, what="a poll that works")
