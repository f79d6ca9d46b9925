"""Issue 4: Python drivers in their own processes, and the IPyServer-compatible API.

The rig script in tests/pyscripts/rig.py is written as for indipyserver; only its import differs.
A real indipyclient IPyClient and raw sockets talk to it; the telescope is the real simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from support import RawClient, alive, clients, getprop, is_, member, new_vector, port_open, process_tree, wait_until

pytestmark = pytest.mark.usefixtures("indi_bin")

SCRIPTS = Path(__file__).parent / "pyscripts"
SCOPE = "Telescope Simulator"


class Rig:
    """tests/pyscripts/rig.py run as a user would: `python3 rig.py PORT MAXCONNECTIONS`."""

    def __init__(self, tmp_path: Path, port: int, maxconnections: int = 5):
        self.port = port
        home = tmp_path / "home"
        home.mkdir(exist_ok=True)
        (tmp_path / "tmp").mkdir(exist_ok=True)
        # Its own temporary directory: a test can see what the rig leaves behind.
        env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp_path / "tmp")}
        self.log_path = tmp_path / "rig.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "rig.py", str(port), str(maxconnections)],
                                     cwd=SCRIPTS, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_until(lambda: port_open(port) or self.proc.poll() is not None, 30, what="the rig to listen")
        assert self.proc.poll() is None, self.log_path.read_text()
        self.known: list[psutil.Process] = []

    def tree(self) -> list[psutil.Process]:
        procs = process_tree(self.proc.pid)
        self.known += [p for p in procs if p.pid not in {k.pid for k in self.known}]
        return procs

    def stop(self, signum: int = signal.SIGINT) -> int:
        """Ctrl-C by default, as a user stops a script; the script's exit status."""
        self.tree()
        os.kill(self.proc.pid, signum)
        try:
            code = self.proc.wait(30)
        finally:
            self._log.close()
        wait_until(lambda: not alive(self.known), 10, what="every process of the rig to end")
        return code


@pytest.fixture
def rig(tmp_path):
    from support import free_port

    made = []

    def start(maxconnections: int = 5) -> Rig:
        r = Rig(tmp_path, free_port(), maxconnections)
        made.append(r)
        return r

    yield start
    for r in made:
        if r.proc.poll() is None:
            with contextlib.suppress(Exception):
                r.stop()
        for p in alive(r.known):
            p.kill()


def test_ipyclient_sees_all_devices_and_drives_led(rig):
    from indipyclient import IPyClient

    r = rig()

    async def session() -> str:
        client = IPyClient(indihost="localhost", indiport=r.port)
        client.set_vector_timeouts(timeout_enable=False)
        task = asyncio.create_task(client.asyncrun())
        try:
            async def until(pred, timeout=30.0):
                end = asyncio.get_running_loop().time() + timeout
                while not pred():
                    assert asyncio.get_running_loop().time() < end, "timed out"
                    await asyncio.sleep(0.05)

            # Every device of the rig, however the drivers' start-ups interleave.
            await until(lambda: {"thermo", "led", "crashy", "snooper", SCOPE} <= set(client))
            await until(lambda: "LED" in client["led"])
            await client.send_newVector("led", "LED", members={"LED_ON": "On"})
            await until(lambda: client["led"]["LED"]["LED_ON"] == "On", 15)
            return str(client["led"]["LED"].state)
        finally:
            client.shutdown()
            await asyncio.wait_for(task, 10)

    assert asyncio.run(session()) == "Ok"
    # Each Python driver runs in a process of its own.
    drivers = [p for p in r.tree() if p.cmdline()[1:2] == ["rig.py"] and p.pid != r.proc.pid]
    assert len(drivers) == 4
    r.stop()


def test_crash_in_event_handler_costs_only_that_driver(rig):
    r = rig()
    with clients(r.port, 1) as (c,):
        c.send('<getProperties version="1.7"/>')
        c.wait_for(is_("defSwitchVector", "crashy", "CRASH"), 30)
        c.wait_for(is_("setNumberVector", "thermo", "TEMPERATURE"), 10)
        before = {p.pid for p in r.tree()}
        mark = len(c.elements)
        c.send(new_vector("Switch", "crashy", "CRASH", {"BOOM": "On"}))
        gone = c.wait_for(is_("delProperty", "crashy"), 15, start=mark, what="crashy's delProperty")
        back = c.wait_for(is_("defSwitchVector", "crashy", "CRASH"), 20, start=c.elements.index(gone),
                          what="crashy defined again")
        # The thermostat kept serving the same connection throughout, and still does.
        between = c.elements[mark:c.elements.index(back)]
        assert any(matches_thermo(e) for e in between)
        mark = len(c.elements)
        c.wait_for(is_("setNumberVector", "thermo", "TEMPERATURE"), 10, start=mark)
        assert not c.closed
        after = {p.pid for p in r.tree()}
        assert len(before - after) == 1  # only the crashed driver's process was replaced
    r.stop()


def matches_thermo(e) -> bool:
    return e.tag == "setNumberVector" and e.get("device") == "thermo"


def test_crash_in_hardware_loop_restarts_alone(broker_factory, tmp_path):
    config = tmp_path / "rig.toml"
    config.write_text(
        '[[driver]]\npython = "rig:make_crashy"\nenv = {CRASH_IN_HARDWARE = "1"}\n'
        '[[driver]]\npython = "rig:make_thermo"\n'
    )
    b = broker_factory("--config", str(config), env={"PYTHONPATH": str(SCRIPTS)})
    with clients(b.port, 1) as (c,):
        c.send('<getProperties version="1.7"/>')
        c.wait_for(is_("defSwitchVector", "crashy", "CRASH"), 30)
        c.wait_for(is_("delProperty", "crashy"), 15, what="the hardware loop crash")
        c.wait_for(lambda e: e.tag == "defSwitchVector" and e.get("device") == "crashy"
                   and c.count("defSwitchVector", "crashy") >= 2, 20, what="crashy restarted and defined")
        mark = len(c.elements)
        c.wait_for(is_("setNumberVector", "thermo", "TEMPERATURE"), 10, start=mark)
        rows = {row["name"]: row for row in b.status() if row["role"] == "driver"}
        assert rows["make_crashy"]["restarts"] >= 1
        assert rows["make_thermo"]["restarts"] == 0
        assert not c.closed


def test_python_driver_snoops_real_telescope(rig):
    r = rig()
    with clients(r.port, 1) as (c,):
        c.send('<getProperties version="1.7"/>')
        c.wait_for(is_("defSwitchVector", SCOPE, "CONNECTION"), 30)
        c.send(new_vector("Switch", SCOPE, "CONNECTION", {"CONNECT": "On"}))
        coords = c.wait_for(is_("setNumberVector", SCOPE, "EQUATORIAL_EOD_COORD"), 20)
        snooped = c.wait_for(lambda e: is_("setNumberVector", "snooper", "SNOOPED")(e)
                             and float(member(e, "DEC")) != 0.0, 20, what="the snooper's copy")
        assert abs(float(member(snooped, "DEC")) - float(member(coords, "DEC"))) < 1.0
        assert abs(float(member(snooped, "RA")) - float(member(coords, "RA"))) < 1.0
    r.stop()


def test_maxconnections_refuses_the_extra_client_cleanly(rig):
    r = rig(maxconnections=2)
    with clients(r.port, 2) as served:
        for c in served:
            c.send('<getProperties version="1.7"/>')
            c.wait_for(is_("defNumberVector", "thermo"), 30)
        extra = RawClient(r.port)
        try:
            extra.send('<getProperties version="1.7"/>')
            extra.wait_closed(10)
            said = [e for e in extra.elements if e.tag == "message"]
            assert said and "maxconnections" in said[0].get("message")
            assert not any(e.tag.startswith("def") for e in extra.elements)
        finally:
            extra.close()
        for c in served:
            mark = len(c.elements)
            c.wait_for(is_("setNumberVector", "thermo", "TEMPERATURE"), 10, start=mark)
            assert not c.closed
    # Slots freed by leaving clients are usable again (once the gateway has seen them go).
    def served_again() -> bool:
        with clients(r.port, 1) as (again,):
            again.send('<getProperties version="1.7"/>')
            try:
                again.wait_for(is_("defNumberVector", "thermo"), 5)
                return True
            except AssertionError:
                return False
    wait_until(served_again, 20, what="a new client served after others left")
    r.stop()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_script_stopped_by_ctrl_c_or_sigterm_ends_cleanly_and_leaves_nothing(rig, tmp_path, signum):
    r = rig()
    wait_until(lambda: "LED" in " ".join(getprop(r.port)), 30, what="the rig serving")
    assert r.stop(signum) == 0
    log = r.log_path.read_text()
    assert "Traceback" not in log, log
    assert not list((tmp_path / "tmp").glob("indibroker-ipyserver-*")), "its temporary directory was left"
    from indibroker.broker.runtime import RuntimeDir

    assert not RuntimeDir.for_port(r.port).path.exists(), "its runtime directory was left"
