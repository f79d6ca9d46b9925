"""The TCP client gateway: INDI clients connect here (port 7624 by default).

Several gateway processes may share the port (SO_REUSEPORT) to use several cores. Each client's
XML is parsed once here; what the broker sends back is written to every interested client as the
same bytes (no re-serialising). Each client has its own byte-accounted queue, so a slow client
loses its streaming BLOBs past one threshold and its connection past another, and never makes
anyone else wait. Bad input drops the offending client alone.

Two limits hold for the gateway as a whole. Unfinished input: what all clients together hold of
elements not yet complete is bounded (`max_partial_bytes`); past it, the client holding the most
is dropped. File descriptors: a client never takes one of the last few (`FD_HEADROOM`, kept for
the gateway's own status files, slot locks and backbone), and when accept() fails for want of a
descriptor a reserve one is spent on refusing the waiting connection, so the listener never spins
and no connection waits unanswered.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import resource
import socket
import time
from pathlib import Path
from typing import Any

from indibroker.broker import wire
from indibroker.broker.errors import MalformedInput
from indibroker.broker.pacing import BLOB_WINDOW
from indibroker.broker.ratelog import RateLimitedLog
from indibroker.workers import indi
from indibroker.workers.base import Worker
from indibroker.workers.codec import Element, StreamDecoder
from indibroker.workers.interest import Interest, union
from indibroker.workers.outqueue import OutQueue
from indibroker.workers.settings import GatewaySettings, Inheritance

__all__ = ["Gateway", "Client"]

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
READS_PER_TURN = 4  # then let other clients and the backbone have their turn

GETP_COALESCE = 2.0  # seconds a getProperties waiting for its first answer stands for others
ASKED_MAX = 1024  # pending questions remembered before stale ones are forgotten
ADMIT_GRACE = 0.5  # seconds a connection over maxconnections waits for a slot before refusal
RESTART_NOTICE_GAP = 5.0  # seconds: one notice to clients per broker restart
MOVING = 1.0  # seconds since a client last took bytes for it to count as draining (BLOB pacing)
ACCEPTS_PER_TURN = 64  # then let the clients have their turn
FD_HEADROOM = 16  # descriptors below the limit never given to a client (at most an eighth of it)
ACCEPT_PAUSE = 0.25  # seconds the listener is left alone when not even a refusal is possible
WARN_INTERVAL = 5.0  # seconds between two log lines of the same kind a peer can make repeat
_NO_FDS = (errno.EMFILE, errno.ENFILE)
# accept() errors that concern only the connection being accepted: take the next one.
_ACCEPT_SKIP = (errno.ECONNABORTED, errno.EPERM, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT,
                errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH)
NO_FDS_TEXT = "indibroker: server out of file descriptors; connection refused"


def pending_bytes(decoder: StreamDecoder) -> int:
    """What a client's decoder holds of an unfinished element."""
    return decoder.pending_bytes


def fd_ceiling() -> int:
    """The lowest descriptor a client may not have: the limit less a little headroom."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 1 << 62
    return soft - min(FD_HEADROOM, soft // 8)


def open_reserve() -> int:
    """A spare descriptor to close when the table is full (-1 if even that is not to be had)."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


class ConnectionSlots:
    """`maxconnections` across every gateway process: one lock file per allowed connection.

    A gateway takes a free slot (flock, non-blocking) for each client and closes it when the
    client goes. The kernel releases the locks of a gateway that dies, so slots never leak.
    """

    def __init__(self, directory: Path, count: int):
        self.directory = directory
        self.count = count
        directory.mkdir(mode=0o700, exist_ok=True)

    def take(self) -> int | None:
        """An open, locked slot fd, or None when every slot is taken."""
        start = random.randrange(self.count)
        for i in range(self.count):
            path = self.directory / str((start + i) % self.count)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)  # may raise EMFILE
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
            except OSError:
                os.close(fd)
                raise
        return None


class Client:
    """One connection: its descriptor alone (a socket object would cost more than the rest of an
    idle client), and what it is owed."""

    __slots__ = ("fd", "peer", "decoder", "out", "interest", "blobs_dropped", "closed",
                 "write_dead", "slot", "dirty", "partial")

    def __init__(self, fd: int, peer: str):
        self.fd = fd
        self.peer = peer
        self.decoder: StreamDecoder | None = None  # made when input arrives, dropped when idle
        self.out: OutQueue | None = None  # made when output is queued, dropped when written
        self.interest = Interest()
        self.blobs_dropped = 0
        self.closed = False
        self.write_dead = False  # the peer stopped reading (EPIPE): still read what it sent
        self.slot = -1  # its ConnectionSlots lock, when maxconnections is set
        self.dirty = False  # has output queued since the last flush of this turn
        self.partial = 0  # bytes its decoder holds of an unfinished element (counted in the total)


def resolve_listen(host: str, port: int) -> tuple[socket.AddressFamily, tuple]:
    """The address to bind: IPv4 first for names like localhost, as indiserver binds."""
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                               socket.AI_PASSIVE)
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, _, _, _, addr = infos[0]
    return family, addr


def listen(host: str, port: int) -> socket.socket:
    """A listening socket other gateway processes can share (SO_REUSEPORT)."""
    family, addr = resolve_listen(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(addr)
    sock.listen(512)
    sock.setblocking(False)
    return sock


class Gateway(Worker):
    role = "gateway"
    backbone_role = "gateway"

    settings: GatewaySettings

    def __init__(self, settings: GatewaySettings, inheritance: Inheritance | None = None, **kw: Any):
        super().__init__(settings, inheritance, **kw)
        self.clients: dict[int, Client] = {}
        self.max_element = settings.max_element
        self.blob_drop_bytes = settings.blob_drop_bytes
        self.max_queue_bytes = settings.max_queue_bytes
        # Room for the next BLOB, for pacing: below the drop threshold by what may be in flight.
        self.blob_room = max(0, self.blob_drop_bytes - BLOB_WINDOW)
        self.maxconnections = settings.maxconnections  # 0: unlimited
        self.max_partial_bytes = settings.max_partial_bytes
        self.partial_total = 0  # sum of every client's `partial`, kept as reads are fed
        self.listener: socket.socket | None = None
        self._reserve = -1  # the spare descriptor spent on refusing a connection at EMFILE
        self._accept_paused = False
        self.refused_no_fds = 0  # connections refused for want of descriptors, in all
        self._refused_unreported = 0  # ... since "accepting again" was last said
        self._warn = RateLimitedLog(log, WARN_INTERVAL)
        self._dirty: list[Client] = []
        self._asked: dict[tuple[str, str], float] = {}  # getProperties sent, no definition back yet
        self._full: dict[str, str] = {}  # device -> BLOB property we said FULL for (broker/pacing.py)
        self._opener: dict[str, tuple[Client, int]] = {}  # device -> first with room, and when to open
        self._told_restart = -RESTART_NOTICE_GAP
        self._rbuf = bytearray(READ_SIZE)
        self._rbuf_view = memoryview(self._rbuf)
        # One bound method each, shared by every client's registration (the reactor passes the fd).
        self._on_client_read = self._client_readable
        self._on_client_write = self._client_writable
        self.slots = (ConnectionSlots(self.runtime.slots_dir, self.maxconnections)
                      if self.maxconnections else None)

    # -- lifecycle --------------------------------------------------------------------------
    def setup(self) -> None:
        self.listener = listen(self.settings.host, self.settings.port)
        self._reserve = open_reserve()
        self.reactor.add_reader(self.listener.fileno(), lambda _fd: self._accept())
        log.info("%s listening on %s", self.name, self.listener.getsockname()[:2])

    def shutdown(self) -> None:
        if self.listener is not None:
            self.reactor.forget(self.listener.fileno())
            self.listener.close()
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1
        for client in list(self.clients.values()):
            self._drop(client, "server stopping", level=logging.DEBUG)

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
        notice = indi.message("indibroker: message routing restarted; updates sent in the last moment "
                              "may be lost, current values follow")
        for client in list(self.clients.values()):
            self._deliver(client, notice, False)

    def status(self) -> dict[str, Any]:
        return {
            "clients": len(self.clients),
            "peers": sorted(c.peer for c in self.clients.values()),
        }

    # -- connections ------------------------------------------------------------------------
    def _accept(self) -> None:
        listener = self.listener
        assert listener is not None
        ceiling = fd_ceiling()
        for _ in range(ACCEPTS_PER_TURN):  # level-triggered: the rest wait for the next turn
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _NO_FDS:
                    if self._refuse_with_reserve():
                        continue
                    return
                if exc.errno in _ACCEPT_SKIP:  # that connection only
                    continue
                # Anything else may well repeat at once: leave the listener alone for a moment.
                self._warn.warning("accept", "accept failed: %s; new connections wait %.2f s",
                                   exc, ACCEPT_PAUSE)
                self._pause_accepting()
                return
            peer = f"{addr[0]}:{addr[1]}"
            if sock.fileno() >= ceiling:
                # Only the last few descriptors are left: they are for the gateway's own needs
                # (status file, slot locks, the backbone), not for one more client.
                self._refuse_no_fds(sock, peer)
                continue
            self._admit(sock, peer, time.monotonic() + ADMIT_GRACE)

    def _refuse_with_reserve(self) -> bool:
        """accept() failed for want of a descriptor with a connection waiting: spend the reserve
        on accepting it to refuse it (left waiting, it would wake the loop at once, forever).
        True when the next waiting connection may be tried the same way."""
        assert self.listener is not None
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1
            refused = False
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                pass  # nobody waits any more
            except OSError as exc:
                if exc.errno not in _ACCEPT_SKIP:  # something else took the descriptor
                    self._reserve = open_reserve()
                    self._pause_accepting()
                    return False
            else:
                self._refuse_no_fds(sock, f"{addr[0]}:{addr[1]}")
                refused = True
            self._reserve = open_reserve()
            if self._reserve >= 0:
                return refused
        # No reserve to spend: stop watching the listener for a moment rather than spin on it.
        self._warn.warning("fds-pause", "out of file descriptors, not even one to refuse a connection "
                           "with: new connections wait %.2f s", ACCEPT_PAUSE)
        self._pause_accepting()
        return False

    def _pause_accepting(self) -> None:
        if self._accept_paused or self.listener is None:
            return
        self._accept_paused = True
        self.reactor.forget(self.listener.fileno())
        self.reactor.call_later(ACCEPT_PAUSE, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._accept_paused = False
        if self.listener is None or self.listener.fileno() < 0:
            return
        if self._reserve < 0:
            self._reserve = open_reserve()
        self.reactor.add_reader(self.listener.fileno(), lambda _fd: self._accept())

    def _refuse_no_fds(self, sock: socket.socket, peer: str) -> None:
        """Out of descriptors: say so in INDI if the socket takes it at once, and close."""
        self.refused_no_fds += 1
        self._refused_unreported += 1
        self._warn.warning("fds", "out of file descriptors (limit %d, %d clients): refusing new "
                           "connections (%s; %d refused in all)",
                           resource.getrlimit(resource.RLIMIT_NOFILE)[0], len(self.clients), peer,
                           self.refused_no_fds)
        try:
            sock.setblocking(False)
            sock.send(indi.message(NO_FDS_TEXT))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sock.close()

    def _admit(self, sock: socket.socket, peer: str, deadline: float) -> None:
        """Take a connection slot; when all are taken, wait a moment (a client that has just
        closed may not have been noticed yet), then refuse."""
        slot = -1
        if self.slots is not None:
            try:
                taken = self.slots.take()
            except OSError as exc:
                if exc.errno in _NO_FDS:
                    self._refuse_no_fds(sock, peer)
                else:
                    self._warn.warning("slots", "refused %s: no connection slot (%s)", peer, exc)
                    sock.close()
                return
            if taken is None:
                if time.monotonic() < deadline:
                    self.reactor.call_later(0.05, lambda: self._admit(sock, peer, deadline))
                else:
                    self._refuse(sock, peer)
                return
            if taken >= fd_ceiling():  # a slot lock must not take the last descriptors either
                os.close(taken)
                self._refuse_no_fds(sock, peer)
                return
            slot = taken
        if self._refused_unreported:
            if self._warn.log(logging.INFO, "fds-ok", "accepting connections again (%d refused for "
                              "want of file descriptors)", self._refused_unreported):
                self._refused_unreported = 0
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = Client(sock.detach(), peer)
        client.slot = slot
        self.clients[client.fd] = client
        self.reactor.add_reader(client.fd, self._on_client_read)
        log.info("client %s connected (%d now)", peer, len(self.clients))
        self.status_changed()

    def _refuse(self, sock: socket.socket, peer: str) -> None:
        """Over maxconnections: say why in INDI, then close (no reset: the client reads it)."""
        self._warn.warning("maxconnections", "refused %s: maxconnections (%d) reached", peer,
                           self.maxconnections)
        try:
            sock.setblocking(False)
            sock.send(indi.message(f"indibroker: too many connections (maxconnections is "
                                   f"{self.maxconnections}); try again later"))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sock.close()

    def _drop(self, client: Client, why: str, level: int = logging.INFO) -> None:
        if client.closed:
            return
        client.closed = True
        if level >= logging.WARNING:  # a peer can make these repeat (reconnect and do it again)
            host = client.peer.rpartition(":")[0]
            self._warn.log(level, (why.partition(":")[0], host), "client %s dropped: %s", client.peer, why)
        else:
            log.log(level, "client %s dropped: %s", client.peer, why)
        self.reactor.forget(client.fd)
        self.clients.pop(client.fd, None)
        client.out = None
        client.decoder = None
        if client.partial:
            self.partial_total -= client.partial
            client.partial = 0
        if self._full:
            self._room_for(client, gone=True)  # whatever it held up is open again
        try:
            os.close(client.fd)
        except OSError:
            pass
        if client.slot >= 0:
            os.close(client.slot)
            client.slot = -1
        self.backbone.update_interests()
        self.status_changed()

    # -- client → server --------------------------------------------------------------------
    def _client_readable(self, fd: int) -> None:
        client = self.clients.get(fd)
        if client is not None:
            self._readable(client)

    def _readable(self, client: Client) -> None:
        for _ in range(READS_PER_TURN):
            try:
                n = os.readv(client.fd, [self._rbuf])
                data = self._rbuf_view[:n].tobytes()  # one shared buffer: no big allocation per read
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._drop(client, f"read error: {exc}")
                return
            if not data:
                self._drop(client, "disconnected")
                return
            decoder = client.decoder
            if decoder is None:
                decoder = client.decoder = StreamDecoder(max_element=self.max_element)
            try:
                elements = decoder.feed(data)
            except MalformedInput as exc:
                for element in exc.elements:
                    self._from_client(client, element)
                self._drop(client, f"malformed input: {exc}", level=logging.WARNING)
                return
            held = pending_bytes(decoder)
            if not held:
                client.decoder = None  # nothing half-read: an idle client holds no decoder
            grew = held > client.partial
            if held != client.partial:
                self.partial_total += held - client.partial
                client.partial = held
            for element in elements:
                self._from_client(client, element)
                if client.closed:
                    return
            if grew and self.partial_total > self.max_partial_bytes:
                self._shed_partial()
                if client.closed:
                    return
            if n < READ_SIZE:
                return

    def _shed_partial(self) -> None:
        """Over `max_partial_bytes` for all clients together: drop the client holding the most
        (the scan over clients happens only here, past the limit, never per read)."""
        while self.partial_total > self.max_partial_bytes:
            worst = max(self.clients.values(), key=lambda c: c.partial, default=None)
            if worst is None or not worst.partial:
                return
            self._warn.warning(
                ("partial", worst.peer.rpartition(":")[0]),
                "client %s dropped: it held %d bytes of an unfinished element, the most of any "
                "client, and all clients together held %d, over max_partial_bytes (%d)",
                worst.peer, worst.partial, self.partial_total, self.max_partial_bytes)
            self._drop(worst, "unfinished input over max_partial_bytes", level=logging.DEBUG)

    def _from_client(self, client: Client, el: Element) -> None:
        tag = el.tag
        device = el.get("device")
        name = el.get("name")
        if tag in indi.CLIENT_NEW:
            if not device or not name:
                log.info("client %s: %s without device or name ignored", client.peer, tag)
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
            self._deliver(client, indi.ping_reply(el.get("uid")), blob=False)
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
            self.backbone.update_interests()

    # -- server → clients -------------------------------------------------------------------
    def on_backbone(self, verb: bytes, device: str, name: str, flags: bytes, payload: bytes) -> None:
        if verb not in wire.DRIVER_OUTPUT:
            return
        if verb == wire.DEF and self._asked:  # an answer has begun: later askers ask again
            self._asked.pop(("", ""), None)
            self._asked.pop((device, ""), None)
            self._asked.pop((device, name), None)
        data = payload
        if flags != wire.FLAG_BLOB:
            for client in list(self.clients.values()):
                if client.interest.wants(device, name, False):
                    self._deliver(client, data, False)
            return
        behind = False
        now = time.monotonic()
        for client in list(self.clients.values()):
            if client.interest.wants(device, name, True):
                self._deliver(client, data, True)
                if not behind and not self._has_room(client) and self._draining(client, now):
                    behind = True
        if behind:
            # The next BLOB would be dropped for a client that is still taking bytes: ask for the
            # driver to be paced (broker/pacing.py) rather than read only for its BLOBs to be
            # dropped. Not for long: `_room_for` opens again when every draining client has room,
            # or when the first with room is halfway through what it holds, so the fastest
            # client never waits for a slower one; a client more than half a BLOB behind still
            # loses BLOBs. Said before DONE: an owner holding its next BLOB ready would send it
            # the moment DONE frees its window.
            self._full[device] = name
            self._opener.pop(device, None)
            self.backbone.send(wire.FLOW, device, name, wire.FLOW_FULL)
        self.backbone.send(wire.FLOW, device, "", wire.FLOW_DONE)  # handled: the owner's window moves

    def _room_for(self, client: Client, gone: bool = False) -> None:
        """Open the devices we said FULL for, once this client has room for their next BLOB.

        Not at the first client with room, though: the others, draining at much the same speed,
        would each miss that BLOB by a few milliseconds. The device opens when every client that
        is draining has room, or when the first one to have room is halfway through what it
        still holds (so it is never left waiting: the next BLOB arrives while it still writes).
        """
        out = client.out
        has_room = gone or self._has_room(client)
        for device, name in list(self._full.items()):
            if not client.interest.wants(device, name, True):
                continue
            opener = self._opener.get(device)
            if gone or (opener is not None and opener[0] is client and (out is None or out.bytes <= opener[1])):
                self._open(device, name)
            elif has_room:
                if opener is None:
                    self._opener[device] = (client, out.bytes // 2 if out is not None else 0)
                if self._all_have_room(device, name):
                    self._open(device, name)

    def _all_have_room(self, device: str, name: str) -> bool:
        now = time.monotonic()
        return not any(not self._has_room(c) and self._draining(c, now) and c.interest.wants(device, name, True)
                       for c in self.clients.values())

    def _has_room(self, client: Client) -> bool:
        """Room for the next BLOB: under the drop threshold by what may still be in flight."""
        return client.out is None or client.out.backlog() <= self.blob_room

    @staticmethod
    def _draining(client: Client, now: float) -> bool:
        """Took bytes lately: a client that has stopped reading never paces a driver."""
        return client.out is not None and now - client.out.moved < MOVING

    def _open(self, device: str, name: str) -> None:
        del self._full[device]
        self._opener.pop(device, None)
        self.backbone.send(wire.FLOW, device, name, wire.FLOW_OPEN)

    def _deliver(self, client: Client, data: bytes | memoryview, blob: bool) -> None:
        if client.write_dead:
            return
        out = client.out
        if out is None:
            out = client.out = OutQueue()
        queued = out.bytes
        if queued > self.max_queue_bytes:
            self._drop(client, f"too slow: {queued} bytes queued, over {self.max_queue_bytes}",
                       level=logging.WARNING)
            return
        if blob and out.backlog() > self.blob_drop_bytes:
            client.blobs_dropped += 1
            if client.blobs_dropped in (1, 10, 100) or client.blobs_dropped % 1000 == 0:
                log.warning("client %s is %d bytes behind: %d streaming BLOB(s) dropped",
                            client.peer, queued, client.blobs_dropped)
            return
        was_empty = not out
        out.push(data)
        if was_empty and not client.dirty:
            # One writev per client per turn of the loop, however many messages it got.
            client.dirty = True
            self._dirty.append(client)
            if len(self._dirty) == 1:
                self.reactor.defer(self._flush_dirty)

    def _flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, []
        for client in dirty:
            client.dirty = False
            if not client.closed:
                self._flush(client)

    def _client_writable(self, fd: int) -> None:
        client = self.clients.get(fd)
        if client is not None:
            self._flush(client)

    def _flush(self, client: Client) -> None:
        out = client.out
        if out is None:
            done = True
        else:
            try:
                done = out.flush(client.fd)
            except OSError as exc:
                # A client that sent its commands and closed (indi_setprop does) must still have
                # those commands read and routed: stop writing, keep reading until EOF.
                log.debug("client %s: write failed (%s); reading what is left", client.peer, exc)
                client.write_dead = True
                done = True
        if done:
            client.out = None  # an idle client holds no queue
        if self._full:
            self._room_for(client)
        self.reactor.set_writer(client.fd, None if done else self._on_client_write)
