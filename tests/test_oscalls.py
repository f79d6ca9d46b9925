"""`oscalls.wait_exits`, what the arbiter stops its children with, on real (tiny) processes."""

from __future__ import annotations

import signal
import subprocess
import time

from indibroker.broker.oscalls import ForkedProcess, wait_exits


def test_wait_exits_reaps_as_they_go_and_returns_the_rest() -> None:
    quick = subprocess.Popen(["sh", "-c", "exit 3"])
    slow = subprocess.Popen(["sleep", "30"])
    procs = [ForkedProcess(quick.pid), ForkedProcess(slow.pid)]  # reaped by wait_exits, not Popen
    gone: list[ForkedProcess] = []
    try:
        started = time.monotonic()
        stuck = wait_exits(procs, 0.3, gone.append)
        assert stuck == [procs[1]] and gone == [procs[0]]
        assert procs[0].returncode == 3
        assert time.monotonic() - started < 2.0
        slow.send_signal(signal.SIGKILL)
        assert wait_exits(stuck, None, gone.append) == []
        assert procs[1].returncode == -signal.SIGKILL and gone == procs
    finally:
        slow.kill()
