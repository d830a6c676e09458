"""What a real Debian kernel's ``sit`` driver does, checked INSIDE the qemu guest.

These run only in the VM (tools/vmrun.py boots Debian's stock kernel, which has the sit module
our development kernels may lack); on the host each one has a twin in tests/kvm/test_in_vm.py.
They need only the kernel, iproute2, ping and pyroute2, not sixgate: they pin down the kernel
behaviour sixgate's kernel backend relies on (RFC 4213 configured tunnels).

Add a guest test as a module-level ``test_*`` function; the host twin appears by itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from guestnet import ip, run
from pyroute2 import NetNS

pytestmark = pytest.mark.kvm

Netns = Callable[[str], str]

LEFT_IPV4 = "192.0.2.10"
RIGHT_IPV4 = "198.51.100.1"
LEFT_IPV6 = "2001:db8:1::1"
RIGHT_IPV6 = "2001:db8:1::2"
PINGS = 3


def test_sit_module_loaded() -> None:
    assert Path("/sys/module/sit").is_dir(), (
        "the sit module is not loaded (vmrun.py --modules should name it):\n"
        + run(["lsmod"], check=False).stdout)


def test_kernel_sit_ping_between_namespaces(netns: Netns) -> None:
    """RFC 4213 configured tunnel, kernel on both ends: IPv6 echo crosses IPv4 protocol 41."""
    left, right = netns("left"), netns("right")
    ip("link", "add", "veth-l", "netns", left, "type", "veth", "peer", "name", "veth-r",
       "netns", right)
    # Two /24s on one wire, each side with an on-link /32 route to the other.
    for ns, dev, mine, theirs in ((left, "veth-l", LEFT_IPV4, RIGHT_IPV4),
                                  (right, "veth-r", RIGHT_IPV4, LEFT_IPV4)):
        ip("addr", "add", f"{mine}/24", "dev", dev, netns=ns)
        ip("link", "set", dev, "up", netns=ns)
        ip("route", "add", f"{theirs}/32", "dev", dev, netns=ns)
    for ns, mine, theirs, address in ((left, LEFT_IPV4, RIGHT_IPV4, LEFT_IPV6),
                                      (right, RIGHT_IPV4, LEFT_IPV4, RIGHT_IPV6)):
        ip("tunnel", "add", "sit6", "mode", "sit", "local", mine, "remote", theirs, "ttl", "64",
           netns=ns)
        ip("link", "set", "sit6", "up", netns=ns)
        ip("-6", "addr", "add", f"{address}/64", "dev", "sit6", "nodad", netns=ns)
    # The IPv4 path first, so a broken underlay is not reported as a broken tunnel.
    run(["ping", "-4", "-c", "1", "-w", "10", RIGHT_IPV4], netns=left)

    result = run(["ping", "-6", "-c", str(PINGS), "-i", "0.2", "-w", "20", RIGHT_IPV6],
                 netns=left)

    assert f"{PINGS} received" in result.stdout, result.stdout
    stats = json.loads(ip("-s", "-j", "link", "show", "dev", "sit6", netns=right))
    assert stats[0]["stats64"]["rx"]["packets"] >= PINGS, stats


def test_pyroute2_creates_sit_link(netns: Netns) -> None:
    """pyroute2 (what the kernel backend uses) makes a sit link with our endpoints and TTL."""
    ns = netns("pyroute2")
    with NetNS(ns, flags=0) as ipr:
        ipr.link("add", ifname="sg6in4", kind="sit", sit_local=LEFT_IPV4, sit_remote=RIGHT_IPV4,
                 sit_ttl=64)
        details = ip("-d", "link", "show", "dev", "sg6in4", netns=ns)
        # `ip -d` prints the mode as "sit ip6ip" for pyroute2's link, "sit any" for `ip tunnel`;
        # the link/sit line is the same for both.
        assert re.search(rf"link/sit {re.escape(LEFT_IPV4)} peer {re.escape(RIGHT_IPV4)}\b",
                         details), details
        assert re.search(r"\bttl 64\b", details), details
        (index,) = ipr.link_lookup(ifname="sg6in4")
        ipr.link("del", index=index)
    assert "sg6in4" not in ip("link", "show", netns=ns)
