"""The OS calls of supervision, in one place: start a child in its own session, signal its
group, wait for exits.

The arbiter forks its workers from itself (`fork_child`); exdriver workers start their drivers
with `spawn`, in a new session (so a process group can be killed whole) with only the
descriptors named in `pass_fds`, never with `preexec_fn`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

__all__ = ["spawn", "signal_group", "reap", "pdeathsig_prefix", "fork_child", "ForkedProcess",
           "Forker", "wait_exits", "keep_big_buffers"]

log = logging.getLogger(__name__)


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
BIG_BUFFER_BYTES = 32 * 1024 * 1024
KEEP_FREE_BYTES = 64 * 1024 * 1024


def keep_big_buffers() -> bool:
    """Let glibc reuse multi-MB buffers instead of mapping fresh pages for each.

    A process that moves BLOBs allocates a few MB per read and per message. Above glibc's mmap
    threshold every one is a fresh mapping, and the kernel faults in and zeroes each page (what
    that cost is in docs/architecture.md, Robustness). Blocks up to 32 MB now come from
    the heap, and up to 64 MB of freed heap is kept for the next ones (the cost: a process that
    has moved big BLOBs keeps up to that much after the burst). No-op without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, BIG_BUFFER_BYTES)
                    and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_BYTES))
    except (OSError, AttributeError):
        return False


def pdeathsig_prefix(signal_name: str = "KILL") -> list[str]:
    """`setpriv --pdeathsig KILL --`: the child dies with the process that started it (or is
    sent `signal_name`, say TERM for a child that must stop in order).

    util-linux's setpriv sets PR_SET_PDEATHSIG and execs the real program in the same process, so
    it costs nothing at run time. Without it we still clean up (stdin EOF, the arbiter's sweep).
    """
    path = shutil.which("setpriv")
    return [path, "--pdeathsig", signal_name, "--"] if path else []


def spawn(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    pipes: bool = False,
    cwd: str | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
) -> subprocess.Popen:
    """Start `argv` in a new session. With `pipes`, stdin/stdout/stderr are non-blocking pipes."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    if pipes:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=full_env, start_new_session=True, close_fds=True, pass_fds=tuple(pass_fds), cwd=cwd,
            bufsize=0,
        )
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            assert stream is not None
            os.set_blocking(stream.fileno(), False)
        return proc
    return subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=full_env,
        start_new_session=True, close_fds=True, pass_fds=tuple(pass_fds), cwd=cwd,
    )


class ForkedProcess:
    """The part of `subprocess.Popen` the arbiter uses, for a child made by `fork_child`."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


class Forker(Protocol):
    """`fork_child`'s signature: what the arbiter starts its workers with (a test's fake too)."""

    def __call__(self, target: Callable[[], int], env: Mapping[str, str], keep_fds: Sequence[int] = (),
                 name: str = "") -> ForkedProcess: ...


def wait_exits(procs: Sequence[ForkedProcess], timeout: float | None,
               on_exit: Callable[[ForkedProcess], None] = lambda proc: None) -> list[ForkedProcess]:
    """Wait until every one of `procs` has exited, or `timeout` seconds (None: no limit). Each
    that exits is reaped, gets its `returncode` and is handed to `on_exit` as it goes; returns
    those still running."""
    import psutil  # only stopping needs it: keep it out of the arbiter's idle footprint

    watched: dict[psutil.Process, ForkedProcess] = {}
    for proc in procs:
        if proc.poll() is not None:
            on_exit(proc)
            continue
        try:
            watched[psutil.Process(proc.pid)] = proc
        except psutil.NoSuchProcess:  # reaped by someone else already
            proc.returncode = -1
            on_exit(proc)

    def gone(process: psutil.Process) -> None:
        proc = watched[process]
        code = getattr(process, "returncode", None)
        proc.returncode = int(code) if code is not None else -1
        on_exit(proc)

    _gone, alive = psutil.wait_procs(list(watched), timeout=timeout, callback=gone)
    return [watched[process] for process in alive]


def fork_child(target: Callable[[], int], env: Mapping[str, str], keep_fds: Sequence[int] = (),
               name: str = "") -> ForkedProcess:
    """Fork a worker from this (preloaded) process and run `target` in it, in a new session.

    The parent must hold no ZeroMQ context and no thread; what it holds open (control socket,
    FIFO, its event loop's epoll and self-pipe) is closed in the child at once, so the child keeps
    only stdio and `keep_fds`, and its signals are back to their defaults.
    The child shares the parent's already-imported modules page for page until it writes to them,
    which is most of what a Python process costs.
    """
    pid = os.fork()
    if pid:
        return ForkedProcess(pid)
    code = 1
    try:
        os.setsid()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_IGN if signum == signal.SIGPIPE else signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        keep = sorted({0, 1, 2, *keep_fds})
        low = 3
        for fd in keep:
            if fd >= low:
                os.closerange(low, fd)
                low = fd + 1
        os.closerange(low, 65536)
        os.environ.update(env)
        if name:  # what ps and top show for this worker (argv stays the arbiter's)
            try:
                with open("/proc/self/comm", "w") as comm:
                    comm.write(name[:15])
            except OSError:
                pass
        code = target()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def signal_group(pid: int, sig: int) -> bool:
    """Signal the process group led by `pid` (falls back to the process). False if it is gone."""
    try:
        os.killpg(pid, sig)
        return True
    except ProcessLookupError:
        pass
    except PermissionError:
        log.warning("not allowed to signal group %d", pid)
        return False
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def reap(proc: subprocess.Popen) -> int | None:
    """Non-blocking: the exit code if `proc` has exited (negative: killed by that signal)."""
    try:
        return proc.poll()
    except ChildProcessError:
        return -1


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
