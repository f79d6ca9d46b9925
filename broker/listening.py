"""The TCP port (and the local socket) clients connect to, bound by the first process before
anything heavy.

KStars connects the moment it has launched the server and, refused, forgets which server its
driver belongs to; the real indiserver listens about 2 ms after launch. So the arbiter binds and
listens first (this module needs only `socket`), before importing the workers' code and before
any driver starts: a connection that arrives early waits in the kernel's backlog, where a refused
one would not. Gateways inherit the listening descriptor and accept on it; they start accepting
once the drivers' workers have registered, so a client's first getProperties reaches its drivers.
Each gateway has a socket of its own on the port (SO_REUSEPORT), which the arbiter keeps: a
gateway that crashes finds its connections waiting in its backlog when it is restarted.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # this module is imported first thing: nothing it does not need at run time
    from collections.abc import Callable
    from typing import Any

__all__ = ["resolve_listen", "listen", "listen_local", "local_address", "BACKLOG", "INDI_PORT",
           "INDISERVER_LOCAL_SOCKET"]

BACKLOG = 512
INDI_PORT = 7624  # INDI's port: `Config.port`'s default and the indiserver shim's
INDISERVER_LOCAL_SOCKET = "/tmp/indiserver"  # indiserver's `-u` default (libindi clients' "localhost:")


def resolve_listen(host: str, port: int) -> tuple[socket.AddressFamily, tuple]:
    """The address to bind: IPv4 first for names like localhost, as indiserver binds."""
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                               socket.AI_PASSIVE)
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, _, _, _, addr = infos[0]
    return family, addr


def listen(host: str, port: int) -> socket.socket:
    """A listening, non-blocking socket; OSError (EADDRINUSE) if another server listens there.
    SO_REUSEPORT: the arbiter opens one per gateway on the same port, and the kernel spreads
    new connections over them (one socket shared by every gateway went mostly to one)."""
    family, addr = resolve_listen(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)

    def options() -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)

    return _bind_and_listen(sock, addr, options)


def local_address(path: str) -> str:
    """The unix socket address of a local socket named `path`: on Linux, as indiserver and
    libindi clients name it, in the abstract namespace (no file: nothing to clean up, nothing
    left behind by a crash); elsewhere, the file itself."""
    return "\0" + path if sys.platform.startswith("linux") else path


def listen_local(path: str) -> socket.socket:
    """indiserver's local socket (`-u`): libindi clients given "localhost:" or "localhost:/path"
    connect here and receive BLOBs as shared buffers. One socket, shared by every gateway.
    OSError (EADDRINUSE) if another server has it."""
    address = local_address(path)

    def remove_stale() -> None:
        if not address.startswith("\0") and os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)  # a dead server's socket file (never any other kind of file)

    return _bind_and_listen(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), address, remove_stale)


def _bind_and_listen(sock: socket.socket, address: Any, prepare: Callable[[], None]) -> socket.socket:
    """`prepare`, bind, listen: a non-blocking listening socket, or OSError with `sock` closed."""
    try:
        prepare()
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
