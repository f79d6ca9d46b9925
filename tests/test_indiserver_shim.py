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
    if "-u" not in args:  # indiserver's default local socket is one per machine
        args = ("-u", f"/tmp/ib-shim-test-{port}", *args)
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


EXIT_NOW = os.path.join(os.path.dirname(__file__), "drivers", "exit_now.py")


def run_until_exit(tmp_path, *args: str, timeout: float = 30) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "indibroker.shims.indiserver", "-p", str(free_port()), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)})
    return proc.returncode, proc.stderr


def test_no_driver_left_ends_the_server_with_status_1_as_indiserver(tmp_path):
    code, stderr = run_until_exit(tmp_path, "-r", "0", EXIT_NOW)
    assert code == 1, stderr
    # KStars watches indiserver's stderr for exactly this, to offer the user a restart.
    assert f"Driver {EXIT_NOW}: Terminated after #0 restarts." in stderr


def test_restarts_are_said_as_indiserver_says_them(tmp_path):
    code, stderr = run_until_exit(tmp_path, "-r", "1", EXIT_NOW)
    assert code == 1
    lines = [line.split(": ", 1)[1] for line in stderr.splitlines() if f": Driver {EXIT_NOW}: " in line]
    assert lines == [f"Driver {EXIT_NOW}: restart #0", f"Driver {EXIT_NOW}: Terminated after #1 restarts."], stderr


def test_with_a_fifo_the_server_outlives_its_drivers(tmp_path):
    fifo = tmp_path / "indiFIFO"
    os.mkfifo(fifo, 0o600)
    proc, port = start_shim(tmp_path, "-r", "0", "-f", str(fifo), EXIT_NOW)
    try:
        wait_until(lambda: "Terminated after #0 restarts" in (tmp_path / "shim.log").read_text(), 20,
                   what="the driver given up")
        with open(fifo, "w") as writer:  # and drivers can still be started
            writer.write("start indi_simulator_focus\n")
        wait_until(lambda: "Focuser Simulator.CONNECTION.CONNECT" in getprop(port), 30, what="a driver started later")
        assert proc.poll() is None
    finally:
        stop(proc)


def test_a_driver_that_cannot_start_ends_the_server_with_status_1(tmp_path):
    code, stderr = run_until_exit(tmp_path, "-r", "0", "/nonexistent/fakedriver", timeout=20)
    assert code == 1
    assert "Driver /nonexistent/fakedriver: Terminated after #0 restarts." in stderr


def test_the_port_listens_before_any_driver_starts_and_the_first_client_sees_each_definition_once(tmp_path):
    """KStars connects the moment it has launched the server: the port must already listen (a
    refused first connection loses KStars its server), and what it asks first must reach the
    drivers, answered once."""
    import socket
    import time

    from support import RawClient, is_

    mark = tmp_path / "driver-started"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "indibroker.shims.indiserver", "-p", str(port),
                             "-u", f"/tmp/ib-shim-test-{port}",
                             os.path.join(os.path.dirname(__file__), "drivers", "started_marker.py")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path), "MARK_FILE": str(mark)})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "the shim never listened"
                time.sleep(0.001)
        assert not mark.exists(), "a driver ran before the port listened"
        sock.close()
        client = RawClient(port)
        client.send('<getProperties version="1.7"/>')
        client.wait_for(is_("defSwitchVector", "Marked", "CONNECTION"), 20)
        # A marker: the driver answers in order, so any second answer to the first question (or
        # its start-up definition arriving late) would come before this one's.
        client.send('<getProperties version="1.7" device="Marked"/>')
        wait_until(lambda: client.pump(0.1) >= 0 and client.count("defSwitchVector", "Marked") >= 2, 10,
                   what="the marker's definition")
        assert client.count("defSwitchVector", "Marked") == 2  # one per question: none twice
        client.close()
    finally:
        stop(proc)
