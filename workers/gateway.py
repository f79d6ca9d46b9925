"""The TCP client gateway: INDI clients connect here (port 7624 by default).

Several gateway processes share the port to use several cores: each accepts on a listening
socket of its own (SO_REUSEPORT) that the arbiter opened and it inherits. The gateway is three
parts, one concern each:

- `workers.clients.Connections`: the connections (accept and admission, reading and decoding,
  each client's output queue and its writes, dropping a client);
- `workers.blobroom.BlobRoom`: the gateway's half of BLOB pacing (FULL, OPEN and DONE for the
  broker);
- `Gateway` itself: the routing between the backbone and the clients. Each client's XML is parsed
  once, in `Connections`, and routed here; what the broker sends back is delivered to every
  interested client as the same bytes (no re-serialising). The broker is told the union of the
  clients' interests, and getProperties asked by many clients at once goes up once.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterable
from typing import Any

from indibroker.broker import wire
from indibroker.broker.ratelog import RateLimitedLog
from indibroker.workers import indi, sharedblob
from indibroker.workers.base import Worker
from indibroker.workers.blobroom import BlobRoom, Signal
from indibroker.workers.clients import Client, Connections
from indibroker.workers.codec import Element
from indibroker.workers.interest import union
from indibroker.workers.serverdevice import ServerDevice
from indibroker.workers.settings import GatewaySettings, Inheritance
from indibroker.workers.traffic import Traffic

__all__ = ["Gateway"]

log = logging.getLogger(__name__)

GETP_COALESCE = 2.0  # seconds a getProperties waiting for its first answer stands for others
ASKED_MAX = 1024  # pending questions remembered before stale ones are forgotten
RESTART_NOTICE_GAP = 5.0  # seconds: one notice to clients per broker restart
STATUS_CONNECTIONS = 256  # clients detailed in the status file, at most
CONNECTIONS_REFRESH = 5.0  # seconds: their queues and drops rewritten this often, if they changed


class Gateway(Worker):
    role = "gateway"
    backbone_role = "gateway"

    settings: GatewaySettings

    def __init__(self, settings: GatewaySettings, inheritance: Inheritance | None = None, **kw: Any):
        super().__init__(settings, inheritance, **kw)
        self.connections = Connections(settings, self.reactor, self.runtime.slots_dir,
                                       received=self._from_client, dropped=self._dropped,
                                       connected=self.status_changed)
        self.room = BlobRoom(settings.blob_drop_bytes)
        self._asked: dict[tuple[str, str], float] = {}  # getProperties sent, no definition back yet
        self._told_restart = -RESTART_NOTICE_GAP
        self.access = settings.access
        self.traffic = Traffic()  # -vv / -vvv
        self._refusals = RateLimitedLog(log)
        self.server_device: ServerDevice | None = None  # the first gateway hosts it
        self._connections_written: object = None  # the connections' figures as last written
        # Pings answered once the broker has our interests (see `_ping`): how many interest
        # changes we made, how many the broker has confirmed, and the pings waiting for it.
        self._interest_changes = 0
        self._interest_confirmed = 0
        self._pings: collections.deque[tuple[int, Client, str]] = collections.deque()

    @property
    def clients(self) -> dict[int, Client]:
        return self.connections.clients

    # -- lifecycle --------------------------------------------------------------------------
    def setup(self) -> None:
        self.reactor.call_later(CONNECTIONS_REFRESH, self._refresh_connections)
        listener = self.connections.start()
        log.info("%s listening on %s", self.name, listener.getsockname()[:2])
        if self.settings.server_device is not None:
            device = self.server_device = ServerDevice(self.settings.server_device, runtime=self.runtime,
                                                       reactor=self.reactor, changed=self.status_changed)
            device.connect(self.guest_backbone(device.name, device.on_backbone, device.owned_devices,
                                               device.registered_again))
            device.setup()

    def shutdown(self) -> None:
        self.connections.close()
        if self.server_device is not None:
            self.server_device.shutdown()

    def on_command(self, command: dict[str, Any]) -> None:
        super().on_command(command)
        if command.get("cmd") == "hello" and self.server_device is not None:  # a restarted broker
            self.server_device.backbone.hello()
            self.server_device.registered_again()

    def interests(self) -> list[tuple[str, str, int]]:
        return sorted(union(c.interest for c in self.clients.values()))

    def registered_again(self) -> None:
        """The broker restarted: what was on its way through it is lost. The drivers define
        their properties again (current values); clients are told why they see them twice.
        Once per restart, though both the broker (WHO) and the arbiter (hello) may ask."""
        now = time.monotonic()
        if now - self._told_restart < RESTART_NOTICE_GAP:
            return
        self._told_restart = now
        self._answer_pings(self._interest_changes)  # what the old broker was to echo is lost
        notice = indi.message("indibroker: message routing restarted; updates sent in the last moment "
                              "may be lost, current values follow")
        deliver = self.connections.deliver
        for client in list(self.clients.values()):
            deliver(client, notice, False)

    def status(self) -> dict[str, Any]:
        device = {"server_device": self.server_device.status()} if self.server_device is not None else {}
        return {
            **device,
            "clients": len(self.clients),
            "peers": sorted(c.peer for c in self.clients.values()),
            # For the server device (as of this file's last write: connections and drops write
            # it, and so does a change of these figures, `_refresh_connections`).
            "connections": [{"address": peer, "queued": queued, "blobs_dropped": dropped}
                            for peer, queued, dropped in self._connection_figures()],
        }

    def _connection_figures(self) -> list[tuple[str, int, int]]:
        """Each client's address, bytes queued for it (its shared buffers' too), BLOBs dropped."""
        return [(c.peer, c.out.bytes + c.out.held if c.out else 0, c.blobs_dropped)
                for c in list(self.clients.values())[:STATUS_CONNECTIONS]]

    def _refresh_connections(self) -> None:
        """Clients' queues and drops change with every message: the status file (which the
        server device shows) is rewritten every CONNECTIONS_REFRESH seconds if they changed,
        never per message, and not at all while nothing changes."""
        self.reactor.call_later(CONNECTIONS_REFRESH, self._refresh_connections)
        if not self.clients:
            return
        figures = self._connection_figures()
        if figures != self._connections_written:
            self._connections_written = figures
            self.status_changed()

    def _dropped(self, client: Client) -> None:
        if self.room.full:
            self._flow(self.room.gone(client))  # whatever it held up is open again
        self._update_interests()
        self.status_changed()

    # -- client → server --------------------------------------------------------------------
    def _from_client(self, client: Client, el: Element) -> None:
        tag = el.tag
        device = el.get("device")
        name = el.get("name")
        if self.traffic.on:
            self.traffic.log(f"client {client.peer}", "->", el.raw, device or "", name or "")
        if tag in indi.CLIENT_NEW:
            if not device or not name:
                log.info("client %s: %s without device or name ignored", client.peer, tag)
                return
            if not self.access.open:
                why = self.access.may_write(client.host, device)
                if why is not None:  # nothing reaches a driver; the client is told why
                    self._refusals.warning(("write", client.peer), "client %s: %s %s.%s refused: %s",
                                           client.peer, tag, device, name, why)
                    self.connections.deliver(client, indi.message(
                        f"indibroker: {tag} {device}.{name} refused: {why}", device), blob=False)
                    return
            self._add_interest(client, device, "")
            self.backbone.send(wire.NEW, device, name, b"", el.raw)
        elif tag == "getProperties":
            self._add_interest(client, device, name)
            self._ask(device, name)
        elif tag == "enableBLOB":
            mode = indi.BlobMode.parse(el.root.text)
            if not device or mode is None:
                log.info("client %s: bad enableBLOB ignored", client.peer)
                return
            client.interest.set_blob(device, name, mode)
            self._add_interest(client, device, "", force=True)
        elif tag == "pingRequest":
            self._ping(client, el.get("uid"))
        elif tag in indi.DRIVER_VERBS:
            # A chained server relays its devices' traffic as a client: for snooping drivers.
            if device:
                flags = indi.blob_flag(tag)
                self.backbone.send(wire.SNOOP, device, name, flags, el.raw)
        elif tag != "pingReply":
            log.debug("client %s: %s ignored", client.peer, tag)

    def _ask(self, device: str, name: str) -> None:
        """Pass a getProperties on, unless the same question is already on its way.

        Answers (definitions) go to every interested client, and this client's interest is
        registered already: if no definition has come back since the same request went out, it
        will receive the whole answer to that one. Without this, N clients connecting together
        make the drivers define everything N times to N clients.
        """
        key = (device, name)
        now = time.monotonic()
        sent = self._asked.get(key)
        if sent is not None and now - sent < GETP_COALESCE:
            return
        if len(self._asked) >= ASKED_MAX:
            # Questions nobody answers (devices nobody has) pile up: forget them all; the worst
            # that can come of it is one question asked twice.
            self._asked.clear()
        self._asked[key] = now
        self.backbone.send(wire.GETP, device, name)

    def _add_interest(self, client: Client, device: str, name: str, force: bool = False) -> None:
        before = force or not client.interest.wants_device(device, name)
        client.interest.add(device, name)
        if before:
            self._update_interests()

    def _update_interests(self) -> None:
        self._interest_changes += 1
        self.backbone.update_interests()

    def _ping(self, client: Client, uid: str) -> None:
        """A client's pingRequest. Its pingReply says "what you sent before is in effect" (the
        indilib tests, and clients, enable BLOBs, ping, then expect the next BLOB): while a
        change of our interests is on its way to the broker, the reply waits for an ECHO sent
        after it (the broker then has it); otherwise it goes at once."""
        if self._interest_confirmed == self._interest_changes:
            self.connections.deliver(client, indi.ping_reply(uid), blob=False)
            return
        changes = self._interest_changes
        if not self._pings or self._pings[-1][0] != changes:  # one ECHO per change, at most
            # Deferred: the interests go at the end of this turn; this must go after them.
            self.reactor.defer(lambda: self.backbone.send(wire.ECHO, payload=str(changes).encode()))
        self._pings.append((changes, client, uid))

    def _answer_pings(self, confirmed: int) -> None:
        self._interest_confirmed = max(self._interest_confirmed, confirmed)
        while self._pings and self._pings[0][0] <= confirmed:
            _, client, uid = self._pings.popleft()
            if not client.closed:
                self.connections.deliver(client, indi.ping_reply(uid), blob=False)

    # -- server → clients -------------------------------------------------------------------
    def on_backbone(self, verb: bytes, device: str, name: str, flags: bytes, payload: bytes) -> None:
        if verb not in wire.DRIVER_OUTPUT:
            if verb == wire.ECHO and payload.isdigit():
                self._answer_pings(int(payload))
            return
        if verb == wire.DEF and self._asked:  # an answer has begun: later askers ask again
            self._asked.pop(("", ""), None)
            self._asked.pop((device, ""), None)
            self._asked.pop((device, name), None)
        deliver = self.connections.deliver
        clients = self.connections.clients
        if self.traffic.on:
            for client in clients.values():
                if client.interest.wants(device, name, flags == wire.FLAG_BLOB):
                    self.traffic.log(f"client {client.peer}", "<-", payload, device, name)
        if flags != wire.FLAG_BLOB and flags != wire.FLAG_SHARED:
            for client in list(clients.values()):
                if client.interest.wants(device, name, False):
                    deliver(client, payload, False)
            return
        takers = [client for client in clients.values() if client.interest.wants(device, name, True)]
        if flags == wire.FLAG_SHARED:
            if takers:
                self._deliver_shared(device, payload, takers)
        elif any(client.local for client in takers):
            self._deliver_attached(device, payload, takers)
        else:
            for client in takers:
                deliver(client, payload, True)
        # FULL if the next BLOB would be dropped for a client still draining (the driver is then
        # paced rather than read only for its BLOBs to be dropped), then DONE: handled (and of a
        # shared BLOB, its buffers are ours now: its owner may close its own).
        self._flow(self.room.blob_handled(device, name, takers, time.monotonic()))

    def _deliver_shared(self, device: str, payload: bytes, takers: list[Client]) -> None:
        """A BLOB in shared buffers: local-socket clients get the buffers themselves, TCP
        clients the same BLOB in base64, encoded once for all of them."""
        if not device:  # never routed so (broker/router.py); a buffer is named only with its device
            return
        try:
            blob = sharedblob.resolve(payload)
            try:
                deliver = self.connections.deliver
                attached = blob.attached_form() if any(c.local for c in takers) else b""
                for client in takers:
                    if client.local:
                        deliver(client, attached, True, blob.buffers)
                    else:
                        deliver(client, blob.inline_form(), True)
            finally:
                blob.release()
        except sharedblob.SharedBufferError as exc:
            self._refusals.warning(("shared", device), "a BLOB of %s is lost for %d client(s): %s",
                                   device, len(takers), exc)

    def _deliver_attached(self, device: str, payload: bytes, takers: list[Client]) -> None:
        """A BLOB in base64 with local-socket clients among its takers: decoded once into
        shared buffers for them (as indiserver does); the others get it as it came."""
        deliver = self.connections.deliver
        try:
            attached, buffers = sharedblob.to_attached(payload)
        except sharedblob.SharedBufferError as exc:
            self._refusals.warning(("to-attached", device), "a BLOB of %s cannot be passed to local "
                                   "clients as a buffer (%s): sent in base64", device, exc)
            attached, buffers = payload, []
        try:
            for client in takers:
                if client.local:
                    deliver(client, attached, True, buffers)
                else:
                    deliver(client, payload, True)
        finally:
            for buffer in buffers:
                buffer.release()

    def _drained(self, client: Client) -> None:
        """A client's queue was flushed while a device is full: it may open."""
        self._flow(self.room.drained(client, self.clients.values(), time.monotonic()))

    def _flow(self, signals: Iterable[Signal]) -> None:
        send = self.backbone.send
        for device, name, flag in signals:
            send(wire.FLOW, device, name, flag)
        # Flushes concern pacing only while a device is full.
        self.connections.on_drained = self._drained if self.room.full else None
