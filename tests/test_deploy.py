"""deploy/install.sh installs a working service: its own environment (PEP 668 system Pythons
refuse pip), the config, the docs, and a unit that systemd accepts, pointing at the real command.
Installed into a scratch directory here (the script takes its paths from the environment)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: PEP 668 "externally managed" where the distribution says so


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("install")
    paths = {"PREFIX": base / "opt", "ETC_DIR": base / "etc", "UNIT_DIR": base / "units", "DOC_DIR": base / "doc"}
    python = SYSTEM_PYTHON if os.path.exists(SYSTEM_PYTHON) else shutil.which("python3") or "python3"
    env = {**os.environ, **{k: str(v) for k, v in paths.items()}, "NO_USER": "1", "NO_SYSTEMD": "1",
           "PYTHON": python}
    result = subprocess.run(["sh", str(ROOT / "deploy" / "install.sh")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return paths


def test_the_installed_command_runs_and_the_config_checks(installed):
    command = installed["PREFIX"] / "bin" / "indibroker"
    assert subprocess.run([command, "--version"], capture_output=True, text=True, timeout=60).stdout.startswith(
        "indibroker ")
    config = installed["ETC_DIR"] / "indibroker.toml"
    result = subprocess.run([command, "check-config", config], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (installed["DOC_DIR"] / "README.md").exists()


def test_the_unit_points_at_the_install_and_systemd_accepts_it(installed):
    unit = installed["UNIT_DIR"] / "indibroker.service"
    text = unit.read_text()
    assert f"ExecStart={installed['PREFIX']}/bin/indibroker start --config {installed['ETC_DIR']}/indibroker.toml" \
        in text
    assert "@" not in text.split("[Unit]", 1)[1]  # every placeholder filled
    assert "PrivateTmp=yes" not in text  # the managers' FIFO in /tmp must be the one the service reads
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.endswith("python -m pytest"))
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci, f"README's test command is not a line of .ci/run: {command}"


def test_the_readme_install_command_works_with_the_systems_python(tmp_path):
    """The README's install-and-run line, as written, with Debian's externally managed python3
    (PEP 668) as `python3`, into a fresh directory; `start` replaced by `--version` (it would
    stay in the foreground) and the apt-get step left out (python3-venv is installed here)."""
    readme = (ROOT / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.endswith("indibroker start") and "venv" in x)
    command = line.split(" && ", 1)[1]  # after `apt-get install -y python3-venv`
    assert command.startswith("python3 -m venv .venv")
    command = command.replace(".venv/bin/pip install .", f".venv/bin/pip install -q {ROOT}")
    command = command.replace(".venv/bin/indibroker start", ".venv/bin/indibroker --version")
    python = SYSTEM_PYTHON if os.path.exists(SYSTEM_PYTHON) else "python3"
    result = subprocess.run(["sh", "-c", command.replace("python3 -m venv", f"{python} -m venv", 1)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("indibroker ")
