"""workers/sharedblob.py: shared BLOB buffers named, opened, and turned into each peer's form.

Property tests with real memfds, opened through /proc as a gateway opens them (here, our own)."""

from __future__ import annotations

import base64
import os
from xml.sax.saxutils import quoteattr

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from indibroker.workers import sharedblob
from indibroker.workers.outqueue import Attached, OutQueue


def _memfd(data: bytes, slack: int = 0) -> int:
    fd = os.memfd_create("test-blob", os.MFD_CLOEXEC)
    os.write(fd, data + b"\0" * slack)  # a driver's buffer may be bigger than the BLOB (page rounding)
    return fd


def _shared_message(blobs: list[bytes], slack: int, message: str = "") -> tuple[bytes, list[int]]:
    fds = [_memfd(b, slack) for b in blobs]
    ones = "".join(f"<oneBLOB name='b{i}' size='{len(b)}' format='.fits' attached='true' "
                   f"shared='{sharedblob.reference(fd)}'/>" for i, (b, fd) in enumerate(zip(blobs, fds, strict=True)))
    head = f"<setBLOBVector device='CCD' name='CCD1' message={quoteattr(message)}>"
    return f"{head}{ones}</setBLOBVector>".encode(), fds


blobs_st = st.lists(st.binary(max_size=3000), min_size=1, max_size=4)


@given(blobs_st, st.integers(0, 4096), st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cn")), max_size=30))
@settings(max_examples=60, deadline=None)
def test_the_inline_form_holds_exactly_size_bytes_of_each_buffer(blobs: list[bytes], slack: int,
                                                                 message: str) -> None:
    payload, fds = _shared_message(blobs, slack, message)
    try:
        blob = sharedblob.resolve(payload)
        inline = blob.inline_form()
        attached = blob.attached_form()
        blob.release()
    finally:
        for fd in fds:
            os.close(fd)
    root = etree.fromstring(inline)
    assert root.get("message") == message  # the rest of the message as it was
    for one, data in zip(root, blobs, strict=True):
        assert base64.b64decode(one.text or "") == data
        assert (one.text or "\n").startswith("\n")  # indiserver's form: base64 on a line of its own
        assert one.get("attached") is None and one.get("enclen") is None and one.get("shared") is None
    for one in etree.fromstring(attached):
        assert one.get("attached") == "true" and one.get("shared") is None and not one.text


@given(blobs_st)
@settings(max_examples=40, deadline=None)
def test_base64_becomes_buffers_for_local_clients_and_back(blobs: list[bytes]) -> None:
    ones = "".join(f"<oneBLOB name='b{i}' size='{len(b)}' format='.z' enclen='9'>{base64.b64encode(b).decode()}"
                   f"</oneBLOB>" for i, b in enumerate(blobs) if b)
    if not ones:
        return
    payload = f"<setBLOBVector device='CCD' name='CCD1'>{ones}</setBLOBVector>".encode()
    attached, buffers = sharedblob.to_attached(payload)
    try:
        assert [os.pread(b.fd, b.size, 0) for b in buffers] == [b for b in blobs if b]
        for one in etree.fromstring(attached):
            assert one.get("attached") == "true" and one.get("enclen") is None and not one.text
    finally:
        for buffer in buffers:
            buffer.release()


def test_a_closed_or_reused_descriptor_is_refused() -> None:
    payload, fds = _shared_message([b"frame"], 0)
    os.close(fds[0])
    with pytest.raises(sharedblob.SharedBufferError):
        sharedblob.resolve(payload)
    other = _memfd(b"another buffer")  # very likely the same number: the inode tells them apart
    try:
        with pytest.raises(sharedblob.SharedBufferError):
            sharedblob.resolve(payload)
    finally:
        os.close(other)


def test_a_queue_passes_buffers_with_their_message_and_gives_them_up() -> None:
    import socket

    ours, theirs = socket.socketpair()
    fd = _memfd(b"pixels")
    buffer = sharedblob.SharedFd(fd, 6)
    out = OutQueue()
    out.push(b"<before/>")
    out.push(Attached(b"<setBLOBVector/>", [buffer]))
    out.push(b"<after/>")
    buffer.release()  # the gateway's own hold: the queue's keeps it open
    assert os.fstat(fd) and out.held == 6 and out.backlog() == 6 + len(b"<setBLOBVector/><after/>")
    assert out.flush(ours.fileno())
    data, fds, _, _ = socket.recv_fds(theirs, 1000, 4)
    while len(data) < len(b"<before/><setBLOBVector/><after/>"):
        more, more_fds, _, _ = socket.recv_fds(theirs, 1000, 4)
        data, fds = data + more, fds + more_fds
    assert data == b"<before/><setBLOBVector/><after/>" and len(fds) == 1
    assert os.pread(fds[0], 6, 0) == b"pixels"
    os.close(fds[0])
    with pytest.raises(OSError):
        os.fstat(fd)  # passed on: our descriptor is closed
    dropped = sharedblob.SharedFd(_memfd(b"x"), 1)
    out.push(Attached(b"<x/>", [dropped]))
    dropped.release()
    out.clear()  # a client dropped with buffers queued gives them up
    assert dropped.fd == -1
    ours.close()
    theirs.close()


def test_take_inlines_for_a_consumer_that_wants_it_and_says_done_in_every_case() -> None:
    import logging

    from fakes import FakeBackbone

    from indibroker.broker import wire
    from indibroker.broker.ratelog import RateLimitedLog

    warn = RateLimitedLog(logging.getLogger("test"))
    payload, fds = _shared_message([b"frame bytes"], 10)
    backbone = FakeBackbone()
    inlined = sharedblob.take(payload, "CCD", True, backbone, warn, "snoopers")
    assert base64.b64decode(etree.fromstring(inlined)[0].text or "") == b"frame bytes"
    assert sharedblob.take(payload, "CCD", False, backbone, warn, "snoopers") == b""  # not wanted
    os.close(fds[0])
    assert sharedblob.take(payload, "CCD", True, backbone, warn, "snoopers") == b""  # gone
    assert [(m.verb, m.device, m.flags) for m in backbone.sent] == [(wire.FLOW, "CCD", wire.FLOW_DONE)] * 3
