"""The private runtime directory of one indibroker instance, and what every process reads from it.

One instance per port: ``$XDG_RUNTIME_DIR/indibroker/<port>`` (or ``/tmp/indibroker-<uid>/<port>``),
mode 0700, guarded by an exclusive lock on its pidfile so that a second `indibroker start` on the
same port fails loudly instead of stealing the backbone sockets. The broker and the workers learn
the directory from the environment the arbiter gives them, and keep their status there as small
JSON files (`StatusFile`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from indibroker.broker.errors import RuntimeDirBusy

__all__ = ["RuntimeDir", "StatusFile", "configure_logging", "lifeline_fd", "statusfile_write", "ENV_RUNTIME",
           "ENV_INSTANCE", "ENV_LIFELINE", "ENV_LOGLEVEL", "default_base", "touch_status", "status_age",
           "utc_formatter"]

TRACE = 5  # below DEBUG: every message's XML (-vvv; workers/traffic.py)
logging.addLevelName(TRACE, "TRACE")

ENV_RUNTIME = "INDIBROKER_RUNTIME"
ENV_INSTANCE = "INDIBROKER_INSTANCE"
ENV_LIFELINE = "INDIBROKER_LIFELINE"
ENV_LOGLEVEL = "INDIBROKER_LOGLEVEL"

log = logging.getLogger(__name__)


def default_base() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
        return Path(xdg) / "indibroker"
    return Path(f"/tmp/indibroker-{os.getuid()}")


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise RuntimeDirBusy(f"{path} is not a directory owned by us")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


@dataclass
class RuntimeDir:
    """The per-port directory (lock, control socket) and, inside it, one directory per instance
    (backbone socket, status files, connection slots), named by a token the arbiter draws at
    start. A killed instance's lingering workers keep the old token: the backbone endpoint they
    would reconnect to is gone, so they can never join, or write status into, the next instance."""

    path: Path
    instance: str = ""
    _lock_fd: int = -1

    @classmethod
    def for_port(cls, port: int, base: Path | None = None) -> RuntimeDir:
        return cls((base or default_base()) / str(port))

    @classmethod
    def from_env(cls) -> RuntimeDir:
        return cls(Path(os.environ[ENV_RUNTIME]), os.environ.get(ENV_INSTANCE, ""))

    def env(self) -> dict[str, str]:
        """What a child process needs to find this instance (`from_env` reads it back)."""
        return {ENV_RUNTIME: str(self.path), ENV_INSTANCE: self.instance}

    @property
    def instance_dir(self) -> Path:
        return self.path / f"run-{self.instance}" if self.instance else self.path

    @property
    def broker_endpoint(self) -> str:
        return f"ipc://{self.instance_dir / 'broker.sock'}"

    @property
    def control_path(self) -> Path:
        return self.path / "control.sock"

    @property
    def pidfile(self) -> Path:
        return self.path / "indibroker.pid"

    @property
    def status_dir(self) -> Path:
        return self.instance_dir / "status"

    @property
    def slots_dir(self) -> Path:
        return self.instance_dir / "slots"

    def acquire(self) -> None:
        """Create the directory and take its lock; raises RuntimeDirBusy if another instance has it."""
        _private_dir(self.path.parent)
        _private_dir(self.path)
        fd = os.open(self.pidfile, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeDirBusy(
                f"another indibroker holds {self.path} (pid {self.read_pid() or '?'})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        # Whatever a crashed predecessor left is stale now that we hold the lock.
        for entry in self.path.iterdir():
            if entry.name != self.pidfile.name:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        self.instance = self.instance or secrets.token_hex(4)
        _private_dir(self.instance_dir)
        _private_dir(self.status_dir)

    def release(self) -> None:
        """Remove the directory (we still hold the lock while doing so), then drop the lock."""
        if self._lock_fd < 0:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = -1
        try:
            self.path.parent.rmdir()  # only succeeds when no other instance lives beside us
        except OSError:
            pass

    def read_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def is_live(self) -> bool:
        """True when some process holds the lock (a running instance)."""
        try:
            fd = os.open(self.pidfile, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def read_status(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        try:
            entries = list(self.status_dir.iterdir())
        except OSError:
            return out
        for entry in entries:
            if entry.suffix == ".json":
                try:
                    out[entry.stem] = json.loads(entry.read_text())
                except (OSError, ValueError):
                    continue
        return out


def statusfile_write(runtime: RuntimeDir, name: str, data: dict[str, Any]) -> None:
    """Atomically replace this process's status file (read by `indibroker status`)."""
    target = runtime.status_dir / f"{name}.json"
    tmp = target.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(data))
        os.replace(tmp, target)
    except OSError as exc:
        log.debug("status file %s not written: %s", target, exc)


def touch_status(runtime: RuntimeDir, name: str) -> None:
    """A sign of life: the arbiter reads the status file's age."""
    try:
        os.utime(runtime.status_dir / f"{name}.json")
    except OSError:
        pass


class _Timers(Protocol):
    def call_later(self, delay: float, callback: Callable[[], None]) -> object: ...


class StatusFile:
    """One process's status file, as the broker and every worker keep it.

    Rewritten only when what it says has changed: `changed()` asks for a write soon, so a burst of
    changes costs one write. Every `liveness / 3` seconds it is refreshed (rewritten if its
    content changed unannounced, a counter say, else touched): the arbiter takes a file older
    than `liveness` for a hung process. No other timer: an idle process wakes only for that.
    """

    COALESCE = 0.2  # seconds between a change and its write

    def __init__(self, runtime: RuntimeDir, name: str, snapshot: Callable[[], dict[str, Any]],
                 timers: _Timers, liveness: float):
        self.runtime = runtime
        self.name = name
        self.snapshot = snapshot
        self.timers = timers
        self.liveness = liveness
        self._written: dict[str, Any] | None = None
        self._due = False

    def start(self) -> None:
        """Write the file now, and keep it fresh from now on."""
        self.write()
        self.timers.call_later(self.liveness / 3, self._refresh)

    def changed(self) -> None:
        """What the file says has changed: write it soon (coalesced)."""
        if not self._due:
            self._due = True
            self.timers.call_later(self.COALESCE, self.write)

    def write(self) -> None:
        """Write the file now if its content changed."""
        self._due = False
        self._write()

    def _write(self) -> bool:
        data = self.snapshot()
        if data == self._written:
            return False
        self._written = data
        statusfile_write(self.runtime, self.name, data)
        return True

    def _refresh(self) -> None:
        if not self._write():
            touch_status(self.runtime, self.name)  # a sign of life for the arbiter
        self.timers.call_later(self.liveness / 3, self._refresh)


def status_age(runtime: RuntimeDir, name: str) -> float | None:
    """Seconds since the process last wrote or touched its status file (None: no file yet)."""
    try:
        return time.time() - (runtime.status_dir / f"{name}.json").stat().st_mtime
    except OSError:
        return None


def lifeline_fd() -> int | None:
    """The read end of the arbiter's lifeline pipe: EOF on it means the arbiter has died."""
    value = os.environ.get(ENV_LIFELINE)
    return int(value) if value else None


class _UTCFormatter(logging.Formatter):
    converter = time.gmtime  # type: ignore[assignment]


def utc_formatter(fields: str) -> logging.Formatter:
    """The one timestamp format of every log indibroker writes (stderr and per-driver files):
    ISO 8601 in UTC with milliseconds, then `fields`."""
    return _UTCFormatter(f"%(asctime)s.%(msecs)03dZ {fields}", "%Y-%m-%dT%H:%M:%S")


def configure_logging(role: str, level: int | None = None) -> None:
    """One format for every process, UTC timestamps, tagged with the process role and pid."""
    if level is None:
        level = int(os.environ.get(ENV_LOGLEVEL, logging.INFO))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(utc_formatter(f"{role}[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
