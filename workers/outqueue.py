"""A byte-accounted output queue for one non-blocking socket or pipe.

Shared by a gateway's clients and an exdriver's driver stdins. The byte count is a running counter
(cost per message does not depend on the backlog), the same bytes object can sit in many queues
(one read feeds many writes), and a flush hands many queued messages to one `writev` call. A
message with shared buffers for a local-socket client (`Attached`) goes on a `sendmsg` of its
own, its buffers' descriptors with its first byte (SCM_RIGHTS).
"""

from __future__ import annotations

import array
import os
import socket
import time
from collections.abc import Sequence

from indibroker.workers.sharedblob import SharedFd

__all__ = ["OutQueue", "Attached"]

_BATCH = 256  # buffers per writev (well under IOV_MAX)


class Attached:
    """A message and the shared buffers that go with it (this queue's hold on each)."""

    __slots__ = ("data", "buffers", "size")

    def __init__(self, data: bytes, buffers: Sequence[SharedFd]):
        self.data = data
        self.buffers = [b.hold() for b in buffers]
        self.size = sum(b.size for b in buffers)  # what the peer will read of them, for backlog

    def __len__(self) -> int:
        return len(self.data)

    def release(self) -> None:
        for buffer in self.buffers:
            buffer.release()
        self.buffers = []


def _send_attached(fd: int, chunk: Attached) -> int:
    sock = socket.socket(fileno=fd)
    try:
        return sock.sendmsg([chunk.data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            array.array("i", [b.fd for b in chunk.buffers]))])
    finally:
        sock.detach()


class OutQueue:
    """Chunks in a plain list with a moving head (a deque costs 600 bytes even when empty, and
    an idle connection should cost almost nothing); consumed slots are reclaimed in bulk."""

    __slots__ = ("_chunks", "_head", "bytes", "written", "moved", "held", "_attached")

    def __init__(self) -> None:
        self._chunks: list[bytes | memoryview | Attached] = []
        self._head = 0  # index of the first unwritten chunk
        self.bytes = 0  # queued, not yet written
        self.held = 0  # bytes of shared buffers queued with `Attached` messages, not yet passed
        self._attached = 0  # how many such messages are queued
        self.written = 0
        self.moved = time.monotonic()  # when the peer last took bytes (or the queue was made)

    @property
    def attached(self) -> int:
        """Messages with shared buffers queued."""
        return self._attached

    def __bool__(self) -> bool:
        return self.bytes > 0

    def backlog(self) -> int:
        """Bytes queued beyond the message being written now: how far behind the peer really is
        (a client reading one 10 MB BLOB at full speed is not behind by 10 MB)."""
        return self.bytes + self.held - len(self._chunks[self._head]) if self.bytes else 0

    def push(self, data: bytes | memoryview | Attached) -> None:
        if data:
            self._chunks.append(data)
            self.bytes += len(data)
            if type(data) is Attached:
                self.held += data.size
                self._attached += 1

    def clear(self) -> None:
        """Forget what is queued (giving up its shared buffers)."""
        for chunk in self._chunks[self._head:]:
            if type(chunk) is Attached:
                chunk.release()
        self._chunks = []
        self._head = 0
        self.bytes = 0
        self.held = 0
        self._attached = 0

    def flush(self, fd: int) -> bool:
        """Write what the fd takes now; True when the queue is empty. OSError means a dead peer."""
        chunks = self._chunks
        while self._head < len(chunks):
            head = self._head
            batch = chunks[head : head + _BATCH]
            attached = next((i for i, c in enumerate(batch) if type(c) is Attached), None) if self._attached else None
            if attached == 0:
                if not self._flush_attached(fd):
                    return False
                chunks = self._chunks
                continue
            if attached:
                batch = batch[:attached]  # up to the next message with buffers
            try:
                n = os.writev(fd, batch)  # type: ignore[arg-type]  # no Attached in it
            except (BlockingIOError, InterruptedError):
                return False
            # Whether the kernel took less than offered (`bytes` is what the queue holds, so the
            # common case of one batch holding it all needs no sum).
            partial = n < (self.bytes if head + _BATCH >= len(chunks) and attached is None
                           else sum(map(len, batch)))
            if n:
                self.moved = time.monotonic()
            self.bytes -= n
            self.written += n
            while n:
                first = chunks[head]
                if n >= len(first):
                    n -= len(first)
                    head += 1
                else:
                    chunks[head] = memoryview(first)[n:]  # type: ignore[arg-type]
                    n = 0
            self._head = head
            if head == len(chunks):
                self._chunks = chunks = []
                self._head = 0
            elif head > 1024 and head * 2 > len(chunks):
                del chunks[:head]  # reclaim written slots in bulk: amortised O(1) per chunk
                self._head = 0
            if partial:
                return False  # the kernel took only part: wait for writability
        return True

    def _flush_attached(self, fd: int) -> bool:
        """Send the head message with its buffers; False if the socket took nothing. OSError
        means a dead peer."""
        chunk = self._chunks[self._head]
        assert type(chunk) is Attached
        try:
            n = _send_attached(fd, chunk)
        except (BlockingIOError, InterruptedError):
            return False
        self.held -= chunk.size
        self._attached -= 1
        chunk.release()  # passed: the peer has its own descriptors now
        self.moved = time.monotonic()
        self.bytes -= n
        self.written += n
        if n < len(chunk.data):
            self._chunks[self._head] = memoryview(chunk.data)[n:]
        else:
            self._head += 1
            if self._head == len(self._chunks):
                self._chunks = []
                self._head = 0
        return True
