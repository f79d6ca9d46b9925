"""One driver's OS process: spawned, read, written, watched, stopped and reaped.

A `DriverProcess` outlives the processes it runs (a restart runs a new one in the same object):
it spawns the driver in its own session with its three pipes (prefixed with `setpriv --pdeathsig
KILL` where util-linux has it, so a driver dies with its worker), hands what the driver writes on
stdout to its owner, logs what it writes on stderr line by line (and to the driver's own log file
when there is a log directory), writes its stdin through a bounded `OutStream`, kills a driver
that reads none of its waiting input for `hang_timeout`, and stops it (SIGTERM to its group, then
SIGKILL). What the output means, when to restart and what clients are told is the owner's
(workers/exdriver.py).

Every OS call it makes goes through one `ProcessCalls` object, so a test can hand in a fake that
spawns no process.
"""

from __future__ import annotations

import collections
import logging
import logging.handlers
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

from indibroker.broker.oscalls import pdeathsig_prefix, reap, signal_group
from indibroker.broker.ratelog import RateLimitedLog
from indibroker.broker.runtime import utc_formatter
from indibroker.workers.linebuffer import LineBuffer
from indibroker.workers.outstream import OutStream
from indibroker.workers.reactor import Reactor, Timer
from indibroker.workers.settings import DriverSettings

__all__ = ["DriverProcess", "ProcessCalls", "Child", "stop_all", "READ_SIZE", "BLOB_READ_SIZE",
           "STOP_TIMEOUT"]

log = logging.getLogger(__name__)
driver_log = logging.getLogger("indibroker.driver")

READ_SIZE = 32 * 1024  # per turn: a flooding driver cannot hold the loop longer than this takes
BLOB_READ_SIZE = 1024 * 1024  # per turn inside one big element: it is one message, read it briskly
STOP_TIMEOUT = 5.0  # after SIGTERM, how long a driver has to exit before SIGKILL
KILL_TIMEOUT = 1.0  # after SIGKILL, how long we wait before saying a driver survived it
WATCHDOG_PERIOD = 1.0  # how often a driver with waiting input is checked for progress
DRAIN_READS = 64  # reads of what a dead driver wrote last, at most
MAX_FDS = 16  # buffers a libindi driver passes with one message, at most
LOG_FILE_BYTES = 1024 * 1024
LOG_FILE_COUNT = 3


class Pipe(Protocol):
    def fileno(self) -> int: ...

    def close(self) -> None: ...


class Child(Protocol):
    """What the process part uses of a spawned driver (`subprocess.Popen` has it)."""

    @property
    def pid(self) -> int: ...

    @property
    def stdin(self) -> Pipe | None: ...

    @property
    def stdout(self) -> Pipe | None: ...

    @property
    def stderr(self) -> Pipe | None: ...


class SocketpairChild:
    """A driver started as indiserver starts it (1.9.7+): one end of a Unix socketpair is its
    stdin and its stdout, stderr a pipe. libindi drivers see a Unix socket and send each BLOB
    as a memory buffer (memfd) passed with SCM_RIGHTS beside its `attached="true"` oneBLOB,
    instead of encoding it in base64 (what they do on pipes)."""

    def __init__(self, popen: subprocess.Popen, ours: socket.socket):
        self.popen = popen
        self.pid = popen.pid
        self.stdin = ours  # our end, both ways
        self.stdout = ours
        self.stderr = popen.stderr


class ProcessCalls:
    """The OS calls of driver processes, in one place (tests replace it)."""

    def __init__(self) -> None:
        self._prefix: list[str] | None = None

    def which(self, program: str) -> str | None:
        return shutil.which(program)

    def spawn(self, argv: Sequence[str], env: dict[str, str]) -> Child:
        """Start `argv` in its own session, dying with us, on a socketpair (`SocketpairChild`)."""
        if self._prefix is None:
            self._prefix = pdeathsig_prefix()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            popen = subprocess.Popen(
                [*self._prefix, *argv], stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=subprocess.PIPE,
                env={**os.environ, **env}, start_new_session=True, close_fds=True, bufsize=0)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        assert popen.stderr is not None
        os.set_blocking(popen.stderr.fileno(), False)
        return SocketpairChild(popen, ours)

    def poll(self, child: Child) -> int | None:
        """The exit code once `child` has exited (reaping it), else None."""
        popen = child.popen if isinstance(child, SocketpairChild) else child
        assert isinstance(popen, subprocess.Popen)
        return reap(popen)

    def signal_group(self, pid: int, sig: int) -> bool:
        return signal_group(pid, sig)

    def read(self, fd: int, size: int) -> bytes:
        return os.read(fd, size)

    def receive(self, stream: Pipe, size: int) -> tuple[bytes, list[int]]:
        """What the driver wrote, and the descriptors it passed with it (a socketpair's
        SCM_RIGHTS: its BLOBs' memory buffers, in order); a pipe passes none."""
        if isinstance(stream, socket.socket):
            data, fds, _flags, _addr = socket.recv_fds(stream, size, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
            return data, fds
        return self.read(stream.fileno(), size), []

    def wait(self, pids: Sequence[int], timeout: float) -> list[int]:
        """Wait up to `timeout` for every process in `pids` to exit (reaping them); returns
        those still alive."""
        import psutil  # only stopping needs it: keep it out of the arbiter's preloaded footprint

        procs = []
        for pid in pids:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        return [proc.pid for proc in alive]


class DriverProcess:
    """The OS process of one driver (none while it is stopped), and its pipes."""

    def __init__(self, spec: DriverSettings, reactor: Reactor, calls: ProcessCalls, warn: RateLimitedLog,
                 log_dir: Path | None, on_output: Callable[[bytes], None], read_size: Callable[[], int]):
        self.spec = spec
        self.name = spec.name
        self.reactor = reactor
        self.calls = calls
        self.on_output = on_output  # given each chunk of its stdout
        self.read_size = read_size  # how much to read of its stdout next
        self.child: Child | None = None
        self.started_wall: float | None = None
        self.stdin = OutStream(reactor, spec.queue_bytes, warn, ("not reading", spec.name), f"driver {spec.name}")
        self.reading = False  # its stdout is watched (not while paced, not after EOF)
        self.last_read = 0.0  # monotonic: when its stdout last gave bytes, or reading resumed
        self._stdout_open = False  # until EOF on it
        self._stderr = LineBuffer()
        self.buffers: collections.deque[int] = collections.deque()  # passed descriptors, in order
        self._hang_timer: Timer | None = None
        self._stuck_since: float | None = None  # since when its waiting input has not moved
        self._progress_mark = 0  # stdin.written when last checked
        self.file_log: logging.Logger | None = None
        if log_dir is not None:
            self.file_log = logging.getLogger(f"indibroker.driverfile.{spec.name}")
            self.file_log.propagate = False
            handler = logging.handlers.RotatingFileHandler(
                log_dir / f"{spec.name}.log", maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_COUNT,
                delay=True,  # opened at its first line: building a worker does no I/O
            )
            handler.setFormatter(utc_formatter("%(message)s"))  # the main log's format, UTC
            self.file_log.handlers[:] = [handler]
            self.file_log.setLevel(logging.INFO)

    @property
    def running(self) -> bool:
        return self.child is not None

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    # -- start and stop -----------------------------------------------------------------------
    def start(self) -> str | None:
        """Spawn the driver; None when it runs, else why it could not start. Its stdout is not
        read until the owner says so (`read_stdout`)."""
        argv = self.spec.argv
        if self.calls.which(argv[0]) is None:
            return f"cannot start: {argv[0]!r} not found on PATH"
        try:
            child = self.calls.spawn(argv, self.spec.env)
        except OSError as exc:
            return f"cannot start: {exc}"
        assert child.stdin is not None and child.stdout is not None and child.stderr is not None
        self.child = child
        self.started_wall = time.time()
        self.stdin.attach(child.stdin.fileno())
        self._stdout_open = True
        self.reading = False
        self._stuck_since = None
        self._stderr = LineBuffer()
        self.reactor.add_reader(child.stderr.fileno(), self._on_stderr)
        log.info("driver %s started (pid %d): %s", self.name, child.pid, " ".join(argv))
        return None

    def terminate(self) -> None:
        """An operator's stop: SIGTERM to its group now, SIGKILL if it is still there after
        STOP_TIMEOUT. Its exit is reported by `reap` as any other."""
        child = self.child
        if child is None:
            return
        self.calls.signal_group(child.pid, signal.SIGTERM)
        self.reactor.call_later(STOP_TIMEOUT, lambda: self._kill_if_still(child))

    def kill(self) -> None:
        """Drop a misbehaving driver at once: SIGKILL to its group; its exit is reported by
        `reap` as any other (a crash: it is restarted per its policy)."""
        if self.child is not None:
            self.calls.signal_group(self.child.pid, signal.SIGKILL)

    def _kill_if_still(self, child: Child) -> None:
        if self.child is child:
            log.warning("driver %s ignored SIGTERM: killing", self.name)
            self.calls.signal_group(child.pid, signal.SIGKILL)

    def reap(self) -> int | None:
        """Its exit code once it has exited (negative: the signal that killed it), else None."""
        return self.calls.poll(self.child) if self.child is not None else None

    def drain(self) -> None:
        """Hand on what a dead driver wrote last (its final messages still count)."""
        child = self.child
        if child is None or child.stdout is None or not self._stdout_open:
            return
        for _ in range(DRAIN_READS):
            try:
                data, fds = self.calls.receive(child.stdout, READ_SIZE)
            except OSError:
                return
            self.buffers.extend(fds)
            if not data:
                return
            self.on_output(data)

    def close(self) -> None:
        """After its exit: close its pipes and kill what is left of its session (grandchildren
        the driver started go with it)."""
        child = self.child
        if child is None:
            return
        self._close_pipes()
        self.calls.signal_group(child.pid, signal.SIGKILL)

    def _close_pipes(self) -> None:
        child = self.child
        assert child is not None
        self.stdin.detach()
        for stream in {id(s): s for s in (child.stdin, child.stdout, child.stderr) if s is not None}.values():
            self.reactor.forget(stream.fileno())  # (one socket is both stdin and stdout)
            stream.close()
        while self.buffers:  # buffers it passed that no message claimed
            os.close(self.buffers.popleft())
        self.child = None
        self.reading = False
        self._stdout_open = False
        if self._hang_timer is not None:
            self._hang_timer.cancel()
            self._hang_timer = None

    # -- stdout, stderr, stdin ----------------------------------------------------------------
    def read_stdout(self, on: bool) -> None:
        """Watch its stdout (`on`) or leave the driver waiting on its pipe (BLOB pacing)."""
        child = self.child
        reading = on and child is not None and self._stdout_open
        if reading == self.reading:
            return
        self.reading = reading
        assert child is not None and child.stdout is not None
        if reading:
            self.last_read = time.monotonic()  # its silence while we did not read is ours
            self.reactor.add_reader(child.stdout.fileno(), self._on_stdout)
        else:
            self.reactor.remove_reader(child.stdout.fileno())  # its stdin may still be written

    def _on_stdout(self, fd: int) -> None:
        assert self.child is not None and self.child.stdout is not None
        try:
            data, fds = self.calls.receive(self.child.stdout, self.read_size())
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("driver %s: stdout read failed: %s", self.name, exc)
            data, fds = b"", []
        self.buffers.extend(fds)
        if not data:
            # EOF: the driver is exiting (or closed stdout); SIGCHLD reports the exit.
            self.reactor.remove_reader(fd)
            self._stdout_open = False
            self.reading = False
            return
        self.last_read = time.monotonic()
        self.on_output(data)

    def _on_stderr(self, fd: int) -> None:
        try:
            data = self.calls.read(fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.reactor.forget(fd)
            return
        for raw in self._stderr.feed(data):
            line = raw.decode(errors="replace").rstrip()
            if line:
                driver_log.info("[%s] %s", self.name, line)
                if self.file_log is not None:
                    self.file_log.info("%s", line)

    def write(self, data: bytes) -> None:
        """Queue `data` for its stdin (dropped, and logged, past `queue_bytes`)."""
        if self.stdin.push(data) and self.stdin and self._hang_timer is None:
            self._hang_timer = self.reactor.call_later(WATCHDOG_PERIOD, self._watchdog)

    def _watchdog(self) -> None:
        """Kill a driver that has read none of its waiting input for `hang_timeout`."""
        self._hang_timer = None
        now = time.monotonic()
        stdin = self.stdin
        if self.child is None or not stdin or stdin.written != self._progress_mark:
            self._progress_mark = stdin.written
            self._stuck_since = now if self.child is not None and stdin else None
        elif self._stuck_since is not None and now - self._stuck_since > self.spec.hang_timeout:
            log.error("driver %s has not read its input for %.0f s: killing it", self.name, now - self._stuck_since)
            self._stuck_since = None
            self.calls.signal_group(self.child.pid, signal.SIGKILL)
        if stdin:
            self._hang_timer = self.reactor.call_later(WATCHDOG_PERIOD, self._watchdog)


def stop_all(processes: Iterable[DriverProcess], timeout: float) -> None:
    """Stop every running driver at once, blocking: SIGTERM to each group, up to `timeout` for
    them to exit, then SIGKILL to every group (what a driver started goes with it)."""
    running = [p for p in processes if p.child is not None]
    if not running:
        return
    calls = running[0].calls
    pids = {p.name: p.child.pid for p in running if p.child is not None}
    for pid in pids.values():
        calls.signal_group(pid, signal.SIGTERM)
    alive = calls.wait(list(pids.values()), timeout)
    for pid in pids.values():
        calls.signal_group(pid, signal.SIGKILL)
    survivors = set(calls.wait(alive, KILL_TIMEOUT)) if alive else set()
    for name, pid in pids.items():
        if pid in survivors:
            log.error("driver %s (pid %d) survived SIGKILL", name, pid)
    for p in running:
        p._close_pipes()
