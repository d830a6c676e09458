"""Issue 18: CLAT mode. An IPv6-only client runs the real ``sixgate run`` with [clat]; its
unmodified IPv4 programs reach IPv4 literals through the lab's NAT64 (the real ``sixgate run``
with [nat64] as the PLAT, and separately TAYGA with kernel masquerading) with no LD_PRELOAD:
curl of the 100 MB file (sha256), ping, dig (an answer bigger than the MTU: fragments both
ways), ssh to an IPv4 literal, a UDP program, and a statically linked busybox wget. The CLAT
finds the PLAT prefix by RFC 7050 through the real unbound DNS64. Stopping it, or killing it
and starting it again, leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import netlab
import pytest
from clatlab import CLAT4, CLAT6, ClatLab
from nat64lab import DNS4, GATEWAY4, HTTP4, PREFIX

pytestmark = pytest.mark.lab

BUSYBOX = "/bin/busybox"
UNSERVED_PREFIX = "2001:db8:6400::/96"  # a PREF64 no NAT64 of the lab serves


@pytest.fixture(scope="class", params=["sixgate", "tayga"], ids=lambda plat: f"plat-{plat}")
def clat_lab(request: pytest.FixtureRequest,
             served_files: netlab.ServedFiles) -> Iterator[ClatLab]:
    """The CLAT against sixgate's own NAT64 and, separately, against TAYGA (an independent
    PLAT), each in a lab of its own."""
    with ClatLab(served_files, plat=request.param) as lab:
        yield lab


class TestClat:
    def test_the_prefix_was_found_by_rfc7050_through_the_dns64(self, clat_lab: ClatLab) -> None:
        if clat_lab.plat != "sixgate":
            check = clat_lab.clat_sixgate("check")
            assert f"PLAT prefix   {clat_lab.plat_prefix}: configured" in check.stdout, (
                check.stdout + check.stderr)
            return  # the lab's DNS64 synthesizes under sixgate's prefix, not TAYGA's
        log = clat_lab.log_path("clat").read_text()
        assert "PLAT prefix 64:ff9b::/96 found by RFC 7050" in log, log
        check = clat_lab.clat_sixgate("check")
        assert check.returncode == 0, check.stdout + check.stderr
        assert "PLAT prefix   64:ff9b::/96: found by RFC 7050" in check.stdout, check.stdout

    def test_the_host_has_ipv4_through_the_clat_and_nothing_else(self, clat_lab: ClatLab
                                                                 ) -> None:
        state = clat_lab.client_state()
        assert clat_lab.state_before["ipv4 routes"] == "", clat_lab.state_before
        assert "default dev" in state["ipv4 routes"] and "mtu 1260" in state["ipv4 routes"]
        assert f"inet {CLAT4}/32" in state["ipv4 addresses"], state
        assert state["proxy"].startswith(f"{clat_lab.clat_address} "), state

    def test_an_auto_address_is_picked_by_duplicate_address_detection(
            self, clat_lab: ClatLab) -> None:
        """Against TAYGA the CLAT picks its address: the first candidate is in use on the
        link (the NAT64 namespace holds it), so DAD fails and the second is taken."""
        log = clat_lab.log_path("clat").read_text()
        if clat_lab.taken_address is None:  # named in the config: used as it is, no DAD
            assert f"CLAT address {CLAT6} answered for on veth6" in log, log
            assert "picked in" not in log, log
            return
        assert f"CLAT address {clat_lab.taken_address} is in use on veth6" in log, log
        assert re.search(rf"CLAT: address {re.escape(clat_lab.clat_address)} picked in veth6's "
                         r"2001:db8:100::/64, duplicate address detection passed \(attempt 2\)",
                         log), log
        assert clat_lab.clat_address != clat_lab.taken_address

    def test_curl_100mb_from_an_ipv4_literal(self, clat_lab: ClatLab,
                                             served_files: netlab.ServedFiles) -> None:
        got = netlab.download(clat_lab, f"http://{HTTP4}/big.bin", family="-4")
        assert got.exit_code == 0, got.stderr
        assert (got.size_bytes, got.sha256) == (served_files.big.size_bytes,
                                                served_files.big.sha256)
        print(f"CLAT + NAT64 curl 100 MB: {got.megabytes_per_s:.1f} MB/s")

    def test_ping_an_ipv4_literal(self, clat_lab: ClatLab) -> None:
        done = clat_lab.peer(["ping", "-4", "-c", "3", "-i", "0.2", "-W", "2", HTTP4],
                             timeout=20)
        assert done.returncode == 0 and " 0% packet loss" in done.stdout, done.stdout

    def test_dig_small_and_an_answer_bigger_than_the_mtu(self, clat_lab: ClatLab) -> None:
        small = clat_lab.peer(["dig", f"@{DNS4}", "+short", "+tries=1", "+time=3",
                               netlab.DNS_SMALL_NAME, "A"])
        assert small.stdout.strip() == netlab.DNS_SMALL_A, small.stdout + small.stderr
        big = clat_lab.peer(["dig", f"@{DNS4}", "+tries=1", "+time=3", "+bufsize=8192",
                             "+ignore", netlab.DNS_BIG_NAME, "TXT"])
        output = big.stdout + big.stderr
        assert big.returncode == 0 and "(UDP)" in output, output
        assert netlab.dig_message_bytes(output) > 1500
        assert netlab.dig_txt_strings(output) == netlab.big_txt_strings()

    def test_ssh_to_an_ipv4_literal_without_ld_preload(self, clat_lab: ClatLab) -> None:
        env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
        assert "LD_PRELOAD" not in env
        done = clat_lab.peer(clat_lab.ssh_argv("echo through-the-clat"), timeout=30)
        assert done.returncode == 0 and done.stdout.strip() == "through-the-clat", (
            done.stdout + done.stderr)

    def test_a_udp_program(self, clat_lab: ClatLab) -> None:
        """A plain IPv4 UDP socket (a DNS query by hand): sent from the CLAT's address."""
        program = (
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.settimeout(3)\n"
            f"s.connect(('{DNS4}', 53))\n"
            "s.send(bytes.fromhex('1234010000010000000000000573'\n"
            "                     '6d616c6c036c61620000010001'))\n"
            "answer, source = s.recvfrom(512)\n"
            "print(s.getsockname()[0], source[0], answer[:2].hex(), len(answer) > 12)\n")
        done = clat_lab.peer([sys.executable, "-c", program])
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [CLAT4, DNS4, "1234", "True"], done.stdout

    def test_a_statically_linked_busybox_wget(self, clat_lab: ClatLab) -> None:
        if not os.path.exists(BUSYBOX):
            pytest.fail(f"{BUSYBOX} is missing: install busybox-static", pytrace=False)
        done = clat_lab.peer([BUSYBOX, "wget", "-q", "-O", "-",
                              f"http://{HTTP4}/{netlab.SMALL_NAME}"], timeout=20)
        assert done.returncode == 0 and done.stdout == netlab.SMALL_TEXT, done.stderr

    def test_the_nat64_saw_the_clats_address_writing_to_the_prefix(self, clat_lab: ClatLab
                                                                      ) -> None:
        """The PLAT's bindings: the CLAT's IPv6 address as the client, the IPv4 server as
        the target it took from 64:ff9b::198.51.100.7 (the CLAT keeps the port). Through
        TAYGA the server sees the NAT64 namespace's address (TAYGA's pool, masqueraded)."""
        done = clat_lab.peer(["curl", "-4", "-sS", "--local-port", "45454", "-o", "/dev/null",
                              f"http://{HTTP4}/{netlab.SMALL_NAME}"], timeout=20)
        assert done.returncode == 0, done.stderr
        if clat_lab.plat == "tayga":
            requests = [line for line in clat_lab.log_path("http").read_text().splitlines()
                        if f"GET /{netlab.SMALL_NAME}" in line]
            assert requests[-1].startswith(f"{GATEWAY4} "), requests
            return
        rows = [b for b in clat_lab.flows()["bindings"]
                if b["client"] == f"[{CLAT6}]:45454"]
        assert rows and rows[0]["rule"] == "nat64" and rows[0]["target"] == f"{HTTP4}:80", (
            clat_lab.flows()["bindings"])

    def test_a_reload_of_the_same_file_changes_nothing(self, clat_lab: ClatLab) -> None:
        """The address and prefix "auto" found at the start stay what runs (issue 17's
        reload keeps them)."""
        done = clat_lab.clat_sixgate("reload")
        assert done.returncode == 0 and "nothing changed" in done.stdout, (
            done.stdout + done.stderr)

    def test_sigkill_then_a_new_start_then_a_stop_leave_nothing_behind(
            self, clat_lab: ClatLab) -> None:
        clat = clat_lab.processes["clat"]
        os.kill(clat.pid, signal.SIGKILL)
        clat.wait(timeout=10)
        clat_lab.start_clat("clat-again")
        log = clat_lab.log_path("clat-again").read_text()
        done = clat_lab.peer(["ping", "-4", "-c", "1", "-W", "2", HTTP4], timeout=20)
        assert done.returncode == 0, done.stdout + log
        assert clat_lab.stop_clat("clat-again") == 0, log
        assert clat_lab.client_state() == clat_lab.state_before


@pytest.fixture(scope="class")
def pref64_lab(served_files: netlab.ServedFiles) -> Iterator[ClatLab]:
    """The CLAT against sixgate's NAT64, its router advertising the NAT64's prefix as PREF64
    before the CLAT starts."""
    with ClatLab(served_files, advertise=PREFIX) as lab:
        yield lab


def clat_metric(lab: ClatLab, name: str) -> list[str]:
    body = lab.peer(["curl", "-sf", "http://127.0.0.1:9641/metrics"]).stdout
    return [line for line in body.splitlines() if line.startswith(name)]


class TestClatPref64:
    """RFC 8781: a router advertisement's PREF64 is found first and followed when it changes
    (the DNS64 would say 64:ff9b::/96 too: the log and the metric name the source)."""

    def test_the_prefix_came_from_the_router_advertisement(self, pref64_lab: ClatLab) -> None:
        log = pref64_lab.log_path("clat").read_text()
        assert f"PLAT prefix {PREFIX} found by RFC 8781 (PREF64 in a router advertisement on " \
               "veth6)" in log, log
        assert clat_metric(pref64_lab, "sixgate_clat_plat_prefix_info") == [
            f'sixgate_clat_plat_prefix_info{{prefix="{PREFIX}",source="rfc8781"}} 1.0']
        done = pref64_lab.peer(["ping", "-4", "-c", "1", "-W", "2", HTTP4], timeout=20)
        assert done.returncode == 0, done.stdout

    def test_check_finds_the_pref64_before_an_auto_address_is_picked(
            self, pref64_lab: ClatLab) -> None:
        """``sixgate check`` with ``ipv6_address = "auto"`` (nothing picked yet) asks on the
        IPv6 default route's interface, as the start does, and names the source."""
        config = pref64_lab.tmp / "clat-auto.toml"
        config.write_text(re.sub(r'ipv6_address = "[^"]*"', 'ipv6_address = "auto"',
                                 pref64_lab.clat_config.read_text()))
        done = pref64_lab.peer([*netlab.sixgate_command(), "check", "--config", str(config)],
                               timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"PLAT prefix   {PREFIX}: found by RFC 8781" in done.stdout, done.stdout

    def test_a_new_pref64_is_followed_and_logged(self, pref64_lab: ClatLab) -> None:
        """Another prefix (one no NAT64 serves here): the CLAT writes to it at once, so IPv4
        stops working; the NAT64's prefix again, and it works again. Each change is logged
        and counted."""
        lab = pref64_lab
        lab.advertise_pref64(UNSERVED_PREFIX)
        netlab.wait_until(lambda: f"PLAT prefix changed from {PREFIX} to {UNSERVED_PREFIX}"
                          in lab.log_path("clat").read_text(), timeout=10,
                          what="the CLAT to take the new PREF64")
        failed = lab.peer(["ping", "-4", "-c", "1", "-W", "2", HTTP4], timeout=20)
        assert failed.returncode != 0, failed.stdout
        lab.advertise_pref64(PREFIX)
        netlab.wait_until(lambda: f"PLAT prefix changed from {UNSERVED_PREFIX} to {PREFIX}"
                          in lab.log_path("clat").read_text(), timeout=10,
                          what="the CLAT to take the NAT64's PREF64 again")
        done = lab.peer(["ping", "-4", "-c", "1", "-W", "2", HTTP4], timeout=20)
        assert done.returncode == 0, done.stdout
        assert clat_metric(lab, "sixgate_clat_plat_prefix_changes_total") == [
            "sixgate_clat_plat_prefix_changes_total 2.0"]


@pytest.fixture(scope="class")
def rediscovery_lab(served_files: netlab.ServedFiles) -> Iterator[ClatLab]:
    """The CLAT against sixgate's NAT64, its prefix from the DNS64, asked again every second."""
    with ClatLab(served_files, clat_toml="rediscovery_interval_s = 1\n") as lab:
        yield lab


class TestClatRediscovery:
    def test_a_new_dns64_prefix_is_followed_and_logged(self, rediscovery_lab: ClatLab) -> None:
        """RFC 7050 asked again: the network's DNS64 now synthesizes under another prefix (one
        no NAT64 here serves): the CLAT takes it within its interval, so IPv4 stops working;
        the NAT64's prefix again, and it works again. Each change logged and counted."""
        lab = rediscovery_lab
        assert f"PLAT prefix {PREFIX} found by RFC 7050" in lab.log_path("clat").read_text()
        lab.start_dns64(UNSERVED_PREFIX)
        netlab.wait_until(lambda: f"PLAT prefix changed from {PREFIX} to {UNSERVED_PREFIX} "
                          "(found by RFC 7050" in lab.log_path("clat").read_text(), timeout=15,
                          what="the CLAT to take the DNS64's new prefix")
        failed = lab.peer(["ping", "-4", "-c", "1", "-W", "2", HTTP4], timeout=20)
        assert failed.returncode != 0, failed.stdout
        lab.start_dns64()
        netlab.wait_until(lambda: f"PLAT prefix changed from {UNSERVED_PREFIX} to {PREFIX}"
                          in lab.log_path("clat").read_text(), timeout=15,
                          what="the CLAT to take the NAT64's prefix again")
        done = lab.peer(["ping", "-4", "-c", "1", "-W", "2", HTTP4], timeout=20)
        assert done.returncode == 0, done.stdout
        assert clat_metric(lab, "sixgate_clat_plat_prefix_changes_total") == [
            "sixgate_clat_plat_prefix_changes_total 2.0"]
        assert clat_metric(lab, "sixgate_clat_plat_prefix_info") == [
            f'sixgate_clat_plat_prefix_info{{prefix="{PREFIX}",source="rfc7050"}} 1.0']


def test_check_says_when_this_host_has_no_ipv6(tmp_path: Path) -> None:
    """Without IPv6 connectivity ``sixgate check`` of a CLAT says so (and that no DNS64
    answered), exit 1: in a namespace of its own with nothing but loopback."""
    namespace = f"{netlab.NAME_PREFIX}{os.getpid()}x0-noip6"  # swept like a lab's
    config = tmp_path / "clat.toml"
    config.write_text(f'[gateway]\nname = "sgnoip6"\nrun_dir = "{tmp_path / "run"}"\n\n'
                      '[clat]\nplat_prefix = "auto"\n')
    netlab.run(["ip", "netns", "add", namespace])
    try:
        done = netlab.run(netlab.in_ns(namespace, [*netlab.sixgate_command(), "check",
                                                   "--config", str(config)]), check=False,
                          timeout=60)
    finally:
        netlab.delete_namespace(namespace)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "PLAT prefix   NONE: this host has no IPv6 default route" in done.stdout, done.stdout
    assert "no DNS64 resolver answers here" in done.stdout, done.stdout
