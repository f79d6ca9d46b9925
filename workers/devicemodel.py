"""The server device's INDI model, pure: status rows in, property definitions and messages out.

`build()` turns the rows `indibroker status` shows (the arbiter's `status()`) into a snapshot,
a dict of INDI properties by name; `diff()` turns two snapshots into the def/set/del messages
that take a client from the first to the second (a property whose definition changed, its
members say, is deleted and defined again: INDI cannot change a definition in place);
`overlay()` lays an operator's pending request over a snapshot, so a switch pressed shows Busy
with what was asked until the server's state says it is done. No I/O and no clock of its own:
workers/serverdevice.py does those, and tests/test_devicemodel.py checks `diff` against a
client-side model with hypothesis.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from lxml import etree

from indibroker.broker import wire
from indibroker.broker.config import LOG_LEVELS
from indibroker.workers import indi

__all__ = ["Member", "Prop", "Snapshot", "Names", "Hold", "build", "diff", "overlay", "merge_usage",
           "defs", "define", "update", "SHOULD_RUN"]

SHOULD_RUN = ("STARTING", "RUNNING", "BACKOFF")  # a driver in these states is meant to run: On
# The lights: Idle stopped, Ok running, Busy starting or backing off, Alert FATAL.
LIGHTS = {"STOPPED": "Idle", "RUNNING": "Ok", "STARTING": "Busy", "BACKOFF": "Busy", "STOPPING": "Busy",
          "FATAL": "Alert"}
# Figures that change all the time: taken from the last poll with CPU and memory only.
VOLATILE = ("uptime", "cpu_percent", "rss", "messages", "bytes")

SERVER, DRIVERS, WORKERS, CLIENTS = "Server", "Drivers", "Workers", "Clients"  # the tabs (INDI groups)


class Member(NamedTuple):
    name: str
    label: str
    value: str  # as sent: On/Off, Idle/Ok/Busy/Alert, text, or a number's text
    format: str = ""  # numbers only (printf style, as INDI's)


@dataclass(frozen=True)
class Prop:
    kind: str  # Text, Number, Switch, Light
    name: str
    label: str
    group: str
    state: str
    members: tuple[Member, ...]
    perm: str = "ro"
    rule: str = ""  # switches: OneOfMany, AtMostOne, AnyOfMany

    def shape(self) -> tuple[Any, ...]:
        """What only a new definition can change."""
        return (self.kind, self.label, self.group, self.perm, self.rule,
                tuple((m.name, m.label, m.format) for m in self.members))

    def values(self) -> dict[str, str]:
        return {m.name: m.value for m in self.members}


Snapshot = dict[str, Prop]


class Names:
    """Stable INDI names for driver and process names: [A-Za-z0-9_] only, unique, and the same
    for a name for as long as the worker runs (a client's script keeps working)."""

    def __init__(self) -> None:
        self._of: dict[str, str] = {}
        self._taken: set[str] = set()

    def of(self, name: str) -> str:
        known = self._of.get(name)
        if known is not None:
            return known
        base = re.sub(r"[^A-Za-z0-9_]", "_", name) or "_"
        out, n = base, 2
        while out in self._taken:
            out, n = f"{base}_{n}", n + 1
        self._of[name] = out
        self._taken.add(out)
        return out

    def name_of(self, member: str) -> str | None:
        """The driver or process a member name stands for."""
        for name, out in self._of.items():
            if out == member:
                return name
        return None


# -- rows → snapshot ---------------------------------------------------------------------------
def merge_usage(rows: list[dict[str, Any]], full: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a cheap poll with the figures that change all the time (uptime, CPU, memory,
    counters) taken from the last full poll, for the same process: so those are sent at most
    as often as full polls are made, not at every poll."""
    last = {(r.get("role"), r.get("name"), r.get("pid")): r for r in full}
    merged = []
    for row in rows:
        source = last.get((row.get("role"), row.get("name"), row.get("pid")))
        # A process started since: its own figures until the next full poll (uptime only).
        merged.append(row if source is None else {**row, **{k: source.get(k) for k in VOLATILE}})
    return merged


def _light(row: dict[str, Any]) -> str:
    light = LIGHTS.get(str(row.get("state")), "Idle")
    if row.get("role") == "remote" and light == "Ok" and row.get("link", "connected") != "connected":
        return "Busy"  # the bridge runs, its server is not there: backing off
    return light


def _num(value: Any) -> str:
    return "0" if not isinstance(value, int | float) or isinstance(value, bool) else f"{value:g}"


def _mb(value: Any) -> str:
    return _num(round(value / 1048576, 1) if isinstance(value, int | float) else None)


def _process(prefix: str, key: str, row: dict[str, Any], group: str, text: list[Member],
             operator_restarts: bool) -> list[Prop]:
    """One process's two vectors: what it is (text; the vector's light is its state) and its
    figures (numbers)."""
    light = _light(row)
    numbers = [Member("PID", "Process id", _num(row.get("pid")), "%.0f"),
               Member("RESTARTS", "Restarts after a crash", _num(row.get("restarts")), "%.0f")]
    if operator_restarts:
        numbers.append(Member("OPERATOR_RESTARTS", "Restarts asked for", _num(row.get("operator_restarts")),
                              "%.0f"))
    numbers += [Member("UPTIME", "Uptime (s)", _num(row.get("uptime")), "%.0f"),
                Member("CPU", "CPU (%)", _num(row.get("cpu_percent")), "%.1f"),
                Member("MEMORY", "Memory RSS (MB)", _mb(row.get("rss")), "%.1f")]
    name = f"{prefix}_{key}"
    return [
        Prop("Text", name, str(row.get("name")), group, light,
             (Member("STATE", "State", str(row.get("state") or "")), *text,
              Member("LAST_EXIT", "Last exit", str(row.get("last_exit") or "")))),
        Prop("Number", f"{name}_USAGE", f"{row.get('name')} usage", group, light, tuple(numbers)),
    ]


def build(rows: list[dict[str, Any]], names: Names, *, version: str, address: str) -> Snapshot:
    """The device's properties for `indibroker status`'s rows, grouped in tabs."""
    by_role: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_role.setdefault(str(row.get("role")), []).append(row)
    arbiter = (by_role.get("arbiter") or [{}])[0]
    broker = (by_role.get("broker") or [{}])[0]
    gateways = by_role.get("gateway", [])
    drivers, remotes = by_role.get("driver", []), by_role.get("remote", [])
    props: list[Prop] = []

    # The server.
    level = str(arbiter.get("log_level", "INFO"))
    props += [
        Prop("Text", "SERVER_INFO", "Server", SERVER, "Ok",
             (Member("VERSION", "Version", version), Member("ADDRESS", "Address", address))),
        Prop("Number", "SERVER_STATS", "Server figures", SERVER, "Ok", (
            Member("UPTIME", "Uptime (s)", _num(arbiter.get("uptime")), "%.0f"),
            Member("CLIENTS", "Clients", _num(sum(g.get("clients", 0) for g in gateways)), "%.0f"),
            Member("MESSAGES", "Messages routed", _num(broker.get("messages")), "%.0f"),
            Member("BYTES", "Bytes routed", _num(broker.get("bytes")), "%.0f"))),
        Prop("Switch", "LOG_LEVEL", "Log level", SERVER, "Ok",
             tuple(Member(lv, lv.capitalize(), "On" if lv == level else "Off") for lv in LOG_LEVELS),
             perm="rw", rule="OneOfMany"),
        Prop("Text", "START_DRIVER", "Start a driver", SERVER, "Idle",
             (Member("DRIVER", "Executable and arguments", ""),
              Member("INDIDEV", "Device name (optional)", "")), perm="rw"),
    ]

    # The drivers: what to run, a light each, then each one's details.
    keys = [names.of(str(d["name"])) for d in drivers]
    if drivers:
        props += [
            Prop("Switch", "DRIVERS", "Drivers running", DRIVERS, "Ok",
                 tuple(Member(k, str(d["name"]), "On" if d.get("state") in SHOULD_RUN else "Off")
                       for k, d in zip(keys, drivers, strict=True)), perm="rw", rule="AnyOfMany"),
            Prop("Switch", "RESTART", "Restart a driver", DRIVERS, "Ok",
                 tuple(Member(k, str(d["name"]), "Off") for k, d in zip(keys, drivers, strict=True)),
                 perm="rw", rule="AtMostOne"),
        ]
    remote_keys = [names.of(str(r["name"])) for r in remotes]
    if drivers or remotes:
        props.append(Prop("Light", "DRIVER_STATES", "Drivers", DRIVERS, "Idle", tuple(
            Member(k, str(r["name"]), _light(r))
            for k, r in zip(keys + remote_keys, drivers + remotes, strict=True))))
    for k, d in zip(keys, drivers, strict=True):
        props += _process("DRIVER", k, d, DRIVERS, [
            Member("DEVICES", "Devices", ", ".join(d.get("devices") or [])),
            Member("WORKER", "Worker", str(d.get("worker") or ""))], operator_restarts=True)
    for k, r in zip(remote_keys, remotes, strict=True):
        props += _process("DRIVER", k, r, DRIVERS, [
            Member("DEVICES", "Devices", ", ".join(r.get("devices") or [])),
            Member("REMOTE", "Remote server", f"{r.get('remote', '')} {r.get('link', '')}".strip()),
            Member("LAST_ERROR", "Last link error", str(r.get("last_error") or ""))], operator_restarts=False)

    # The worker processes (remote bridges are shown with the drivers).
    workers = [r for r in rows if r.get("role") not in ("driver", "remote")]
    worker_keys = [names.of(str(w["name"])) for w in workers]
    props.append(Prop("Light", "WORKER_STATES", "Processes", WORKERS, "Idle", tuple(
        Member(k, str(w["name"]), _light(w)) for k, w in zip(worker_keys, workers, strict=True))))
    for k, w in zip(worker_keys, workers, strict=True):
        props += _process("WORKER", k, w, WORKERS, [], operator_restarts=False)

    # The clients: how many per gateway, and each connection when the gateways say.
    props.append(Prop("Number", "CLIENTS", "Clients per gateway", CLIENTS, "Ok", tuple(
        Member(names.of(str(g["name"])), str(g["name"]), _num(g.get("clients", 0)), "%.0f") for g in gateways)))
    connections = [c for g in gateways for c in g.get("connections") or [] if isinstance(c, dict)]
    if connections:
        props.append(Prop("Text", "CONNECTIONS", "Connections", CLIENTS, "Ok", tuple(
            Member(f"C{i}", str(c.get("address", "?")),
                   f"{_num(c.get('queued'))} bytes queued, {_num(c.get('blobs_dropped'))} BLOBs dropped")
            for i, c in enumerate(connections, 1))))
    return {p.name: p for p in props}


# -- an operator's pending request -------------------------------------------------------------
@dataclass
class Hold:
    """What a property shows while an operator's request is under way: `state` (Busy, or Alert
    after a refusal) and, if given, the values asked for, until the snapshot shows them or
    `until` (the owner's monotonic clock) passes."""

    state: str
    until: float
    values: dict[str, str] = field(default_factory=dict)


def overlay(snapshot: Snapshot, holds: dict[str, Hold], now: float) -> Snapshot:
    """`snapshot` as clients should see it; holds that are over are removed from `holds`."""
    out = dict(snapshot)
    for name, hold in list(holds.items()):
        prop = snapshot.get(name)
        actual = prop.values() if prop is not None else {}
        done = bool(hold.values) and all(actual.get(k) == v for k, v in hold.values.items())
        if prop is None or done or now >= hold.until:
            del holds[name]
            continue
        out[name] = Prop(prop.kind, prop.name, prop.label, prop.group, hold.state,
                         tuple(m._replace(value=hold.values.get(m.name, m.value)) for m in prop.members),
                         prop.perm, prop.rule)
    return out


# -- snapshots → INDI messages -----------------------------------------------------------------
def _set_attrs(el: etree._Element, attrs: dict[str, str]) -> None:
    for key, value in attrs.items():
        el.set(key, value)


def define(device: str, prop: Prop) -> bytes:
    vector = etree.Element(f"def{prop.kind}Vector")
    _set_attrs(vector, {"device": device, "name": prop.name, "label": prop.label, "group": prop.group,
                        "state": prop.state, "timestamp": indi.timestamp()})
    if prop.kind != "Light":
        _set_attrs(vector, {"perm": prop.perm, "timeout": "0"})
    if prop.rule:
        vector.set("rule", prop.rule)
    for m in prop.members:
        one = etree.SubElement(vector, f"def{prop.kind}", name=m.name, label=m.label)
        if prop.kind == "Number":
            _set_attrs(one, {"format": m.format or "%g", "min": "0", "max": "0", "step": "0"})
        one.text = m.value
    return etree.tostring(vector) + b"\n"


def update(device: str, prop: Prop, members: Iterable[Member]) -> bytes:
    vector = etree.Element(f"set{prop.kind}Vector")
    _set_attrs(vector, {"device": device, "name": prop.name, "state": prop.state,
                        "timestamp": indi.timestamp()})
    for m in members:
        etree.SubElement(vector, f"one{prop.kind}", name=m.name).text = m.value
    return etree.tostring(vector) + b"\n"


def defs(device: str, snapshot: Snapshot, name: str = "") -> list[tuple[bytes, str, bytes]]:
    """The definitions a getProperties (for one property, or all) is answered with."""
    return [(wire.DEF, p.name, define(device, p)) for p in snapshot.values() if not name or p.name == name]


def diff(device: str, old: Snapshot, new: Snapshot) -> list[tuple[bytes, str, bytes]]:
    """(verb, property name, payload) taking a client that holds `old` to `new`: deletions
    first, then definitions and updates in `new`'s order. An update carries the members that
    changed (all of them when only the state did)."""
    out = [(wire.DEL, name, indi.del_property(device, name)) for name in old if name not in new]
    for name, prop in new.items():
        before = old.get(name)
        if before is not None and before.shape() != prop.shape():
            out.append((wire.DEL, name, indi.del_property(device, name)))
            before = None
        if before is None:
            out.append((wire.DEF, name, define(device, prop)))
        elif before != prop:
            changed = [m for m, was in zip(prop.members, before.members, strict=True) if m.value != was.value]
            out.append((wire.SET, name, update(device, prop, changed or prop.members)))
    return out
