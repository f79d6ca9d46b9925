"""A byte-accounted output queue for one non-blocking socket or pipe.

Shared by a gateway's clients and an exdriver's driver stdins. The byte count is a running counter
(cost per message does not depend on the backlog), the same bytes object can sit in many queues
(one read feeds many writes), and a flush hands many queued messages to one `writev` call.
"""

from __future__ import annotations

import os
from collections import deque

__all__ = ["OutQueue"]

_BATCH = 256  # buffers per writev (well under IOV_MAX)


class OutQueue:
    __slots__ = ("_chunks", "bytes", "written")

    def __init__(self) -> None:
        self._chunks: deque[bytes | memoryview] = deque()
        self.bytes = 0  # queued, not yet written
        self.written = 0

    def __bool__(self) -> bool:
        return self.bytes > 0

    def backlog(self) -> int:
        """Bytes queued beyond the message being written now: how far behind the peer really is
        (a client reading one 10 MB BLOB at full speed is not behind by 10 MB)."""
        return self.bytes - len(self._chunks[0]) if self._chunks else 0

    def push(self, data: bytes | memoryview) -> None:
        if data:
            self._chunks.append(data)
            self.bytes += len(data)

    def clear(self) -> None:
        self._chunks.clear()
        self.bytes = 0

    def flush(self, fd: int) -> bool:
        """Write what the fd takes now; True when the queue is empty. OSError means a dead peer."""
        chunks = self._chunks
        while chunks:
            if len(chunks) == 1:
                batch: list[bytes | memoryview] = [chunks[0]]
            else:
                batch = [chunks[i] for i in range(min(_BATCH, len(chunks)))]
            try:
                n = os.writev(fd, batch)
            except (BlockingIOError, InterruptedError):
                return False
            partial = n < sum(len(b) for b in batch)
            self.bytes -= n
            self.written += n
            while n:
                head = chunks[0]
                if n >= len(head):
                    n -= len(head)
                    chunks.popleft()
                else:
                    chunks[0] = memoryview(head)[n:]
                    n = 0
            if partial:
                return False  # the kernel took only part: wait for writability
        return True
