#!/usr/bin/env python3
"""Chaos run: kill -9 drivers, workers and the top process of a live indibroker at random, check recovery.

Starts `indibroker start` with several indi-bin simulators (HOME in a temporary directory), keeps
a few raw INDI clients reading (and one sending new*Vectors), then for --seconds kills, every few
seconds, one of: a driver, a gateway, the broker, an exdriver worker, or the top process (the
arbiter, `indibroker start` itself, as INDI Web Manager stops indiserver with SIGKILL), and checks
recovery each time: everything that was served before the kill (every device) is served again to a
fresh client within --deadline seconds, and the killed process has a successor in `indibroker
status`. A top kill is followed at once by the same command again (same port, same runtime
directory): the new instance must serve every device within --deadline, and every process of the
old tree (its workers, their drivers) must be gone within 2 s of the kill; one that outlives that
is an orphan (a failure; it is killed so the run can go on). Clients lose their connection only
when their gateway goes: at gateway and top kills; the readers reconnect, as KStars does.

At the end it stops the server with SIGTERM and prints a table: kills by kind, recoveries, the
slowest recovery, client connections lost (by the kind of kill that preceded the loss: only gateway
and top kills may cost connections), the slowest end of an old tree and the orphans (top kills),
processes left over after the stop, the peak RSS of the tree and its RSS and PSS at the end.
The last line is the same summary as JSON. Exit status 0 only if every expectation held.

    python3 bench/chaos.py --seconds 60
    python3 bench/chaos.py --seconds 60 --kinds top,gateway
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

SIMULATORS = ["indi_simulator_telescope", "indi_simulator_ccd", "indi_simulator_focus", "indi_simulator_dome"]
KINDS = ["driver", "gateway", "broker", "exdriver", "top"]
WEIGHTS = {"driver": 4, "gateway": 2, "broker": 2, "exdriver": 2, "top": 2}
ROLES = {"top": "arbiter"}  # the `indibroker status` role a kind's victim is picked from (default: the kind)
LOSSY = ("gateway", "top")  # the only kinds whose kills may cost client connections
OLD_TREE_LIMIT = 2.0  # seconds after a top kill by which every process of the old tree must be gone
STATUS_TIMEOUT = 10.0
TAG_VAR = "INDIBROKER_CHAOS_TAG"  # in the server's environment, so every process it starts can be found
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


# -- processes -----------------------------------------------------------------------------------
def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def describe(p: psutil.Process) -> str:
    try:
        return f"pid {p.pid}: {' '.join(p.cmdline()) or p.name()}"
    except psutil.Error:
        return f"pid {p.pid}"


class Tracker:
    """Every process the run started: those seen in a tree, and any carrying the run's tag."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(8)
        self.seen: set[psutil.Process] = set()  # psutil compares pid and start time: no reuse mix-up

    def remember(self, procs: list[psutil.Process]) -> None:
        self.seen.update(procs)

    def tagged(self, outside: int | None = None) -> list[psutil.Process]:
        """Live processes with the run's tag in their environment; with `outside`, only those
        that are neither that process nor its descendants."""
        out = []
        for p in psutil.process_iter():
            if p.pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error):
                if p.environ().get(TAG_VAR) != self.tag or p.status() == psutil.STATUS_ZOMBIE:
                    continue
                if outside is not None and (p.pid == outside or any(a.pid == outside for a in p.parents())):
                    continue
                out.append(p)
        return out

    def leftovers(self, timeout: float = 5) -> list[psutil.Process]:
        deadline = time.monotonic() + timeout
        while True:
            left = {p.pid: p for p in alive(list(self.seen))}
            if not left:
                left = {p.pid: p for p in self.tagged()}
            if not left or time.monotonic() > deadline:
                return list(left.values())
            time.sleep(0.1)

    def kill_all(self) -> None:
        for p in [*alive(list(self.seen)), *self.tagged()]:
            with contextlib.suppress(psutil.Error):
                p.kill()


# -- the server ----------------------------------------------------------------------------------
class Server:
    """One `indibroker start`; `again()` starts the same command (port, runtime directory, config)."""

    def __init__(self, port: int, workdir: Path, argv: list[str], env: dict[str, str], tracker: Tracker,
                 generation: int = 1):
        self.port, self.workdir, self.argv, self.env, self.tracker = port, workdir, argv, env, tracker
        self.generation = generation
        self.runtime = workdir / "run"
        self.log_path = workdir / ("indibroker.log" if generation == 1 else f"indibroker-{generation}.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop() or kill9()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env)

    @classmethod
    def first(cls, port: int, workdir: Path, gateways: int, workers: int, simulators: list[str],
              tracker: Tracker) -> Server:
        home = workdir / "home"
        home.mkdir()
        config = workdir / "indibroker.toml"
        config.write_text(CONFIG.format(gateways=gateways, workers=workers))
        argv = [sys.executable, "-m", "indibroker", "start", "--port", str(port), "--runtime-dir",
                str(workdir / "run"), "--config", str(config)]
        for sim in simulators:
            argv += ["--exdriver", sim]
        env = {**os.environ, "HOME": str(home), TAG_VAR: tracker.tag}
        return cls(port, workdir, argv, env, tracker)

    def again(self) -> Server:
        return Server(self.port, self.workdir, self.argv, self.env, self.tracker, self.generation + 1)

    def status(self) -> list[dict[str, Any]]:
        result = subprocess.run([sys.executable, "-m", "indibroker", "status", "--json", "--port", str(self.port),
                                 "--runtime-dir", str(self.runtime)], capture_output=True, text=True,
                                timeout=STATUS_TIMEOUT)
        if result.returncode != 0:
            raise RuntimeError(f"status failed: {result.stderr.strip()}")
        return list(json.loads(result.stdout))

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self.tracker.remember(procs)
        return procs

    def memory(self, pss: bool = False) -> tuple[int, int]:
        """RSS (and, with `pss`, PSS) of the tree, bytes."""
        rss = total_pss = 0
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                if pss:
                    info = p.memory_full_info()
                    rss += info.rss
                    total_pss += getattr(info, "pss", 0)
                else:
                    rss += p.memory_info().rss
        return rss, total_pss

    def kill9(self) -> tuple[list[psutil.Process], float]:
        """SIGKILL the arbiter alone (its workers and drivers see it die); returns the tree it had
        and the time of the kill (taken before it, so that no consequence can precede it)."""
        tree = self.tree()
        at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()
        return tree, at

    def stop(self, timeout: float = 30) -> int | None:
        self.tree()
        if self.proc.poll() is None:
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

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# -- clients -------------------------------------------------------------------------------------
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


# -- the chaos -----------------------------------------------------------------------------------
@dataclass
class Kill:
    kind: str
    name: str
    pid: int
    at: float
    recovered: bool = False
    seconds: float | None = None
    why: str = ""
    old_tree: int = 0  # top kills: processes in the tree at the kill
    gone: float | None = None  # top kills: seconds until the last of them was gone (None: not within the limit)
    orphans: list[str] = field(default_factory=list)  # top kills: what outlived the limit


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
    """Wait until the killed process has a running successor and every device is served again.
    For a top kill, `server` is the new instance and the successor is its arbiter."""
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
                kill.seconds = time.monotonic() - kill.at
                kill.recovered = kill.seconds <= deadline  # the last look may end a little past it
                kill.why = "" if kill.recovered else f"every device served again only after {kill.seconds:.1f} s"
                return
        else:
            time.sleep(0.1)
    kill.why = "no running successor in status" if not successor else f"devices not served: {sorted(missing)}"


def await_old_tree(kill: Kill, tree: list[psutil.Process], tracker: Tracker, new_pid: int) -> None:
    """After a top kill: wait (up to OLD_TREE_LIMIT from the kill) for every process of the old tree
    to go, and for no process of the run to be left outside the new tree; kill what outlives that."""
    kill.old_tree = len(tree)
    while True:
        left = alive(tree)
        if not left:
            left = tracker.tagged(outside=new_pid)  # also started by the old tree, after we looked
        now = time.monotonic()
        if not left:
            kill.gone = now - kill.at
            return
        if now - kill.at > OLD_TREE_LIMIT:
            break
        time.sleep(0.02)
    # One more look, so the orphans are everything that outlived the limit, not just the first found.
    left = {p.pid: p for p in [*alive(tree), *tracker.tagged(outside=new_pid)]}
    kill.orphans = [describe(p) for p in left.values()]
    for p in left.values():
        with contextlib.suppress(psutil.Error):
            p.kill()


def pick(rows: list[dict[str, Any]], rng: random.Random, kinds: list[str]) -> tuple[str, dict[str, Any]] | None:
    present = [k for k in kinds if any(r["role"] == ROLES.get(k, k) for r in rows)]
    if not present:
        return None
    kind = rng.choices(present, [WEIGHTS[k] for k in present])[0]
    return kind, rng.choice([r for r in rows if r["role"] == ROLES.get(kind, kind)])


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


def parse_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"kinds are a comma list of {', '.join(KINDS)}; got {text!r}")
    return [k for k in KINDS if k in kinds]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="how long to keep killing (60)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    parser.add_argument("--interval", type=float, default=3.0, help="mean seconds between kills (3)")
    parser.add_argument("--deadline", type=float, default=15.0, help="seconds allowed to recover (15)")
    parser.add_argument("--kinds", type=parse_kinds, default=list(KINDS),
                        help=f"what to kill, a comma list (default: all: {','.join(KINDS)})")
    parser.add_argument("--readers", type=int, default=3, help="clients that only read (3)")
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="exdriver worker processes (2)")
    parser.add_argument("--max-rss-mb", type=float, default=600, help="peak RSS allowed for the tree (600)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, config)")
    args = parser.parse_args(argv)

    missing = [s for s in ["indiserver", *SIMULATORS] if shutil.which(s) is None]
    if missing:
        print(f"chaos: missing {', '.join(missing)} (apt-get install indi-bin)", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    port = args.port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="indibroker-chaos-"))
    tracker = Tracker()
    stop = threading.Event()
    losses = Losses()
    kills: list[Kill] = []
    peak_rss = end_rss = end_pss = 0
    failures: list[str] = []
    clients: list[Reader] = []
    failed_logs: list[Server] = []  # instances whose log tail the failure report shows
    code: int | None = None
    leftover_cmds: list[str] = []
    previous_term = signal.signal(signal.SIGTERM, _interrupt)
    server: Server | None = None
    try:
        server = Server.first(port, workdir, args.gateways, args.workers, SIMULATORS, tracker)
        devices = wait_ready(server, len(SIMULATORS), 60)
        clients = [Reader(port, losses, stop) for _ in range(args.readers)]
        clients.append(Sender(port, losses, stop, sorted(devices)))
        for c in clients:
            c.start()
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            pause = time.monotonic() + rng.uniform(0.5 * args.interval, 1.5 * args.interval)
            while time.monotonic() < min(pause, end):
                peak_rss = max(peak_rss, server.memory()[0])
                time.sleep(0.2)
            if time.monotonic() >= end:
                break
            if server.proc.poll() is not None:
                failures.append(f"the arbiter exited (code {server.proc.returncode})")
                break
            try:
                rows = running_rows(server)
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                failures.append(f"status did not answer between kills: {exc}")
                break
            chosen = pick(rows, rng, args.kinds)
            if chosen is None:
                continue
            kind, victim = chosen
            old = server
            if kind == "top":
                tree, at = old.kill9()  # remembers every process of the tree, to look for survivors at the end
                kill = Kill(kind, victim["name"], old.proc.pid, at)
                server = old.again()  # at once, as INDI Web Manager does: same port, same runtime directory
                kills.append(kill)
                await_old_tree(kill, tree, tracker, server.proc.pid)
            else:
                server.tree()  # remember every process, to look for survivors at the end
                kill = Kill(kind, victim["name"], victim["pid"], time.monotonic())
                with contextlib.suppress(ProcessLookupError):
                    os.kill(kill.pid, signal.SIGKILL)
                kills.append(kill)
            recover(server, kill, devices, args.deadline)
            peak_rss = max(peak_rss, server.memory()[0])
            state = f"recovered in {kill.seconds:.1f} s" if kill.recovered else f"NOT RECOVERED: {kill.why}"
            if kind == "top":
                gone = f"{kill.gone:.2f} s" if kill.gone is not None else f"NOT within {OLD_TREE_LIMIT:.0f} s"
                state += f"; old tree ({kill.old_tree} processes) gone in {gone}"
            print(f"[{len(kills):3d}] kill -9 {kill.kind:8s} {kill.name:28s} pid {kill.pid:7d}: {state}",
                  flush=True)
            for orphan in kill.orphans:
                print(f"      orphan (alive {OLD_TREE_LIMIT:.0f} s after the kill, killed): {orphan}", flush=True)
            if not kill.recovered:
                failures.append(f"{kill.kind} {kill.name}: {kill.why}")
                failed_logs.append(server)
            if kill.orphans:
                failures.append(f"top kill [{len(kills)}]: {len(kill.orphans)} process(es) of the old tree "
                                f"alive {OLD_TREE_LIMIT:.0f} s after the kill: {kill.orphans}")
                failed_logs.append(old)
    except RuntimeError as exc:
        failures.append(str(exc))
    except KeyboardInterrupt as exc:
        failures.append(f"interrupted ({str(exc) or 'Ctrl-C'})")
    except Exception as exc:  # a bench bug: still clean up and report
        traceback.print_exc()
        failures.append(f"bench error: {exc!r}")
    finally:
        # Bounded (at most ~30 s + 5 s), so a second Ctrl-C or SIGTERM cannot leave processes behind.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if server is not None and server.proc.poll() is None:
                end_rss, end_pss = server.memory(pss=True)  # the final tree, its clients still connected
            stop.set()
            for c in clients:
                c.join(3)
            if server is not None:
                code = server.stop()
            for p in tracker.leftovers():
                leftover_cmds.append(describe(p))
            tracker.kill_all()
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous_term)

    blame = attribute(losses.times, kills)
    top_kills = [k for k in kills if k.kind == "top"]
    orphans = sum(len(k.orphans) for k in top_kills)
    gone_max = max((k.gone for k in top_kills if k.gone is not None), default=None)
    table = []
    for kind in args.kinds:
        mine = [k for k in kills if k.kind == kind]
        worst = max((k.seconds or 0.0 for k in mine if k.recovered), default=0.0)
        table.append((kind, len(mine), sum(k.recovered for k in mine), worst, blame[kind]))
    print()
    print(f"{'KIND':11s} {'KILLS':>6s} {'RECOVERED':>10s} {'SLOWEST(s)':>11s} {'LOST CONNS':>11s}  EXPECTED LOSSES")
    for kind, n, ok, worst, lost in table:
        print(f"{kind:11s} {n:6d} {ok:10d} {worst:11.1f} {lost:11d}  {'any' if kind in LOSSY else '0'}")
    print(f"{'unexplained':11s} {'':6s} {'':10s} {'':11s} {blame['unexplained']:11d}  0")
    if "top" in args.kinds:
        gone_text = f"{gone_max:.2f} s" if gone_max is not None else "n/a"
        print(f"top kills: old tree gone within {gone_text} at most (limit {OLD_TREE_LIMIT:.0f} s); "
              f"orphans: {orphans} (expected 0)")
    print(f"client bytes read: {sum(c.received for c in clients)}; "
          f"new*Vectors sent: {sum(c.sent for c in clients if isinstance(c, Sender))}; "
          f"instances started: {server.generation if server else 0}")
    print(f"arbiter exit code after SIGTERM: {code}")
    print(f"leftover processes after stop: {len(leftover_cmds)} (expected 0)")
    for cmd in leftover_cmds:
        print(f"  left: {cmd}")
    print(f"memory of the tree: peak RSS {peak_rss / MB:.0f} MB (limit {args.max_rss_mb:.0f} MB); "
          f"at the end RSS {end_rss / MB:.0f} MB, PSS {end_pss / MB:.0f} MB")

    for kind in [*KINDS, "unexplained"]:
        if kind not in LOSSY and blame[kind]:
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
        shown = []
        for s in [*failed_logs, server]:
            if s is not None and s not in shown:
                shown.append(s)
        for s in shown:
            print(f"\nlast lines of {s.log_path.name}:\n{s.log_tail()}", file=sys.stderr)
    keep = args.keep or bool(failures)
    print(f"seed {seed}; work directory {workdir}{'' if keep else ' (removed)'}")
    summary = {
        "ok": not failures, "seed": seed, "kills": {k: n for k, n, *_ in table},
        "recovered": {k: ok for k, _, ok, *_ in table},
        "slowest_recovery_s": {k: round(worst, 2) for k, _, _, worst, _ in table},
        "lost_connections": blame, "orphans": orphans,
        "old_tree_gone_max_s": None if gone_max is None else round(gone_max, 3),
        "leftovers": len(leftover_cmds), "peak_rss_mb": round(peak_rss / MB, 1),
        "end_rss_mb": round(end_rss / MB, 1), "end_pss_mb": round(end_pss / MB, 1), "failures": failures,
    }
    print(json.dumps(summary))
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
