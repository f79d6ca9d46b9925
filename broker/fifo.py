"""indiserver's `-f FIFO`: lines such as ``start indi_simulator_ccd -n "My CCD"`` at run time.

Tools built for indiserver (web driver managers) write exactly these lines. Options map to the
driver's environment as indiserver does: -n → INDIDEV, -c → INDICONFIG, -s → INDISKEL,
-p → INDIPREFIX. The FIFO is opened with a writer of our own kept open, so that a tool closing its
end never makes us spin on EOF.
"""

from __future__ import annotations

import logging
import os
import shlex
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from indibroker.broker.errors import ConfigError
from indibroker.broker.ratelog import RateLimitedLog
from indibroker.workers.linebuffer import LineBuffer

if TYPE_CHECKING:
    from indibroker.workers.reactor import Reactor

__all__ = ["FifoReader", "parse_line"]

log = logging.getLogger(__name__)
_warn = RateLimitedLog(log)  # whoever writes the FIFO can repeat a bad line

OPTION_ENV = {"-n": "INDIDEV", "-c": "INDICONFIG", "-s": "INDISKEL", "-p": "INDIPREFIX"}

LineHandler = Callable[[str, str, dict[str, str]], None]


def parse_line(line: str) -> tuple[str, str, dict[str, str]]:
    """``start|stop DRIVER [-n "name"] [-c "config"] [-s "skel"] [-p "prefix"]``; ValueError if not."""
    words = shlex.split(line)
    if len(words) < 2 or words[0] not in ("start", "stop"):
        raise ValueError(f"expected 'start|stop DRIVER [options]', got {line!r}")
    action, driver, rest = words[0], words[1], words[2:]
    env: dict[str, str] = {}
    while rest:
        option = rest.pop(0)
        if option not in OPTION_ENV or not rest:
            raise ValueError(f"bad option {option!r} in {line!r}")
        env[OPTION_ENV[option]] = rest.pop(0)
    return action, driver, env


class FifoReader:
    def __init__(self, path: str | Path, handler: LineHandler):
        self.path = Path(path)
        self.handler = handler
        if not self.path.exists():
            os.mkfifo(self.path, 0o600)
        else:
            # Whoever can write the FIFO can start any program as this service's user: in a shared
            # /tmp it must be ours (the managers make it as the user they run the server as), not
            # reached through a link, and not writable by every local user.
            st = self.path.lstat()
            if not stat.S_ISFIFO(st.st_mode):
                raise ConfigError(f"fifo {self.path}: exists and is not a FIFO")
            if st.st_uid != os.geteuid():
                raise ConfigError(f"fifo {self.path}: owned by uid {st.st_uid}, not by us (uid {os.geteuid()}): "
                                  f"another user could start any program through it")
            if st.st_mode & stat.S_IWOTH:
                raise ConfigError(f"fifo {self.path}: writable by every local user (mode "
                                  f"{stat.S_IMODE(st.st_mode):o}); chmod o-w it")
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._keep = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._lines = LineBuffer()
        self._reactor: Reactor | None = None

    def attach(self, reactor: Reactor) -> None:
        self._reactor = reactor
        reactor.add_reader(self.fd, self._readable)

    def _readable(self, _fd: int) -> None:
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        for raw in self._lines.feed(chunk):
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                action, driver, env = parse_line(line)
            except ValueError as exc:
                _warn.warning("bad line", "FIFO: %s", exc)
                continue
            log.info("FIFO: %s %s %s", action, driver, env or "")
            self.handler(action, driver, env)

    def close(self) -> None:
        if self._reactor is not None:
            self._reactor.forget(self.fd)
        os.close(self.fd)
        os.close(self._keep)
