"""A bounded output stream: what a worker writes to one peer that may stop reading.

A driver's stdin (workers/exdriver.py) and a remote server's socket (workers/remote.py) are
written the same way: messages are queued in an `OutQueue` (byte-accounted, one writev per
flush), written at once when the queue was empty, and otherwise when the reactor says the
descriptor is writable. The queue is bounded in bytes: a message that would take it past the
bound is dropped, with a rate-limited log line counting the drops, so a peer that stops reading
costs a bounded amount of memory and log and never blocks the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from indibroker.broker.ratelog import RateLimitedLog
from indibroker.workers.outqueue import OutQueue
from indibroker.workers.reactor import Reactor

__all__ = ["OutStream"]


class OutStream:
    """Output for one non-blocking descriptor, attached while the peer is there."""

    __slots__ = ("reactor", "limit", "queue", "fd", "dropped", "label", "_warn", "_key", "_on_error")

    def __init__(self, reactor: Reactor, limit: int, warn: RateLimitedLog, key: Hashable, label: str,
                 on_error: Callable[[OSError], None] | None = None):
        self.reactor = reactor
        self.limit = limit  # bytes queued at most
        self.queue = OutQueue()
        self.fd: int | None = None  # None: no peer, what is pushed goes nowhere
        self.dropped = 0  # messages dropped for the bound, ever
        self.label = label  # who the peer is, for the log ("driver X")
        self._warn = warn
        self._key = key
        self._on_error = on_error  # told of a write error, after the stream is cleared

    def __bool__(self) -> bool:
        return bool(self.queue)

    @property
    def queued(self) -> int:
        """Bytes queued, not yet written."""
        return self.queue.bytes

    @property
    def written(self) -> int:
        """Written since the stream was made (it moves while the peer reads)."""
        return self.queue.written

    def attach(self, fd: int) -> None:
        """A new peer on `fd`: nothing queued for an earlier one is kept."""
        self.detach()
        self.fd = fd

    def detach(self) -> None:
        """The peer is gone (call before its descriptor closes): drop what is queued."""
        if self.fd is not None:
            self.reactor.set_writer(self.fd, None)
            self.fd = None
        self.queue.clear()

    def push(self, data: bytes) -> bool:
        """Queue `data` and write what the peer takes now; False when it is dropped (no peer, or
        the bound would be passed)."""
        if self.fd is None:
            return False
        queue = self.queue
        if queue.bytes + len(data) > self.limit:
            self.dropped += 1
            self._warn.warning(self._key, "%s is not reading its input: %d message(s) dropped",
                               self.label, self.dropped)
            return False
        was_empty = not queue
        queue.push(data)
        if was_empty:
            self.flush()
        return True

    def flush(self) -> None:
        """Write what the peer takes; watch for writability while anything is left."""
        fd = self.fd
        if fd is None:
            return
        try:
            done = self.queue.flush(fd)
        except OSError as exc:  # the peer is gone: nothing queued can reach it
            self.queue.clear()
            self.reactor.set_writer(fd, None)
            if self._on_error is not None:
                self._on_error(exc)
            return
        self.reactor.set_writer(fd, None if done else self._writable)

    def _writable(self, _fd: int) -> None:
        self.flush()
