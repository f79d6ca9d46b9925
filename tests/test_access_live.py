"""The access rules on a real server: a client is a real socket from another loopback address
(127.0.0.2), the drivers are indi-bin's simulators."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from support import RawClient, getprop, is_, new_vector, wait_until

pytestmark = pytest.mark.usefixtures("indi_bin")

CONNECT = {"CONNECT": "On", "DISCONNECT": "Off"}


def From(port: int, source: str) -> RawClient:  # noqa: N802 (reads as "a client from")
    return RawClient(port, source=source)


@pytest.fixture
def home(tmp_path) -> dict[str, str]:
    """Simulators keep their config in ~/.indi: a home of the test's own."""
    (tmp_path / "home").mkdir()
    return {"HOME": str(tmp_path / "home")}


def refused_message(client: RawClient, start: int) -> str:
    told = client.wait_for(lambda e: e.tag == "message" and "refused" in (e.get("message") or ""), 10,
                           start=start, what="a message saying why the change was refused")
    return told.get("message") or ""


def test_a_client_outside_the_allow_list_is_closed_at_once(broker_factory):
    b = broker_factory("--allow", "127.0.0.1/32")
    outsider = From(b.port, "127.0.0.2")
    outsider.send('<getProperties version="1.7"/>')
    outsider.wait_closed(5)
    assert outsider.count() == 0  # not one definition reached it
    insider = From(b.port, "127.0.0.1")
    insider.send('<getProperties version="1.7"/>')
    insider.wait_for(is_("defSwitchVector", "LED"), 20)
    wait_until(lambda: "refused 127.0.0.2" in b.log() and "is not allowed to connect" in b.log(), 5,
               what="the refusal logged")


def test_a_read_only_client_changes_nothing_and_is_told_why(broker_factory, home):
    b = broker_factory("--exdriver", "indi_simulator_telescope", "--read-only", "127.0.0.2/32", env=home)
    reader = From(b.port, "127.0.0.2")
    reader.send('<getProperties version="1.7"/>')
    reader.wait_for(is_("defSwitchVector", "Telescope Simulator", "CONNECTION"), 20)
    for vector, kind, members in (("CONNECTION", "Switch", CONNECT), ("ACTIVE_DEVICES", "Text", {"ACTIVE_GPS": "X"})):
        mark = len(reader.elements)
        reader.send(new_vector(kind, "Telescope Simulator", vector, members))
        assert "read-only" in refused_message(reader, mark)
    # The refusal is decided in the gateway, before anything is sent on: the driver kept its values.
    values = getprop(b.port, "Telescope Simulator.CONNECTION.CONNECT", "Telescope Simulator.ACTIVE_DEVICES.ACTIVE_GPS")
    assert values["Telescope Simulator.CONNECTION.CONNECT"] == "Off"
    assert values["Telescope Simulator.ACTIVE_DEVICES.ACTIVE_GPS"] != "X"


def test_per_device_write_rules(broker_factory, home, tmp_path):
    config = tmp_path / "rules.toml"
    config.write_text('[write_rules]\n"Telescope Simulator" = ["127.0.0.1"]\n')
    b = broker_factory("--config", str(config), "--exdriver", "indi_simulator_telescope",
                       "--exdriver", "indi_simulator_focus", env=home)
    other = From(b.port, "127.0.0.2")
    other.send('<getProperties version="1.7"/>')
    other.wait_for(is_("defSwitchVector", "Focuser Simulator", "CONNECTION"), 20)
    other.wait_for(is_("defSwitchVector", "Telescope Simulator", "CONNECTION"), 20)
    mark = len(other.elements)
    other.send(new_vector("Switch", "Telescope Simulator", "CONNECTION", CONNECT))
    assert "may not change Telescope Simulator" in refused_message(other, mark)
    other.send(new_vector("Switch", "Focuser Simulator", "CONNECTION", CONNECT))  # no rule: allowed
    other.wait_for(lambda e: e.tag == "setSwitchVector" and e.get("device") == "Focuser Simulator"
                   and e.get("name") == "CONNECTION" and e.get("state") == "Ok", 20, start=mark)
    assert getprop(b.port, "Telescope Simulator.CONNECTION.CONNECT")["Telescope Simulator.CONNECTION.CONNECT"] == "Off"


def test_another_local_user_cannot_reach_the_backbone_or_control_sockets(broker_factory):
    if os.geteuid() != 0 or shutil.which("setpriv") is None or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs root and setpriv to act as another user")
    b = broker_factory()
    run = b.runtime_dir / str(b.port)
    sockets = [p for p in run.rglob("*.sock")]
    assert {p.name for p in sockets} >= {"control.sock", "broker.sock"}, sockets
    assert oct(run.stat().st_mode & 0o777) == "0o700"
    probe = ("import socket, sys\n"
             "for path in sys.argv[1:]:\n"
             "    s = socket.socket(socket.AF_UNIX)\n"
             "    try:\n"
             "        s.connect(path); print('CONNECTED', path)\n"
             "    except PermissionError:\n"
             "        print('DENIED', path)\n")
    result = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3",
                             "-c", probe, *map(str, sockets)], capture_output=True, text=True, timeout=30)
    assert result.stdout.count("DENIED") == len(sockets) and "CONNECTED" not in result.stdout, \
        result.stdout + result.stderr


def test_connections_per_address_are_capped(broker_factory):
    b = broker_factory("--max-per-address", "2", "--gateways", "2")  # the cap holds across gateways
    first, second = From(b.port, "127.0.0.2"), From(b.port, "127.0.0.2")
    for c in (first, second):
        c.send('<getProperties version="1.7"/>')
        c.wait_for(is_("defSwitchVector", "LED"), 20)
    third = From(b.port, "127.0.0.2")
    told = third.wait_for(lambda e: e.tag == "message", 10, what="the refusal")
    assert "too many connections from 127.0.0.2" in (told.get("message") or "")
    third.wait_closed(5)
    other = From(b.port, "127.0.0.3")  # another address is not counted with it
    other.send('<getProperties version="1.7"/>')
    other.wait_for(is_("defSwitchVector", "LED"), 20)
    first.close()  # a slot frees: the address may connect again

    def admitted() -> bool:
        c = From(b.port, "127.0.0.2")
        c.send('<getProperties version="1.7"/>')
        try:
            c.wait_for(is_("defSwitchVector", "LED"), 2)
            return True
        except AssertionError:
            return False
        finally:
            c.close()

    wait_until(admitted, 15, what="a new connection from the address once one closed")
