"""Sending and receiving a batch of frames, without pyzmq's per-frame Python overhead.

pyzmq's `send_multipart`/`recv_multipart` spend most of their time per message on enum
arithmetic and a `getsockopt(RCVMORE)` per frame. These call the socket's compiled methods
(`zmq.backend.Socket`, not pyzmq's public API: pyproject.toml pins the measured range and
tests/test_transport.py fails loudly if they change) with integer flags. Frames of
`ZERO_COPY_BYTES` or more are sent without copying (a BLOB travels by reference into ZeroMQ;
below that a copy costs less than handing the frame to pyzmq's garbage-collector thread); the
broker receives frames without copying and passes them on as they are; workers take their input
as bytes (one copy, cheaper than a Frame object per small message). Figures: docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import zmq
from zmq.backend import Socket as _Compiled

__all__ = ["send_frames", "recv_frames", "readable", "ZERO_COPY_BYTES"]

ZERO_COPY_BYTES = 256 * 1024
_MORE = int(zmq.SNDMORE | zmq.DONTWAIT)
_LAST = int(zmq.DONTWAIT)
_RCVMORE = int(zmq.RCVMORE)
_NOWAIT = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_send = _Compiled.send
_recv = _Compiled.recv
_get = _Compiled.get


def send_frames(sock: zmq.Socket, frames: Sequence[bytes | zmq.Frame]) -> None:
    """Send one multipart message, never blocking; raises zmq.Again if the peer's queue is full
    (ZeroMQ queues a multipart message whole or not at all)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        copy = not isinstance(frame, zmq.Frame) and len(frame) < ZERO_COPY_BYTES
        _send(sock, frame, _MORE if i < last else _LAST, copy)  # type: ignore[arg-type]


def recv_frames(sock: zmq.Socket, copy: bool = False) -> list:
    """Receive one multipart message; raises zmq.Again when none is waiting. Without `copy`,
    frames (the broker passes them on untouched, a BLOB included); with it, bytes (cheaper per
    small message: workers, which use what they receive)."""
    frames = [_recv(sock, _NOWAIT, copy)]
    while _get(sock, _RCVMORE):
        frames.append(_recv(sock, 0, copy))
    return frames


def readable(sock: zmq.Socket) -> bool:
    """Whether a message is waiting (ZeroMQ's edge-triggered FD needs this after every call)."""
    return bool(int(_get(sock, _EVENTS)) & _POLLIN)
