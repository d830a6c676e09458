"""NAT64 mode (issue 16) in the real lab: an IPv6-only client reaches real IPv4 servers through
the real ``sixgate run`` with real ``curl``, ``ping`` and ``dig`` (tests/lab/nat64lab.py draws
the three namespaces). The client's kernel and the gateway's kernel are real Linux IPv6 stacks:
nothing in the path is written for the test."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import netlab
import pytest
from nat64lab import (
    CLIENT6,
    CLIENT6_OTHER,
    DNS4,
    GATEWAY4,
    GATEWAY6,
    HTTP4,
    MANY_CLIENTS6,
    MTU_LIMITED4,
    POOL4,
    STRANGER6,
    V4ONLY_NAME,
    Nat64Lab,
    synthesized,
)
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("io_uring")]

NAT64_SYSCTLS = ("net.ipv4.conf.veth4.forwarding", "net.ipv6.conf.all.forwarding")


def counters(lab: Nat64Lab) -> tuple[dict[str, int], dict[str, int]]:
    """(drops, events) summed over the workers."""
    return netlab.drops(lab), netlab.events(lab)


@pytest.fixture(scope="class", params=[1, 4], ids=lambda workers: f"workers{workers}")
def nat64_lab(request: pytest.FixtureRequest,
              served_files: netlab.ServedFiles) -> Iterator[Nat64Lab]:
    """One NAT64 lab for the class and worker count; teardown proves the shutdown contract
    (no internal error, exit 0 on SIGTERM, no link, nftables table, policy rule or forwarding
    switch left behind)."""
    failed_before = request.session.testsfailed
    with Nat64Lab(request.param, served_files,
                  extra_toml=getattr(request.cls, "EXTRA_TOML", "")) as lab:
        yield lab
        problems = netlab.shutdown_problems(lab, request.session.testsfailed > failed_before,
                                     NAT64_SYSCTLS)
        for family in ("-4", "-6"):
            rules = lab.gw(["ip", family, "rule", "show"]).stdout
            if "fwmark" in rules:
                problems.append(f"policy rules left behind:\n{rules}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# A TCP connection from a chosen source address, held until the other side ends it.
HOLD_FROM = """
import socket, sys
sock = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10,
                                source_address=(sys.argv[1], 0))
print("connected", flush=True)
sock.settimeout(30)
try:
    print("eof" if sock.recv(1) == b"" else "data", flush=True)
except ConnectionResetError:
    print("reset", flush=True)
except OSError as exc:
    print(f"error {exc}", flush=True)
"""


def python_in(lab: Nat64Lab, namespace: str, code: str, timeout: float = 30) -> str:
    """Run a short Python program in a namespace; its stdout (LabError if it fails)."""
    done = lab.exec_in(namespace, [sys.executable, "-c", code], timeout=timeout)
    if done.returncode != 0:
        raise netlab.LabError(f"program failed:\n{code}\n{done.stderr}")
    return str(done.stdout)


class TestNat64:
    """Through the well-known prefix, one worker."""

    def test_curl_100mb_from_an_ipv4_server_arrives_whole(self, nat64_lab: Nat64Lab,
                                                          served_files: netlab.ServedFiles
                                                          ) -> None:
        got = netlab.download(nat64_lab, f"http://[{synthesized(HTTP4)}]/big.bin")
        assert got.exit_code == 0, got.stderr
        assert (got.size_bytes, got.sha256) == (served_files.big.size_bytes,
                                                served_files.big.sha256)
        print(f"NAT64 curl 100 MB: {got.megabytes_per_s:.1f} MB/s")

    @pytest.mark.parametrize("size", [56, 3000])
    def test_ping_through_the_prefix(self, nat64_lab: Nat64Lab, size: int) -> None:
        """RFC 6146 §3.5.3 / RFC 7915 §4.2, §5.2: echo with the identifier as port; 3000
        bytes leave the client as IPv6 fragments and come back from IPv4 fragments."""
        done = nat64_lab.peer(["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "-s", str(size),
                               synthesized(HTTP4)], timeout=20)
        assert done.returncode == 0 and " 0% packet loss" in done.stdout, done.stdout

    def test_sixgate_ping_of_an_ipv4_address_from_the_gateway_host(self, nat64_lab: Nat64Lab
                                                                   ) -> None:
        """``sixgate ping <IPv4>`` (deploy's health gate of a NAT64 host) sends from the host's
        kernel through the prefix; the gateway's own address is one of the clients."""
        done = nat64_lab.sixgate("ping", HTTP4, "--count", "2", "--interval", "0.2")
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"from {GATEWAY6} through the NAT64" in done.stdout, done.stdout
        assert "2 received" in done.stdout, done.stdout

    def test_dig_small_and_an_answer_bigger_than_the_mtu(self, nat64_lab: Nat64Lab) -> None:
        small = nat64_lab.peer(["dig", f"@{synthesized(DNS4)}", "+short", "+tries=1",
                                "+time=3", netlab.DNS_SMALL_NAME, "A"])
        assert small.stdout.strip() == netlab.DNS_SMALL_A, small.stdout + small.stderr
        big = nat64_lab.peer(["dig", f"@{synthesized(DNS4)}", "+tries=1", "+time=3",
                              "+bufsize=8192", "+ignore", netlab.DNS_BIG_NAME, "TXT"])
        output = big.stdout + big.stderr
        assert big.returncode == 0 and "(UDP)" in output, output
        assert netlab.dig_message_bytes(output) > 1500
        assert netlab.dig_txt_strings(output) == netlab.big_txt_strings()

    def test_icmpv4_port_unreachable_comes_back_as_icmpv6(self, nat64_lab: Nat64Lab) -> None:
        """RFC 7915 §4.2: the IPv4 server's port unreachable reaches the client's socket as
        ICMPv6 port unreachable: its next receive fails with "connection refused"."""
        out = python_in(nat64_lab, nat64_lab.peer_ns, (
            "import socket\n"
            "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
            "s.settimeout(5)\n"
            f"s.connect(('{synthesized(HTTP4)}', 9))\n"
            "s.send(b'x')\n"
            "try:\n"
            "    s.recv(100)\n"
            "    print('answered')\n"
            "except ConnectionRefusedError:\n"
            "    print('refused')\n"))
        assert out.strip() == "refused"

    def test_fragmentation_needed_from_an_ipv4_router_becomes_packet_too_big(
            self, nat64_lab: Nat64Lab) -> None:
        """RFC 7915 §4.2: the gateway's own IPv4 routing has a 1300-byte path to
        MTU_LIMITED4; the client's 1400-byte ping leaves as IPv4 with DF set (RFC 7915 §5.1),
        the router answers Fragmentation Needed, the client gets Packet Too Big and its next
        pings go as IPv6 fragments, which arrive."""
        _, before = counters(nat64_lab)
        done = nat64_lab.peer(["ping", "-6", "-c", "4", "-i", "0.3", "-W", "2", "-s", "1400",
                               synthesized(MTU_LIMITED4)], timeout=20)
        _, after = counters(nat64_lab)
        assert after.get("icmp_errors_translated", 0) > before.get("icmp_errors_translated", 0)
        assert " 0 received" not in done.stdout, done.stdout

    def test_packet_too_big_from_a_router_on_the_clients_path(
            self, nat64_lab: Nat64Lab, served_files: netlab.ServedFiles) -> None:
        """The gateway's own link to the clients shrinks to 1400 bytes: its kernel answers the
        translated 1500-byte segments with Packet Too Big, which must reach the worker that
        owns the session (steered by the quoted client, not by the router's own address, in
        another /64) and go to the IPv4 server as Fragmentation Needed (RFC 7915 §5.2). Four
        clients of four /64s, the server's path MTU cache flushed before each."""
        _, before = counters(nat64_lab)
        nat64_lab.gw(["ip", "link", "set", "veth6", "mtu", "1400"], check=True)
        try:
            sizes = []
            for client in MANY_CLIENTS6[:4]:
                nat64_lab.v4(["ip", "route", "flush", "cache"], check=True)
                done = nat64_lab.peer(["curl", "-sS", "--max-time", "30", "--interface", client,
                                       "-o", "/dev/null", "-w", "%{size_download}",
                                       f"http://[{synthesized(HTTP4)}]/mid.bin"], timeout=40)
                sizes.append((done.returncode, done.stdout, done.stderr.strip()))
        finally:
            nat64_lab.gw(["ip", "link", "set", "veth6", "mtu", "1500"], check=True)
        _, after = counters(nat64_lab)
        assert sizes == [(0, str(served_files.mid.size_bytes), "")] * 4
        assert after.get("icmp_errors_translated", 0) - before.get(
            "icmp_errors_translated", 0) >= 4

    def test_a_client_outside_clients_is_refused(self, nat64_lab: Nat64Lab) -> None:
        before, _ = counters(nat64_lab)
        done = nat64_lab.peer(["curl", "-sS", "--max-time", "5", "--interface", STRANGER6,
                               f"http://[{synthesized(HTTP4)}]/"], timeout=20)
        after, _ = counters(nat64_lab)
        assert done.returncode != 0
        assert after["source_not_allowed"] > before["source_not_allowed"]

    def test_endpoint_independent_mapping_seen_from_two_ipv4_servers(
            self, nat64_lab: Nat64Lab) -> None:
        """RFC 4787 REQ-1 / RFC 6146 §3.5.1: one client socket sending to two IPv4 servers
        is seen from the same pool4 address and port by both (the IPv4 side records it)."""
        code = (
            "import socket\n"
            "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
            f"s.bind(('{CLIENT6_OTHER}', 0))\n"
            "s.settimeout(5)\n"
            "seen = []\n"
            f"for dst in ('{synthesized(HTTP4)}', '{synthesized(DNS4)}'):\n"
            "    s.sendto(b'who am i', (dst, 7777))\n"
            "    data, _ = s.recvfrom(100)\n"
            "    seen.append(data.decode())\n"
            "print(' '.join(seen))\n")
        echo = nat64_lab.spawn("udp_reflector", nat64_lab.v4_ns, [sys.executable, "-c", (
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.bind(('0.0.0.0', 7777))\n"
            "while True:\n"
            "    data, peer = s.recvfrom(100)\n"
            "    s.sendto(f'{peer[0]}:{peer[1]}'.encode(), peer)\n")])
        try:
            netlab.wait_until(lambda: nat64_lab.v4(["ss", "-Hlnu", "sport = :7777"]).stdout,
                              timeout=10, what="the UDP reflector")
            first, second = python_in(nat64_lab, nat64_lab.peer_ns, code).split()
        finally:
            netlab.stop_process(echo, 5)
        assert first == second and first.startswith("203.0.113.5:")
        assert 61001 <= int(first.split(":")[1]) <= 65535

    def test_500_concurrent_connections_from_16_slash64s(self, nat64_lab: Nat64Lab) -> None:
        """All held open at once, then all used: each gets the whole small file; with
        several workers the /64s spread over them (each owns its pool4 slice)."""
        done = nat64_lab.peer([sys.executable, str(netlab.PROGRAMS / "many_connections.py"),
                               synthesized(HTTP4), "80", f"/{netlab.SMALL_NAME}", "500",
                               *MANY_CLIENTS6], timeout=120)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result == {"connected": 500, "answered": 500, "bodies": [netlab.SMALL_TEXT]}
        workers = {row["worker"] for row in nat64_lab.flows()["bindings"]
                   if row["client"].startswith("[2001:db8:100:1")}
        # 16 /64s hashed over 4 workers leave one empty now and then; never all but one.
        assert len(workers) > 1 if nat64_lab.workers > 1 else workers == {0}, workers

    def test_rfc6146_3_8_hairpinning_between_two_ipv6_clients(self, nat64_lab: Nat64Lab
                                                              ) -> None:
        """Client A learns its binding (pool4 address and port) from an IPv4 reflector; client
        B sends to A's binding through the prefix and A receives it from B's binding."""
        reflector = nat64_lab.spawn("hairpin_reflector", nat64_lab.v4_ns, [
            sys.executable, "-c",
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.bind(('0.0.0.0', 7778))\n"
            "while True:\n"
            "    data, peer = s.recvfrom(100)\n"
            "    s.sendto(f'{peer[0]} {peer[1]}'.encode(), peer)\n"])
        try:
            netlab.wait_until(lambda: nat64_lab.v4(["ss", "-Hlnu", "sport = :7778"]).stdout,
                              timeout=10, what="the UDP reflector")
            out = python_in(nat64_lab, nat64_lab.peer_ns, (
                "import socket\n"
                "a = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
                f"a.bind(('{CLIENT6_OTHER}', 0))\n"
                "a.settimeout(5)\n"
                f"a.sendto(b'x', ('{synthesized(HTTP4)}', 7778))\n"
                "pool4, port = a.recvfrom(100)[0].decode().split()\n"
                "b = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
                f"b.bind(('{MANY_CLIENTS6[3]}', 0))\n"
                "b.sendto(b'hello A', (f'64:ff9b::{pool4}', int(port)))\n"
                "data, source = a.recvfrom(100)\n"
                "print(data.decode(), source[0], pool4)\n"))
        finally:
            netlab.stop_process(reflector, 5)
        text, source, pool4 = out.strip().rsplit(" ", 2)
        assert text == "hello A" and pool4 == POOL4
        # B as its binding stands for it: the pool4 address under the prefix.
        assert ipaddress.IPv6Address(source) == ipaddress.IPv6Address(synthesized(POOL4))

    def test_dns64_by_unbound_from_the_gateways_prefix(self, nat64_lab: Nat64Lab) -> None:
        """RFC 6147: unbound, configured with what ``sixgate dns64 emit --unbound`` prints,
        synthesizes an AAAA for a name with only an A record; curl by name connects."""
        done = nat64_lab.peer(["curl", "-sS", "--max-time", "10",
                               f"http://{V4ONLY_NAME}/{netlab.SMALL_NAME}"], timeout=20)
        assert done.returncode == 0 and done.stdout == netlab.SMALL_TEXT, done.stderr
        answer = nat64_lab.peer(["dig", "+short", V4ONLY_NAME, "AAAA"]).stdout.split()
        assert [ipaddress.IPv6Address(a) for a in answer] == [
            ipaddress.IPv6Address(synthesized(HTTP4))]

    def test_ssh_to_an_ipv4_literal_under_tnat64(self, nat64_lab: Nat64Lab) -> None:
        """Seed 001's case: an unmodified ``ssh 198.51.100.22`` on an IPv6-only host works
        under Debian's TNAT64 (LD_PRELOAD), configured by ``sixgate dns64 emit --tnat64``;
        without it the IPv4 literal has no route."""
        plain = nat64_lab.peer(nat64_lab.ssh_argv("echo hello"), timeout=30)
        assert plain.returncode != 0
        done = nat64_lab.peer(["env", f"TNAT64_CONF_FILE={nat64_lab.tnat64_conf}", "tnat64",
                               *nat64_lab.ssh_argv("echo hello over NAT64")], timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "hello over NAT64"

    def test_pool4_metrics_and_the_binding_log(self, nat64_lab: Nat64Lab) -> None:
        """Per worker, protocol and address: pool4 ports owned (the slices add up to the
        configured ranges) and in use; each binding logged once, never with a destination
        (RFC 6888 REQ-12)."""
        got = netlab.download(nat64_lab, f"http://[{synthesized(HTTP4)}]/{netlab.SMALL_NAME}")
        assert got.exit_code == 0, got.stderr
        body = nat64_lab.gw(["curl", "-sf", "http://127.0.0.1:9641/metrics"]).stdout
        owned: dict[str, float] = {}
        in_use = 0.0
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == "sixgate_nat64_pool4_ports":
                    assert sample.labels["address"] == POOL4
                    protocol = sample.labels["protocol"]
                    owned[protocol] = owned.get(protocol, 0) + sample.value
                elif sample.name == "sixgate_nat64_pool4_ports_in_use":
                    in_use += sample.value
        assert owned == {"tcp": 4535, "udp": 4535, "icmp": 65536}
        assert in_use >= 1
        lines = [line for line in nat64_lab.log_path("sixgate").read_text().splitlines()
                 if "nat64_binding=" in line]
        assert any("nat64_binding=create proto=tcp client=[2001:db8:100::10]:" in line
                   and f"pool4={POOL4}:" in line for line in lines), lines[-5:]
        assert not [line for line in lines if "198.51.100." in line]

    def test_check_refuses_pool4_on_the_hosts_own_address(self, nat64_lab: Nat64Lab) -> None:
        """``sixgate check`` on the gateway host: pool4 on one of its own addresses is refused
        with the clash with ip_local_port_range named, and the fix."""
        config = nat64_lab.tmp / "own-address.toml"
        config.write_text(nat64_lab.config_text().replace(f'address = "{POOL4}"',
                                                          f'address = "{GATEWAY4}"')
                          .replace('tcp = "61001-65535"', 'tcp = "30000-65535"'))
        done = nat64_lab.gw([*netlab.sixgate_command(), "check", "--config", str(config)])
        assert done.returncode == 2, done.stdout + done.stderr
        assert (f"{GATEWAY4} tcp 30000-65535 on an address of this host overlap(s) "
                "net.ipv4.ip_local_port_range 32768-60999") in done.stderr, done.stderr
        assert 'give pool4 ports outside it (like tcp = "61000-65535")' in done.stderr
        # Outside the host's range it is fine: only the pool4 ports are the NAT64's.
        config.write_text(nat64_lab.config_text().replace(f'address = "{POOL4}"',
                                                          f'address = "{GATEWAY4}"'))
        done = nat64_lab.gw([*netlab.sixgate_command(), "check", "--config", str(config)])
        assert done.returncode == 0, done.stdout + done.stderr
        assert "(an address of this host: these ports are the NAT64's" in done.stdout

    def test_a_reload_narrows_clients_a_removed_client_is_reset_the_rest_go_on(
            self, nat64_lab: Nat64Lab, served_files: netlab.ServedFiles) -> None:
        """Issue 17: ``sixgate reload`` takes the second /64 out of ``clients``. A connection
        held from it is reset at once (the client's answer to the gateway's probe meets no
        session and is no client's: RST); a rate-limited 100 MB download from the first /64
        goes on and arrives whole; the old clients come back with the next reload."""
        lab = nat64_lab
        original = lab.config_path.read_text()
        big = served_files.big
        curl = subprocess.Popen(netlab.in_ns(lab.peer_ns, [
            "bash", "-c", "set -o pipefail; curl -6 -g -sS --fail --max-time 60 --limit-rate 25M "
            f"--interface {CLIENT6} http://[{synthesized(HTTP4)}]/{big.name} | sha256sum"]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        hold = subprocess.Popen(netlab.in_ns(lab.peer_ns, [
            sys.executable, "-c", HOLD_FROM, CLIENT6_OTHER, synthesized(HTTP4), "80"]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert hold.stdout is not None and hold.stdout.readline().strip() == "connected"
            lab.config_path.write_text(original.replace('"2001:db8:100::/56"',
                                                        '"2001:db8:100::/64"'))
            done = lab.sixgate("reload")
            assert done.returncode == 0, done.stdout + done.stderr
            assert "nat64_clients changed" in done.stdout, done.stdout
            assert hold.stdout.readline().strip() == "reset"
            stdout, stderr = curl.communicate(timeout=90)
        finally:
            lab.config_path.write_text(original)
            restored = lab.sixgate("reload")
            for process in (curl, hold):
                if process.poll() is None:
                    netlab.stop_process(process, 5)
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert curl.returncode == 0, stderr
        assert stdout.split()[0] == big.sha256, "the download arrived damaged"
        assert netlab.events(lab).get("flows_ended_by_reload", 0) >= 1

    def test_a_download_survives_a_crash_of_its_worker(self, nat64_lab: Nat64Lab,
                                                      served_files: netlab.ServedFiles) -> None:
        """Issue 17 for the NAT64: the worker holding a rate-limited download's binding is
        SIGKILLed; its successor resumes the binding from the coordinator's copy of the shard
        (the same pool4 address and port) and the download arrives whole."""
        lab = nat64_lab
        big = served_files.big
        curl = subprocess.Popen(netlab.in_ns(lab.peer_ns, [
            "bash", "-c", "set -o pipefail; curl -6 -g -sS --fail --max-time 60 --limit-rate 25M "
            f"--interface {CLIENT6} http://[{synthesized(HTTP4)}]/{big.name} | sha256sum"]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            def download_binding() -> dict[str, object] | None:
                return next((b for b in lab.flows()["bindings"] if b["proto"] == "tcp"
                             and b["client"].startswith(f"[{CLIENT6}]:")
                             and b["target"] == f"{HTTP4}:80" and b["state"] == "established"),
                            None)

            binding = netlab.wait_until(download_binding, timeout=15, what="the binding")
            time.sleep(0.5)  # past the workers' journal interval (50 ms)
            index = int(binding["worker"])  # type: ignore[call-overload]
            workers = {int(w["index"]): w for w in lab.flows()["counters"]["workers"]}
            victim = int(workers[index]["pid"])
            assert "sixgate.workers.main" in netlab.process_cmdline(victim)
            os.kill(victim, signal.SIGKILL)

            def restarted() -> bool:
                entry = {int(w["index"]): w for w in lab.flows()["counters"]["workers"]}[index]
                return bool(entry.get("up")) and entry.get("pid") not in (None, victim)

            netlab.wait_until(restarted, timeout=15, what=f"worker {index} restarted")
            resumed = download_binding()
            assert resumed is not None and resumed["pool"] == binding["pool"], (binding,
                                                                                 resumed)
            stdout, stderr = curl.communicate(timeout=90)
        finally:
            if curl.poll() is None:
                netlab.stop_process(curl, 5)
        assert curl.returncode == 0, stderr
        assert stdout.split()[0] == big.sha256, "the download arrived damaged"

    def test_the_kernel_keeps_no_conntrack_entry_for_pool4(self, nat64_lab: Nat64Lab,
                                                          served_files: netlab.ServedFiles
                                                          ) -> None:
        """The NAT64 keeps the state: pool4 traffic, in and translated out, is untracked by
        the gateway's table (one entry per binding and a lookup per packet for nothing)."""
        got = netlab.download(nat64_lab, f"http://[{synthesized(HTTP4)}]/{netlab.SMALL_NAME}")
        assert got.exit_code == 0, got.stderr
        done = nat64_lab.peer(["ping", "-6", "-c", "2", "-i", "0.2", "-W", "2",
                               synthesized(HTTP4)], timeout=20)
        assert netlab.ping_received(done.stdout) == 2, done.stdout
        table = nat64_lab.gw(["cat", "/proc/net/nf_conntrack"], check=True).stdout
        assert POOL4 not in table, table

    def test_packets_are_steered_only_where_there_is_a_choice(self, nat64_lab: Nat64Lab
                                                              ) -> None:
        """Several workers: each packet is marked for its owner's table (chains ``steer``) and
        a policy rule per worker and family selects it. One worker on routed pool4: its routes
        in the main table take every packet, so no steering chain and no policy rule costs
        the kernel's lookups anything (and the traffic of the other tests went through), and
        no conntrack expression makes the kernel run its conntrack and defragmentation hooks
        for every IPv4 packet (only steering by port needs fragments put together first)."""
        steered = nat64_lab.workers > 1
        ruleset, rules = steering_of(nat64_lab)
        assert steered == ("chain steer" in ruleset)
        assert steered == ("fwmark" in rules)
        assert steered == ("ct state" in ruleset), ruleset

    def test_flows_lists_the_nat64_bindings(self, nat64_lab: Nat64Lab) -> None:
        netlab.download(nat64_lab, f"http://[{synthesized(HTTP4)}]/{netlab.SMALL_NAME}")
        bindings = nat64_lab.flows()["bindings"]
        rows = [b for b in bindings if b["rule"] == "nat64" and b["proto"] == "tcp"]
        assert rows, bindings
        assert all(row["pool"].startswith("203.0.113.5:") for row in rows)
        assert any(row["target"] == f"{HTTP4}:80" for row in rows)


def nat64_devices(lab: Nat64Lab) -> dict[str, tuple[int, str]]:
    """The gateway's TUN devices: their interface index and the routes sixgate gave them
    (every table, both families)."""
    found = {}
    for link in lab.links(lab.gw_ns):
        if link.get("linkinfo", {}).get("info_kind") != "tun":
            continue
        name = link["ifname"]
        routes = "".join(lab.gw(["ip", family, "route", "show", "table", "all", "dev", name,
                                 "proto", "static"], check=True).stdout
                         for family in ("-4", "-6"))
        found[name] = (link["ifindex"], routes)
    return found


def test_a_take_over_keeps_the_nat64_devices_and_their_routes(
        served_files: netlab.ServedFiles) -> None:
    """Issue 17 for the NAT64: ``sixgate run --take-over`` (two workers: each with its IPv4
    device, pool4 in its own table, and its IPv6 device for the prefix) hands the devices
    over with their routes; the same devices serve the new run, non-persistent again, and its
    stop leaves none."""
    with Nat64Lab(2, served_files, with_clients_kit=False) as lab:
        before = nat64_devices(lab)
        assert len(before) == 4 and all(routes for _, routes in before.values()), before
        lab.spawn("next", lab.gw_ns, [*netlab.sixgate_command(), "run", "--take-over",
                                      "--config", str(lab.config_path)])
        assert lab.processes["sixgate"].wait(timeout=30) == 0, lab.gateway_stderr()
        netlab.wait_until(lambda: "sixgate up" in lab.log_path("next").read_text(),
                          timeout=30, what="the new run up")
        log = lab.log_path("next").read_text()
        assert log.count("kept by the previous run, taken over") == 2, log
        assert nat64_devices(lab) == before
        assert "persist on" not in lab.gw(["ip", "-d", "link", "show", "type", "tun"]).stdout
        done = lab.peer(["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", synthesized(HTTP4)],
                        timeout=20)
        assert done.returncode == 0 and " 0% packet loss" in done.stdout, done.stdout
        assert netlab.stop_process(lab.processes.pop("next"), 15) == 0, lab.gateway_stderr("next")
        assert lab.gateway_links() == [], lab.gateway_links()


NAT64_SHARDS = 6
FIXED_PORT = 45353


def queries(lab: Nat64Lab) -> int:
    """A DNS query through the prefix from each of MANY_CLIENTS6, from port FIXED_PORT."""
    return netlab.fixed_port_queries(lab, MANY_CLIENTS6, synthesized(DNS4), FIXED_PORT)


def udp_bindings(lab: Nat64Lab) -> dict[str, tuple[str, int]]:
    """MANY_CLIENTS6's UDP bindings from FIXED_PORT: client -> (pool4 transport address,
    worker)."""
    return {row["client"][1:].split("]")[0]: (row["pool"], int(row["worker"]))
            for row in lab.flows()["bindings"] if row["proto"] == "udp"
            and row["client"].endswith(f"]:{FIXED_PORT}")
            and row["client"][1:].split("]")[0] in MANY_CLIENTS6}


def test_a_take_over_to_another_worker_count_keeps_the_nat64_bindings_by_shard(
        served_files: netlab.ServedFiles) -> None:
    """Issue 17 for the NAT64, the worker count: with ``[gateway] shards = 6`` each client /64
    is steered by its shard (nftables' jhash), and a binding takes a port of its shard's
    slice of pool4 (the engine computes the same hash); a take-over from 2 workers to 3, then
    back to 2, hands each binding to its shard's worker. A rate-limited download completes
    byte-identical, and 16 clients in 16 /64s keep their pool4 transport addresses, each
    served by the worker its port's shard names (shard s in worker s mod N)."""
    with Nat64Lab(2, served_files, with_clients_kit=False,
                  gateway_toml=f"shards = {NAT64_SHARDS}\n") as lab:
        assert queries(lab) == len(MANY_CLIENTS6)
        first = udp_bindings(lab)
        assert len(first) == len(MANY_CLIENTS6), first
        big = served_files.big
        curl = subprocess.Popen(netlab.in_ns(lab.peer_ns, [
            "bash", "-c", "set -o pipefail; curl -6 -g -sS --fail --max-time 60 --limit-rate "
            f"25M --interface {CLIENT6} http://[{synthesized(HTTP4)}]/{big.name} | sha256sum"]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        original = lab.config_path.read_text()
        try:
            time.sleep(0.5)
            previous = "sixgate"
            for workers, key in ((3, "more"), (2, "fewer")):
                lab.config_path.write_text(original.replace("workers = 2\n",
                                                            f"workers = {workers}\n"))
                lab.spawn(key, lab.gw_ns, [*netlab.sixgate_command(), "run", "--take-over",
                                           "--config", str(lab.config_path)])
                assert lab.processes[previous].wait(timeout=60) == 0, (
                    lab.gateway_stderr(previous))
                previous = key
                netlab.wait_until(lambda key=key: "sixgate up" in lab.log_path(key).read_text(),
                                  timeout=30, what=f"the run of {workers} workers up")
                log = lab.log_path(key).read_text()
                assert f"worker(s) to {workers}, by shard" in log, log
                now = udp_bindings(lab)
                assert {c: pool for c, (pool, _) in now.items()} == {
                    c: pool for c, (pool, _) in first.items()}, (first, now)
                for pool, worker in now.values():
                    port = int(pool.rsplit(":", 1)[1])
                    shard = min((port - 61001) // ((65535 - 61001 + 1) // NAT64_SHARDS),
                                NAT64_SHARDS - 1)
                    assert shard % workers == worker, (pool, worker, now)
                assert queries(lab) == len(MANY_CLIENTS6)
                assert udp_bindings(lab) == now  # the same bindings served them
            stdout, stderr = curl.communicate(timeout=90)
        finally:
            lab.config_path.write_text(original)
            if curl.poll() is None:
                netlab.stop_process(curl, 5)
        assert curl.returncode == 0, stderr
        assert stdout.split()[0] == big.sha256, "the download arrived damaged"
        assert netlab.stop_process(lab.processes.pop("fewer"), 15) == 0
        assert lab.gateway_links() == [], lab.gateway_links()


def steering_of(lab: Nat64Lab) -> tuple[str, str]:
    """(the gateway's nftables ruleset, its IPv4 and IPv6 policy rules)."""
    return (lab.gw(["nft", "list", "ruleset"], check=True).stdout,
            lab.gw(["ip", "-4", "rule", "show"], check=True).stdout
            + lab.gw(["ip", "-6", "rule", "show"], check=True).stdout)


@pytest.fixture(scope="class")
def limits_lab(served_files: netlab.ServedFiles) -> Iterator[Nat64Lab]:
    """A NAT64 with 10 UDP ports of pool4 and a quota of 4 ports per client /64; its pool4 is
    the gateway's own address (GATEWAY4), the rest of whose ports stay the host's."""
    with Nat64Lab(1, served_files, extra_toml="ports_per_client = 4\n",
                  udp_ports="61001-61010", with_clients_kit=False, pool4=GATEWAY4) as lab:
        yield lab
        problems = netlab.shutdown_problems(lab, False, NAT64_SYSCTLS)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def dns_queries(lab: Nat64Lab, sources: list[str]) -> int:
    """One DNS query per source address, each from its own socket, all kept open; how many
    were answered."""
    return int(python_in(lab, lab.peer_ns, (
        "import socket, time\n"
        "query = bytes.fromhex('1234010000010000000000000573'\n"
        "                      '6d616c6c036c61620000010001')\n"
        "socks = []\n"
        f"for source in {sources!r}:\n"
        "    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
        "    s.bind((source, 0))\n"
        f"    s.sendto(query, ('{synthesized(DNS4)}', 53))\n"
        "    socks.append(s)\n"
        "answered = 0\n"
        "deadline = time.monotonic() + 2\n"
        "for s in socks:\n"
        "    s.settimeout(max(0.05, deadline - time.monotonic()))\n"
        "    try:\n"
        "        answered += len(s.recv(512)) > 12\n"
        "    except OSError:\n"
        "        pass\n"
        "print(answered)\n"), timeout=60))


class TestNat64Limits:
    """RFC 6888: the per-client port quota (REQ-4) and pool exhaustion are counted and
    answered (REQ-11), and others keep working."""

    def test_rfc6888_port_quota_then_pool_exhaustion(self, limits_lab: Nat64Lab) -> None:
        before, _ = counters(limits_lab)
        # Six sockets of one /64 against a quota of four.
        assert dns_queries(limits_lab, [CLIENT6] * 6) == 4
        after, _ = counters(limits_lab)
        assert after["port_quota"] - before["port_quota"] == 2
        # Three more /64s want four ports each; the pool holds six more.
        assert dns_queries(limits_lab, [*MANY_CLIENTS6[:3]] * 4) == 6
        last, _ = counters(limits_lab)
        assert last["pool_exhausted"] - after["pool_exhausted"] == 6

    def test_pool4_on_the_hosts_own_address_is_steered_with_one_worker_too(
            self, limits_lab: Nat64Lab) -> None:
        """The marks pick pool4's ports out of the host's own traffic (the local table's rule
        moves behind them): needed whatever the worker count."""
        ruleset, rules = steering_of(limits_lab)
        assert "chain steer" in ruleset and "fwmark" in rules, (ruleset, rules)

    def test_pool4_on_the_hosts_own_address_leaves_the_host_its_other_ports(
            self, limits_lab: Nat64Lab, served_files: netlab.ServedFiles) -> None:
        """pool4 = the gateway's own address: the NAT64 takes its pool4 ports (61001-65535,
        outside net.ipv4.ip_local_port_range), the host's own connections and services keep
        working on the rest."""
        # A client /64 of its own: the quota test may have spent CLIENT6's four ports.
        client = MANY_CLIENTS6[-1]
        mid = served_files.mid
        got = limits_lab.peer(["bash", "-c", "set -o pipefail; curl -sS --fail --max-time 60 "
                               f"--interface {client} http://[{synthesized(HTTP4)}]/{mid.name} "
                               "| sha256sum"], timeout=90)
        assert got.returncode == 0, got.stderr
        assert got.stdout.split()[0] == mid.sha256
        done = limits_lab.peer(["ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", "-I", client,
                                synthesized(HTTP4)], timeout=20)
        assert netlab.ping_received(done.stdout) == 2, done.stdout
        rows = [b for b in limits_lab.flows()["bindings"] if b["proto"] == "tcp"]
        assert rows and all(row["pool"].startswith(f"{GATEWAY4}:") for row in rows), rows
        # The host itself, from the same address: an ephemeral port of its own (TCP to the
        # IPv4 web server) and an ICMP echo it answers (not an echo reply: not the NAT64's).
        own = limits_lab.gw(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                             "--max-time", "5", f"http://{HTTP4}/{netlab.SMALL_NAME}"])
        assert own.stdout == "200", own.stdout + own.stderr
        echo = limits_lab.exec_in(limits_lab.v4_ns, ["ping", "-c", "2", "-i", "0.2", "-W", "2",
                                                    GATEWAY4])
        assert netlab.ping_received(echo.stdout) == 2, echo.stdout
        # The NAT64's ports of the host's address are untracked both ways; the host's own
        # connection (an ephemeral port, below 61001) is tracked as ever.
        table = limits_lab.gw(["cat", "/proc/net/nf_conntrack"], check=True).stdout
        ports = [int(p) for line in table.splitlines() if GATEWAY4 in line
                 for p in re.findall(r"(?:sport|dport)=(\d+)", line)]
        assert ports and not [p for p in ports if 61001 <= p <= 65535], table
        rules = limits_lab.gw(["ip", "-4", "rule", "show"]).stdout
        assert "1002:\tfrom all lookup local" in rules and "0:\tfrom all lookup local" \
            not in rules, rules
        # Strict reverse-path filtering would drop what the NAT64 sends from the host's own
        # address: check refuses it, naming the fix.
        key = "net.ipv4.conf.all.rp_filter"
        before = limits_lab.gw(["sysctl", "-n", key]).stdout.strip()
        try:
            limits_lab.gw(["sysctl", "-q", "-w", f"{key}=1"], check=True)
            done = limits_lab.sixgate("check")
        finally:
            limits_lab.gw(["sysctl", "-q", "-w", f"{key}={before}"], check=True)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "rp_filter is 1 (strict)" in done.stderr and "set it to 2" in done.stderr


# --- beside a tunnel: a remote IPv6-only site over 6in4 ------------------------------------------

SITE_POOL4 = "192.0.2.20"  # pool4 of the gateway's NAT64 (routed to it by the peer)


class TunnelSiteLab(netlab.Lab):
    """The 6in4 lab with a NAT64 beside the tunnel (``input = "tunnel"``): the peer is both
    the remote IPv6-only site and, at 203.0.113.1, an IPv4 web server it reaches through the
    gateway's NAT64. The tunnel's own forward rules stay as they are."""

    def __init__(self, files: netlab.ServedFiles) -> None:
        super().__init__("6in4", 1, files)

    def config_text(self) -> str:
        return super().config_text() + (
            "\n[nat64]\n"
            'prefix = "64:ff9b::/96"\n'
            f'clients = ["{self.plan.client_prefix}::/48"]\n'
            'input = "tunnel"\n'
            "allow_non_global = true\n"
            "\n[[nat64.pool4]]\n"
            f'address = "{SITE_POOL4}"\n'
            'tcp = "61001-65535"\nudp = "61001-65535"\nicmp = "0-65535"\n')

    def start(self) -> None:
        super().start()
        self.ip(self.peer_ns, "-6", "route", "add", "64:ff9b::/96", "dev", netlab.PEER_TUN)
        self.ip(self.peer_ns, "route", "add", f"{SITE_POOL4}/32", "via", netlab.GATEWAY_IPV4)
        self.spawn("far_http", self.peer_ns, netlab.http_server_argv(
            netlab.PEER_FAR_IPV4, 80, self.files.directory))
        netlab.wait_until(lambda: self.peer(["ss", "-Hltn", "sport = :80"]).stdout.strip(),
                          timeout=15, what="the IPv4 web server in the peer namespace")


@pytest.fixture(scope="class")
def site_lab(request: pytest.FixtureRequest,
             served_files: netlab.ServedFiles) -> Iterator[TunnelSiteLab]:
    failed_before = request.session.testsfailed
    with TunnelSiteLab(served_files) as lab:
        yield lab
        problems = netlab.shutdown_problems(lab, request.session.testsfailed > failed_before)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


class TestNat64OverTheTunnel:
    """One gateway, its 6in4 tunnel's forward rules and a NAT64 for the site behind it."""

    def test_the_site_reaches_an_ipv4_server_through_the_prefix(self, site_lab: TunnelSiteLab,
                                                                served_files: netlab.ServedFiles
                                                                ) -> None:
        got = netlab.download(site_lab, f"http://[{synthesized(netlab.PEER_FAR_IPV4)}]/mid.bin",
                              max_time_s=60)
        assert got.exit_code == 0, got.stderr
        assert (got.size_bytes, got.sha256) == (served_files.mid.size_bytes,
                                                served_files.mid.sha256)
        ping = site_lab.peer(["ping", "-6", "-c", "2", "-i", "0.2", "-W", "2",
                              synthesized(netlab.PEER_FAR_IPV4)], timeout=20)
        assert ping.returncode == 0, ping.stdout
        rows = [b for b in site_lab.flows()["bindings"] if b["rule"] == "nat64"]
        assert any(row["pool"].startswith(f"{SITE_POOL4}:") for row in rows), rows

    def test_the_tunnels_forward_rules_still_work_beside_it(self, site_lab: TunnelSiteLab
                                                            ) -> None:
        got = netlab.download(site_lab, netlab.http_url(site_lab, f"/{netlab.SMALL_NAME}"))
        assert got.exit_code == 0 and got.size_bytes == len(netlab.SMALL_TEXT), got.stderr
        done = netlab.dig(site_lab, netlab.DNS_SMALL_NAME, "A", "+short")
        assert done.stdout.strip() == netlab.DNS_SMALL_A
