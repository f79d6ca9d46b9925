"""What every worker process shares: settings, the backbone, the lifeline, signals, status.

The arbiter forks a worker and calls `Worker.main(settings, inheritance)` in it, with the runtime
directory and the read end of a pipe in its environment. That pipe is the lifeline: EOF on it
means the arbiter has died (even by SIGKILL), and the worker exits at once after stopping what it
owns, so nothing is ever orphaned. The arbiter also writes commands down it, one JSON per line.

Building a worker does no I/O: joining the backbone is the explicit step `connect()` (`run()`
takes it), so a test builds a worker in-process, connects it to a fake backbone and drives its
reactor turn by turn (tests/fakes.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from indibroker.broker.hosts import JoinLink
from indibroker.broker.runtime import RuntimeDir, StatusFile, configure_logging, lifeline_fd
from indibroker.workers.backbone import Backbone, BackboneLink, MessageHandler
from indibroker.workers.linebuffer import LineBuffer
from indibroker.workers.reactor import Reactor
from indibroker.workers.settings import Inheritance, WorkerSettings
from indibroker.workers.traffic import set_log_level

__all__ = ["Worker"]

log = logging.getLogger(__name__)


class Worker:
    """Base of the worker kinds: subclasses set `role`, build in `setup()`, stop in `shutdown()`."""

    role = "worker"
    backbone_role = "driver"

    backbone: BackboneLink

    def __init__(self, settings: WorkerSettings, inheritance: Inheritance | None = None, *,
                 runtime: RuntimeDir | None = None, reactor: Reactor | None = None):
        self.settings = settings
        self.inheritance = inheritance or Inheritance()
        self.name = settings.name
        self.runtime = runtime or RuntimeDir.from_env()
        self.reactor = reactor or Reactor()
        self.ctx: zmq.Context | None = None
        self._lifeline = lifeline_fd() if runtime is None else None
        self._commands = LineBuffer()
        self.started = time.time()
        self.liveness = settings.liveness
        self._status_file = StatusFile(self.runtime, self.name, self._status_data, self.reactor, self.liveness)
        self.orphaned = False  # the arbiter died: stop fast, reach no broker
        self.exit_code = 0  # what `run()` returns (the arbiter reads it)
        self._psutil: dict[int, Any] = {}  # a joined host's report: psutil.Process per pid

    def connect(self, backbone: BackboneLink | None = None) -> None:
        """Join the backbone: the broker's (a ZeroMQ DEALER, saying HELLO at once), or the one
        given (a test's fake)."""
        if backbone is None:
            self.ctx = zmq.Context()
            link = JoinLink.from_env()  # a joined host's worker: the central broker, over TCP
            backbone = Backbone(
                self.reactor, self.ctx, self.runtime.broker_endpoint, self.backbone_role, self.name,
                self.on_backbone, self.owned_devices, self.interests, self.registered_again,
                instance=self.runtime.instance, link=link,
                report=self._host_report if link is not None else None,
            )
        self.backbone = backbone

    def guest_backbone(self, name: str, on_message: MessageHandler, devices: Callable[[], Iterable[str]],
                       registered_again: Callable[[], None]) -> BackboneLink:
        """A backbone connection of its own, in this process, for a guest that owns devices as a
        driver does (the server device, in the first gateway): same loop, same ZeroMQ context."""
        assert self.ctx is not None, "connect() first"
        return Backbone(self.reactor, self.ctx, self.runtime.broker_endpoint, "driver", name, on_message,
                        devices, lambda: [], registered_again, instance=self.runtime.instance)

    # -- for subclasses ---------------------------------------------------------------------
    def setup(self) -> None: ...

    def shutdown(self) -> None: ...

    def on_backbone(self, verb: bytes, device: str, name: str, flags: bytes, payload: bytes) -> None:
        ...

    def owned_devices(self) -> list[str]:
        return []

    def interests(self) -> list[tuple[str, str, int]]:
        return []

    def registered_again(self) -> None:
        """Called after this worker registered with a broker that did not know it (restarted)."""

    def on_command(self, command: dict[str, Any]) -> None:
        if command.get("cmd") == "hello":  # the arbiter restarted the broker: register at once
            self.backbone.hello()
            self.registered_again()
        elif command.get("cmd") == "loglevel":  # `indibroker loglevel`, the server device
            set_log_level(str(command.get("level", "INFO")))
        else:
            log.warning("unknown command %r", command)

    def status(self) -> dict[str, Any]:
        return {}

    # -- machinery --------------------------------------------------------------------------
    def status_changed(self) -> None:
        """Write the status file soon (coalesced: a burst of changes costs one write)."""
        self._status_file.changed()

    def _status_data(self) -> dict[str, Any]:
        return {"role": self.role, "name": self.name, "pid": os.getpid(), **self.status()}

    def _host_report(self) -> bytes:
        """What a joined host's worker tells the central broker with each heartbeat, for its
        `indibroker status`: this status, with CPU and memory of the worker and its drivers."""
        data = self._status_data()
        data.update(self._usage(data["pid"]), uptime=round(time.time() - self.started, 1))
        for driver in data.get("drivers", []):
            driver.update(self._usage(driver.get("pid")))
            if driver.get("started") and driver.get("pid"):
                driver["uptime"] = round(time.time() - driver["started"], 1)
        return json.dumps(data).encode()

    def _usage(self, pid: int | None) -> dict[str, Any]:
        import psutil

        if not pid:
            return {"cpu_percent": None, "rss": None}
        proc = self._psutil.get(pid)
        try:
            if proc is None:
                proc = self._psutil[pid] = psutil.Process(pid)
                proc.cpu_percent(None)  # the first reading is meaningless
            return {"cpu_percent": proc.cpu_percent(None), "rss": proc.memory_info().rss}
        except psutil.Error:
            self._psutil.pop(pid, None)
            return {"cpu_percent": None, "rss": None}

    def _on_lifeline(self) -> None:
        assert self._lifeline is not None
        try:
            chunk = os.read(self._lifeline, 65536)
        except BlockingIOError:
            return
        if not chunk:
            # Our instance is over: leave the backbone now (its endpoint may soon belong to a
            # new instance), then stop what we own quickly.
            log.warning("arbiter gone: %s stops", self.name)
            self.orphaned = True
            self.backbone.close()
            self.reactor.stop()
            return
        for line in self._commands.feed(chunk):
            if line.strip():
                try:
                    command = json.loads(line)
                except ValueError:
                    log.warning("bad command line from arbiter: %r", line[:80])
                    continue
                self.on_command(command)

    def _on_term(self, signum: int) -> None:
        log.info("%s stopping (signal %d)", self.name, signum)
        self.reactor.stop()

    def run(self) -> int:
        if not hasattr(self, "backbone"):
            self.connect()
        if self._lifeline is not None:
            os.set_blocking(self._lifeline, False)
            self.reactor.add_reader(self._lifeline, lambda _fd: self._on_lifeline())
        self.reactor.on_signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the arbiter stops us in order on Ctrl-C
        self.setup()
        self._status_file.start()  # written now, then kept fresh: the arbiter's sign of life
        try:
            self.reactor.run()
        finally:
            self.shutdown()
            self.backbone.close()
            if self.ctx is not None:
                self.ctx.term()
        return self.exit_code

    @classmethod
    def main(cls, settings: WorkerSettings, inheritance: Inheritance) -> int:
        configure_logging(settings.name)
        return cls(settings, inheritance).run()
