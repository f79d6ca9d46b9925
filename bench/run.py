#!/usr/bin/env python3
"""Benchmark indibroker against indiserver and indipyserver, side by side, in one table.

Scenarios (run each against every server kind; a fresh server for every measurement):

  a  fan-out:  one flood driver, N small setNumberVectors to 1, 16 and 64 clients: delivered
               msgs/s in total and for the slowest client, and loss
  b  fan-in:   4 flood drivers flooding at once to one client
  c  BLOBs:    8 MB BLOBs flooded to 1 and 4 clients: MB/s (a server may drop BLOBs for clients
               that fall behind: that is the loss column)
  d  latency:  round trip of a newNumberVector answered by a driver (p50/p99), idle and while
               another driver floods another client
  e  idle:     1000 idle connections: server RSS/PSS per connection (whole process tree, minus
               the empty server), time for them all to connect and get definitions, and the time
               one message takes to reach all 1000
  f  ceiling:  the flood driver piped straight into a reader, no server at all

Every wait has a deadline: a server that cannot keep up is reported with the rate it managed
(marked *), not waited for. indipyserver accepts at most 10 clients, so scenarios with more are
"n/a" for it. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import clients
from clients import close_all, collect_all, def_marker, enable_blob, get_properties, spawn_groups, start_flood
from servers import KINDS, MAX_CLIENTS, Server, ServerError, available

REACH_ROUNDS = 5  # (e): one message to all, measured this many times
SCENARIOS = {"a": "fanout", "b": "fanin", "c": "blob", "d": "latency", "e": "idle", "f": "ceiling"}
NO_SERVER = "no server"
HOST = "127.0.0.1"


@dataclass
class Params:
    fanout: dict[int, int]  # clients -> messages flooded
    fanin: int  # messages per driver
    blob_mb: float
    blobs: int  # BLOBs flooded
    blob_clients: tuple[int, ...]
    pings: int
    idle_conns: int
    idle_ready: float  # seconds for them all to connect and get their definition
    ceiling_msgs: int
    ceiling_blobs: int
    deadline: float  # seconds a flood may take before we report what arrived
    quiet: float  # stop waiting after this long without a byte


FULL = Params(fanout={1: 200_000, 16: 50_000, 64: 20_000}, fanin=100_000, blob_mb=8, blobs=32,
              blob_clients=(1, 4), pings=2000, idle_conns=1000, idle_ready=120.0,
              ceiling_msgs=2_000_000, ceiling_blobs=64, deadline=60.0, quiet=10.0)
QUICK = Params(fanout={1: 20_000, 16: 10_000, 64: 5_000}, fanin=10_000, blob_mb=8, blobs=6,
               blob_clients=(1, 4), pings=200, idle_conns=1000, idle_ready=20.0,
               ceiling_msgs=500_000, ceiling_blobs=8, deadline=6.0, quiet=3.0)


@dataclass
class Cell:
    value: float | None = None
    text: str = ""  # shown instead of the value (n/a, FAIL, ...)
    flag: str = ""  # appended: * deadline reached, ! stalled, x dropped by the server


@dataclass
class Row:
    key: str
    label: str
    unit: str
    better: str  # "higher", "lower" or ""
    cells: dict[str, Cell] = field(default_factory=dict)


def fmt_value(value: float, unit: str) -> str:
    if unit == "msgs/s":
        return f"{value:,.0f}" if value >= 10 else f"{value:.2f}"
    if unit in ("MB/s", "KB/conn", "MB"):
        return f"{value:,.1f}"
    if unit == "ms":
        return f"{value:,.3f}" if value < 10 else f"{value:,.1f}"
    if unit == "s":
        return f"{value:,.2f}"
    if unit == "%":
        return "0" if value == 0 else (f"{value:.2f}" if value < 10 else f"{value:.1f}")
    return f"{value:g}"


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        base = QUICK if args.quick else FULL
        self.params = dataclasses.replace(base, deadline=args.deadline) if args.deadline else base
        self.kinds: list[str] = args.servers
        self.rows: dict[str, Row] = {}
        self.notes: list[str] = []
        self.port = args.port_base
        self.workroot = Path(tempfile.mkdtemp(prefix="indibroker-bench-"))
        self.templates = dict(t.split("=", 1) for t in args.template)
        self.procs = args.client_procs
        self.started = time.monotonic()

    # -- bookkeeping ----------------------------------------------------------------------------
    def row(self, key: str, label: str, unit: str, better: str) -> Row:
        if key not in self.rows:
            self.rows[key] = Row(key, label, unit, better)
        return self.rows[key]

    def put(self, key: str, kind: str, cell: Cell) -> None:
        self.rows[key].cells[kind] = cell

    def progress(self, text: str) -> None:
        print(f"{time.monotonic() - self.started:6.1f}s {text}", file=sys.stderr, flush=True)

    def next_port(self) -> int:
        while True:
            port = self.port
            self.port += 1
            with socket.socket() as probe:
                try:
                    probe.bind((HOST, port))
                    return port
                except OSError:
                    continue

    @contextlib.contextmanager
    def server(self, kind: str, devices: list[str]) -> Iterator[Server]:
        port = self.next_port()
        srv = Server(kind, port, devices, self.workroot / f"{kind}-{port}", self.templates.get(kind))
        srv.start()
        try:
            yield srv
        finally:
            killed = srv.stop()
            if killed:
                self.notes.append(f"{kind} on port {port}: had to SIGKILL {len(killed)} process(es) at stop: "
                                  + "; ".join(killed))

    def too_many(self, kind: str, clients_needed: int, keys: list[str]) -> bool:
        limit = MAX_CLIENTS.get(kind)
        if limit is not None and clients_needed > limit:
            for key in keys:
                self.put(key, kind, Cell(text=f"n/a (maxconnections ≤ {limit})"))
            return True
        return False

    def guarded(self, kind: str, what: str, keys: list[str], body: Callable[[], None]) -> None:
        try:
            body()
        except (ServerError, RuntimeError, TimeoutError, OSError) as exc:
            for key in keys:
                if kind not in self.rows[key].cells:
                    self.put(key, kind, Cell(text="FAIL"))
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.notes.append(f"{kind} {what}: FAIL: {first}")
            self.progress(f"  FAIL: {exc}")
            if self.args.verbose:
                traceback.print_exc()

    # -- shared measurement --------------------------------------------------------------------------
    def flood(self, port: int, n: int, devices: list[str], count: int, blob_mb: float = 0.0,
              ) -> tuple[list[dict[str, Any]], float]:
        """n clients, each counting `devices`; client 0 starts every device's flood. -> results, t0."""
        blob = blob_mb > 0
        hello = get_properties() + b"".join(enable_blob(d) for d in devices if blob)
        ready = [def_marker(d) for d in devices] + [def_marker(d, "BLOB", "BLOB") for d in devices if blob]
        groups = spawn_groups(HOST, port, n, self.procs, hello=hello, ready=ready, devices=devices,
                              blob=blob, expected=count)
        try:
            t0 = groups[0].send(b"".join(start_flood(d, count, blob_mb) for d in devices))
            results = collect_all(groups, t0, t0 + self.params.deadline, self.params.quiet)
        finally:
            close_all(groups)
        return results, t0

    @staticmethod
    def summarise(results: list[dict[str, Any]], t0: float) -> dict[str, Any]:
        """Total and slowest-client rates (items/s), per-device slowest rate, loss and flag."""
        why = {r["why"] for r in results}
        streams = [s for r in results for s in r["streams"]]
        t_end = max(r["t_end"] for r in results)
        deadline = "deadline" in why

        def span(last: float | None, done: bool) -> float:
            end = t_end if (deadline and not done) else (last or t_end)
            return max(end - t0, 1e-9)

        got = expected = lost = 0
        client_rates, device_rates, lasts = [], [], []
        eofs = 0
        for stream in streams:
            eofs += stream["eof"]
            devs = stream["devices"]
            count = sum(d["count"] for d in devs)
            got += count
            expected += sum(d["expected"] for d in devs)
            # Lost: what never came although the flood's end did, or the gaps before the last one seen.
            lost += sum(max(0, d["expected"] - d["count"]) if d["done"] else d["missing"] for d in devs)
            last = max((d["last_t"] for d in devs if d["last_t"]), default=None)
            done = all(d["done"] for d in devs)
            client_rates.append(count / span(last, done))
            device_rates += [d["count"] / span(d["last_t"], d["done"]) for d in devs]
            if last:
                lasts.append(last)
        all_done = all(d["done"] for s in streams for d in s["devices"])
        total = got / span(max(lasts, default=None), all_done)
        flag = "*" if deadline else ("!" if "idle" in why and not all_done else "")
        if eofs:
            flag += "x"
        return {"total": total, "slowest": min(client_rates), "slowest_device": min(device_rates),
                "loss": 100.0 * lost / expected if expected else 0.0, "flag": flag,
                "got": got, "expected": expected, "lost": lost, "eofs": eofs, "why": sorted(why)}

    # -- (a) fan-out -----------------------------------------------------------------------------------
    def fanout(self, kind: str) -> None:
        for n, count in self.params.fanout.items():
            who = "1 client" if n == 1 else f"{n} clients"
            keys = [f"a{n}.total"] + ([f"a{n}.slowest"] if n > 1 else []) + [f"a{n}.loss"]
            self.row(keys[0], f"(a) fan-out 1 driver → {who}: total", "msgs/s", "higher")
            if n > 1:
                self.row(keys[1], f"(a) fan-out → {who}: slowest client", "msgs/s", "higher")
            self.row(keys[-1], f"(a) fan-out → {who}: loss", "%", "lower")
            if self.too_many(kind, n, keys):
                continue
            self.progress(f"[{kind}] (a) fan-out: {count:,} messages to {who}")

            def body(n: int = n, count: int = count, keys: list[str] = keys) -> None:
                with self.server(kind, ["Flood1"]) as srv:
                    results, t0 = self.flood(srv.port, n, ["Flood1"], count)
                s = self.summarise(results, t0)
                self.put(keys[0], kind, Cell(s["total"], flag=s["flag"]))
                if n > 1:
                    self.put(keys[1], kind, Cell(s["slowest"], flag=s["flag"]))
                self.put(keys[-1], kind, Cell(s["loss"], flag=s["flag"]))
                self.progress(f"  {s['total']:,.0f} msgs/s total, slowest client {s['slowest']:,.0f}/s, "
                              f"{s['got']:,}/{s['expected']:,} delivered ({', '.join(s['why'])})")

            self.guarded(kind, f"(a) fan-out to {who}", keys, body)

    # -- (b) fan-in -------------------------------------------------------------------------------------
    def fanin(self, kind: str) -> None:
        keys = ["b.total", "b.slowest", "b.loss"]
        self.row(keys[0], "(b) fan-in 4 drivers → 1 client: total", "msgs/s", "higher")
        self.row(keys[1], "(b) fan-in: slowest driver's stream", "msgs/s", "higher")
        self.row(keys[2], "(b) fan-in: loss", "%", "lower")
        devices = [f"Flood{i}" for i in range(1, 5)]
        count = self.params.fanin
        self.progress(f"[{kind}] (b) fan-in: 4 drivers × {count:,} messages to 1 client")

        def body() -> None:
            with self.server(kind, devices) as srv:
                results, t0 = self.flood(srv.port, 1, devices, count)
            s = self.summarise(results, t0)
            self.put(keys[0], kind, Cell(s["total"], flag=s["flag"]))
            self.put(keys[1], kind, Cell(s["slowest_device"], flag=s["flag"]))
            self.put(keys[2], kind, Cell(s["loss"], flag=s["flag"]))
            self.progress(f"  {s['total']:,.0f} msgs/s, slowest driver {s['slowest_device']:,.0f}/s, "
                          f"{s['got']:,}/{s['expected']:,} delivered ({', '.join(s['why'])})")

        self.guarded(kind, "(b) fan-in", keys, body)

    # -- (c) BLOBs --------------------------------------------------------------------------------------
    def blob(self, kind: str) -> None:
        mb, count = self.params.blob_mb, self.params.blobs
        for n in self.params.blob_clients:
            who = "1 client" if n == 1 else f"{n} clients"
            keys = [f"c{n}.total"] + ([f"c{n}.slowest"] if n > 1 else []) + [f"c{n}.loss"]
            self.row(keys[0], f"(c) {mb:g} MB BLOBs → {who}: total", "MB/s", "higher")
            if n > 1:
                self.row(keys[1], f"(c) BLOBs → {who}: slowest client", "MB/s", "higher")
            self.row(keys[-1], f"(c) BLOBs → {who}: dropped", "%", "lower")
            if self.too_many(kind, n, keys):
                continue
            self.progress(f"[{kind}] (c) BLOBs: {count} × {mb:g} MB to {who}")

            def body(n: int = n, keys: list[str] = keys) -> None:
                with self.server(kind, ["Flood1"]) as srv:
                    results, t0 = self.flood(srv.port, n, ["Flood1"], count, mb)
                s = self.summarise(results, t0)
                self.put(keys[0], kind, Cell(s["total"] * mb, flag=s["flag"]))
                if n > 1:
                    self.put(keys[1], kind, Cell(s["slowest"] * mb, flag=s["flag"]))
                self.put(keys[-1], kind, Cell(s["loss"], flag=s["flag"]))
                self.progress(f"  {s['total'] * mb:,.1f} MB/s total, "
                              f"slowest client {s['slowest'] * mb:,.1f} MB/s, "
                              f"{s['got']}/{s['expected']} BLOBs delivered ({', '.join(s['why'])})")

            self.guarded(kind, f"(c) BLOBs to {who}", keys, body)

    # -- (d) latency ------------------------------------------------------------------------------------
    def latency(self, kind: str) -> None:
        keys = ["d.idle50", "d.idle99", "d.flood50", "d.flood99", "d.timeouts", "d.rate"]
        self.row(keys[0], "(d) round trip, idle: p50", "ms", "lower")
        self.row(keys[1], "(d) round trip, idle: p99", "ms", "lower")
        self.row(keys[2], "(d) round trip, other driver flooding: p50", "ms", "lower")
        self.row(keys[3], "(d) round trip, other driver flooding: p99", "ms", "lower")
        self.row(keys[4], "(d) round trips timed out/sent: idle, flooding", "", "lower")
        self.row(keys[5], "(d) the flood meanwhile, to its client", "msgs/s", "higher")
        pings, timeout = self.params.pings, 2.0
        budget = self.params.deadline / 2  # per phase
        self.progress(f"[{kind}] (d) latency: {pings} round trips idle, then {pings} during a flood")

        def pct(rtts: list[float | None], q: float) -> Cell:
            answered = sorted(r for r in rtts if r is not None)
            if not answered:
                return Cell(text="no answer")
            k = min(len(rtts) - 1, int(round(q * (len(rtts) - 1))))
            if k >= len(answered):
                return Cell(text=f"> {timeout * 1e3:.0f}")
            return Cell(answered[k] * 1e3)

        def body() -> None:
            with self.server(kind, ["Flood1", "Ping1"]) as srv:
                lat = clients.Latency(HOST, srv.port, "Ping1")
                try:
                    idle = lat.ping(pings, timeout, budget)
                    groups = spawn_groups(HOST, srv.port, 1, 1, hello=get_properties("Flood1"),
                                          ready=[def_marker("Flood1")], devices=["Flood1"])
                    try:
                        t0 = groups[0].send(start_flood("Flood1", 10**9))
                        time.sleep(0.3)
                        busy = lat.ping(pings, timeout, budget)
                        now = time.monotonic()
                        flood = collect_all(groups, t0, now, 0)
                        groups[0].send(start_flood("Flood1", 0))
                    finally:
                        close_all(groups)
                finally:
                    lat.close()
            for key, cell in zip(keys[:4], [pct(idle, 0.5), pct(idle, 0.99), pct(busy, 0.5), pct(busy, 0.99)],
                                 strict=True):
                self.put(key, kind, cell)
            lost_idle = sum(r is None for r in idle)
            lost_busy = sum(r is None for r in busy)
            self.put(keys[4], kind, Cell(text=f"{lost_idle}/{len(idle)}, {lost_busy}/{len(busy)}"))
            s = self.summarise(flood, t0)
            self.put(keys[5], kind, Cell(s["got"] / max(now - t0, 1e-9)))
            med = [statistics.median(r for r in x if r is not None) * 1e3 if any(r is not None for r in x)
                   else float("nan") for x in (idle, busy)]
            rate = s["got"] / max(now - t0, 1e-9)
            self.progress(f"  p50 idle {med[0]:.3f} ms, flooding {med[1]:.3f} ms; timed out {lost_idle}/"
                          f"{len(idle)}, {lost_busy}/{len(busy)}; flood {rate:,.0f} msgs/s meanwhile")

        self.guarded(kind, "(d) latency", keys, body)

    # -- (e) idle connections ------------------------------------------------------------------------
    def idle(self, kind: str) -> None:
        n = self.params.idle_conns
        keys = ["e.rss", "e.pss", "e.base", "e.ready", "e.all"]
        self.row(keys[0], f"(e) {n} idle clients: RSS per connection", "KB/conn", "lower")
        self.row(keys[1], f"(e) {n} idle clients: PSS per connection", "KB/conn", "lower")
        self.row(keys[2], "(e) empty server, whole tree: PSS", "MB", "lower")
        self.row(keys[3], f"(e) {n} clients connected and defined in", "s", "lower")
        self.row(keys[4], f"(e) one message reaches all {n} in (median of {REACH_ROUNDS})", "ms", "lower")
        if self.too_many(kind, n, keys):
            return
        self.progress(f"[{kind}] (e) {n} idle connections")

        def body() -> None:
            with self.server(kind, ["Flood1"]) as srv:
                srv.settle()
                before = srv.memory()
                t_connect = time.monotonic()
                groups = spawn_groups(HOST, srv.port, n, min(self.procs, 2), require_all=False,
                                      hello=get_properties("Flood1", "SEQ"), ready=[def_marker("Flood1")],
                                      devices=["Flood1"], expected=1, ready_timeout=self.params.idle_ready)
                try:
                    t_ready = time.monotonic() - t_connect
                    ready = sum(g.info["ready"] for g in groups)
                    conns = sum(g.info["connected"] for g in groups)
                    srv.settle(self.params.quiet)
                    after = srv.memory()
                    # One message to all, several times (one shot moves ±30 % with the scheduler).
                    reach: list[float] = []
                    for _ in range(REACH_ROUNDS):
                        for group in groups:
                            group.reset()
                        t0 = groups[0].send(start_flood("Flood1", 1))
                        results = collect_all(groups, t0, t0 + self.params.deadline, self.params.quiet)
                        firsts = [d["first_t"] for r in results for s in r["streams"] for d in s["devices"]]
                        got = [t for t in firsts if t is not None]
                        if len(got) != len(firsts):
                            break
                        reach.append(max(got) - t0)
                finally:
                    close_all(groups)
            per = max(conns, 1) * 1024
            partial = "" if ready == n else "†"
            self.put(keys[0], kind, Cell((after["rss"] - before["rss"]) / per, flag=partial))
            if before["pss"] is not None and after["pss"] is not None:
                self.put(keys[1], kind, Cell((after["pss"] - before["pss"]) / per, flag=partial))
                self.put(keys[2], kind, Cell(before["pss"] / 2**20))
            else:
                self.put(keys[1], kind, Cell(text="n/a (no PSS)"))
                self.put(keys[2], kind, Cell(text="n/a (no PSS)"))
            if ready == n:
                self.put(keys[3], kind, Cell(t_ready))
            else:
                self.put(keys[3], kind, Cell(text=f"> {t_ready:.0f} ({ready} ready, {conns} connected)"))
            if len(reach) == REACH_ROUNDS:
                self.put(keys[4], kind, Cell(statistics.median(reach) * 1e3))
            else:
                self.put(keys[4], kind, Cell(text=f"{len(got)}/{len(firsts)} in {self.params.deadline:g} s"))
            self.progress(f"  RSS +{(after['rss'] - before['rss']) / per:.1f} KB/conn, "
                          f"{ready}/{n} ready in {t_ready:.2f} s, "
                          f"{len(got)}/{len(firsts)} got the message; all in (ms) "
                          + ", ".join(f"{r * 1e3:.1f}" for r in reach))

        self.guarded(kind, f"(e) {n} idle connections", keys, body)

    # -- (f) ceiling ---------------------------------------------------------------------------------
    def ceiling(self) -> None:
        p = self.params
        self.row("f.msgs", "(f) ceiling: flood driver piped into one reader", "msgs/s", "higher")
        self.row("f.blob", f"(f) ceiling: {p.blob_mb:g} MB BLOBs piped into one reader", "MB/s", "higher")
        self.progress(f"[{NO_SERVER}] (f) ceiling: {p.ceiling_msgs:,} messages and "
                      f"{p.ceiling_blobs} BLOBs, piped")

        def body() -> None:
            for key, count, mb in (("f.msgs", p.ceiling_msgs, 0.0), ("f.blob", p.ceiling_blobs, p.blob_mb)):
                result = clients.pipe_flood("Flood1", count, mb, p.deadline)
                s = self.summarise([result], result["t0"])
                self.put(key, NO_SERVER, Cell(s["total"] * (mb or 1), flag=s["flag"]))
            msgs, blob = self.rows["f.msgs"].cells[NO_SERVER], self.rows["f.blob"].cells[NO_SERVER]
            self.progress(f"  {msgs.value or 0:,.0f} msgs/s, {blob.value or 0:,.1f} MB/s")

        self.guarded(NO_SERVER, "(f) ceiling", ["f.msgs", "f.blob"], body)

    # -- the whole run ------------------------------------------------------------------------------
    def run(self) -> None:
        for letter in self.args.scenarios:
            name = SCENARIOS[letter]
            if name == "ceiling":
                self.ceiling()
                continue
            for kind in self.kinds:
                getattr(self, name)(kind)

    def cleanup(self) -> None:
        if self.args.keep:
            print(f"run: server logs kept in {self.workroot}", file=sys.stderr)
        else:
            shutil.rmtree(self.workroot, ignore_errors=True)

    # -- the table -----------------------------------------------------------------------------------
    def table(self) -> str:
        show_ceiling = any(NO_SERVER in r.cells for r in self.rows.values())
        columns = list(self.kinds) + ([NO_SERVER] if show_ceiling else [])
        ratios = [(a, b) for a, b in (("indibroker", "indiserver"), ("indibroker", "indipyserver"))
                  if a in self.kinds and b in self.kinds]
        short = {"indibroker": "ib", "indiserver": "is", "indipyserver": "ipy"}
        header = ["scenario / metric", "unit", "better", *columns,
                  *[f"{short[a]}/{short[b]}" for a, b in ratios]]
        lines = [header]
        for row in self.rows.values():
            cells = []
            for col in columns:
                cell = row.cells.get(col)
                if cell is None:
                    cells.append("")
                elif cell.text:
                    cells.append(cell.text)
                elif cell.value is None:
                    cells.append("-")
                else:
                    cells.append(fmt_value(cell.value, row.unit) + cell.flag)
            for a, b in ratios:
                ca, cb = row.cells.get(a), row.cells.get(b)
                if row.unit == "%":
                    cells.append("")  # a ratio of loss percentages says nothing useful
                elif ca and cb and ca.value is not None and cb.value is not None \
                        and not ca.text and not cb.text:
                    if cb.value > 0:
                        ratio = ca.value / cb.value
                        cells.append(f"{ratio:.2f}x" if ratio < 100 else f"{ratio:,.0f}x")
                    else:
                        cells.append("∞" if ca.value > 0 else "=")
                else:
                    cells.append("")
            lines.append([row.label, row.unit, row.better, *cells])
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out = []
        for i, line in enumerate(lines):
            text = "  ".join(c.ljust(w) if j < 3 else c.rjust(w)
                             for j, (c, w) in enumerate(zip(line, widths, strict=True)))
            out.append(text.rstrip())
            if i == 0:
                out.append("-" * len(out[0]))
        legend = ("* deadline reached: rates count what arrived by then, loss counts only gaps seen;\n"
                  "† not all idle clients got ready in time: per connection of those connected;\n"
                  "! stalled: nothing came for a while before the end;  "
                  "x the server closed a client's connection;\n"
                  "loss: messages a server dropped (the flood's end or later numbers came without them);\n"
                  "ratios: ib = indibroker, is = indiserver, ipy = indipyserver")
        return "\n".join(out + ["", legend] + [f"note: {n}" for n in self.notes])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--servers", default=",".join(KINDS),
                        help=f"comma-separated server kinds to compare (default {','.join(KINDS)})")
    parser.add_argument("--scenarios", default="abcdef",
                        help="scenario letters or names, e.g. 'ad' or 'fanout,latency' (default abcdef)")
    parser.add_argument("--quick", action="store_true",
                        help="small counts and a 6 s deadline: about 2 minutes for everything")
    parser.add_argument("--port-base", type=int, default=17600, help="first TCP port to use (default 17600)")
    parser.add_argument("--deadline", type=float, help="seconds a flood may take (default 60, --quick 6)")
    parser.add_argument("--client-procs", type=int, default=max(2, os.cpu_count() or 2),
                        help="processes the clients of one measurement share (default: CPUs, at least 2)")
    parser.add_argument("--template", action="append", default=[], metavar="KIND=COMMAND",
                        help="replace a kind's server command template (see servers.py), repeatable")
    parser.add_argument("--json", metavar="FILE", help="also write every result to FILE as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the servers' logs and work directories")
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks for failures")
    args = parser.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for kind in args.servers:
        if kind not in KINDS:
            parser.error(f"unknown server kind {kind!r} (known: {', '.join(KINDS)})")
    names = {v: k for k, v in SCENARIOS.items()}
    text = args.scenarios.replace(" ", "")
    if "," in text or text in names:
        letters = [names.get(t, t) for t in text.split(",")]
    else:
        letters = list(text)
    known = ", ".join(f"{k}={v}" for k, v in SCENARIOS.items())
    for letter in letters:
        if letter not in SCENARIOS:
            parser.error(f"unknown scenario {letter!r} (known: {known})")
    args.scenarios = sorted(set(letters))
    for t in args.template:
        if "=" not in t or t.split("=", 1)[0] not in KINDS:
            parser.error(f"--template {t!r}: expected KIND=COMMAND")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for kind in list(args.servers):
        why = available(kind)
        if why:
            print(f"run: skipping {kind}: {why}", file=sys.stderr)
            args.servers.remove(kind)
    bench = Bench(args)
    started = time.monotonic()
    load_before = os.getloadavg()
    try:
        bench.run()
    except KeyboardInterrupt:
        bench.notes.append("interrupted: the table is partial")
    finally:
        bench.cleanup()
    elapsed = time.monotonic() - started
    load = " / ".join(f"{x:.1f}" for x in (load_before[0], os.getloadavg()[0]))
    print(f"\nINDI server benchmark ({'quick' if args.quick else 'full'}): {os.cpu_count()} CPUs, "
          f"load average {load} (start / end), {elapsed:.0f} s; servers: {', '.join(args.servers)}\n")
    print(bench.table())
    if args.json:
        data = {"params": asdict(bench.params), "elapsed": elapsed, "servers": args.servers,
                "rows": [{"key": r.key, "label": r.label, "unit": r.unit, "better": r.better,
                          "cells": {k: asdict(c) for k, c in r.cells.items()}} for r in bench.rows.values()],
                "notes": bench.notes}
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
