"""A byte-accounted output queue for one non-blocking socket or pipe.

Shared by a gateway's clients and an exdriver's driver stdins. The byte count is a running counter
(cost per message does not depend on the backlog), the same bytes object can sit in many queues
(one read feeds many writes), and a flush hands many queued messages to one `writev` call.
"""

from __future__ import annotations

import os
import time

__all__ = ["OutQueue"]

_BATCH = 256  # buffers per writev (well under IOV_MAX)


class OutQueue:
    """Chunks in a plain list with a moving head (a deque costs 600 bytes even when empty, and
    an idle connection should cost almost nothing); consumed slots are reclaimed in bulk."""

    __slots__ = ("_chunks", "_head", "bytes", "written", "moved")

    def __init__(self) -> None:
        self._chunks: list[bytes | memoryview] = []
        self._head = 0  # index of the first unwritten chunk
        self.bytes = 0  # queued, not yet written
        self.written = 0
        self.moved = time.monotonic()  # when the peer last took bytes (or the queue was made)

    def __bool__(self) -> bool:
        return self.bytes > 0

    def backlog(self) -> int:
        """Bytes queued beyond the message being written now: how far behind the peer really is
        (a client reading one 10 MB BLOB at full speed is not behind by 10 MB)."""
        return self.bytes - len(self._chunks[self._head]) if self.bytes else 0

    def push(self, data: bytes | memoryview) -> None:
        if data:
            self._chunks.append(data)
            self.bytes += len(data)

    def clear(self) -> None:
        self._chunks = []
        self._head = 0
        self.bytes = 0

    def flush(self, fd: int) -> bool:
        """Write what the fd takes now; True when the queue is empty. OSError means a dead peer."""
        chunks = self._chunks
        while self._head < len(chunks):
            head = self._head
            batch = chunks[head : head + _BATCH]
            try:
                n = os.writev(fd, batch)
            except (BlockingIOError, InterruptedError):
                return False
            # Whether the kernel took less than offered (`bytes` is what the queue holds, so the
            # common case of one batch holding it all needs no sum).
            partial = n < (self.bytes if head + _BATCH >= len(chunks) else sum(map(len, batch)))
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
                    chunks[head] = memoryview(first)[n:]
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
