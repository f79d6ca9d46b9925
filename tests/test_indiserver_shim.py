"""The indiserver command-line shim: indiserver's options and arguments, served by indibroker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest
from support import IndiServer, alive, free_port, getprop, port_open, process_tree, wait_until

pytestmark = pytest.mark.usefixtures("indi_bin")


def start_shim(tmp_path, *args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    log = open(tmp_path / "shim.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "indibroker.shims.indiserver", "-p", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(tmp_path)})
    wait_until(lambda: port_open(port) or proc.poll() is not None, 20, what="the shim to listen")
    assert proc.poll() is None, (tmp_path / "shim.log").read_text()
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    procs = process_tree(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    wait_until(lambda: not alive(procs), 10, what="no process left")


def test_indiserver_command_line_serves_drivers_and_remotes(tmp_path):
    with IndiServer("indi_simulator_focus", extra=("-u", f"/tmp/indiserver-shim-{os.getpid()}")) as upstream:
        proc, port = start_shim(tmp_path, "-r", "2", "-m", "64", "-d", "4", "-v",
                                "indi_simulator_telescope", f"@127.0.0.1:{upstream.port}")
        try:
            wait_until(lambda: (p := getprop(port)) and "Telescope Simulator.CONNECTION.CONNECT" in p
                       and "Focuser Simulator.CONNECTION.CONNECT" in p, 30, what="the driver and the remote's device")
            gateways = [p for p in process_tree(proc.pid) if p.name().startswith("ib-gateway")]
            listening = {c.laddr.ip for g in gateways for c in g.net_connections("tcp")
                         if c.status == psutil.CONN_LISTEN}
            assert listening == {"0.0.0.0"}  # as indiserver: every interface
        finally:
            stop(proc)


def test_indiserver_command_line_needs_a_driver_or_fifo(tmp_path):
    result = subprocess.run([sys.executable, "-m", "indibroker.shims.indiserver", "-p", str(free_port())],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "no drivers given" in result.stderr
