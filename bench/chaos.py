#!/usr/bin/env python3
"""Chaos run: kill -9 drivers and workers of a live indibroker at random, check that it recovers.

Starts `indibroker start` with several indi-bin simulators (HOME in a temporary directory), keeps
a few raw INDI clients reading (and one sending new*Vectors), then for --seconds kills, every few
seconds, one of: a driver, a gateway, the broker or an exdriver worker, and checks recovery each
time: everything that was served before the kill (every device) is served again to a fresh client
within --deadline seconds, and the killed process has a successor in `indibroker status`.

At the end it stops the server with SIGTERM and prints a table: kills by kind, recoveries, the
slowest recovery, client connections lost (by the kind of kill that preceded the loss: only gateway
kills may cost connections), processes left over after the stop, and the peak RSS of the tree.
The last line is the same summary as JSON. Exit status 0 only if every expectation held.

    python3 bench/chaos.py --seconds 60
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

SIMULATORS = ["indi_simulator_telescope", "indi_simulator_ccd", "indi_simulator_focus", "indi_simulator_dome"]
KINDS = ["driver", "gateway", "broker", "exdriver"]
WEIGHTS = [4, 2, 2, 2]
MB = 1024 * 1024
DEF_RE = re.compile(rb"""<def\w+Vector[^>]*?\sdevice=(["'])(.*?)\1""")

# Quick, unlimited restarts: the chaos kills the same thing again and again on purpose.
CONFIG = """\
exdriver_workers = {workers}
gateways = {gateways}
[restart]
max_restarts = 1000
backoff_initial = 0.5
backoff_max = 2.0
stable_after = 5.0
flap_max_exits = 0
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the server --------------------------------------------------------------------------------
class Server:
    def __init__(self, port: int, workdir: Path, gateways: int, workers: int, simulators: list[str]):
        self.port = port
        self.workdir = workdir
        self.runtime = workdir / "run"
        self.log_path = workdir / "indibroker.log"
        home = workdir / "home"
        home.mkdir()
        config = workdir / "indibroker.toml"
        config.write_text(CONFIG.format(gateways=gateways, workers=workers))
        argv = [sys.executable, "-m", "indibroker", "start", "--port", str(port), "--runtime-dir",
                str(self.runtime), "--config", str(config)]
        for sim in simulators:
            argv += ["--exdriver", sim]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "HOME": str(home)})
        self.seen: dict[int, psutil.Process] = {}

    def status(self) -> list[dict[str, Any]]:
        result = subprocess.run([sys.executable, "-m", "indibroker", "status", "--json", "--port", str(self.port),
                                 "--runtime-dir", str(self.runtime)], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"status failed: {result.stderr.strip()}")
        return list(json.loads(result.stdout))

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            self.seen.setdefault(p.pid, p)
        return procs

    def rss(self) -> int:
        total = 0
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def stop(self, timeout: float = 30) -> int | None:
        self.tree()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()
        return code

    def leftovers(self, timeout: float = 5) -> list[psutil.Process]:
        deadline = time.monotonic() + timeout
        while True:
            left = []
            for p in self.seen.values():
                with contextlib.suppress(psutil.Error):
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        left.append(p)
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)

    def kill_leftovers(self) -> None:
        for p in self.leftovers(0):
            with contextlib.suppress(psutil.Error):
                p.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# -- clients -----------------------------------------------------------------------------------
@dataclass
class Losses:
    lock: threading.Lock = field(default_factory=threading.Lock)
    times: list[float] = field(default_factory=list)

    def add(self, when: float) -> None:
        with self.lock:
            self.times.append(when)


def connect(port: int, stop: threading.Event) -> socket.socket | None:
    while not stop.is_set():
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            sock.sendall(b'<getProperties version="1.7"/>\n')
            return sock
        except OSError:
            stop.wait(0.1)
    return None


class Reader(threading.Thread):
    """Reads everything, forever; reconnects (and records the loss) when its connection drops."""

    def __init__(self, port: int, losses: Losses, stop: threading.Event):
        super().__init__(daemon=True)
        self.port, self.losses, self.stop = port, losses, stop
        self.received = 0

    def run(self) -> None:
        sock = connect(self.port, self.stop)
        while sock is not None and not self.stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.2)
            if not ready:
                continue
            try:
                data = sock.recv(1 << 20)
            except OSError:
                data = b""
            if data:
                self.received += len(data)
                continue
            if self.stop.is_set():
                break
            self.losses.add(time.monotonic())
            sock.close()
            sock = connect(self.port, self.stop)
        if sock is not None:
            sock.close()


class Sender(Reader):
    """A reader that also sends a new*Vector to every known device twice a second."""

    def __init__(self, port: int, losses: Losses, stop: threading.Event, devices: list[str]):
        super().__init__(port, losses, stop)
        self.devices = devices
        self.sent = 0

    def run(self) -> None:
        sock = connect(self.port, self.stop)
        next_send = time.monotonic()
        while sock is not None and not self.stop.is_set():
            lost = False
            if time.monotonic() >= next_send:
                next_send = time.monotonic() + 0.5
                for device in self.devices:
                    xml = (f'<newSwitchVector device="{device}" name="CONNECTION">'
                           '<oneSwitch name="CONNECT">On</oneSwitch></newSwitchVector>\n')
                    try:
                        sock.sendall(xml.encode())
                        self.sent += 1
                    except OSError:
                        lost = True
                        break
            if not lost:
                ready, _, _ = select.select([sock], [], [], 0.1)
                if ready:
                    try:
                        data = sock.recv(1 << 20)
                    except OSError:
                        data = b""
                    self.received += len(data)
                    lost = not data
            if lost and not self.stop.is_set():
                self.losses.add(time.monotonic())
                sock.close()
                sock = connect(self.port, self.stop)
        if sock is not None:
            sock.close()


def served_devices(port: int, want: set[str], timeout: float) -> set[str]:
    """Connect afresh, ask for everything; the devices (of `want`) defined within `timeout`."""
    seen: set[str] = set()
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=1)
    except OSError:
        return seen
    with sock:
        try:
            sock.sendall(b'<getProperties version="1.7"/>\n')
        except OSError:
            return seen
        buf = b""
        deadline = time.monotonic() + timeout
        while not want <= seen and time.monotonic() < deadline:
            ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                data = sock.recv(1 << 20)
            except OSError:
                break
            if not data:
                break
            buf = buf[-4096:] + data
            seen.update(m.group(2).decode(errors="replace") for m in DEF_RE.finditer(buf))
    return seen & want


# -- the chaos ---------------------------------------------------------------------------------
@dataclass
class Kill:
    kind: str
    name: str
    pid: int
    at: float
    recovered: bool = False
    seconds: float | None = None
    why: str = ""


def running_rows(server: Server) -> list[dict[str, Any]]:
    return [r for r in server.status() if r.get("pid") and r.get("state") == "RUNNING"]


def all_devices(rows: list[dict[str, Any]]) -> set[str]:
    return {d for r in rows if r["role"] == "driver" for d in r.get("devices", [])}


def wait_ready(server: Server, drivers: int, timeout: float) -> set[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"indibroker exited early (code {server.proc.returncode})")
        try:
            rows = running_rows(server)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired):
            rows = []
        drv = [r for r in rows if r["role"] == "driver" and r.get("devices")]
        if len(drv) == drivers:
            devices = all_devices(rows)
            if served_devices(server.port, devices, 3) == devices:
                return devices
        time.sleep(0.2)
    raise RuntimeError(f"indibroker did not serve {drivers} drivers within {timeout} s")


def recover(server: Server, kill: Kill, devices: set[str], deadline: float) -> None:
    """Wait until the killed process has a running successor and every device is served again."""
    end = kill.at + deadline
    missing: set[str] = set(devices)
    successor = False
    while time.monotonic() < end:
        try:
            rows = running_rows(server)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired):
            rows = []
        successor = any(r["name"] == kill.name and r["pid"] != kill.pid for r in rows)
        if successor:
            missing = devices - served_devices(server.port, devices, min(1.5, max(0.1, end - time.monotonic())))
            if not missing:
                kill.recovered = True
                kill.seconds = time.monotonic() - kill.at
                return
        else:
            time.sleep(0.1)
    kill.why = "no running successor in status" if not successor else f"devices not served: {sorted(missing)}"


def pick(rows: list[dict[str, Any]], rng: random.Random) -> dict[str, Any] | None:
    kinds = [k for k in KINDS if any(r["role"] == k for r in rows)]
    if not kinds:
        return None
    kind = rng.choices(kinds, [WEIGHTS[KINDS.index(k)] for k in kinds])[0]
    return rng.choice([r for r in rows if r["role"] == kind])


def attribute(losses: list[float], kills: list[Kill]) -> dict[str, int]:
    """Each lost connection is blamed on the last kill before it (within 10 s), else 'unexplained'."""
    out = {k: 0 for k in [*KINDS, "unexplained"]}
    for when in losses:
        before = [k for k in kills if k.at <= when]
        if before and when - before[-1].at <= 10:
            out[before[-1].kind] += 1
        else:
            out["unexplained"] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="how long to keep killing (60)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    parser.add_argument("--interval", type=float, default=3.0, help="mean seconds between kills (3)")
    parser.add_argument("--deadline", type=float, default=15.0, help="seconds allowed to recover (15)")
    parser.add_argument("--readers", type=int, default=3, help="clients that only read (3)")
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="exdriver worker processes (2)")
    parser.add_argument("--max-rss-mb", type=float, default=600, help="peak RSS allowed for the tree (600)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (log, config)")
    args = parser.parse_args(argv)

    missing = [s for s in ["indiserver", *SIMULATORS] if shutil.which(s) is None]
    if missing:
        print(f"chaos: missing {', '.join(missing)} (apt-get install indi-bin)", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    port = args.port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="indibroker-chaos-"))
    server = Server(port, workdir, args.gateways, args.workers, SIMULATORS)
    stop = threading.Event()
    losses = Losses()
    kills: list[Kill] = []
    peak_rss = 0
    failures: list[str] = []
    clients: list[Reader] = []
    try:
        devices = wait_ready(server, len(SIMULATORS), 60)
        clients = [Reader(port, losses, stop) for _ in range(args.readers)]
        clients.append(Sender(port, losses, stop, sorted(devices)))
        for c in clients:
            c.start()
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            pause = time.monotonic() + rng.uniform(0.5 * args.interval, 1.5 * args.interval)
            while time.monotonic() < min(pause, end):
                peak_rss = max(peak_rss, server.rss())
                time.sleep(0.2)
            if time.monotonic() >= end:
                break
            if server.proc.poll() is not None:
                failures.append(f"the arbiter exited (code {server.proc.returncode})")
                break
            rows = running_rows(server)
            victim = pick(rows, rng)
            if victim is None:
                continue
            server.tree()  # remember every process, to look for survivors at the end
            kill = Kill(victim["role"], victim["name"], victim["pid"], time.monotonic())
            with contextlib.suppress(ProcessLookupError):
                os.kill(kill.pid, signal.SIGKILL)
            kills.append(kill)
            recover(server, kill, devices, args.deadline)
            peak_rss = max(peak_rss, server.rss())
            state = f"recovered in {kill.seconds:.1f} s" if kill.recovered else f"NOT RECOVERED: {kill.why}"
            print(f"[{len(kills):3d}] kill -9 {kill.kind:8s} {kill.name:28s} pid {kill.pid:7d}: {state}",
                  flush=True)
            if not kill.recovered:
                failures.append(f"{kill.kind} {kill.name}: {kill.why}")
    except RuntimeError as exc:
        failures.append(str(exc))
    finally:
        stop.set()
        for c in clients:
            c.join(3)
        code = server.stop()
        leftover_cmds = []
        for p in server.leftovers():
            with contextlib.suppress(psutil.Error):
                leftover_cmds.append(f"pid {p.pid}: {' '.join(p.cmdline())}")
        server.kill_leftovers()

    blame = attribute(losses.times, kills)
    rows_out = []
    for kind in KINDS:
        mine = [k for k in kills if k.kind == kind]
        worst = max((k.seconds or 0.0 for k in mine if k.recovered), default=0.0)
        rows_out.append((kind, len(mine), sum(k.recovered for k in mine), worst, blame[kind]))
    print()
    print(f"{'KIND':10s} {'KILLS':>6s} {'RECOVERED':>10s} {'SLOWEST(s)':>11s} {'LOST CONNS':>11s}  EXPECTED LOSSES")
    for kind, n, ok, worst, lost in rows_out:
        expect = "any" if kind == "gateway" else "0"
        print(f"{kind:10s} {n:6d} {ok:10d} {worst:11.1f} {lost:11d}  {expect}")
    print(f"{'unexplained':10s} {'':6s} {'':10s} {'':11s} {blame['unexplained']:11d}  0")
    print(f"client bytes read: {sum(c.received for c in clients)}; "
          f"new*Vectors sent: {sum(c.sent for c in clients if isinstance(c, Sender))}")
    print(f"arbiter exit code after SIGTERM: {code}")
    print(f"leftover processes after stop: {len(leftover_cmds)} (expected 0)")
    for cmd in leftover_cmds:
        print(f"  left: {cmd}")
    print(f"peak RSS of the tree: {peak_rss / MB:.0f} MB (limit {args.max_rss_mb:.0f} MB)")

    for kind in ("driver", "broker", "exdriver", "unexplained"):
        if blame[kind]:
            failures.append(f"{blame[kind]} client connection(s) lost after {kind} kills (expected 0)")
    if leftover_cmds:
        failures.append(f"{len(leftover_cmds)} process(es) left after the stop")
    if code != 0:
        failures.append(f"arbiter exit code {code} after SIGTERM (expected 0)")
    if peak_rss > args.max_rss_mb * MB:
        failures.append(f"peak RSS {peak_rss / MB:.0f} MB over {args.max_rss_mb:.0f} MB")
    if not kills and args.seconds >= 2 * args.interval:
        failures.append("no kill happened")
    if failures:
        print("\nFAILED:", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        print(f"\nlast lines of the indibroker log:\n{server.log_tail()}", file=sys.stderr)
    keep = args.keep or bool(failures)
    print(f"seed {seed}; work directory {workdir}{'' if keep else ' (removed)'}")
    summary = {
        "ok": not failures, "seed": seed, "kills": {k: n for k, n, *_ in rows_out},
        "recovered": {k: ok for k, _, ok, *_ in rows_out}, "lost_connections": blame,
        "leftovers": len(leftover_cmds), "peak_rss_mb": round(peak_rss / MB, 1), "failures": failures,
    }
    print(json.dumps(summary))
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
