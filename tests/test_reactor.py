"""The worker event loop's descriptor bookkeeping, on a real socket pair and a real epoll."""

from __future__ import annotations

import socket

from indibroker.workers.reactor import Reactor


def turn(reactor: Reactor) -> None:
    """One pass of the loop: run it until the first timer stops it."""
    reactor.call_later(0.05, reactor.stop)
    reactor.run()


def test_writer_removed_then_reader_added_on_the_same_fd() -> None:
    # What a remote bridge does on connect: wait for writability, drop the writer, read.
    a, b = socket.socketpair()
    reactor = Reactor()
    seen: list[str] = []
    try:
        reactor.set_writer(a.fileno(), lambda fd: seen.append(f"w{fd}"))
        turn(reactor)
        assert seen and seen[0] == f"w{a.fileno()}"
        reactor.set_writer(a.fileno(), None)
        reactor.add_reader(a.fileno(), lambda fd: seen.append(f"r{a.recv(10).decode()}"))
        seen.clear()
        b.send(b"x")
        turn(reactor)
        assert seen == ["rx"]  # read once, the writer never again
        reactor.forget(a.fileno())
        b.send(b"y")
        seen.clear()
        turn(reactor)
        assert seen == []
        reactor.add_reader(a.fileno(), lambda fd: seen.append(a.recv(10).decode()))  # again after forget
        turn(reactor)
        assert seen == ["y"]
    finally:
        reactor.close()
        a.close()
        b.close()


def test_one_handler_serves_many_descriptors() -> None:
    pairs = [socket.socketpair() for _ in range(5)]
    reactor = Reactor()
    got: dict[int, bytes] = {}

    sockets = {a.fileno(): a for a, _ in pairs}

    def read(fd: int) -> None:  # the same callable for every descriptor: the fd says which
        got[fd] = sockets[fd].recv(10)

    try:
        for a, _ in pairs:
            reactor.add_reader(a.fileno(), read)
        reactor.set_writer(pairs[0][0].fileno(), None)  # removing what is not there is a no-op
        for i, (_, b) in enumerate(pairs):
            b.send(str(i).encode())
        turn(reactor)
        assert got == {a.fileno(): str(i).encode() for i, (a, _) in enumerate(pairs)}
    finally:
        reactor.close()
        for a, b in pairs:
            a.close()
            b.close()
