"""The real gateway end to end: real clients in an IPv6 namespace, real services over IPv4.

Every test drives ``sixgate run`` (a subprocess in a namespace whose kernel has IPv6 disabled)
from the peer namespace through the independent tunnel peer (tests/lab/tunnel_peer.py): real
``ping -6``, ``curl -6``, ``dig`` and small socket probes (tests/lab/probe.py). Counters are read
with ``sixgate flows --json`` and asserted as deltas. One lab + gateway per (mode, workers);
the fixture's teardown checks INTERNAL_ERROR == 0, exit code 0 on SIGTERM and no links left.
"""

from __future__ import annotations

import json
import pwd
import sys
import time
from pathlib import Path

import as_service_user
import netlab
import pytest
from netlab import Lab, drops, drops_delta, wait_for_drops
from scapy.layers.inet6 import (
    HBHOptUnknown,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ParamProblem,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    Pad1,
)
from scapy.packet import Packet, Raw, raw

pytestmark = pytest.mark.lab

SPOOFED_6TO4_SOURCE = "2002:cb00:7101::1"  # embeds 203.0.113.1, not the outer source
FOREIGN_PACKETS = 5
NO_ANSWER_WINDOW_S = 1.0  # how long silence must last: replies here take about 1 ms
REFUSED_WITHIN_S = 2.0  # "at once": far below curl's 5 s timeout and any SYN retransmission



# RFC 8200 §4 host rules through the real gateway (scapy builds each packet; the engine-level
# versions are tests/unit/test_rfc8200_host.py): (layers after the IPv6 header, what must come
# back: (4, code, pointer) for a Parameter Problem, "echo" for an echo reply, None for
# nothing, and the drop reason that counts it).
ECHO = ICMPv6EchoRequest(id=0x5151, seq=1, data=b"rfc8200")
HOST_RULES: dict[str, tuple[list[Packet], tuple[int, int, int] | str | None, str | None]] = {
    "rfc8200_4_2_option_00_skipped": (
        [IPv6ExtHdrDestOpt(options=[HBHOptUnknown(otype=0x1E, optdata=b"ab")]), ECHO],
        "echo", None),
    "rfc8200_4_2_option_01_discarded_silently": (
        [IPv6ExtHdrHopByHop(options=[HBHOptUnknown(otype=0x5E, optdata=b"ab")]), ECHO],
        None, "unrecognized_option"),
    "rfc8200_4_2_option_10_code_2_at_the_option": (
        [IPv6ExtHdrDestOpt(options=[HBHOptUnknown(otype=0x9E, optdata=b"")]), ECHO],
        (4, 2, 42), "unrecognized_option"),
    "rfc8200_4_2_option_11_code_2_at_the_option": (
        [IPv6ExtHdrHopByHop(options=[Pad1(), HBHOptUnknown(otype=0xDE, optdata=b"")]), ECHO],
        (4, 2, 43), "unrecognized_option"),
    "rfc8200_4_4_routing_segments_left_code_0_at_type": (
        [IPv6ExtHdrRouting(type=0, segleft=1, addresses=["2001:db8::99"]), ECHO],
        (4, 0, 42), "bad_header"),
    "rfc8200_4_4_routing_segments_left_0_ignored": (
        [IPv6ExtHdrRouting(type=253, segleft=0, addresses=["2001:db8::99"]), ECHO],
        "echo", None),
    "rfc8200_4_hop_by_hop_not_first_code_1": (
        [IPv6ExtHdrDestOpt(), IPv6ExtHdrHopByHop(), ECHO], (4, 1, 40), "bad_header"),
    "rfc8200_4_unknown_next_header_code_1": (
        [IPv6ExtHdrDestOpt(nh=253), Raw(bytes(8))], (4, 1, 40), "unsupported_protocol"),
    "rfc8200_4_5_fragment_not_multiple_of_8_code_0_at_payload_length": (
        [IPv6ExtHdrFragment(nh=58, m=1, id=21), ECHO], (4, 0, 4), "bad_fragment"),
    "rfc8200_4_5_fragment_past_65535_code_0_at_offset": (
        [IPv6ExtHdrFragment(nh=58, m=0, id=22, offset=65528 // 8), Raw(bytes(16))],
        (4, 0, 42), "bad_fragment"),
    "rfc7112_5_first_fragment_without_header_chain_code_3": (
        [IPv6ExtHdrFragment(nh=6, m=1, id=23), Raw(bytes(8))], (4, 3, 0), "bad_fragment"),
}


class GatewayBehaviour:
    """What the gateway must do in both tunnel modes (subclasses set MODE). The classes of
    the coordinator's fan-out write to the TUN devices with write(2), those of kernel fan-out
    through io_uring (the default), so every behaviour is seen with both."""

    MODE = ""
    TUN_WRITES = "write"

    def test_workers_write_to_the_services_as_configured(self, lab: Lab,
                                                          request: pytest.FixtureRequest) -> None:
        """Each worker says at start how its packets reach the services: io_uring batches
        (this kernel allows io_uring, so no fallback) or write(2) when configured so."""
        if self.TUN_WRITES == "io_uring":
            request.getfixturevalue("io_uring")
        expected = "io_uring" if self.TUN_WRITES == "io_uring" else "write(2)"
        log = lab.log_path("sixgate").read_text()
        said = [f"worker {i}: packets to the device by {expected}" in log
                for i in range(lab.workers)]
        assert all(said), netlab.tail(lab.log_path("sixgate"))
        assert "io_uring refused" not in log

    def test_gateway_namespace_has_no_kernel_ipv6(self, lab: Lab) -> None:
        """The gateway is the host's whole IPv6 stack: its kernel has IPv6 switched off."""
        assert lab.gw(["sysctl", "-n", "net.ipv6.conf.all.disable_ipv6"]).stdout.strip() == "1"
        assert lab.gw(["ip", "-6", "addr", "show"]).stdout.strip() == ""

    @pytest.mark.parametrize("payload_bytes", [56, 1400, 3000],
                             ids=["payload56", "payload1400", "payload3000_fragmented"])
    def test_rfc4443_echo_request_to_gateway_address_answered(self, lab: Lab,
                                                              payload_bytes: int) -> None:
        """ping -6 is answered; 3000-byte payloads are fragmented by the client's kernel, so
        the gateway must reassemble them (RFC 8200 §4.5) and fragment its reply (RFC 7915)."""
        done = netlab.ping(lab, payload_bytes)
        assert netlab.ping_received(done.stdout) == 3, done.stdout + done.stderr

    def test_http_download_through_gateway_is_byte_identical(self, lab: Lab) -> None:
        """curl -6 fetches 100 MB from http.server on 127.0.0.1:8080 intact (TCP translation
        both ways, MSS clamping to the tunnel MTU, no loss or reordering that TCP cannot mend)."""
        served = lab.files.big
        got = netlab.download(lab, netlab.http_url(lab, served.name), max_time_s=150)
        assert got.exit_code == 0, got.stderr
        assert got.size_bytes == served.size_bytes
        assert got.sha256 == served.sha256
        print(f"{served.name}: {got.size_bytes} bytes in {got.elapsed_s:.1f} s "
              f"({got.megabytes_per_s:.1f} MB/s)")

    def test_dns_small_answer_over_udp(self, lab: Lab) -> None:
        """dig over UDP port 53 reaches dnsmasq on 127.0.0.1:5353 and gets the A record."""
        done = netlab.dig(lab, netlab.DNS_SMALL_NAME, "A", "+short")
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip() == netlab.DNS_SMALL_A

    def test_dns_answer_larger_than_mtu_arrives_complete_over_udp(self, lab: Lab) -> None:
        """A ~4 KB UDP answer cannot fit the 1480-byte tunnel: the gateway must send it as
        IPv6 fragments (RFC 7915 §4, RFC 8200 §4.5) and the client gets every string, no TC."""
        done = netlab.dig(lab, netlab.DNS_BIG_NAME, "TXT", "+bufsize=8192", "+ignore")
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        assert "(UDP)" in output
        assert "tc" not in netlab.dig_flags(output), output
        assert netlab.dig_message_bytes(output) > netlab.TUNNEL_MTU
        assert netlab.dig_txt_strings(output) == netlab.big_txt_strings()

    def test_tcp_to_unforwarded_port_refused_at_once(self, lab: Lab) -> None:
        """A SYN to a port with no forward rule is answered with RST (NO_RULE), so the client
        fails at once with "connection refused" (curl exit 7), not after a timeout."""
        url = netlab.http_url(lab, "/", port=netlab.UNFORWARDED_TCP_PORT)
        exit_code, elapsed_s, stderr = netlab.curl_exit(lab, url, max_time_s=5)
        assert exit_code == 7, stderr
        assert elapsed_s < REFUSED_WITHIN_S, f"took {elapsed_s:.2f} s: {stderr}"

    def test_workers_run_unprivileged_after_setup(self, lab: Lab) -> None:
        """Once open, each worker is the unprivileged user ("nobody" by default): every uid
        and gid is nobody's, no capability is left, no_new_privs is set, no extra groups, and
        a seccomp filter holds every one of its threads (workers/seccomp.py); the traffic
        tests of this class all pass through such workers."""
        nobody = pwd.getpwnam("nobody")
        for worker in lab.flows()["counters"]["workers"]:
            status = Path(f"/proc/{worker['pid']}/status").read_text()
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            assert fields["Uid"].split() == [str(nobody.pw_uid)] * 4, fields["Uid"]
            assert fields["Gid"].split() == [str(nobody.pw_gid)] * 4, fields["Gid"]
            assert fields["Groups"].strip() == ""
            for capability_set in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
                assert int(fields[capability_set], 16) == 0, (capability_set, fields)
            assert fields["NoNewPrivs"].strip() == "1"
            # Not dumpable: /proc/PID files become root's, so another process of the same
            # user cannot ptrace the worker or take its sockets.
            assert Path(f"/proc/{worker['pid']}/fd").stat().st_uid == 0
            for task in Path(f"/proc/{worker['pid']}/task").iterdir():
                thread = dict(line.split(":", 1) for line in
                              (task / "status").read_text().splitlines() if ":" in line)
                # 2: SECCOMP_MODE_FILTER, in libzmq's I/O threads too (TSYNC).
                assert thread["Seccomp"].strip() == "2", (task, thread["Seccomp"])

    def test_coordinator_keeps_only_what_supervision_needs(self, lab: Lab) -> None:
        """After setup ``sixgate run`` itself is the unprivileged user too, holding only
        CAP_NET_ADMIN and CAP_NET_RAW (a restarted worker opens a TUN device, its routes and a
        raw socket; stop undoes the forwarding setup), as ambient capabilities so the workers
        it starts inherit exactly those; the bounding set is narrowed to the same two, and
        no_new_privs is set. (The crash-restart and clean-stop tests run through it.)"""
        nobody = pwd.getpwnam("nobody")
        pid = lab.processes["sixgate"].pid
        assert b"sixgate" in Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        assert fields["Uid"].split() == [str(nobody.pw_uid)] * 4, fields["Uid"]
        assert fields["Groups"].strip() == ""
        # CAP_NET_ADMIN and CAP_NET_RAW, plus CAP_DAC_OVERRIDE or CAP_DAC_READ_SEARCH where
        # nobody cannot open /dev/net/tun or read the installation: found by really trying as
        # nobody (tests/lab/as_service_user.py).
        expected = as_service_user.capability_mask()
        assert expected & (1 << 12 | 1 << 13) == 1 << 12 | 1 << 13
        for capability_set in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):
            assert int(fields[capability_set], 16) == expected, (capability_set, fields)
        assert fields["NoNewPrivs"].strip() == "1"
        assert Path(f"/proc/{pid}/fd").stat().st_uid == 0

    @pytest.mark.parametrize("rule", sorted(HOST_RULES))
    def test_rfc8200_4_host_rule(self, lab: Lab, rule: str) -> None:
        """One RFC 8200 §4 host rule, sent by the peer as a scapy-built packet over protocol
        41 to the real gateway: the ICMPv6 answer's type, code and pointer are checked byte
        for byte, with the invoking packet quoted whole, or that nothing comes back; the
        refused packet is counted under its one reason."""
        layers, expected, reason = HOST_RULES[rule]
        packet: Packet = IPv6(src=lab.plan.peer_address, dst=lab.plan.gateway_address)
        for layer in layers:
            packet = packet / layer
        sent = raw(packet)
        before = drops(lab)
        result = lab.probe("exchange41", "--outer-src", netlab.PEER_IPV4, "--outer-dst",
                           netlab.GATEWAY_IPV4, "--packet", sent.hex(), "--listen-s",
                           "0.8" if expected is None else "3", "--stop-early")
        answers = [IPv6(bytes.fromhex(text)) for text in result["answers"]]
        if expected is None:
            assert answers == [], [a.summary() for a in answers]
        elif expected == "echo":
            assert len(answers) == 1 and ICMPv6EchoReply in answers[0], answers
            assert answers[0][ICMPv6EchoReply].data == b"rfc8200"
        else:
            assert len(answers) == 1, result
            answer = answers[0]
            assert (answer.src, answer.dst) == (lab.plan.gateway_address,
                                                 lab.plan.peer_address)
            problem = answer[ICMPv6ParamProblem]
            assert (problem.type, problem.code, problem.ptr) == expected, problem.summary()
            assert raw(problem)[8:] == sent  # RFC 4443 §2.4(c): the invoking packet
        if reason is not None:
            # Exactly one reason per packet is the engine tests' (tests/unit); here the lab's
            # own background traffic may add others, so only this one is counted exactly.
            delta = drops_delta(before, wait_for_drops(lab, before, reason, 1))
            assert delta.get(reason, 0) == 1, delta

    def test_rule_open_to_another_prefix_refuses_this_client_at_once(self, lab: Lab) -> None:
        """[[forward]] from = [a prefix the client is not in]: the port is closed to it (RST,
        curl exit 7 at once), counted as source_not_allowed, never forwarded."""
        before = netlab.drops(lab)
        url = netlab.http_url(lab, "/", port=netlab.ALLOWLIST_TCP_PORT)
        exit_code, elapsed_s, stderr = netlab.curl_exit(lab, url, max_time_s=5)
        assert exit_code == 7, stderr
        assert elapsed_s < REFUSED_WITHIN_S, f"took {elapsed_s:.2f} s: {stderr}"
        delta = netlab.drops_delta(before, netlab.drops(lab))
        assert delta.get("source_not_allowed", 0) >= 1, delta

    def test_rfc4443_udp_to_unforwarded_port_gets_port_unreachable(self, lab: Lab) -> None:
        """UDP to a port with no rule draws ICMPv6 destination unreachable, code 4 (port
        unreachable), which the client kernel turns into ECONNREFUSED on a connected socket."""
        result = lab.probe("udp-refused", "--addr", lab.plan.gateway_address,
                           "--port", str(netlab.UNFORWARDED_UDP_PORT), "--timeout", "3")
        assert result["result"] == "refused", result

    def test_200_concurrent_tcp_connections_all_complete(self, lab: Lab) -> None:
        """200 connections from clients in 16 /64s are established at the same time, then
        each GETs /small.txt and gets the right body. sixgate shards by source /64, so with
        several workers the sessions spread over them and each reply must find its owner."""
        clients = lab.plan.extra_clients()
        result = lab.probe("tcp-many", "--addr", lab.plan.gateway_address,
                           "--path", f"/{netlab.SMALL_NAME}", "--expect", netlab.SMALL_TEXT,
                           "--sources", ",".join(clients), "--count", "200",
                           "--timeout", "60", timeout=120)
        assert result["ok"] == 200, result
        owners = {b["worker"] for b in lab.flows()["bindings"]
                  if b["proto"] == "tcp" and client_address(b["client"]) in clients}
        assert owners and owners <= set(range(lab.workers)), owners
        if lab.workers > 1:
            assert len(owners) > 1, f"all 16 client /64s landed on worker(s) {owners}"

    def test_flows_lists_live_bindings_with_client_address(self, lab: Lab) -> None:
        """While a TCP connection is open, ``sixgate flows`` shows its binding (client IPv6
        address and port, established, owned by a real worker); a UDP query leaves a binding."""
        assert netlab.dig(lab, netlab.DNS_SMALL_NAME, "A", "+short").returncode == 0
        with netlab.open_tcp_connection(lab) as (client_addr, client_port):
            text = lab.sixgate("flows")
            listing = lab.flows()
        assert text.returncode == 0, text.stderr
        assert client_addr == lab.plan.peer_address
        assert client_addr in text.stdout and str(client_port) in text.stdout, text.stdout
        bindings = listing["bindings"]
        tcp = [b for b in bindings if b["client"] == f"[{client_addr}]:{client_port}"]
        assert len(tcp) == 1, bindings
        assert tcp[0]["proto"] == "tcp" and tcp[0]["state"] == "established", tcp
        assert 0 <= tcp[0]["worker"] < lab.workers, tcp
        udp = [b for b in bindings if b["proto"] == "udp" and client_addr in b["client"]]
        assert udp, bindings
        # Traffic per direction, summed over the workers: all four directions carried packets.
        traffic = listing["traffic"]
        assert all(traffic[d][0] > 0 and traffic[d][1] > 0 for d in
                   ("inbound", "to_services", "from_services", "outbound")), traffic
        assert "traffic: inbound " in text.stdout, text.stdout

    def test_malformed_packets_never_crash_and_are_counted(self, lab: Lab) -> None:
        """2000 malformed proto-41 packets (flipped bytes, cut, grown, lying lengths, random
        next headers, bogus fragment and extension headers) from the right peer: the gateway
        keeps running, counts them under named reasons (internal_error stays 0, checked by
        the fixture's teardown too) and still answers ping -6 afterwards."""
        before = drops(lab)
        result = lab.probe("fuzz41", "--outer-src", netlab.PEER_IPV4, "--outer-dst",
                           netlab.GATEWAY_IPV4, "--inner-src", lab.plan.peer_address,
                           "--inner-dst", lab.plan.gateway_address, "--count", "2000")
        assert result["sent"] == 2000, result
        done = netlab.ping(lab, 56)
        assert netlab.ping_received(done.stdout) == 3, done.stdout + done.stderr
        delta = drops_delta(before, drops(lab))
        print(f"malformed packets by drop reason: {delta}")
        assert delta.get("internal_error", 0) == 0, delta
        assert sum(delta.values()) >= 500, delta  # most of them are dropped, each by name
        assert lab.alive("sixgate")


    def test_checksum_left_to_offload_by_a_local_kernel_peer_is_completed(
            self, lab: Lab) -> None:
        """Issue 15: a kernel peer on this host (a sit tunnel over veth, a VM over virtio-net)
        hands its TCP/UDP over with CHECKSUM_PARTIAL, the checksum field holding only the
        pseudo-header sum. Sent here with PACKET_VNET_HDR + NEEDS_CSUM, as such a peer's kernel
        sends it (a TCP SYN to 80, a UDP datagram to 53): the gateway completes the checksums
        (counted as checksums_completed), never drops them as bad_checksum, and makes both
        sessions. (With a raw-socket capture every such segment was bad_checksum.)"""
        mac = lab.gw(["cat", "/sys/class/net/veth0/address"]).stdout.strip()
        before = drops(lab)
        completed = _events(lab).get("checksums_completed", 0)
        clients = {}
        for proto, port in (("tcp", 80), ("udp", 53)):
            sport = 47000 + port
            sent = lab.peer([sys.executable, str(netlab.PROGRAMS / "send_offloaded.py"),
                             "veth0", mac, netlab.PEER_IPV4, netlab.GATEWAY_IPV4,
                             lab.plan.peer_address, lab.plan.gateway_address, proto,
                             str(sport), str(port)])
            assert sent.returncode == 0, sent.stderr
            clients[proto] = f"[{lab.plan.peer_address}]:{sport}"

        def both_sessions() -> bool:
            made = {(b["proto"], b["client"]) for b in lab.flows()["bindings"]}
            return all((proto, client) in made for proto, client in clients.items())

        netlab.wait_until(both_sessions, timeout=10, what="the offloaded packets' sessions")
        assert _events(lab).get("checksums_completed", 0) >= completed + 2
        assert drops_delta(before, drops(lab)).get("bad_checksum", 0) == 0

    def test_rfc791_outer_fragments_are_reassembled(self, lab: Lab) -> None:
        """The capture reads below the IP layer, so it puts outer IPv4 fragments together
        itself (RFC 791 §3.2): an echo request whose protocol-41 packet came in two pieces,
        the last first, is answered, and counted as outer_reassembled."""
        before = _events(lab).get("outer_reassembled", 0)
        done = lab.peer([sys.executable, str(netlab.PROGRAMS / "send_outer_fragments.py"),
                         netlab.PEER_IPV4, netlab.GATEWAY_IPV4, lab.plan.peer_address,
                         lab.plan.gateway_address])
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"replied": True}, done.stdout
        assert _events(lab).get("outer_reassembled", 0) == before + 1


def _events(lab: Lab) -> dict[str, int]:
    """Events of the coordinator and every worker, summed (``sixgate flows --json``)."""
    counters = lab.flows()["counters"]
    total = dict(counters["coordinator"].get("events", {}))
    for worker in counters["workers"]:
        for name, count in worker.get("counters", {}).get("events", {}).items():
            total[name] = total.get(name, 0) + int(count)
    return total


class TestSixToFour(GatewayBehaviour):
    """6to4 (RFC 3056): the gateway is 2002:c000:20a::1, the client 2002:c633:6401::1."""

    MODE = "6to4"

    def test_rfc3964_spoofed_6to4_source_dropped_silently(self, lab: Lab) -> None:
        """RFC 3964 §5.2: a 6to4 source must embed the outer IPv4 source. Packets from
        198.51.100.1 claiming 2002:cb00:7101::1 (= 203.0.113.1) are counted as spoofed_6to4,
        exactly once each, and nothing is sent back (not to either address)."""
        before = drops(lab)
        sent = send_echo_requests(lab, netlab.PEER_IPV4, SPOOFED_6TO4_SOURCE)
        after = wait_for_drops(lab, before, "spoofed_6to4", FOREIGN_PACKETS)
        assert drops_delta(before, after).get("spoofed_6to4") == FOREIGN_PACKETS, \
            drops_delta(before, after)
        assert sent["replies"] == 0 and sent["to_far"] == 0, sent
        assert_legitimate_echo_answered(lab)


class TestSixInFour(GatewayBehaviour):
    """6in4 (RFC 4213): broker 198.51.100.1 routes 2001:db8:1::/64 to the gateway."""

    MODE = "6in4"

    def test_rfc4213_wrong_tunnel_peer_dropped_silently(self, lab: Lab) -> None:
        """RFC 4213 §3.6: a configured tunnel accepts only its remote's IPv4 source. Well-formed
        packets from 198.51.100.2 are counted as wrong_tunnel_peer, each once, unanswered."""
        before = drops(lab)
        sent = send_echo_requests(lab, netlab.PEER_OTHER_IPV4, lab.plan.peer_address)
        after = wait_for_drops(lab, before, "wrong_tunnel_peer", FOREIGN_PACKETS)
        assert drops_delta(before, after).get("wrong_tunnel_peer") == FOREIGN_PACKETS, \
            drops_delta(before, after)
        assert sent["replies"] == 0, sent
        assert_legitimate_echo_answered(lab)

    @pytest.mark.parametrize("target", ["link_local", "global"])
    def test_rfc4213_3_8_nud_probes_from_the_broker_answered(self, lab: Lab,
                                                             target: str) -> None:
        """RFC 4213 §3.7/§3.8: the tunnel is a link, the gateway has the link-local address
        fe80::<192.0.2.10> on it and MUST answer the broker's NUD probes: each Neighbor
        Solicitation gets a solicited Neighbor Advertisement (hop limit 255, S set)."""
        address = "fe80::c000:20a" if target == "link_local" else lab.plan.gateway_address
        result = lab.probe("send41", "--kind", "nud", "--outer-src", netlab.PEER_IPV4,
                           "--outer-dst", netlab.GATEWAY_IPV4, "--inner-src",
                           "fe80::c633:6401", "--inner-dst", address, "--count", "3",
                           "--listen-s", "5", "--stop-early")
        assert result["replies"] == 3, result


@pytest.mark.parametrize("lab", [4], indirect=True, ids=["workers4"])
class TestSixToFourKernelFanout(TestSixToFour):
    """Every 6to4 behaviour again with ``fanout = "kernel"``: each worker captures its own
    share through a BPF filter on its raw socket (workers/engine/wire.py fanout_filter) and applies
    the tunnel checks itself; no packet crosses the coordinator."""

    FANOUT = "kernel"
    TUN_WRITES = "io_uring"

    def test_capture_is_spread_over_the_workers_not_the_coordinator(self, lab: Lab) -> None:
        """Clients in 16 /64s reach every worker's own capture; the coordinator receives
        nothing; every packet is counted by exactly one process."""
        result = lab.probe("tcp-many", "--addr", lab.plan.gateway_address,
                           "--path", f"/{netlab.SMALL_NAME}", "--expect", netlab.SMALL_TEXT,
                           "--sources", ",".join(lab.plan.extra_clients()), "--count", "32",
                           "--timeout", "60", timeout=120)
        assert result["ok"] == 32, result
        status = lab.flows()["counters"]
        received = {w["index"]: w["counters"]["events"].get("tunnel_packets_received", 0)
                    for w in status["workers"]}
        assert len(received) == lab.workers and all(n > 0 for n in received.values()), received
        assert status["coordinator"]["events"].get("tunnel_packets_received", 0) == 0


@pytest.mark.parametrize("lab", [4], indirect=True, ids=["workers4"])
class TestSixInFourKernelFanout(TestSixInFour):
    """Every 6in4 behaviour again with ``fanout = "kernel"`` (one broker, many clients: the
    filter hashes the inner addresses, not the outer ones)."""

    FANOUT = "kernel"
    TUN_WRITES = "io_uring"


def client_address(endpoint: str) -> str:
    """The address part of a "[2002:...]:port" endpoint from ``sixgate flows``."""
    return endpoint.rpartition("]")[0].lstrip("[")


def send_echo_requests(lab: Lab, outer_source: str, inner_source: str,
                       count: int = FOREIGN_PACKETS) -> dict[str, int]:
    """Hand-built protocol-41 echo requests to the gateway; replies seen within the window."""
    started = time.monotonic()
    result = lab.probe("send41", "--outer-src", outer_source, "--outer-dst",
                       netlab.GATEWAY_IPV4, "--inner-src", inner_source, "--inner-dst",
                       lab.plan.gateway_address, "--count", str(count),
                       "--listen-s", str(NO_ANSWER_WINDOW_S))
    result["elapsed_s"] = round(time.monotonic() - started, 3)
    return result


def assert_legitimate_echo_answered(lab: Lab) -> None:
    """Control: the same hand-built packets from the right sources are answered, so the
    silence above is the gateway's decision, not a broken probe."""
    result = lab.probe("send41", "--outer-src", netlab.PEER_IPV4, "--outer-dst",
                       netlab.GATEWAY_IPV4, "--inner-src", lab.plan.peer_address,
                       "--inner-dst", lab.plan.gateway_address, "--count", "3",
                       "--listen-s", "5", "--stop-early")
    assert result["replies"] == 3, result
