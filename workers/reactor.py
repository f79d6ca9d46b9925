"""The one event loop of every process: file descriptors, ZeroMQ sockets, timers and signals.

The arbiter, the broker and every worker run on it. One thread, epoll, no busy polling: an idle
process sleeps until its next timer. Signals reach it through one self-pipe (`on_signal`). It
touches ZeroMQ only in `add_zmq`, so the arbiter (which must never hold a context) uses it too.
A ZeroMQ socket is watched through its edge-triggered `FD`, so after every pass the loop checks
`EVENTS` itself and never sleeps while a message is waiting.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import signal
import time
from collections.abc import Callable

import zmq

from indibroker.broker.transport import readable

__all__ = ["Reactor", "Timer"]

log = logging.getLogger(__name__)

Callback = Callable[[], None]


FdCallback = Callable[[int], None]  # called with the descriptor that is ready

_READ = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


class Timer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callback):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    def __init__(self) -> None:
        self._ep = select.epoll()
        # fd -> handler, epoll directly (no selector keys). Handlers get the fd, so a thousand
        # clients can share one bound method: an idle client's registration costs a dict entry.
        self._readers: dict[int, FdCallback] = {}
        self._writers: dict[int, FdCallback] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        # ZeroMQ sockets and their callbacks: usually one (a worker's DEALER, the broker's
        # ROUTER); the broker serving joined hosts also has their ROUTER, ZAP and monitor.
        self._zmq: tuple[tuple[zmq.Socket, Callback], ...] = ()
        self._stopped = False
        self._deferred: list[Callback] = []
        self._signals: list[int] = []
        self._signal_handlers: dict[int, Callable[[int], None]] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.add_reader(self._wake_r, self._drain_wakeup)

    # -- file descriptors -------------------------------------------------------------------
    def add_reader(self, fd: int, callback: FdCallback) -> None:
        self._set(self._readers, fd, callback)

    def remove_reader(self, fd: int) -> None:
        """Stop reading `fd`, leaving its writer (a socket written and read both ways)."""
        self._set(self._readers, fd, None)

    def set_writer(self, fd: int, callback: FdCallback | None) -> None:
        self._set(self._writers, fd, callback)

    def forget(self, fd: int) -> None:
        if self._mask(fd):
            self._readers.pop(fd, None)
            self._writers.pop(fd, None)
            try:
                self._ep.unregister(fd)
            except OSError:
                pass

    def _mask(self, fd: int) -> int:
        return (select.EPOLLIN if fd in self._readers else 0) | (select.EPOLLOUT if fd in self._writers else 0)

    def _set(self, table: dict[int, FdCallback], fd: int, callback: FdCallback | None) -> None:
        if callback is None and fd not in table:
            return  # the common no-op: a flushed client had no writer
        old = self._mask(fd)
        if callback is None:
            table.pop(fd, None)
        else:
            table[fd] = callback
        new = self._mask(fd)
        if new == old:
            return
        if not old:
            self._ep.register(fd, new)
        elif not new:
            try:
                self._ep.unregister(fd)
            except OSError:
                pass
        else:
            self._ep.modify(fd, new)

    # -- ZeroMQ sockets ---------------------------------------------------------------------
    def add_zmq(self, sock: zmq.Socket, callback: Callback) -> None:
        """`callback` must read what is waiting (a bounded batch is fine: it is called again)."""
        self._zmq = (*self._zmq, (sock, callback))
        self.add_reader(int(sock.getsockopt(zmq.FD)), lambda _fd: callback())

    def remove_zmq(self, sock: zmq.Socket) -> None:
        """Stop watching `sock` (call before closing it)."""
        if any(s is sock for s, _ in self._zmq):
            self.forget(int(sock.getsockopt(zmq.FD)))
            self._zmq = tuple((s, c) for s, c in self._zmq if s is not sock)

    def _zmq_ready(self) -> bool:
        return any(readable(sock) for sock, _ in self._zmq)

    # -- timers -----------------------------------------------------------------------------
    def call_later(self, delay: float, callback: Callback) -> Timer:
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def defer(self, callback: Callback) -> None:
        """Run `callback` at the end of this turn of the loop (flushes batched output)."""
        self._deferred.append(callback)

    def _run_deferred(self) -> None:
        while self._deferred:
            batch, self._deferred = self._deferred, []
            for callback in batch:
                callback()

    # -- signals ----------------------------------------------------------------------------
    def on_signal(self, signum: int, handler: Callable[[int], None]) -> None:
        """The OS handler only records the signal; `handler` runs later in the loop."""
        self._signal_handlers[signum] = handler
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signum, self._record_signal)

    def _record_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _drain_wakeup(self, _fd: int) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- the loop ---------------------------------------------------------------------------
    def stop(self) -> None:
        self._stopped = True

    def run(self) -> None:
        self._stopped = False
        while not self._stopped:
            self.turn()

    def turn(self, max_wait: float | None = None) -> None:
        """One turn of the loop: wait for events (at most `max_wait` seconds, None: until one
        comes or a timer is due), dispatch them, run the deferred callbacks, signals and due
        timers. `run()` turns until `stop()`; a test turns it by hand (tests/fakes.py)."""
        timeout = max_wait
        if self._zmq_ready() or self._signals or self._deferred:
            timeout = 0
        elif self._timers:
            due = max(0.0, self._timers[0][0] - time.monotonic())
            timeout = due if timeout is None else min(timeout, due)
        try:
            events = self._ep.poll(-1 if timeout is None else timeout)
        except InterruptedError:
            events = []
        readers, writers = self._readers, self._writers
        for fd, mask in events:
            if self._stopped:  # stopped by an earlier callback: accept nothing more
                return
            if mask & _READ:
                callback = readers.get(fd)
                if callback is not None:
                    callback(fd)
            if mask & _WRITE:
                callback = writers.get(fd)
                if callback is not None:
                    callback(fd)
        for sock, on_ready in self._zmq:  # edge-triggered FDs: what is still waiting is read now
            if readable(sock):
                on_ready()
        self._run_deferred()
        while self._signals:
            signum = self._signals.pop(0)
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                handler(signum)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.callback()
        self._run_deferred()

    def close(self) -> None:
        self._ep.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
