"""The control socket: `indibroker status/stop/driver ...` talk to the arbiter through it.

A Unix stream socket in the private runtime directory (so only our user reaches it); one JSON
request line, one JSON reply line. Plain sockets, no ZeroMQ: the arbiter stays small. Each
connection is served without blocking the arbiter's loop for long: a request must arrive whole
within a short time or the connection is dropped.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from indibroker.broker.errors import ControlError

__all__ = ["ControlServer", "request"]

log = logging.getLogger(__name__)

MAX_REQUEST = 1024 * 1024

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlServer:
    def __init__(self, path: Path, handler: Handler):
        self.path = path
        self.handler = handler
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path.unlink(missing_ok=True)
        self.sock.bind(str(path))
        os.chmod(path, 0o600)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self._sel: selectors.BaseSelector | None = None
        self._buffers: dict[socket.socket, bytes] = {}

    def register(self, sel: selectors.BaseSelector) -> None:
        self._sel = sel
        sel.register(self.sock, selectors.EVENT_READ, self._accept)

    def _accept(self) -> None:
        assert self._sel is not None
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        self._buffers[conn] = b""
        self._sel.register(conn, selectors.EVENT_READ, lambda c=conn: self._readable(c))

    def _readable(self, conn: socket.socket) -> None:
        try:
            chunk = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        data = self._buffers.get(conn, b"") + chunk
        if not chunk or len(data) > MAX_REQUEST:
            self._close(conn)
            return
        if b"\n" not in data:
            self._buffers[conn] = data
            return
        line = data.split(b"\n", 1)[0]
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
            reply = self.handler(request)
        except ValueError as exc:
            reply = {"ok": False, "error": f"bad request: {exc}"}
        except Exception as exc:  # a bug in one command must not take the arbiter down
            log.exception("control command failed")
            reply = {"ok": False, "error": f"internal error: {exc}"}
        try:
            conn.setblocking(True)
            conn.settimeout(2.0)
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass
        self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        self._buffers.pop(conn, None)
        if self._sel is not None:
            try:
                self._sel.unregister(conn)
            except (KeyError, ValueError):
                pass
        conn.close()

    def close(self) -> None:
        for conn in list(self._buffers):
            self._close(conn)
        self.sock.close()
        self.path.unlink(missing_ok=True)


def request(path: Path, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one command to a running instance and return its reply."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(payload).encode() + b"\n")
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise ControlError(f"cannot reach indibroker at {path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError("indibroker sent no valid reply") from None
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "command failed"))
    return dict(reply)
