"""BLOB pacing state in the broker (broker/pacing.py): pure data, checked on its own."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from indibroker.broker.pacing import BlobPacing

G1, G2, G3 = b"g1", b"g2", b"g3"


def test_pause_only_when_every_blob_peer_is_full() -> None:
    p = BlobPacing()
    assert not p.on_full(G1, "CCD", [G1, G2])  # G2 can still take them
    assert p.on_full(G2, "CCD", [G1, G2])
    assert p.on_full(G2, "CCD", [G1, G2])  # said again: pause again (the owner may have timed out)
    assert p.on_open(G1, "CCD")  # one has room: resume
    assert not p.on_open(G2, "CCD")  # already resumed
    assert not p.on_full(G1, "CCD", [G1, G2, b"bridge"])  # a peer that never reports keeps it read
    assert not p.on_full(G1, "CCD", [])


def test_a_departed_peer_no_longer_holds_anything_up() -> None:
    p = BlobPacing()
    p.on_full(G1, "CCD", [G1])
    assert p.routed("CCD", [G1, G2]) is False
    p.routed("CCD", [G1, G2])
    assert p.done(G2, "CCD") == 0 and p.done(G2, "CCD") == 0  # G1 still has both
    resume, finished = p.forget(G1)
    assert resume == ["CCD"] and finished == [("CCD", 2)]
    assert p.outstanding == {} and p.owed == {} and p.full == {}


def test_no_gateway_means_done_at_once() -> None:
    assert BlobPacing().routed("CCD", []) is True


@given(st.lists(st.sets(st.sampled_from([G1, G2, G3]), min_size=1), max_size=30), st.randoms())
def test_every_blob_is_done_exactly_once_whatever_the_order(sent: list[set[bytes]], rnd) -> None:
    """However the gateways' DONEs interleave (each gateway in its own order), the owner hears
    one DONE per BLOB, never one before the BLOB is done by the slowest gateway it went to."""
    p = BlobPacing()
    pending = {g: 0 for g in (G1, G2, G3)}
    for gateways in sent:
        p.routed("CCD", gateways)
        for g in gateways:
            pending[g] += 1
    owner_done = 0
    while any(pending.values()):
        g = rnd.choice([g for g, n in pending.items() if n])
        pending[g] -= 1
        owner_done += p.done(g, "CCD")
        # In flight as the owner sees it never falls below what the busiest gateway still has.
        assert len(sent) - owner_done >= max(pending.values())
    assert owner_done == len(sent)
    assert p.outstanding == {}


@given(st.lists(st.sets(st.sampled_from([G1, G2, G3]), min_size=1), max_size=20), st.sampled_from([G1, G2, G3]))
def test_forgetting_a_gateway_finishes_what_only_it_held(sent: list[set[bytes]], gone: bytes) -> None:
    p = BlobPacing()
    for gateways in sent:
        p.routed("CCD", gateways)
    _, finished = p.forget(gone)
    owner_done = sum(n for _, n in finished)
    for g in (G1, G2, G3):
        if g != gone:
            for _ in range(sum(g in s for s in sent)):
                owner_done += p.done(g, "CCD")
    assert owner_done == len(sent)
