"""The broker process: one ZeroMQ ROUTER that routes INDI traffic on header frames alone.

It never parses XML and never blocks on a peer: sends are DONTWAIT with ROUTER_MANDATORY, and a
peer whose queue is full loses that message (counted and logged) rather than stalling everyone.
Payload frames are received without copying and passed on as they came.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import zmq

from indibroker.broker import wire
from indibroker.broker.pacing import BlobPacing
from indibroker.broker.ratelog import RateLimitedLog
from indibroker.broker.routing import RoutingTable
from indibroker.broker.runtime import RuntimeDir, configure_logging, lifeline_fd, statusfile_write, touch_status
from indibroker.broker.transport import ZERO_COPY_BYTES, recv_frames, send_frames
from indibroker.workers.settings import WorkerSettings

__all__ = ["Broker", "main"]

log = logging.getLogger(__name__)

HWM = 100_000  # messages; bytes are bounded by the workers' own accounting
STATUS_INTERVAL = 5.0


def _as_bytes(payload: zmq.Frame | memoryview) -> bytes:
    return payload.bytes if isinstance(payload, zmq.Frame) else bytes(payload)


class Broker:
    def __init__(self, ctx: zmq.Context, endpoint: str, instance: str = ""):
        self.instance = instance
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
        self.routed = 0
        self.dropped = 0
        self.echoes = 0  # a device arriving over a second path (a cycle of servers), dropped
        self._dropped_logged = 0.0
        self._out: dict[bytes, list[tuple[list[bytes], list, bool]]] = {}  # per peer, for flush()
        self._headers: dict[bytes, tuple[bytes, str, str, bytes]] = {}  # a flood repeats few headers

    def close(self) -> None:
        self.sock.close(linger=0)

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

    def _handle_one(self, ident: bytes, raw: bytes, payload: zmq.Frame | memoryview) -> None:
        parsed = self._headers.get(raw)
        if parsed is None:
            try:
                parsed = wire.parse_header(raw)
            except ValueError:
                log.warning("dropped a message with a bad header from %r", ident)
                return
            if len(self._headers) > 65536:
                self._headers.clear()
            self._headers[raw] = parsed
        verb, device, name, flags = parsed
        head = raw
        table = self.table
        if verb == wire.HELLO:
            self._hello(ident, _as_bytes(payload))
            return
        if ident not in table.peers:
            self._queue(ident, wire.header(wire.WHO), b"")
            return
        if verb == wire.HB:
            self._queue(ident, wire.header(wire.HB), b"")
        elif verb in wire.DRIVER_OUTPUT:
            if not table.accepts(ident, device):
                self.echoes += 1
                return
            if verb == wire.DEF and device:
                previous = table.claim(ident, device)
                if previous is not None:
                    self._refusals.warning(("moved", device), "device %r moved from %s to %s", device,
                                table.peers[previous].name if previous in table.peers else previous,
                                table.peers[ident].name)
            elif verb == wire.DEL and device and not name:
                table.release(ident, device)
            targets = table.targets(device, name, flags == wire.FLAG_BLOB)
            for target in targets:
                self._queue(target, head, payload)
            if flags == wire.FLAG_BLOB and device:
                gateways = [t for t in targets if table.peers[t].role == "gateway"]
                if self.pacing.routed(device, gateways):
                    self._flow(ident, device, wire.FLOW_DONE)
        elif verb == wire.SNOOP:
            for target in table.targets(device, name, flags == wire.FLAG_BLOB):
                if table.peers[target].role == "driver":
                    self._queue(target, head, payload)
        elif verb == wire.GETP:
            if device:
                # A device nobody has defined: dropped, as indiserver does (the asker's interest
                # is registered, so it gets the definitions when the driver defines it).
                owner = table.owner(device)
                if owner is not None:
                    self._queue(owner, head, payload)
            else:
                for target in table.drivers():
                    if target != ident:
                        self._queue(target, head, payload)
        elif verb == wire.NEW:
            owner = table.owner(device)
            if owner is None:
                log.info("new*Vector for unknown device %r dropped", device)
            else:
                self._queue(owner, head, payload)
        elif verb == wire.FLOW:
            owner = table.owner(device)
            if owner is None or owner == ident:
                return
            if flags == wire.FLOW_DONE:
                self._flow(owner, device, flags, self.pacing.done(ident, device))
            elif flags == wire.FLOW_FULL:
                if self.pacing.on_full(ident, device, table.targets(device, name, True)):
                    self._flow(owner, device, flags)
            elif self.pacing.on_open(ident, device):
                self._flow(owner, device, wire.FLOW_OPEN)
        elif verb == wire.SUB:
            try:
                entries = wire.decode_interests(_as_bytes(payload))
            except ValueError:
                log.warning("bad SUB from %s", table.peers[ident].name)
                return
            table.set_interests(ident, entries)
        else:
            log.warning("unknown verb %r from %s", verb, table.peers[ident].name)

    def _hello(self, ident: bytes, payload: bytes) -> None:
        try:
            data = wire.parse_hello(payload, self.instance)
        except ValueError as exc:
            self._refusals.warning(ident, "refused hello from %r: %s", ident, exc)
            return
        self._unpace(ident)
        self.table.add_peer(ident, data["role"], data["name"], data["devices"])
        log.info("%s %s registered with %d device(s)", data["role"], data["name"], len(data["devices"]))
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
        for ident, batches in out.items():
            for records, bodies, _large in batches:
                body = bodies[0] if len(bodies) == 1 else b"".join(bodies)
                try:
                    send_frames(self.sock, [ident, b"\n".join(records), body])
                    self.routed += len(records)
                except zmq.Again:
                    self._drop(ident, "queue full", len(records))
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.EHOSTUNREACH:
                        self.table.remove_peer(ident)
                        self._unpace(ident)
                        log.info("peer %r has gone; forgotten", ident)
                        break
                    self._drop(ident, str(exc), len(records))

    def _unpace(self, ident: bytes) -> None:
        """A peer (re)starts or goes: its FULLs no longer hold, its DONEs are not waited for."""
        resume, finished = self.pacing.forget(ident)
        for device, flags, count in [(d, wire.FLOW_OPEN, 1) for d in resume] + \
                [(d, wire.FLOW_DONE, n) for d, n in finished]:
            owner = self.table.owner(device)
            if owner is not None and owner != ident:
                self._flow(owner, device, flags, count)

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
        return {
            "peers": len(self.table.peers),
            "devices": sorted(self.table.owners),
            "dropped": self.dropped,
            "echoes": self.echoes,
        }


def main(settings: WorkerSettings) -> int:
    runtime = RuntimeDir.from_env()
    configure_logging("broker")
    # Signals only write to a pipe the poller watches; the loop acts on them.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the arbiter, which stops us in order
    ctx = zmq.Context()
    broker = Broker(ctx, runtime.broker_endpoint, runtime.instance)
    poller = zmq.Poller()
    poller.register(broker.sock, zmq.POLLIN)
    poller.register(wake_r, zmq.POLLIN)
    lifeline = lifeline_fd()
    if lifeline is not None:
        poller.register(lifeline, zmq.POLLIN)
    log.info("broker routing on %s", runtime.broker_endpoint)
    written: dict | None = None
    last_status = 0.0
    while True:
        events = dict(poller.poll(int(STATUS_INTERVAL * 1000)))
        if wake_r in events:
            if signal.SIGTERM in os.read(wake_r, 4096):
                break
        if lifeline is not None and lifeline in events:
            try:
                if not os.read(lifeline, 4096):
                    log.warning("arbiter gone; broker exits")
                    break
            except BlockingIOError:
                pass
        if broker.sock in events:
            for _ in range(1000):  # a bounded batch, then look at signals and the lifeline again
                try:
                    msg = recv_frames(broker.sock)
                except zmq.Again:
                    break
                broker.handle(msg)
            broker.flush()
        now = time.monotonic()
        if now - last_status >= STATUS_INTERVAL:
            last_status = now
            status = broker.status()
            if status != written:
                written = status
                statusfile_write(runtime, "broker", status)
            else:
                touch_status(runtime, "broker")  # a sign of life for the arbiter
    broker.close()
    ctx.term()
    return 0
