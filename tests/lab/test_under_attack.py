"""The real gateway under hostile load (the hostile-input issue): it keeps serving.

One lab of its own (6to4, 2 workers, kernel fan-out, a table of 200 flows so a flood fills it
in a second): a SYN flood from random spoofed sources of one 6to4 /48, and a flood of
malformed protocol-41 packets; after each, a real client's ``curl -6`` and ``ping -6`` still
work and the counters name what happened. ``make soak`` (bench/soak.py) is the long version.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import netlab
import pytest
import zmq
from netlab import Lab, events

from sixgate.coordinator import metrics
from sixgate.workers import control

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
    # The flood holds thousands of valid echo requests from the peer's /64, which empty its
    # echo bucket (a tenth of echo_replies_per_s, burst as deep: refilled within a second);
    # the ping is about the gateway being alive, not about that rate limit.
    time.sleep(1.5)
    done = netlab.ping(lab, 56)
    assert netlab.ping_received(done.stdout) == 3, done.stdout + done.stderr
    delta = netlab.drops_delta(before, netlab.drops(lab))
    print(f"malformed packets by drop reason: {delta}")
    assert delta.get("internal_error", 0) == 0, delta
    assert sum(delta.values()) >= 5000, delta
    assert lab.alive("sixgate")


def test_malformed_control_requests_are_answered_and_counted(attack_lab: Lab) -> None:
    """Deeply nested JSON, a two-frame request and an oversized one on the coordinator's and a
    worker's control socket: each gets an error reply, nobody dies (they used to end the
    process: RecursionError, ZeroMQ EFSM), and sixgate_control_errors counts them."""
    lab = attack_lab
    run_dir = str(lab.tmp / "run")
    ctx = zmq.Context.instance()
    bad = ([b"[" * 2000 + b"]" * 2000], [b'{"v": 1, "cmd": "ping"}', b"second frame"],
           [b"x" * 100_000])
    for endpoint in (control.coordinator_endpoint(run_dir), control.control_endpoint(run_dir, 0)):
        for frames in bad:
            req = ctx.socket(zmq.REQ)
            req.setsockopt(zmq.LINGER, 0)
            req.connect(endpoint)
            try:
                req.send_multipart(frames)
                assert req.poll(5000), f"{endpoint} did not answer {frames[0][:20]!r}"
                reply = json.loads(req.recv())
            finally:
                req.close(0)
            assert reply["ok"] is False, reply
    assert lab.alive("sixgate"), lab.gateway_stderr()
    status = lab.flows()["counters"]
    assert status["coordinator"]["events"].get("control_errors", 0) >= len(bad)
    assert status["workers"][0]["counters"]["events"].get("control_errors", 0) >= len(bad)
    assert all(w["up"] for w in status["workers"])


def test_idle_connections_cannot_pile_up_on_the_metrics_endpoint(attack_lab: Lab) -> None:
    """40 connections that never send a request (slowloris) against /metrics: the endpoint
    takes at most 16 at once and closes each after its 5 s request timeout (it used to keep a
    thread per connection for ever); a scrape meanwhile succeeds."""
    lab = attack_lab
    holder = subprocess.Popen(netlab.in_ns(lab.gw_ns, [
        sys.executable, str(netlab.PROGRAMS / "hold_connections.py"), "127.0.0.1", "9641", "40",
        "2"]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        held = json.loads(holder.stdout.readline())["connected"]
        assert held > 0
        time.sleep(metrics.REQUEST_TIMEOUT_S + 1.5)
        done = lab.gw(["curl", "-sS", "--max-time", "5", "http://127.0.0.1:9641/metrics"])
        assert done.returncode == 0 and "sixgate_ready 1.0" in done.stdout, done.stderr
        holder.stdin.write("\n")
        holder.stdin.flush()
        closed = json.loads(holder.stdout.readline())["closed"]
        assert closed == held, (closed, held)
    finally:
        netlab.stop_process(holder, 5)


def guard_counters(lab: Lab) -> list[int]:
    """Packet counts of the gateway table's counted drop rules, in rule order."""
    table = lab.gw(["nft", "list", "table", "ip", f"sixgate_{lab.name}"]).stdout
    return [int(n) for n in re.findall(r"counter packets (\d+) bytes \d+ drop", table)]


def test_ipv4_side_nobody_on_the_uplink_reaches_or_spoofs_the_pool(attack_lab: Lab) -> None:
    """The IPv4 uplink: a host that is not a configured target cannot send to a pool address
    (forwarding is open on the uplink only for the targets' replies), and nobody can send
    from a pool address (it lives only behind the TUN devices): both dropped and counted by
    the gateway's own nftables table."""
    lab = attack_lab
    pool = lab.flows()["counters"]["settings"]["pool"]
    pool_host = str(next(ipaddress.IPv4Network(pool).hosts()))
    spoofed_src = str(list(ipaddress.IPv4Network(pool).hosts())[5])
    lab.ip(lab.peer_ns, "route", "replace", pool, "via", netlab.GATEWAY_IPV4)
    try:
        before = guard_counters(lab)
        assert len(before) == 2, lab.gw(["nft", "list", "ruleset"]).stdout
        for src, dst in ((netlab.PEER_IPV4, pool_host), (spoofed_src, netlab.GATEWAY_IPV4)):
            sent = lab.peer([sys.executable, str(netlab.PROGRAMS / "send_raw_udp.py"), src,
                             dst, "5"])
            assert sent.returncode == 0, sent.stderr
        spoofed, to_pool = (after - was for after, was in zip(guard_counters(lab), before,
                                                                 strict=True))
        assert (spoofed, to_pool) == (5, 5), lab.gw(["nft", "list", "ruleset"]).stdout
    finally:
        lab.ip(lab.peer_ns, "route", "del", pool)


def test_pool_overlapping_a_route_of_the_host_is_refused(served_files: netlab.ServedFiles
                                                         ) -> None:
    """A host route inside or around the pool (here 100.64.0.0/10, as a CGNAT or VPN uplink
    has) would lose its traffic to the workers' routes: `sixgate run` refuses to start, names
    the route and the fix, and leaves no link, route or table behind (it used to replace the
    host's route)."""
    with Lab("6to4", 1, served_files, with_gateway=False) as lab:
        lab.ip(lab.gw_ns, "route", "add", "100.64.0.0/10", "dev", "veth0")
        done = lab.sixgate("run", timeout=30)
        assert done.returncode == 1, done.stderr
        assert "overlaps this host's route(s) 100.64.0.0/10 dev veth0" in done.stderr
        assert "set [gateway] pool" in done.stderr
        routes = lab.gw(["ip", "-4", "route", "show"]).stdout
        assert "100.64.0.0/10 dev veth0" in routes and lab.name not in routes, routes
        assert lab.gateway_links() == []
        assert lab.gw(["nft", "list", "tables"]).stdout.strip() == ""


def test_idle_coordinator_does_not_spin_under_kernel_fanout(attack_lab: Lab) -> None:
    """With kernel fan-out the coordinator polls no socket in its main loop (control has its
    own thread): it must sleep, not spin (it once took half a core doing nothing)."""
    pid = int(attack_lab.flows()["counters"]["pid"])
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu_s() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks

    before, started = cpu_s(), time.monotonic()
    time.sleep(3.0)
    share = (cpu_s() - before) / (time.monotonic() - started)
    assert share < 0.1, f"the coordinator used {share:.0%} of a CPU while idle"
