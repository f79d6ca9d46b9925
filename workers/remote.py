"""The remote bridge: another INDI server's devices, served as if they were ours.

The bridge is an INDI client of the remote server (indiserver, indipyserver or another
indibroker) and a driver on our backbone: it owns the devices the remote defines, passes our
clients' getProperties and new*Vector up, and the remote's traffic (BLOBs too, when enabled) down.
When the remote is down or drops, it retries with capped backoff, tells clients with a `message`,
and on reconnect the devices are defined again; the rest of the server never notices.

Cycles (A bridges to B and B to A) are bounded, not detected: the broker accepts a device from
one source only, so a device that comes back around is dropped one hop later; a client's
getProperties for everything goes up as one request per device the remote has defined (a
device-less one goes up only when we connect), so it cannot circle; and a device-less `message`
already seen in the last few seconds is not published again.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import logging
import socket
import time
from typing import Any

from indibroker.broker import wire
from indibroker.broker.ratelog import RateLimitedLog
from indibroker.broker.supervision import RestartPolicy
from indibroker.workers import indi, sharedblob
from indibroker.workers.base import Worker
from indibroker.workers.codec import Element, StreamDecoder
from indibroker.workers.outstream import OutStream
from indibroker.workers.reactor import Timer
from indibroker.workers.settings import Inheritance, RemoteSettings

__all__ = ["RemoteBridge"]

log = logging.getLogger(__name__)
_warn = RateLimitedLog(log)  # what the remote server can make repeat

READ_SIZE = 256 * 1024
# Reconnect backoff: 0.5 s doubling to 5 s. Only its `delay` is used: a bridge never gives up.
RECONNECT = RestartPolicy(backoff_initial=0.5, backoff_factor=2.0, backoff_max=5.0)
ECHO_WINDOW = 5.0  # a device-less message seen this recently is not published again
UPSTREAM_QUEUE_BYTES = 16 * 1024 * 1024


class RemoteBridge(Worker):
    role = "remote"
    backbone_role = "remote"

    settings: RemoteSettings

    def __init__(self, settings: RemoteSettings, inheritance: Inheritance | None = None, **kw: Any):
        super().__init__(settings, inheritance, **kw)
        self.host = settings.host
        self.port = settings.port
        self.only_device = settings.device
        self.blob_enable = settings.blob_enable
        self.snoop_up = settings.snoop_up
        self.devices: set[str] = set()
        self.sock: socket.socket | None = None
        self.connected = False
        self.decoder = StreamDecoder(max_element=settings.max_element, resync=True)
        self.upstream = OutStream(self.reactor, UPSTREAM_QUEUE_BYTES, _warn, "not reading", f"remote {self.where}",
                                  on_error=lambda exc: self._lost(str(exc)))
        self.attempt = 0
        self.connects = 0
        self._retry: Timer | None = None
        self._recent_messages: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._down_since: float | None = None
        self.link_since = time.time()  # wall clock: when the link last came up or went down
        self.last_error = ""

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    # -- worker hooks -----------------------------------------------------------------------
    def setup(self) -> None:
        self._connect()

    def shutdown(self) -> None:
        self._close()

    def registered_again(self) -> None:
        # Requests sent while the broker was down are lost: have the remote define again.
        if self.connected:
            self.reactor.call_later(1.0, lambda: self._up(indi.get_properties(self.only_device)))

    def owned_devices(self) -> list[str]:
        return sorted(self.devices)

    def interests(self) -> list[tuple[str, str, int]]:
        # Our own devices' traffic goes up too, as a client relays it (indiserver passes a
        # client's set*Vector to its snooping drivers; indibroker does the same): so the remote
        # server's drivers can snoop devices served here. BLOBs stay home.
        return [("", "", wire.WANT_PLAIN)] if self.snoop_up else []

    def status(self) -> dict[str, Any]:
        return {"remote": self.where, "connected": self.connected,
                "link": "connected" if self.connected else "reconnecting", "link_since": self.link_since,
                "last_error": self.last_error, "devices": sorted(self.devices), "connects": self.connects}

    # -- the connection ---------------------------------------------------------------------
    def _connect(self) -> None:
        self._retry = None
        try:
            infos = socket.getaddrinfo(self.host, self.port, socket.AF_UNSPEC, socket.SOCK_STREAM)
            family, _, _, _, addr = sorted(infos, key=lambda i: i[0] != socket.AF_INET)[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            self._lost(f"cannot resolve {self.where}: {exc}")
            return
        sock.setblocking(False)
        code = sock.connect_ex(addr)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._lost(f"cannot connect to {self.where}: {errno.errorcode.get(code, code)}")
            return
        self.sock = sock
        self.reactor.set_writer(sock.fileno(), lambda _fd: self._connected())

    def _connected(self) -> None:
        assert self.sock is not None
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._lost(f"cannot connect to {self.where}: {errno.errorcode.get(code, code)}")
            return
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reactor.set_writer(self.sock.fileno(), None)
        self.reactor.add_reader(self.sock.fileno(), lambda _fd: self._readable())
        self.upstream.attach(self.sock.fileno())
        self.connected = True
        self.link_since = time.time()
        self.connects += 1
        self.attempt = 0
        self.decoder = StreamDecoder(max_element=self.decoder.max_element, resync=True)
        log.info("connected to remote %s", self.where)
        if self._down_since is not None:
            self.backbone.send(wire.MSG, "", "", b"", indi.message(
                f"indibroker: remote INDI server {self.where} is back"))
            self._down_since = None
        self._up(indi.get_properties(self.only_device))
        self.status_changed()

    def _close(self) -> None:
        self.upstream.detach()
        if self.sock is not None:
            self.reactor.forget(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self.connected = False

    def _lost(self, why: str) -> None:
        was_connected = self.connected
        self._close()
        self.last_error = why
        if was_connected or self.attempt == 0:
            self.link_since = time.time()
        for device in sorted(self.devices):
            self.backbone.send(wire.DEL, device, "", b"", indi.del_property(device))
        if was_connected or self.attempt == 0:
            text = f"indibroker: remote INDI server {self.where} lost ({why}); reconnecting"
            log.warning("%s", text)
            for device in sorted(self.devices) or [""]:
                self.backbone.send(wire.MSG, device, "", b"", indi.message(text, device))
        self.devices.clear()
        if self._down_since is None:
            self._down_since = time.monotonic()
        delay = RECONNECT.delay(self.attempt)
        self.attempt += 1
        self._retry = self.reactor.call_later(delay, self._connect)
        self.status_changed()

    # -- remote → us ------------------------------------------------------------------------
    def _readable(self) -> None:
        if self.sock is None:
            return
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(str(exc))
            return
        if not data:
            self._lost("connection closed")
            return
        elements = self.decoder.feed(data)
        if self.decoder.faults:
            _warn.warning("bad XML", "remote %s sent bad XML, skipped: %s", self.where,
                          "; ".join(self.decoder.faults[:3]))
            self.decoder.faults.clear()
        for element in elements:
            self._from_remote(element)

    def _from_remote(self, el: Element) -> None:
        tag = el.tag
        verb = indi.DRIVER_VERBS.get(tag)
        if verb is None:
            if tag == "pingRequest":
                self._up(indi.ping_reply(el.get("uid")))
            return
        device = el.get("device")
        name = el.get("name")
        if self.only_device and device and device != self.only_device:
            return
        if device and device == self.settings.own_device:
            return  # a chained indibroker's server device, named as ours: ours is the one served here
        if not device:
            if verb == wire.MSG and self._seen_recently(el.raw):
                return
        elif verb == wire.DEF and device not in self.devices:
            self.devices.add(device)
            if self.blob_enable:
                self._up(indi.enable_blob(device, indi.BlobMode.ALSO))
            self.status_changed()
        elif verb == wire.DEL and not name:
            self.devices.discard(device)
            self.status_changed()
        flags = indi.blob_flag(tag)
        self.backbone.send(verb, device, name, flags, el.raw)

    def _seen_recently(self, raw: bytes) -> bool:
        now = time.monotonic()
        recent = self._recent_messages
        while recent and next(iter(recent.values())) < now - ECHO_WINDOW:
            recent.popitem(last=False)
        key = hashlib.blake2b(raw, digest_size=16).digest()
        if key in recent:
            return True
        recent[key] = now
        if len(recent) > 4096:
            recent.popitem(last=False)
        return False

    # -- us → remote ------------------------------------------------------------------------
    def on_backbone(self, verb: bytes, device: str, name: str, flags: bytes, payload: bytes) -> None:
        if flags == wire.FLAG_SHARED:  # a libindi driver's BLOB, for the remote's snoopers
            going_up = self.connected and self.upstream.queued < UPSTREAM_QUEUE_BYTES // 2
            payload = sharedblob.take(payload, device, going_up, self.backbone, _warn, "the remote's snoopers")
            if not payload:
                return
        if not self.connected:
            return
        if verb in (wire.SET, wire.DEF, wire.DEL) and device and device not in self.devices:
            if self.upstream.queued < UPSTREAM_QUEUE_BYTES // 2:  # snooping is best effort
                self._up(payload)
            return
        if verb == wire.NEW and device in self.devices:
            self._up(payload)
        elif verb == wire.GETP:
            if device:
                if device in self.devices or device == self.only_device:
                    self._up(indi.get_properties(device, name))
            else:
                # A request for everything goes up as one request per device we know, never as
                # a device-less one: in a cycle of servers, that would come back to us forever.
                for known in sorted(self.devices):
                    self._up(indi.get_properties(known))

    def _up(self, data: bytes) -> None:
        """To the remote server, while connected (bounded: past UPSTREAM_QUEUE_BYTES it is dropped)."""
        self.upstream.push(data)

