"""Issue 19: 6rd (RFC 5969), the 6to4 mechanism inside an ISP's own prefix, in userspace.

The lab's peer (tunnel_peer.py, independent struct/int code) is another CE of the 6rd domain
2001:db8:8000::/33 (IPv4MaskLen 5) and its border relay; clients outside the 6rd prefix
(2001:db8:1::/48) come through that relay. Through the real ``sixgate run``: ``sixgate check``
derives the delegated prefix, ping and a 100 MB download from the CE, a client behind the
border relay, and the RFC 5969 §12 source checks (a domain source from another CE's address,
an outside source not from the relay: each dropped as spoofed_6rd).
"""

from __future__ import annotations

from collections.abc import Iterator

import netlab
import pytest
from netlab import PEER_IPV4, PEER_OTHER_IPV4, Lab

pytestmark = [pytest.mark.lab]


@pytest.fixture(scope="module")
def sixrd_lab(served_files: netlab.ServedFiles) -> Iterator[Lab]:
    with Lab("6rd", 1, served_files, fanout="kernel") as lab:
        yield lab


def test_check_derives_the_delegated_prefix(sixrd_lab: Lab) -> None:
    done = sixrd_lab.sixgate("check")
    assert done.returncode == 0, done.stderr
    assert "tunnel        6rd (RFC 5969" in done.stdout, done.stdout
    # RFC 5969 §4: 2001:db8:8000::/33, then 27 bits of 192.0.2.10 (0x000020a): a /60.
    assert "delegated     2001:db8:8000:20a0::/60" in done.stdout, done.stdout
    assert f"border relay  {PEER_IPV4}" in done.stdout, done.stdout


def test_ping_and_a_100mb_download_from_another_ce(sixrd_lab: Lab) -> None:
    lab = sixrd_lab
    done = lab.peer(["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2",
                     lab.plan.gateway_address], timeout=20)
    assert netlab.ping_received(done.stdout) == 3, done.stdout + lab.gateway_stderr()
    served = lab.files.big
    got = netlab.download(lab, netlab.http_url(lab, served.name), max_time_s=150)
    assert got.exit_code == 0, got.stderr
    assert (got.size_bytes, got.sha256) == (served.size_bytes, served.sha256)
    assert netlab.drops(lab).get("spoofed_6rd", 0) == 0


def test_a_client_outside_the_6rd_prefix_through_the_border_relay(sixrd_lab: Lab) -> None:
    """RFC 5969 §7.1.1: the replies to a source outside the 6rd prefix go to the border
    relay (the peer), which hands them to the client."""
    lab = sixrd_lab
    client = lab.plan.extra_clients(1)[0]
    done = lab.peer(["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "-I", client,
                     lab.plan.gateway_address], timeout=20)
    assert netlab.ping_received(done.stdout) == 3, done.stdout + lab.gateway_stderr()
    small = lab.peer(["curl", "-6", "-g", "-sS", "--max-time", "10", "--interface", client,
                      netlab.http_url(lab, netlab.SMALL_NAME)], timeout=20)
    assert small.stdout == netlab.SMALL_TEXT, small.stderr


@pytest.mark.parametrize(("outer", "inner_src"), [
    # A domain source whose embedded IPv4 (198.51.100.1) is not the outer source.
    (PEER_OTHER_IPV4, "2001:db8:e336:4010::7"),
    # A source outside the 6rd prefix, not from the border relay.
    (PEER_OTHER_IPV4, "2001:db8:1:1::7"),
])
def test_rfc5969_section12_source_checks(sixrd_lab: Lab, outer: str, inner_src: str) -> None:
    lab = sixrd_lab
    before = netlab.drops(lab)
    sent = lab.probe("send41", "--outer-src", outer, "--outer-dst", netlab.GATEWAY_IPV4,
                     "--inner-src", inner_src, "--inner-dst", lab.plan.gateway_address,
                     "--count", "5", "--listen-s", "0.5")
    after = netlab.wait_for_drops(lab, before, "spoofed_6rd", 5)
    assert netlab.drops_delta(before, after).get("spoofed_6rd") == 5, (
        sent, netlab.drops_delta(before, after))
