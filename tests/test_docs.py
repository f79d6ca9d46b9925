"""The operator's docs say what the code does.

- docs/configuration.md documents every config key, and nothing else: each key's type is what
  `load_toml` accepts (and the wrong type is refused), its default is the code's, its flag exists
  and sets it; every `indibroker start` flag is documented.
- Every TOML example in docs/ and deploy/indibroker.toml passes `indibroker check-config`, and
  the examples made of known drivers start a real server that serves their devices.
- The Python driver example (docs/examples/) is served by `indibroker start --driver` and read
  with indi_getprop; the IPyServer script runs as its page says.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import alive, clients, free_port, getprop, is_, new_vector, port_open, process_tree, setprop, wait_until

from indibroker.broker import config as config_module
from indibroker.broker.cli import build_parser, config_from_args
from indibroker.broker.config import Config, DriverConfig, RemoteConfig, load_toml
from indibroker.broker.errors import ConfigError
from indibroker.broker.supervision import RestartPolicy

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
CONFIG_DOC = DOCS / "configuration.md"
HEADER = "| key | type | default | flag | meaning |"
SECTIONS = {"Top-level keys": "top", "[restart]": "restart", "[[driver]]": "driver", "[[remote]]": "remote",
            "[write_rules]": "write_rules"}
# Config fields that are sections of the file, not top-level keys (or not in the file at all).
NOT_TOP_LEVEL = {"drivers", "remotes", "restart", "write_rules", "sources"}
DEVICE = "Telescope Simulator"  # stands for `<device>` in [write_rules]

# Devices the examples' drivers define (executables: unless INDIDEV renames them).
SIMULATOR_DEVICES = {"indi_simulator_telescope": "Telescope Simulator", "indi_simulator_ccd": "CCD Simulator",
                     "indi_simulator_focus": "Focuser Simulator", "indi_simulator_dome": "Dome Simulator",
                     "indi_simulator_weather": "Weather Simulator"}
PYTHON_DEVICES = {"dew_heater:make_driver": "Dew Heater"}


# -- docs/configuration.md, read ----------------------------------------------------------------
@dataclass
class Row:
    section: str
    key: str
    type: str
    default: str
    flags: list[str]


def documented() -> dict[str, dict[str, Row]]:
    """The key tables of docs/configuration.md, by section."""
    out: dict[str, dict[str, Row]] = {name: {} for name in SECTIONS.values()}
    section = None
    for line in CONFIG_DOC.read_text().splitlines():
        if line.startswith("## "):
            section = SECTIONS.get(line[3:].strip())
        elif line.startswith("| key |"):
            assert line == HEADER, f"a key table's header must be {HEADER!r}, got {line!r}"
        elif section and line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert len(cells) == 5, f"a key row has five cells: {line}"
            key, kind, default, flags, _ = cells
            row = Row(section, key.strip("`"), kind, default, re.findall(r"`(-[-\w]+)`", flags))
            assert row.key not in out[section], f"{row.key} documented twice in {section}"
            out[section][row.key] = row
    return out


DOC = documented()
ROWS = [row for table in DOC.values() for row in table.values()]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


STRING_SAMPLES = {"host": "127.0.0.1", "log_level": "DEBUG", "python": "dew_heater:make_driver",
                  "fifo": "/tmp/indibroker-doc-fifo"}
SAMPLES = {  # documented type: (a value of that type, a value of another type)
    "integer": (3, "3"), "number": (2.5, "2.5"), "boolean": (False, "no"), "list of strings": (["10.0.0.0/8"], [1]),
    "string or list of strings": (["indi_simulator_ccd", "--some-arg"], 7), "table of strings": ({"X": "1"}, {"X": 1}),
    "table": ({"max_restarts": 3}, "3"),
}


def sample(row: Row) -> tuple[Any, Any]:
    if row.type == "string":
        return STRING_SAMPLES.get(row.key, "x"), 7
    assert row.type in SAMPLES, f"{row.section}.{row.key}: unknown documented type {row.type!r}"
    return SAMPLES[row.type]


def toml_for(row: Row, value: Any) -> str:
    line = f"{toml_value(value)}"
    if row.section == "top":
        return f"{row.key} = {line}\n"
    if row.section == "restart":
        return f"[restart]\n{row.key} = {line}\n"
    if row.section == "driver":
        needs = "" if row.key in ("command", "python") else 'command = "indi_simulator_ccd"\n'
        return f"[[driver]]\n{needs}{row.key} = {line}\n"
    if row.section == "remote":
        needs = "" if row.key == "host" else 'host = "observatory.local"\n'
        return f"[[remote]]\n{needs}{row.key} = {line}\n"
    assert row.key == "<device>", f"[write_rules] documents one row, <device>: got {row.key}"
    return f'[write_rules]\n"{DEVICE}" = {line}\n'


def landed(config: Config, row: Row) -> Any:
    """Where `row`'s value ends up in a loaded config."""
    if row.section == "top":
        return getattr(config, row.key)
    if row.section == "restart":
        return config.restart[row.key]
    if row.section == "remote":
        return getattr(config.remotes[0], row.key)
    if row.section == "write_rules":
        return config.write_rules[DEVICE]
    driver = config.drivers[0]
    if row.key == "command":
        return driver.argv
    if row.key == "python":
        return driver.argv[-1]
    return getattr(driver, row.key)


def _id(row: Row) -> str:
    return f"{row.section}.{row.key}"


# -- (1) the reference and the schema ---------------------------------------------------------
def test_every_key_of_the_schema_is_documented_and_no_other():
    def names(cls: type) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    assert set(DOC["top"]) == names(Config) - NOT_TOP_LEVEL
    assert set(DOC["restart"]) == names(RestartPolicy)
    assert set(DOC["driver"]) == names(DriverConfig) - {"argv"} | {"command", "python"}
    assert set(DOC["remote"]) == names(RemoteConfig)
    assert set(DOC["write_rules"]) == {"<device>"}


ANNOTATIONS = {"string": {"str", "str | None"}, "integer": {"int"}, "number": {"float"}, "boolean": {"bool"},
               "list of strings": {"list[str]"}, "table of strings": {"dict[str, str]"}, "table": {"dict[str, Any]"}}
SCHEMA = {"top": Config, "restart": RestartPolicy, "driver": DriverConfig, "remote": RemoteConfig}


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_a_documented_key_takes_its_documented_type(tmp_path, row):
    field = {f.name: f for f in dataclasses.fields(SCHEMA[row.section])}.get(row.key) \
        if row.section in SCHEMA else None
    if field is not None:  # what the schema declares (an integer is a number, but not the other way)
        assert str(field.type) in ANNOTATIONS.get(row.type, set()), f"{_id(row)}: {row.type!r} vs {field.type}"
    good, bad = sample(row)
    path = tmp_path / "key.toml"
    path.write_text(toml_for(row, good))
    assert landed(load_toml(path), row) == good
    if row.type == "string or list of strings":  # the string form too, split as a shell would
        path.write_text(toml_for(row, shlex.join(good)))
        assert landed(load_toml(path), row) == good
    path.write_text(toml_for(row, bad))
    with pytest.raises(ConfigError):
        load_toml(path)


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_a_documented_default_is_the_code_default(row, monkeypatch):
    defaults: dict[str, Any] = {"top": Config(), "restart": RestartPolicy(), "remote": RemoteConfig(host="h"),
                                "driver": DriverConfig(argv=["x"])}
    if row.key == "gateways":  # "1 on up to 3 cores, else half the cores, at most 4"
        for cpus, gateways in ((1, 1), (2, 1), (3, 1), (4, 2), (6, 3), (8, 4), (64, 4)):
            monkeypatch.setattr(config_module.os, "cpu_count", lambda n=cpus: n)
            assert config_module.default_gateways() == gateways, cpus
        return
    if row.section not in defaults:
        return  # [write_rules]: no default
    field = {f.name: f for f in dataclasses.fields(defaults[row.section])}.get(row.key)
    if field is None or field.default is field.default_factory is dataclasses.MISSING:
        return  # command, python (not fields), host (required): no default to compare
    code = getattr(defaults[row.section], row.key)
    if row.default == "none":
        assert code is None
    else:
        literal = re.match(r"`([^`]*)`", row.default)
        assert literal, f"{_id(row)}: default {row.default!r} is neither a `literal` nor none"
        assert tomllib.loads(f"v = {literal.group(1)}")["v"] == code


def _start_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["start"]


# Keys whose value needs others beside it to pass validation: key files (docs/hosts.md).
ENDPOINTS = {"hosts_endpoint": "tcp://127.0.0.1:7700", "join": "tcp://127.0.0.1:7700"}


@pytest.mark.parametrize("row", [r for r in ROWS if r.flags], ids=_id)
def test_a_documented_flag_exists_and_sets_its_key(row, tmp_path):
    start = _start_parser()
    for flag in row.flags:
        assert flag in start._option_string_actions, f"{_id(row)}: no flag {flag} in `indibroker start`"
        takes_value = start._option_string_actions[flag].nargs != 0
        if row.section not in ("top", "restart") or not takes_value:
            continue
        good, _ = sample(row)
        value = good[0] if isinstance(good, list) else good
        extra: list[str] = []
        if row.key in ENDPOINTS:
            from support import make_host_keys

            keys = make_host_keys(tmp_path)
            good = value = ENDPOINTS[row.key]
            extra = ["--keys", str(keys["server" if row.key == "hosts_endpoint" else "pier"]), "--host-name", "pier"]
        config = config_from_args(build_parser().parse_args(["start", flag, str(value), *extra]))
        assert landed(config, row) == (good if isinstance(good, list) else value), flag


def test_every_start_flag_is_documented():
    text = CONFIG_DOC.read_text()
    flags = [f for f in _start_parser()._option_string_actions if f not in ("-h", "--help")]
    missing = [f for f in flags if not re.search(r"`" + re.escape(f) + r"[` ]", text)]
    assert not missing, f"flags of `indibroker start` missing from docs/configuration.md: {missing}"


def test_links_between_pages_lead_somewhere():
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


# -- (2) every TOML example -------------------------------------------------------------------
def toml_examples() -> list[tuple[str, str]]:
    found = [(f"{page.name}#{i}", text) for page in sorted(DOCS.glob("*.md"))
             for i, text in enumerate(re.findall(r"```toml\n(.*?)```", page.read_text(), re.DOTALL), 1)]
    return [*found, ("deploy/indibroker.toml", (ROOT / "deploy" / "indibroker.toml").read_text())]


EXAMPLES_TOML = toml_examples()


def test_the_pages_have_toml_examples():
    pages = {name.split("#")[0] for name, _ in EXAMPLES_TOML}
    assert {"quickstart.md", "configuration.md", "third-party-drivers.md", "python-drivers.md",
            "remote-trees.md", "security.md"} <= pages


@pytest.mark.parametrize("name, text", EXAMPLES_TOML, ids=[n for n, _ in EXAMPLES_TOML])
def test_a_toml_example_passes_check_config(tmp_path, name, text):
    path = tmp_path / "example.toml"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "indibroker", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and ": ok (" in result.stdout, f"{name}:\n{text}\n{result.stderr}"


def devices_served(text: str) -> set[str] | None:
    """The devices a TOML example's drivers define, or None if it cannot be served here alone
    (a remote server, a driver we do not know, a Python driver looked for elsewhere)."""
    data = tomllib.loads(text)
    if data.get("remote") or not data.get("driver"):
        return None
    devices = set()
    for driver in data["driver"]:
        env = driver.get("env", {})
        if "python" in driver:
            if driver["python"] not in PYTHON_DEVICES or "PYTHONPATH" in env:
                return None
            devices.add(PYTHON_DEVICES[driver["python"]])
            continue
        command = driver["command"]
        program = (shlex.split(command) if isinstance(command, str) else command)[0]
        if program not in SIMULATOR_DEVICES:
            return None
        devices.add(env.get("INDIDEV") or SIMULATOR_DEVICES[program])
    return devices


SERVABLE = [(name, text) for name, text in EXAMPLES_TOML
            if not name.startswith("deploy/") and devices_served(text)]  # deploy's: tests/test_config.py


def test_quickstart_and_configuration_examples_are_served():
    served = {name.split("#")[0] for name, _ in SERVABLE}
    assert {"quickstart.md", "configuration.md", "third-party-drivers.md"} <= served


@pytest.mark.usefixtures("indi_bin")
@pytest.mark.parametrize("name, text", SERVABLE, ids=[n for n, _ in SERVABLE])
def test_a_toml_example_serves_its_devices(broker_factory, tmp_path, name, text):
    path = tmp_path / "example.toml"
    path.write_text(text)
    home = tmp_path / "home"
    home.mkdir()
    expected = devices_served(text)
    assert expected
    b = broker_factory("--config", str(path), env={"HOME": str(home), "PYTHONPATH": str(EXAMPLES)})
    wait_until(lambda: expected <= {key.split(".")[0] for key in getprop(b.port)}, 40,
               what=f"the devices of {name}: {sorted(expected)}")


# -- (3) the Python driver example ------------------------------------------------------------
@pytest.mark.usefixtures("indi_bin")
def test_the_python_driver_example_is_served_and_answers(broker_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(EXAMPLES)  # as its page says: started from the directory that holds it
    b = broker_factory("--driver", "dew_heater:make_driver", env={"HOME": str(tmp_path)})
    props = wait_until(lambda: (p := getprop(b.port, "Dew Heater.*.*")) and len(p) == 3 and p, 30,
                       what="the dew heater's three properties")
    assert set(props) == {"Dew Heater.TEMPERATURE.TEMPERATURE", "Dew Heater.TARGET.TARGET",
                          "Dew Heater.POWER.POWER"}
    assert float(props["Dew Heater.TARGET.TARGET"]) == 5.0
    setprop(b.port, "Dew Heater.TARGET.TARGET=8")
    wait_until(lambda: getprop(b.port, "Dew Heater.TARGET.*").get("Dew Heater.TARGET.TARGET") == "8.0", 20,
               what="the new target read back")
    row = b.row("make_driver")
    assert row["state"] == "RUNNING" and row["devices"] == ["Dew Heater"]


@pytest.mark.usefixtures("indi_bin")
def test_the_ipyserver_example_script_serves_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(tmp_path)}
    with open(tmp_path / "script.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "dew_heater_server.py", str(port)], cwd=EXAMPLES, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    known = []
    try:
        wait_until(lambda: port_open(port) or proc.poll() is not None, 30, what="the script to listen")
        assert proc.poll() is None, (tmp_path / "script.log").read_text()
        wait_until(lambda: {"Dew Heater", "Telescope Simulator"} <= {k.split(".")[0] for k in getprop(port)}, 30,
                   what="the dew heater and the telescope")
        known = process_tree(proc.pid)
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(30) is not None
        wait_until(lambda: not alive(known), 10, what="every process of the script to end")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in alive(known):
            p.kill()


# -- what docs/security.md promises -----------------------------------------------------------
def test_a_read_only_client_cannot_change_anything(broker_factory):
    b = broker_factory("--read-only", "127.0.0.0/8")  # the demo driver: Thermostat and LED
    with clients(b.port, 1) as (c,):
        c.send('<getProperties version="1.7"/>')
        c.wait_for(is_("defSwitchVector", "LED", "LED_CONTROL"), 30)
        mark = len(c.elements)
        c.send(new_vector("Switch", "LED", "LED_CONTROL", {"LED_ON": "On"}))
        told = c.wait_for(lambda e: e.tag == "message" and "read-only" in (e.get("message") or ""), 10,
                          start=mark, what="a message saying this client is read-only")
        assert told is not None
    assert getprop(b.port, "LED.LED_CONTROL.*").get("LED.LED_CONTROL.LED_ON") == "Off"
