"""Restart right after kill -9 of the top process (as INDI Web Manager does): the new instance
serves every device at once, and the old tree is gone within 2 s whatever its drivers do.

Before the fix, the old exdriver worker (still stopping a slow driver) reconnected to the new
broker's socket with the same identity and took its route: the new instance served nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import psutil
from support import Broker, IndiServer, RawClient, alive, free_port, member, wait_until

DRIVERS = Path(__file__).parent / "drivers"
SCRIPTS = Path(__file__).parent / "pyscripts"


def _serves(port: int, devices: set[str], timeout: float) -> None:
    """A client is sent the definitions of every one of `devices` within `timeout`. Right after
    a kill the old gateway may still hold the port for a few milliseconds and close what it
    accepted: the client then connects again, as KStars does."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while True:
        try:
            client = RawClient(port)
        except OSError:
            client = None
        if client is not None:
            try:
                client.send('<getProperties version="1.7"/>')
                while not devices <= seen and not client.closed and time.monotonic() < deadline:
                    client.pump(0.1)
                    seen = {e.get("device") for e in client.elements if e.tag.startswith("def")}
            except OSError:
                pass
            finally:
                client.close()
        if devices <= seen:
            return
        assert time.monotonic() < deadline, f"only {sorted(seen)} of {sorted(devices)} within {timeout} s"
        time.sleep(0.05)


def _kill9(broker: Broker) -> list[psutil.Process]:
    """SIGKILL the arbiter alone (its workers and drivers see it die); returns the old tree."""
    assert broker.proc is not None
    tree = broker.tree()
    os.kill(broker.proc.pid, signal.SIGKILL)
    broker.proc.wait()
    return tree


def test_restart_after_kill9_serves_both_devices_every_time(tmp_path):
    port = free_port()
    args = ("--exdriver", "indi_simulator_telescope",
            "--exdriver", f"{sys.executable} {DRIVERS / 'slow_exit.py'} Slow")
    run = tmp_path / "run"
    brokers: list[Broker] = []
    old_trees: list[psutil.Process] = []
    try:
        b = Broker(*args, port=port, log_dir=tmp_path, runtime_dir=run).start()
        brokers.append(b)
        _serves(port, {"Telescope Simulator", "Slow"}, 15)
        for round_ in range(10):
            old_trees += _kill9(b)
            logs = tmp_path / f"round{round_}"
            logs.mkdir()
            b = Broker(*args, port=port, log_dir=logs, runtime_dir=run)
            brokers.append(b)
            started = time.monotonic()
            b.start(wait=False)
            _serves(port, {"Telescope Simulator", "Slow"}, 5 - (time.monotonic() - started))
        # The arbiter's status says so too: both drivers of the last instance run.
        drivers = [r for r in b.status() if r["role"] == "driver"]
        assert len(drivers) == 2 and all(r["state"] == "RUNNING" for r in drivers), drivers
        current = {p.pid for p in b.tree()}
        stale = [p for p in alive(old_trees) if p.pid not in current]
        wait_until(lambda: not [p for p in alive(old_trees) if p.pid not in current], 5,
                   what=f"old processes to go: {stale}")
    finally:
        for broker in brokers:
            if broker.proc is not None and broker.proc.poll() is None:
                broker.__exit__(None, None, None)
        for p in alive(old_trees):
            p.kill()


def test_old_tree_gone_within_2s_of_kill9_even_if_a_driver_ignores_sigterm(tmp_path):
    b = Broker("--exdriver", f"{sys.executable} {DRIVERS / 'slow_exit.py'} Stubborn --ignore-term",
               "--exdriver", "indi_simulator_telescope", log_dir=tmp_path, runtime_dir=tmp_path / "run")
    with b:
        _serves(b.port, {"Telescope Simulator", "Stubborn"}, 15)
        tree = _kill9(b)
        killed = time.monotonic()
        assert len(tree) >= 5, [p.name() for p in tree]  # arbiter, broker, gateway, worker, 2 drivers
        wait_until(lambda: not alive(tree), 2.0, interval=0.02,
                   what=f"the old tree to go: {[p.name() for p in alive(tree)]}")
        assert time.monotonic() - killed < 2.0


def _value_of(client: RawClient, device: str) -> float | None:
    """The latest VALUE.V the client was sent for `device` (by a def or a set)."""
    latest = None
    for e in client.elements:
        if e.get("device") == device and e.get("name") == "VALUE" and e.tag.endswith("NumberVector"):
            latest = float(member(e, "V"))
    return latest


def test_broker_restart_converges_every_kind_of_driver(tmp_path, monkeypatch):
    """Values a driver sends while the broker is down are lost on the way; after the restart the
    drivers define again, so every client still ends with the current values: an executable
    driver, a Python driver and a remote server's driver alike. Clients are told."""
    trig = tmp_path / "trig"
    trig.mkdir()
    monkeypatch.setenv("TRIGGER_DIR", str(trig))
    monkeypatch.setenv("TRIGGER_DEVICE", "Remote")
    devices = ("Local", "PyTrigger", "Remote")
    with IndiServer(str(DRIVERS / "trigger.py")) as remote:
        b = Broker("--exdriver", f"{sys.executable} {DRIVERS / 'trigger.py'} Local",
                   "--driver", "trigger_py:make", "--remote", f"localhost:{remote.port}",
                   log_dir=tmp_path, runtime_dir=tmp_path / "run",
                   env={"PYTHONPATH": str(SCRIPTS)})
        with b, contextlib.closing(RawClient(b.port)) as c:
            c.send('<getProperties version="1.7"/>')
            wait_until(lambda: c.pump(0.1) >= 0 and all(_value_of(c, d) == 0 for d in devices), 20,
                       what="every device defined")
            broker = b.row("broker")["pid"]
            os.kill(broker, signal.SIGKILL)
            for device in devices:  # each driver sends its one change while the broker is down
                (trig / device).write_text("7")
            wait_until(lambda: c.pump(0.1) >= 0 and all(_value_of(c, d) == 7 for d in devices), 15,
                       what=f"every client value to converge: {[_value_of(c, d) for d in devices]}\n{b.log()}")
            told = [e for e in c.elements if e.tag == "message" and "restart" in (e.get("message") or "")]
            assert told, "clients were not told of the broker's restart"
            assert b.row("broker")["pid"] != broker
            assert not c.closed
