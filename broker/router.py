"""The broker process: one ZeroMQ ROUTER that routes INDI traffic on header frames alone.

It never parses XML and never blocks on a peer: sends are DONTWAIT with ROUTER_MANDATORY, and a
peer whose queue is full loses that message (counted and logged) rather than stalling everyone.
Payload frames are received without copying and passed on as they came. It runs on the workers'
event loop (`workers/reactor.Reactor`) and keeps its status file as they do (`runtime.StatusFile`).

Joined hosts' workers (broker/hosts.py) reach it on a second ROUTER, TCP with CURVE: the same
verbs, routed by the same table; what differs is checked on the way in (the identity's host is
the key's) and that the broker itself notices a silent host, since no arbiter of ours watches it:
its devices are deleted, with a message naming the host, until it registers again.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable

import zmq

from indibroker.broker import wire
from indibroker.broker.errors import ConfigError
from indibroker.broker.hosts import HostEndpoint
from indibroker.broker.pacing import BlobPacing
from indibroker.broker.ratelog import RateLimitedLog
from indibroker.broker.routing import RoutingTable
from indibroker.broker.runtime import RuntimeDir, StatusFile, configure_logging, lifeline_fd
from indibroker.broker.transport import ZERO_COPY_BYTES, recv_frames, send_frames
from indibroker.workers import indi
from indibroker.workers.backbone import HEARTBEAT_INTERVAL, LIVENESS
from indibroker.workers.linebuffer import LineBuffer
from indibroker.workers.reactor import Reactor
from indibroker.workers.settings import BrokerSettings, WorkerSettings
from indibroker.workers.traffic import set_log_level

__all__ = ["Broker", "main"]

log = logging.getLogger(__name__)

HWM = 100_000  # messages; bytes are bounded by the workers' own accounting
BATCH = 1000  # messages read per turn of the loop, then signals and the lifeline are looked at
AWAIT_DEFINITION = 5.0  # seconds a command for a device not yet defined waits for its definition
AWAIT_BYTES = 4 * 1024 * 1024  # bound on the commands waiting so, in all
HOST_HWM = 10_000  # messages queued for one joined host's worker (BLOBs are paced: broker/pacing.py)
HOST_REPORT_MAX = 64 * 1024  # bytes of a host worker's status report we keep
HOST_BLOB_BYTES = 16 * 1024 * 1024  # BLOB bytes on their way to one host's gateway (not yet DONE)
HOST_RETRY = 5.0  # seconds between attempts to open a host endpoint that could not be had

Payload = zmq.Frame | memoryview
Handler = Callable[[bytes, bytes, bytes, str, str, bytes, Payload], None]


def _as_bytes(payload: Payload) -> bytes:
    return payload.bytes if isinstance(payload, zmq.Frame) else bytes(payload)


class Broker:
    def __init__(self, ctx: zmq.Context, endpoint: str, instance: str = "", hosts: HostEndpoint | None = None):
        self.instance = instance
        self.hosts = hosts
        self._host_of: dict[bytes, str] = {}  # peer identity on the host socket -> its host (key) name
        self._host_heard: dict[bytes, float] = {}  # ... -> when it last spoke (monotonic)
        self._host_beat: dict[bytes, float] = {}  # ... -> its heartbeat interval (from its HELLO)
        self._host_reports: dict[bytes, dict] = {}  # ... -> its last status report
        self._host_links: dict[str, dict] = {}  # host name -> {"link": connected|lost, "since": wall time}
        # BLOBs sent to a host's gateway and not yet DONE: sizes per device, and their total
        self._host_blobs: dict[bytes, dict[str, deque[int]]] = {}
        self._host_blob_bytes: dict[bytes, int] = {}
        self.host_blobs_dropped = 0
        self._refusals = RateLimitedLog(log, 30.0)  # what a misbehaving peer can repeat
        self.table = RoutingTable()
        self.pacing = BlobPacing()
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.SNDHWM, HWM)
        self.sock.setsockopt(zmq.RCVHWM, HWM)
        self.sock.bind(endpoint)
        self.routed = 0  # messages sent on (heartbeats too), and their bytes: status only
        self.routed_bytes = 0
        self.dropped = 0
        self.echoes = 0  # a device arriving over a second path (a cycle of servers), dropped
        self._dropped_logged = 0.0
        self._out: dict[bytes, list[tuple[list[bytes], list, bool]]] = {}  # per peer, for flush()
        self._headers: dict[bytes, tuple[bytes, str, str, bytes]] = {}  # a flood repeats few headers
        self.on_change: Callable[[], None] = lambda: None  # `status()` changed (peers, devices)
        self._defer: Callable[[Callable[[], None]], None] | None = None
        self._turn_open = False  # messages were read this turn: a flush is due at its end
        self._budget = 0  # what is left of this turn's batch
        # Commands for devices whose definitions are still on their way (see `_on_new`).
        self._awaiting: dict[str, list[tuple[float, bytes, bytes]]] = {}
        self._awaiting_bytes = 0
        self._blob_senders: dict[str, bytes] = {}  # device -> who sent its BLOBs last (their DONEs go there)
        self._verbs: dict[bytes, Handler] = {
            wire.HB: self._on_heartbeat, wire.ECHO: self._on_echo,
            wire.DEF: self._on_driver_output, wire.SET: self._on_driver_output,
            wire.DEL: self._on_driver_output, wire.MSG: self._on_driver_output, wire.SNOOP: self._on_snoop,
            wire.GETP: self._on_get_properties, wire.NEW: self._on_new, wire.FLOW: self._on_flow,
            wire.SUB: self._on_sub,
        }

    def attach(self, reactor: Reactor) -> None:
        """Serve on `reactor`: at most BATCH messages per turn of its loop (then signals and the
        lifeline are looked at), and what they made for each peer sent at the end of the turn."""
        self._defer = reactor.defer
        self._reactor = reactor
        reactor.add_zmq(self.sock, self._readable)
        if self.hosts is not None:
            self._serve_hosts(self.hosts)

    def serve_hosts(self, ctx: zmq.Context, endpoint: str, keys: str) -> None:
        """Open the host endpoint (after `attach`). If it cannot be had (the address is not ours
        yet, the port is taken), local workers are served meanwhile and it is tried again."""
        try:
            hosts = HostEndpoint(ctx, endpoint, keys, HEARTBEAT_INTERVAL, HOST_HWM)
        except (zmq.ZMQError, ConfigError) as exc:
            self._refusals.error("endpoint", "cannot serve joined hosts on %s: %s; trying again every %.0f s",
                                 endpoint, exc, HOST_RETRY)
            self._reactor.call_later(HOST_RETRY, lambda: self.serve_hosts(ctx, endpoint, keys))
            return
        log.info("serving joined hosts on %s (CURVE, keys of %s/hosts)", endpoint, keys)
        self._serve_hosts(hosts)

    def _serve_hosts(self, hosts: HostEndpoint) -> None:
        self.hosts = hosts
        reactor = self._reactor
        reactor.add_zmq(hosts.zap.sock, hosts.zap.readable)
        reactor.add_zmq(hosts.monitor, hosts.monitor_readable)
        reactor.add_zmq(hosts.sock, self._readable_hosts)
        reactor.call_later(1.0, self._expire_hosts)

    def _readable(self) -> None:
        if not self._turn_open:
            assert self._defer is not None
            self._turn_open = True
            self._budget = BATCH
            self._defer(self._end_turn)
        budget = self._budget
        sock, handle = self.sock, self.handle
        while budget:
            try:
                msg = recv_frames(sock)
            except zmq.Again:
                break
            handle(msg)
            budget -= 1
        self._budget = budget

    def _readable_hosts(self) -> None:
        """The host socket: each message's sender is checked against the key that sent it."""
        if not self._turn_open:
            assert self._defer is not None
            self._turn_open = True
            self._budget = BATCH
            self._defer(self._end_turn)
        assert self.hosts is not None
        sock = self.hosts.sock
        for _ in range(BATCH):
            try:
                msg = recv_frames(sock)
            except zmq.Again:
                break
            if len(msg) != 3:
                log.warning("dropped a host message of %d frame(s)", len(msg))
                continue
            ident = msg[0].bytes
            host = msg[1].get("User-Id")
            if not host or not ident.startswith(host.encode() + b"/"):
                self._refusals.warning(("impostor", host, ident), "dropped a message from host %r "
                                       "speaking as %r (not its name)", host, ident)
                continue
            self._host_of[ident] = host
            self._host_heard[ident] = time.monotonic()
            self.handle(msg)

    def _expire_hosts(self) -> None:
        """A joined host's worker silent for LIVENESS of its heartbeats is lost (a partition, a
        host down): its devices go, and clients are told which host."""
        now = time.monotonic()
        for ident, heard in list(self._host_heard.items()):
            beat = self._host_beat.get(ident, HEARTBEAT_INTERVAL)
            if now - heard > LIVENESS * beat:
                self._lose_host_peer(ident, f"silent for {now - heard:.1f} s")
        self.flush()
        self._reactor.call_later(min([1.0, *self._host_beat.values()]), self._expire_hosts)

    def _lose_host_peer(self, ident: bytes, why: str) -> None:
        host = self._host_of.pop(ident, "")
        self._host_heard.pop(ident, None)
        self._host_beat.pop(ident, None)
        self._host_reports.pop(ident, None)
        self._host_blobs.pop(ident, None)
        self._host_blob_bytes.pop(ident, None)
        peer = self.table.peers.get(ident)
        if peer is None:
            return
        for device in sorted(peer.devices):
            text = f"indibroker: host {host} lost ({why}); its device {device} is gone until the host is back"
            for target in self.table.targets(device, "", False):
                if target != ident:
                    self._queue(target, wire.header(wire.MSG, device), indi.message(text, device))
                    self._queue(target, wire.header(wire.DEL, device), indi.del_property(device))
        self.table.remove_peer(ident)
        self._unpace(ident)
        if not any(p.host == host for p in self.table.peers.values()):
            self._host_links[host] = {"link": "lost", "since": time.time(), "why": why}
            log.warning("host %s lost (%s): %d device(s) deleted", host, why, len(peer.devices))
        else:
            log.info("host %s: %s lost (%s)", host, peer.name, why)
        self.on_change()

    def _end_turn(self) -> None:
        self._turn_open = False
        self.flush()

    def close(self) -> None:
        self.sock.close(linger=0)
        if self.hosts is not None:
            self.hosts.close()

    def handle(self, msg: list[zmq.Frame]) -> None:
        """One ZeroMQ message from a worker: its identity, a batch's index and its body."""
        if len(msg) != 3:
            log.warning("dropped a message of %d frame(s)", len(msg))
            return
        ident = msg[0].bytes
        body = msg[2]
        try:
            records = wire.unpack(msg[1].bytes)
        except ValueError:
            log.warning("dropped a batch with a bad index from %r", ident)
            return
        if len(records) == 1 and records[0][1] == len(body):
            self._handle_one(ident, records[0][0], body)  # the whole body, as it came (zero-copy)
            return
        view = body.buffer
        offset = 0
        for head, length in records:
            self._handle_one(ident, head, view[offset:offset + length])
            offset += length

    def _handle_one(self, ident: bytes, raw: bytes, payload: Payload) -> None:
        parsed = self._headers.get(raw)
        if parsed is None:
            try:
                parsed = wire.parse_header(raw)
            except ValueError:
                self._refusals.warning(("header", ident), "dropped a message with a bad header from %r", ident)
                return
            if len(self._headers) > 65536:
                self._headers.clear()
            self._headers[raw] = parsed
        verb, device, name, flags = parsed
        if verb == wire.HELLO:
            self._hello(ident, _as_bytes(payload))
        elif ident not in self.table.peers:
            self._queue(ident, wire.header(wire.WHO), b"")
        else:
            handler = self._verbs.get(verb)
            if handler is None:
                self._refusals.warning(("verb", ident), "unknown verb %r from %s", verb, self.table.peers[ident].name)
            else:
                handler(ident, raw, verb, device, name, flags, payload)

    # -- one method per verb (the header is parsed once, above) ---------------------------------
    def _on_heartbeat(self, ident: bytes, head: bytes, verb: bytes, device: str, name: str, flags: bytes,
                      payload: Payload) -> None:
        self._queue(ident, wire.header(wire.HB), b"")
        if payload and ident in self._host_of and len(payload) <= HOST_REPORT_MAX:
            try:
                report = json.loads(_as_bytes(payload))
            except ValueError:
                return
            if isinstance(report, dict):
                if ident not in self._host_reports:
                    self.on_change()  # a new worker in `status`; figures refresh with the file
                self._host_reports[ident] = report

    def _on_echo(self, ident: bytes, head: bytes, verb: bytes, device: str, name: str, flags: bytes,
                 payload: Payload) -> None:
        self._queue(ident, head, payload)

    def _on_driver_output(self, ident: bytes, head: bytes, verb: bytes, device: str, name: str, flags: bytes,
                          payload: Payload) -> None:
        """DEF SET DEL MSG: to every interested peer; a DEF claims its device, a whole-device DEL
        gives it up; a BLOB's gateways are counted for the owner's pacing window."""
        table = self.table
        if not table.accepts(ident, device):
            peer = table.peers[ident]
            if peer.host:
                self._refusals.warning(("claim", ident, device), "%s may not speak for device %r: "
                                       "another source has it", peer.name, device)
            self.echoes += 1
            return
        if verb == wire.DEF and device:
            if table.owners.get(device) != ident:
                self.on_change()
            previous = table.claim(ident, device)
            if previous is not None:
                self._refusals.warning(("moved", device), "device %r moved from %s to %s", device,
                                       table.peers[previous].name if previous in table.peers else previous,
                                       table.peers[ident].name)
            if device in self._awaiting:
                self._deliver_awaiting(device, ident)
        elif verb == wire.DEL and device and not name:
            table.release(ident, device)
            self.on_change()
        shared = flags == wire.FLAG_SHARED
        if shared and (not device or ident in self._host_of):
            # A shared buffer names a descriptor on this computer: none without a device (it could
            # not be paced or closed), and none from a host (it would name one of ours).
            self._refusals.warning(("shared", ident), "dropped a shared-buffer message from %s",
                                   table.peers[ident].name)
            return
        blob = shared or flags == wire.FLAG_BLOB
        targets = table.targets(device, name, blob)
        if blob and device and self._host_of:
            if shared:  # a buffer on this computer: no use on another
                targets = [t for t in targets if t not in self._host_of]
            else:
                targets = self._bound_host_blobs(targets, device, len(payload))
        for target in targets:
            self._queue(target, head, payload)
        if blob and device:
            self._blob_senders[device] = ident
            # A shared buffer's every taker says DONE once it has it (its owner then closes it;
            # the owner's own worker, snooping it, has it already); of a BLOB in the message
            # itself, gateways only (pacing).
            takers = [t for t in targets if t != ident] if shared else \
                [t for t in targets if table.peers[t].role == "gateway"]
            done = self.pacing.routed(device, takers)
            if done:
                self._flow(ident, device, wire.FLOW_DONE, done)

    def _bound_host_blobs(self, targets: list[bytes], device: str, size: int) -> list[bytes]:
        """A joined host's gateway is sent at most HOST_BLOB_BYTES of BLOBs it has not yet said
        DONE for (one BLOB at least, whatever its size): past that, a BLOB for it is dropped
        here, as a slow client's streaming BLOBs are dropped at its gateway. What a slow link
        cannot carry then never piles up in the broker's queues."""
        out = []
        for target in targets:
            if target in self._host_of and self.table.peers[target].role == "gateway":
                queued = self._host_blob_bytes.get(target, 0)
                if queued and queued + size > HOST_BLOB_BYTES:
                    self.host_blobs_dropped += 1
                    self._refusals.warning(("slow host", target), "BLOB of %s not sent to %s: %.1f MB of "
                                           "BLOBs still on their way to it (a slow link)", device,
                                           self.table.peers[target].name, queued / 1048576)
                    continue
                self._host_blobs.setdefault(target, {}).setdefault(device, deque()).append(size)
                self._host_blob_bytes[target] = queued + size
            out.append(target)
        return out

    def _on_snoop(self, ident: bytes, head: bytes, verb: bytes, device: str, name: str, flags: bytes,
                  payload: Payload) -> None:
        """A client's set/def/del/message (a chained server relaying its devices): to snooping
        drivers only, never on to clients or bridges, so it cannot circle."""
        table = self.table
        for target in table.targets(device, name, flags == wire.FLAG_BLOB):
            if table.peers[target].role == "driver":
                self._queue(target, head, payload)

    def _on_get_properties(self, ident: bytes, head: bytes, verb: bytes, device: str, name: str, flags: bytes,
                           payload: Payload) -> None:
        if device:
            # A device nobody has defined: dropped, as indiserver does (the asker's interest is
            # registered, so it gets the definitions when the driver defines it).
            owner = self.table.owner(device)
            if owner is not None:
                self._queue(owner, head, payload)
            return
        for target in self.table.drivers():
            if target != ident:
                self._queue(target, head, payload)

    def _on_new(self, ident: bytes, head: bytes, verb: bytes, device: str, name: str, flags: bytes,
                payload: Payload) -> None:
        """A client's command: to the device's owner. For a device not (yet) defined it waits
        up to AWAIT_DEFINITION: a driver's definitions and a client's answer to them cross
        different processes, so the answer can arrive first (indi_setprop right after a driver
        starts); past that, or past the byte bound, it is dropped as indiserver drops it."""
        owner = self.table.owner(device)
        if owner is not None:
            self._queue(owner, head, payload)
            return
        now = time.monotonic()
        self._expire_awaiting(now)
        size = len(payload)
        if self._awaiting_bytes + size > AWAIT_BYTES:
            self._refusals.warning(("unknown", device), "new*Vector for unknown device %r dropped", device)
            return
        self._awaiting.setdefault(device, []).append((now, head, _as_bytes(payload)))
        self._awaiting_bytes += size

    def _deliver_awaiting(self, device: str, owner: bytes) -> None:
        for _, head, payload in self._awaiting.pop(device):
            self._awaiting_bytes -= len(payload)
            self._queue(owner, head, payload)

    def _expire_awaiting(self, now: float) -> None:
        for device in [d for d, held in self._awaiting.items() if now - held[0][0] > AWAIT_DEFINITION]:
            held = self._awaiting.pop(device)
            self._awaiting_bytes -= sum(len(p) for _, _, p in held)
            self._refusals.warning(("unknown", device), "%d new*Vector for unknown device %r dropped",
                                   len(held), device)

    def _on_flow(self, ident: bytes, head: bytes, verb: bytes, device: str, name: str, flags: bytes,
                 payload: Payload) -> None:
        """BLOB pacing from a gateway, told on to the device's owner (broker/pacing.py)."""
        pending = self._host_blobs.get(ident, {}).get(device) if flags == wire.FLOW_DONE else None
        if pending:  # a joined host's gateway has one BLOB fewer on its way
            self._host_blob_bytes[ident] -= pending.popleft()
        owner = self.table.owner(device)
        if flags == wire.FLOW_DONE:
            # Settled and told to the peer that sent the device's BLOBs, whoever owns it now: a
            # DONE that comes after its driver's DEL still counts (an owner's DONEs come in
            # order: one lost would hold back every later one, and its shared buffers with them).
            done = self.pacing.done(ident, device)
            sender = self._blob_senders.get(device)
            if done and sender is not None and sender != ident and sender in self.table.peers:
                self._flow(sender, device, flags, done)
            return
        if owner is None or owner == ident:
            return
        if flags == wire.FLOW_FULL:
            if self.pacing.on_full(ident, device, self.table.targets(device, name, True)):
                self._flow(owner, device, flags)
        elif self.pacing.on_open(ident, device):
            self._flow(owner, device, wire.FLOW_OPEN)

    def _on_sub(self, ident: bytes, head: bytes, verb: bytes, device: str, name: str, flags: bytes,
                payload: Payload) -> None:
        try:
            entries = wire.decode_interests(_as_bytes(payload))
        except ValueError:
            self._refusals.warning(("sub", ident), "bad SUB from %s", self.table.peers[ident].name)
            return
        self.table.set_interests(ident, entries)

    def _hello(self, ident: bytes, payload: bytes) -> None:
        host = self._host_of.get(ident, "")
        try:  # a joined host's key is its credential: no instance token to check
            data = wire.parse_hello(payload, None if host else self.instance)
        except ValueError as exc:
            self._refusals.warning(ident, "refused hello from %r: %s", ident, exc)
            return
        self._unpace(ident)
        for device in [d for d, sender in self._blob_senders.items() if sender == ident]:
            self.pacing.drop_device(device)  # it forgot what it sent: DONEs for those go nowhere
            del self._blob_senders[device]
        self._host_blobs.pop(ident, None)  # a gateway (re)starting owes no DONE
        self._host_blob_bytes.pop(ident, None)
        name = f"{host}/{data['name']}" if host else data["name"]
        peer = self.table.add_peer(ident, data["role"], name, data["devices"], host)
        self.on_change()
        if host:
            # Its own interval, within reason: a host cannot make itself never expire.
            self._host_beat[ident] = min(max(float(data.get("heartbeat") or HEARTBEAT_INTERVAL), 0.1), 60.0)
            if self._host_links.get(host, {}).get("link") != "connected":
                self._host_links[host] = {"link": "connected", "since": time.time()}
                log.info("host %s joined", host)
            refused = set(data["devices"]) - peer.devices
            if refused:
                self._refusals.warning(("claim", ident), "%s may not serve %s: another source has them",
                                       name, ", ".join(sorted(refused)))
        log.info("%s %s registered with %d device(s)", data["role"], name, len(peer.devices))
        self._queue(ident, wire.header(wire.HB), b"")

    def _queue(self, ident: bytes, head: bytes, payload: zmq.Frame | memoryview | bytes) -> None:
        """Batch per peer: `flush()` sends each peer what is due to it in as few messages as it
        can; a large payload goes in a batch of its own, so that it is never copied."""
        batches = self._out.get(ident)
        if batches is None:
            batches = self._out[ident] = []
        size = len(payload)
        if size >= ZERO_COPY_BYTES or not batches or batches[-1][2]:
            batches.append(([], [], size >= ZERO_COPY_BYTES))
        records, bodies, _ = batches[-1]
        records.append(wire.record(head, size))
        bodies.append(payload)

    def flush(self) -> None:
        out, self._out = self._out, {}
        host_of = self._host_of
        for ident, batches in out.items():
            sock = self.sock if ident not in host_of or self.hosts is None else self.hosts.sock
            for records, bodies, _large in batches:
                body = bodies[0] if len(bodies) == 1 else b"".join(bodies)
                try:
                    send_frames(sock, [ident, b"\n".join(records), body])
                    self.routed += len(records)
                    self.routed_bytes += len(body)
                except zmq.Again:
                    self._drop(ident, "queue full", len(records))
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.EHOSTUNREACH and ident in host_of:
                        self._lose_host_peer(ident, "disconnected")
                        break
                    if exc.errno == zmq.EHOSTUNREACH:
                        self.table.remove_peer(ident)
                        self.on_change()
                        self._unpace(ident)
                        log.info("peer %r has gone; forgotten", ident)
                        break
                    self._drop(ident, str(exc), len(records))

    def _unpace(self, ident: bytes) -> None:
        """A peer (re)starts or goes: its FULLs no longer hold, its DONEs are not waited for."""
        resume, finished = self.pacing.forget(ident)
        for device in resume:
            owner = self.table.owner(device)
            if owner is not None and owner != ident:
                self._flow(owner, device, wire.FLOW_OPEN)
        for device, count in finished:
            sender = self._blob_senders.get(device)
            if sender is not None and sender != ident and sender in self.table.peers:
                self._flow(sender, device, wire.FLOW_DONE, count)

    def _flow(self, ident: bytes, device: str, flags: bytes, count: int = 1) -> None:
        """Tell a device's owner FLOW `flags` (pause, resume, or `count` BLOBs done)."""
        head = wire.header(wire.FLOW, device, "", flags)
        for _ in range(count):
            self._queue(ident, head, b"")

    def _drop(self, ident: bytes, why: str, count: int) -> None:
        self.dropped += count
        now = time.monotonic()
        if now - self._dropped_logged > 5:
            self._dropped_logged = now
            log.warning("dropping messages for %r (%s); %d dropped so far", ident, why, self.dropped)

    def status(self) -> dict:
        out = {
            "peers": len(self.table.peers),
            "devices": sorted(self.table.owners),
            "dropped": self.dropped,
            "echoes": self.echoes,
            # Counters change with every message: the file carries them as of its last write
            # (at the latest its refresh, every `liveness / 3` s), never a write per message.
            "messages": self.routed,
            "bytes": self.routed_bytes,
        }
        if self.hosts is not None:
            hosts: dict[str, dict] = {name: {**link, "workers": []} for name, link in self._host_links.items()}
            for ident, report in self._host_reports.items():
                peer = self.table.peers.get(ident)
                if peer is not None and peer.host in hosts:
                    hosts[peer.host]["workers"].append(report)
            out["hosts"] = hosts
            out["refused_hosts"] = self.hosts.zap.refused
            out["host_blobs_dropped"] = self.host_blobs_dropped
        return out


def main(settings: WorkerSettings) -> int:
    runtime = RuntimeDir.from_env()
    configure_logging("broker")
    reactor = Reactor()
    reactor.on_signal(signal.SIGTERM, lambda _signum: reactor.stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the arbiter, which stops us in order
    ctx = zmq.Context()
    broker = Broker(ctx, runtime.broker_endpoint, runtime.instance)
    status = StatusFile(runtime, "broker", broker.status, reactor, settings.liveness)
    broker.on_change = status.changed
    broker.attach(reactor)
    if isinstance(settings, BrokerSettings) and settings.hosts_endpoint and settings.keys:
        broker.serve_hosts(ctx, settings.hosts_endpoint, settings.keys)
    lifeline = lifeline_fd()
    if lifeline is not None:
        os.set_blocking(lifeline, False)
        lines = LineBuffer()
        reactor.add_reader(lifeline, lambda fd: _on_lifeline(fd, reactor, lines))
    status.start()
    log.info("broker routing on %s", runtime.broker_endpoint)
    try:
        reactor.run()
    finally:
        signal.set_wakeup_fd(-1)
        reactor.remove_zmq(broker.sock)
        broker.close()
        ctx.term()
        reactor.close()
    return 0


def _on_lifeline(fd: int, reactor: Reactor, lines: LineBuffer) -> None:
    """EOF: the arbiter has died and the broker goes with it. The arbiter tells the broker only
    a new log level."""
    try:
        chunk = os.read(fd, 4096)
    except BlockingIOError:
        return
    if not chunk:
        log.warning("arbiter gone; broker exits")
        reactor.stop()
        return
    for line in lines.feed(chunk):
        try:
            command = json.loads(line)
        except ValueError:
            continue
        if isinstance(command, dict) and command.get("cmd") == "loglevel":
            set_log_level(str(command.get("level", "INFO")))
