"""The executable-driver worker in-process on a fake backbone, driven turn by turn, no sleeps.

Most tests hand the worker a fake of its OS calls (`FakeCalls`): a "driver" is three real pipes
and no process, so the test writes what the driver says and reads what it is sent, and makes it
exit when it likes. A few run tiny real driver scripts (tests/drivers/) where the OS is the point:
stderr to the driver's log file, and a driver that ignores SIGTERM when the arbiter has died.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
from fakes import FakeBackbone, config, runtime_dir, turn_until

from indibroker.broker import wire
from indibroker.broker.config import Config, DriverConfig
from indibroker.broker.pacing import BLOB_WINDOW
from indibroker.workers import driverprocess, exdriver
from indibroker.workers.driverprocess import Child, ProcessCalls
from indibroker.workers.exdriver import ExDriverWorker
from indibroker.workers.reactor import Reactor

DRIVERS = Path(__file__).parent / "drivers"
FAST = {"backoff_initial": 0.01}  # restart at once: these tests wait on turns, not on policy


class FakeDriver:
    """A spawned 'driver' that is three pipes: the worker holds the ends a Popen would give it."""

    def __init__(self, pid: int, argv: Sequence[str], env: dict[str, str]):
        self.pid = pid
        self.argv = list(argv)
        self.env = env
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        for fd in (in_r, in_w, out_r, out_w):
            os.set_blocking(fd, False)
        self.stdin = os.fdopen(in_w, "wb", buffering=0)
        self.stdout = os.fdopen(out_r, "rb", buffering=0)
        self.stderr = os.fdopen(err_r, "rb", buffering=0)
        self._ends = {"in": in_r, "out": out_w, "err": err_w}  # the driver's side
        self.code: int | None = None
        self.received = b""
        self.reads = True  # it reads its stdin (False: a hung driver)
        self._pending = b""

    def say(self, text: str | bytes) -> None:
        """Write to its stdout (as much as the pipe takes now; `pump` writes the rest)."""
        self._pending += text.encode() if isinstance(text, str) else text
        self.pump()

    def pump(self) -> None:
        if self._pending and "out" in self._ends:
            try:
                n = os.write(self._ends["out"], self._pending)
            except BlockingIOError:
                return
            self._pending = self._pending[n:]

    def heard(self) -> bytes:
        """Everything it has been sent so far."""
        while self.reads and "in" in self._ends:
            try:
                data = os.read(self._ends["in"], 1 << 20)
            except BlockingIOError:
                break
            if not data:
                break
            self.received += data
        return self.received

    def exit(self, code: int) -> None:
        if self.code is None:
            self.code = code
            self.close()
            signal.raise_signal(signal.SIGCHLD)

    def close(self) -> None:
        for fd in self._ends.values():
            os.close(fd)
        self._ends.clear()


class FakeCalls(ProcessCalls):
    """The OS as the driver process part sees it, with no process in it."""

    def __init__(self) -> None:
        super().__init__()
        self.drivers: list[FakeDriver] = []
        self.signals: list[tuple[int, int]] = []  # (pid, signal), in order
        self.missing: set[str] = set()
        self.ignores_term = False

    def which(self, program: str) -> str | None:
        return None if program in self.missing else f"/fake/{program}"

    def spawn(self, argv: Sequence[str], env: dict[str, str]) -> Child:
        driver = FakeDriver(4_000_000 + len(self.drivers), argv, env)
        self.drivers.append(driver)
        return driver

    def poll(self, child: Child) -> int | None:
        assert isinstance(child, FakeDriver)
        return child.code

    def signal_group(self, pid: int, sig: int) -> bool:
        self.signals.append((pid, sig))
        driver = self.by_pid(pid)
        if sig == signal.SIGKILL or (sig == signal.SIGTERM and not self.ignores_term):
            driver.exit(-sig)
        return True

    def wait(self, pids: Sequence[int], timeout: float) -> list[int]:
        return [pid for pid in pids if self.by_pid(pid).code is None]

    def by_pid(self, pid: int) -> FakeDriver:
        return next(d for d in self.drivers if d.pid == pid)

    def pump(self) -> None:
        for driver in self.drivers:
            driver.pump()

    def close(self) -> None:
        for driver in self.drivers:
            driver.close()


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., ExDriverWorker]]:
    """`make(DriverConfig, ..., calls=FakeCalls(), cfg=Config)`: a connected, set-up worker."""
    made: list[tuple[ExDriverWorker, ProcessCalls]] = []

    def build(*drivers: DriverConfig, calls: ProcessCalls | None = None, cfg: Config | None = None,
              **kw: Any) -> ExDriverWorker:
        cfg = cfg or config()
        settings = cfg.exdriver_settings(0, [d.settings(cfg) for d in drivers])
        calls = calls if calls is not None else FakeCalls()
        worker = ExDriverWorker(settings, runtime=runtime_dir(tmp_path), reactor=Reactor(), calls=calls, **kw)
        worker.connect(FakeBackbone())
        worker.setup()
        made.append((worker, calls))
        return worker

    yield build
    for worker, calls in made:
        worker.orphaned = True  # stop fast
        worker.shutdown()
        if isinstance(calls, FakeCalls):
            calls.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    for worker, _ in made:
        worker.reactor.close()


def fake(worker: ExDriverWorker) -> FakeBackbone:
    assert isinstance(worker.backbone, FakeBackbone)
    return worker.backbone


def calls_of(worker: ExDriverWorker) -> FakeCalls:
    assert isinstance(worker.calls, FakeCalls)
    return worker.calls


def turn(worker: ExDriverWorker, predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    """Turn the worker until `predicate()`; fake drivers write what their pipes did not take."""
    calls = worker.calls

    def check() -> Any:
        if isinstance(calls, FakeCalls):
            calls.pump()
        return predicate()

    return turn_until(worker.reactor, check, timeout=timeout, what=what)


def driver(name: str = "cam", **kw: Any) -> DriverConfig:
    kw.setdefault("restart", dict(FAST))
    return DriverConfig(argv=[f"indi_{name}"], name=name, **kw)


def define(device: str, name: str = "P") -> str:
    return (f'<defNumberVector device="{device}" name="{name}" perm="rw" state="Idle">'
            f'<defNumber name="V" format="%g" min="0" max="9" step="1">0</defNumber></defNumberVector>\n')


def number(device: str, value: int, name: str = "P") -> str:
    return (f'<setNumberVector device="{device}" name="{name}" state="Ok">'
            f'<oneNumber name="V">{value}</oneNumber></setNumberVector>\n')


def blob(device: str, n: int, size: int = 16) -> str:
    return (f'<setBLOBVector device="{device}" name="IMG" state="Ok"><oneBLOB name="I{n}" size="{size}" '
            f'format=".fits">{"A" * size}</oneBLOB></setBLOBVector>\n')


def started(worker: ExDriverWorker, device: str = "CCD") -> FakeDriver:
    """The worker's newest fake driver, once it has asked for definitions and `device` is defined."""
    d = calls_of(worker).drivers[-1]
    turn(worker, lambda: b"<getProperties" in d.heard(), "getProperties at the driver")
    d.say(define(device))
    turn(worker, lambda: device in worker.owned_devices(), f"{device} defined")
    return d


def sent_after(worker: ExDriverWorker, mark: int) -> list[tuple[bytes, str, bytes]]:
    return [(m.verb, m.device, m.flags) for m in fake(worker).sent[mark:]]


# -- routing ------------------------------------------------------------------------------------
def test_definitions_reach_the_backbone_as_def(make) -> None:
    w = make(driver())
    d = calls_of(w).drivers[0]
    assert d.argv == ["indi_cam"]
    turn(w, lambda: b'<getProperties version="1.7"' in d.heard(), "getProperties at the driver")
    d.say(define("CCD"))
    defs = turn(w, lambda: fake(w).of(wire.DEF, "CCD"), "DEF on the backbone")
    assert defs[0].payload == define("CCD").strip().encode()  # the bytes the driver wrote
    assert w.owned_devices() == ["CCD"]


def test_a_client_new_reaches_only_the_owner(make) -> None:
    w = make(driver("cam"), driver("scope"))
    cam, scope = calls_of(w).drivers
    for d, device in ((cam, "CCD"), (scope, "Scope")):
        turn(w, lambda d=d: b"<getProperties" in d.heard(), "getProperties")
        d.say(define(device))
    turn(w, lambda: w.owned_devices() == ["CCD", "Scope"], "both devices defined")
    new = b'<newNumberVector device="Scope" name="P"><oneNumber name="V">3</oneNumber></newNumberVector>'
    w.on_backbone(wire.NEW, "Scope", "P", b"", new)
    w.on_backbone(wire.NEW, "Nobody", "P", b"", new.replace(b"Scope", b"Nobody"))  # no owner: dropped
    turn(w, lambda: new in scope.heard(), "the command at its driver")
    assert b"newNumberVector" not in cam.heard() and b"Nobody" not in scope.heard()


def test_a_driver_ping_is_answered_by_the_worker(make) -> None:
    w = make(driver())
    d = started(w)
    mark = len(fake(w).sent)
    d.say('<pingRequest uid="p1"/>\n')
    turn(w, lambda: b'<pingReply uid="p1"' in d.heard(), "pingReply at the driver")
    assert sent_after(w, mark) == []


def test_snooping_asks_the_broker_and_receives_what_it_asked_for(make) -> None:
    w = make(driver())
    d = started(w)
    updates = fake(w).interest_updates
    d.say('<getProperties version="1.7" device="Scope" name="EQ"/>\n')
    getp = turn(w, lambda: fake(w).of(wire.GETP, "Scope"), "GETP for the snooped device")
    assert getp[0].name == "EQ" and fake(w).interest_updates > updates
    assert [(dev, name) for dev, name, _ in w.interests()] == [("Scope", "EQ")]
    w.on_backbone(wire.SET, "Scope", "EQ", b"", number("Scope", 7, "EQ").encode())
    w.on_backbone(wire.SET, "Scope", "OTHER", b"", number("Scope", 8, "OTHER").encode())  # not asked for
    w.on_backbone(wire.SET, "Scope", "EQ", wire.FLAG_BLOB, blob("Scope", 0).encode())  # BLOBs: Never
    w.on_backbone(wire.SET, "CCD", "P", b"", number("CCD", 9).encode())  # its own device: never back
    turn(w, lambda: b'<oneNumber name="V">7' in d.heard(), "the snooped update")
    heard = d.heard()
    assert b"OTHER" not in heard and b"setBLOBVector" not in heard and b">9<" not in heard
    d.say('<enableBLOB device="Scope" name="EQ">Also</enableBLOB>\n')
    turn(w, lambda: fake(w).interest_updates > updates + 1, "interests updated")
    w.on_backbone(wire.SET, "Scope", "EQ", wire.FLAG_BLOB, blob("Scope", 1).encode())
    turn(w, lambda: b"setBLOBVector" in d.heard(), "the snooped BLOB, once enabled")


def test_a_getproperties_without_device_goes_to_every_driver(make) -> None:
    w = make(driver("cam"), driver("scope"))
    cam, scope = calls_of(w).drivers
    w.on_backbone(wire.GETP, "", "", b"", b"")
    turn(w, lambda: cam.heard().count(b"<getProperties") == 2 and scope.heard().count(b"<getProperties") == 2,
         "a second getProperties at each driver")


def test_after_a_broker_restart_drivers_define_again(make, monkeypatch) -> None:
    monkeypatch.setattr(exdriver, "REDEFINE_DELAY", 0.01)
    w = make(driver())
    d = started(w)
    w.on_command({"cmd": "hello"})
    assert fake(w).hellos == 1
    turn(w, lambda: d.heard().count(b"<getProperties") == 2, "getProperties again")


# -- lifecycle ----------------------------------------------------------------------------------
def test_a_driver_that_exits_is_restarted_and_clients_are_told(make) -> None:
    w = make(driver())
    first = started(w)
    mark = len(fake(w).sent)
    first.exit(3)
    turn(w, lambda: len(calls_of(w).drivers) == 2, "a new process")
    assert sent_after(w, mark)[:2] == [(wire.DEL, "CCD", b""), (wire.MSG, "CCD", b"")]
    msg = fake(w).of(wire.MSG, "CCD")[-1].payload
    assert b"driver cam exited (exit code 3); restarting in 0.01 s" in msg
    second = started(w)
    assert second is not first
    assert w.drivers["cam"].lifecycle.restarts == 1 and w.status()["drivers"][0]["pid"] == second.pid


def test_an_operator_stop_is_not_a_crash(make) -> None:
    w = make(driver())
    d = started(w)
    w.on_command({"cmd": "driver", "action": "stop", "name": "cam"})
    assert calls_of(w).signals == [(d.pid, signal.SIGTERM)]
    turn(w, lambda: not w.drivers["cam"].running, "the driver gone")
    text = fake(w).of(wire.MSG, "CCD")[-1].payload
    assert b"driver cam stopped" in text
    state = w.drivers["cam"]
    assert state.lifecycle.state.value == "STOPPED" and state.lifecycle.restarts == 0
    assert state.restart_timer is None  # nothing will start it again
    w.on_command({"cmd": "driver", "action": "start", "name": "cam"})
    started(w)
    assert len(calls_of(w).drivers) == 2


def test_an_operator_restart_starts_it_once_the_old_one_is_gone(make) -> None:
    w = make(driver())
    calls = calls_of(w)
    calls.ignores_term = True
    first = started(w)
    w.on_command({"cmd": "driver", "action": "restart", "name": "cam"})
    turn(w, lambda: w.drivers["cam"].restart_timer is not None, "a restart pending")
    first.exit(0)  # it took its time
    turn(w, lambda: len(calls.drivers) == 2, "a new process")
    assert b"driver cam stopped" in fake(w).of(wire.MSG, "CCD")[-1].payload


def test_an_added_driver_starts(make) -> None:
    w = make(driver("cam"))
    spec = driver("guider").settings(config())
    w.on_command({"cmd": "driver", "action": "add", "settings": spec.to_dict()})
    assert calls_of(w).drivers[-1].argv == ["indi_guider"]
    started(w, "Guider")
    assert w.owned_devices() == ["Guider"]


def test_adding_a_driver_whose_restart_is_pending_starts_one_process_not_two(make) -> None:
    w = make(driver("cam", restart={**FAST, "backoff_initial": 0.2, "backoff_max": 0.2}))
    started(w).exit(3)  # a restart is now pending, 0.2 s away
    turn(w, lambda: w.drivers["cam"].restart_timer is not None, "the pending restart")
    w.on_command({"cmd": "driver", "action": "add", "settings": driver("cam").settings(config()).to_dict()})
    assert len(calls_of(w).drivers) == 2  # the added one
    replaced = w.drivers["cam"]
    mark = time.monotonic()
    turn(w, lambda: time.monotonic() - mark > 0.4, "past the old restart's time")
    assert len(calls_of(w).drivers) == 2 and w.drivers["cam"] is replaced


def test_a_driver_not_on_path_is_given_up_on(make) -> None:
    calls = FakeCalls()
    calls.missing.add("indi_gone")
    w = make(driver("gone", restart={"max_restarts": 1, "backoff_initial": 0.01}), calls=calls)
    turn(w, lambda: w.drivers["gone"].lifecycle.state.value == "FATAL", "FATAL")
    texts = [m.payload for m in fake(w).of(wire.MSG)]
    assert b"cannot start: 'indi_gone' not found on PATH" in texts[0] and b"restarting" in texts[0]
    assert b"not restarting (FATAL)" in texts[-1]
    assert calls.drivers == []


def test_a_driver_that_reads_no_input_is_killed_after_hang_timeout(make, monkeypatch) -> None:
    monkeypatch.setattr(driverprocess, "WATCHDOG_PERIOD", 0.01)
    w = make(driver(), cfg=Config(host="127.0.0.1", port=0, hang_timeout=0.05))
    d = started(w)
    d.reads = False  # hangs: its pipe fills, then the worker's queue
    new = b'<newNumberVector device="CCD" name="P"><oneNumber name="V">1</oneNumber></newNumberVector>'
    for _ in range(2000):
        w.on_backbone(wire.NEW, "CCD", "P", b"", new)
    assert w.drivers["cam"].process.stdin  # some wait in the worker
    turn(w, lambda: (d.pid, signal.SIGKILL) in calls_of(w).signals, "the hung driver killed")
    turn(w, lambda: len(calls_of(w).drivers) == 2, "restarted")


def test_a_driver_not_reading_costs_a_bounded_queue(make) -> None:
    w = make(driver(), cfg=Config(host="127.0.0.1", port=0, driver_queue_mb=0.01))
    d = started(w)
    d.reads = False
    new = b'<newNumberVector device="CCD" name="P"><oneNumber name="V">1</oneNumber></newNumberVector>' * 10
    for _ in range(200):  # 200 KB: more than its pipe and its queue hold
        w.on_backbone(wire.NEW, "CCD", "P", b"", new)
    stdin = w.drivers["cam"].process.stdin
    assert stdin.dropped > 0 and stdin.queued <= stdin.limit


def test_input_for_a_driver_that_closed_its_stdin_is_dropped_quietly(make) -> None:
    w = make(driver())
    d = started(w)
    os.close(d._ends.pop("in"))  # its stdin is closed: writes fail with EPIPE
    stdin = w.drivers["cam"].process.stdin
    w.on_backbone(wire.NEW, "CCD", "P", b"", b'<newNumberVector device="CCD" name="P"/>')
    assert not stdin and stdin.dropped == 0  # cleared, not counted as a slow reader
    assert w.drivers["cam"].running  # its exit, when it comes, is what SIGCHLD reports


def test_shutdown_stops_a_driver_that_ignores_sigterm_with_sigkill(make) -> None:
    calls = FakeCalls()
    calls.ignores_term = True
    w = make(driver(), calls=calls)
    d = started(w)
    w.orphaned = True
    w.shutdown()
    assert calls.signals == [(d.pid, signal.SIGTERM), (d.pid, signal.SIGKILL)]
    assert not w.drivers["cam"].running


# -- BLOB pacing applied ------------------------------------------------------------------------
def flow(w: ExDriverWorker, flag: bytes, device: str = "CCD") -> None:
    w.on_backbone(wire.FLOW, device, "", flag, b"")


def names(w: ExDriverWorker, mark: int) -> list[str]:
    """What reached the backbone after `mark`: BLOBs as B<n>, numbers as N<value>."""
    out = []
    for m in fake(w).sent[mark:]:
        if m.flags == wire.FLAG_BLOB:
            out.append("B" + m.payload.split(b'oneBLOB name="I')[1].split(b'"')[0].decode())
        elif m.verb == wire.SET:
            out.append("N" + m.payload.split(b'name="V">')[1].split(b"<")[0].decode())
    return out


def test_flow_full_holds_the_next_blob_and_open_releases_it_in_order(make) -> None:
    w = make(driver())
    d = started(w)
    cam = w.drivers["cam"]
    mark = len(fake(w).sent)
    d.say(blob("CCD", 1))
    turn(w, lambda: names(w, mark) == ["B1"], "the first BLOB sent")
    flow(w, wire.FLOW_FULL)
    assert cam.pacer.paused and cam.pause_timer is not None
    d.say(number("CCD", 1) + blob("CCD", 2) + number("CCD", 2))
    turn(w, lambda: names(w, mark) == ["B1", "N1"], "the update before the BLOB, read ahead")
    turn(w, lambda: not cam.process.reading, "the driver left waiting on its pipe")
    d.say(number("CCD", 3))  # waits in its pipe
    flow(w, wire.FLOW_OPEN)
    assert names(w, mark) == ["B1", "N1", "B2", "N2"]  # the held BLOB and what followed, in order
    assert cam.pause_timer is None and cam.process.reading
    turn(w, lambda: names(w, mark)[-1:] == ["N3"], "reading again")
    assert w.status()["drivers"][0]["pauses"] == 1


def test_a_pause_ends_by_itself(make, monkeypatch) -> None:
    monkeypatch.setattr(exdriver, "MAX_PAUSE", 0.02)
    w = make(driver())
    d = started(w)
    mark = len(fake(w).sent)
    flow(w, wire.FLOW_FULL)
    d.say(blob("CCD", 1) + number("CCD", 1))
    turn(w, lambda: not w.drivers["cam"].process.reading, "the BLOB held")
    turn(w, lambda: names(w, mark) == ["B1", "N1"], "released when the pause timed out")  # no OPEN came
    assert not w.drivers["cam"].pacer.paused


def test_a_full_window_holds_blobs_until_done(make) -> None:
    w = make(driver())
    d = started(w)
    cam = w.drivers["cam"]
    mark = len(fake(w).sent)
    d.say(blob("CCD", 1, BLOB_WINDOW) + blob("CCD", 2) + number("CCD", 5))
    turn(w, lambda: names(w, mark) == ["B1"], "the big BLOB sent")
    turn(w, lambda: not cam.process.reading, "the next one held")
    assert cam.pacer.paused
    flow(w, wire.FLOW_DONE)
    assert names(w, mark) == ["B1", "B2", "N5"] and not cam.pacer.paused


def test_what_a_dying_driver_wrote_last_goes_out_after_what_was_held(make) -> None:
    w = make(driver())
    d = started(w)
    mark = len(fake(w).sent)
    flow(w, wire.FLOW_FULL)
    d.say(blob("CCD", 1) + number("CCD", 1))
    turn(w, lambda: not w.drivers["cam"].process.reading, "the BLOB held")
    d.say(number("CCD", 2))  # not read: it waits in the pipe
    d.exit(0)
    turn(w, lambda: fake(w).of(wire.DEL, "CCD"), "the exit handled")
    assert names(w, mark) == ["B1", "N1", "N2"]  # in order, before its devices are deleted
    assert fake(w).sent[-2].verb == wire.DEL
    cam = w.drivers["cam"]
    assert not cam.pacer.paused and cam.pause_timer is None


# -- with real driver processes -----------------------------------------------------------------
def real(script: str, *args: str, name: str) -> DriverConfig:
    return DriverConfig(argv=[sys.executable, str(DRIVERS / script), *args], name=name, restart=dict(FAST))


def test_a_real_driver_defines_and_its_stderr_reaches_its_log_file(make, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    w = make(real("chatty.py", "marker-7", name="chatty"), calls=ProcessCalls(),
             cfg=Config(host="127.0.0.1", port=0, log_dir=str(logs)))
    turn(w, lambda: fake(w).of(wire.DEF, "Chatty"), "the real driver's definition")
    log_file = logs / "chatty.log"
    turn(w, lambda: log_file.exists() and "marker-7: got getProperties" in log_file.read_text(),
         "its stderr in its log file")


def test_an_orphaned_worker_is_gone_within_a_second_even_past_a_driver_ignoring_sigterm(make) -> None:
    w = make(real("slow_exit.py", "Stubborn", "--ignore-term", name="stubborn"), calls=ProcessCalls())
    turn(w, lambda: fake(w).of(wire.DEF, "Stubborn"), "the real driver's definition")
    pid = w.drivers["stubborn"].process.pid
    assert pid is not None
    w.orphaned = True
    t0 = time.monotonic()
    w.shutdown()
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5, elapsed  # ORPHAN_STOP_TIMEOUT, then SIGKILL
    assert not psutil.pid_exists(pid)  # killed and reaped
