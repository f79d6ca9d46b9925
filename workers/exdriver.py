"""The executable-driver supervisor: runs third-party INDI drivers and speaks for them.

One worker may supervise several drivers; each driver is its own OS process in its own session,
talking XML on stdin/stdout, so a driver crash never touches its supervisor. The worker routes:
what a driver writes goes to the backbone (definitions, updates, its snooping requests), what
the broker sends goes to the right driver's stdin, pingRequests are answered here, and the
driver's lifecycle (start, restart per policy, an operator's stop) is told to clients as
delProperty and a message. Its parts:

- `workers/driverprocess.py`: a driver's OS process (spawn, pipes, stderr, the hang watchdog,
  stop and reap), through one object of OS calls.
- `workers/driverpacing.py`: BLOB pacing, pure: when a driver's BLOBs wait for room, and when it
  is not read.
- `broker/supervision.py`: when to restart.

Fairness between the drivers of one worker comes from bounded work per turn: a flooding driver is
read one chunk at a time between everyone else's turns, and each driver's stdin queue is bounded
in bytes, so a driver that stops reading cannot grow our memory or block anyone (past
`hang_timeout` it is killed and restarted).
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from indibroker.broker import wire
from indibroker.broker.oscalls import describe_exit
from indibroker.broker.ratelog import RateLimitedLog
from indibroker.broker.supervision import Lifecycle
from indibroker.workers import indi, sharedblob
from indibroker.workers.base import Worker
from indibroker.workers.codec import Element, StreamDecoder
from indibroker.workers.driverpacing import MAX_PAUSE, DriverPacer, PauseTimer
from indibroker.workers.driverprocess import (
    BLOB_READ_SIZE,
    READ_SIZE,
    STOP_TIMEOUT,
    DriverProcess,
    ProcessCalls,
    stop_all,
)
from indibroker.workers.interest import Interest, union
from indibroker.workers.reactor import Timer
from indibroker.workers.settings import EXIT_NO_DRIVERS, DriverSettings, ExDriverSettings, Inheritance
from indibroker.workers.traffic import Traffic

__all__ = ["ExDriverWorker", "Driver"]

log = logging.getLogger(__name__)

MAX_HELD_BUFFERS = 256  # shared BLOB buffers a driver may have waiting for their DONE
HELD_MAX_AGE = 20.0  # seconds after which a buffer no DONE came for is closed (consumers take ms)
HELD_CHECK = 5.0  # seconds between looks for such buffers, while any is held
ORPHAN_STOP_TIMEOUT = 1.0  # the arbiter died: a new instance may be starting, so be gone at once
REDEFINE_DELAY = 1.0  # after registering with a restarted broker, before drivers define again
RESTART_POLL = 0.2  # an operator's restart: how often to look whether the old process is gone


@dataclass(frozen=True, slots=True)
class SharedElement(Element):
    """A setBLOBVector whose BLOBs are shared buffers we hold (workers/sharedblob.py)."""

    buffers: tuple[int, ...] = ()
    blob_bytes: int = 0  # their size: what the pacing window counts


SKIPPED = Element(b"", etree.Element("skipped"))  # `_share_buffers`: this one goes nowhere


def is_blob(el: Element) -> bool:
    return indi.is_blob(el.tag)


class Driver:
    """One supervised driver: its process, its lifecycle, and what we know of what it says."""

    def __init__(self, spec: DriverSettings, process: DriverProcess):
        self.spec = spec
        self.process = process
        self.lifecycle = Lifecycle(spec.policy)
        self.decoder = StreamDecoder(max_element=spec.max_element, resync=True)
        self.devices: set[str] = set()
        self.interest = Interest()  # what it snoops
        self.pacer: DriverPacer[Element] = DriverPacer(is_blob)
        self.pause_timer: Timer | None = None
        self.restart_timer: Timer | None = None
        self.unfinished_timer: Timer | None = None  # armed while an element is half-read
        self.malformed = 0
        self.operator_restarts = 0  # restarts asked for (not crashes: those are the lifecycle's)
        # Per device, [when sent, its shared buffers] of each BLOB sent and not yet done
        # everywhere (no buffers for a BLOB in base64), oldest first: the broker's DONEs for the
        # device come in this order, whatever became of the driver meanwhile.
        self.held: dict[str, collections.deque[list[Any]]] = {}
        self.held_count = 0  # buffers in `held`

    def hold(self, device: str, buffers: tuple[int, ...]) -> None:
        self.held.setdefault(device, collections.deque()).append([time.monotonic(), buffers])
        self.held_count += len(buffers)

    def close_held(self, device: str, count: int = 1) -> None:
        """The oldest `count` BLOBs of `device` are done everywhere: close their buffers."""
        queue = self.held.get(device)
        for _ in range(count):
            if not queue:
                break
            self._close(queue.popleft())
        if not queue:
            self.held.pop(device, None)

    def close_stale(self, older_than: float) -> int:
        """Close the buffers of BLOBs sent before `older_than` (every consumer opens its own
        within milliseconds: a DONE this late was lost), keeping their places for the DONEs
        that may still come. How many were closed."""
        closed = 0
        for queue in self.held.values():
            for entry in queue:
                if entry[0] >= older_than:
                    break
                closed += len(entry[1])
                self._close(entry)
        return closed

    def _close(self, entry: list[Any]) -> None:
        for fd in entry[1]:
            os.close(fd)
        self.held_count -= len(entry[1])
        entry[1] = ()

    def close_all_held(self) -> None:
        for device in list(self.held):
            self.close_held(device, len(self.held[device]))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def running(self) -> bool:
        return self.process.running

    def read_size(self) -> int:
        # 1 MB reads only inside an element already bigger than a chunk (a BLOB, one message:
        # read it briskly). A flood of small messages leaves one cut at nearly every chunk's end,
        # and must still be read a chunk per turn, or a quiet driver's reply waits behind it.
        return BLOB_READ_SIZE if self.decoder.pending_bytes > READ_SIZE else READ_SIZE

    def status(self) -> dict[str, Any]:
        lc = self.lifecycle
        return {
            "name": self.name,
            "argv": self.spec.argv,
            "pid": self.process.pid,
            "state": lc.state.value,
            "restarts": lc.restarts,
            "operator_restarts": self.operator_restarts,
            "started": self.process.started_wall,
            "last_exit": lc.last_exit,
            "devices": sorted(self.devices),
            "pauses": self.pacer.pauses,
        }


class ExDriverWorker(Worker):
    role = "exdriver"

    settings: ExDriverSettings

    def __init__(self, settings: ExDriverSettings, inheritance: Inheritance | None = None, *,
                 calls: ProcessCalls | None = None, **kw: Any):
        super().__init__(settings, inheritance, **kw)
        self.log_dir = Path(settings.log_dir) if settings.log_dir else None
        self.calls = calls if calls is not None else ProcessCalls()
        self._warn = RateLimitedLog(log)
        self.traffic = Traffic()  # -vv / -vvv
        self.drivers: dict[str, Driver] = {d.name: self._new_driver(d) for d in settings.drivers}
        self._stale_timer: Timer | None = None

    def _new_driver(self, spec: DriverSettings) -> Driver:
        driver: Driver
        process = DriverProcess(spec, self.reactor, self.calls, self._warn, self.log_dir,
                                on_output=lambda data: self._feed(driver, data),
                                read_size=lambda: driver.read_size())
        driver = Driver(spec, process)
        return driver

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
        # What was on its way through the old broker will get no DONE: its buffers close now
        # (a consumer that has not taken one yet loses that BLOB).
        for driver in self.drivers.values():
            driver.close_all_held()
        # A new broker may have lost requests sent while it was down (a client's getProperties):
        # have every driver define its properties again once the gateways are registered too.
        self.reactor.call_later(REDEFINE_DELAY, self._redefine_all)

    def _redefine_all(self) -> None:
        for driver in self.drivers.values():
            if driver.running:
                self._to_driver(driver, indi.get_properties())

    def shutdown(self) -> None:
        for driver in self.drivers.values():
            if driver.running:
                driver.lifecycle.stop()
        stop_all([d.process for d in self.drivers.values()], ORPHAN_STOP_TIMEOUT if self.orphaned else STOP_TIMEOUT)

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
            old = self.drivers.get(spec.name)
            if old is not None and old.running:
                log.warning("driver %s already running", spec.name)
                return
            if old is not None and old.restart_timer is not None:  # its pending restart must not
                old.restart_timer.cancel()  # start a process for the record replaced here
            self.drivers[spec.name] = self._new_driver(spec)
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
            driver.operator_restarts += 1
            self._operator_stop(driver, then_start=True)
        else:
            log.warning("unknown driver action %r", action)

    # -- lifecycle --------------------------------------------------------------------------
    def _start(self, driver: Driver) -> None:
        if driver.restart_timer is not None:
            driver.restart_timer.cancel()
            driver.restart_timer = None
        driver.lifecycle.start()
        why_not = driver.process.start()
        if why_not is not None:
            self._exited(driver, why_not)
            return
        driver.decoder = StreamDecoder(max_element=driver.spec.max_element, resync=True)
        driver.lifecycle.spawned(time.monotonic())
        driver.process.read_stdout(driver.pacer.should_read)
        # Every (re)start: ask for definitions, so devices are known and clients get them again.
        self._to_driver(driver, indi.get_properties())
        self.status_changed()

    def _operator_stop(self, driver: Driver, then_start: bool = False) -> None:
        if driver.restart_timer is not None:
            driver.restart_timer.cancel()
            driver.restart_timer = None
        if driver.lifecycle.stop() and driver.running:
            driver.process.terminate()
            if then_start:
                driver.restart_timer = self.reactor.call_later(RESTART_POLL, lambda: self._start_when_stopped(driver))
        elif then_start:
            self._start(driver)
        self.status_changed()

    def _start_when_stopped(self, driver: Driver) -> None:
        if driver.running:
            driver.restart_timer = self.reactor.call_later(RESTART_POLL, lambda: self._start_when_stopped(driver))
        else:
            driver.restart_timer = None
            self._start(driver)

    def _on_sigchld(self, signum: int) -> None:
        for driver in list(self.drivers.values()):
            code = driver.process.reap()
            if code is not None:
                self._process_gone(driver)
                self._exited(driver, describe_exit(code))

    def _process_gone(self, driver: Driver) -> None:
        """Its process has exited: what it wrote last still counts, then its pipes close."""
        driver.process.drain()
        # What pacing held goes out now, and pacing starts afresh for the next process.
        for element in driver.pacer.release_all():
            self._from_driver(driver, element)
        self._pause_timer(driver, driver.pacer.reset())
        if driver.unfinished_timer is not None:
            driver.unfinished_timer.cancel()
            driver.unfinished_timer = None
        driver.process.close()

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
            self._indiserver_line(driver, f"restart #{driver.lifecycle.restarts - 1}")
        else:
            text = f"driver {driver.name} exited ({how}); {decision.reason}: not restarting (FATAL)"
            log.error("%s", text)
            self._indiserver_line(driver, f"Terminated after #{driver.lifecycle.restarts} restarts.")
        for device in gone or [""]:
            self.backbone.send(wire.MSG, device, "", b"", indi.message(text, device))
        self.backbone.update_interests()
        self.status_changed()
        if self.settings.exit_when_no_drivers and not any(
                d.running or d.restart_timer is not None for d in self.drivers.values()):
            # indiserver's rule, for its command line without -f: no driver left, no server.
            log.error("no driver left: %s exits", self.name)
            self.exit_code = EXIT_NO_DRIVERS
            self.reactor.call_later(0, self.reactor.stop)  # from the loop: this may be set-up time

    def _indiserver_line(self, driver: Driver, text: str) -> None:
        """indiserver's own stderr line about a driver, which tools parse: KStars watches for
        `Driver (.*): Terminated after #0 restarts` to offer the user a restart."""
        if self.settings.indiserver_messages:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            sys.stderr.write(f"{stamp}: Driver {driver.spec.argv[0]}: {text}\n")
            sys.stderr.flush()

    # -- driver → server --------------------------------------------------------------------
    def _feed(self, driver: Driver, data: bytes) -> None:
        elements = driver.decoder.feed(data)
        self._report_faults(driver)
        if driver.decoder.pending_bytes and driver.unfinished_timer is None:
            driver.unfinished_timer = self.reactor.call_later(
                driver.spec.unfinished_timeout, lambda: self._unfinished_due(driver))
        pacer = driver.pacer
        for element in elements:
            if element.tag == "setBLOBVector" and b"attached" in element.raw:
                shared = self._share_buffers(driver, element)
                if shared is None:
                    return  # the driver is being dropped
                if shared is SKIPPED:
                    continue
                element = shared
            if pacer.admit(element):
                self._from_driver(driver, element)
        if not pacer.should_read:
            driver.process.read_stdout(False)  # a BLOB is held: the driver waits on its pipe

    def _share_buffers(self, driver: Driver, el: Element) -> Element | None:
        """A libindi driver on its socketpair passes each BLOB as a memory buffer, bound to its
        `attached="true"` oneBLOBs in document order. We keep each buffer open and name it in
        the message (workers/sharedblob.py): consumers take it from there, and it is closed when
        the broker says every one has. A driver that says `attached` without a buffer is
        dropped, as indiserver drops it. Past MAX_HELD_BUFFERS (DONEs that do not come) the
        BLOB goes in base64 instead."""
        buffers = driver.process.buffers
        attached = [one for one in el.root if one.get("attached") == "true"]
        if len(buffers) < len(attached):
            log.error("driver %s: attached BLOB %s without its buffer (Missing shared buffer): "
                      "dropping the driver", driver.name, attached[len(buffers)].get("name"))
            driver.process.kill()
            return None
        fds = [buffers.popleft() for _ in attached]
        for one in el.root:  # only the names we give count
            one.attrib.pop(sharedblob.SHARED_ATTR, "")
        if not el.get("device"):
            for fd in fds:
                os.close(fd)
            self._warn.warning(("no device", driver.name), "driver %s: setBLOBVector without a device dropped",
                               driver.name)
            return SKIPPED
        try:
            sizes = [int(one.get("size") or 0) for one in attached]
            if any(os.fstat(fd).st_size < size for fd, size in zip(fds, sizes, strict=True)):
                raise ValueError("its buffer is smaller than the size it gives")
            # A buffer its driver could still shrink would kill a consumer reading it (SIGBUS):
            # one that is not sealed is copied into one that is (libindi's are sealed).
            for i, (fd, size) in enumerate(zip(fds, sizes, strict=True)):
                if not sharedblob.sealed(fd):
                    fds[i] = sharedblob.sealed_copy(fd, size)
                    os.close(fd)
            if not self.settings.share_blobs or driver.held_count + len(fds) > MAX_HELD_BUFFERS:
                if self.settings.share_blobs:  # else BLOBs cross hosts: always in base64
                    self._warn.warning(("held", driver.name), "driver %s: %d BLOB buffers not yet taken "
                                       "by every consumer: sending this one in base64", driver.name,
                                       driver.held_count)
                for one, fd, size in zip(attached, fds, sizes, strict=True):
                    del one.attrib["attached"]
                    one.text = sharedblob.b64encode(os.pread(fd, size, 0)).decode("ascii") if size else ""
                for fd in fds:
                    os.close(fd)
                return Element(etree.tostring(el.root), el.root)
            for one, fd in zip(attached, fds, strict=True):
                one.set(sharedblob.SHARED_ATTR, sharedblob.reference(fd))
        except (OSError, ValueError) as exc:
            for fd in fds:
                os.close(fd)
            log.error("driver %s: its BLOB buffer cannot be read (%s): dropping the driver", driver.name, exc)
            driver.process.kill()
            return None
        return SharedElement(etree.tostring(el.root), el.root, tuple(fds), sum(sizes))

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
        process = driver.process
        if not process.running or not driver.decoder.pending_bytes:
            return
        timeout = driver.spec.unfinished_timeout
        idle = time.monotonic() - process.last_read
        if process.reading and idle >= timeout:
            driver.decoder.abandon(f"no more of it for {idle:.0f} s")
            self._report_faults(driver)
            return
        wait = timeout - idle if process.reading else timeout  # paced by us: not its fault
        driver.unfinished_timer = self.reactor.call_later(max(wait, 0.05), lambda: self._unfinished_due(driver))

    def _from_driver(self, driver: Driver, el: Element) -> None:
        tag = el.tag
        verb = indi.DRIVER_VERBS.get(tag)
        device = el.get("device")
        name = el.get("name")
        if self.traffic.on:
            self.traffic.log(f"driver {driver.name}", "->", el.raw, device or "", name or "")
        if verb is not None:
            if verb == wire.DEF and device and device not in driver.devices:
                driver.devices.add(device)
                self.status_changed()
            elif verb == wire.DEL and device and not name:
                driver.devices.discard(device)
                self.status_changed()
            flags = indi.blob_flag(tag)
            size = len(el.raw)
            if type(el) is SharedElement:
                flags, size = wire.FLAG_SHARED, el.blob_bytes
            self.backbone.send(verb, device, name, flags, el.raw)
            if flags and device:
                driver.hold(device, el.buffers if type(el) is SharedElement else ())
                if driver.held_count and self._stale_timer is None:
                    self._stale_timer = self.reactor.call_later(HELD_CHECK, self._close_stale)
                self._pause_timer(driver, driver.pacer.sent(device, size))
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

    # -- BLOB pacing (workers/driverpacing.py decides) ---------------------------------------
    def _paced(self, driver: Driver, timer: PauseTimer | None) -> None:
        """After a pacing event: apply the timer decision, send on what may go now, and read the
        driver again unless a BLOB is still held."""
        self._pause_timer(driver, timer)
        for element in driver.pacer.releasable():
            self._from_driver(driver, element)
        driver.process.read_stdout(driver.pacer.should_read)

    def _pause_timer(self, driver: Driver, timer: PauseTimer | None) -> None:
        if timer is None:
            return
        if driver.pause_timer is not None:
            driver.pause_timer.cancel()
            driver.pause_timer = None
        if timer is PauseTimer.ARM:
            driver.pause_timer = self.reactor.call_later(MAX_PAUSE, lambda: self._pause_expired(driver))

    def _pause_expired(self, driver: Driver) -> None:
        driver.pause_timer = None
        log.debug("driver %s: BLOB pacing timed out; reading again", driver.name)
        self._paced(driver, driver.pacer.expired())

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
            if flags == wire.FLAG_SHARED:  # snooped from a libindi driver: in base64 for ours
                payload = sharedblob.take(payload, device, True, self.backbone, self._warn, "snooping drivers")
                if not payload:
                    return
                blob = True
            for driver in self.drivers.values():
                if driver.running and device not in driver.devices and \
                        (verb != wire.MSG or driver.spec.snoop_messages) and \
                        driver.interest.wants(device, name, blob):
                    self._to_driver(driver, payload)
        elif verb == wire.FLOW:
            if flags == wire.FLOW_DONE:  # for the driver that sent it, running or not
                sender = next((d for d in self.drivers.values() if device in d.held), None)
                if sender is not None:
                    sender.close_held(device)
            owner = self._owner(device)
            if owner is None:
                return
            pacer = owner.pacer
            if flags == wire.FLOW_DONE:
                self._paced(owner, pacer.done(device))
            elif flags == wire.FLOW_FULL:
                self._paced(owner, pacer.on_full())
            else:
                self._paced(owner, pacer.on_open())

    def _close_stale(self) -> None:
        """The backstop for DONEs that never come (a message the broker could not queue)."""
        self._stale_timer = None
        older = time.monotonic() - HELD_MAX_AGE
        closed = sum(d.close_stale(older) for d in self.drivers.values())
        if closed:
            self._warn.warning("stale", "closed %d BLOB buffer(s) no DONE came for in %.0f s", closed, HELD_MAX_AGE)
        if any(d.held_count for d in self.drivers.values()):
            self._stale_timer = self.reactor.call_later(HELD_CHECK, self._close_stale)

    def _owner(self, device: str) -> Driver | None:
        for driver in self.drivers.values():
            if device in driver.devices:
                return driver
        return None

    def _to_driver(self, driver: Driver, data: bytes) -> None:
        if self.traffic.on:
            self.traffic.log(f"driver {driver.name}", "<-", data)
        driver.process.write(data)
