"""Configuration: the example in deploy/ starts a real server; bad files fail with one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import getprop, wait_until

from indibroker.broker.config import load_toml
from indibroker.broker.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent / "deploy" / "indibroker.toml"


def test_example_config_loads_and_serves(broker_factory, indi_bin, tmp_path):
    config = load_toml(EXAMPLE)
    assert [d.argv[0] for d in config.drivers] == ["indi_simulator_telescope", "indi_simulator_ccd"]
    assert config.drivers[1].restart == {"max_restarts": 3}
    home = tmp_path / "home"
    home.mkdir()
    b = broker_factory("--config", str(EXAMPLE), env={"HOME": str(home)})  # --port overrides the file
    wait_until(lambda: {"Telescope Simulator", "CCD Simulator"} <= {k.split(".")[0] for k in getprop(b.port)},
               30, what="both drivers of the example config")


@pytest.mark.parametrize("text, expected", [
    ("prot = 7624\n", "prot: unknown key"),
    ('port = "7624"\n', "port: expected int"),
    ("[[driver]]\ncommand = \"x\"\nrestart = { max_restart = 3 }\n", "driver[0].restart.max_restart: unknown key"),
    ("[[driver]]\nname = \"x\"\n", "driver[0]: give exactly one of command"),
    ("[[remote]]\nport = 7624\n", "remote[0].host: missing"),
    ("port = \n", "indibroker.toml"),
])
def test_bad_config_is_one_clear_line_and_nothing_starts(tmp_path, text, expected):
    path = tmp_path / "indibroker.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_toml(path)
    result = subprocess.run([sys.executable, "-m", "indibroker", "start", "--config", str(path),
                             "--runtime-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], result.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
