"""The lifecycle of every supervised process: workers (by the arbiter) and drivers (by their worker).

Pure logic with an injected clock: the owner performs the OS calls and reports what happened, the
state machine says what to do next. So it is tested without forking anything.

    STOPPED ──start──▶ STARTING ──spawned──▶ RUNNING ──exit──▶ BACKOFF ──delay──▶ STARTING ...
                                                   │                  └─too many─▶ FATAL
                                                   └──stop──▶ STOPPING ──exit──▶ STOPPED

Restarts back off exponentially up to a cap; a run longer than `stable_after` resets the count
(so a driver that crashes once a week is never given up on); `max_restarts` consecutive quick
failures, or the flapping policy, end in FATAL. An operator's stop is never counted as a crash.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from enum import Enum

__all__ = ["State", "RestartPolicy", "FlappingPolicy", "Lifecycle", "Decision"]


class State(Enum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    FATAL = "FATAL"


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 10  # consecutive restarts without a stable run; 0: never restart (indiserver -r 0)
    backoff_initial: float = 1.0
    backoff_factor: float = 2.0
    backoff_max: float = 30.0
    stable_after: float = 30.0
    flap_max_exits: int = 20
    flap_window: float = 600.0

    def delay(self, attempt: int) -> float:
        """Backoff before restart number `attempt` (0-based)."""
        try:
            return min(self.backoff_max, self.backoff_initial * self.backoff_factor ** attempt)
        except OverflowError:
            return self.backoff_max


class FlappingPolicy:
    """Too many crashes within a window, however long each run lasted, means give up."""

    def __init__(self, max_exits: int, window: float):
        self.max_exits = max_exits
        self.window = window
        self._exits: collections.deque[float] = collections.deque()

    def record(self, now: float) -> bool:
        """Record a crash at `now`; True when the process is flapping."""
        self._exits.append(now)
        while self._exits and now - self._exits[0] > self.window:
            self._exits.popleft()
        return self.max_exits > 0 and len(self._exits) >= self.max_exits

    def reset(self) -> None:
        self._exits.clear()


@dataclass(frozen=True)
class Decision:
    """What the owner must do after an exit."""

    action: str  # "restart", "fatal" or "stopped"
    delay: float = 0.0
    reason: str = ""


@dataclass
class Lifecycle:
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    state: State = State.STOPPED
    attempts: int = 0  # consecutive quick failures since the last stable run
    restarts: int = 0  # every restart after a crash, for status
    started_at: float | None = None
    last_exit: str = ""
    _flapping: FlappingPolicy | None = None

    def __post_init__(self) -> None:
        self._flapping = FlappingPolicy(self.policy.flap_max_exits, self.policy.flap_window)

    def start(self) -> None:
        # From STOPPED or FATAL (an operator's start forgives the past) or BACKOFF (timer fired).
        if self.state in (State.STOPPED, State.FATAL):
            self.attempts = 0
            assert self._flapping is not None
            self._flapping.reset()
        self.state = State.STARTING

    def spawned(self, now: float) -> None:
        self.state = State.RUNNING
        self.started_at = now

    def stop(self) -> bool:
        """An operator's stop. True when a process is running and must be signalled."""
        if self.state is State.STOPPING:
            return False  # already asked: its exit is still a stop, not a crash
        running = self.state in (State.RUNNING, State.STARTING)
        self.state = State.STOPPING if running else State.STOPPED
        return running

    def exited(self, now: float, how: str) -> Decision:
        self.last_exit = how
        ran = now - self.started_at if self.started_at is not None else 0.0
        self.started_at = None
        if self.state is State.STOPPING:
            self.state = State.STOPPED  # asked for: not a crash
            return Decision("stopped")
        if ran >= self.policy.stable_after:
            self.attempts = 0
        assert self._flapping is not None
        if self._flapping.record(now):
            self.state = State.FATAL
            return Decision("fatal", reason=f"flapping: {self.policy.flap_max_exits} exits within "
                                            f"{self.policy.flap_window:.0f} s")
        if self.attempts >= self.policy.max_restarts:
            self.state = State.FATAL
            return Decision("fatal", reason=f"gave up after {self.attempts} restart(s)")
        delay = self.policy.delay(self.attempts)
        self.attempts += 1
        self.restarts += 1
        self.state = State.BACKOFF
        return Decision("restart", delay=delay)
