"""A gateway's client connections, TCP and the local socket: accepted and admitted (`Admission`),
then read, decoded, written and dropped (`Connections`).

What a client sends is decoded here and handed on element by element (the gateway routes it); what
the gateway delivers is queued here, per client, byte-accounted, and written with one `writev` per
client per turn of the loop. A slow client loses its streaming BLOBs past `blob_drop_bytes` and its
connection past `max_queue_bytes`, and never makes anyone else wait. Bad input drops the offending
client alone.

Two limits hold for the gateway as a whole. Unfinished input: what all clients together hold of
elements not yet complete is bounded (`max_partial_bytes`); past it, the client holding the most
is dropped. File descriptors: a client never takes one of the last few (`FD_HEADROOM`, kept for
the gateway's own status files, slot locks and backbone), and when accept() fails for want of a
descriptor a reserve one is spent on refusing the waiting connection, so the listener never spins
and no connection waits unanswered. `maxconnections` holds across every gateway process
(`ConnectionSlots`).

An idle client costs its descriptor, its `Client` record (slots) with a near-empty `Interest`,
and the reactor's entry pointing at one bound method shared by all: its decoder exists only while
it holds half an element, its output queue only while output waits.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import random
import resource
import socket
import struct
import time
from collections.abc import Callable, Sequence, Sized
from pathlib import Path

from indibroker.broker.errors import MalformedInput
from indibroker.broker.listening import listen, listen_local
from indibroker.broker.ratelog import RateLimitedLog
from indibroker.workers import indi
from indibroker.workers.codec import Element, StreamDecoder
from indibroker.workers.interest import Interest
from indibroker.workers.outqueue import Attached, OutQueue
from indibroker.workers.reactor import Reactor
from indibroker.workers.settings import GatewaySettings
from indibroker.workers.sharedblob import SharedFd

__all__ = ["Admission", "Client", "Connections", "ConnectionSlots", "host_of", "LOCAL_HOST"]

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
READS_PER_TURN = 4  # then let other clients and the backbone have their turn
ADMIT_GRACE = 0.5  # seconds a connection over maxconnections waits for a slot before refusal
ACCEPTS_PER_TURN = 64  # then let the clients have their turn
FD_HEADROOM = 16  # descriptors below the limit never given to a client (at most an eighth of it)
ACCEPT_PAUSE = 0.25  # seconds the listener is left alone when not even a refusal is possible
WARN_INTERVAL = 5.0  # seconds between two log lines of the same kind a peer can make repeat
_NO_FDS = (errno.EMFILE, errno.ENFILE)
# accept() errors that concern only the connection being accepted: take the next one.
_ACCEPT_SKIP = (errno.ECONNABORTED, errno.EPERM, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT,
                errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH)
NO_FDS_TEXT = "indibroker: server out of file descriptors; connection refused"
# Messages with shared buffers queued for one local client at most: each holds a descriptor of
# the gateway's until it is passed (a stalled client with small BLOBs would take them all).
MAX_QUEUED_ATTACHED = 64
# A client of the local socket is on this machine: the access rules see it as a TCP client of
# this machine would be seen, from the loopback address.
LOCAL_HOST = "127.0.0.1"
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def host_of(peer: str) -> str:
    """The address part of a peer's "host:port" (what access rules and rate-limited logs key on)."""
    return peer.rpartition(":")[0]


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
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)

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

    __slots__ = ("fd", "peer", "host", "local", "decoder", "out", "interest", "blobs_dropped", "closed",
                 "write_dead", "slot", "host_slot", "dirty", "partial")

    def __init__(self, fd: int, peer: str, host: str = "", local: bool = False):
        self.fd = fd
        self.peer = peer  # "address:port", or "local:PID" on the local socket
        self.host = host or host_of(peer)  # the address the access rules judge
        self.local = local  # on the local socket: BLOBs go to it as shared buffers
        self.decoder: StreamDecoder | None = None  # made when input arrives, dropped when idle
        self.out: OutQueue | None = None  # made when output is queued, dropped when written
        self.interest = Interest()  # what it asked for: read and written by the gateway's routing
        self.blobs_dropped = 0
        self.closed = False
        self.write_dead = False  # the peer stopped reading (EPIPE): still read what it sent
        self.slot = -1  # its ConnectionSlots lock, when maxconnections is set
        self.host_slot = -1  # its lock among its address's, when max_connections_per_address is set
        self.dirty = False  # has output queued since the last flush of this turn
        self.partial = 0  # bytes its decoder holds of an unfinished element (counted in the total)


class Admission:
    """Who gets in: the listeners (the TCP port, and the local socket when there is one), a
    connection slot each when `maxconnections` is set (waiting `ADMIT_GRACE` for one, then
    refused with an INDI message), and refusal, not a hang or a spin, when the gateway is out of
    descriptors. An admitted socket is handed to `admit` (socket, peer, host, local, slot,
    address slot)."""

    def __init__(self, settings: GatewaySettings, reactor: Reactor, slots_dir: Path,
                 admit: Callable[[socket.socket, str, str, bool, int, int], None], clients: Sized):
        self.settings = settings
        self.access = settings.access
        self.reactor = reactor
        self.maxconnections = settings.maxconnections  # 0: unlimited
        self.listener: socket.socket | None = None  # the TCP port
        self.local_listener: socket.socket | None = None  # the local socket (`-u`)
        self.slots: ConnectionSlots | None = None
        self._slots_dir = slots_dir
        self._admit_socket = admit
        self._clients = clients  # counted in a log line
        self._reserve = -1  # the spare descriptor spent on refusing a connection at EMFILE
        self._accept_paused = False
        self.refused_no_fds = 0  # connections refused for want of descriptors, in all
        self._refused_unreported = 0  # ... since "accepting again" was last said
        self._warn = RateLimitedLog(log, WARN_INTERVAL)

    @property
    def listeners(self) -> list[socket.socket]:
        return [s for s in (self.listener, self.local_listener) if s is not None and s.fileno() >= 0]

    def start(self) -> socket.socket:
        """Listen (and take the connection slots' directory, with maxconnections)."""
        if self.maxconnections:
            self.slots = ConnectionSlots(self._slots_dir, self.maxconnections)
        settings = self.settings
        # The arbiter's listening sockets, inherited (it listened before anything else started);
        # a gateway built on its own (tests) listens itself.
        fd = settings.listen_fd
        self.listener = socket.socket(fileno=fd) if fd >= 0 else listen(settings.host, settings.port)
        if settings.local_fd >= 0:
            self.local_listener = socket.socket(fileno=settings.local_fd)
        elif settings.local_socket:
            self.local_listener = listen_local(settings.local_socket)
        self._reserve = open_reserve()
        self._watch_listeners()
        return self.listener

    def _watch_listeners(self) -> None:
        for listener in self.listeners:
            listener.setblocking(False)
            self.reactor.add_reader(listener.fileno(), functools.partial(self._accept_on, listener))

    def close(self) -> None:
        for listener in self.listeners:
            self.reactor.forget(listener.fileno())
            listener.close()
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1

    def _accept_on(self, listener: socket.socket, _fd: int) -> None:
        self._accept(listener)

    def _accept(self, listener: socket.socket) -> None:
        ceiling = fd_ceiling()
        local = listener is self.local_listener
        for _ in range(ACCEPTS_PER_TURN):  # level-triggered: the rest wait for the next turn
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _NO_FDS:
                    if self._refuse_with_reserve(listener):
                        continue
                    return
                if exc.errno in _ACCEPT_SKIP:  # that connection only
                    continue
                # Anything else may well repeat at once: leave the listener alone for a moment.
                self._warn.warning("accept", "accept failed: %s; new connections wait %.2f s",
                                   exc, ACCEPT_PAUSE)
                self._pause_accepting()
                return
            peer, host = _local_peer(sock) if local else (f"{addr[0]}:{addr[1]}", addr[0])
            if not self.access.open:
                why = self.access.admit(host)
                if why is not None:  # closed at once: it never reaches the broker
                    self._warn.warning(("refused", host), "refused %s: %s", peer, why)
                    sock.close()
                    continue
            if sock.fileno() >= ceiling:
                # Only the last few descriptors are left: they are for the gateway's own needs
                # (status file, slot locks, the backbone), not for one more client.
                self._refuse_no_fds(sock, peer)
                continue
            self._admit(sock, peer, host, local, time.monotonic() + ADMIT_GRACE)

    def _refuse_with_reserve(self, listener: socket.socket) -> bool:
        """accept() failed for want of a descriptor with a connection waiting: spend the reserve
        on accepting it to refuse it (left waiting, it would wake the loop at once, forever).
        True when the next waiting connection may be tried the same way."""
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1
            refused = False
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                pass  # nobody waits any more
            except OSError as exc:
                if exc.errno not in _ACCEPT_SKIP:  # something else took the descriptor
                    self._reserve = open_reserve()
                    self._pause_accepting()
                    return False
            else:
                self._refuse_no_fds(sock, f"{addr[0]}:{addr[1]}" if addr else "local")
                refused = True
            self._reserve = open_reserve()
            if self._reserve >= 0:
                return refused
        # No reserve to spend: stop watching the listeners for a moment rather than spin on them.
        self._warn.warning("fds-pause", "out of file descriptors, not even one to refuse a connection "
                           "with: new connections wait %.2f s", ACCEPT_PAUSE)
        self._pause_accepting()
        return False

    def _pause_accepting(self) -> None:
        if self._accept_paused or not self.listeners:
            return
        self._accept_paused = True
        for listener in self.listeners:
            self.reactor.forget(listener.fileno())
        self.reactor.call_later(ACCEPT_PAUSE, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._accept_paused = False
        if not self.listeners:
            return
        if self._reserve < 0:
            self._reserve = open_reserve()
        self._watch_listeners()

    def _refuse_no_fds(self, sock: socket.socket, peer: str) -> None:
        """Out of descriptors: say so in INDI if the socket takes it at once, and close."""
        self.refused_no_fds += 1
        self._refused_unreported += 1
        self._warn.warning("fds", "out of file descriptors (limit %d, %d clients): refusing new "
                           "connections (%s; %d refused in all)",
                           resource.getrlimit(resource.RLIMIT_NOFILE)[0], len(self._clients), peer,
                           self.refused_no_fds)
        _say_and_close(sock, NO_FDS_TEXT)

    def _admit(self, sock: socket.socket, peer: str, host: str, local: bool, deadline: float) -> None:
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
                    self.reactor.call_later(0.05, lambda: self._admit(sock, peer, host, local, deadline))
                else:
                    self._refuse(sock, peer)
                return
            if taken >= fd_ceiling():  # a slot lock must not take the last descriptors either
                os.close(taken)
                self._refuse_no_fds(sock, peer)
                return
            slot = taken
        host_slot = -1
        if self.access.max_per_address:
            try:
                host_slot = ConnectionSlots(self._slots_dir / "by-address" / host.replace("/", "_"),
                                            self.access.max_per_address).take() or -1
            except OSError as exc:
                self._warn.warning("slots", "refused %s: no connection slot (%s)", peer, exc)
                host_slot = -2
            if host_slot < 0:
                if slot >= 0:
                    os.close(slot)
                if host_slot == -1:
                    self._warn.warning(("per-address", host), "refused %s: %d connections from %s already",
                                       peer, self.access.max_per_address, host)
                    _say_and_close(sock, f"indibroker: too many connections from {host} (at most "
                                         f"{self.access.max_per_address}); try again later")
                else:
                    sock.close()
                return
        if self._refused_unreported:
            if self._warn.log(logging.INFO, "fds-ok", "accepting connections again (%d refused for "
                              "want of file descriptors)", self._refused_unreported):
                self._refused_unreported = 0
        self._admit_socket(sock, peer, host, local, slot, host_slot)

    def _refuse(self, sock: socket.socket, peer: str) -> None:
        """Over maxconnections: say why in INDI, then close (no reset: the client reads it)."""
        self._warn.warning("maxconnections", "refused %s: maxconnections (%d) reached", peer,
                           self.maxconnections)
        _say_and_close(sock, f"indibroker: too many connections (maxconnections is "
                             f"{self.maxconnections}); try again later")


class Connections:
    """Every client of one gateway, by descriptor (`clients`): admitted by `admission`, then read,
    decoded, written to and dropped here.

    The gateway is told of each element a client sends (`received`), of each client dropped
    (`dropped`, after its descriptor is closed) and of each client connected (`connected`); while
    `on_drained` is set, it is also told after each flush of a client's queue (BLOB pacing wants
    to know; nothing is called per flush when nobody does).
    """

    def __init__(self, settings: GatewaySettings, reactor: Reactor, slots_dir: Path, *,
                 received: Callable[[Client, Element], None], dropped: Callable[[Client], None],
                 connected: Callable[[], None]):
        self.reactor = reactor
        self.clients: dict[int, Client] = {}
        self.max_element = settings.max_element
        self.blob_drop_bytes = settings.blob_drop_bytes
        self.max_queue_bytes = settings.max_queue_bytes
        self.max_partial_bytes = settings.max_partial_bytes
        self.partial_total = 0  # sum of every client's `partial`, kept as reads are fed
        self.admission = Admission(settings, reactor, slots_dir, self._add, self.clients)
        self._warn = RateLimitedLog(log, WARN_INTERVAL)
        self._dirty: list[Client] = []
        self._rbuf = bytearray(READ_SIZE)
        self._rbuf_view = memoryview(self._rbuf)
        self._received = received
        self._dropped = dropped
        self._connected = connected
        self.on_drained: Callable[[Client], None] | None = None
        # One bound method each, shared by every client's registration (the reactor passes the fd).
        self._on_client_read = self._client_readable
        self._on_client_write = self._client_writable

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> socket.socket:
        """Listen: the listening socket."""
        return self.admission.start()

    def close(self) -> None:
        """Stop listening and drop every client."""
        self.admission.close()
        for client in list(self.clients.values()):
            self.drop(client, "server stopping", level=logging.DEBUG)

    def _add(self, sock: socket.socket, peer: str, host: str, local: bool, slot: int, host_slot: int) -> None:
        """An admitted connection becomes a client (its socket object goes: the fd is kept)."""
        sock.setblocking(False)
        if not local:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = Client(sock.detach(), peer, host, local)
        client.slot = slot
        client.host_slot = host_slot
        self.clients[client.fd] = client
        self.reactor.add_reader(client.fd, self._on_client_read)
        log.info("client %s connected (%d now)", peer, len(self.clients))
        self._connected()

    # -- input ------------------------------------------------------------------------------
    def _client_readable(self, fd: int) -> None:
        client = self.clients.get(fd)
        if client is not None:
            self._readable(client)

    def _readable(self, client: Client) -> None:
        received = self._received
        for _ in range(READS_PER_TURN):
            try:
                n = os.readv(client.fd, [self._rbuf])
                data = self._rbuf_view[:n].tobytes()  # one shared buffer: no big allocation per read
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.drop(client, f"read error: {exc}")
                return
            if not data:
                self.drop(client, "disconnected")
                return
            decoder = client.decoder
            if decoder is None:
                decoder = client.decoder = StreamDecoder(max_element=self.max_element)
            try:
                elements = decoder.feed(data)
            except MalformedInput as exc:
                for element in exc.elements:
                    received(client, element)
                self.drop(client, f"malformed input: {exc}", level=logging.WARNING)
                return
            held = decoder.pending_bytes
            if not held:
                client.decoder = None  # nothing half-read: an idle client holds no decoder
            grew = held > client.partial
            if held != client.partial:
                self.partial_total += held - client.partial
                client.partial = held
            for element in elements:
                received(client, element)
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
                ("partial", worst.host),
                "client %s dropped: it held %d bytes of an unfinished element, the most of any "
                "client, and all clients together held %d, over max_partial_bytes (%d)",
                worst.peer, worst.partial, self.partial_total, self.max_partial_bytes)
            self.drop(worst, "unfinished input over max_partial_bytes", level=logging.DEBUG)

    # -- output -----------------------------------------------------------------------------
    def deliver(self, client: Client, data: bytes | memoryview, blob: bool,
                buffers: Sequence[SharedFd] = ()) -> None:
        """Queue `data` for `client`, written at the end of this turn; a streaming BLOB is dropped
        past `blob_drop_bytes` of backlog (shared buffers queued for it count), and the client
        itself past `max_queue_bytes`. `buffers` go with `data` to a local-socket client."""
        if client.write_dead:
            return
        out = client.out
        if out is None:
            out = client.out = OutQueue()
        queued = out.bytes
        if queued > self.max_queue_bytes:
            self.drop(client, f"too slow: {queued} bytes queued, over {self.max_queue_bytes}",
                      level=logging.WARNING)
            return
        if blob and (out.backlog() > self.blob_drop_bytes or (buffers and out.attached >= MAX_QUEUED_ATTACHED)):
            client.blobs_dropped += 1
            if client.blobs_dropped in (1, 10, 100) or client.blobs_dropped % 1000 == 0:
                log.warning("client %s is %d bytes behind: %d streaming BLOB(s) dropped",
                            client.peer, queued, client.blobs_dropped)
            return
        was_empty = not out
        out.push(Attached(bytes(data), buffers) if buffers else data)
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
                out.clear()  # what it will never be sent, shared buffers included, goes now
                done = True
        if done:
            client.out = None  # an idle client holds no queue
        if self.on_drained is not None:
            self.on_drained(client)
        self.reactor.set_writer(client.fd, None if done else self._on_client_write)

    # -- leaving ----------------------------------------------------------------------------
    def drop(self, client: Client, why: str, level: int = logging.INFO) -> None:
        if client.closed:
            return
        client.closed = True
        if level >= logging.WARNING:  # a peer can make these repeat (reconnect and do it again)
            host = client.host
            self._warn.log(level, (why.partition(":")[0], host), "client %s dropped: %s", client.peer, why)
        else:
            log.log(level, "client %s dropped: %s", client.peer, why)
        self.reactor.forget(client.fd)
        self.clients.pop(client.fd, None)
        if client.out is not None:
            client.out.clear()  # gives up the shared buffers it held
        client.out = None
        client.decoder = None
        if client.partial:
            self.partial_total -= client.partial
            client.partial = 0
        try:
            os.close(client.fd)
        except OSError:
            pass
        for lock in (client.slot, client.host_slot):
            if lock >= 0:
                os.close(lock)
        client.slot = client.host_slot = -1
        self._dropped(client)


def _local_peer(sock: socket.socket) -> tuple[str, str]:
    """A local socket client's name for logs ("local:PID", from SO_PEERCRED) and its address for
    the access rules (LOCAL_HOST)."""
    try:
        pid, _uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        pid = 0
    return f"local:{pid}", LOCAL_HOST


def _say_and_close(sock: socket.socket, text: str) -> None:
    """Refuse a connection: say why in an INDI message if the socket takes it at once, then close
    (shut down for writing first: no reset, so the client reads it)."""
    try:
        sock.setblocking(False)
        sock.send(indi.message(text))
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()
