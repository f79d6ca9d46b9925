#!/usr/bin/env python3
"""Start, probe, measure and stop the INDI servers under benchmark.

Three kinds, each from a command template (``{port}``, ``{workdir}``, ``{python}``, ``{bench}`` and
the driver list are filled in):

- ``indibroker``:   ``indibroker start --port {port} --no-demo --runtime-dir {workdir}/runtime
  --exdriver "{driver}" ...``
- ``indiserver``:   ``indiserver -p {port} -u /tmp/bench-indiserver-{port} {driver} ...`` (each
  indiserver needs its own ``-u`` socket path, or the second one exits)
- ``indipyserver``: ``{python} {bench}/indipyserver_launcher.py --port {port} --maxconnections 10
  "{driver}" ...`` (IPyServer takes at most 10 clients)

Every driver is ``bench/flood_driver.py`` behind a one-line wrapper script named after its device
(indiserver passes no arguments to a driver). A server runs in its own session with its output in
``{workdir}/server.log``; it is ready once a client sees every device's SEQ property defined, and
it is stopped with SIGTERM to its process group, then SIGKILL to every process of its tree that is
left, so nothing outlives a run. Run this file to start one by hand::

    python3 bench/servers.py indibroker --port 7700 --devices Flood1 Flood2
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
KINDS = ("indibroker", "indiserver", "indipyserver")
# Clients a kind accepts at once (None: no limit worth mentioning).
MAX_CLIENTS: dict[str, int | None] = {"indibroker": None, "indiserver": None, "indipyserver": 10}

TEMPLATES = {
    "indibroker": "indibroker start --port {port} --no-demo --runtime-dir {workdir}/runtime {exdrivers}",
    "indiserver": "indiserver -p {port} -u /tmp/bench-indiserver-{port} {drivers}",
    "indipyserver": "{python} {bench}/indipyserver_launcher.py --port {port} --maxconnections 10 {drivers}",
}


class ServerError(RuntimeError):
    pass


def available(kind: str) -> str | None:
    """Why `kind` cannot run here, or None when it can."""
    if kind == "indibroker" and shutil.which("indibroker") is None:
        return "indibroker is not on PATH (pip install -e .)"
    if kind == "indiserver" and shutil.which("indiserver") is None:
        return "indiserver is not on PATH (apt-get install indi-bin)"
    if kind == "indipyserver":
        try:
            import indipyserver  # noqa: F401
        except ImportError:
            return "indipyserver is not installed (pip install indipyserver)"
    return None


def driver_wrapper(workdir: Path, device: str) -> Path:
    """An executable named after the device that runs the flood driver for it."""
    path = workdir / "drivers" / device
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                    f"{shlex.quote(str(BENCH / 'flood_driver.py'))} --device {shlex.quote(device)} \"$@\"\n")
    path.chmod(0o755)
    return path


def command(kind: str, port: int, drivers: list[Path], workdir: Path,
            template: str | None = None) -> list[str]:
    quoted = " ".join(shlex.quote(str(d)) for d in drivers)
    text = (template or TEMPLATES[kind]).format(
        port=port, workdir=shlex.quote(str(workdir)), python=shlex.quote(sys.executable),
        bench=shlex.quote(str(BENCH)), drivers=quoted,
        exdrivers=" ".join(f"--exdriver {shlex.quote(str(d))}" for d in drivers),
    )
    return shlex.split(text)


@dataclass
class Server:
    kind: str
    port: int
    devices: list[str]
    workdir: Path
    template: str | None = None
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None
    argv: list[str] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        drivers = [driver_wrapper(self.workdir, d) for d in self.devices]
        self.argv = command(self.kind, self.port, drivers, self.workdir, self.template)
        env = dict(os.environ, HOME=str(self.workdir))  # drivers that keep config write it here
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=env, start_new_session=True, cwd=self.workdir)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> None:
        """Connect and ask for everything until each device's SEQ property is defined."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        wanted = [f'<defNumberVector device="{d}" name="SEQ"'.encode() for d in self.devices]
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerError(f"{self.kind} not ready in {timeout:.0f} s:\n{self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                    sock.sendall(b'<getProperties version="1.7"/>\n')
                    buf = b""
                    probe_end = min(deadline, time.monotonic() + 5.0)
                    while not all(w in buf for w in wanted) and time.monotonic() < probe_end:
                        sock.settimeout(max(0.05, probe_end - time.monotonic()))
                        try:
                            data = sock.recv(65536)
                        except TimeoutError:
                            break
                        if not data:
                            break
                        buf += data
                    if all(w in buf for w in wanted):
                        return
            except OSError:
                pass
            time.sleep(0.1)

    def tree(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def memory(self) -> dict[str, float | None]:
        """RSS and PSS (bytes) summed over the server's whole process tree."""
        rss, pss, n = 0, 0, 0
        pss_ok = True
        for proc in self.tree():
            try:
                info = proc.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", 0)
                n += 1
            except psutil.AccessDenied:
                try:
                    rss += proc.memory_info().rss
                    pss_ok = False
                    n += 1
                except psutil.Error:
                    pass
            except psutil.NoSuchProcess:
                pass
        return {"rss": float(rss), "pss": float(pss) if pss_ok else None, "procs": float(n)}

    def cpu_busy(self, interval: float = 0.3) -> float:
        """CPU seconds per second the tree used over `interval`."""
        procs = self.tree()

        def total() -> float:
            t = 0.0
            for proc in procs:
                try:
                    times = proc.cpu_times()
                    t += times.user + times.system
                except psutil.Error:
                    pass
            return t

        before = total()
        time.sleep(interval)
        return (total() - before) / interval

    def settle(self, timeout: float = 10.0, busy: float = 0.05) -> None:
        """Wait (at most `timeout`) until the server uses almost no CPU."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.cpu_busy() > busy:
            pass

    def stop(self, timeout: float = 10.0) -> list[str]:
        """Stop the whole tree; returns descriptions of processes that had to be killed."""
        if self.proc is None:
            return []
        procs = self.tree()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        killed = []
        _, alive = psutil.wait_procs(procs, timeout=2.0)
        for proc in alive:
            try:
                killed.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5.0)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        return killed


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # not SIGINT itself: a background job may have SIGINT ignored


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--port", type=int, default=7700)
    parser.add_argument("--devices", nargs="+", default=["Flood1"], help="flood driver devices to serve")
    parser.add_argument("--template", help="command template overriding the kind's default")
    args = parser.parse_args()
    why = available(args.kind)
    if why:
        print(f"servers: {why}", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{args.kind}-"))
    # SIGTERM stops the server as Ctrl-C does (it runs in a session of its own: nothing else would).
    signal.signal(signal.SIGTERM, _interrupt)
    server = Server(args.kind, args.port, args.devices, workdir, args.template)
    try:
        server.start()
        mem = server.memory()
        print(f"{args.kind} ready on port {args.port} ({' '.join(server.argv)}); "
              f"{mem['procs']:.0f} processes, RSS {mem['rss'] / 2**20:.1f} MB; Ctrl-C stops it", flush=True)
        assert server.proc is not None
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    except ServerError as exc:
        print(f"servers: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
