"""The server device's model, pure: rows to properties, snapshots to def/set/del, holds.

The property test plays a client: whatever sequence of snapshots the worker goes through, a
client that applies the def/set/del messages `diff` emitted holds exactly the latest snapshot.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from indibroker.broker import wire
from indibroker.workers.devicemodel import Hold, Member, Names, Prop, Snapshot, build, defs, diff, merge_usage, overlay

DEVICE = "indibroker"


# -- a client's view: what it knows after the messages ---------------------------------------
Known = dict[str, tuple[str, str, str, str, dict[str, str]]]  # name -> kind, label, group, state, values


def apply(known: Known, messages: list[tuple[bytes, str, bytes]]) -> None:
    for verb, name, payload in messages:
        el = etree.fromstring(payload)
        assert el.get("device") == DEVICE and el.get("name", "") == name
        if verb == wire.DEL:
            assert el.tag == "delProperty"
            if name:
                assert name in known, f"delProperty of {name}, never defined"
                del known[name]
            else:
                known.clear()
        elif verb == wire.DEF:
            kind = el.tag[3:-6]
            assert name not in known, f"{name} defined twice without a delProperty"
            known[name] = (kind, el.get("label"), el.get("group"), el.get("state"),
                           {one.get("name"): one.text or "" for one in el})
        else:
            assert verb == wire.SET and name in known, f"set of {name}, not defined"
            kind, label, group, _, values = known[name]
            assert el.tag == f"set{kind}Vector"
            for one in el:
                assert one.get("name") in values
                values[one.get("name")] = one.text or ""
            known[name] = (kind, label, group, el.get("state"), values)


def view(snapshot: Snapshot) -> Known:
    return {p.name: (p.kind, p.label, p.group, p.state, p.values()) for p in snapshot.values()}


names_ = st.sampled_from(["A", "B", "C", "D"])
values_ = st.sampled_from(["", "0", "1", "On", "Off", "Ok", "x<&\"y"])


@st.composite
def props(draw: Any, name: str) -> Prop:
    kind = draw(st.sampled_from(["Text", "Number", "Switch", "Light"]))
    members = draw(st.lists(st.sampled_from(["m1", "m2", "m3"]), min_size=1, max_size=3, unique=True))
    return Prop(kind, name, draw(st.sampled_from(["one", "two"])), draw(st.sampled_from(["G1", "G2"])),
                draw(st.sampled_from(["Idle", "Ok", "Busy", "Alert"])),
                tuple(Member(m, m.upper(), draw(values_)) for m in members))


@st.composite
def snapshots(draw: Any) -> Snapshot:
    chosen = draw(st.lists(names_, unique=True))
    return {name: draw(props(name)) for name in chosen}


@settings(max_examples=300, deadline=None)
@given(st.lists(snapshots(), min_size=1, max_size=6))
def test_a_client_applying_the_diffs_holds_the_latest_snapshot(sequence: list[Snapshot]) -> None:
    known: Known = {}
    old: Snapshot = {}
    for new in sequence:
        apply(known, diff(DEVICE, old, new))
        assert known == view(new)
        old = new


def test_nothing_is_sent_when_nothing_changed() -> None:
    snap = build(ROWS, Names(), version="1", address="h:1")
    assert diff(DEVICE, snap, dict(snap)) == []


def test_defs_answer_a_getproperties_for_one_property_or_all() -> None:
    snap = build(ROWS, Names(), version="1", address="h:1")
    assert [n for _, n, _ in defs(DEVICE, snap, "DRIVERS")] == ["DRIVERS"]
    assert len(defs(DEVICE, snap)) == len(snap)


# -- rows to properties --------------------------------------------------------------------
ROWS: list[dict[str, Any]] = [
    {"role": "arbiter", "name": "arbiter", "pid": 10, "state": "RUNNING", "restarts": 0, "uptime": 5.0,
     "cpu_percent": 0.5, "rss": 30 * 1048576, "last_exit": "", "log_level": "DEBUG"},
    {"role": "broker", "name": "broker", "pid": 11, "state": "RUNNING", "restarts": 1, "uptime": 4.0,
     "last_exit": "killed by SIGKILL", "devices": [], "messages": 120, "bytes": 4096},
    {"role": "gateway", "name": "gateway-0", "pid": 12, "state": "RUNNING", "restarts": 0, "uptime": 4.0,
     "clients": 2, "connections": [{"address": "127.0.0.1:5000", "queued": 10, "blobs_dropped": 1}]},
    {"role": "exdriver", "name": "exdriver-0", "pid": 13, "state": "RUNNING", "restarts": 0},
    {"role": "driver", "name": "indi_simulator_ccd", "pid": 14, "state": "RUNNING", "restarts": 2,
     "operator_restarts": 1, "devices": ["CCD Simulator"], "worker": "exdriver-0", "last_exit": "exit 1"},
    {"role": "driver", "name": "my-driver.2", "pid": None, "state": "FATAL", "restarts": 10,
     "devices": [], "worker": "exdriver-0", "last_exit": "exit 3"},
    {"role": "driver", "name": "stopped one", "pid": None, "state": "STOPPED", "restarts": 0},
    {"role": "driver", "name": "backing", "pid": None, "state": "BACKOFF", "restarts": 1},
    {"role": "remote", "name": "remote-0", "pid": 15, "state": "RUNNING", "remote": "host:7624",
     "link": "reconnecting", "last_error": "refused", "devices": []},
]


def test_rows_become_lights_switches_and_details() -> None:
    names = Names()
    snap = build(ROWS, names, version="1.2", address="localhost:7624")
    assert snap["SERVER_INFO"].values() == {"VERSION": "1.2", "ADDRESS": "localhost:7624"}
    assert snap["SERVER_STATS"].values() == {"UPTIME": "5", "CLIENTS": "2", "MESSAGES": "120", "BYTES": "4096"}
    assert snap["LOG_LEVEL"].values()["DEBUG"] == "On" and snap["LOG_LEVEL"].rule == "OneOfMany"
    # Names as INDI allows them, each driver's own, and stable.
    assert snap["DRIVERS"].values() == {"indi_simulator_ccd": "On", "my_driver_2": "Off", "stopped_one": "Off",
                                        "backing": "On"}
    assert names.name_of("my_driver_2") == "my-driver.2"
    assert snap["DRIVERS"].rule == "AnyOfMany" and snap["RESTART"].rule == "AtMostOne"
    assert set(snap["RESTART"].values().values()) == {"Off"}
    assert snap["DRIVER_STATES"].values() == {"indi_simulator_ccd": "Ok", "my_driver_2": "Alert",
                                              "stopped_one": "Idle", "backing": "Busy", "remote_0": "Busy"}
    ccd = snap["DRIVER_indi_simulator_ccd"]
    assert ccd.state == "Ok" and ccd.values()["DEVICES"] == "CCD Simulator"
    assert snap["DRIVER_indi_simulator_ccd_USAGE"].values()["RESTARTS"] == "2"
    assert snap["DRIVER_indi_simulator_ccd_USAGE"].values()["OPERATOR_RESTARTS"] == "1"
    assert snap["DRIVER_my_driver_2"].state == "Alert"
    assert snap["DRIVER_my_driver_2"].values()["LAST_EXIT"] == "exit 3"
    assert snap["WORKER_broker"].values()["LAST_EXIT"] == "killed by SIGKILL"
    assert snap["WORKER_arbiter_USAGE"].values()["MEMORY"] == "30"
    assert snap["CLIENTS"].values() == {"gateway_0": "2"}
    assert snap["CONNECTIONS"].members[0].label == "127.0.0.1:5000"
    assert {p.group for p in snap.values()} == {"Server", "Drivers", "Workers", "Clients"}
    # A later snapshot keeps the names even when a clashing name comes first.
    again = build([{"role": "driver", "name": "my_driver_2"}, *ROWS], names, version="1.2", address="x")
    assert "my_driver_2_2" in again["DRIVERS"].values() and again["DRIVERS"].values()["my_driver_2"] == "Off"


def test_without_connections_the_clients_are_only_counted() -> None:
    rows = [r if r["role"] != "gateway" else {k: v for k, v in r.items() if k != "connections"} for r in ROWS]
    snap = build(rows, Names(), version="1", address="x")
    assert "CONNECTIONS" not in snap and snap["CLIENTS"].values() == {"gateway_0": "2"}


def test_figures_that_change_all_the_time_come_from_the_last_full_poll() -> None:
    full = [{"role": "driver", "name": "a", "pid": 1, "uptime": 10.0, "cpu_percent": 3.0, "rss": 5}]
    cheap = [{"role": "driver", "name": "a", "pid": 1, "uptime": 12.5, "state": "RUNNING"},
             {"role": "driver", "name": "b", "pid": 2, "uptime": 1.0}]
    merged = merge_usage(cheap, full)
    assert merged[0]["uptime"] == 10.0 and merged[0]["cpu_percent"] == 3.0 and merged[0]["state"] == "RUNNING"
    assert merged[1] == cheap[1]  # a process the last full poll did not see: its own figures


def test_a_hold_shows_busy_with_what_was_asked_until_the_state_shows_it() -> None:
    snap = build(ROWS, Names(), version="1", address="x")
    holds = {"DRIVERS": Hold("Busy", until=10.0, values={"indi_simulator_ccd": "Off"})}
    shown = overlay(snap, holds, now=1.0)
    assert shown["DRIVERS"].state == "Busy" and shown["DRIVERS"].values()["indi_simulator_ccd"] == "Off"
    assert holds  # still waiting
    stopped = [dict(r, state="STOPPED") if r["name"] == "indi_simulator_ccd" else r for r in ROWS]
    snap2 = build(stopped, Names(), version="1", address="x")
    assert overlay(snap2, holds, now=2.0)["DRIVERS"].state == "Ok" and not holds
    holds["DRIVERS"] = Hold("Alert", until=5.0)
    assert overlay(snap, holds, now=4.0)["DRIVERS"].state == "Alert"
    assert overlay(snap, holds, now=5.0)["DRIVERS"].state == "Ok" and not holds
