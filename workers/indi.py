"""INDI protocol vocabulary shared by the workers: tag classes and the few messages we write.

Everything written here is built with lxml (so values are escaped), never by string formatting.
"""

from __future__ import annotations

import datetime
from enum import Enum

from lxml import etree

from indibroker.broker import wire

__all__ = [
    "BlobMode", "PROTOCOL_VERSION", "CLIENT_NEW", "DRIVER_VERBS", "get_properties", "ping_reply",
    "message", "del_property", "timestamp", "enable_blob", "blob_flag", "is_blob",
]

PROTOCOL_VERSION = "1.7"

CLIENT_NEW = frozenset({"newTextVector", "newNumberVector", "newSwitchVector", "newBLOBVector"})

# A driver's output tags and the backbone verb each travels under.
DRIVER_VERBS: dict[str, bytes] = {
    "defTextVector": wire.DEF, "defNumberVector": wire.DEF, "defSwitchVector": wire.DEF,
    "defLightVector": wire.DEF, "defBLOBVector": wire.DEF,
    "setTextVector": wire.SET, "setNumberVector": wire.SET, "setSwitchVector": wire.SET,
    "setLightVector": wire.SET, "setBLOBVector": wire.SET,
    "delProperty": wire.DEL, "message": wire.MSG,
}


def is_blob(tag: str) -> bool:
    """Only setBLOBVector counts as a BLOB (as in indiserver)."""
    return tag == "setBLOBVector"


def blob_flag(tag: str) -> bytes:
    """The header flag of a driver message."""
    return wire.FLAG_BLOB if is_blob(tag) else b""


class BlobMode(Enum):
    NEVER = "Never"
    ALSO = "Also"
    ONLY = "Only"

    @classmethod
    def parse(cls, text: str | None) -> BlobMode | None:
        try:
            return cls((text or "").strip())
        except ValueError:
            return None


def timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _xml(tag: str, **attrs: str) -> bytes:
    el = etree.Element(tag)
    for key, value in attrs.items():
        if value:
            el.set(key, value)
    return etree.tostring(el) + b"\n"


def get_properties(device: str = "", name: str = "") -> bytes:
    """The getProperties a driver receives: always version 1.7 (libindi drivers exit otherwise)."""
    return _xml("getProperties", version=PROTOCOL_VERSION, device=device, name=name)


def ping_reply(uid: str) -> bytes:
    return _xml("pingReply", uid=uid)


def message(text: str, device: str = "") -> bytes:
    return _xml("message", device=device, timestamp=timestamp(), message=text)


def enable_blob(device: str, mode: BlobMode, name: str = "") -> bytes:
    el = etree.Element("enableBLOB", device=device)
    if name:
        el.set("name", name)
    el.text = mode.value
    return etree.tostring(el) + b"\n"


def del_property(device: str, name: str = "") -> bytes:
    return _xml("delProperty", device=device, name=name, timestamp=timestamp())
