#!/usr/bin/env python3
"""Footprint of indibroker serving 1, 12 and 24 of indi-bin's simulators.

For each size: every indibroker process (role, PSS), the total, the increment per driver beyond
the first size, idle CPU of the whole tree (drivers excluded) over 10 s, and the time from
`indibroker start` until every device is served to a client.

    python3 bench/footprint.py [--sizes 1 12 24] [--gateways 2] [--idle 10] [--no-server-device]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil

SIMS = ["ccd", "dome", "focus", "gps", "guide", "lightpanel", "receiver", "rotator", "sqm", "telescope",
        "weather", "wheel"]
DEVICES = {"ccd": "CCD Simulator", "dome": "Dome Simulator", "focus": "Focuser Simulator",
           "gps": "GPS Simulator", "guide": "Guide Simulator", "lightpanel": "Light Panel Simulator",
           "receiver": "Receiver Simulator", "rotator": "Rotator Simulator", "sqm": "SQM Simulator",
           "telescope": "Telescope Simulator", "weather": "Weather Simulator", "wheel": "Filter Simulator"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drivers_for(n: int) -> tuple[list[str], set[str]]:
    """n driver command lines; beyond 12, simulators again under other device names (-n)."""
    commands, devices = [], set()
    for i in range(n):
        sim = SIMS[i % len(SIMS)]
        if i < len(SIMS):
            commands.append(f"indi_simulator_{sim}")
            devices.add(DEVICES[sim])
        else:
            name = f"{DEVICES[sim]} {i // len(SIMS) + 1}"
            commands.append(f"env INDIDEV='{name}' indi_simulator_{sim}")
            devices.add(name)
    return commands, devices


def served_devices(port: int, want: set[str], deadline: float) -> set[str]:
    seen: set[str] = set()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b'<getProperties version="1.7"/>')
        s.settimeout(0.2)
        buf = b""
        while time.monotonic() < deadline and not want <= seen:
            try:
                chunk = s.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                break
            buf = buf[-512:] + chunk
            seen.update(m[1].decode() for m in re.findall(rb"<def\w+Vector[^>]*?device=([\"'])(.*?)\1", buf))
    return seen


def measure(n: int, gateways: int, idle: float, extra: list[str]) -> dict:
    port = free_port()
    home = tempfile.mkdtemp(prefix="ib-footprint-home-")
    commands, devices = drivers_for(n)
    args = [sys.executable, "-m", "indibroker", "start", "--port", str(port), "--gateways", str(gateways), *extra]
    for command in commands:
        args += ["--exdriver", command]
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HOME": home}, start_new_session=True)
    try:
        while time.monotonic() - t0 < 30:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        seen = served_devices(port, devices, t0 + 60)
        ready = time.monotonic() - t0
        time.sleep(1.0)  # let start-up settle before measuring an idle server
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
        own = [p for p in tree if p.name().startswith("ib-") or p.pid == proc.pid]
        rows = []
        for p in own:
            role = "arbiter" if p.pid == proc.pid else p.name()[3:]
            rows.append((role, p.memory_full_info().pss))
        for p in own:
            p.cpu_percent(None)
        time.sleep(idle)
        cpu = sum(p.cpu_percent(None) for p in own)
        drivers_pss = sum(p.memory_full_info().pss for p in tree if p not in own)
        return {"n": n, "rows": rows, "total": sum(pss for _, pss in rows), "cpu": cpu, "ready": ready,
                "served": len(seen & devices), "devices": len(devices), "drivers_pss": drivers_pss}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 12, 24])
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measurement")
    parser.add_argument("--no-server-device", action="store_true",
                        help="without the server device (to measure what it costs)")
    args = parser.parse_args()
    if shutil.which("indi_simulator_ccd") is None:
        sys.stderr.write("needs indi-bin (apt-get install indi-bin)\n")
        return 2
    extra = ["--no-server-device"] if args.no_server_device else []
    results = [measure(n, args.gateways, args.idle, extra) for n in args.sizes]
    mb = 1024 * 1024
    for r in results:
        print(f"\n== {r['n']} driver(s), {args.gateways} gateways ==")
        for role, pss in r["rows"]:
            print(f"  {role:<14} {pss / mb:7.1f} MB PSS")
        print(f"  {'total':<14} {r['total'] / mb:7.1f} MB PSS   (the drivers themselves: "
              f"{r['drivers_pss'] / mb:.1f} MB)")
        print(f"  idle CPU over {args.idle:.0f} s: {r['cpu']:.2f} % of one core")
        print(f"  all {r['devices']} devices served after {r['ready']:.2f} s ({r['served']} seen)")
    print("\n  drivers   total PSS   per extra driver   idle CPU   ready")
    base = results[0]
    for r in results:
        extra = r["n"] - base["n"]
        inc = (r["total"] - base["total"]) / extra / mb if extra else 0.0
        print(f"  {r['n']:>7}   {r['total'] / mb:6.1f} MB   {inc:10.2f} MB       {r['cpu']:5.2f} %   "
              f"{r['ready']:.2f} s")
    ok = all(r["served"] == r["devices"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
