"""The real gateway under hostile load (the hostile-input issue): it keeps serving.

One lab of its own (6to4, 2 workers, kernel fan-out, a table of 200 flows so a flood fills it
in a second): a SYN flood from random spoofed sources of one 6to4 /48, and a flood of
malformed protocol-41 packets; after each, a real client's ``curl -6`` and ``ping -6`` still
work and the counters name what happened. ``make soak`` (bench/soak.py) is the long version.
"""

from __future__ import annotations

from collections.abc import Iterator

import netlab
import pytest
from netlab import Lab

pytestmark = pytest.mark.lab

MAX_FLOWS = 200  # 100 per worker


class SmallTableLab(Lab):
    def config_text(self) -> str:
        text = super().config_text()
        return text.replace("[gateway]\n", f"[gateway]\nmax_flows = {MAX_FLOWS}\n", 1)


@pytest.fixture(scope="module")
def attack_lab(served_files: netlab.ServedFiles) -> Iterator[Lab]:
    with SmallTableLab("6to4", 2, served_files, fanout="kernel") as lab:
        yield lab


def events(lab: Lab) -> dict[str, int]:
    """Worker events summed over the workers (``sixgate flows --json``)."""
    total: dict[str, int] = {}
    for worker in lab.flows()["counters"]["workers"]:
        for name, count in worker.get("counters", {}).get("events", {}).items():
            total[name] = total.get(name, 0) + int(count)
    return total


def test_syn_flood_from_one_48_leaves_room_for_a_real_client(attack_lab: Lab) -> None:
    """3000 SYNs from random spoofed sources of the peer's own 6to4 /48 (they pass the RFC
    3964 checks) fill both workers' tables with half-open sessions; each is unassured, so the
    real client's handshake evicts the oldest (Linux conntrack's early drop) and curl -6
    completes; nothing was refused as flow_limit while half-open sessions could make room."""
    lab = attack_lab
    before = events(lab)
    drops_before = netlab.drops(lab)
    result = lab.probe("synflood41", "--outer-src", netlab.PEER_IPV4, "--outer-dst",
                       netlab.GATEWAY_IPV4, "--inner-prefix", "2002:c633:6401::/48",
                       "--inner-dst", lab.plan.gateway_address, "--count", "3000")
    assert result["sent"] == 3000, result
    netlab.wait_until(lambda: len(lab.flows()["bindings"]) >= MAX_FLOWS - 2, timeout=20,
                      what="the flood to fill the tables")
    url = netlab.http_url(lab, f"/{netlab.SMALL_NAME}")
    exit_code, _elapsed, stderr = netlab.curl_exit(lab, url, max_time_s=10)
    assert exit_code == 0, stderr
    after = events(lab)
    evicted = after.get("flows_evicted", 0) - before.get("flows_evicted", 0)
    delta = netlab.drops_delta(drops_before, netlab.drops(lab))
    print(f"SYN flood: {evicted} half-open sessions evicted, drops {delta}")
    assert evicted >= 3000 - MAX_FLOWS - 100, (evicted, delta)
    assert delta.get("flow_limit", 0) == 0, delta
    assert delta.get("internal_error", 0) == 0, delta
    assert len(lab.flows()["bindings"]) <= MAX_FLOWS


def test_malformed_packet_flood_never_crashes_and_ping_still_answers(attack_lab: Lab) -> None:
    """20000 mutated protocol-41 packets of every kind the probe makes (the CI share of
    ``make fuzz``): every one is counted under a named reason, internal_error stays 0, and
    ping -6 is answered afterwards."""
    lab = attack_lab
    before = netlab.drops(lab)
    result = lab.probe("fuzz41", "--outer-src", netlab.PEER_IPV4, "--outer-dst",
                       netlab.GATEWAY_IPV4, "--inner-src", lab.plan.peer_address,
                       "--inner-dst", lab.plan.gateway_address, "--count", "20000",
                       "--seed", "1341", timeout=120)
    assert result["sent"] == 20000, result
    done = netlab.ping(lab, 56)
    assert netlab.ping_received(done.stdout) == 3, done.stdout + done.stderr
    delta = netlab.drops_delta(before, netlab.drops(lab))
    print(f"malformed packets by drop reason: {delta}")
    assert delta.get("internal_error", 0) == 0, delta
    assert sum(delta.values()) >= 5000, delta
    assert lab.alive("sixgate")
