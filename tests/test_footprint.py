"""Issue 9: a lean footprint. Flooding drivers do not delay others; an idle server stays idle."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
from support import clients, is_, member, wait_until

PYSCRIPTS = Path(__file__).parent / "pyscripts"


def own_processes(b) -> list[psutil.Process]:
    """indibroker's own processes: the tree minus the drivers it runs."""
    out = []
    for p in b.tree():
        try:
            if p.name().startswith("ib-") or "indibroker" in " ".join(p.cmdline()[:4]):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_flooding_driver_does_not_delay_another_in_the_same_worker(broker_factory):
    b = broker_factory("--exdriver", str(PYSCRIPTS / "flooder.py"), "--exdriver", str(PYSCRIPTS / "ticker.py"))
    workers = [r for r in b.status() if r["role"] == "exdriver"]
    assert len(workers) == 1  # both drivers share one supervisor
    with clients(b.port, 1) as (watcher,):
        watcher.send('<getProperties version="1.7" device="Ticker"/>')
        watcher.wait_for(is_("setNumberVector", "Ticker"), 20)
        start = len(watcher.elements)
        end = time.monotonic() + 6
        while time.monotonic() < end:
            watcher.pump(0.01)
        latencies = [arrived - float(member(e, "T"))
                     for e, arrived in zip(watcher.elements[start:], watcher.arrivals[start:], strict=True)
                     if is_("setNumberVector", "Ticker", "T")(e)]
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    assert len(latencies) > 100
    flooder = next(r for r in b.status() if r["name"] == "flooder.py")
    assert flooder["cpu_percent"] is not None
    assert p99 < 0.050, f"p99 {p99 * 1000:.1f} ms"


def test_idle_cpu_after_clients_have_gone(broker_factory):
    b = broker_factory("--gateways", "2", "--exdriver", str(PYSCRIPTS / "ticker.py"))
    with clients(b.port, 20) as cs:
        for c in cs:
            c.send('<getProperties version="1.7"/>')
        for c in cs:
            c.wait_for(is_("setNumberVector", "Ticker"), 20)
    b.cli("driver", "stop", "ticker.py")  # no driver traffic either: the server itself must go quiet
    wait_until(lambda: any(r["state"] == "STOPPED" for r in b.status() if r["role"] == "driver"), 10)
    procs = own_processes(b)
    assert len(procs) >= 4
    for p in procs:
        p.cpu_percent(None)
    time.sleep(5)  # a measurement window, not a synchronisation
    total = sum(p.cpu_percent(None) for p in procs)
    assert total < 1.0, f"{total:.2f}% of a core while idle"
