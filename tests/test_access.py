"""The access policy: allow-list, read-only networks, per-device write rules (pure, property-tested
against a plain reference model)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from indibroker.workers.access import AccessPolicy, client_address, parse_networks


def test_defaults_are_open():
    policy = AccessPolicy()
    assert policy.open
    assert policy.admit("203.0.113.9") is None and policy.may_write("203.0.113.9", "CCD") is None


def test_allow_list_ipv4_ipv6_and_mapped():
    policy = AccessPolicy(allow=parse_networks(["127.0.0.0/8", "::1", "192.168.1.0/24"]))
    assert policy.admit("127.0.0.2") is None
    assert policy.admit("::1") is None
    assert policy.admit("::ffff:192.168.1.40") is None  # an IPv4 client of a dual-stack socket
    assert "not allowed" in (policy.admit("192.168.2.1") or "")
    assert "not allowed" in (policy.admit("fe80::1%eth0") or "")
    assert "not allowed" in (policy.admit("not-an-address") or "")


def test_read_only_and_device_rules():
    policy = AccessPolicy(read_only=parse_networks(["10.0.0.0/8"]),
                          write_rules={"Telescope Simulator": parse_networks(["192.168.1.10"])})
    assert "read-only" in (policy.may_write("10.1.2.3", "CCD Simulator") or "")
    assert policy.may_write("192.168.1.11", "CCD Simulator") is None  # no rule for the CCD
    assert "may not change Telescope Simulator" in (policy.may_write("192.168.1.11", "Telescope Simulator") or "")
    assert policy.may_write("192.168.1.10", "Telescope Simulator") is None


def test_bad_cidr_is_named():
    with pytest.raises(ValueError, match="'10.0.0.0/33'"):
        parse_networks(["10.0.0.0/33"], "--allow ")


ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
nets = st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32)).map(
    lambda t: ipaddress.IPv4Network((t[0], t[1]), strict=False)), max_size=3)


@given(ipv4, nets, nets, st.dictionaries(st.sampled_from(["A", "B"]), nets, max_size=2), st.sampled_from(["A", "B"]))
def test_policy_matches_the_reference_model(host, allow, read_only, rules, device):
    policy = AccessPolicy(allow=tuple(allow), read_only=tuple(read_only),
                          write_rules={d: tuple(n) for d, n in rules.items()})
    address = client_address(host)
    admitted = not allow or any(address in n for n in allow)
    writable = not any(address in n for n in read_only) and (device not in rules or any(
        address in n for n in rules[device]))
    assert (policy.admit(host) is None) == admitted
    assert (policy.may_write(host, device) is None) == writable
