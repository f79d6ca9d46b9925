"""What one INDI peer (a client, or a driver that snoops) has asked to receive.

The same rules serve a gateway's clients and an exdriver's snooping drivers:
- `getProperties` without a device means every device; with a device (and optionally a property
  name) it adds that device or property (past `MAX_NAMED` of them: every device, so that what
  one peer's interest costs stays bounded). Any message naming a device adds that device, as in
  indiserver.
- `enableBLOB` Never/Also/Only is kept per device and, when a name is given, per property. The
  default is Never. Only means BLOBs and nothing else from that device (or property).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

from indibroker.broker.wire import WANT_BLOB, WANT_PLAIN
from indibroker.workers.indi import BlobMode

__all__ = ["Interest", "union"]

_NONE: dict = {}  # never written to: Interest replaces it with its own dict on first use
MAX_NAMED = 1000  # devices (and properties per device) one peer may name before it means "all"


class Interest:
    __slots__ = ("all_devices", "devices", "blob_device", "blob_property")

    def __init__(self) -> None:
        self.all_devices = False
        # Shared empty mappings until first written: an idle client's interest costs ~nothing.
        # Per device: None for every property, one name as a plain str (the usual case: a set
        # would cost 200 bytes per client), a set for several.
        self.devices: dict[str, set[str] | str | None] = _NONE
        self.blob_device: dict[str, BlobMode] = _NONE
        self.blob_property: dict[tuple[str, str], BlobMode] = _NONE

    def add(self, device: str = "", name: str = "") -> None:
        if not device:
            self.all_devices = True
            return
        # Interned: a thousand clients asking for the same device share its name.
        device = sys.intern(device)
        name = sys.intern(name)
        if self.devices is _NONE:
            self.devices = {}
        if device in self.devices:
            names = self.devices[device]
            if names is None or names == name:
                pass
            elif not name:
                self.devices[device] = None  # the whole device
            elif isinstance(names, str):
                self.devices[device] = {names, name}
            elif len(names) < MAX_NAMED:
                names.add(name)
            else:
                self.devices[device] = None
        elif len(self.devices) < MAX_NAMED:
            self.devices[device] = name or None
        else:
            # Someone naming thousands of devices gets them all: their interest stays bounded.
            self.all_devices = True
            self.devices = _NONE

    def set_blob(self, device: str, name: str, mode: BlobMode) -> None:
        if self.blob_property is _NONE:
            self.blob_property = {}
        if self.blob_device is _NONE:
            self.blob_device = {}
        if name:
            self.blob_property[(device, name)] = mode
        else:
            self.blob_device[device] = mode
            # A device-wide mode replaces earlier per-property ones, as a fresh request should.
            for key in [k for k in self.blob_property if k[0] == device]:
                del self.blob_property[key]

    def blob_mode(self, device: str, name: str) -> BlobMode:
        mode = self.blob_property.get((device, name)) if name else None
        if mode is None:
            mode = self.blob_device.get(device, BlobMode.NEVER)
        return mode

    def wants_device(self, device: str, name: str = "") -> bool:
        if self.all_devices:
            return True
        names = self.devices.get(device, False)
        if names is False:
            return False
        if names is None or not name:
            return True
        return name == names if isinstance(names, str) else name in names  # type: ignore[operator]

    def wants(self, device: str, name: str, blob: bool) -> bool:
        """Should this peer receive a driver's message about (device, name)?"""
        if not device:
            return True  # a message without a device goes to everyone
        if not self.wants_device(device, name):
            return False
        mode = self.blob_mode(device, name)
        if blob:
            return mode is not BlobMode.NEVER
        return mode is not BlobMode.ONLY

    def entries(self) -> Iterator[tuple[str, str, int]]:
        """A superset of this peer's wishes for the broker: the worker filters precisely."""
        if not (self.all_devices or self.devices):
            return
        blob_devices = {d for d, m in self.blob_device.items() if m is not BlobMode.NEVER}
        blob_devices |= {d for (d, _n), m in self.blob_property.items() if m is not BlobMode.NEVER}
        if self.all_devices:
            yield "", "", WANT_PLAIN
            for device in blob_devices:
                yield device, "", WANT_BLOB
            return
        for device, names in self.devices.items():
            bits = WANT_PLAIN | (WANT_BLOB if device in blob_devices else 0)
            if names is None:
                yield device, "", bits
            elif isinstance(names, str):
                yield device, names, bits
            else:
                for name in names:
                    yield device, name, bits


def union(interests: Iterable[Interest]) -> set[tuple[str, str, int]]:
    out: set[tuple[str, str, int]] = set()
    for interest in interests:
        out.update(interest.entries())
    return out
