"""The executable-driver supervisor: runs third-party INDI drivers and speaks for them.

One worker may supervise several drivers; each driver is its own OS process in its own session,
talking XML on stdin/stdout, so a driver crash never touches its supervisor. Fairness between the
drivers of one worker comes from bounded work per turn: a flooding driver is read one chunk at a
time between everyone else's turns, and each driver's stdin queue is bounded in bytes, so a driver
that stops reading cannot grow our memory or block anyone (past `hang_timeout` it is killed and
restarted).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import shutil
import signal
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Any

from indibroker.broker import wire
from indibroker.broker.oscalls import describe_exit, pdeathsig_prefix, reap, signal_group, spawn
from indibroker.broker.pacing import BLOB_WINDOW
from indibroker.broker.ratelog import RateLimitedLog
from indibroker.broker.supervision import Lifecycle
from indibroker.workers import indi
from indibroker.workers.base import Worker
from indibroker.workers.codec import Element, StreamDecoder
from indibroker.workers.interest import Interest, union
from indibroker.workers.outqueue import OutQueue
from indibroker.workers.reactor import FdCallback, Timer
from indibroker.workers.settings import DriverSettings, ExDriverSettings, Inheritance

__all__ = ["ExDriverWorker", "Driver"]

log = logging.getLogger(__name__)
driver_log = logging.getLogger("indibroker.driver")

READ_SIZE = 32 * 1024  # per turn: a flooding driver cannot hold the loop longer than this takes
BLOB_READ_SIZE = 1024 * 1024  # per turn inside one big element: it is one message, read it briskly
STOP_TIMEOUT = 5.0
ORPHAN_STOP_TIMEOUT = 1.0  # the arbiter died: a new instance may be starting, so be gone at once
REDEFINE_DELAY = 1.0  # after registering with a restarted broker, before drivers define again
LOG_FILE_BYTES = 1024 * 1024
MAX_PAUSE = 0.5  # seconds a driver's output may wait for BLOB clients with no room (broker/pacing.py)
LOG_FILE_COUNT = 3


class Driver:
    """One supervised driver process and everything we hold for it."""

    def __init__(self, spec: DriverSettings, log_dir: Path | None):
        self.spec = spec
        self.lifecycle = Lifecycle(spec.policy)
        self.proc: subprocess.Popen | None = None
        self.decoder = StreamDecoder(max_element=spec.max_element, resync=True)
        self.stdin = OutQueue()
        self.devices: set[str] = set()
        self.interest = Interest()  # what it snoops
        self.restart_timer: Timer | None = None
        self.stuck_since: float | None = None  # since when waiting input has not moved
        self.progress_mark = 0  # stdin.written when last checked
        self.dropped_commands = 0
        self.malformed = 0
        self.last_read = 0.0  # monotonic: when its stdout last gave bytes, or reading resumed
        self.unfinished_timer: Timer | None = None  # armed while an element is half-read
        # BLOB pacing (broker/pacing.py): its BLOBs are held back while every client that wants
        # them is full, or while too many of them are on their way; at most MAX_PAUSE. While one
        # is held its stdout is not read (the driver waits on its pipe).
        self.full = False
        self.inflight: dict[str, deque[int]] = {}  # device -> sizes of BLOBs not done everywhere
        self.inflight_bytes = 0
        self.paused = False
        self.pause_timer: Timer | None = None
        self.pauses = 0
        self.held: deque[Element] = deque()  # a paused BLOB and what the driver wrote after it
        self.read_stdout: FdCallback | None = None  # None once its stdout is closed
        self.reading = False
        self.started_wall: float | None = None
        self._stderr_buf = b""
        self.file_log: logging.Logger | None = None
        if log_dir is not None:
            self.file_log = logging.getLogger(f"indibroker.driverfile.{spec.name}")
            self.file_log.propagate = False
            handler = logging.handlers.RotatingFileHandler(
                log_dir / f"{spec.name}.log", maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_COUNT,
                delay=True,  # opened at its first line: building a worker does no I/O
            )
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            self.file_log.handlers[:] = [handler]
            self.file_log.setLevel(logging.INFO)

    @property
    def name(self) -> str:
        return self.spec.name

    def waits(self, el: Element) -> bool:
        """While paused, its next BLOB (and whatever follows it) waits for room."""
        return self.paused and indi.is_blob(el.tag)

    def forget_pacing(self) -> None:
        """What the broker said about its BLOBs no longer holds (timed out, or a new process)."""
        self.full = False
        self.inflight.clear()
        self.inflight_bytes = 0

    @property
    def running(self) -> bool:
        return self.proc is not None

    def stderr_lines(self, data: bytes) -> list[str]:
        self._stderr_buf += data
        *lines, self._stderr_buf = self._stderr_buf.split(b"\n")
        if len(self._stderr_buf) > 65536:  # a line without end: log what we have
            lines.append(self._stderr_buf)
            self._stderr_buf = b""
        return [line.decode(errors="replace").rstrip() for line in lines]

    def status(self) -> dict[str, Any]:
        lc = self.lifecycle
        return {
            "name": self.name,
            "argv": self.spec.argv,
            "pid": self.proc.pid if self.proc else None,
            "state": lc.state.value,
            "restarts": lc.restarts,
            "started": self.started_wall,
            "last_exit": lc.last_exit,
            "devices": sorted(self.devices),
            "pauses": self.pauses,
        }


class ExDriverWorker(Worker):
    role = "exdriver"

    settings: ExDriverSettings

    def __init__(self, settings: ExDriverSettings, inheritance: Inheritance | None = None, **kw: Any):
        super().__init__(settings, inheritance, **kw)
        self.log_dir = Path(settings.log_dir) if settings.log_dir else None
        self.drivers: dict[str, Driver] = {d.name: Driver(d, self.log_dir) for d in settings.drivers}
        self._pdeathsig = pdeathsig_prefix()
        self._watchdog_armed = False
        self._warn = RateLimitedLog(log)

    # -- worker hooks -----------------------------------------------------------------------
    def setup(self) -> None:
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self.reactor.on_signal(signal.SIGCHLD, self._on_sigchld)
        for device in self.inheritance.orphaned:
            # Our predecessor died with its drivers: clients learn they are gone until restarted.
            self.backbone.send(wire.DEL, device, "", b"", indi.del_property(device))
            self.backbone.send(wire.MSG, device, "", b"", indi.message(
                f"indibroker: the supervisor of {device}'s driver died; restarting the driver", device))
        for driver in self.drivers.values():
            if driver.name not in self.inheritance.stopped:
                self._start(driver)

    def registered_again(self) -> None:
        # A new broker may have lost requests sent while it was down (a client's getProperties):
        # have every driver define its properties again once the gateways are registered too.
        self.reactor.call_later(REDEFINE_DELAY, self._redefine_all)

    def _redefine_all(self) -> None:
        for driver in self.drivers.values():
            if driver.running:
                self._to_driver(driver, indi.get_properties())

    def shutdown(self) -> None:
        self._stop_all(ORPHAN_STOP_TIMEOUT if self.orphaned else STOP_TIMEOUT)

    def owned_devices(self) -> list[str]:
        return sorted({d for driver in self.drivers.values() for d in driver.devices})

    def interests(self) -> list[tuple[str, str, int]]:
        return sorted(union(d.interest for d in self.drivers.values()))

    def status(self) -> dict[str, Any]:
        return {"drivers": [d.status() for d in self.drivers.values()]}

    def on_command(self, command: dict[str, Any]) -> None:
        if command.get("cmd") != "driver":
            super().on_command(command)
            return
        action, name = command.get("action"), command.get("name", "")
        if action == "add":
            spec = DriverSettings.from_dict(command["settings"])
            if spec.name in self.drivers and self.drivers[spec.name].running:
                log.warning("driver %s already running", spec.name)
                return
            self.drivers[spec.name] = Driver(spec, self.log_dir)
            self._start(self.drivers[spec.name])
            return
        driver = self.drivers.get(name)
        if driver is None:
            log.warning("driver command %s for unknown driver %r", action, name)
            return
        if action == "start":
            if not driver.running:
                self._start(driver)
        elif action == "stop":
            self._operator_stop(driver)
        elif action == "restart":
            self._operator_stop(driver, then_start=True)
        else:
            log.warning("unknown driver action %r", action)

    # -- process lifecycle ------------------------------------------------------------------
    def _start(self, driver: Driver) -> None:
        if driver.restart_timer is not None:
            driver.restart_timer.cancel()
            driver.restart_timer = None
        driver.lifecycle.start()
        argv = driver.spec.argv
        if shutil.which(argv[0]) is None:
            self._exited(driver, f"cannot start: {argv[0]!r} not found on PATH")
            return
        try:
            proc = spawn([*self._pdeathsig, *argv], env=driver.spec.env, pipes=True)
        except OSError as exc:
            self._exited(driver, f"cannot start: {exc}")
            return
        driver.proc = proc
        driver.decoder = StreamDecoder(max_element=driver.spec.max_element, resync=True)
        driver.stdin.clear()
        driver.stuck_since = None
        driver.started_wall = time.time()
        driver.lifecycle.spawned(time.monotonic())
        assert proc.stdout is not None and proc.stderr is not None and proc.stdin is not None
        driver.read_stdout = lambda _fd: self._stdout(driver)
        driver.reading = False
        self._read_or_not(driver)
        self.reactor.add_reader(proc.stderr.fileno(), lambda _fd: self._stderr(driver))
        log.info("driver %s started (pid %d): %s", driver.name, proc.pid, " ".join(argv))
        # Every (re)start: ask for definitions, so devices are known and clients get them again.
        self._to_driver(driver, indi.get_properties())
        self.status_changed()

    def _operator_stop(self, driver: Driver, then_start: bool = False) -> None:
        if driver.restart_timer is not None:
            driver.restart_timer.cancel()
            driver.restart_timer = None
        if driver.lifecycle.stop() and driver.proc is not None:
            signal_group(driver.proc.pid, signal.SIGTERM)
            pid = driver.proc.pid
            self.reactor.call_later(STOP_TIMEOUT, lambda: self._kill_if(driver, pid))
            if then_start:
                driver.restart_timer = self.reactor.call_later(0.2, lambda: self._start_when_stopped(driver))
        elif then_start:
            self._start(driver)
        self.status_changed()

    def _start_when_stopped(self, driver: Driver) -> None:
        if driver.running:
            driver.restart_timer = self.reactor.call_later(0.2, lambda: self._start_when_stopped(driver))
        else:
            driver.restart_timer = None
            self._start(driver)

    def _kill_if(self, driver: Driver, pid: int) -> None:
        if driver.proc is not None and driver.proc.pid == pid:
            log.warning("driver %s ignored SIGTERM: killing", driver.name)
            signal_group(pid, signal.SIGKILL)

    def _on_sigchld(self, signum: int) -> None:
        for driver in list(self.drivers.values()):
            if driver.proc is not None:
                code = reap(driver.proc)
                if code is not None:
                    self._close_pipes(driver)
                    self._exited(driver, describe_exit(code))

    def _close_pipes(self, driver: Driver) -> None:
        proc = driver.proc
        if proc is None:
            return
        self._drain_stdout(driver)
        self._reset_pacing(driver)
        if driver.unfinished_timer is not None:
            driver.unfinished_timer.cancel()
            driver.unfinished_timer = None
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                self.reactor.forget(stream.fileno())
                stream.close()
        # The session may hold grandchildren the driver started: they go with it.
        signal_group(proc.pid, signal.SIGKILL)
        driver.proc = None
        driver.stdin.clear()

    def _exited(self, driver: Driver, how: str) -> None:
        decision = driver.lifecycle.exited(time.monotonic(), how)
        gone = sorted(driver.devices)
        for device in gone:
            self.backbone.send(wire.DEL, device, "", b"", indi.del_property(device))
        driver.devices.clear()
        if decision.action == "stopped":
            text = f"driver {driver.name} stopped"
            log.info("%s (%s)", text, how)
        elif decision.action == "restart":
            text = f"driver {driver.name} exited ({how}); restarting in {decision.delay:g} s"
            log.warning("%s", text)
            driver.restart_timer = self.reactor.call_later(decision.delay, lambda: self._start(driver))
        else:
            text = f"driver {driver.name} exited ({how}); {decision.reason}: not restarting (FATAL)"
            log.error("%s", text)
        for device in gone or [""]:
            self.backbone.send(wire.MSG, device, "", b"", indi.message(text, device))
        self.backbone.update_interests()
        self.status_changed()

    def _watchdog(self) -> None:
        """Kill a driver that has read none of its waiting input for `hang_timeout`."""
        now = time.monotonic()
        for driver in self.drivers.values():
            if driver.proc is None or not driver.stdin or driver.stdin.written != driver.progress_mark:
                driver.progress_mark = driver.stdin.written
                driver.stuck_since = now if driver.proc is not None and driver.stdin else None
            elif driver.stuck_since is not None and now - driver.stuck_since > driver.spec.hang_timeout:
                log.error("driver %s has not read its input for %.0f s: killing it",
                          driver.name, now - driver.stuck_since)
                driver.stuck_since = None
                signal_group(driver.proc.pid, signal.SIGKILL)
        self._watchdog_armed = any(d.stdin for d in self.drivers.values())
        if self._watchdog_armed:
            self.reactor.call_later(1.0, self._watchdog)

    def _arm_watchdog(self) -> None:
        if not self._watchdog_armed:
            self._watchdog_armed = True
            self.reactor.call_later(1.0, self._watchdog)

    def _stop_all(self, timeout: float) -> None:
        running = [d for d in self.drivers.values() if d.proc is not None]
        for driver in running:
            driver.lifecycle.stop()
            assert driver.proc is not None
            signal_group(driver.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while running and time.monotonic() < deadline:
            running = [d for d in running if d.proc is not None and reap(d.proc) is None]
            if running:
                time.sleep(0.05)
        for driver in self.drivers.values():
            if driver.proc is not None:
                signal_group(driver.proc.pid, signal.SIGKILL)
                try:
                    driver.proc.wait(1.0)
                except subprocess.TimeoutExpired:
                    log.error("driver %s (pid %d) survived SIGKILL", driver.name, driver.proc.pid)
                for stream in (driver.proc.stdin, driver.proc.stdout, driver.proc.stderr):
                    if stream is not None:
                        stream.close()
                driver.proc = None

    # -- driver → server --------------------------------------------------------------------
    def _stdout(self, driver: Driver) -> None:
        proc = driver.proc
        if proc is None or proc.stdout is None:
            return
        size = BLOB_READ_SIZE if driver.decoder.in_element else READ_SIZE
        try:
            data = os.read(proc.stdout.fileno(), size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("driver %s: stdout read failed: %s", driver.name, exc)
            data = b""
        if not data:
            # EOF: the driver is exiting (or closed stdout); SIGCHLD reports the exit.
            self.reactor.forget(proc.stdout.fileno())
            driver.read_stdout = None
            driver.reading = False
            return
        driver.last_read = time.monotonic()
        self._feed(driver, data)

    def _drain_stdout(self, driver: Driver) -> None:
        """What a dying driver wrote last still counts (its final messages)."""
        proc = driver.proc
        if proc is None or proc.stdout is None:
            return
        for _ in range(64):
            try:
                data = os.read(proc.stdout.fileno(), READ_SIZE)
            except OSError:
                return
            if not data:
                return
            self._feed(driver, data)

    def _feed(self, driver: Driver, data: bytes) -> None:
        elements = driver.decoder.feed(data)
        self._report_faults(driver)
        if driver.decoder.pending_bytes and driver.unfinished_timer is None:
            driver.unfinished_timer = self.reactor.call_later(
                driver.spec.unfinished_timeout, lambda: self._unfinished_due(driver))
        held = driver.held
        for element in elements:
            if held or driver.waits(element):
                held.append(element)  # and what follows it, in order
            else:
                self._from_driver(driver, element)
        if held and driver.reading:
            self._read_or_not(driver)

    def _report_faults(self, driver: Driver) -> None:
        """What the decoder skipped (bad XML, an element cut short): logged, rate-limited."""
        faults = driver.decoder.faults
        if faults:
            driver.malformed += len(faults)
            self._warn.warning(("bad XML", driver.name), "driver %s sent bad XML, skipped (%d so far): %s",
                               driver.name, driver.malformed, "; ".join(faults[:3]))
            faults.clear()

    def _unfinished_due(self, driver: Driver) -> None:
        """An element the driver began has had no byte for `unfinished_timeout` while we were
        reading: it will not be finished (a new element would have resynchronised the decoder
        already). Skip it, so that its bytes are not held forever, and say so."""
        driver.unfinished_timer = None
        if driver.proc is None or not driver.decoder.pending_bytes:
            return
        timeout = driver.spec.unfinished_timeout
        idle = time.monotonic() - driver.last_read
        if driver.reading and idle >= timeout:
            driver.decoder.abandon(f"no more of it for {idle:.0f} s")
            self._report_faults(driver)
            return
        wait = timeout - idle if driver.reading else timeout  # paced by us: not its fault
        driver.unfinished_timer = self.reactor.call_later(max(wait, 0.05), lambda: self._unfinished_due(driver))

    def _stderr(self, driver: Driver) -> None:
        proc = driver.proc
        if proc is None or proc.stderr is None:
            return
        try:
            data = os.read(proc.stderr.fileno(), READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.reactor.forget(proc.stderr.fileno())
            return
        for line in driver.stderr_lines(data):
            if line:
                driver_log.info("[%s] %s", driver.name, line)
                if driver.file_log is not None:
                    driver.file_log.info("%s", line)

    def _from_driver(self, driver: Driver, el: Element) -> None:
        tag = el.tag
        verb = indi.DRIVER_VERBS.get(tag)
        device = el.get("device")
        name = el.get("name")
        if verb is not None:
            if verb == wire.DEF and device and device not in driver.devices:
                driver.devices.add(device)
                self.status_changed()
            elif verb == wire.DEL and device and not name:
                driver.devices.discard(device)
                self.status_changed()
            flags = indi.blob_flag(tag)
            self.backbone.send(verb, device, name, flags, el.raw)
            if flags == wire.FLAG_BLOB and device:
                driver.inflight.setdefault(device, deque()).append(len(el.raw))
                driver.inflight_bytes += len(el.raw)
                if driver.inflight_bytes >= BLOB_WINDOW:
                    self._pause_or_not(driver)
        elif tag == "pingRequest":
            self._to_driver(driver, indi.ping_reply(el.get("uid")))
        elif tag == "getProperties":
            if device:  # snooping another device
                driver.interest.add(device, name)
                self.backbone.update_interests()
                self.backbone.send(wire.GETP, device, name)
        elif tag == "enableBLOB":
            mode = indi.BlobMode.parse(el.root.text)
            if device and mode is not None:
                driver.interest.set_blob(device, name, mode)
                self.backbone.update_interests()
        elif tag != "pingReply":
            log.debug("driver %s: %s ignored", driver.name, tag)

    # -- server → driver --------------------------------------------------------------------
    def on_backbone(self, verb: bytes, device: str, name: str, flags: bytes, payload: bytes) -> None:
        if verb == wire.NEW:
            owner = self._owner(device)
            if owner is not None:
                self._to_driver(owner, payload)
        elif verb == wire.GETP:
            owner = self._owner(device) if device else None
            request = indi.get_properties(device, name)
            for driver in [owner] if owner is not None else list(self.drivers.values()):
                if driver.running:
                    self._to_driver(driver, request)
        elif (verb in wire.DRIVER_OUTPUT or verb == wire.SNOOP) and device:
            blob = flags == wire.FLAG_BLOB
            data = None
            for driver in self.drivers.values():
                if driver.running and device not in driver.devices and \
                        (verb != wire.MSG or driver.spec.snoop_messages) and \
                        driver.interest.wants(device, name, blob):
                    if data is None:
                        data = payload
                    self._to_driver(driver, data)
        elif verb == wire.FLOW:
            owner = self._owner(device)
            if owner is None:
                return
            if flags == wire.FLOW_DONE:
                sizes = owner.inflight.get(device)
                if sizes:
                    owner.inflight_bytes -= sizes.popleft()
            else:
                owner.full = flags == wire.FLOW_FULL
            self._pace(owner)

    def _pace(self, driver: Driver) -> None:
        """Send the driver's BLOBs on, or hold them while they have nowhere to go: every client
        that wants them is full, or BLOB_WINDOW bytes of them are still on their way. While
        paused the driver is still read up to its next BLOB (its other messages pass), which is
        then held, ready to go the moment there is room: a camera's next frame is read while
        its clients take the last one, not after. Then the driver waits on its pipe, as under
        indiserver, instead of being read for its BLOBs to be dropped. A pause never outlasts
        MAX_PAUSE (a lost signal cannot stall a driver)."""
        self._pause_or_not(driver)
        held = driver.held
        while held and not driver.waits(held[0]):
            self._from_driver(driver, held.popleft())
        self._read_or_not(driver)

    def _pause_or_not(self, driver: Driver) -> None:
        paused = driver.full or driver.inflight_bytes >= BLOB_WINDOW
        if paused == driver.paused:
            return
        driver.paused = paused
        if paused:
            driver.pauses += 1
            driver.pause_timer = self.reactor.call_later(MAX_PAUSE, lambda: self._pause_expired(driver))
        elif driver.pause_timer is not None:
            driver.pause_timer.cancel()
            driver.pause_timer = None

    def _read_or_not(self, driver: Driver) -> None:
        """Read stdout unless a BLOB is held (or it is closed)."""
        proc = driver.proc
        reading = proc is not None and proc.stdout is not None and driver.read_stdout is not None \
            and not driver.held
        if reading == driver.reading:
            return
        driver.reading = reading
        assert proc is not None and proc.stdout is not None
        if reading:
            assert driver.read_stdout is not None
            driver.last_read = time.monotonic()  # its silence while we did not read is ours
            self.reactor.add_reader(proc.stdout.fileno(), driver.read_stdout)
        else:
            self.reactor.forget(proc.stdout.fileno())

    def _pause_expired(self, driver: Driver) -> None:
        driver.pause_timer = None
        log.debug("driver %s: BLOB pacing timed out; reading again", driver.name)
        driver.forget_pacing()
        self._pace(driver)

    def _reset_pacing(self, driver: Driver) -> None:
        """Its pipes close: what it held goes out now, and pacing starts afresh."""
        while driver.held:
            self._from_driver(driver, driver.held.popleft())
        driver.forget_pacing()
        self._pause_or_not(driver)  # no longer paused: its timer goes too
        driver.reading = False

    def _owner(self, device: str) -> Driver | None:
        for driver in self.drivers.values():
            if device in driver.devices:
                return driver
        return None

    def _to_driver(self, driver: Driver, data: bytes) -> None:
        proc = driver.proc
        if proc is None or proc.stdin is None:
            return
        if driver.stdin.bytes + len(data) > driver.spec.queue_bytes:
            driver.dropped_commands += 1
            self._warn.warning(("not reading", driver.name), "driver %s is not reading its input: %d message(s) "
                               "dropped", driver.name, driver.dropped_commands)
            return
        was_empty = not driver.stdin
        driver.stdin.push(data)
        if was_empty:
            self._flush_stdin(driver)

    def _flush_stdin(self, driver: Driver) -> None:
        proc = driver.proc
        if proc is None or proc.stdin is None:
            return
        fd = proc.stdin.fileno()
        try:
            done = driver.stdin.flush(fd)
        except OSError:
            done = True  # broken pipe: the driver is dying; SIGCHLD will tell
            driver.stdin.clear()
        if not done:
            self._arm_watchdog()
        self.reactor.set_writer(fd, None if done else (lambda _fd: self._flush_stdin(driver)))

