"""Issue 19: is the 6in4 broker still there? RFC 4213 §3.8 probes of its link-local address.

The lab's broker (tunnel_peer.py in front of the peer namespace's kernel) holds fe80::c633:6401,
the link-local address RFC 4213 §3.7 gives its end of the tunnel (Linux sit configures the same),
so its kernel answers the gateway's echo requests through the tunnel. The real ``sixgate run``
probes every second here: ``sixgate_tunnel_peer_reachable`` is 1; the broker's address is taken
away (it stops answering): 0 and a warning in the log; back: 1 again.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import netlab
import pytest
from netlab import PEER_IPV4, PEER_TUN, Lab

pytestmark = [pytest.mark.lab]

BROKER_LINK_LOCAL = "fe80::c633:6401"  # fe80::<198.51.100.1> (RFC 4213 §3.7)


class ProbedLab(Lab):
    def config_text(self) -> str:
        return super().config_text().replace("[tunnel]\n", "[tunnel]\nprobe_interval_s = 1\n")


@pytest.fixture(scope="module")
def probed_lab(served_files: netlab.ServedFiles) -> Iterator[ProbedLab]:
    with ProbedLab("6in4", 1, served_files, fanout="kernel") as lab:
        yield lab


def reachable(lab: Lab) -> float | None:
    body = lab.gw(["curl", "-sf", "http://127.0.0.1:9641/metrics"]).stdout
    found = re.search(rf'^sixgate_tunnel_peer_reachable{{peer="{PEER_IPV4}"}} (\S+)$', body,
                      re.MULTILINE)
    return float(found.group(1)) if found else None


def test_the_brokers_reachability_is_probed_and_followed(probed_lab: ProbedLab) -> None:
    lab = probed_lab
    netlab.wait_until(lambda: reachable(lab) == 1.0, timeout=15,
                      what=lambda: "the first answered probe:\n" + lab.gateway_stderr())
    body = lab.gw(["curl", "-sf", "http://127.0.0.1:9641/metrics"]).stdout
    assert re.search(rf'^sixgate_tunnel_peer_rtt_seconds{{peer="{PEER_IPV4}"}} 0\.\d+',
                     body, re.MULTILINE), body[-2000:]
    lab.ip(lab.peer_ns, "addr", "del", f"{BROKER_LINK_LOCAL}/64", "dev", PEER_TUN)
    try:
        netlab.wait_until(lambda: reachable(lab) == 0.0, timeout=15,
                          what="the probe to find the broker silent")
        assert f"6in4 peer {PEER_IPV4} does not answer its link-local {BROKER_LINK_LOCAL}" \
            in lab.gateway_stderr()
    finally:
        lab.ip(lab.peer_ns, "addr", "add", f"{BROKER_LINK_LOCAL}/64", "dev", PEER_TUN, "nodad")
    netlab.wait_until(lambda: reachable(lab) == 1.0, timeout=15,
                      what="the broker to answer again")
    assert f"6in4 peer {PEER_IPV4} answers" in lab.gateway_stderr()
