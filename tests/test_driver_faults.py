"""A driver's botched write costs only the botched element: what it writes afterwards arrives,
and the log says what was skipped (indiserver 1.9.9, like indibroker before, swallowed every
later message silently while waiting for an end tag that never came)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from support import Broker, RawClient, is_, wait_until

DRIVERS = Path(__file__).parent / "drivers"


@pytest.mark.parametrize("mode, logged", [
    ("", "a new <defNumberVector> began inside it"),  # the next vector begins inside the cut one
    ("pause", "abandoned: no more of it for"),  # the cut one times out before anything follows
])
def test_good_output_after_a_truncated_element_arrives(tmp_path, mode, logged):
    config = tmp_path / "c.toml"
    config.write_text("driver_unfinished_timeout = 1.0\n")
    b = Broker("--config", str(config), "--exdriver", f"{sys.executable} {DRIVERS / 'truncating.py'} Cut {mode}",
               log_dir=tmp_path, runtime_dir=tmp_path / "run")
    with b:
        client = RawClient(b.port)
        client.send('<getProperties version="1.7"/>')
        client.wait_for(is_("defNumberVector", "Cut", "GOOD1"), 10)
        client.wait_for(is_("defNumberVector", "Cut", "GOOD2"), 5)
        assert client.count(name="HALF") == 0
        wait_until(lambda: logged in b.log(), 5, what=f"the log to say {logged!r}")
        line = next(line for line in b.log().splitlines() if logged in line)
        assert "unfinished <defNumberVector>" in line, line  # it names what was skipped
        rows = [r for r in b.status() if r["role"] == "driver"]
        assert rows[0]["state"] == "RUNNING" and rows[0]["restarts"] == 0
        client.close()
