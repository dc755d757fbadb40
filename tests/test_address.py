"""The advertised address, chosen explicitly: --ip, --ip-from an interface or a CIDR, then today's rules.

The choice is tested on injected interface lists; the reading of real interfaces on the
loopback's own addresses and on a veth pair in a network namespace this test makes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from announcer.config import Ambient, load_config
from announcer.errors import ConfigError
from announcer.sources import interface_addresses
from tests.servers import require

INTERFACES = [
    ("eth0", "192.168.1.10", 24),
    ("eth1", "10.1.2.3", 16),
    ("eth1", "10.1.9.9", 16),
    ("lo", "127.0.0.1", 8),
]
AMBIENT = Ambient(hostname=lambda: "node-1", ip=lambda: "192.168.1.10", interfaces=lambda: INTERFACES)


def address(flags: dict[str, Any], env: dict[str, str] | None = None) -> tuple[str, str]:
    svc = load_config({"service": "web", "port": "80", **flags}, env or {}, AMBIENT).services[0]
    return svc.ip, svc.ip_source


def test_ip_from_an_interface_takes_its_first_address() -> None:
    assert address({"ip_from": "eth1"}) == ("10.1.2.3", "--ip-from eth1: its first IPv4 address")


def test_ip_from_a_cidr_takes_the_first_address_in_it() -> None:
    assert address({"ip_from": "10.0.0.0/8"}) == (
        "10.1.2.3",
        "--ip-from 10.0.0.0/8: the first address in it, on eth1",
    )
    assert address({"ip_from": "192.168.1.77/24"})[0] == "192.168.1.10"  # host bits are forgiven


def test_the_fallbacks_say_where_the_address_came_from() -> None:
    assert address({"ip": "10.9.9.9"}) == ("10.9.9.9", "--ip")
    assert address({}, {"COREOS_PUBLIC_IPV4": "10.5.5.5"}) == ("10.5.5.5", "$COREOS_PUBLIC_IPV4")
    assert address({}, {"COREOS_PRIVATE_IPV4": "10.6.6.6"}) == ("10.6.6.6", "$COREOS_PRIVATE_IPV4")
    assert address({}) == ("192.168.1.10", "the default route's interface")
    # --ip-from is explicit: it wins over the ambient convention
    assert address({"ip_from": "eth1"}, {"COREOS_PUBLIC_IPV4": "10.5.5.5"})[0] == "10.1.2.3"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"ip_from": "eth9"}, "--ip-from eth9: no such interface (IPv4 ones: eth0, eth1, lo)"),
        ({"ip_from": "172.16.0.0/12"}, "--ip-from 172.16.0.0/12: no address of this host is in it"),
        ({"ip_from": "10.0.0.0/33"}, "is neither an interface name nor an IPv4 CIDR"),
        ({"ip_from": "eth1", "ip": "10.0.0.1"}, "give --ip or --ip-from, not both"),
    ],
)
def test_refusals_are_one_line(flags: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        address(flags)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_interface_without_an_ipv4_address_is_refused() -> None:
    # The loopback exists on every host; here the list of IPv4 addresses leaves it out.
    ambient = Ambient(
        hostname=lambda: "n", ip=lambda: "10.0.0.1", interfaces=lambda: [("eth0", "10.0.0.1", 8)]
    )
    with pytest.raises(ConfigError, match="--ip-from lo: the interface has no IPv4 address"):
        load_config({"service": "web", "port": "80", "ip_from": "lo"}, {}, ambient)


def test_the_real_loopback_is_read() -> None:
    assert ("lo", "127.0.0.1", 8) in interface_addresses()
    real = Ambient(hostname=lambda: "n", ip=lambda: "10.0.0.1")
    for wanted in ("lo", "127.0.0.0/8"):
        svc = load_config({"service": "web", "port": "80", "ip_from": wanted}, {}, real).services[0]
        assert svc.ip == "127.0.0.1"


@pytest.fixture
def namespace() -> Iterator[str]:
    """A network namespace of this test's own, with a veth pair: v0 has 10.77.0.5/24, v1 nothing."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        require("network namespaces need root and iproute2's ip")
    name = f"announcer-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for command in (
            "ip link add v0 type veth peer name v1",
            "ip addr add 10.77.0.5/24 dev v0",
            "ip link set v0 up",
            "ip link set lo up",
        ):
            subprocess.run(["ip", "netns", "exec", name, *command.split()], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def check_in(namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-m", "announcer", "check", "--service", "web",
         "--port", "80", "--check", "exec:/bin/true", "--json", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_interfaces_of_a_network_namespace(namespace: str) -> None:
    by_name = check_in(namespace, "--ip-from", "v0")
    assert by_name.returncode == 0, by_name.stderr
    report = json.loads(by_name.stdout)
    assert (report["address"], report["address_from"]) == (
        "10.77.0.5",
        "--ip-from v0: its first IPv4 address",
    )
    assert report["record"]["ipv4_addr"] == "10.77.0.5"
    by_cidr = json.loads(check_in(namespace, "--ip-from", "10.77.0.0/16").stdout)
    assert by_cidr["address"] == "10.77.0.5"
    no_address = check_in(namespace, "--ip-from", "v1")
    assert no_address.returncode == 2
    assert no_address.stderr.strip() == "error: --ip-from v1: the interface has no IPv4 address"
    no_match = check_in(namespace, "--ip-from", "10.99.0.0/16")
    assert no_match.returncode == 2
    assert "no address of this host is in it" in no_match.stderr
