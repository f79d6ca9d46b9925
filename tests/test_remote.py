"""Issue 5: remote bridges, trees of INDI servers that heal themselves.

Real indiserver with real simulators at the root, indibroker instances chained to it, and the real
indiserver chained to an indibroker.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import (
    IndiServer,
    clients,
    fits_header,
    free_port,
    getprop,
    is_,
    mark_through,
    member,
    new_vector,
    setprop,
    wait_count,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("indi_bin")

SCOPE = "Telescope Simulator"
CCD = "CCD Simulator"
PYSCRIPTS = str(Path(__file__).parent / "pyscripts")


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("HOME", str(path))  # the indiserver we start inherits it too
    return {"HOME": str(path)}


def test_three_levels_slew_through_the_tree(broker_factory, home):
    with IndiServer("indi_simulator_telescope", extra=("-u", f"/tmp/indiserver-{os.getpid()}-3l")) as root:
        a = broker_factory("--remote", f"127.0.0.1:{root.port}", env=home)
        b = broker_factory("--remote", f"localhost:{a.port}", "--exdriver", "python3 -m indibroker.workers.demo",
                           env=home)
        props = wait_until(lambda: (p := getprop(b.port)) and f"{SCOPE}.CONNECTION.CONNECT" in p and p, 30,
                           what="the telescope at level B")
        assert any(k.startswith("Thermostat.") for k in props)  # B's own driver beside it
        setprop(b.port, f"{SCOPE}.CONNECTION.CONNECT=On")
        wait_until(lambda: getprop(b.port, f"{SCOPE}.CONNECTION.*").get(f"{SCOPE}.CONNECTION.CONNECT") == "On",
                   20, what="the telescope connected through B")
        with clients(b.port, 1) as (watcher,):
            watcher.send(f'<getProperties version="1.7" device="{SCOPE}"/>')
            first = watcher.wait_for(is_("setNumberVector", SCOPE, "EQUATORIAL_EOD_COORD"), 20)
            start_dec = float(member(first, "DEC"))
            setprop(b.port, f"{SCOPE}.ON_COORD_SET.TRACK=On")
            setprop(b.port, f"{SCOPE}.EQUATORIAL_EOD_COORD.RA;DEC=5;{start_dec - 20:.1f}")
            moved = watcher.wait_for(lambda e: is_("setNumberVector", SCOPE, "EQUATORIAL_EOD_COORD")(e)
                                     and abs(float(member(e, "DEC")) - start_dec) > 1.0, 60,
                                     what="the coordinates to change during the slew")
            assert float(member(moved, "DEC")) < start_dec


def test_root_restart_heals_without_reconnecting(broker_factory, home):
    port = free_port()
    sock = f"/tmp/indiserver-{os.getpid()}-heal"
    root = IndiServer("indi_simulator_telescope", port=port, extra=("-u", sock)).__enter__()
    try:
        a = broker_factory("--remote", f"127.0.0.1:{port}", env=home)
        b = broker_factory("--remote", f"127.0.0.1:{a.port}", "--driver", "rig:make_thermo",
                           env={**home, "PYTHONPATH": PYSCRIPTS})
        with clients(b.port, 1) as (c,):
            c.send('<getProperties version="1.7"/>')
            c.wait_for(is_("defSwitchVector", SCOPE, "CONNECTION"), 30)
            c.wait_for(is_("setNumberVector", "thermo", "TEMPERATURE"), 20)
            demo_pid = next(r["pid"] for r in b.status() if r["role"] == "driver")
            root.__exit__(None, None, None)
            mark = len(c.elements)
            c.wait_for(is_("delProperty", SCOPE), 15, start=mark, what="the telescope's delProperty")
            c.wait_for(lambda e: e.tag == "message" and "lost" in e.get("message"), 15, start=mark)
            root = IndiServer("indi_simulator_telescope", port=port, extra=("-u", sock)).__enter__()
            again = c.wait_for(is_("defSwitchVector", SCOPE, "CONNECTION"), 15, start=mark,
                               what="the telescope defined again")
            healed = c.elements.index(again, mark)
            assert not c.closed
            # B's local driver never stopped, and kept talking throughout (about 3 updates a
            # second): while the telescope was away, and after it came back.
            assert next(r["pid"] for r in b.status() if r["role"] == "driver") == demo_pid
            assert c.count("setNumberVector", "thermo", start=mark) - c.count("setNumberVector", "thermo",
                                                                               start=healed) > 0, \
                "the local driver's traffic stopped while the remote was away"
            wait_count(c, 5, "setNumberVector", "thermo", start=healed, timeout=20,
                       what="the local driver's traffic after the heal")
    finally:
        root.__exit__(None, None, None)


def test_blob_travels_the_tree_only_where_enabled(broker_factory, home):
    with IndiServer("indi_simulator_ccd", extra=("-u", f"/tmp/indiserver-{os.getpid()}-blob")) as root:
        a = broker_factory("--remote", f"127.0.0.1:{root.port}", "--remote-blobs", env=home)
        b = broker_factory("--remote", f"127.0.0.1:{a.port}", "--remote-blobs", env=home)
        with clients(b.port, 3) as (wants, never, control):
            for c in (wants, never, control):
                c.send('<getProperties version="1.7"/>')
            wants.send(f'<enableBLOB device="{CCD}">Also</enableBLOB>')
            control.wait_for(is_("defSwitchVector", CCD, "CONNECTION"), 30)
            control.send(new_vector("Switch", CCD, "CONNECTION", {"CONNECT": "On"}))
            control.wait_for(is_("defNumberVector", CCD, "CCD_EXPOSURE"), 30)
            control.send(new_vector("Number", CCD, "CCD_EXPOSURE", {"CCD_EXPOSURE_VALUE": "1"}))
            blob = wants.wait_for(is_("setBLOBVector", CCD), 40, what="the BLOB at level B")
            assert int(blob.root[0].get("size")) > 1_000_000
            control.wait_for(lambda e: is_("setNumberVector", CCD, "CCD_EXPOSURE")(e) and e.get("state") == "Ok",
                             20)
            # A marker the CCD writes after its BLOB, down the same path through A and B: once it
            # is in, the Never client has been sent everything the CCD wrote before.
            mark_through(never, CCD, "ACTIVE_DEVICES", "ACTIVE_SKYQUALITY")
            assert never.count("setBLOBVector") == 0
            assert never.count("setNumberVector", CCD, "CCD_EXPOSURE") > 0


def test_indiserver_chains_to_indibroker_python_driver(broker_factory, home):
    b = broker_factory("--driver", "rig:make_led", env={**home, "PYTHONPATH": PYSCRIPTS})
    wait_until(lambda: "led.LED.LED_ON" in getprop(b.port, "led.LED.*"), 30, what="the led driver")
    with IndiServer(f"led@127.0.0.1:{b.port}", extra=("-u", f"/tmp/indiserver-{os.getpid()}-chain")) as top:
        wait_until(lambda: getprop(top.port, "led.LED.*").get("led.LED.LED_ON") == "Off", 30,
                   what="indiserver serving the led through indibroker")
        setprop(top.port, "led.LED.LED_ON=On")
        wait_until(lambda: getprop(top.port, "led.LED.*").get("led.LED.LED_ON") == "On", 20,
                   what="the led switched through indiserver")
        assert getprop(b.port, "led.LED.*").get("led.LED.LED_ON") == "On"


def test_cycle_of_servers_is_bounded(broker_factory, home):
    env = {**home, "PYTHONPATH": PYSCRIPTS}
    port_a, port_b = free_port(), free_port()
    a = broker_factory("--driver", "rig:make_thermo", "--remote", f"127.0.0.1:{port_b}", port=port_a, env=env)
    b = broker_factory("--driver", "rig:make_led", "--remote", f"127.0.0.1:{port_a}", port=port_b, env=env)
    with clients(a.port, 1) as (c,), clients(b.port, 1) as (d,):
        for x in (c, d):
            x.send('<getProperties version="1.7"/>')
            x.wait_for(is_("defNumberVector", "thermo"), 30)
            x.wait_for(is_("defSwitchVector", "led"), 30)
        # The thermostat sends about 3 updates a second, each 0.5 degrees warmer than the last.
        # Each must reach each client once: an echo around the cycle would bring a value again.
        marks = {id(x): (len(x.elements), x.received_bytes) for x in (c, d)}
        wait_until(lambda: all(x.pump(0.05) >= 0 and x.count("setNumberVector", "thermo", "TEMPERATURE",
                                                              start=marks[id(x)][0]) >= 10 for x in (c, d)),
                   30, what="10 temperature updates at each client")
        for x in (c, d):
            mark, start_bytes = marks[id(x)]
            temps = [float(member(e, "TEMP")) for e in x.elements[mark:]
                     if is_("setNumberVector", "thermo", "TEMPERATURE")(e)]
            assert all(a < b for a, b in zip(temps, temps[1:], strict=False)), temps  # once each
            # Nothing else piles up either: a few hundred bytes per update, not an echo storm.
            per_update = (x.received_bytes - start_bytes) / len(temps)
            assert per_update < 6000, per_update
        # Every server still serves both devices and commands still reach the right driver.
        d.send(new_vector("Switch", "led", "LED", {"LED_ON": "On"}))
        on = c.wait_for(lambda e: is_("setSwitchVector", "led", "LED")(e) and member(e, "LED_ON") == "On", 15)
        assert on is not None


def test_remote_driver_snoops_a_device_served_here(broker_factory, home):
    """The CCD simulator on the remote indiserver snoops the telescope served by indibroker:
    the bridge relays our devices' traffic up, as a chained server does."""
    with IndiServer("indi_simulator_ccd", extra=("-u", f"/tmp/indiserver-{os.getpid()}-up")) as root:
        b = broker_factory("--remote", f"127.0.0.1:{root.port}", "--remote-blobs",
                           "--exdriver", "indi_simulator_telescope", env=home)
        with clients(b.port, 1) as (c,):
            c.send('<getProperties version="1.7"/>')
            c.send(f'<enableBLOB device="{CCD}">Also</enableBLOB>')
            c.wait_for(is_("defSwitchVector", SCOPE, "CONNECTION"), 30)
            c.send(new_vector("Switch", SCOPE, "CONNECTION", {"CONNECT": "On"}))
            c.wait_for(is_("setNumberVector", SCOPE, "EQUATORIAL_EOD_COORD"), 20)
            c.wait_for(is_("defSwitchVector", CCD, "CONNECTION"), 30)
            c.send(new_vector("Switch", CCD, "CONNECTION", {"CONNECT": "On"}))
            connected = c.wait_for(is_("defNumberVector", CCD, "CCD_EXPOSURE"), 30)
            # Coordinate updates flow up to the CCD meanwhile: each one goes up the bridge as it
            # comes down to this client, and the second comes a polling period after the first.
            wait_count(c, 2, "setNumberVector", SCOPE, "EQUATORIAL_EOD_COORD",
                       start=c.elements.index(connected) + 1, timeout=20,
                       what="the telescope's coordinates, twice, once the CCD is connected")
            c.send(new_vector("Number", CCD, "CCD_EXPOSURE", {"CCD_EXPOSURE_VALUE": "1"}))
            blob = c.wait_for(is_("setBLOBVector", CCD), 40, what="the exposure through the bridge")
            header = fits_header(blob)
            assert "DEC     =" in header or "OBJCTDEC" in header, header[:1200]


def test_status_shows_where_a_remote_points_and_its_link_since_when(broker_factory, home):
    port = free_port()  # nothing listens there yet
    b = broker_factory("--remote", f"localhost:{port}")
    row = wait_until(lambda: next((r for r in b.status() if r["role"] == "remote" and r.get("last_error")), None),
                     15, what="the bridge's first failed attempt in status")
    assert row["remote"] == f"localhost:{port}" and row["link"] == "reconnecting"
    assert "cannot connect" in row["last_error"]
    table = b.cli("status").stdout
    assert f"localhost:{port} reconnecting since " in table and "cannot connect" in table
    with IndiServer("indi_simulator_focus", port=port, extra=("-u", f"/tmp/indiserver-{os.getpid()}-st")):
        row = wait_until(lambda: next((r for r in b.status() if r["role"] == "remote" and r.get("link") == "connected"),
                                      None), 20, what="the bridge connected in status")
        assert "Focuser Simulator" in row["devices"]
        assert f"localhost:{port} connected since " in b.cli("status").stdout
