"""Issue 2: `indibroker start` serves real indi-bin drivers to real clients through the broker.

Every test runs the real programs: indibroker's own processes, Debian's indi_simulator_* drivers,
indi_getprop / indi_setprop, and the real indiserver where we compare.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from support import (
    IndiServer,
    RawClient,
    clients,
    fits_header,
    getprop,
    is_,
    mark_through,
    member,
    new_vector,
    setprop,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("indi_bin")

CCD = "CCD Simulator"
SCOPE = "Telescope Simulator"
SIMS = ("--exdriver", "indi_simulator_telescope", "--exdriver", "indi_simulator_ccd")
# Text members each simulator echoes in a setTextVector when set (markers: support.mark_through).
CCD_MARK = ("ACTIVE_DEVICES", "ACTIVE_SKYQUALITY")
SCOPE_MARK = ("ACTIVE_DEVICES", "ACTIVE_GPS")


def names(props: dict[str, str]) -> set[str]:
    return {".".join(k.split(".")[:2]) for k in props}


def driver_pids(broker, expect: int = 2) -> dict[str, int]:
    """Driver name -> pid, once `expect` drivers are running."""
    return wait_until(lambda: (pids := {r["name"]: r["pid"] for r in broker.status()
                                        if r["role"] == "driver" and r["pid"]})
                      and len(pids) == expect and pids, 20, what=f"{expect} running drivers")


def test_same_properties_as_indiserver(broker_factory, home):
    b = broker_factory(*SIMS, "--no-server-device", env=home)  # indiserver has no such device
    ours = wait_until(lambda: (p := names(getprop(b.port))) and len({k.split(".")[0] for k in p}) == 2 and p,
                      30, what="both simulators' properties")
    with IndiServer("indi_simulator_telescope", "indi_simulator_ccd",
                    extra=("-u", f"/tmp/indiserver-test-{b.port}")) as real:
        theirs = wait_until(lambda: (p := names(getprop(real.port))) and len(p) >= len(ours) and p, 30,
                            what="indiserver's properties")
    assert ours == theirs
    assert {"CCD Simulator.CONNECTION", "Telescope Simulator.CONNECTION"} <= ours


def test_setprop_connects_ccd(broker_factory, home):
    b = broker_factory(*SIMS, env=home)
    wait_until(lambda: "CCD Simulator.CONNECTION.CONNECT" in getprop(b.port, "CCD Simulator.CONNECTION.*"),
               30, what="CCD connection property")
    setprop(b.port, "CCD Simulator.CONNECTION.CONNECT=On")
    wait_until(lambda: getprop(b.port, "CCD Simulator.CONNECTION.*").get(
        "CCD Simulator.CONNECTION.CONNECT") == "On", 20, what="CCD connected")


def expose(control: RawClient, seconds: float = 1.0) -> None:
    control.send(new_vector("Number", CCD, "CCD_EXPOSURE", {"CCD_EXPOSURE_VALUE": str(seconds)}))


def connect_ccd(control: RawClient) -> None:
    control.send('<getProperties version="1.7"/>')
    control.wait_for(is_("defSwitchVector", CCD, "CONNECTION"), 30, what="CCD CONNECTION")
    control.send(new_vector("Switch", CCD, "CONNECTION", {"CONNECT": "On"}))
    control.wait_for(is_("defNumberVector", CCD, "CCD_EXPOSURE"), 30, what="CCD_EXPOSURE defined")


def test_blobs_reach_only_clients_that_asked(broker_factory, home):
    b = broker_factory(*SIMS, env=home)
    with clients(b.port, 4) as (also, never, only, control):
        for c in (also, never, only):
            c.send('<getProperties version="1.7"/>')
        also.send(f'<enableBLOB device="{CCD}">Also</enableBLOB>')
        only.send(f'<enableBLOB device="{CCD}">Only</enableBLOB>')
        connect_ccd(control)
        mark_only = len(only.elements)
        for exposure in (1, 2):
            expose(control)
            also.wait_for(lambda e, n=exposure: e.tag == "setBLOBVector" and also.count("setBLOBVector") >= n,
                          30, what=f"BLOB of exposure {exposure} at the Also client")
        only.wait_for(lambda e: only.count("setBLOBVector") >= 2, 30, what="2 BLOBs at the Only client")
        # Markers the CCD writes after both BLOBs: the Also and Never clients have been sent
        # everything the CCD wrote before. Then one through the telescope for the Only client (it
        # gets nothing of the CCD but BLOBs): routed after all of that, it arrives behind it.
        mark_through(also, CCD, *CCD_MARK)
        mark_through(never, CCD, *CCD_MARK)
        mark_through(only, SCOPE, *SCOPE_MARK)
        assert also.count("setBLOBVector", CCD) == 2
        assert never.count("setBLOBVector") == 0
        assert never.count("setNumberVector", CCD, "CCD_EXPOSURE") > 0  # it did get the rest
        ccd_after = [e for e in only.elements[mark_only:] if e.get("device") == CCD]
        assert ccd_after and all(e.tag == "setBLOBVector" for e in ccd_after), \
            {e.tag for e in ccd_after}
        blob = also.wait_for(is_("setBLOBVector", CCD))
        assert "SIMPLE  =" in fits_header(blob)


def test_ccd_snoops_telescope_through_broker(broker_factory, home):
    """The CCD simulator writes what it snooped from the telescope into its FITS header."""
    b = broker_factory(*SIMS, env=home)
    with clients(b.port, 1) as (control,):
        control.send('<getProperties version="1.7"/>')
        control.send(f'<enableBLOB device="{CCD}">Also</enableBLOB>')
        control.wait_for(is_("defSwitchVector", SCOPE, "CONNECTION"), 30)
        control.send(new_vector("Switch", SCOPE, "CONNECTION", {"CONNECT": "On"}))
        control.wait_for(is_("defNumberVector", SCOPE, "EQUATORIAL_EOD_COORD"), 30)
        connect_ccd(control)
        control.wait_for(is_("defTextVector", CCD, "ACTIVE_DEVICES"), 10)
        mark = len(control.elements)
        control.send(new_vector("Text", CCD, "ACTIVE_DEVICES", {"ACTIVE_TELESCOPE": SCOPE}))
        control.wait_for(is_("setTextVector", CCD, "ACTIVE_DEVICES"), 10, start=mark)
        # The CCD asks to snoop the telescope's coordinates; the telescope's answer (its current
        # coordinates) goes to every client and to the CCD, which asked for it.
        control.wait_for(is_("defNumberVector", SCOPE, "EQUATORIAL_EOD_COORD"), 20, start=mark,
                         what="the telescope's coordinates, answering the CCD's snoop request")
        expose(control)
        blob = control.wait_for(is_("setBLOBVector", CCD), 30, what="the exposure")
        header = fits_header(blob)
        assert "FOCALLEN" in header, header[:800]
        dec = re.search(r"DEC\s*=\s*([-+0-9.E]+)", header)
        assert dec is not None, header[:800]
        assert float(dec.group(1)) > 80  # a parked simulator points at the pole


def test_two_clients_see_change_made_by_third(broker_factory, home):
    b = broker_factory(*SIMS, env=home)
    with clients(b.port, 3) as (a, c, setter):
        for x in (a, c):
            x.send('<getProperties version="1.7"/>')
            x.wait_for(is_("defSwitchVector", SCOPE, "CONNECTION"), 30)
        setter.send(f'<getProperties version="1.7" device="{SCOPE}"/>')
        setter.send(new_vector("Switch", SCOPE, "CONNECTION", {"CONNECT": "On"}))
        for x in (a, c):
            el = x.wait_for(is_("setSwitchVector", SCOPE, "CONNECTION"), 20, what="the CONNECTION change")
            assert member(el, "CONNECT") == "On"


def test_garbage_client_dropped_alone(broker_factory, home):
    b = broker_factory(*SIMS, env=home)
    with clients(b.port, 3) as (good, bad, worse):
        good.send('<getProperties version="1.7"/>')
        good.wait_for(is_("defSwitchVector", SCOPE, "CONNECTION"), 30)
        good.send(new_vector("Switch", SCOPE, "CONNECTION", {"CONNECT": "On"}))
        good.wait_for(is_("setNumberVector", SCOPE, "EQUATORIAL_EOD_COORD"), 20)
        pids = driver_pids(b)
        bad.send(b"\x00\xffthis is not XML at all\x01<<<")
        worse.send('<getProperties version="1.7"/><newSwitchVector device="x"><a></b></newSwitchVector>')
        bad.wait_closed(10)
        worse.wait_closed(10)
        mark = len(good.elements)
        good.wait_for(is_("setNumberVector", SCOPE, "EQUATORIAL_EOD_COORD"), 10, start=mark,
                      what="traffic after the bad clients")
        assert driver_pids(b) == pids
        assert "malformed input" in b.log()


def test_stop_leaves_nothing_running(broker_factory, home, tmp_path):
    b = broker_factory(*SIMS, env=home)
    wait_until(lambda: len([r for r in b.status() if r["role"] == "driver" and r["pid"]]) == 2, 20)
    procs = b.tree()
    assert any("indi_simulator_ccd" in " ".join(p.cmdline()) for p in procs)
    assert len(procs) >= 6  # arbiter, broker, gateway, exdriver worker, two drivers
    assert b.stop() == 0
    assert b.leftovers() == []
    assert not (tmp_path / "run" / str(b.port)).exists()


def test_sigkill_of_arbiter_leaves_no_orphans(broker_factory, home):
    b = broker_factory(*SIMS, env=home)
    wait_until(lambda: len([r for r in b.status() if r["role"] == "driver" and r["pid"]]) == 2, 20)
    assert len(b.tree()) >= 6  # remembered, to look for survivors afterwards
    os.kill(b.proc.pid, signal.SIGKILL)
    b.proc.wait()
    left = b.leftovers(timeout=10)
    assert left == [], [p.cmdline() for p in left]


@pytest.mark.parametrize("request_xml", ['<getProperties/>', '<getProperties version="2.0"/>',
                                         '<getProperties version="1.7" device="CCD Simulator"/>'])
def test_bad_getproperties_version_harms_no_driver(broker_factory, home, request_xml):
    b = broker_factory(*SIMS, env=home)
    with clients(b.port, 2) as (watcher, client):
        watcher.send('<getProperties version="1.7"/>')
        watcher.wait_for(is_("defSwitchVector", CCD, "CONNECTION"), 30)
        watcher.wait_for(is_("defSwitchVector", SCOPE, "CONNECTION"), 30)
        before = driver_pids(b)
        client.send(request_xml)
        client.wait_for(is_("defSwitchVector", CCD, "CONNECTION"), 20, what="definitions for the client")
        # Markers each driver writes after it handled the request: a driver that died of it
        # would have had its delProperty sent to the watcher before them.
        mark_through(watcher, CCD, *CCD_MARK, sender=client)
        mark_through(watcher, SCOPE, *SCOPE_MARK, sender=client)
        assert watcher.count("delProperty") == 0
        rows = {r["name"]: r for r in b.status() if r["role"] == "driver"}
        assert {n: r["pid"] for n, r in rows.items()} == before
        assert all(r["restarts"] == 0 for r in rows.values())


def test_client_ping_is_answered(broker_factory):
    b = broker_factory()
    with clients(b.port, 1) as (c,):
        c.send('<pingRequest uid="abc/1"/><pingRequest uid="abc/2"/>')
        first = c.wait_for(is_("pingReply"), 10)
        assert first.get("uid") == "abc/1"
        c.wait_for(lambda e: e.tag == "pingReply" and e.get("uid") == "abc/2", 10)


def test_instances_side_by_side_and_no_stealing(broker_factory, tmp_path):
    a = broker_factory()
    b = broker_factory()
    assert a.port != b.port
    for x in (a, b):
        with clients(x.port, 1) as (c,):
            c.send('<getProperties version="1.7"/>')
            c.wait_for(is_("defSwitchVector", "LED"), 20, what="the demo driver")
    # A second instance on a's port fails loudly and leaves a untouched.
    result = subprocess.run(
        [sys.executable, "-m", "indibroker", "start", "--port", str(a.port),
         "--runtime-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "another indibroker holds" in result.stderr
    assert a.proc.poll() is None
    assert a.cli("status").returncode == 0


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "indibroker", "start", "--port", str(port),
             "--runtime-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "cannot listen" in result.stderr
    assert not (tmp_path / "run" / str(port)).exists()
