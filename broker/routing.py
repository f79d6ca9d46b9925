"""The broker's routing state: who owns which device, and which peer wants what.

Pure data, no sockets, so it is tested on its own. All of it is rebuildable from the workers'
HELLO and SUB messages, which is what makes a broker restart harmless. A peer's interests are
coarse (a gateway sends the union of its clients'); the gateway or driver worker filters each
message precisely for each client or snooping driver. Routing cost is bounded by the number of
peers (workers), never by the number of clients.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from indibroker.broker.wire import WANT_BLOB, WANT_PLAIN

__all__ = ["Peer", "RoutingTable"]


@dataclass
class Peer:
    ident: bytes
    role: str  # "gateway", "driver" or "remote" (a bridge to another server: a driver that defers)
    name: str
    host: str = ""  # a joined host's name ("": a worker of this instance)
    devices: set[str] = field(default_factory=set)
    # (device, name) -> WANT_* bits; "" device = all devices, "" name = whole device
    interests: dict[tuple[str, str], int] = field(default_factory=dict)


class RoutingTable:
    def __init__(self) -> None:
        self.peers: dict[bytes, Peer] = {}
        self.owners: dict[str, bytes] = {}
        self._by_device: dict[str, set[bytes]] = {}  # device -> peers with some interest in it
        self._wildcard: set[bytes] = set()  # peers interested in every device
        self._cache: dict[tuple[str, str, bool], list[bytes]] = {}  # targets(); cleared on change

    # -- membership -------------------------------------------------------------------------
    def add_peer(self, ident: bytes, role: str, name: str, devices: Iterable[str] = (), host: str = "") -> Peer:
        """Register a peer and the devices it owns; a joined host's peer gets only those no
        other source has (`accepts`)."""
        self._cache.clear()
        if ident in self.peers:
            self.remove_peer(ident)
        peer = Peer(ident, role, name, host)
        self.peers[ident] = peer
        for device in devices:
            if self.accepts(ident, device):
                self.claim(ident, device)
        return peer

    def remove_peer(self, ident: bytes) -> None:
        self._cache.clear()
        peer = self.peers.pop(ident, None)
        if peer is None:
            return
        for device in list(peer.devices):
            self.release(ident, device)
        self._unindex(peer)

    # -- ownership --------------------------------------------------------------------------
    def claim(self, ident: bytes, device: str) -> bytes | None:
        """Record that `ident` owns `device`; returns the previous owner if it was another peer."""
        peer = self.peers.get(ident)
        if peer is None or not device:
            return None
        previous = self.owners.get(device)
        if previous is not None and previous != ident and previous in self.peers:
            self.peers[previous].devices.discard(device)
        self.owners[device] = ident
        peer.devices.add(device)
        return previous if previous not in (None, ident) else None

    def release(self, ident: bytes, device: str) -> None:
        if self.owners.get(device) == ident:
            del self.owners[device]
        peer = self.peers.get(ident)
        if peer is not None:
            peer.devices.discard(device)

    def owner(self, device: str) -> bytes | None:
        return self.owners.get(device)

    # -- interests --------------------------------------------------------------------------
    def set_interests(self, ident: bytes, entries: Iterable[tuple[str, str, int]]) -> None:
        peer = self.peers.get(ident)
        if peer is None:
            return
        self._cache.clear()
        self._unindex(peer)
        peer.interests = {}
        for device, name, bits in entries:
            if bits & (WANT_PLAIN | WANT_BLOB):
                key = (device, name)
                peer.interests[key] = peer.interests.get(key, 0) | bits
        for device, _name in peer.interests:
            if device:
                self._by_device.setdefault(device, set()).add(ident)
            else:
                self._wildcard.add(ident)

    def _unindex(self, peer: Peer) -> None:
        self._wildcard.discard(peer.ident)
        for device, _name in peer.interests:
            group = self._by_device.get(device)
            if group is not None:
                group.discard(peer.ident)
                if not group:
                    del self._by_device[device]

    # -- routing ----------------------------------------------------------------------------
    def targets(self, device: str, name: str, blob: bool) -> list[bytes]:
        """Peers that want a driver's message about (device, name).

        A message without a device goes to every gateway; a message with a device but no
        property name (a `message` or a whole-device `delProperty`) to every peer interested in
        any part of that device.
        """
        key = (device, name, blob)
        cached = self._cache.get(key)
        if cached is None:
            if len(self._cache) > 65536:
                self._cache.clear()
            cached = self._cache[key] = self._targets(device, name, blob)
        return cached

    def _targets(self, device: str, name: str, blob: bool) -> list[bytes]:
        if not device:
            return [i for i, p in self.peers.items() if p.role == "gateway"]
        want = WANT_BLOB if blob else WANT_PLAIN
        out = []
        for ident in self._wildcard | self._by_device.get(device, set()):
            interests = self.peers[ident].interests
            if (interests.get(("", ""), 0) & want) or (interests.get((device, ""), 0) & want):
                out.append(ident)
            elif name and interests.get((device, name), 0) & want:
                out.append(ident)
            elif not name and any(d == device and b & want for (d, _n), b in interests.items()):
                out.append(ident)
        return out

    def drivers(self) -> list[bytes]:
        return [i for i, p in self.peers.items() if p.role != "gateway"]

    def accepts(self, ident: bytes, device: str) -> bool:
        """May this peer speak for `device`? A remote bridge defers to any other owner: a device
        reaches us from one source only, which is what bounds traffic in a cycle of servers. A
        joined host's peer may not take a device from this instance or from another host (its
        own host's other workers may: a driver moved between them)."""
        peer = self.peers.get(ident)
        if peer is None or not device or (peer.role != "remote" and not peer.host):
            return True
        owner = self.owners.get(device)
        if owner is None or owner == ident:
            return True
        return peer.role != "remote" and owner in self.peers and self.peers[owner].host == peer.host
