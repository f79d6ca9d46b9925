"""Rate-limited log lines for what a peer can make repeat.

A driver spewing bad XML, a client flood, a descriptor table that stays full: each would write a
line per event, and a peer that can make us log without bound can fill a disk. A `RateLimitedLog`
writes the first occurrence of each key at once, then at most one line per interval, saying how
many occurrences the silence covered. Keys are what repeats (a driver's name, a client's address);
the table of keys is bounded, so a storm of distinct peers cannot grow it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable

__all__ = ["RateLimitedLog"]

MAX_KEYS = 4096


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: dict[Hashable, float] = {}
        self._suppressed: dict[Hashable, int] = {}
        self.total = 0  # every occurrence, logged or not

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Log `msg % args` unless `key` was logged less than `interval` ago; True if written.
        A written line says how many occurrences were silenced since the previous one."""
        self.total += 1
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        if len(self._last) >= MAX_KEYS and key not in self._last:
            self._forget_stale(now)
        self._last[key] = now
        silenced = self._suppressed.pop(key, 0)
        if silenced:
            msg += " (%d more like this in the last %.0f s)"
            args = (*args, silenced, now - last if last is not None else 0.0)
        self.logger.log(level, msg, *args)
        return True

    def warning(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def error(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.ERROR, key, msg, *args)

    def _forget_stale(self, now: float) -> None:
        for key, when in list(self._last.items()):
            if now - when >= self.interval and key not in self._suppressed:
                del self._last[key]
        if len(self._last) >= MAX_KEYS:  # all recent: forget the oldest half
            for key in sorted(self._last, key=self._last.__getitem__)[: MAX_KEYS // 2]:
                del self._last[key]
                self._suppressed.pop(key, None)
