"""What every worker process shares: start-up from a JSON spec, the lifeline, signals, status.

The arbiter starts a worker as ``python -m indibroker.workers.<kind> '<json spec>'`` with the
runtime directory and the read end of a pipe in its environment. That pipe is the lifeline: EOF on
it means the arbiter has died (even by SIGKILL), and the worker exits at once after stopping what
it owns, so nothing is ever orphaned. The arbiter also writes commands down it, one JSON per line.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import zmq

from indibroker.broker.runtime import RuntimeDir, configure_logging, lifeline_fd, statusfile_write, touch_status
from indibroker.workers.backbone import Backbone
from indibroker.workers.reactor import Reactor

__all__ = ["Worker"]

log = logging.getLogger(__name__)

STATUS_INTERVAL = 5.0
DEFAULT_LIVENESS = 30.0  # seconds without a sign of life before the arbiter calls a worker hung


class Worker:
    """Base of the worker kinds: subclasses set `role`, build in `setup()`, stop in `shutdown()`."""

    role = "worker"
    backbone_role = "driver"

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.name: str = spec["name"]
        self.runtime = RuntimeDir.from_env()
        self.reactor = Reactor()
        self.ctx = zmq.Context()
        self._lifeline = lifeline_fd()
        self._command_buf = b""
        self._status_written: dict[str, Any] | None = None
        self._status_timer_due = False
        self.started = time.time()
        self.liveness = float(spec.get("liveness", DEFAULT_LIVENESS))
        self.orphaned = False  # the arbiter died: stop fast, reach no broker
        self.backbone = Backbone(
            self.reactor, self.ctx, self.runtime.broker_endpoint, self.backbone_role, self.name,
            self.on_backbone, self.owned_devices, self.interests, self.registered_again,
            instance=self.runtime.instance,
        )

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
        else:
            log.warning("unknown command %r", command)

    def status(self) -> dict[str, Any]:
        return {}

    # -- machinery --------------------------------------------------------------------------
    def status_changed(self) -> None:
        """Write the status file soon (coalesced: a burst of changes costs one write)."""
        if not self._status_timer_due:
            self._status_timer_due = True
            self.reactor.call_later(0.2, self._write_status)

    def _write_status(self) -> None:
        self._status_timer_due = False
        data = {"role": self.role, "name": self.name, "pid": os.getpid(), **self.status()}
        if data != self._status_written:
            self._status_written = data
            statusfile_write(self.runtime, self.name, data)

    def _sign_of_life(self) -> None:
        """Touch our status file: the arbiter kills a worker whose file goes stale (hung)."""
        touch_status(self.runtime, self.name)
        self.reactor.call_later(self.liveness / 3, self._sign_of_life)

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
        self._command_buf += chunk
        *lines, self._command_buf = self._command_buf.split(b"\n")
        for line in lines:
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
        if self._lifeline is not None:
            os.set_blocking(self._lifeline, False)
            self.reactor.add_reader(self._lifeline, lambda _fd: self._on_lifeline())
        self.reactor.on_signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the arbiter stops us in order on Ctrl-C
        self.setup()
        self._write_status()
        self.reactor.call_later(self.liveness / 3, self._sign_of_life)
        try:
            self.reactor.run()
        finally:
            self.shutdown()
            self.backbone.close()
            self.ctx.term()
        return 0

    @classmethod
    def main(cls, spec_json: str) -> int:
        spec = json.loads(spec_json)
        configure_logging(spec.get("name", cls.role))
        return cls(spec).run()
