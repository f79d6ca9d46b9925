"""The rate-limited log: first line at once, then one per interval with the silenced count."""

import logging

from indibroker.broker.ratelog import MAX_KEYS, RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_one_line_then_one_per_interval_with_a_count(caplog):
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("t.ratelog"), interval=5.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="t.ratelog"):
        for _ in range(1000):
            limited.warning("driver-a", "driver %s sent bad XML", "a")
        clock.now = 5.0
        limited.warning("driver-a", "driver %s sent bad XML", "a")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["driver a sent bad XML", "driver a sent bad XML (999 more like this in the last 5 s)"]
    assert limited.total == 1001


def test_keys_are_limited_apart(caplog):
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("t.ratelog"), clock=clock)
    with caplog.at_level(logging.WARNING, logger="t.ratelog"):
        assert limited.warning("a", "x")
        assert limited.warning("b", "x")
        assert not limited.warning("a", "x")
    assert len(caplog.records) == 2


def test_the_key_table_stays_bounded():
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("t.ratelog.quiet"), clock=clock)
    logging.getLogger("t.ratelog.quiet").disabled = True
    for i in range(MAX_KEYS * 3):
        limited.warning(("client", i), "x")
    assert len(limited._last) <= MAX_KEYS
