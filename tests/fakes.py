"""The middle test tier: workers built in-process on a fake backbone, driven turn by turn.

A worker's reactor is turned by the test itself (`turn_until`), so a test waits on a condition,
never on a sleep, and no process is forked. What the worker sends the broker is recorded by
`FakeBackbone`; what the broker would send it, the test hands to `worker.on_backbone`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from indibroker.broker import wire
from indibroker.broker.config import Config
from indibroker.broker.runtime import RuntimeDir
from indibroker.workers.reactor import Reactor

T = TypeVar("T")


@dataclass
class Sent:
    verb: bytes
    device: str
    name: str
    flags: bytes
    payload: bytes


@dataclass
class FakeBackbone:
    """Records what a worker sends the broker (a `BackboneLink`)."""

    sent: list[Sent] = field(default_factory=list)
    # The worker's on_backbone: an ECHO is answered through it, as the broker answers one.
    worker: Callable[[bytes, str, str, bytes, bytes], None] | None = None
    interest_updates: int = 0
    hellos: int = 0
    closed: bool = False

    def send(self, verb: bytes, device: str = "", name: str = "", flags: bytes = b"",
             payload: bytes = b"") -> None:
        self.sent.append(Sent(verb, device, name, flags, bytes(payload)))
        if verb == wire.ECHO and self.worker is not None:
            self.worker(verb, device, name, flags, bytes(payload))

    def update_interests(self) -> None:
        self.interest_updates += 1

    def hello(self) -> None:
        self.hellos += 1

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def of(self, verb: bytes, device: str | None = None) -> list[Sent]:
        return [m for m in self.sent if m.verb == verb and (device is None or m.device == device)]


def runtime_dir(tmp_path: Path) -> RuntimeDir:
    """A runtime directory of its own (status files, connection slots), as an instance has."""
    runtime = RuntimeDir(tmp_path / "run", "test")
    runtime.status_dir.mkdir(parents=True)
    return runtime


def config() -> Config:
    """The default config: workers' settings come from it, as in a real start."""
    return Config(host="127.0.0.1", port=0)


def turn_until(reactor: Reactor, predicate: Callable[[], T], timeout: float = 5.0,
               what: str = "condition") -> T:
    """Turn the reactor until `predicate()` is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        reactor.turn(max_wait=0.01)
