"""RoutingTable against a brute-force model, and the wire encoding of headers and interests."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from indibroker.broker import wire
from indibroker.broker.routing import RoutingTable
from indibroker.broker.wire import WANT_BLOB, WANT_PLAIN

IDENTS = [b"p1", b"p2", b"p3", b"p4"]
DEVICES = ["A", "B", "Ünï cødé"]
NAMES = ["x", "y"]


class Model:
    """The obvious, slow definition of what RoutingTable must compute."""

    def __init__(self) -> None:
        self.roles: dict[bytes, str] = {}
        self.interests: dict[bytes, list[tuple[str, str, int]]] = {}
        self.owners: dict[str, bytes] = {}

    def add_peer(self, ident, role, devices):
        self.remove_peer(ident)
        self.roles[ident], self.interests[ident] = role, []
        for device in devices:
            self.claim(ident, device)

    def remove_peer(self, ident):
        self.roles.pop(ident, None)
        self.interests.pop(ident, None)
        self.owners = {d: o for d, o in self.owners.items() if o != ident}

    def set_interests(self, ident, entries):
        if ident in self.roles:
            self.interests[ident] = list(entries)

    def claim(self, ident, device):
        if ident not in self.roles or not device:
            return None
        previous = self.owners.get(device)
        self.owners[device] = ident
        return previous if previous != ident else None

    def release(self, ident, device):
        if self.owners.get(device) == ident:
            del self.owners[device]

    def targets(self, device, name, blob):
        if not device:
            return sorted(i for i, r in self.roles.items() if r == "gateway")
        want = WANT_BLOB if blob else WANT_PLAIN

        def covers(d, n, bits):
            if not bits & want:
                return False
            return (d, n) == ("", "") or (d == device and (not n or not name or n == name))

        return sorted(i for i, entries in self.interests.items() if any(covers(*e) for e in entries))


idents = st.sampled_from(IDENTS)
devices = st.sampled_from(["", *DEVICES])
# ("", name) is not a meaningful interest (getProperties needs a device to name a property).
interest = st.one_of(st.tuples(st.just(""), st.just(""), st.integers(0, 4)),
                     st.tuples(st.sampled_from(DEVICES), st.sampled_from(["", *NAMES]), st.integers(0, 4)))
ops = st.one_of(
    st.tuples(st.just("add_peer"), idents, st.sampled_from(["gateway", "driver"]),
              st.lists(devices, max_size=2)),
    st.tuples(st.just("remove_peer"), idents),
    st.tuples(st.just("set_interests"), idents, st.lists(interest, max_size=4)),
    st.tuples(st.just("claim"), idents, devices),
    st.tuples(st.just("release"), idents, devices),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=25))
def test_routing_matches_model(sequence):
    table, model = RoutingTable(), Model()
    for op, ident, *args in sequence:
        if op == "add_peer":
            table.add_peer(ident, args[0], "n", args[1])
            model.add_peer(ident, args[0], args[1])
        elif op == "claim":
            assert table.claim(ident, *args) == model.claim(ident, *args)
        else:
            getattr(table, op)(ident, *args)
            getattr(model, op)(ident, *args)
        assert table.owners == model.owners
        for i, peer in table.peers.items():
            assert peer.devices == {d for d, o in model.owners.items() if o == i}
        for device in ["", *DEVICES, "unknown"]:
            for name in ["", *NAMES]:
                for blob in (False, True):
                    got = table.targets(device, name, blob)
                    assert len(got) == len(set(got))
                    assert sorted(got) == model.targets(device, name, blob), (device, name, blob)
    assert sorted(table.drivers()) == sorted(i for i, r in model.roles.items() if r == "driver")


def test_ownership_last_claim_wins_and_release_rules():
    t = RoutingTable()
    t.add_peer(b"d1", "driver", "one", ["CCD"])
    t.add_peer(b"d2", "driver", "two")
    assert t.owner("CCD") == b"d1"
    assert t.claim(b"d2", "CCD") == b"d1"
    assert t.owner("CCD") == b"d2" and t.peers[b"d1"].devices == set()
    t.release(b"d1", "CCD")  # not the owner: nothing happens
    assert t.owner("CCD") == b"d2"
    t.remove_peer(b"d1")
    assert t.owner("CCD") == b"d2"
    t.remove_peer(b"d2")
    assert t.owner("CCD") is None and t.owners == {}
    assert t.claim(b"ghost", "CCD") is None and t.owner("CCD") is None



def test_deviceless_messages_go_to_gateways_only():
    t = RoutingTable()
    t.add_peer(b"g1", "gateway", "a")
    t.add_peer(b"g2", "gateway", "b")
    t.add_peer(b"d", "driver", "c", ["A"])
    t.set_interests(b"d", [("", "", WANT_PLAIN | WANT_BLOB)])
    assert sorted(t.targets("", "", False)) == [b"g1", b"g2"]
    assert t.targets("A", "x", False) == [b"d"]


def test_blob_and_plain_bits_are_separate():
    t = RoutingTable()
    t.add_peer(b"g", "gateway", "gw")
    t.set_interests(b"g", [("A", "img", WANT_BLOB), ("A", "", WANT_PLAIN)])
    assert t.targets("A", "img", True) == [b"g"]
    assert t.targets("A", "other", True) == []
    assert t.targets("A", "other", False) == [b"g"]
    assert t.targets("A", "", True) == [b"g"]  # a whole-device message: any interest in the device


# -- wire ------------------------------------------------------------------------------------------
names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\x1e\x1f\n"))
verbs = st.binary(min_size=1).filter(lambda b: b"\x00" not in b and b"\n" not in b)


@given(verbs, names, names, st.binary().filter(lambda b: b"\x00" not in b and b"\n" not in b))
def test_header_round_trip(verb, device, name, flags):
    frame = wire.header(verb, device, name, flags)
    assert wire.parse_header(frame) == (verb, device, name, flags)


@given(st.lists(st.tuples(verbs, names, names, st.binary(max_size=64)), min_size=1, max_size=20))
def test_batch_index_round_trip(messages):
    """A batch's index and body give back every message, split at the right places."""
    heads = [wire.header(v, d, n) for v, d, n, _ in messages]
    index = b"\n".join(wire.record(h, len(p)) for h, (_, _, _, p) in zip(heads, messages, strict=True))
    body = b"".join(p for *_, p in messages)
    offset, out = 0, []
    for head, length in wire.unpack(index):
        out.append((wire.parse_header(head)[:3], body[offset:offset + length]))
        offset += length
    assert out == [((v, d, n), p) for v, d, n, p in messages]
    assert offset == len(body)


@pytest.mark.parametrize("device, name", [("a\nb", "x"), ("a", "x\x00y")])
def test_names_that_would_break_the_index_are_refused(device, name):
    with pytest.raises(ValueError):
        wire.header(wire.SET, device, name)


@pytest.mark.parametrize("frame", [b"SET\x00d\x00n", b"SET\x00a\x00b\x00c\x00d", b"SET\x00\xff\x00n\x00"])
def test_bad_header_raises_value_error(frame):
    with pytest.raises(ValueError):
        wire.parse_header(frame)


@given(st.lists(st.tuples(names, names, st.integers(min_value=0, max_value=2**40))))
def test_interests_round_trip(entries):
    assert wire.decode_interests(wire.encode_interests(entries)) == entries


def test_hello_round_trip_and_refusals():
    data = wire.parse_hello(wire.hello_payload("driver", "ccd", {"B", "A"}, "a1b2"), "a1b2")
    assert data == {"wire": wire.WIRE_VERSION, "instance": "a1b2", "role": "driver", "name": "ccd",
                    "devices": ["A", "B"], "heartbeat": 0.0}
    with pytest.raises(ValueError, match="another instance"):  # a killed instance's lingering worker
        wire.parse_hello(wire.hello_payload("driver", "ccd", {"A"}, "old0"), "a1b2")
    for bad in ({"wire": wire.WIRE_VERSION + 1, "role": "driver"}, {"wire": wire.WIRE_VERSION, "role": "x"},
                {"wire": wire.WIRE_VERSION, "role": "gateway", "devices": [1]}, [1, 2]):
        with pytest.raises(ValueError):
            wire.parse_hello(json.dumps(bad).encode())


def test_one_source_per_device_across_hosts():
    """A joined host may not take a device from this instance or from another host; its own
    workers may (a driver moved between them); a local peer still may (it is this instance's)."""
    t = RoutingTable()
    t.add_peer(b"ex", "driver", "exdriver-0", ["Focuser"])
    t.add_peer(b"pier/driver:exdriver-0", "driver", "pier/exdriver-0", ["Scope", "Focuser"], host="pier")
    assert t.owner("Scope") == b"pier/driver:exdriver-0" and t.owner("Focuser") == b"ex"
    t.add_peer(b"dome/driver:exdriver-0", "driver", "dome/exdriver-0", ["Scope", "Dome"], host="dome")
    assert t.owner("Scope") == b"pier/driver:exdriver-0" and t.owner("Dome") == b"dome/driver:exdriver-0"
    assert not t.accepts(b"dome/driver:exdriver-0", "Scope")
    assert not t.accepts(b"pier/driver:exdriver-0", "Focuser")
    t.add_peer(b"pier/driver:exdriver-1", "driver", "pier/exdriver-1", host="pier")
    assert t.accepts(b"pier/driver:exdriver-1", "Scope")
    assert t.accepts(b"ex", "Scope")
    t.remove_peer(b"pier/driver:exdriver-0")
    assert t.accepts(b"dome/driver:exdriver-0", "Scope")
