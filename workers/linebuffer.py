"""Lines out of a byte stream read in arbitrary chunks: a driver's stderr, the FIFO, the control
socket, a lifeline's commands. Bounded: a line with no end in sight is cut at `max_line` bytes
and handed over as it is, so a peer that never sends a newline cannot grow our memory."""

from __future__ import annotations

__all__ = ["LineBuffer"]


class LineBuffer:
    __slots__ = ("_buf", "max_line")

    def __init__(self, max_line: int = 65536):
        self._buf = b""
        self.max_line = max_line

    def feed(self, data: bytes) -> list[bytes]:
        """The lines `data` completes (without their newline), oldest first."""
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        if len(self._buf) > self.max_line:
            lines.append(self._buf)
            self._buf = b""
        return lines

    def __len__(self) -> int:
        return len(self._buf)
