"""Supervision, live: real processes killed with SIGKILL, real drivers that crash, hang or flood.

Every test runs `indibroker start` as a real process tree and talks to it over real sockets; every
wait is on a condition with a deadline. The small misbehaving drivers live in tests/drivers/.
After each test the whole process tree must be gone (checked by the `run` fixture, and in the
body of the kill tests).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from support import Broker, RawClient, clients, is_, member, new_vector, wait_count, wait_until

pytestmark = pytest.mark.usefixtures("indi_bin")

HERE = Path(__file__).resolve().parent
DRIVERS = HERE / "drivers"
ROOT = HERE.parent
CCD = "CCD Simulator"
SCOPE = "Telescope Simulator"
SIMS = ("--exdriver", "indi_simulator_telescope", "--exdriver", "indi_simulator_ccd")
DEMO = f"{sys.executable} -m indibroker.workers.demo"  # the demo driver as an ordinary exdriver
DEMO_NAME = os.path.basename(sys.executable)  # its name in status: the executable's basename
HUNG = "Hung Device"


# -- helpers ---------------------------------------------------------------------------------
def finish(b: Broker) -> None:
    """Stop with SIGTERM: a clean exit and not one process of the tree left behind."""
    b.tree()
    assert b.stop() == 0, b.log()
    left = b.leftovers()
    assert left == [], [p.cmdline() for p in left]


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "indibroker.toml"
    path.write_text(text)
    return str(path)


class TimedClient(RawClient):
    """A RawClient whose pump returns as soon as something arrived (arrival times: `times`)."""

    def pump(self, timeout: float = 0.05, first: bool = True) -> int:
        return super().pump(timeout, first)

    def index(self, pred: Callable[[Any], bool], start: int = 0) -> int:
        for i in range(start, len(self.elements)):
            if pred(self.elements[i]):
                return i
        return -1


class Drain:
    """A client that asks for everything and reads it as fast as it can, without parsing it."""

    def __init__(self, port: int, request: bytes = b'<getProperties version="1.7"/>'):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(request)
        self.sock.settimeout(0.2)
        self.received = 0
        self.closed = False
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                self.closed = True
                return
            self.received += len(data)

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


@contextlib.contextmanager
def client(port: int) -> Iterator[TimedClient]:
    c = TimedClient(port)
    try:
        yield c
    finally:
        c.close()


def rows(b: Broker, role: str | None = None) -> list[dict[str, Any]]:
    return [r for r in b.status() if role is None or r["role"] == role]


def find_row(b: Broker, name: str) -> dict[str, Any] | None:
    for r in b.status():
        if r["name"] == name:
            return r
    return None


def wait_row(b: Broker, name: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0,
             what: str = "") -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        r = find_row(b, name)
        return r if r is not None and pred(r) else None

    found = wait_until(check, timeout, interval=0.1, what=what or f"status of {name}")
    assert found is not None
    return found


def running(r: dict[str, Any]) -> bool:
    return r["state"] == "RUNNING" and bool(r["pid"])


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z (\S+)\[(\d+)\] (\w+) (\S+): (.*)$")


def log_events(b: Broker, pattern: str) -> list[tuple[float, re.Match[str]]]:
    """(UTC epoch seconds, match) for each broker log message matching `pattern`."""
    out = []
    regex = re.compile(pattern)
    for line in b.log().splitlines():
        m = LOG_LINE.match(line)
        if m is None:
            continue
        found = regex.search(m.group(6))
        if found is not None:
            when = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f")
            out.append((when.replace(tzinfo=datetime.UTC).timestamp(), found))
    return out


def tree_rss(b: Broker) -> int:
    total = 0
    for p in b.tree():
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def message_text(e: Any) -> str:
    return e.get("message") or ""


def led(on: bool) -> str:
    return new_vector("Switch", "LED", "LED_CONTROL",
                      {"LED_ON": "On" if on else "Off", "LED_OFF": "Off" if on else "On"})


def led_is(on: bool) -> Callable[[Any], bool]:
    return lambda e: (e.tag == "setSwitchVector" and e.get("device") == "LED"
                      and member(e, "LED_ON") == ("On" if on else "Off"))


def led_round_trip(c: TimedClient, on: bool, timeout: float = 10.0) -> float:
    """Switch the demo's LED and return the seconds until its setSwitchVector came back."""
    mark = len(c.elements)
    sent = time.monotonic()
    c.send(led(on))
    el = c.wait_for(led_is(on), timeout, start=mark, what=f"LED {'on' if on else 'off'} reply")
    return c.times[c.elements.index(el, mark)] - sent


# -- 1. a driver killed with SIGKILL -------------------------------------------------------------
def test_kill9_driver_restarts_and_others_never_notice(run):
    b = run(*SIMS)
    with client(b.port) as c:
        c.send('<getProperties version="1.7"/>')
        c.wait_for(is_("defSwitchVector", CCD, "CONNECTION"), 30)
        c.wait_for(is_("defSwitchVector", SCOPE, "CONNECTION"), 30)
        c.send(new_vector("Switch", SCOPE, "CONNECTION", {"CONNECT": "On"}))
        first = c.wait_for(is_("setNumberVector", SCOPE, "EQUATORIAL_EOD_COORD"), 20)
        c.wait_for(is_("setNumberVector", SCOPE, "EQUATORIAL_EOD_COORD"), 5,
                   start=c.elements.index(first) + 1, what="the telescope's steady updates")
        pids = wait_until(lambda: (p := {r["name"]: r["pid"] for r in rows(b, "driver") if running(r)})
                          and len(p) == 2 and p, 20, what="both drivers running")
        b.tree()
        mark = len(c.elements)
        killed = time.monotonic()
        os.kill(pids["indi_simulator_ccd"], signal.SIGKILL)

        again = c.wait_for(is_("defSwitchVector", CCD, "CONNECTION"), 10, start=mark,
                           what="the CCD's properties defined again within 10 s")
        redefined_at = c.index(lambda e: e is again, mark)
        # The telescope's traffic, a while past the restart (it updates a few times a second).
        wait_count(c, 8, "setNumberVector", SCOPE, "EQUATORIAL_EOD_COORD", start=redefined_at + 1, timeout=20,
                   what="the telescope's updates after the CCD's restart")

        assert not c.closed, "the client's connection dropped"
        gone = c.index(is_("delProperty", CCD), mark)
        assert 0 <= gone < redefined_at, "no delProperty for the CCD before it came back"
        told = c.index(lambda e: e.tag == "message" and "indi_simulator_ccd" in message_text(e), mark)
        assert 0 <= told, "no message naming the driver"

        coords = [t for e, t in zip(c.elements, c.times, strict=True)
                  if e.tag == "setNumberVector" and e.get("device") == SCOPE
                  and e.get("name") == "EQUATORIAL_EOD_COORD" and t >= killed - 3]
        assert coords and coords[0] <= killed, "no telescope updates just before the kill"
        edges = [*coords, time.monotonic()]
        gaps = [later - earlier for earlier, later in zip(edges, edges[1:], strict=False)]
        assert max(gaps) <= 3.0, f"the telescope's updates stopped for {max(gaps):.1f} s: {gaps}"

        after = {r["name"]: r for r in rows(b, "driver")}
        assert after["indi_simulator_telescope"]["pid"] == pids["indi_simulator_telescope"]
        assert after["indi_simulator_telescope"]["restarts"] == 0
        assert after["indi_simulator_ccd"]["pid"] not in (None, pids["indi_simulator_ccd"])
        assert after["indi_simulator_ccd"]["restarts"] == 1
        assert after["indi_simulator_ccd"]["state"] == "RUNNING"
        assert not psutil.pid_exists(pids["indi_simulator_ccd"]) or \
            psutil.Process(pids["indi_simulator_ccd"]).status() == psutil.STATUS_ZOMBIE
    finish(b)


# -- 2. a driver that crashes every time -----------------------------------------------------------
def test_crash_looping_driver_backs_off_then_goes_fatal(run, tmp_path):
    config = write_toml(tmp_path, "[restart]\nbackoff_initial = 0.4\nbackoff_factor = 2.0\n")
    b = run("--config", config, "-r", "3", "--exdriver", str(DRIVERS / "exit_now.py"))
    with client(b.port) as c:
        c.send('<getProperties version="1.7"/>')
        row = wait_row(b, "exit_now.py", lambda r: r["state"] == "FATAL", 20, what="the driver to go FATAL")
        assert row["restarts"] == 3, row
        assert row["pid"] is None
        fatal = c.wait_for(lambda e: e.tag == "message" and ("FATAL" in message_text(e)
                                                             or "not restarting" in message_text(e)),
                           5, what="a message saying the driver is given up")
        assert "exit_now.py" in message_text(fatal)

        starts = [t for t, _ in log_events(b, r"^driver exit_now\.py started \(pid")]
        assert len(starts) == 4, f"expected the first start and 3 restarts, got {len(starts)}:\n{b.log()}"
        exits = [(t, float(m.group(1))) for t, m in
                 log_events(b, r"^driver exit_now\.py exited .*restarting in ([0-9.]+) s")]
        announced = [delay for _, delay in exits]
        assert announced == sorted(announced) and len(set(announced)) == 3, announced
        # Each try really waited what was announced (the log's clock counts milliseconds). From
        # an exit to the next start, not start to start: how long a try ran is the machine's.
        waited = [start - exited for (exited, _), start in zip(exits, starts[1:], strict=True)]
        assert all(w >= d - 0.002 for w, d in zip(waited, announced, strict=True)), \
            f"restarted before the announced delay: waited {waited}, announced {announced}"
        assert any("not restarting" in m.group(0) for _, m in
                   log_events(b, r"^driver exit_now\.py exited .*"))
        # The child's stderr was logged (what it said before dying is not lost).
        assert "[exit_now.py] exit_now: exiting at once" in b.log()
    finish(b)


# -- 3. the broker killed with SIGKILL -------------------------------------------------------------
def test_kill9_broker_clients_stay_connected_and_commands_flow_again(run):
    b = run()  # the built-in demo driver: devices LED and Thermostat
    with client(b.port) as c:
        c.send('<getProperties version="1.7"/>')
        c.wait_for(is_("defSwitchVector", "LED", "LED_CONTROL"), 20)
        led_round_trip(c, True)
        old = wait_row(b, "broker", running)["pid"]
        b.tree()
        os.kill(old, signal.SIGKILL)
        new = wait_row(b, "broker", lambda r: running(r) and r["pid"] != old, 10,
                       what="a new broker process")
        assert new["restarts"] == 1

        # Same socket: send until the reply comes back (the workers need to register again first).
        deadline = time.monotonic() + 10
        answered = False
        while not answered and time.monotonic() < deadline:
            mark = len(c.elements)
            c.send(led(False))
            with contextlib.suppress(AssertionError):
                c.wait_for(led_is(False), 1.0, start=mark, what="LED off reply")
                answered = True
            assert not c.closed, "the client's connection dropped when the broker died"
        assert answered, f"no reply through the restarted broker within 10 s:\n{b.log()}"
        led_round_trip(c, True, timeout=5)  # and it keeps working
        assert not c.closed
    finish(b)


def test_getproperties_sent_while_the_broker_restarts_is_answered(run):
    """A client that connects just as the broker dies sends getProperties once, as KStars does;
    the gateway holds its connection, so the request must not vanish with the broker."""
    b = run()
    old = wait_row(b, "broker", running)["pid"]
    b.tree()
    os.kill(old, signal.SIGKILL)
    with client(b.port) as c:
        c.send('<getProperties version="1.7"/>')
        c.wait_for(is_("defSwitchVector", "LED", "LED_CONTROL"), 10,
                   what="definitions for a getProperties sent while the broker was restarting")
    wait_row(b, "broker", lambda r: running(r) and r["pid"] != old, 10, what="a new broker")
    finish(b)


# -- 4. the gateway killed with SIGKILL ------------------------------------------------------------
def test_kill9_gateway_new_connections_served_again(run):
    b = run()
    with client(b.port) as c:
        c.send('<getProperties version="1.7"/>')
        c.wait_for(is_("defSwitchVector", "LED", "LED_CONTROL"), 20)
    old = wait_row(b, "gateway-0", running)["pid"]
    b.tree()
    os.kill(old, signal.SIGKILL)

    def served() -> bool:
        try:
            fresh = TimedClient(b.port)
        except OSError:
            return False
        with contextlib.closing(fresh):
            fresh.send('<getProperties version="1.7"/>')
            with contextlib.suppress(AssertionError):
                fresh.wait_for(is_("defSwitchVector", "LED", "LED_CONTROL"), 2)
                return True
        return False

    wait_until(served, 10, interval=0.2, what="a new connection to be served")
    new = wait_row(b, "gateway-0", lambda r: running(r) and r["pid"] != old, 5, what="a new gateway")
    assert new["restarts"] == 1
    finish(b)


# -- extra: an exdriver worker killed with SIGKILL ---------------------------------------------------
def test_kill9_exdriver_worker_brings_its_drivers_back(run):
    b = run()
    with client(b.port) as c:
        c.send('<getProperties version="1.7"/>')
        c.wait_for(is_("defSwitchVector", "LED", "LED_CONTROL"), 20)
        old_worker = wait_row(b, "exdriver-0", running)["pid"]
        old_driver = wait_row(b, "demo", running)["pid"]
        b.tree()  # remembered: the old driver must not survive its worker
        mark = len(c.elements)
        os.kill(old_worker, signal.SIGKILL)
        c.wait_for(is_("defSwitchVector", "LED", "LED_CONTROL"), 10, start=mark,
                   what="the demo's properties defined again")
        wait_row(b, "exdriver-0", lambda r: running(r) and r["pid"] != old_worker, 5, what="a new worker")
        wait_row(b, "demo", lambda r: running(r) and r["pid"] != old_driver, 5, what="the demo driver again")
        wait_until(lambda: not psutil.pid_exists(old_driver)
                   or psutil.Process(old_driver).status() == psutil.STATUS_ZOMBIE, 5,
                   what="the old driver process to be gone")
        led_round_trip(c, True, timeout=5)
        assert not c.closed
    finish(b)


# -- 5. a driver that never reads its stdin --------------------------------------------------------
def _flood(sock: socket.socket, chunk: bytes, total: int, seconds: float, sent: list[int]) -> None:
    """Write `chunk` again and again until `total` bytes or `seconds` have passed."""
    deadline = time.monotonic() + seconds
    pending = memoryview(b"")
    sock.setblocking(False)
    while sent[0] < total and time.monotonic() < deadline:
        if not pending:
            pending = memoryview(chunk)
        _, writable, _ = select.select([], [sock], [], 0.1)
        if not writable:
            continue
        try:
            n = sock.send(pending)
        except BlockingIOError:
            continue
        except OSError:
            return
        sent[0] += n
        pending = pending[n:]


def hung_flood_chunk() -> bytes:
    """~200 kB of newNumberVectors for the hung device, 50 members each (~3 kB per message)."""
    ones = "".join(f'<oneNumber name="VALUE{i}">{i}.5</oneNumber>' for i in range(50))
    one = f'<newNumberVector device="{HUNG}" name="VALUE">{ones}</newNumberVector>\n'
    return (one * (200_000 // len(one) + 1)).encode()


def test_hung_driver_flooded_costs_nobody_anything(run):
    b = run("--exdriver", str(DRIVERS / "no_stdin.py"), "--exdriver", DEMO)
    with client(b.port) as flooder, client(b.port) as prober:
        flooder.send(f'<getProperties version="1.7" device="{HUNG}"/>')
        flooder.wait_for(is_("defNumberVector", HUNG, "VALUE"), 20)
        prober.send('<getProperties version="1.7" device="LED"/>')
        prober.wait_for(is_("defSwitchVector", "LED", "LED_CONTROL"), 20)
        baseline = max(led_round_trip(prober, i % 2 == 0) for i in range(6))
        hung_pid = wait_row(b, "no_stdin.py", running)["pid"]
        worker = psutil.Process(wait_row(b, "exdriver-0", running)["pid"])
        tree_before, worker_before = tree_rss(b), worker.memory_info().rss

        total = 50 * 1024 * 1024
        sent = [0]
        flood = threading.Thread(target=_flood, args=(flooder.sock, hung_flood_chunk(), total, 8.0, sent),
                                 daemon=True)
        flood.start()
        latencies: list[float] = []
        samples: list[tuple[int, int, int]] = []  # (bytes flooded so far, tree RSS, worker RSS)
        on = True
        while flood.is_alive():
            latencies.append(led_round_trip(prober, on, timeout=10))
            on = not on
            samples.append((sent[0], tree_rss(b), worker.memory_info().rss))
            flood.join(0.1)
        latencies.append(led_round_trip(prober, on, timeout=10))  # behind whatever is still queued
        samples.append((sent[0], tree_rss(b), worker.memory_info().rss))

        mb = 1024 * 1024
        assert sent[0] >= 20 * mb, f"the flood was too small to mean anything: {sent[0]} bytes"
        assert len(latencies) >= 5, latencies
        # Normal for the demo is a few ms; during the flood it shares two cores with the flood's
        # path (client, gateway, broker, worker), so allow a generous bound that a blocked worker
        # (commands stuck behind the hung driver's input) could never meet.
        assert max(latencies) < max(1.5, 10 * baseline), \
            (f"the demo driver answered in {max(latencies):.2f} s during the flood (baseline "
             f"{baseline * 1000:.0f} ms): {[round(x, 2) for x in latencies]}")
        peak = max(tree for _, tree, _ in samples)
        assert peak < 300 * mb, f"tree RSS reached {peak / mb:.0f} MB"
        # Bounded, not growing with the flood: the worker holds at most its 8 MB input queue for
        # the hung driver, and the last three quarters of the flood add (almost) nothing anywhere.
        worker_peak = max(w for _, _, w in samples)
        assert worker_peak - worker_before < 32 * mb, \
            f"the worker grew by {(worker_peak - worker_before) / mb:.0f} MB for {sent[0] / mb:.0f} MB flooded"
        early = [tree for flooded, tree, _ in samples if flooded <= sent[0] / 4] or [tree_before]
        late = [tree for flooded, tree, _ in samples if flooded > sent[0] / 4]
        assert max(late) - max(early) < 24 * mb, \
            (f"RSS grew with the flood: {max(early) / mb:.0f} MB after a quarter, {max(late) / mb:.0f} MB "
             f"later (before: {tree_before / mb:.0f} MB)")

        assert re.search(r"driver no_stdin\.py is not reading its input: \d+ message\(s\) dropped", b.log()), \
            b.log()[-3000:]
        assert not flooder.closed and not prober.closed
        row = find_row(b, "no_stdin.py")
        assert row is not None and row["pid"] == hung_pid  # default hang timeout (60 s): not yet killed
    finish(b)


def test_hung_driver_killed_after_hang_timeout_and_restarted(run, tmp_path):
    config = write_toml(tmp_path, "hang_timeout = 3.0\n[restart]\nbackoff_initial = 0.2\n")
    b = run("--config", config, "--exdriver", str(DRIVERS / "no_stdin.py"), "--exdriver", DEMO)
    with client(b.port) as c:
        c.send(f'<getProperties version="1.7" device="{HUNG}"/>')
        c.wait_for(is_("defNumberVector", HUNG, "VALUE"), 20)
        hung_pid = wait_row(b, "no_stdin.py", running)["pid"]
        b.tree()
        # More than the pipe holds (64 kB), so input waits for a driver that never reads it.
        chunk = hung_flood_chunk()
        c.send(chunk * 2)
        mark = len(c.elements)
        started = time.monotonic()
        row = wait_row(b, "no_stdin.py", lambda r: running(r) and r["pid"] != hung_pid and r["restarts"] >= 1,
                       15, what="the hung driver to be killed and restarted")
        assert row["restarts"] >= 1
        waited = time.monotonic() - started
        assert waited > 2.0, f"killed after {waited:.1f} s, before its hang timeout of 3 s"
        c.wait_for(is_("defNumberVector", HUNG, "VALUE"), 10, start=mark, what="the device defined again")
        assert re.search(r"driver no_stdin\.py has not read its input for \d+ s: killing it", b.log())
        demo = find_row(b, DEMO_NAME)
        assert demo is not None and demo["restarts"] == 0 and running(demo)
    finish(b)


# -- extra: a driver that floods its stdout, and a client that reads all of it ---------------------
def test_flooding_driver_read_by_a_client_does_not_starve_its_neighbour(run):
    b = run("--exdriver", str(DRIVERS / "flood_stdout.py"), "--exdriver", DEMO)
    watcher = Drain(b.port)  # reads the whole flood
    try:
        with client(b.port) as prober:
            prober.send('<getProperties version="1.7" device="LED"/>')
            prober.wait_for(is_("defSwitchVector", "LED", "LED_CONTROL"), 20)
            wait_until(lambda: watcher.received > 1024 * 1024, 20, what="the flood to flow")
            flowed = watcher.received
            latencies = []
            deadline = time.monotonic() + 60
            on = True
            # Round trips for as long as the next 8 MB of the flood take to flow, and at least 10.
            while len(latencies) < 10 or watcher.received - flowed < 8 * 1024 * 1024:
                assert time.monotonic() < deadline, \
                    f"the flood did not keep flowing: {watcher.received - flowed} bytes in 60 s"
                latencies.append(led_round_trip(prober, on, timeout=10))
                on = not on
            # A worker that read the flooder until EAGAIN would never answer; one that shares its
            # turns answers quickly most of the time, with a tail from the backlog on the backbone.
            latencies.sort()
            median, worst = latencies[len(latencies) // 2], latencies[-1]
            assert median < 0.5 and worst < 3.0, \
                f"LED round trips during the flood: median {median:.2f} s, max {worst:.2f} s"
            assert tree_rss(b) < 300 * 1024 * 1024
            assert not watcher.closed and not prober.closed
    finally:
        watcher.close()


# -- 6. driver stop / start / restart at run time ---------------------------------------------------
def test_driver_stop_start_restart_through_the_control_socket(run):
    b = run()  # the demo driver, named "demo"
    with client(b.port) as c:
        c.send('<getProperties version="1.7"/>')
        c.wait_for(is_("defSwitchVector", "LED", "LED_CONTROL"), 20)
        first = wait_row(b, "demo", running)

        mark = len(c.elements)
        result = b.cli("driver", "stop", "demo")
        assert result.returncode == 0, result.stderr
        c.wait_for(is_("delProperty", "LED"), 10, start=mark, what="delProperty on stop")
        c.wait_for(is_("delProperty", "Thermostat"), 10, start=mark, what="delProperty on stop")
        stopped = wait_row(b, "demo", lambda r: r["state"] == "STOPPED", 10, what="demo STOPPED")
        assert stopped["pid"] is None
        assert stopped["restarts"] == 0
        assert not psutil.pid_exists(first["pid"]) or \
            psutil.Process(first["pid"]).status() == psutil.STATUS_ZOMBIE

        mark = len(c.elements)
        result = b.cli("driver", "start", "demo")
        assert result.returncode == 0, result.stderr
        c.wait_for(is_("defSwitchVector", "LED", "LED_CONTROL"), 10, start=mark, what="defs on start")
        again = wait_row(b, "demo", running, 10, what="demo RUNNING again")
        assert again["pid"] != first["pid"]
        assert again["restarts"] == 0, "an operator's stop was counted as a crash"

        mark = len(c.elements)
        result = b.cli("driver", "restart", "demo")
        assert result.returncode == 0, result.stderr
        gone = c.wait_for(is_("delProperty", "LED"), 10, start=mark, what="delProperty on restart")
        c.wait_for(is_("defSwitchVector", "LED", "LED_CONTROL"), 10, start=c.elements.index(gone, mark),
                   what="defs after restart")
        third = wait_row(b, "demo", lambda r: running(r) and r["pid"] not in (first["pid"], again["pid"]),
                         10, what="demo running with a new pid after restart")
        assert third["restarts"] == 0, "an operator's restart was counted as a crash"
        led_round_trip(c, True, timeout=5)

        assert b.cli("driver", "stop", "no-such-driver").returncode != 0
        assert not c.closed


def test_stopped_driver_stays_stopped_when_its_worker_is_restarted(run):
    """An operator's stop outlives a crash of the exdriver worker that supervised the driver."""
    # The demo, and beside it in the same worker a driver that stays running (a marker: the new
    # worker starts the drivers it starts all at once, before it serves anyone).
    b = run("--exdriver", DEMO, "--exdriver", f"{DRIVERS / 'chatty.py'} stays-stopped")
    with client(b.port) as c:
        c.send('<getProperties version="1.7"/>')
        c.wait_for(is_("defSwitchVector", "LED", "LED_CONTROL"), 20)
        c.wait_for(is_("defSwitchVector", "Chatty", "PING"), 20)
        wait_row(b, DEMO_NAME, running)
        mark = len(c.elements)
        assert b.cli("driver", "stop", DEMO_NAME).returncode == 0
        wait_row(b, DEMO_NAME, lambda r: r["state"] == "STOPPED", 10)
        # Its delProperty comes after everything it said before the stop.
        c.wait_for(is_("delProperty", "LED"), 10, start=mark, what="LED's delProperty on stop")
        c.wait_for(is_("delProperty", "Thermostat"), 10, start=mark, what="Thermostat's delProperty on stop")
        worker = wait_row(b, "exdriver-0", running)["pid"]
        b.tree()
        registered = len(log_events(b, r"^driver exdriver-0 registered"))
        mark = len(c.elements)
        os.kill(worker, signal.SIGKILL)
        new_worker = wait_row(b, "exdriver-0", lambda r: running(r) and r["pid"] != worker, 10,
                              what="a new worker")["pid"]
        wait_until(lambda: len(log_events(b, r"^driver exdriver-0 registered")) > registered, 10,
                   what="the new worker to register with the broker")
        # A running demo driver would answer this with its definitions. The marker: the new
        # worker's Chatty answers it, so the new worker has started what it was going to start.
        asked = len(c.elements)
        c.send('<getProperties version="1.7"/>')
        c.wait_for(is_("defSwitchVector", "Chatty", "PING"), 20, start=asked, what="Chatty, restarted, answering")
        assert not any("indibroker.workers.demo" in cmdline(p) for p in psutil.Process(new_worker).children()), \
            "the stopped driver was started again by the new worker"
        assert c.index(is_("defSwitchVector", "LED"), mark) < 0, \
            "the stopped driver was started again by the new worker"
        row = find_row(b, DEMO_NAME)
        assert row is not None and row["state"] == "STOPPED" and row["pid"] is None, row


# -- 7. indiserver's FIFO --------------------------------------------------------------------------
def test_fifo_start_and_stop_drivers(run, tmp_path):
    fifo = tmp_path / "indi.fifo"
    b = run("-f", str(fifo))

    def say(line: str) -> None:
        with open(fifo, "w") as fh:
            fh.write(line + "\n")

    with client(b.port) as c:
        c.send('<getProperties version="1.7"/>')
        wait_until(lambda: any(r["role"] == "gateway" and r["clients"] == 1 for r in rows(b)), 10,
                   what="the client to be connected")
        assert not any(r["role"] == "driver" for r in rows(b)), "a driver was served without being asked"

        say("start indi_simulator_telescope")
        c.wait_for(is_("defSwitchVector", SCOPE, "CONNECTION"), 20, what="the telescope")
        wait_row(b, "indi_simulator_telescope", running)

        mark = len(c.elements)
        say("stop indi_simulator_telescope")
        c.wait_for(is_("delProperty", SCOPE), 10, start=mark, what="the telescope going away")
        wait_until(lambda: (r := find_row(b, "indi_simulator_telescope")) is None or
                   (r["state"] == "STOPPED" and r["pid"] is None), 10, what="the telescope STOPPED")

        say('start indi_simulator_ccd -n "My CCD"')
        c.wait_for(is_("defSwitchVector", "My CCD", "CONNECTION"), 20, what='the CCD as "My CCD"')
        wait_row(b, "My CCD", lambda r: running(r) and r["devices"] == ["My CCD"], 10,
                 what='driver "My CCD" serving device "My CCD"')
        assert c.count(device=CCD) == 0


# -- 8. per-driver logs ------------------------------------------------------------------------------
def test_log_dir_gets_each_drivers_stderr(run, tmp_path):
    logs = tmp_path / "driver-logs"
    marker = "chatty-marker-7f3a"
    b = run("--log-dir", str(logs), "--exdriver", f"{DRIVERS / 'chatty.py'} {marker}",
            "--exdriver", str(DRIVERS / "exit_now.py"), "-r", "0")
    own = logs / "chatty.py.log"
    wait_until(lambda: own.exists() and f"{marker}: got getProperties" in own.read_text(), 10,
               what="the driver's stderr in its own log file")
    assert f"{marker}: started" in own.read_text()
    wait_until(lambda: f"[chatty.py] {marker}: got getProperties" in b.log(), 10,
               what="the driver's stderr in the main log")
    assert f"[chatty.py] {marker}: started" in b.log()
    other = logs / "exit_now.py.log"
    wait_until(lambda: other.exists() and "exit_now: exiting at once" in other.read_text(), 10)
    assert marker not in other.read_text(), "one driver's stderr landed in another's log file"
    assert "exit_now" not in own.read_text()
    # One timestamp format everywhere: the main log's, in UTC.
    first = own.read_text().splitlines()[0]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", first), first


# -- 9. status ---------------------------------------------------------------------------------------
STATUS_KEYS = {"role", "name", "pid", "state", "restarts", "uptime", "cpu_percent", "rss"}


def test_status_table_and_json(run):
    b = run(*SIMS)
    wait_until(lambda: len([r for r in rows(b, "driver") if running(r) and r["devices"]]) == 2, 20,
               what="both drivers running with their devices")
    table = b.cli("status")
    assert table.returncode == 0, table.stderr
    data = b.status()
    lines = table.stdout.strip().splitlines()
    assert lines[0].split() == ["ROLE", "NAME", "PID", "STATE", "RESTARTS", "UPTIME", "CPU%", "RSS(MB)",
                                "DEVICES/CLIENTS"]
    assert len(lines) == len(data) + 1
    roles = {r["role"] for r in data}
    assert {"broker", "gateway", "exdriver", "driver"} <= roles
    for row in data:
        assert STATUS_KEYS <= row.keys(), f"{row['name']}: missing {STATUS_KEYS - row.keys()}"
        assert row["state"] == "RUNNING" and isinstance(row["pid"], int)
        assert isinstance(row["rss"], int) and row["rss"] > 0
        assert isinstance(row["cpu_percent"], int | float)
        assert isinstance(row["uptime"], int | float) and row["uptime"] >= 0
        line = next((ln for ln in lines[1:] if ln.split()[:3] == [row["role"], row["name"], str(row["pid"])]),
                    None)
        assert line is not None, f"no table line for {row['role']} {row['name']} {row['pid']}:\n{table.stdout}"
        cells = line.split()
        assert cells[3] == row["state"] and cells[4] == str(row["restarts"])
        assert re.fullmatch(r"\d+[mh]\d\d[sm]", cells[5]), cells
        float(cells[6]), float(cells[7])  # CPU% and RSS(MB) are numbers
    for row in (r for r in data if r["role"] == "driver"):
        assert "devices" in row
        line = next(ln for ln in lines if f" {row['pid']} " in ln)
        for device in row["devices"]:
            assert device in line
    drivers = {r["name"]: r["devices"] for r in data if r["role"] == "driver"}
    assert drivers == {"indi_simulator_telescope": [SCOPE], "indi_simulator_ccd": [CCD]}
    # Every process of the tree but the arbiter itself has a row.
    assert b.proc is not None
    pids = {p.pid for p in b.tree()} - {b.proc.pid}
    assert pids <= {r["pid"] for r in data}, (pids, data)


# -- soak: bench/chaos.py ----------------------------------------------------------------------------
@pytest.mark.soak
@pytest.mark.timeout(180)
def test_chaos_bench_20s(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos.py"), "--seconds", "20"],
                            capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True


def test_hung_worker_is_killed_and_restarted(broker_factory, tmp_path):
    """A gateway that stops (SIGSTOP: alive, but silent) is replaced; new clients are served."""
    config = tmp_path / "liveness.toml"
    config.write_text("worker_liveness = 3.0\n")
    b = broker_factory("--config", str(config))
    old = next(r["pid"] for r in b.status() if r["role"] == "gateway")
    os.kill(old, signal.SIGSTOP)
    try:
        wait_until(lambda: next((r["pid"] for r in b.status() if r["role"] == "gateway"
                                 and r["pid"] not in (None, old)), None), 20, what="a new gateway")
    finally:
        try:
            os.kill(old, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert "shown no sign of life" in b.log()
    with clients(b.port, 1) as (c,):
        c.send('<getProperties version="1.7"/>')
        c.wait_for(is_("defSwitchVector", "LED"), 20)


def test_killed_exdriver_worker_tells_clients(broker_factory):
    b = broker_factory()
    with clients(b.port, 1) as (c,):
        c.send('<getProperties version="1.7"/>')
        c.wait_for(is_("defSwitchVector", "LED"), 20)
        worker = next(r["pid"] for r in b.status() if r["role"] == "exdriver")
        # What the arbiter tells the next worker is what the dead one had published.
        wait_until(lambda: any("LED" in r.get("devices", []) for r in b.status() if r["role"] == "driver"),
                   10, what="the demo's devices in status")
        mark = len(c.elements)
        os.kill(worker, signal.SIGKILL)
        c.wait_for(is_("delProperty", "LED"), 15, start=mark, what="LED's delProperty")
        c.wait_for(lambda e: e.tag == "message" and e.get("device") == "LED" and "died" in e.get("message"),
                   15, start=mark, what="a message saying why")
        c.wait_for(is_("defSwitchVector", "LED"), 20, start=mark, what="LED defined again")
