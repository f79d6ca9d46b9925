"""Interest: what one client (or snooping driver) asked for, and the coarse entries sent to the broker."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from indibroker.broker.routing import RoutingTable
from indibroker.broker.wire import WANT_BLOB, WANT_PLAIN
from indibroker.workers.indi import BlobMode
from indibroker.workers.interest import Interest, union

NEVER, ALSO, ONLY = BlobMode.NEVER, BlobMode.ALSO, BlobMode.ONLY


def interest(*adds: tuple[str, str]) -> Interest:
    i = Interest()
    for device, name in adds:
        i.add(device, name)
    return i


def test_nothing_asked_means_nothing_but_deviceless_messages():
    i = Interest()
    assert not i.wants("A", "x", False) and not i.wants("A", "", False)
    assert i.wants("", "", False)  # a message without a device goes to everyone
    assert list(i.entries()) == []


def test_get_properties_scoping():
    everything = interest(("", ""))
    assert everything.wants("A", "x", False) and everything.wants("Z", "", False)
    device = interest(("A", ""))
    assert device.wants("A", "x", False) and device.wants("A", "y", False)
    assert not device.wants("B", "x", False)
    prop = interest(("A", "x"))
    assert prop.wants("A", "x", False) and not prop.wants("A", "y", False)
    assert prop.wants("A", "", False)  # a message or whole-device delProperty still concerns it
    assert not prop.wants("B", "x", False)
    assert interest(("A", "x"), ("A", "")).wants("A", "y", False)  # widening to the device
    assert interest(("A", ""), ("A", "x")).wants("A", "y", False)  # a property does not narrow it
    assert interest(("A", "x"), ("A", "y")).wants("A", "y", False)


def test_default_blob_mode_is_never():
    i = interest(("", ""))
    assert i.blob_mode("A", "img") is NEVER
    assert not i.wants("A", "img", True)
    assert i.wants("A", "img", False)


def test_blob_also_and_only_per_device():
    i = interest(("", ""))
    i.set_blob("A", "", ALSO)
    assert i.wants("A", "img", True) and i.wants("A", "img", False)
    i.set_blob("A", "", ONLY)
    assert i.wants("A", "img", True)
    assert not i.wants("A", "temp", False) and not i.wants("A", "", False)  # BLOBs and nothing else
    assert i.wants("B", "temp", False) and not i.wants("B", "img", True)  # other devices untouched
    i.set_blob("A", "", NEVER)
    assert not i.wants("A", "img", True) and i.wants("A", "temp", False)


def test_blob_only_per_property_leaves_the_rest_of_the_device_alone():
    i = interest(("A", ""))
    i.set_blob("A", "img", ONLY)
    assert i.wants("A", "img", True) and not i.wants("A", "img", False)
    assert i.wants("A", "temp", False) and not i.wants("A", "temp", True)
    assert i.wants("A", "", False)
    i.set_blob("A", "", ALSO)  # a device-wide request replaces the per-property one
    assert i.blob_mode("A", "img") is ALSO and i.wants("A", "img", False)


def test_blob_mode_without_interest_in_the_device_sends_nothing():
    i = interest(("A", ""))
    i.set_blob("B", "", ALSO)
    assert not i.wants("B", "img", True)


def test_entries_and_union():
    i = interest(("A", "x"), ("B", ""))
    i.set_blob("B", "img", ALSO)
    assert set(i.entries()) == {("A", "x", WANT_PLAIN), ("B", "", WANT_PLAIN | WANT_BLOB)}
    j = interest(("", ""))
    assert union([i, j]) == set(i.entries()) | {("", "", WANT_PLAIN)}


DEVICES = ["A", "B"]
NAMES = ["x", "y"]
adds = st.lists(st.tuples(st.sampled_from(["", *DEVICES]), st.sampled_from(["", *NAMES])), max_size=4)
blobs = st.lists(st.tuples(st.sampled_from(DEVICES), st.sampled_from(["", *NAMES]),
                           st.sampled_from(BlobMode)), max_size=4)


def build(adds_, blobs_) -> Interest:
    i = interest(*adds_)
    for device, name, mode in blobs_:
        i.set_blob(device, name, mode)
    return i


@settings(max_examples=400, deadline=None)
@given(adds, blobs)
def test_entries_cover_everything_wanted(adds_, blobs_):
    i = build(adds_, blobs_)
    entries = list(i.entries())
    table = RoutingTable()
    table.add_peer(b"g", "gateway", "gw")
    table.set_interests(b"g", entries)
    for device in DEVICES:
        for name in ["", *NAMES]:
            for blob in (False, True):
                if not i.wants(device, name, blob):
                    continue
                bit = WANT_BLOB if blob else WANT_PLAIN
                # A whole-device message (no name) is covered by any entry for the device.
                assert any(bits & bit and d in ("", device) and (not name or n in ("", name))
                           for d, n, bits in entries), (device, name, blob, entries)
                assert table.targets(device, name, blob) == [b"g"]  # and the broker routes it here
