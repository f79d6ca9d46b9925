#!/usr/bin/env python3
"""Fast raw-socket INDI clients for the benchmarks (standard library only).

A client counts what it receives with byte scanning, never an XML parser, so that it is never the
bottleneck: per device it counts ``<setNumberVector device="D" name="SEQ"`` (or
``<setBLOBVector device="D" name="BLOB"``) occurrences in each chunk it reads, parses the last
complete sequence number, and watches for the flood driver's end marker
(``setNumberVector START state="Ok"``). Because every flood starts at sequence number 1 and a
server keeps one driver's messages in order, ``last sequence number - count`` is the number of
messages missing in the stream so far, and ``expected - count`` the number lost in all.

The runner (``run.py``) starts these as separate processes with :func:`spawn_group` (several
sockets per process, served with epoll) and :func:`spawn_latency`, and talks to them over a pipe.
Run this file directly for a quick look at a running server::

    python3 bench/clients.py --port 7624 --device Flood1 --count 100000 --clients 4
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import multiprocessing
import multiprocessing.connection
import os
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

READ_SIZE = 256 * 1024
TAIL = 4096  # bytes of the previous chunk kept for markers and numbers cut in two
MB = 1024 * 1024
BENCH = Path(__file__).resolve().parent

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

_CTX = multiprocessing.get_context("fork")


# -- messages we send -----------------------------------------------------------------------------
def get_properties(device: str = "", name: str = "") -> bytes:
    extra = (f' device="{device}"' if device else "") + (f' name="{name}"' if name else "")
    return f'<getProperties version="1.7"{extra}/>\n'.encode()


def enable_blob(device: str, mode: str = "Also") -> bytes:
    return f'<enableBLOB device="{device}">{mode}</enableBLOB>\n'.encode()


def start_flood(device: str, count: int, blob_mb: float = 0.0) -> bytes:
    return (f'<newNumberVector device="{device}" name="START"><oneNumber name="COUNT">{count}</oneNumber>'
            f'<oneNumber name="BLOBMB">{blob_mb:g}</oneNumber></newNumberVector>\n').encode()


def ping(device: str, token: int) -> bytes:
    return (f'<newNumberVector device="{device}" name="PING"><oneNumber name="T">{token}</oneNumber>'
            "</newNumberVector>\n").encode()


def def_marker(device: str, name: str = "SEQ", kind: str = "Number") -> bytes:
    return f'<def{kind}Vector device="{device}" name="{name}"'.encode()


# -- counting -------------------------------------------------------------------------------------
class Counter:
    """One device's flood in one byte stream: count, last sequence number, times, end marker."""

    __slots__ = ("device", "blob", "marker", "done_marker", "seq_re", "count", "last_seq", "first_t",
                 "last_t", "done", "expected")

    def __init__(self, device: str, blob: bool = False, expected: int = 0):
        self.device = device
        self.blob = blob
        dev = re.escape(device.encode())
        if blob:
            self.marker = f'<setBLOBVector device="{device}" name="BLOB"'.encode()
            self.seq_re = re.compile(rb'<setBLOBVector device="' + dev
                                     + rb'" name="BLOB"[^>]*?message="seq (\d+)"')
        else:
            self.marker = f'<setNumberVector device="{device}" name="SEQ"'.encode()
            self.seq_re = re.compile(rb'<setNumberVector device="' + dev
                                     + rb'" name="SEQ"[^>]*>\s*<oneNumber name="N"[^>]*>\s*(\d+)\s*<')
        self.done_marker = f'device="{device}" name="START" state="Ok"'.encode()
        self.expected = expected
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.last_seq = 0
        self.first_t: float | None = None
        self.last_t: float | None = None
        self.done = False

    def scan(self, data: bytes, cut: tuple[bytes, bytes, bytes], now: float) -> None:
        """Count in `data`, a chunk just read; `cut` is (end of the previous chunk, start of this
        one, the two joined), for what was cut in two between them. Never `previous + data`:
        copying every chunk took half of a client's time in a BLOB flood."""
        marker = self.marker
        n = data.count(marker) + _straddling(marker, cut)
        if n > 0:
            self.count += n
            self.last_t = now
            if self.first_t is None:
                self.first_t = now
            for text in (data, cut[2]):
                seq = self._last_seq(text)
                if seq:
                    self.last_seq = max(self.last_seq, seq)
                    break
        if not self.done:
            if data.count(self.done_marker) + _straddling(self.done_marker, cut) > 0:
                self.done = True
            elif self.expected and self.count >= self.expected:
                self.done = True

    def _last_seq(self, text: bytes) -> int:
        pos = len(text)
        while pos > 0:
            pos = text.rfind(self.marker, 0, pos)
            if pos < 0:
                break
            m = self.seq_re.match(text, pos)
            if m:
                return int(m[1])
        return 0

    def stats(self) -> dict[str, Any]:
        return {"device": self.device, "count": self.count, "last_seq": self.last_seq,
                "missing": max(0, self.last_seq - self.count), "first_t": self.first_t,
                "last_t": self.last_t, "done": self.done, "expected": self.expected}


def _straddling(marker: bytes, cut: tuple[bytes, bytes, bytes]) -> int:
    """Occurrences of `marker` begun in the previous chunk and ended in this one (a marker does
    not overlap itself, so these are what the join has beyond its two halves)."""
    tail, head, joined = cut
    return joined.count(marker) - tail.count(marker) - head.count(marker)


class Stream:
    """Everything one connection (or pipe) has received, scanned chunk by chunk."""

    def __init__(self, counters: list[Counter]):
        self.counters = counters
        self.tail = b""
        self.bytes = 0
        self.eof = False

    def feed(self, data: bytes, now: float) -> None:
        self.bytes += len(data)
        tail, head = self.tail, data[:TAIL]
        cut = (tail, head, tail + head)
        for counter in self.counters:
            counter.scan(data, cut, now)
        self.tail = data[-TAIL:] if len(data) >= TAIL else (tail + data)[-TAIL:]

    @property
    def done(self) -> bool:
        return self.eof or all(c.done for c in self.counters)

    def stats(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "eof": self.eof, "devices": [c.stats() for c in self.counters]}


# -- a group of client connections in one process --------------------------------------------------
@dataclass
class GroupSpec:
    host: str
    port: int
    clients: int  # sockets in this process
    hello: bytes  # sent by every socket once connected (getProperties, enableBLOB)
    ready: list[bytes]  # markers each socket must have seen before it counts as ready
    devices: list[str] = field(default_factory=list)  # devices counted
    blob: bool = False
    expected: int = 0  # per device
    ready_timeout: float = 60.0  # to connect every socket and see the ready markers on each


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=max(0.5, deadline - time.monotonic()))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _Conn:
    __slots__ = ("sock", "stream", "ready_buf", "ready")

    def __init__(self, sock: socket.socket, stream: Stream, ready: bool):
        self.sock = sock
        self.stream = stream
        self.ready_buf = b""
        self.ready = ready


class _Pending:
    """A connect under way (non-blocking), so that connected clients keep reading meanwhile."""

    __slots__ = ("index", "sock")

    def __init__(self, index: int, sock: socket.socket):
        self.index = index
        self.sock = sock


MAX_CONNECTING = 32  # connects in flight at once per process


def group_main(spec: GroupSpec, pipe: multiprocessing.connection.Connection) -> None:
    """Child process: connect, get ready, then obey ("send", data), ("collect", ...), ("quit",).

    Sockets connect a few at a time while those already connected are read, as real clients
    would: a client that does not read makes a server queue for it, and that is another test.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the runner's: it tells us to quit
    sel = selectors.DefaultSelector()
    sel.register(pipe, selectors.EVENT_READ, None)
    conns: list[_Conn | None] = [None] * spec.clients
    to_connect = list(range(spec.clients - 1, -1, -1))  # popped from the end: 0 first
    connecting = 0
    connected = 0
    not_ready = spec.clients
    ready_deadline = time.monotonic() + spec.ready_timeout
    collecting: tuple[float, float, float] | None = None  # (t0, deadline, idle)
    last_data = time.monotonic()
    running = True
    ready_sent = False
    started = time.monotonic()

    def begin_connect(index: int) -> None:
        nonlocal connecting
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((spec.host, spec.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            raise OSError(err, os.strerror(err))
        sel.register(sock, selectors.EVENT_WRITE, _Pending(index, sock))
        connecting += 1

    def finish_connect(pending: _Pending) -> None:
        nonlocal connecting, connected, not_ready
        connecting -= 1
        sock = pending.sock
        sel.unregister(sock)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sock.close()
            if err in (errno.ECONNREFUSED, errno.ETIMEDOUT, errno.ECONNRESET, errno.EAGAIN):
                to_connect.append(pending.index)  # try again (until the deadline)
                return
            raise OSError(err, os.strerror(err))
        sock.sendall(spec.hello)  # a few hundred bytes: the socket buffer takes them
        counters = [Counter(d, spec.blob, spec.expected) for d in spec.devices]
        conn = _Conn(sock, Stream(counters), ready=not spec.ready)
        conns[pending.index] = conn
        connected += 1
        if conn.ready:
            not_ready -= 1
        sel.register(sock, selectors.EVENT_READ, conn)

    def read(conn: _Conn) -> None:
        nonlocal not_ready, last_data
        for _ in range(8):
            try:
                data = conn.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            now = time.monotonic()
            if not data:
                conn.stream.eof = True
                sel.unregister(conn.sock)
                if not conn.ready:
                    conn.ready = True  # never will be: count it, the runner sees the eof
                    not_ready -= 1
                return
            last_data = now
            conn.stream.feed(data, now)
            if not conn.ready:
                conn.ready_buf = (conn.ready_buf + data)[-65536:]
                if all(m in conn.ready_buf for m in spec.ready):
                    conn.ready = True
                    conn.ready_buf = b""
                    not_ready -= 1
            if len(data) < READ_SIZE:
                return

    def live() -> list[_Conn]:
        return [c for c in conns if c is not None]

    try:
        while running:
            while to_connect and connecting < MAX_CONNECTING:
                begin_connect(to_connect.pop())
            for key, _ in sel.select(0.05):
                if isinstance(key.data, _Pending):
                    finish_connect(key.data)
                    continue
                if key.data is not None:
                    read(key.data)
                    continue
                try:
                    cmd = pipe.recv()
                except EOFError:
                    running = False
                    break
                first = conns[0]
                if cmd[0] == "quit":
                    running = False
                elif cmd[0] == "send" and first is None:
                    pipe.send(("error", "the first client never connected"))
                elif cmd[0] == "send" and first is not None:
                    first.sock.setblocking(True)
                    t = time.monotonic()
                    first.sock.sendall(cmd[1])
                    first.sock.setblocking(False)
                    pipe.send(("sent", t))
                elif cmd[0] == "collect":
                    collecting = (cmd[1], cmd[2], cmd[3])
                elif cmd[0] == "reset":  # count afresh: the next measurement on the same sockets
                    for conn in live():
                        conn.stream.tail = b""
                        for counter in conn.stream.counters:
                            counter.reset()
                    pipe.send(("reset", 0))
            now = time.monotonic()
            if not ready_sent and ((connected == spec.clients and not_ready == 0) or now > ready_deadline):
                ready_sent = True
                for key in list(sel.get_map().values()):  # give up on connects still under way
                    if isinstance(key.data, _Pending):
                        sel.unregister(key.fileobj)
                        key.data.sock.close()
                to_connect.clear()
                connecting = 0
                done = live()
                pipe.send(("ready", {"ready": sum(c.ready and not c.stream.eof for c in done),
                                     "eof": sum(c.stream.eof for c in done), "connected": len(done),
                                     "clients": spec.clients, "seconds": now - started}))
            if collecting is not None:
                t0, until, idle = collecting
                everything = all(c.stream.done for c in live())
                quiet = idle > 0 and now - max(last_data, t0) > idle
                if everything or now > until or quiet:
                    why = "done" if everything else ("deadline" if now > until else "idle")
                    pipe.send(("result", {"why": why, "t0": t0, "t_end": now,
                                          "streams": [c.stream.stats() for c in live()]}))
                    collecting = None
    except OSError as exc:
        pipe.send(("error", f"connect {spec.host}:{spec.port}: {exc} ({connected} of {spec.clients} "
                            "connected)"))
    finally:
        for c in live():
            c.sock.close()


class _ChildHandle:
    """A client process and the pipe the runner talks to it through."""

    def __init__(self, target: Any, *args: Any):
        self.pipe, child = _CTX.Pipe()
        self.proc = _CTX.Process(target=target, args=(*args, child), daemon=True)
        self.proc.start()
        child.close()

    def recv(self, timeout: float) -> tuple:
        if not self.pipe.poll(timeout):
            raise TimeoutError(f"client process {self.proc.pid} did not answer in {timeout:.0f} s")
        try:
            msg = self.pipe.recv()
        except EOFError:
            raise RuntimeError(f"client process {self.proc.pid} died (exit {self.proc.exitcode})") from None
        if msg[0] == "error":
            raise RuntimeError(msg[1])
        return msg

    def close(self) -> None:
        try:
            self.pipe.send(("quit",))
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.pipe.close()


class Group(_ChildHandle):
    """The runner's handle on one client process."""

    def __init__(self, spec: GroupSpec):
        self.spec = spec
        self.info: dict[str, Any] = {}  # its "ready" report
        super().__init__(group_main, spec)

    def send(self, data: bytes) -> float:
        self.pipe.send(("send", data))
        return float(self.recv(10)[1])

    def collect(self, t0: float, until: float, idle: float) -> None:
        self.pipe.send(("collect", t0, until, idle))

    def reset(self) -> None:
        self.pipe.send(("reset",))
        self.recv(10)


def spawn_groups(host: str, port: int, clients: int, procs: int, require_all: bool = True,
                 **kw: Any) -> list[Group]:
    """`clients` sockets spread over at most `procs` processes; waits until all are ready.

    Past `ready_timeout` the sockets not ready are given up: an error with `require_all`, else
    each group's `info` says how many connected and got ready.
    """
    procs = max(1, min(procs, clients))
    sizes = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    groups = [Group(GroupSpec(host, port, n, **kw)) for n in sizes]
    try:
        timeout = kw.get("ready_timeout", 60.0) + 10
        for group in groups:
            group.info = info = group.recv(timeout)[1]
            if require_all and info["ready"] != info["clients"]:
                raise RuntimeError(f"only {info['ready']} of {info['clients']} clients got ready in "
                                   f"{info['seconds']:.0f} s ({info['connected']} connected, "
                                   f"{info['eof']} closed by the server)")
    except BaseException:
        close_all(groups)
        raise
    return groups


def collect_all(groups: list[Group], t0: float, until: float, idle: float) -> list[dict[str, Any]]:
    """Every group's result: streams, and why it stopped (done, deadline or idle)."""
    for group in groups:
        group.collect(t0, until, idle)
    results = []
    for group in groups:
        results.append(group.recv(max(5.0, until - time.monotonic() + 10))[1])
    return results


def close_all(groups: list[Group]) -> None:
    for group in groups:
        group.close()


# -- round-trip latency -------------------------------------------------------------------------------
def latency_main(host: str, port: int, device: str, pipe: multiprocessing.connection.Connection) -> None:
    """Child process: one client pinging `device`'s PING property, one request at a time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sock = _connect(host, port, time.monotonic() + 30)
    except OSError as exc:
        pipe.send(("error", f"connect: {exc}"))
        return
    sock.sendall(get_properties(device))
    marker = f'<setNumberVector device="{device}" name="PING"'.encode()
    echo = re.compile(re.escape(marker) + rb'[^>]*>\s*<oneNumber name="T"[^>]*>\s*(\d+)\s*<')
    want = def_marker(device, "PING")
    buf = b""
    sock.settimeout(30)
    try:
        while want not in buf:
            data = sock.recv(READ_SIZE)
            if not data:
                raise OSError("server closed the connection")
            buf = (buf + data)[-65536:]
    except OSError as exc:
        pipe.send(("error", f"no PING definition: {exc}"))
        return
    pipe.send(("ready", {}))
    token = 0
    tail = b""
    while True:
        try:
            cmd = pipe.recv()
        except EOFError:
            break
        if cmd[0] != "ping":
            break
        count, timeout, budget = cmd[1], cmd[2], cmd[3]
        rtts: list[float | None] = []
        give_up = time.monotonic() + budget
        for _ in range(count):
            if time.monotonic() > give_up:
                break
            token += 1
            t = time.perf_counter()
            sock.sendall(ping(device, token))
            deadline = time.monotonic() + timeout
            got = False
            while not got:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
                try:
                    data = sock.recv(READ_SIZE)
                except TimeoutError:
                    break
                if not data:
                    pipe.send(("error", "server closed the connection"))
                    return
                scan = tail + data
                pos = scan.find(marker)
                while pos >= 0:
                    m = echo.match(scan, pos)
                    if m and int(m[1]) == token:
                        got = True
                        break
                    pos = scan.find(marker, pos + 1)
                tail = scan[-TAIL:] if not got else b""
            rtts.append(time.perf_counter() - t if got else None)
        pipe.send(("rtts", rtts))
    sock.close()


class Latency(_ChildHandle):
    def __init__(self, host: str, port: int, device: str):
        super().__init__(latency_main, host, port, device)
        self.recv(60)

    def ping(self, count: int, timeout: float, budget: float) -> list[float | None]:
        """Up to `count` round trips, one at a time, for at most about `budget` seconds."""
        self.pipe.send(("ping", count, timeout, budget))
        return list(self.recv(budget + timeout + 30)[1])


# -- no server: the driver piped straight into a reader -------------------------------------------------
def pipe_flood(device: str, count: int, blob_mb: float = 0.0, timeout: float = 60.0) -> dict[str, Any]:
    """The flood driver with its stdout read directly: the ceiling any server can reach.

    As through a server: getProperties, wait for the definitions, then START on its stdin.
    """
    argv = [sys.executable, str(BENCH / "flood_driver.py"), "--device", device]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None
    fd = proc.stdout.fileno()
    with contextlib.suppress(OSError):  # a bigger pipe: fewer, larger reads, as a server would do
        fcntl.fcntl(fd, F_SETPIPE_SZ, 1024 * 1024)
    stream = Stream([Counter(device, blob_mb > 0, count)])
    why = "deadline"
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    try:
        proc.stdin.write(get_properties())
        proc.stdin.flush()
        until = time.monotonic() + timeout
        seen = b""
        while def_marker(device) not in seen:
            if time.monotonic() > until or not sel.select(max(0.0, until - time.monotonic())):
                raise TimeoutError("the flood driver sent no definitions")
            data = os.read(fd, 65536)
            if not data:
                raise RuntimeError("the flood driver exited")
            seen += data
        t0 = time.monotonic()
        proc.stdin.write(start_flood(device, count, blob_mb))
        proc.stdin.flush()
        until = t0 + timeout
        while time.monotonic() < until:
            if not sel.select(max(0.0, until - time.monotonic())):
                continue
            data = os.read(fd, 1024 * 1024)
            if not data:
                why = "eof"
                break
            stream.feed(data, time.monotonic())
            if stream.done:
                why = "done"
                break
    finally:
        sel.close()
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    return {"why": why, "t0": t0, "t_end": time.monotonic(), "streams": [stream.stats()]}


# -- command line -----------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7624)
    parser.add_argument("--device", default="Flood1", help="a flood_driver.py device the server serves")
    parser.add_argument("--count", type=int, default=100_000, help="messages (or BLOBs) to flood")
    parser.add_argument("--blob-mb", type=float, default=0.0, help="flood BLOBs of this many MB")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 2, help="client processes")
    parser.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    parser.add_argument("--pings", type=int, default=0, help="then measure this many round trips")
    args = parser.parse_args()
    blob = args.blob_mb > 0
    hello = get_properties() + (enable_blob(args.device) if blob else b"")
    try:
        groups = spawn_groups(args.host, args.port, args.clients, args.procs, hello=hello,
                              ready=[def_marker(args.device)], devices=[args.device], blob=blob,
                              expected=args.count)
    except (RuntimeError, TimeoutError) as exc:
        print(f"clients: {exc}", file=sys.stderr)
        return 1
    try:
        t0 = groups[0].send(start_flood(args.device, args.count, args.blob_mb))
        results = collect_all(groups, t0, t0 + args.timeout, 10.0)
    finally:
        close_all(groups)
    for result in results:
        for stream in result["streams"]:
            for dev in stream["devices"]:
                span = (dev["last_t"] or t0) - t0
                rate = dev["count"] / span if span > 0 else 0.0
                print(f"{dev['device']}: {dev['count']}/{args.count} in {span:.3f} s = {rate:,.0f}/s, "
                      f"missing {dev['missing']}, {result['why']}")
    if args.pings:
        lat = Latency(args.host, args.port, args.device)
        try:
            rtts = [r for r in lat.ping(args.pings, 2.0, args.timeout) if r is not None]
        finally:
            lat.close()
        if rtts:
            print(f"round trip: p50 {statistics.median(rtts) * 1e3:.3f} ms, max {max(rtts) * 1e3:.3f} ms, "
                  f"{args.pings - len(rtts)} timed out")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        sys.exit(errno.EPIPE)
