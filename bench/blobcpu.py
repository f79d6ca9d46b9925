#!/usr/bin/env python3
"""CPU per GB of BLOBs from a libindi driver on a socketpair: indiserver beside indibroker.

The CCD simulator streams video (`CCD_VIDEO_STREAM`) for `--seconds` to one client, over TCP and
then over the local socket (`-u`), under each server (`indiserver` and `indibroker-indiserver`,
same command line). Printed per run: frames and MB of BLOB delivered (decoded sizes, what the
client gets), the CPU seconds per GB delivered of the server's own processes, of the driver, and
of the whole tree (server + driver; the client is not counted).

    python3 bench/blobcpu.py [--seconds 15] [--servers indiserver,indibroker-indiserver]
"""

from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import psutil

CCD = "CCD Simulator"
SIZE = re.compile(rb"<oneBLOB[^>]*?size=[\"'](\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_switch(name: str, on: str, off: str) -> bytes:
    return (f"<newSwitchVector device='{CCD}' name='{name}'><oneSwitch name='{on}'>On</oneSwitch>"
            f"<oneSwitch name='{off}'>Off</oneSwitch></newSwitchVector>").encode()


class Reader:
    """A client that counts the BLOB bytes it is sent (its buffers' sizes on the local socket,
    as it would map them; the decoded size of base64 on TCP) and does nothing else."""

    def __init__(self, port: int, local: str | None):
        if local:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect("\0" + local)
        else:
            self.sock = socket.create_connection(("127.0.0.1", port))
        self.local = bool(local)
        self.tail = b""
        self.seen = b""  # text seen, kept only until the device is defined
        self.frames = 0
        self.bytes = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.sock], [], [], left)[0]:
                continue
            if self.local:
                data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 16)
                for fd in fds:
                    os.close(fd)
            else:
                data = self.sock.recv(1 << 20)
            if not data:
                raise SystemExit("server closed the connection")
            text = self.tail + data
            for m in SIZE.finditer(text):
                self.frames += 1
                self.bytes += int(m.group(1))
            self.tail = text[-200:] if SIZE.search(text[-200:]) is None else b""
            if len(self.seen) < 1 << 22:
                self.seen += data

    def wait_text(self, needle: bytes, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while needle not in self.seen:
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {needle!r}")
            self.pump(0.1)


def tree_cpu(root: psutil.Process) -> tuple[float, float]:
    """CPU seconds so far of the server's own processes, and of the driver."""
    server = driver = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            name = proc.name()
        except psutil.Error:
            continue
        if name.startswith("indi_simulator"):
            driver += t.user + t.system
        else:
            server += t.user + t.system
    return server, driver


def run(server: str, local: bool, seconds: float) -> dict[str, float]:
    port = free_port()
    path = f"/tmp/blobcpu-{os.getpid()}-{port}"
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([server, "-p", str(port), "-u", path, "indi_simulator_ccd"], stdout=log, stderr=log)
    try:
        psproc = psutil.Process(proc.pid)
        deadline = time.monotonic() + 20
        while True:
            try:
                reader = Reader(port, path if local else None)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        reader.send(b"<getProperties version='1.7'/>")
        reader.wait_text(b"CONNECTION", 20)
        reader.send(f"<enableBLOB device='{CCD}'>Also</enableBLOB>".encode())
        reader.send(new_switch("CONNECTION", "CONNECT", "DISCONNECT"))
        reader.wait_text(b"CCD_VIDEO_STREAM", 20)
        reader.send(new_switch("CCD_VIDEO_STREAM", "STREAM_ON", "STREAM_OFF"))
        reader.pump(3)  # warm up: the stream is running
        frames0, bytes0 = reader.frames, reader.bytes
        server0, driver0 = tree_cpu(psproc)
        reader.pump(seconds)
        server1, driver1 = tree_cpu(psproc)
        frames, delivered = reader.frames - frames0, reader.bytes - bytes0
        reader.send(new_switch("CCD_VIDEO_STREAM", "STREAM_OFF", "STREAM_ON"))
        gb = delivered / 1e9
        return {"frames": frames, "mb": delivered / 1e6, "fps": frames / seconds,
                "server": (server1 - server0) / gb, "driver": (driver1 - driver0) / gb,
                "total": (server1 - server0 + driver1 - driver0) / gb}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--servers", default="indiserver,indibroker-indiserver")
    args = parser.parse_args()
    servers = [s for s in args.servers.split(",") if shutil.which(s)]
    if not servers:
        sys.stderr.write("no server found\n")
        return 1
    print(f"CCD simulator streaming video for {args.seconds:g} s to one client; CPU seconds per GB "
          f"of BLOB delivered")
    print(f"{'server':24} {'client':6} {'frames':>6} {'MB':>7} {'fps':>5} {'server':>7} {'driver':>7} {'total':>7}")
    for local in (False, True):
        for server in servers:
            r = run(server, local, args.seconds)
            print(f"{server:24} {'local' if local else 'tcp':6} {r['frames']:6.0f} {r['mb']:7.1f} {r['fps']:5.1f} "
                  f"{r['server']:7.2f} {r['driver']:7.2f} {r['total']:7.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
