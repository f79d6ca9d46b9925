"""The backbone contract between workers (DEALER) and the broker (ROUTER).

A ZeroMQ message is a batch of INDI messages in two frames, so that one read and one write move
many of them between two processes whatever their number:

- the index: one record per message, newline-separated: ``verb \\0 device \\0 name \\0 flags
  \\0 length`` (the first four fields are the message's header; names hold no NUL or newline);
- the body: the payloads, the INDI XML exactly as it came, one after the other (lengths in the
  index). A payload of `transport.ZERO_COPY_BYTES` or more travels in a batch of its own, so that
  it moves by reference.

The broker reads the index only and never looks into a payload. Every process imports this one
module; `WIRE_VERSION` travels in the hello so a mismatched worker is refused.

Verbs (worker → broker unless said otherwise):

=========  ===================================================================================
HELLO      announce: payload is JSON ``{"wire", "instance", "role", "name", "devices", "heartbeat"}``;
           the broker refuses a hello from another instance (a killed instance's lingering worker).
           A joined host's worker (on the host endpoint, broker/hosts.py) is not checked for the
           instance: its key is its credential; "heartbeat" is its interval, by which the broker
           knows when a silent host is lost
WHO        broker → worker: "I do not know you" (after a broker restart): say HELLO again
SUB        replace this peer's interests: payload is `encode_interests()`
HB         heartbeat, both directions; any traffic also counts as one. A joined host's worker puts
           its status in the payload (JSON: its role, pid, CPU, memory, drivers), for `status`
ECHO       sent back to its sender as it came: after everything the sender sent before it (a
           gateway answers a client's ping this way while its interests are on their way)
GETP       getProperties from a client or a snooping driver: to the owner, or every driver
NEW        a client's new*Vector: to the device's owner only
DEF SET    a driver's def*/set*Vector: to every peer interested (flag ``B``: a setBLOBVector;
           ``S``: a setBLOBVector whose BLOBs are shared buffers its owner holds, referenced in
           the payload (workers/sharedblob.py): every peer it goes to says DONE once it has
           taken them, and the owner closes them when the broker says they are done)
DEL MSG    a driver's delProperty / message (MSG without a device goes to every gateway)
SNOOP      a set*/def*/del/message from a *client* (a chained server relaying its devices):
           to snooping drivers only, never on to clients or bridges (so it cannot circle)
FLOW       BLOB pacing (broker/pacing.py). Gateway → broker: flags ``1``: the next BLOB of
           (device, name) would be dropped for a client of mine that wants it and is still
           draining; ``0``: there is room again; ``D``: I have handled one BLOB of the
           device (any peer, of a shared BLOB: I have taken its buffers). Broker → the
           device's owner: ``1`` pause reading that device's driver (every peer that wants
           its BLOBs is full), ``0`` read it again, ``D`` one more of its BLOBs
           has been handled by every gateway it went to (the owner's window moves on), told in
           the order the owner sent them.
=========  ===================================================================================
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

__all__ = [
    "WIRE_VERSION", "HELLO", "WHO", "SUB", "HB", "ECHO", "GETP", "NEW", "DEF", "SET", "DEL", "MSG", "SNOOP",
    "FLOW", "FLAG_BLOB", "FLAG_SHARED", "FLOW_FULL", "FLOW_OPEN", "FLOW_DONE", "WANT_PLAIN", "WANT_BLOB",
    "DRIVER_OUTPUT",
    "header", "parse_header", "hello_payload", "parse_hello", "encode_interests", "decode_interests",
    "record", "unpack",
]

WIRE_VERSION = 7

HELLO = b"HELLO"
WHO = b"WHO"
SUB = b"SUB"
HB = b"HB"
ECHO = b"ECHO"
GETP = b"GETP"
NEW = b"NEW"
DEF = b"DEF"
SET = b"SET"
DEL = b"DEL"
MSG = b"MSG"
SNOOP = b"SNOOP"
FLOW = b"FLOW"

DRIVER_OUTPUT = frozenset({DEF, SET, DEL, MSG})

FLAG_BLOB = b"B"
FLAG_SHARED = b"S"  # a setBLOBVector whose BLOBs are shared buffers (see DEF SET above)
FLOW_FULL = b"1"
FLOW_OPEN = b"0"
FLOW_DONE = b"D"

# Interest bits: does a peer want a device's ordinary traffic, its BLOBs, or both.
WANT_PLAIN = 1
WANT_BLOB = 2

_SEP = b"\x00"


def header(verb: bytes, device: str = "", name: str = "", flags: bytes = b"") -> bytes:
    """A message's header; raises ValueError for names that would break the index."""
    if "\n" in device or "\x00" in device or "\n" in name or "\x00" in name or b"\n" in verb + flags:
        raise ValueError(f"device or property name with a NUL or newline: {device!r} {name!r}")
    return _SEP.join((verb, device.encode(), name.encode(), flags))


def parse_header(frame: bytes) -> tuple[bytes, str, str, bytes]:
    """Split a header; raises ValueError on anything but four fields of valid UTF-8."""
    verb, device, name, flags = frame.split(_SEP)
    return verb, device.decode(), name.decode(), flags


def record(head: bytes, length: int) -> bytes:
    """An index record: a header and its payload's length."""
    return b"%s\x00%d" % (head, length)


def unpack(index: bytes) -> list[tuple[bytes, int]]:
    """The (header, payload length) records of a batch's index; ValueError if malformed."""
    out = []
    for rec in index.split(b"\n"):
        head, sep, length = rec.rpartition(_SEP)
        if not sep:
            raise ValueError("index record without a length")
        out.append((head, int(length)))
    return out


def hello_payload(role: str, name: str, devices: Iterable[str], instance: str = "",
                  heartbeat: float = 0.0) -> bytes:
    return json.dumps(
        {"wire": WIRE_VERSION, "instance": instance, "role": role, "name": name, "devices": sorted(devices),
         "heartbeat": heartbeat}
    ).encode()


def parse_hello(payload: bytes, instance: str | None = "") -> dict[str, Any]:
    """Decode and check a HELLO; raises ValueError when it is not one we can serve (another wire
    version, or a worker of another instance than `instance`; None: a joined host's worker,
    whose key was its credential)."""
    data = json.loads(payload)
    if not isinstance(data, dict) or data.get("wire") != WIRE_VERSION:
        raise ValueError(f"wire version {data.get('wire') if isinstance(data, dict) else '?'}")
    if not isinstance(data.get("heartbeat", 0.0), int | float):
        raise ValueError("heartbeat must be a number")
    if instance is not None and data.get("instance", "") != instance:
        raise ValueError(f"worker of another instance ({data.get('instance')!r}, we are {instance!r})")
    if data.get("role") not in ("gateway", "driver", "remote"):
        raise ValueError(f"unknown role {data.get('role')!r}")
    devices = data.get("devices", [])
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise ValueError("devices must be a list of names")
    return data


def encode_interests(entries: Iterable[tuple[str, str, int]]) -> bytes:
    """Interests as ``device \\x1f name \\x1f bits`` records; an empty device means all devices,
    an empty name all properties of the device."""
    return b"\x1e".join(
        b"\x1f".join((device.encode(), name.encode(), str(bits).encode()))
        for device, name, bits in entries
    )


def decode_interests(payload: bytes) -> list[tuple[str, str, int]]:
    if not payload:
        return []
    out = []
    for record in payload.split(b"\x1e"):
        device, name, bits = record.split(b"\x1f")
        out.append((device.decode(), name.decode(), int(bits)))
    return out

