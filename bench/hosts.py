#!/usr/bin/env python3
"""The cost of a joined host (docs/hosts.md): a driver on a joined host, its traffic crossing
TCP with CURVE to the central broker, beside the same driver served by the central server itself.

    python3 bench/hosts.py            # about a minute
    python3 bench/hosts.py --quick

Both rows flood from `flood_driver.py` to one client of the central server: small
setNumberVectors (msgs/s) and 8 MB BLOBs (MB/s of BLOB payload), with bench/run.py's clients and
counting. The two "hosts" are two instances on this machine with their own runtime directories;
the joined host's link is loopback TCP with CURVE (encryption and the extra hop are what is
measured, not a network).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from clients import close_all, collect_all, def_marker, enable_blob, get_properties, spawn_groups, start_flood
from run import Bench
from servers import driver_wrapper

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


@contextlib.contextmanager
def process(argv: list[str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def installation(work: Path, joined: bool) -> Iterator[int]:
    """The central server's client port, with the flood driver on it or on a joined host."""
    from indibroker.broker.hosts import make_keys

    driver = driver_wrapper(work, "Flood1")
    port = free_port()
    ib = [sys.executable, "-m", "indibroker"]
    central = [*ib, "start", "--port", str(port), "--runtime-dir", str(work / "central"), "-q", "--no-demo"]
    with contextlib.ExitStack() as stack:
        if not joined:
            stack.enter_context(process([*central, "--exdriver", str(driver)], work / "central.log"))
        else:
            keys = work / "keys"
            make_keys("server", keys / "server")
            (keys / "server" / "hosts").mkdir()
            public, _ = make_keys("pier", keys / "pier")
            shutil.copy(public, keys / "server" / "hosts")
            shutil.copy(keys / "server" / "server.key", keys / "pier")
            endpoint = f"tcp://{HOST}:{free_port()}"
            stack.enter_context(process([*central, "--hosts-endpoint", endpoint, "--keys", str(keys / "server")],
                                        work / "central.log"))
            stack.enter_context(process([*ib, "join", endpoint, "--keys", str(keys / "pier"), "--name", "pier",
                                         "--runtime-dir", str(work / "pier"), "-q", "--exdriver", str(driver)],
                                        work / "pier.log"))
        _wait_port(port, 30)
        yield port


def measure(port: int, count: int, blob_mb: float, deadline: float) -> dict:
    blob = blob_mb > 0
    hello = get_properties() + (enable_blob("Flood1") if blob else b"")
    ready = [def_marker("Flood1")] + ([def_marker("Flood1", "BLOB", "BLOB")] if blob else [])
    groups = spawn_groups(HOST, port, 1, 1, hello=hello, ready=ready, devices=["Flood1"], blob=blob,
                          expected=count)
    try:
        t0 = groups[0].send(start_flood("Flood1", count, blob_mb))
        results = collect_all(groups, t0, t0 + deadline, 5.0)
    finally:
        close_all(groups)
    return Bench.summarise(results, t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    msgs, blobs = (100_000, 16) if args.quick else (400_000, 48)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="ib-bench-hosts-") as tmp:
        for joined in (False, True):
            label = "joined host (TCP+CURVE)" if joined else "one host"
            work = Path(tmp) / ("joined" if joined else "one")
            work.mkdir()
            with installation(work, joined) as port:
                small = measure(port, msgs, 0.0, 60.0)
                big = measure(port, blobs, 8.0, 60.0)
            rows[label] = (small, big)
            sys.stderr.write(f"{label}: {small['total']:,.0f} msgs/s (lost {small['loss']:.1f} %), "
                             f"{big['total'] * 8:,.1f} MB/s of BLOBs (dropped {big['loss']:.1f} %)\n")
    print(f"{'':26} {'msgs/s':>10} {'lost':>6} {'BLOB MB/s':>10} {'dropped':>8}")
    for label, (small, big) in rows.items():
        print(f"{label:26} {small['total']:>10,.0f} {small['loss']:>5.1f}% {big['total'] * 8:>10,.1f} "
              f"{big['loss']:>7.1f}%{small['flag']}{big['flag']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
