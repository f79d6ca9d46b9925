"""The server device: indibroker's supervision as an INDI device every client can show and use.

It lives in the first gateway's process, as a guest with a backbone connection of its own: it
owns one device there, as a driver does (HELLO names it; a restarted broker is told again), so
it survives a broker restart like any worker and costs no process of its own (a forked worker
is about 8 MB PSS; the guest, a few hundred KB). KStars' INDI Control Panel,
indi_getprop/indi_setprop, indipyclient or PyIndi see the server, each driver and worker, the
clients, and switches to stop, start and restart drivers, start a new one, and set the log level
(workers/devicemodel.py makes the properties).

Where the state comes from: the arbiter's control socket (`status`, as `indibroker status`),
asked without blocking this loop (`ControlCall`: the single-threaded arbiter may be writing to
our lifeline at that moment). Commands go the same way (`driver`, `loglevel`), served by the code
that serves `indibroker driver` and the FIFO; the gateways refuse a read-only client's
new*Vector before it gets here.

What it costs: nothing while no client has asked for the device. Once a client has (a
getProperties for everything or for this device, or a new*Vector to it), the arbiter is polled
every POLL seconds without CPU and memory figures, and with them every USAGE_EVERY seconds (the
first FIRST_USAGE seconds after a client began to watch); once the gateways report no client
left, polling stops.
"""

from __future__ import annotations

import functools
import logging
import shlex
import time
from collections.abc import Callable
from typing import Any

from indibroker import __version__
from indibroker.broker import wire
from indibroker.broker.control import ControlCall, driver_request
from indibroker.broker.ratelog import RateLimitedLog
from indibroker.broker.runtime import RuntimeDir
from indibroker.workers import devicemodel, indi
from indibroker.workers.backbone import BackboneLink
from indibroker.workers.codec import StreamDecoder
from indibroker.workers.devicemodel import Hold, Names, Snapshot
from indibroker.workers.reactor import Reactor, Timer
from indibroker.workers.settings import ServerDeviceSettings

__all__ = ["ServerDevice"]

log = logging.getLogger(__name__)

POLL = 0.5  # seconds between polls while a client watches: changes of state reach it this fast
USAGE_EVERY = 5.0  # seconds between polls with CPU and memory figures (psutil, in the arbiter)
WATCH_GRACE = 1.0  # a client that just asked may not be counted by its gateway yet (0.2 s)
FIRST_USAGE = 2.0  # CPU and memory once a client has watched this long: one that asks once and
# leaves (indi_getprop, a script) makes the arbiter load no psutil
HOLD = 10.0  # seconds a pressed switch shows Busy at most, waiting for the state it asked for
ALERT = 5.0  # seconds a refused request shows Alert
REDEFINE_DELAY = 1.0  # after registering with a restarted broker, as the driver workers wait


def _guarded(method: Callable[..., None]) -> Callable[..., None]:
    """What the device does for a message or a reply cannot take its host down: a failure
    (a bug, a status row of a shape not foreseen) is logged, rate-limited, and the gateway goes
    on serving its clients."""
    @functools.wraps(method)
    def run(self: ServerDevice, *args: Any) -> None:
        try:
            method(self, *args)
        except Exception as exc:  # noqa: BLE001 - the host's loop must not see it
            self._warn.error(("failed", method.__name__), "server device: %s failed: %r", method.__name__, exc)
    return run


class ServerDevice:
    """Hosted by a worker (`Gateway`), which gives it its loop, the runtime directory, a backbone
    connection of its own (`connect`), and `changed` to call when its status changes."""

    backbone: BackboneLink

    def __init__(self, settings: ServerDeviceSettings, *, runtime: RuntimeDir, reactor: Reactor,
                 changed: Callable[[], None] = lambda: None):
        self.settings = settings
        self.name = settings.name
        self.runtime = runtime
        self.reactor = reactor
        self.status_changed = changed
        self.device = settings.device
        self.address = f"{settings.host or '*'}:{settings.port}"
        self.version = __version__  # not importlib.metadata: 2 MB of imports for one string
        self.names = Names()
        self.base: Snapshot = {}  # the server's state as last polled
        self.shown: Snapshot = {}  # what clients were sent: `base` with the holds laid over it
        self.holds: dict[str, Hold] = {}
        self.full_rows: list[dict[str, Any]] = []  # the last poll with CPU and memory
        self.last_full = float("-inf")
        self.watched_at: float | None = None  # when a client last asked; None: nobody watches
        self.polls = 0
        self.polled_at = float("-inf")  # when the last poll's answer came
        self._asked: list[str] = []  # getProperties waiting for a fresh poll (property names, "": all)
        self._in_flight = False
        self._again = False  # a poll was asked for while one was in flight
        self._timer: Timer | None = None
        self._hold_timer: Timer | None = None
        self._warn = RateLimitedLog(log, 60.0)

    # -- what its host calls ------------------------------------------------------------------
    def connect(self, backbone: BackboneLink) -> None:
        self.backbone = backbone

    def setup(self) -> None:
        self._poll()  # one snapshot, to answer the first getProperties from

    def shutdown(self) -> None:
        for timer in (self._timer, self._hold_timer):
            if timer is not None:
                timer.cancel()
        self.backbone.close()

    def owned_devices(self) -> list[str]:
        return [self.device]

    def registered_again(self) -> None:
        self.reactor.call_later(REDEFINE_DELAY, lambda: self._send(devicemodel.defs(self.device, self.shown)))

    def status(self) -> dict[str, Any]:
        return {"device": self.device, "watched": self.watched_at is not None}

    @_guarded
    def on_backbone(self, verb: bytes, device: str, name: str, flags: bytes, payload: bytes) -> None:
        if verb == wire.GETP and device in ("", self.device):
            self._watch()
            if time.monotonic() - self.polled_at <= POLL:
                self._send(devicemodel.defs(self.device, self.shown, name))
            else:  # answered with the state as it is now, once the poll under way is in
                self._asked.append(name)
                self._poll()
        elif verb == wire.NEW and device == self.device:
            self._watch()
            self._new(name, payload)

    # -- polling the arbiter ----------------------------------------------------------------
    def _watch(self) -> None:
        first = self.watched_at is None
        self.watched_at = time.monotonic()
        if first:
            self.last_full = max(self.last_full, self.watched_at - USAGE_EVERY + FIRST_USAGE)
            self.status_changed()
            self._poll()

    def _poll(self) -> None:
        """Ask the arbiter for its status now (or as soon as the request in flight is answered)."""
        if self._in_flight:
            self._again = True
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # CPU and memory only for a client: psutil in the arbiter costs memory and time.
        usage = self.watched_at is not None and time.monotonic() - self.last_full >= USAGE_EVERY
        self._in_flight = True
        ControlCall(self.reactor, self.runtime.control_path, {"cmd": "status", "usage": usage},
                    lambda reply: self._polled(reply, usage))

    def _polled(self, reply: dict[str, Any], usage: bool) -> None:
        self._in_flight = False
        self.polls += 1
        try:
            self._take(reply, usage)
        finally:  # whatever the reply was, polling goes on while a client watches
            if self._again or self.watched_at is not None:
                delay = 0.0 if self._again else POLL
                self._again = False
                self._timer = self.reactor.call_later(delay, self._poll)

    @_guarded
    def _take(self, reply: dict[str, Any], usage: bool) -> None:
        now = time.monotonic()
        rows = reply.get("status")
        if not reply.get("ok") or not isinstance(rows, list):
            self._warn.warning("status", "server device: no status from the arbiter: %s", reply.get("error"))
        else:
            if usage:
                self.full_rows, self.last_full = rows, now
            rows = devicemodel.merge_usage(rows, self.full_rows)
            clients = sum(r.get("clients", 0) for r in rows if r.get("role") == "gateway")
            if clients == 0 and self.watched_at is not None and now - self.watched_at > WATCH_GRACE:
                self.watched_at = None  # polled again when a client next asks
                self.status_changed()
            self.base = devicemodel.build(rows, self.names, version=self.version, address=self.address)
            self.polled_at = now
        asked, self._asked = self._asked, []
        self._show(asked)

    def _show(self, asked: list[str] | None = None) -> None:
        """Send clients what changed since they were last sent anything, and answer the
        getProperties in `asked` (property names, "" for all). Definitions go before updates:
        an update reaches every client interested in the device, the one that just asked too,
        and libindi complains of an update for a property it was not yet sent."""
        shown = devicemodel.overlay(self.base, self.holds, time.monotonic())
        changes = devicemodel.diff(self.device, self.shown, shown)
        defined = [c for c in changes if c[0] != wire.SET]  # deletions, then new definitions
        for name in ([""] if asked and "" in asked else dict.fromkeys(asked or [])):
            done = {n for verb, n, _ in defined if verb == wire.DEF}
            defined += [d for d in devicemodel.defs(self.device, shown, name) if d[1] not in done]
        self._send(defined + [c for c in changes if c[0] == wire.SET])
        self.shown = shown
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if self.holds:  # a hold that times out must end even if nothing else changes
            until = min(h.until for h in self.holds.values())
            self._hold_timer = self.reactor.call_later(max(0.0, until - time.monotonic()) + 0.01, self._show)

    def _send(self, messages: list[tuple[bytes, str, bytes]]) -> None:
        for verb, name, payload in messages:
            self.backbone.send(verb, self.device, name, b"", payload)

    def _tell(self, text: str) -> None:
        self.backbone.send(wire.MSG, self.device, "", b"", indi.message(f"indibroker: {text}", self.device))

    # -- an operator's request --------------------------------------------------------------
    def _new(self, name: str, payload: bytes) -> None:
        elements = StreamDecoder().feed(payload)
        prop = self.shown.get(name)
        if not elements or prop is None or prop.perm != "rw":
            self._warn.warning(("new", name), "server device: %s cannot be set", name)
            return
        asked = {str(one.get("name")): (one.text or "").strip() for one in elements[0].root}
        asked = {k: v for k, v in asked.items() if k in prop.values()}
        if name == "DRIVERS":
            current = prop.values()
            actions = [("start" if v == "On" else "stop", k) for k, v in asked.items()
                       if v in ("On", "Off") and v != current[k]]
            self._operate(name, [driver_request(a, self.names.name_of(k) or k) for a, k in actions], asked)
        elif name == "RESTART":
            self._operate(name, [driver_request("restart", self.names.name_of(k) or k)
                                  for k, v in asked.items() if v == "On"], asked, until_replied=True)
        elif name == "LOG_LEVEL":
            level = next((k for k, v in asked.items() if v == "On"), "")
            self._operate(name, [{"cmd": "loglevel", "level": level}] if level else [],
                           {k: "On" if k == level else "Off" for k in prop.values()})
        elif name == "START_DRIVER":
            try:
                argv = shlex.split(asked.get("DRIVER", ""))
            except ValueError as exc:
                argv, why = [], str(exc)
            else:
                why = "no executable given"
            if not argv:
                self._refused(name, f"cannot start a driver: {why}")
                return
            dev = asked.get("INDIDEV", "")
            self._operate(name, [driver_request("start", dev or argv[0], argv, {"INDIDEV": dev} if dev else None)],
                           asked, until_replied=True)

    def _operate(self, name: str, commands: list[dict[str, Any]], asked: dict[str, str],
                  until_replied: bool = False) -> None:
        """Send `commands` to the arbiter; meanwhile the property shows Busy with what was asked
        (until the state shows it, or until every reply is in with `until_replied`)."""
        if not commands:
            self._show()  # nothing to do: clients see the property as it is
            return
        hold = self.holds[name] = Hold("Busy", time.monotonic() + HOLD, dict(asked))
        waiting = len(commands)

        def replied(command: dict[str, Any], reply: dict[str, Any]) -> None:
            nonlocal waiting
            waiting -= 1
            if reply.get("ok"):
                log.info("server device: %s: done", _describe(command))
            else:
                self._refused(name, f"{_describe(command)}: {reply.get('error')}")
            if waiting == 0 and until_replied and self.holds.get(name) is hold:
                del self.holds[name]
            self._poll()

        for command in commands:
            ControlCall(self.reactor, self.runtime.control_path, command,
                        lambda reply, command=command: replied(command, reply))  # type: ignore[misc]
        self._show()

    def _refused(self, name: str, text: str) -> None:
        log.warning("server device: %s", text)
        self._tell(text)
        self.holds[name] = Hold("Alert", time.monotonic() + ALERT)
        self._show()


def _describe(command: dict[str, Any]) -> str:
    if command.get("cmd") == "driver":
        return f"driver {command.get('action')} {command.get('name')}"
    return f"{command.get('cmd')} {command.get('level', '')}".strip()
