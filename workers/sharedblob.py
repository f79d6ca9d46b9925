"""BLOBs as shared memory buffers: a libindi driver's memfd, from its worker to every consumer
without a copy through our processes, and into the form each consumer's peer takes.

A libindi driver on its socketpair passes each BLOB as a sealed memory buffer (memfd) beside an
`attached="true"` oneBLOB. ZeroMQ cannot carry descriptors, so the driver's worker keeps the
buffer open and names it in the message instead: `shared="PID:FD:INODE"` on each such oneBLOB
(the backbone flag `S`). A consumer on this machine opens its own descriptor of the same buffer
through `/proc/PID/fd/FD` (same user: no privilege needed), checks the inode (a descriptor
number closed and reused names another buffer), and says DONE once it has it; the owner closes
its descriptor when the broker says every consumer has said so (broker/pacing.py), or when the
broker restarts. A crashed process's descriptors close with it, so nothing leaks.

What each peer then receives, as indiserver sends it:
- a TCP client, a snooping driver, a bridge: the BLOB in base64 (`inline_form`), encoded once per
  consuming process, however many clients take it: the oneBLOB without `attached`, `enclen` and
  `shared`, its text a newline then exactly `size` bytes in base64;
- a local-socket client: `attached="true"` oneBLOBs (`attached_form`) and the buffers themselves,
  passed with SCM_RIGHTS on the same sendmsg; a BLOB that came in base64 is decoded once into a
  new buffer for them (`to_attached`).
"""

from __future__ import annotations

import binascii
import copy
import fcntl
import functools
import logging
import mmap
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lxml import etree

from indibroker.broker import wire
from indibroker.broker.ratelog import RateLimitedLog

if TYPE_CHECKING:
    from indibroker.workers.backbone import BackboneLink

_b64encode: Callable[[Any], bytes]  # also `b64encode`: for the driver worker's own base64
_b64decode: Callable[[Any], bytes]
try:  # SIMD base64 (x86-64 and arm64 wheels): 16 times binascii's speed on a 1.3 MB frame
    import pybase64

    _b64encode, _b64decode = pybase64.b64encode, pybase64.b64decode
except ImportError:  # elsewhere, the standard library's
    _b64encode = functools.partial(binascii.b2a_base64, newline=False)
    _b64decode = binascii.a2b_base64

__all__ = ["SHARED_ATTR", "SharedBufferError", "SharedFd", "SharedBlob", "reference", "resolve",
           "take", "to_attached", "b64encode"]

log = logging.getLogger(__name__)

SHARED_ATTR = "shared"
_REF = re.compile(r"(\d+):(\d+):(\d+)")
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=True)
# Where each BLOB's base64 goes in the serialised message: a mark no attribute value can hold by
# chance (base64 has no "@"; the random part makes a driver's text matching it impossible to plan).
_MARK = f"@indibroker-{os.urandom(6).hex()}-"
_MARKS = re.compile(re.escape(_MARK).encode() + rb"(\d+)@")


class SharedBufferError(Exception):
    """A shared BLOB that cannot be had: a buffer gone (its owner died or closed it), a bad
    reference, a message that does not parse, a buffer that cannot be mapped. Every failure of
    `resolve`, `SharedBlob.inline_form` and `to_attached` is this one."""


def reference(fd: int) -> str:
    """The name of our descriptor `fd` that another process of ours can open."""
    return f"{os.getpid()}:{fd}:{os.fstat(fd).st_ino}"


class SharedFd:
    """One descriptor of a buffer, shared by every queue that will pass it on: closed when the
    last holder releases it."""

    __slots__ = ("fd", "size", "_holders")

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size
        self._holders = 1

    def hold(self) -> SharedFd:
        self._holders += 1
        return self

    def release(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            os.close(self.fd)
            self.fd = -1


def _open(ref: str, size: int) -> SharedFd:
    match = _REF.fullmatch(ref)
    if match is None:
        raise SharedBufferError(f"bad reference {ref!r}")
    pid, fd, inode = (int(g) for g in match.groups())
    try:
        mine = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SharedBufferError(f"buffer {ref} is gone ({exc.strerror})") from None
    st = os.fstat(mine)
    if st.st_ino != inode or st.st_size < size:
        os.close(mine)
        raise SharedBufferError(f"buffer {ref} is gone (its descriptor names another file now)")
    return SharedFd(mine, size)


def _size(one: etree._Element) -> int:
    try:
        return max(0, int(one.get("size") or 0))
    except ValueError:
        return 0


class SharedBlob:
    """A setBLOBVector with shared buffers, resolved: our own descriptor of each buffer, in the
    order of its oneBLOBs. `release()` gives up ours (queues hold their own)."""

    def __init__(self, root: etree._Element, buffers: list[SharedFd]):
        self.root = root
        self.buffers = buffers
        self._inline: bytes | None = None

    def release(self) -> None:
        for buffer in self.buffers:
            buffer.release()
        self.buffers = []

    def inline_form(self) -> bytes:
        """The message with every shared BLOB in base64, as indiserver sends an attached BLOB
        to a TCP client (made once, then the same bytes for every taker)."""
        if self._inline is None:
            root = copy.deepcopy(self.root)  # the attached form stays as it is
            encoded: list[bytes] = []
            buffers = iter(self.buffers)
            for one in root:
                if one.get(SHARED_ATTR) is None:
                    continue
                buffer = next(buffers)
                for key in ("attached", "enclen", SHARED_ATTR):
                    one.attrib.pop(key, "")
                encoded.append(_encode(buffer))
                one.text = f"\n{_MARK}{len(encoded) - 1}@"
            text = etree.tostring(root)
            parts = _MARKS.split(text)
            # split keeps the numbers: text, number, text, number, ..., text
            self._inline = b"".join(encoded[int(p)] if i % 2 else p for i, p in enumerate(parts))
        return self._inline

    def attached_form(self) -> bytes:
        """The message for a local-socket client: `attached="true"` oneBLOBs (its buffers go
        beside it, in the same order)."""
        root = copy.deepcopy(self.root)
        for one in root:
            if one.attrib.pop(SHARED_ATTR, ""):
                one.text = None
        return etree.tostring(root) + b"\n"


def _encode(buffer: SharedFd) -> bytes:
    if buffer.size == 0:
        return b""
    try:
        with mmap.mmap(buffer.fd, buffer.size, mmap.MAP_SHARED, mmap.PROT_READ) as view:
            return _b64encode(view)
    except OSError as exc:
        raise SharedBufferError(f"buffer cannot be mapped ({exc.strerror or exc})") from None


def resolve(payload: bytes) -> SharedBlob:
    """Open the shared buffers a message names; SharedBufferError if any is gone (those opened
    are closed again)."""
    root = _parse(payload)
    buffers: list[SharedFd] = []
    try:
        for one in root:
            ref = one.get(SHARED_ATTR)
            if ref is not None:
                buffers.append(_open(ref, _size(one)))
    except SharedBufferError:
        for buffer in buffers:
            buffer.release()
        raise
    return SharedBlob(root, buffers)


def b64encode(data: Any) -> bytes:
    """Base64, the fast one where there is one (a driver's BLOB sent in base64 from its buffer)."""
    return _b64encode(data)


def _parse(payload: bytes) -> etree._Element:
    try:
        return etree.fromstring(payload, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise SharedBufferError(f"message does not parse ({exc})") from None


def take(payload: bytes, device: str, wanted: bool, backbone: BackboneLink, warn: RateLimitedLog,
         whom: str) -> bytes:
    """A shared BLOB sent to a consumer that is not a gateway (a snooping driver's worker, a
    bridge): in base64 if `wanted`, else b"" (also when its buffers cannot be had: said in
    `warn`, rate-limited, naming `whom`). DONE is said either way: the broker counted this
    consumer, and the owner closes its buffers once every one has."""
    try:
        if not wanted:
            return b""
        blob = resolve(payload)
        try:
            return blob.inline_form()
        finally:
            blob.release()
    except SharedBufferError as exc:
        warn.warning(("shared", device), "a BLOB of %s is lost for %s: %s", device, whom, exc)
        return b""
    finally:
        backbone.send(wire.FLOW, device, "", wire.FLOW_DONE)


def to_attached(payload: bytes) -> tuple[bytes, list[SharedFd]]:
    """A setBLOBVector in base64, for a local-socket client: each BLOB decoded once into a new
    sealed memory buffer, the message in its attached form (as indiserver converts it)."""
    root = _parse(payload)
    buffers: list[SharedFd] = []
    try:
        for one in root:
            if one.get("attached") == "true" or not (one.text or "").strip():
                continue
            try:
                data = _b64decode(one.text or "")
                buffers.append(_memfd(data))
            except (ValueError, OSError) as exc:
                raise SharedBufferError(f"BLOB {one.get('name')} cannot be made a buffer ({exc})") from None
            one.text = None
            one.attrib.pop("enclen", "")
            one.set("attached", "true")
            if one.get("size") is None:
                one.set("size", str(len(data)))
    except BaseException:
        for buffer in buffers:  # those made before the one that failed
            buffer.release()
        raise
    return etree.tostring(root) + b"\n", buffers


_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def sealed(fd: int) -> bool:
    """Whether nobody can shrink, grow or write the buffer any more (libindi seals its own)."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS == _SEALS
    except OSError:  # not a memfd
        return False


def sealed_copy(fd: int, size: int) -> int:
    """A sealed copy of the first `size` bytes of `fd` (a new descriptor)."""
    return _memfd(os.pread(fd, size, 0)).fd


def _memfd(data: bytes) -> SharedFd:
    fd = os.memfd_create("indibroker-blob", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        _write_all(fd, data)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
    except OSError:
        os.close(fd)
        raise
    return SharedFd(fd, len(data))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
