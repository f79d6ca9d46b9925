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
    assert p.routed("CCD", [G1, G2]) == 0
    p.routed("CCD", [G1, G2])
    assert p.done(G2, "CCD") == 0 and p.done(G2, "CCD") == 0  # G1 still has both
    resume, finished = p.forget(G1)
    assert resume == ["CCD"] and finished == [("CCD", 2)]
    assert p.outstanding == {} and p.owed == {} and p.full == {}


def test_no_gateway_means_done_at_once() -> None:
    assert BlobPacing().routed("CCD", []) == 1


def test_the_owner_hears_of_its_blobs_in_the_order_it_sent_them() -> None:
    p = BlobPacing()
    assert p.routed("CCD", [G1]) == 0  # 1: waits for G1
    assert p.routed("CCD", [G2]) == 0  # 2: waits for G2
    assert p.routed("CCD", []) == 0  # 3: went nowhere, but 1 and 2 are older
    assert p.done(G2, "CCD") == 0  # 2 is done, 1 is not: nothing yet
    assert p.done(G1, "CCD") == 3  # 1 done: 1, 2 and 3 at once
    assert p.outstanding == {}


@given(st.lists(st.sets(st.sampled_from([G1, G2, G3])), max_size=30), st.randoms())
def test_every_blob_is_done_exactly_once_whatever_the_order(sent: list[set[bytes]], rnd) -> None:
    """However the gateways' DONEs interleave (each gateway in its own order), the owner hears
    one DONE per BLOB, in the order it sent them: its n-th DONE comes only once its n oldest
    BLOBs are done by every gateway they went to (so it may then close their shared buffers)."""
    p = BlobPacing()
    handled = {g: 0 for g in (G1, G2, G3)}  # how many of its BLOBs each gateway has handled
    owner_done = sum(p.routed("CCD", gateways) for gateways in sent)
    mine = {g: [i for i, s in enumerate(sent) if g in s] for g in (G1, G2, G3)}

    def truly_done(i: int) -> bool:
        return all(handled[g] > mine[g].index(i) for g in sent[i])

    while any(handled[g] < len(mine[g]) for g in mine):
        g = rnd.choice([g for g in mine if handled[g] < len(mine[g])])
        handled[g] += 1
        owner_done += p.done(g, "CCD")
        assert all(truly_done(i) for i in range(owner_done))
        # In flight as the owner sees it never falls below what the busiest gateway still has.
        assert len(sent) - owner_done >= max(len(mine[g]) - handled[g] for g in mine)
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
