"""Configuration: the example in deploy/ starts a real server; bad files fail with one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import free_port, getprop, wait_until

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


def _start(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "indibroker", "start", "--runtime-dir", str(tmp_path / "run"),
                           *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("args, expected", [
    (("--gateways", "0"), "--gateways 0: expected at least 1"),
    (("--host", "nosuchhost.invalid"), "cannot resolve host 'nosuchhost.invalid'"),
    (("--exdriver", "indi_no_such_driver"), "executable 'indi_no_such_driver' not found on PATH"),
    (("-p", "70000"), "--port 70000: expected 1-65535"),
])
def test_bad_flags_are_one_clear_line_and_nothing_starts(tmp_path, args, expected):
    result = _start(tmp_path, *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("text, expected", [
    ('log_level = "verbose"\n', "log_level = 'verbose': expected one of TRACE, DEBUG, INFO"),
    ("hang_timeout = 0\n", "hang_timeout = 0: expected a number above 0"),
    ('[[driver]]\ncommand = "indi_no_such_driver"\n', "driver[0]: executable 'indi_no_such_driver' not found"),
])
def test_check_config_names_file_and_key_and_starts_nothing(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "indibroker", "check-config", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and expected in lines[0], result.stderr
    assert _start(tmp_path, "--config", str(path)).returncode == 1


def test_a_driver_that_may_appear_later_is_not_a_config_error(tmp_path):
    path = tmp_path / "later.toml"
    path.write_text('[[driver]]\ncommand = "indi_not_yet_installed"\nmay_appear_later = true\n')
    result = subprocess.run([sys.executable, "-m", "indibroker", "check-config", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_port_in_use_is_one_line(tmp_path):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        result = _start(tmp_path, "-p", str(holder.getsockname()[1]), "--host", "127.0.0.1")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot listen" in lines[0], result.stderr


def test_version_and_no_server_messages(tmp_path):
    run = [sys.executable, "-m", "indibroker"]
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("indibroker ")
    for command in ("status", "stop"):
        result = subprocess.run([*run, command, "-p", "1", "--runtime-dir", str(tmp_path / "run")],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 1 and result.stderr.strip() == "indibroker: no indibroker runs on port 1"


def test_a_fifo_other_users_could_write_is_refused(tmp_path):
    import os

    fifo = tmp_path / "indiFIFO"
    os.mkfifo(fifo, 0o600)
    os.chmod(fifo, 0o622)  # world-writable: anyone could start any program through it
    result = _start(tmp_path, "-f", str(fifo), "-p", str(free_port()), "--no-demo")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert "writable by every local user" in lines[-1], result.stderr


def test_python_drivers_sharing_a_factory_name_get_unique_names():
    from indibroker.broker.config import Config, DriverConfig

    config = Config()
    config.drivers = [DriverConfig.python("a:make_driver"), DriverConfig.python("b:make_driver"),
                      DriverConfig.python("c:make_driver", name="mine")]
    config.assign_names()
    assert [d.name for d in config.drivers] == ["make_driver", "make_driver-2", "mine"]
