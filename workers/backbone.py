"""A worker's end of the backbone: one DEALER to the broker, hello, heartbeats, re-registration.

Every worker kind uses this one class. The broker's state is rebuildable: when it restarts it
answers our next message with WHO, and we say HELLO again with the devices we own and our
interests, so routing resumes without anyone reconnecting. Heartbeats are cheap (one small message
every few seconds) and any traffic from the broker counts as one (Paranoid Pirate style): a
worker that hears nothing for LIVENESS intervals drops its connection and makes a new one before
saying HELLO again, so a registration that did not take (a route lost to another connection, a
broker that is wedged) is repaired rather than repeated into the same dead pipe.

On a joined host (`link`, broker/hosts.py) the same DEALER goes over TCP to the central broker,
as a CURVE client, its identity prefixed with the host's name; its heartbeats carry the
worker's status report, and a partition is healed by the same reconnection. Nothing here waits
for the link: while it is down what we send queues in ZeroMQ up to HOST_HWM, then is dropped
(counted), and a reconnection discards it (the drivers define again once registered).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import zmq

from indibroker.broker import wire
from indibroker.broker.hosts import JoinLink, secure_client
from indibroker.broker.ratelog import RateLimitedLog
from indibroker.broker.transport import ZERO_COPY_BYTES, recv_frames, send_frames
from indibroker.workers.reactor import Reactor

__all__ = ["Backbone", "BackboneLink", "HEARTBEAT_INTERVAL"]

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 5.0
LIVENESS = 3  # intervals without a word from the broker before we say HELLO again

MessageHandler = Callable[[bytes, str, str, bytes, bytes], None]
BATCH = 512  # messages per ZeroMQ message at most
HEADER_CACHE = 4096
HWM = 100_000  # messages, on ipc
HOST_HWM = 10_000  # messages, to a central broker over TCP: bounded while a link is down


class BackboneLink(Protocol):
    """What a worker uses of its backbone; `Backbone` is the real one, tests/fakes.py a fake."""

    def send(self, verb: bytes, device: str = "", name: str = "", flags: bytes = b"",
             payload: bytes = b"") -> None: ...

    def update_interests(self) -> None: ...

    def hello(self) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class Backbone:
    def __init__(
        self,
        reactor: Reactor,
        ctx: zmq.Context,
        endpoint: str,
        role: str,
        name: str,
        on_message: MessageHandler,
        devices: Callable[[], Iterable[str]],
        interests: Callable[[], Iterable[tuple[str, str, int]]],
        registered_again: Callable[[], None] = lambda: None,
        instance: str = "",
        heartbeat: float = HEARTBEAT_INTERVAL,
        link: JoinLink | None = None,
        report: Callable[[], bytes] | None = None,
    ):
        self.reactor = reactor
        self.ctx = ctx
        self.link = link
        self._report = report
        if link is not None:
            endpoint, heartbeat = link.endpoint, link.heartbeat
        self.endpoint = endpoint
        self.instance = instance
        self.heartbeat = heartbeat
        self.reconnects = 0
        self._silence_log = RateLimitedLog(log, 300.0)
        self.role = role
        self.name = name
        self._on_message = on_message
        self._devices = devices
        self._interests = interests
        self._registered_again = registered_again
        self._last_sub: bytes | None = None
        self._interests_due = False
        self._records: list[bytes] = []  # the batch being built: index records...
        self._bodies: list[bytes] = []  # ...and their payloads
        self._headers_out: dict[tuple[bytes, str, str, bytes], bytes] = {}
        self._headers_in: dict[bytes, tuple[bytes, str, str, bytes]] = {}
        self.sock: zmq.Socket | None = None
        self._last_heard = time.monotonic()
        self.dropped = 0
        self._connect()
        self._heartbeat_timer = reactor.call_later(heartbeat, self._heartbeat)
        self.hello()

    def _connect(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        prefix = f"{self.link.host}/" if self.link is not None else ""
        sock.setsockopt(zmq.IDENTITY, f"{prefix}{self.role}:{self.name}".encode())
        sock.setsockopt(zmq.LINGER, 0)
        hwm = HWM if self.link is None else HOST_HWM
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        if self.link is not None:
            secure_client(sock, self.link)
        sock.connect(self.endpoint)
        self.sock = sock
        self.reactor.add_zmq(sock, self._readable)

    def _reconnect(self) -> None:
        """A fresh connection: whatever the old one was stuck in (a route handed to another
        connection, a half-dead pipe) is gone with it."""
        self._disconnect()
        self.reconnects += 1
        self._connect()

    def _disconnect(self) -> None:
        if self.sock is not None:
            self.reactor.remove_zmq(self.sock)
            self.sock.close(linger=0)
            self.sock = None

    def hello(self) -> None:
        self._records, self._bodies = [], []  # batched for a broker that no longer knows us: moot
        self.send(wire.HELLO, payload=wire.hello_payload(self.role, self.name, self._devices(), self.instance,
                                                         self.heartbeat))
        self._last_sub = None
        self._send_interests()
        self.flush()

    def update_interests(self) -> None:
        """Our interests changed: send them at the end of this turn (a burst of changes, say a
        client's thousand getProperties in one read, costs one computation, not a thousand)."""
        if not self._interests_due:
            self._interests_due = True
            self.reactor.defer(self._send_interests)

    def _send_interests(self) -> None:
        self._interests_due = False
        payload = wire.encode_interests(sorted(set(self._interests())))
        if payload != self._last_sub:
            self._last_sub = payload
            self.send(wire.SUB, payload=payload)

    def send(self, verb: bytes, device: str = "", name: str = "", flags: bytes = b"",
             payload: bytes = b"") -> None:
        """Queue one message; the batch goes out at the end of this turn of the loop."""
        key = (verb, device, name, flags)
        head = self._headers_out.get(key)
        if head is None:  # a flood repeats a handful of headers: build each once
            if len(self._headers_out) > HEADER_CACHE:
                self._headers_out.clear()
            try:
                head = wire.header(verb, device, name, flags)
            except ValueError as exc:
                log.warning("message dropped: %s", exc)
                return
            self._headers_out[key] = head
        if len(payload) >= ZERO_COPY_BYTES:  # a batch of its own: it moves by reference
            self.flush()
            self._send([wire.record(head, len(payload))], payload)
            return
        self._records.append(wire.record(head, len(payload)))
        self._bodies.append(payload)
        if len(self._records) >= BATCH:
            self.flush()
        elif len(self._records) == 1:
            self.reactor.defer(self.flush)

    def flush(self) -> None:
        if self._records:
            records, bodies = self._records, self._bodies
            self._records, self._bodies = [], []
            self._send(records, b"".join(bodies))

    def _send(self, records: list[bytes], body: bytes) -> None:
        if self.sock is None:  # closed: the worker is stopping
            return
        try:
            send_frames(self.sock, [b"\n".join(records), body])
        except zmq.Again:  # a broker that is not reading, or a joined host's link that is down
            self.dropped += len(records)
            self._silence_log.warning("full", "backbone queue full: %d message(s) dropped (%d so far)",
                                      len(records), self.dropped)

    def _readable(self) -> None:
        if self.sock is None:
            return
        for _ in range(64):
            try:
                msg = recv_frames(self.sock, copy=True)
            except zmq.Again:
                return
            self._last_heard = time.monotonic()
            try:
                if len(msg) != 2:
                    raise ValueError(f"{len(msg)} frames")
                index, body = msg
                records = wire.unpack(index)
            except ValueError as exc:
                log.warning("malformed batch from broker dropped: %s", exc)
                continue
            offset = 0
            for raw, length in records:
                payload = body[offset:offset + length]
                offset += length
                parsed = self._headers_in.get(raw)
                if parsed is None:
                    try:
                        parsed = wire.parse_header(raw)
                    except ValueError:
                        log.warning("bad header from broker dropped")
                        continue
                    if len(self._headers_in) > HEADER_CACHE:
                        self._headers_in.clear()
                    self._headers_in[raw] = parsed
                verb, device, name, flags = parsed
                if verb == wire.WHO:
                    log.info("broker does not know us (restarted?): registering again")
                    self.hello()
                    self._registered_again()
                    break
                if verb != wire.HB:
                    self._on_message(verb, device, name, flags, payload)

    def _heartbeat(self) -> None:
        silent = time.monotonic() - self._last_heard
        if silent > self.heartbeat * LIVENESS:
            self._silence_log.warning("silence", "no word from the broker for %.0f s: reconnecting "
                                      "and registering again (%d reconnection(s) so far)", silent,
                                      self.reconnects + 1)
            self._last_heard = time.monotonic()
            self._reconnect()
            self.hello()
            self._registered_again()
        else:
            self.send(wire.HB, payload=self._report() if self._report is not None else b"")
        self._heartbeat_timer = self.reactor.call_later(self.heartbeat, self._heartbeat)

    def close(self) -> None:
        """Drop the connection for good (idempotent): a worker whose arbiter is gone must not
        reconnect anywhere, and nothing it still does afterwards reaches a broker."""
        self._heartbeat_timer.cancel()
        self._disconnect()
