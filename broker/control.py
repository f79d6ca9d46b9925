"""The control socket: `indibroker status/stop/driver ...` talk to the arbiter through it.

A Unix stream socket in the private runtime directory (so only our user reaches it); one JSON
request line, one JSON reply line. Plain sockets, no ZeroMQ: the arbiter stays small. It is served
on the arbiter's event loop and never blocks it: a connection that has not sent its whole request
within `timeout` seconds is dropped, and so is one that has not read its whole reply within
`timeout` seconds of it being ready (the reply is written as the client reads it).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from indibroker.broker.errors import ControlError
from indibroker.workers.linebuffer import LineBuffer

if TYPE_CHECKING:  # the `indibroker status/stop/driver` commands import this module: no pyzmq for them
    from indibroker.workers.reactor import Reactor, Timer

__all__ = ["ControlServer", "ControlCall", "request", "driver_request"]

log = logging.getLogger(__name__)

MAX_REQUEST = 1024 * 1024
TIMEOUT = 5.0  # seconds for a request to arrive whole, and again for its reply to be read
ACCEPTS_PER_TURN = 16
ACCEPT_RETRY = 1.0  # seconds without accepting after accept() failed (out of descriptors)

Handler = Callable[[dict[str, Any]], dict[str, Any]]
ReplyHandler = Callable[[dict[str, Any]], None]  # the reply, or {"ok": False, "error": ...}


class _Connection:
    __slots__ = ("sock", "lines", "reply", "timer")

    def __init__(self, sock: socket.socket, timer: Timer):
        self.sock = sock
        self.lines = LineBuffer(MAX_REQUEST)
        self.reply = memoryview(b"")
        self.timer = timer


class ControlServer:
    def __init__(self, path: Path, handler: Handler, timeout: float = TIMEOUT):
        self.path = path
        self.handler = handler
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path.unlink(missing_ok=True)
        self.sock.bind(str(path))
        os.chmod(path, 0o600)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self._reactor: Reactor | None = None
        self._conns: dict[int, _Connection] = {}

    def attach(self, reactor: Reactor) -> None:
        self._reactor = reactor
        reactor.add_reader(self.sock.fileno(), self._accept)

    def _accept(self, _fd: int) -> None:
        reactor = self._reactor
        assert reactor is not None
        for _ in range(ACCEPTS_PER_TURN):  # level-triggered: the rest wait for the next turn
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: leave the listener alone for a while
                log.warning("control socket: cannot accept (%s); trying again in %g s", exc, ACCEPT_RETRY)
                reactor.forget(self.sock.fileno())
                reactor.call_later(ACCEPT_RETRY, self._listen_again)
                return
            sock.setblocking(False)
            fd = sock.fileno()
            self._conns[fd] = _Connection(sock, reactor.call_later(self.timeout, partial(self._expired, fd)))
            reactor.add_reader(fd, self._readable)

    def _listen_again(self) -> None:
        if self._reactor is not None and self.sock.fileno() >= 0:
            self._reactor.add_reader(self.sock.fileno(), self._accept)

    def _readable(self, fd: int) -> None:
        conn = self._conns[fd]
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(fd)
            return
        lines = conn.lines.feed(chunk)
        if not lines:
            return
        assert self._reactor is not None
        self._reactor.forget(fd)  # one request per connection: whatever follows it is ignored
        line = lines[0]
        if len(line) > MAX_REQUEST:
            log.warning("control socket: request over %d bytes dropped", MAX_REQUEST)
            self._close(fd)
            return
        reply = self._serve(line)
        conn.reply = memoryview(json.dumps(reply).encode() + b"\n")
        conn.timer.cancel()
        conn.timer = self._reactor.call_later(self.timeout, partial(self._expired, fd))
        self._writable(fd)

    def _serve(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
            return self.handler(request)
        except ValueError as exc:
            return {"ok": False, "error": f"bad request: {exc}"}
        except Exception as exc:  # a bug in one command must not take the arbiter down
            log.exception("control command failed")
            return {"ok": False, "error": f"internal error: {exc}"}

    def _writable(self, fd: int) -> None:
        conn = self._conns[fd]
        try:
            sent = conn.sock.send(conn.reply)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(fd)
            return
        conn.reply = conn.reply[sent:]
        if not conn.reply:
            self._close(fd)
        else:
            assert self._reactor is not None
            self._reactor.set_writer(fd, self._writable)

    def _expired(self, fd: int) -> None:
        conn = self._conns.get(fd)
        if conn is not None:
            log.warning("control socket: a client %s within %g s: dropped",
                        "did not read its reply" if conn.reply else "did not send a whole request",
                        self.timeout)
            self._close(fd)

    def _close(self, fd: int) -> None:
        conn = self._conns.pop(fd)
        conn.timer.cancel()
        if self._reactor is not None:
            self._reactor.forget(fd)
        conn.sock.close()

    def close(self) -> None:
        for fd in list(self._conns):
            self._close(fd)
        if self._reactor is not None:
            self._reactor.forget(self.sock.fileno())
        self.sock.close()
        self.path.unlink(missing_ok=True)


def driver_request(action: str, name: str, argv: list[str] | None = None,
                   env: dict[str, str] | None = None) -> dict[str, Any]:
    """The `driver` command (start, stop, restart; start with `argv` for a driver not yet known),
    as `indibroker driver` and the server device send it; the arbiter's `_driver_command`
    serves it, and the FIFO's lines too."""
    payload: dict[str, Any] = {"cmd": "driver", "action": action, "name": name}
    if argv:
        payload["argv"] = list(argv)
    if env:
        payload["env"] = dict(env)
    return payload


def _encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode() + b"\n"


def _decode(data: bytes) -> dict[str, Any]:
    """The reply of one request; ControlError if it is not one or says the command failed."""
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError("indibroker sent no valid reply") from None
    if not isinstance(reply, dict):
        raise ControlError("indibroker sent no valid reply")
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "command failed"))
    return dict(reply)


def request(path: Path, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one command to a running instance and return its reply (blocking: the commands)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(_encode(payload))
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise ControlError(f"cannot reach indibroker at {path}: {exc.strerror or exc}") from None
    return _decode(data)


class ControlCall:
    """One command sent from a worker's event loop, never blocking it: the arbiter serves the
    control socket on its own single-threaded loop and may at that moment be writing to this
    worker's lifeline, so a blocking request could deadlock the two. `on_reply` gets the reply,
    or ``{"ok": False, "error": ...}`` (unreachable, no valid reply within `timeout`)."""

    def __init__(self, reactor: Reactor, path: Path, payload: dict[str, Any], on_reply: ReplyHandler,
                 timeout: float = TIMEOUT):
        self.reactor = reactor
        self.on_reply = on_reply
        self.out = memoryview(_encode(payload))
        self.data = bytearray()
        self.sock: socket.socket | None = None
        self.finished = False
        self.timer = reactor.call_later(timeout, lambda: self._done(error="no reply in time"))
        try:  # out of descriptors (the host process's clients took them) is a failed call, no more
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.setblocking(False)
            self.sock.connect(str(path))  # a Unix socket connects at once, or not at all
        except OSError as exc:
            error = f"cannot reach indibroker: {exc.strerror or exc}"
            reactor.defer(lambda: self._done(error=error))
            return
        reactor.set_writer(self.sock.fileno(), self._writable)

    def _writable(self, fd: int) -> None:
        assert self.sock is not None
        try:
            self.out = self.out[self.sock.send(self.out):]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._done(error=str(exc))
            return
        if not self.out:
            self.reactor.set_writer(fd, None)
            self.reactor.add_reader(fd, self._readable)

    def _readable(self, fd: int) -> None:
        assert self.sock is not None
        try:
            chunk = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        self.data += chunk
        if b"\n" in chunk or not chunk:
            try:
                self._done(reply=_decode(bytes(self.data)))
            except ControlError as exc:
                self._done(error=str(exc))

    def _done(self, reply: dict[str, Any] | None = None, error: str = "") -> None:
        if self.finished:
            return  # already answered (the timer and the socket may both fire)
        self.finished = True
        self.timer.cancel()
        if self.sock is not None:
            self.reactor.forget(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self.on_reply(reply if reply is not None else {"ok": False, "error": error})
