"""The server device on real processes, seen and used by clients no one here wrote: indi-bin's
indi_getprop and indi_setprop, indipyclient (PyPI) and PyIndi (indilib's own client library).

Every wait is on a condition with a deadline; every broker is stopped and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from typing import Any

import pytest
from support import Broker, RawClient, getprop, is_, member, new_vector, setprop, wait_until

pytestmark = pytest.mark.usefixtures("indi_bin")

DEV = "indibroker"
CCD, SCOPE = "CCD Simulator", "Telescope Simulator"
CCD_DRV, SCOPE_DRV = "indi_simulator_ccd", "indi_simulator_telescope"
SIMS = ("--exdriver", SCOPE_DRV, "--exdriver", CCD_DRV)


def watcher(port: int, source: str | None = None) -> RawClient:
    """A client that has asked for everything and holds the device's driver lights."""
    c = RawClient(port, source=source)
    c.send('<getProperties version="1.7"/>')
    c.wait_for(is_("defLightVector", DEV, "DRIVER_STATES"), 15, what="the server device")
    return c


def light(c: RawClient, driver: str, value: str, start: int = 0, timeout: float = 15.0) -> int:
    """Wait until `c` is told that `driver`'s light is `value`; the index just past that element."""
    def told(e: Any) -> bool:
        if e.tag not in ("defLightVector", "setLightVector") or e.get("device") != DEV \
                or e.get("name") != "DRIVER_STATES":
            return False
        try:
            return member(e, driver) == value
        except KeyError:
            return False

    el = c.wait_for(told, timeout, start=start, what=f"{driver}'s light {value}")
    return c.elements.index(el, start) + 1


def props(port: int) -> dict[str, str]:
    return getprop(port, f"{DEV}.*.*", timeout=2)


def row(b: Broker, name: str) -> dict[str, Any]:
    return b.row(name)


# -- 1. indi_getprop lists it; indi_setprop stops, starts and restarts drivers through it ---------
def test_indi_getprop_lists_the_drivers_and_indi_setprop_operates_them(run):
    b = run(*SIMS)
    seen = wait_until(lambda: (p := props(b.port)).get(f"{DEV}.DRIVER_{CCD_DRV}.DEVICES") == CCD and p, 20,
                      what="indi_getprop showing the CCD driver's device")
    for drv in (SCOPE_DRV, CCD_DRV):
        assert seen[f"{DEV}.DRIVERS.{drv}"] == "On"
        assert seen[f"{DEV}.DRIVER_STATES.{drv}"] == "Ok"
        assert seen[f"{DEV}.DRIVER_{drv}.STATE"] == "RUNNING"
        assert int(seen[f"{DEV}.DRIVER_{drv}_USAGE.PID"]) == row(b, drv)["pid"]
    assert seen[f"{DEV}.WORKER_STATES.broker"] == "Ok"
    assert seen[f"{DEV}.SERVER_INFO.ADDRESS"].endswith(f":{b.port}")

    c = watcher(b.port)
    try:
        c.wait_for(is_("defNumberVector", CCD), 15, what="the CCD's definitions")
        mark = len(c.elements)
        setprop(b.port, f"{DEV}.DRIVERS.{CCD_DRV}=Off")
        c.wait_for(is_("delProperty", CCD), 15, start=mark, what="CCD Simulator deleted")
        light(c, CCD_DRV, "Idle", mark)
        wait_until(lambda: row(b, CCD_DRV)["state"] == "STOPPED", 10)
        assert row(b, SCOPE_DRV)["state"] == "RUNNING"

        mark = len(c.elements)
        setprop(b.port, f"{DEV}.DRIVERS.{CCD_DRV}=On")
        c.wait_for(is_("defNumberVector", CCD), 20, start=mark, what="CCD Simulator defined again")
        light(c, CCD_DRV, "Ok", mark)

        # A restart through the device is an operator's restart, not a crash.
        old_pid = row(b, SCOPE_DRV)["pid"]
        mark = len(c.elements)
        setprop(b.port, f"{DEV}.RESTART.{SCOPE_DRV}=On")
        c.wait_for(is_("delProperty", SCOPE), 15, start=mark, what="the telescope gone for its restart")
        c.wait_for(is_("defNumberVector", SCOPE), 20, start=mark, what="the telescope back")
        scope = wait_until(lambda: (r := row(b, SCOPE_DRV))["state"] == "RUNNING" and r["pid"] != old_pid and r,
                           10)
        assert (scope["restarts"], scope["operator_restarts"]) == (0, 1)
        now = wait_until(lambda: (p := props(b.port)).get(f"{DEV}.DRIVER_{SCOPE_DRV}_USAGE.OPERATOR_RESTARTS")
                         == "1" and p, 10, what="the device counting the operator's restart")
        assert now[f"{DEV}.DRIVER_{SCOPE_DRV}_USAGE.RESTARTS"] == "0"
        assert now[f"{DEV}.RESTART.{SCOPE_DRV}"] == "Off"  # a momentary switch
        assert f"driver {SCOPE_DRV} exited" not in b.log()  # told as a stop and a start, no crash
    finally:
        c.close()


# -- 2. indipyclient and PyIndi read it and press its switches ---------------------------------
def test_indipyclient_and_pyindi_read_the_device_and_press_a_switch(run):
    from indipyclient import IPyClient

    b = run(*SIMS)

    async def with_indipyclient() -> str:
        client = IPyClient(indihost="127.0.0.1", indiport=b.port)
        client.set_vector_timeouts(timeout_enable=False)
        task = asyncio.create_task(client.asyncrun())
        try:
            async def until(pred: Callable[[], Any], timeout: float = 20.0) -> None:
                end = asyncio.get_running_loop().time() + timeout
                while not pred():
                    assert asyncio.get_running_loop().time() < end, "timed out"
                    await asyncio.sleep(0.05)

            await until(lambda: DEV in client and "DRIVER_STATES" in client[DEV] and "DRIVERS" in client[DEV])
            assert client[DEV]["DRIVERS"][CCD_DRV] == "On"
            await until(lambda: client[DEV]["DRIVER_STATES"][CCD_DRV] == "Ok")
            await client.send_newVector(DEV, "DRIVERS", members={CCD_DRV: "Off"})
            await until(lambda: client[DEV]["DRIVER_STATES"][CCD_DRV] == "Idle")
            await until(lambda: client[DEV]["DRIVERS"].state == "Ok")
            return str(client[DEV]["DRIVERS"][CCD_DRV])
        finally:
            client.shutdown()
            await asyncio.wait_for(task, 10)

    assert asyncio.run(with_indipyclient()) == "Off"
    assert row(b, CCD_DRV)["state"] == "STOPPED"

    import PyIndi

    client = PyIndi.BaseClient()
    client.setServer("127.0.0.1", b.port)
    assert client.connectServer()
    try:
        def switch() -> Any:
            device = client.getDevice(DEV)
            return device.getSwitch("DRIVERS") if device else None

        drivers = wait_until(switch, 15, what="PyIndi holding DRIVERS")
        states = {s.getName(): s.getState() for s in drivers}
        assert states == {SCOPE_DRV: PyIndi.ISS_ON, CCD_DRV: PyIndi.ISS_OFF}
        for s in drivers:
            if s.getName() == CCD_DRV:
                s.setState(PyIndi.ISS_ON)
        client.sendNewSwitch(drivers)

        def ccd_light() -> int:
            return {x.getName(): x.getState() for x in client.getDevice(DEV).getLight("DRIVER_STATES")}[CCD_DRV]

        wait_until(lambda: ccd_light() == PyIndi.IPS_OK, 20, what="PyIndi seeing the CCD driver Ok")
        wait_until(lambda: client.getDevice(CCD), 20, what="PyIndi seeing CCD Simulator again")
    finally:
        client.disconnectServer()
    assert row(b, CCD_DRV)["state"] == "RUNNING"


# -- 3. a crash shows Busy then Ok, with its count and reason; a driver that always exits, Alert ---
def test_a_killed_driver_shows_busy_then_ok_and_one_that_always_exits_ends_alert(run):
    b = run(*SIMS, "--exdriver", "false", "--max-restarts", "1")
    c = watcher(b.port)
    try:
        gave_up = light(c, "false", "Alert", 0, timeout=20)
        assert c.wait_for(lambda e: e.tag == "message" and "false" in e.get("message")
                          and "FATAL" in e.get("message"), 5, what="the FATAL message, as before")
        wait_until(lambda: props(b.port).get(f"{DEV}.DRIVER_false.LAST_EXIT", "").startswith("exit"), 10,
                   what="the device giving the exit reason")
        assert gave_up

        light(c, CCD_DRV, "Ok", 0)
        pid = row(b, CCD_DRV)["pid"]
        mark = len(c.elements)
        os.kill(pid, signal.SIGKILL)
        busy = light(c, CCD_DRV, "Busy", mark)
        light(c, CCD_DRV, "Ok", busy, timeout=20)
        shown = wait_until(lambda: (p := props(b.port)).get(f"{DEV}.DRIVER_{CCD_DRV}_USAGE.RESTARTS") == "1"
                           and p, 10, what="the device counting the crash")
        assert "SIGKILL" in shown[f"{DEV}.DRIVER_{CCD_DRV}.LAST_EXIT"]
        assert shown[f"{DEV}.DRIVER_{CCD_DRV}_USAGE.OPERATOR_RESTARTS"] == "0"
        assert shown[f"{DEV}.DRIVER_{CCD_DRV}.STATE"] == "RUNNING"
    finally:
        c.close()


# -- operating switches obey the access rules ------------------------------------------------
def test_a_read_only_client_watches_the_device_but_cannot_stop_a_driver(run):
    b = run("--exdriver", SCOPE_DRV, "--read-only", "127.0.0.2/32")
    reader = watcher(b.port, source="127.0.0.2")
    writer = watcher(b.port)
    try:
        mark = len(reader.elements)
        reader.send(new_vector("Switch", DEV, "DRIVERS", {SCOPE_DRV: "Off"}))
        told = reader.wait_for(lambda e: e.tag == "message" and "refused" in e.get("message"), 10, start=mark,
                               what="the refusal")
        assert "read-only" in told.get("message")
        # The refusal is the gateway's: nothing reached the device, so nothing changed.
        assert row(b, SCOPE_DRV)["state"] == "RUNNING"
        mark = len(writer.elements)
        writer.send(new_vector("Switch", DEV, "DRIVERS", {SCOPE_DRV: "Off"}))
        light(writer, SCOPE_DRV, "Idle", mark)
        light(reader, SCOPE_DRV, "Idle", 0)  # the reader watches it happen
        assert row(b, SCOPE_DRV)["state"] == "STOPPED"
    finally:
        reader.close()
        writer.close()


# -- the device can be renamed or turned off, and costs nothing while nobody watches ---------------
def test_the_device_is_named_by_config_or_turned_off(run):
    b = run("--exdriver", SCOPE_DRV, "--server-device", "Observatory Server")
    seen = wait_until(lambda: (p := getprop(b.port, "Observatory Server.DRIVERS.*", timeout=2)) and p, 15)
    assert seen == {f"Observatory Server.DRIVERS.{SCOPE_DRV}": "On"}
    off = run("--exdriver", SCOPE_DRV, "--no-server-device")
    assert all(r["role"] != "serverdevice" for r in off.status())
    c = RawClient(off.port)
    try:
        c.send('<getProperties version="1.7"/>')
        c.wait_for(is_("defSwitchVector", SCOPE), 15)
        assert c.count(device=DEV) == 0
    finally:
        c.close()


def test_the_device_stops_polling_once_its_client_has_left(run):
    b = run("--exdriver", SCOPE_DRV)
    c = watcher(b.port)
    wait_until(lambda: _watched(b), 5, what="the device polling for its client")
    c.close()
    # Once nobody is connected it stops (that it then polls no more: tests/test_serverdevice_inprocess.py).
    wait_until(lambda: not _watched(b), 10, what="the device to stop polling once the client left")
    props(b.port)  # a client that asks once and leaves: watched again, for a moment
    wait_until(lambda: not _watched(b), 10, what="the device to stop polling again")


def _status_file(b: Broker) -> dict[str, Any]:
    import json

    assert b.runtime_dir is not None
    files = list((b.runtime_dir / str(b.port)).glob("run-*/status/gateway-0.json"))  # its host
    return dict(json.loads(files[0].read_text()).get("server_device", {})) if files else {}


def _watched(b: Broker) -> bool:
    return bool(_status_file(b).get("watched"))


def test_the_clients_tab_lists_each_connection(run):
    """The device's CONNECTIONS: each client's address (its label), queued bytes and BLOBs dropped,
    from the gateways' status files."""
    b = run("--exdriver", SCOPE_DRV)
    c = watcher(b.port)
    try:
        host, port = c.sock.getsockname()[:2]
        me = f"{host}:{port}"

        def lists_me(e: Any) -> bool:
            return e.tag == "defTextVector" and e.get("device") == DEV and e.get("name") == "CONNECTIONS" \
                and any(one.get("label") == me and "bytes queued" in (one.text or "") for one in e.root)

        c.wait_for(lists_me, 15, what=f"a connection row for {me}")
    finally:
        c.close()
