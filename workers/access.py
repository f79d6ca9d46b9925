"""Who may connect, and who may change what: the access rules, as a pure policy.

INDI has no authentication, so these rules go by the client's address, as a firewall would:
- `allow`: networks clients may connect from (empty: any address);
- `read_only`: networks whose clients may watch but not change anything (their new*Vector is
  dropped and they are told why);
- `write_rules`: per device, the networks that may change it (a device without a rule may be
  changed by any client that is not read-only);
- `max_per_address`: connections at once from one address (0: no limit; counted across every
  client transport by the caller).

Every client transport (TCP gateways, and any later one) asks the same `AccessPolicy`, so the
rules cannot differ between them. Pure: addresses in, decisions out; tests/test_access.py.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["AccessPolicy", "Network", "parse_networks", "client_address"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(texts: Iterable[str], where: str = "") -> tuple[Network, ...]:
    """CIDR texts ("192.168.1.0/24", "::1", "10.0.0.7") as networks; ValueError names the bad one."""
    out = []
    for text in texts:
        try:
            out.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{where}{text!r}: not an address or CIDR network ({exc})") from None
    return tuple(out)


def client_address(host: str) -> Address | None:
    """A peer's address as the rules see it: an IPv4 client of a dual-stack socket
    (``::ffff:192.0.2.1``) is the IPv4 address it is; None for what is not an IP address."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: Address, networks: Iterable[Network]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


@dataclass(frozen=True)
class AccessPolicy:
    allow: tuple[Network, ...] = ()
    read_only: tuple[Network, ...] = ()
    write_rules: Mapping[str, tuple[Network, ...]] = field(default_factory=dict)
    max_per_address: int = 0

    @property
    def open(self) -> bool:
        """No rule at all: the gateway can skip every check."""
        return not (self.allow or self.read_only or self.write_rules or self.max_per_address)

    def admit(self, host: str) -> str | None:
        """None if a client from `host` may connect, else why not."""
        if not self.allow:
            return None
        address = client_address(host)
        if address is None or not _within(address, self.allow):
            return f"address {host} is not allowed to connect"
        return None

    def may_write(self, host: str, device: str) -> str | None:
        """None if a client from `host` may change `device`, else why not (said to the client)."""
        if not (self.read_only or self.write_rules):
            return None
        address = client_address(host)
        if address is None:
            return f"address {host} may not change properties"
        if _within(address, self.read_only):
            return f"clients from {host} are read-only here"
        rule = self.write_rules.get(device)
        if rule is not None and not _within(address, rule):
            return f"clients from {host} may not change {device}"
        return None
