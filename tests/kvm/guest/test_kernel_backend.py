"""sixgate's kernel backend on a real Debian kernel's ``sit`` driver, INSIDE the qemu guest.

The real ``sixgate run`` (``backend = "kernel"``, two workers) creates its sit link in a "gw"
namespace; a "peer" namespace reaches it through a plain kernel sit tunnel made with ``ip
tunnel``, and real ping, curl and dig check what a user sees: the kernel answers ICMPv6 itself,
the workers relay tcp/80 and udp/53 from IPv6 sockets to IPv4-only services on loopback. Then
how the gateway leaves: SIGTERM (exit 0, link and workers gone) and SIGKILL (the kernel keeps
the link; the next start removes it).

Each test does a lot per gateway run: Python in the guest is ~19x slower and ``sixgate flows``
alone takes seconds there. Helpers: kernelgw.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from kernelgw import (
    BORDER_RELAY_IPV4,
    DNS_ANSWER,
    FILE_NAME,
    GATEWAY_STOP_TIMEOUT_S,
    GW_IPV4,
    MTU,
    NAME,
    PEER_IPV4,
    SIT,
    SIXRD_PREFIX,
    SIXRD_RELAY_PREFIX,
    TAKE_OVER_READY_TIMEOUT_S,
    KernelLab,
    config_text,
    counter_total,
    hold_tcp,
    in_ns,
    inside,
    run,
    run_together,
    sixgate_command,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from sixgate.coordinator.metrics import METRIC_NAMES

pytestmark = pytest.mark.kvm

Netns = Callable[[str], str]
HOST_ONLY_PORT = 2222  # a host service no [[forward]] names


def _start(lab: KernelLab, dns: bool) -> None:
    """Network, services and the gateway started together; then each polled until ready."""
    lab.build()
    lab.start_services(dns=dns)
    lab.write_config()
    gateway = lab.spawn_gateway()
    lab.wait_services()
    lab.wait_gateway(gateway)


def _assert_clean_stop(lab: KernelLab) -> None:
    """SIGTERM the newest run by PID: exit 0, its sit link and every worker gone."""
    gateway = lab.runs[-1]
    os.kill(gateway.process.pid, signal.SIGTERM)
    try:
        code = gateway.process.wait(timeout=GATEWAY_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"sixgate run did not exit within {GATEWAY_STOP_TIMEOUT_S:.0f} s "
                             f"of SIGTERM:\n{gateway.stderr}") from None
    assert code == 0, f"sixgate run exited {code} after SIGTERM:\n{gateway.stderr}"
    assert "sixgate stopped cleanly" in gateway.stderr, gateway.stderr
    assert SIT not in lab.gw_links(), (
        f"{SIT} is left after a clean stop: {lab.gw_links()}\n{gateway.stderr}")
    lab.wait_workers_gone(gateway)


def _assert_backend_kernel(stderr: str) -> None:
    assert re.search(r"\bbackend kernel\b", stderr), (
        f"the gateway's stderr does not say it runs the kernel backend:\n{stderr}")


def test_kernel_backend_6in4_ping_curl_dig(netns: Netns) -> None:
    """6in4 (RFC 4213) over the gateway's own sit link: ping, curl, dig, flows; then a crash.

    Folded in to spare a gateway start under emulation: SIGKILL of the coordinator leaves the
    sit link (the kernel keeps it) but takes the workers along; the next ``sixgate run`` removes
    the leftover link, works, and stops cleanly on SIGTERM.
    """
    with KernelLab(netns, "6in4") as lab:
        _start(lab, dns=True)
        first = lab.runs[0]
        _assert_backend_kernel(first.stderr)

        details = lab.sit_details()
        assert re.search(rf"link/sit {re.escape(GW_IPV4)} peer {re.escape(PEER_IPV4)}\b",
                         details), details
        assert re.search(rf"\bmtu {MTU}\b", details), details
        assert re.search(r"\bttl 64\b", details), details
        addresses = lab.gw(["ip", "-6", "addr", "show", "dev", SIT]).stdout
        assert f"inet6 {lab.gw_address}/128" in addresses, addresses
        routes = lab.gw(["ip", "-6", "route", "show", "dev", SIT]).stdout
        assert re.search(r"^default\b", routes, re.MULTILINE), routes

        held = hold_tcp(lab.peer_ns, lab.gw_address, 80)
        try:
            lab.ping()
            assert lab.curl_sha256() == lab.file_sha256
            answer = lab.dig(lab.gw_address, namespace=lab.peer_ns)
            assert answer == DNS_ANSWER, (
                f"dig @{lab.gw_address} {answer!r}; gateway stderr:\n{first.stderr}")

            summary = lab.flows()
            client = f"[{held.getsockname()[0]}]:{held.getsockname()[1]}"
            bindings = summary["bindings"]
            assert any(b["proto"] == "tcp" and b["client"] == client
                       and b["state"] == "established" for b in bindings), (
                f"no established binding for the held connection {client}: {bindings}")
        finally:
            held.close()
        for key in ("inbound/tcp", "outbound/tcp", "inbound/udp", "outbound/udp"):
            assert counter_total(summary, "packets", key) > 0, (key, summary["counters"])
        assert counter_total(summary, "bytes", "outbound/tcp") >= os.path.getsize(
            lab.files / FILE_NAME), summary["counters"]
        assert not {r: n for r, n in summary["drops"].items() if n}, summary["drops"]
        _assert_only_forwarded_ports_reachable(lab)

        # A crash: SIGKILL by PID. The kernel keeps the link; the workers die with the parent.
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=10)
        assert SIT in lab.gw_links(), f"{SIT} vanished with the killed coordinator"
        lab.wait_workers_gone(first)

        second = lab.spawn_gateway()
        lab.wait_gateway(second)
        assert re.search(rf"removing sit link {SIT} left by an earlier run", second.stderr), (
            f"the restarted gateway did not say it removed the leftover link:\n{second.stderr}")
        assert re.search(rf"link/sit {re.escape(GW_IPV4)} peer {re.escape(PEER_IPV4)}\b",
                         lab.sit_details())
        lab.ping()
        assert lab.curl_sha256() == lab.file_sha256
        _assert_clean_stop(lab)
        _assert_policy_and_pool_removed(lab)


def _assert_only_forwarded_ports_reachable(lab: KernelLab) -> None:
    """Issue 13, finding 4: a host service on ``[::]`` (here a bare listener, as sshd would be)
    is not reachable through the sit link, only the forwarded ports are (and were, above);
    the drop is counted. The service behind port 80 saw the client as a pool address, never
    127.0.0.1 (the http.server logs each request's source)."""
    with inside(lab.gw_ns):
        host_service = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        host_service.bind(("::", HOST_ONLY_PORT))
        host_service.listen()
        with inside(lab.peer_ns):
            try:
                reached = socket.create_connection((lab.gw_address, HOST_ONLY_PORT), timeout=3)
            except TimeoutError:
                reached = None  # no handshake, no reset: dropped on the way in
        if reached is not None:
            reached.close()
            raise AssertionError(f"a host listener on [::]:{HOST_ONLY_PORT} was reached "
                                 "through the tunnel")
    finally:
        host_service.close()
    counter = lab.gw(["nft", "list", "counter", "inet", f"sixgate_{NAME}_in",
                      "not_forwarded"]).stdout
    packets = re.search(r"packets (\d+)", counter)
    assert packets and int(packets.group(1)) >= 1, counter
    local = lab.gw(["ip", "route", "show", "table", "local", "100.64.0.0/16"]).stdout
    assert re.search(r"^local 100\.64\.0\.0/16 dev lo\b", local, re.MULTILINE), local
    requests = [line for line in (lab.tmp / "http.err").read_text().splitlines()
                if f"GET /{FILE_NAME}" in line]
    # The first request is wait_services' own check over IPv4 loopback; the rest came in
    # through the gateway.
    relayed = requests[1:]
    assert relayed and all(line.startswith("100.64.") for line in relayed), requests


def _assert_policy_and_pool_removed(lab: KernelLab) -> None:
    tables = lab.gw(["nft", "list", "tables"]).stdout
    assert f"sixgate_{NAME}_in" not in tables, tables
    local = lab.gw(["ip", "route", "show", "table", "local", "100.64.0.0/16"]).stdout
    assert local.strip() == "", local


@pytest.mark.parametrize("mode", ["6to4", "6rd"])
def test_kernel_backend_6to4_and_6rd_ping_curl(netns: Netns, mode: str) -> None:
    """6to4 (RFC 3056): a sit link with no remote, 2002::/16 on it, the relay as default.
    6rd (RFC 5969, issue 19): the same link in sit's 6rd mode (the domain's prefix and shared
    IPv4 bits), the 6rd prefix on it, the border relay as default; the peer is a Linux sit CE
    of the same domain, reached straight at the IPv4 address its delegated prefix embeds."""
    with KernelLab(netns, mode) as lab:
        _start(lab, dns=False)
        _assert_backend_kernel(lab.runs[0].stderr)

        details = lab.sit_details()
        # No remote: `ip -d` prints "link/sit LOCAL brd 0.0.0.0" and "remote any".
        assert re.search(rf"link/sit {re.escape(GW_IPV4)} (brd|peer) (0\.0\.0\.0|any)\b",
                         details), details
        assert re.search(rf"\bremote any local {re.escape(GW_IPV4)}\b", details), details
        assert re.search(rf"\bmtu {MTU}\b", details), details
        routes = lab.gw(["ip", "-6", "route", "show", "dev", SIT]).stdout
        if mode == "6rd":
            assert re.search(rf"\b6rd-prefix {re.escape(SIXRD_PREFIX)}\b", details), details
            assert re.search(rf"\b6rd-relay_prefix {re.escape(SIXRD_RELAY_PREFIX)}\b",
                             details), details
            assert re.search(rf"^{re.escape(SIXRD_PREFIX)}\b", routes, re.MULTILINE), routes
            assert re.search(rf"^default via ::{re.escape(BORDER_RELAY_IPV4)}\b", routes,
                             re.MULTILINE), routes
        else:
            assert re.search(r"^2002::/16\b", routes, re.MULTILINE), routes
            assert re.search(r"^default via ::192\.88\.99\.1\b", routes, re.MULTILINE), routes

        lab.ping()
        assert lab.curl_sha256() == lab.file_sha256
        if mode == "6to4":
            _assert_a_reload_changes_the_relays_and_keeps_the_rest(lab)
            _assert_a_failed_take_over_hands_back(lab)
        _assert_same_metrics_as_userspace(lab)
        if mode == "6rd":  # one mode each: a gateway start costs a minute here
            _assert_a_take_over_keeps_the_link_and_the_relays_connections(lab)
        _assert_clean_stop(lab)
        _assert_policy_and_pool_removed(lab)
        assert _migrate_req(lab) == "0", "net.ipv4.tcp_migrate_req was not put back"


UDP_RULE = 'proto = "udp"\nport = 53\nto = "127.0.0.1:5353"'
NEW_RULE = 'proto = "tcp"\nport = 8081\nto = "127.0.0.1:8080"'


def _http_status(sock: socket.socket) -> bytes:
    sock.sendall(f"GET /{FILE_NAME} HTTP/1.0\r\n\r\n".encode())
    return sock.recv(12)


def _assert_a_reload_changes_the_relays_and_keeps_the_rest(lab: KernelLab) -> None:
    """Issue 17 on the kernel backend: ``sixgate reload`` swaps the udp/53 rule for tcp/8081
    (unprivileged, so the relays may open it): the new port answers through the tunnel and
    the input table, a connection held on the kept port 80 goes on; a second reload takes
    tcp/8081 away and a connection held on it is reset; udp/53 back (a privileged port the
    unprivileged relays cannot open) is refused: restart needed."""
    original = lab.config_path.read_text()
    held = hold_tcp(lab.peer_ns, lab.gw_address, 80)
    try:
        lab.config_path.write_text(original.replace(UDP_RULE, NEW_RULE))
        done = lab.sixgate("reload")
        assert done.returncode == 0 and "forwards changed" in done.stdout, (
            done.stdout + done.stderr + lab.runs[-1].stderr)
        fetched = lab.peer(["curl", "-6", "-g", "-sS", "--max-time", "30", "-o", "/dev/null",
                            "-w", "%{http_code}", f"http://[{lab.gw_address}]:8081/{FILE_NAME}"],
                           check=False)
        assert fetched.stdout == "200", fetched.stdout + fetched.stderr + lab.runs[-1].stderr
        assert _http_status(held) == b"HTTP/1.0 200", "the connection on port 80 was lost"
        removed = hold_tcp(lab.peer_ns, lab.gw_address, 8081)
        assert f"[[forward]]\n{UDP_RULE}\n" in original
        lab.config_path.write_text(original.replace(f"[[forward]]\n{UDP_RULE}\n", ""))
        done = lab.sixgate("reload")
        assert done.returncode == 0 and "1 flow(s) of removed rules ended" in done.stdout, (
            done.stdout + done.stderr + lab.runs[-1].stderr)
        removed.settimeout(10)
        try:
            removed.recv(1)
        except ConnectionResetError:
            pass
        else:
            raise AssertionError("a connection of the removed rule was not reset")
        finally:
            removed.close()
        lab.config_path.write_text(original)
        done = lab.sixgate("reload")
        assert done.returncode == 2 and "udp/53" in done.stderr and "restart needed" in (
            done.stderr), done.stdout + done.stderr
    finally:
        held.close()
        lab.config_path.write_text(original)


def _migrate_req(lab: KernelLab) -> str:
    return lab.gw(["sysctl", "-n", "net.ipv4.tcp_migrate_req"]).stdout.strip()


def _link_index(lab: KernelLab) -> int:
    return int(json.loads(lab.gw(["ip", "-j", "link", "show", "dev", SIT]).stdout)[0]["ifindex"])


def _assert_a_take_over_keeps_the_link_and_the_relays_connections(lab: KernelLab) -> None:
    """Issue 17 on the kernel backend: ``sixgate run --take-over`` makes the running gateway
    retire rather than stop. The new run keeps its sit link (the same interface index), its
    relays listen beside the old ones (SO_REUSEPORT; not yet accepted connections move over,
    net.ipv4.tcp_migrate_req), then the old relays close their listeners: a new curl goes
    through the new run, while a connection an old relay carried from before the take-over
    still completes a whole HTTP exchange afterwards; meanwhile the new run's ``sixgate
    flows`` lists it (marked retiring) and its metrics count it. Once it ended, the retired
    run exits 0 by itself and the connection is listed no more."""
    first = lab.runs[-1]
    assert _migrate_req(lab) == "1"
    index = _link_index(lab)
    held = hold_tcp(lab.peer_ns, lab.gw_address, 80)
    try:
        client = f"[{held.getsockname()[0]}]:{held.getsockname()[1]}"
        assert any(b["client"] == client and b["state"] == "established"
                   for b in lab.flows()["bindings"]), "the held connection has no relay yet"
        second = lab.spawn_gateway("--take-over")
        lab.wait_gateway(second, TAKE_OVER_READY_TIMEOUT_S)
        assert "kept from the run this one takes over from" in second.stderr, second.stderr
        assert _link_index(lab) == index, "the sit link was made again"
        wait_until(lambda: first.stderr.count("retiring: listeners closed") == lab.workers,
                   timeout=30, what=lambda: f"the old relays to close their listeners; old "
                                            f"run's stderr:\n{first.stderr}")
        assert first.process.poll() is None, first.stderr  # it still carries the held one
        assert lab.curl_sha256() == lab.file_sha256  # by the new run's relays
        # The new run lists the connection the retiring run still carries, marked, and
        # counts it in its metrics.
        listed = [(b.get("retiring"), b["state"]) for b in lab.flows()["bindings"]
                  if b["client"] == client]
        assert listed == [(True, "established")], listed
        body = lab.gw(["curl", "-sf", "http://127.0.0.1:9641/metrics"]).stdout
        assert 'sixgate_take_over_retiring_flows{protocol="tcp"} 1.0' in body, body
        held.settimeout(60)
        held.sendall(f"GET /{FILE_NAME} HTTP/1.0\r\n\r\n".encode())
        response = b""
        while chunk := held.recv(65536):
            response += chunk
    finally:
        held.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head[:200]
    assert hashlib.sha256(body).hexdigest() == lab.file_sha256, "the held exchange was damaged"
    assert first.process.wait(timeout=60) == 0, first.stderr
    assert "retired: its last connection ended" in first.stderr, first.stderr
    assert "take-over: retired after" in first.stderr, first.stderr
    assert not any(b["client"] == client for b in lab.flows()["bindings"]), (
        "the ended connection is still listed")
    lab.ping()  # the new run's link, as before


BUSY_METRICS_PORT = 9642  # held by the test: the failing take-over's metrics address


def _assert_a_failed_take_over_hands_back(lab: KernelLab) -> None:
    """Issue 17 on the kernel backend: a take-over that fails after the running gateway
    retired (its config's metrics address is taken, found only at its start) hands back
    before it released the retired run's relays: that run serves again as before the
    take-over (its pidfile, control socket and metrics; its relays answer at their
    endpoints again, still listening), on the same sit link, and a connection its relay
    carried through the whole attempt completes an HTTP exchange afterwards."""
    first = lab.runs[-1]
    index = _link_index(lab)
    original = lab.config_path.read_text()
    with inside(lab.gw_ns):
        busy = socket.socket()
    held = hold_tcp(lab.peer_ns, lab.gw_address, 80)
    try:
        busy.bind(("127.0.0.1", BUSY_METRICS_PORT))
        busy.listen()
        client = f"[{held.getsockname()[0]}]:{held.getsockname()[1]}"
        lab.config_path.write_text(
            f'{original}\n[metrics]\nlisten = "127.0.0.1:{BUSY_METRICS_PORT}"\n')
        failed = lab.spawn_gateway("--take-over")
        lab.runs.remove(failed)  # the first run is the newest again once handed back
        try:
            code = failed.process.wait(timeout=TAKE_OVER_READY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            failed.process.kill()
            raise AssertionError(f"the failing take-over did not exit:\n{failed.stderr}"
                                 ) from None
        lab.config_path.write_text(original)
        assert code == 1, failed.stderr
        assert "cannot listen for metrics on 127.0.0.1:9642" in failed.stderr, failed.stderr
        assert "take-over: handed back; pid" in failed.stderr, failed.stderr
        assert "the next run failed and hands back" in first.stderr, first.stderr
        assert "sixgate up again" in first.stderr, first.stderr
        assert first.process.poll() is None, first.stderr
        assert _link_index(lab) == index, "the sit link was made again"
        # Its own again: listed unmarked, by its control socket; its metrics answer.
        listed = [(b.get("retiring"), b["state"]) for b in lab.flows()["bindings"]
                  if b["client"] == client]
        assert listed == [(None, "established")], listed
        body = lab.gw(["curl", "-sf", "http://127.0.0.1:9641/metrics"]).stdout
        assert 'sixgate_take_over_retiring_flows{protocol="tcp"} 0.0' in body, body
        assert lab.curl_sha256() == lab.file_sha256  # a new connection: its relays listen
        assert _http_status(held) == b"HTTP/1.0 200", "the held connection was lost"
    finally:
        held.close()
        busy.close()
        lab.config_path.write_text(original)
    lab.ping()


def _assert_same_metrics_as_userspace(lab: KernelLab) -> None:
    """Issue 5: the kernel backend exports the userspace backend's metric names (one list,
    coordinator/metrics.py METRIC_NAMES), with the backend as an info metric, and its tunnel
    counters come from the sit link; /readyz answers."""
    ready = lab.gw(["curl", "-s", "-w", " %{http_code}", "http://127.0.0.1:9641/readyz"],
                   check=False)
    assert ready.stdout.split() == ["ready", "200"], ready.stdout + ready.stderr
    body = lab.gw(["curl", "-sf", "http://127.0.0.1:9641/metrics"]).stdout
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert set(METRIC_NAMES) <= set(families), sorted(set(METRIC_NAMES) - set(families))
    [info] = families["sixgate_backend_info"].samples
    assert info.labels == {"backend": "kernel", "delivery": "socket_relay",
                           "tunnel_mode": lab.mode, "fast_path": "none"}, info
    [received] = families["sixgate_tunnel_received_packets"].samples
    assert received.value >= 3, body  # at least the three pings, counted by the sit link

    def total(family: str, **labels: str) -> float:
        return sum(s.value for s in families[family].samples
                   if all(s.labels.get(k) == v for k, v in labels.items()))

    assert total("sixgate_bytes", direction="from_services", protocol="tcp") >= os.path.getsize(
        lab.files / FILE_NAME), body
    assert total("sixgate_flows_created", protocol="tcp") >= 1, body
    assert total("sixgate_worker_up") == 2, body


def _fresh_namespace(netns: Netns, purpose: str) -> tuple[str, int]:
    """A new namespace with kernel IPv6 on; its name and how many links it has."""
    ns = netns(purpose)
    run(in_ns(ns, ["sysctl", "-q", "net.ipv6.conf.all.disable_ipv6=0"]))
    return ns, _link_count(ns)


def _link_count(ns: str) -> int:
    return run(["ip", "-n", ns, "-o", "link"]).stdout.count("\n")


def test_sixgate_probe_shows_sit_and_auto_picks_kernel(netns: Netns, tmp_path: Path) -> None:
    """Where the kernel has sit and IPv6, ``probe`` says so and ``backend = "auto"`` is kernel;
    neither leaves a link behind."""
    # Each in its own namespace so their throw-away sit links cannot meet (see the next test),
    # and side by side: each spends seconds importing under emulation; the guest has 2 CPUs.
    probe_ns, probe_links = _fresh_namespace(netns, "probe")
    check_ns, check_links = _fresh_namespace(netns, "check")
    config = tmp_path / "auto.toml"
    config.write_text(config_text("6in4", tmp_path / "run", backend="auto"))
    probe, check = run_together([
        in_ns(probe_ns, [*sixgate_command(), "probe"]),
        in_ns(check_ns, [*sixgate_command(), "check", "--config", str(config)])])

    assert re.search(r"^kernel sit\s+yes\b", probe, re.MULTILINE), probe
    assert re.search(r"^kernel IPv6\s+yes\b", probe, re.MULTILINE), probe
    assert re.search(r"^backend\s+kernel\b", probe, re.MULTILINE), probe
    assert re.search(r"^  backend       kernel\b", check, re.MULTILINE), check
    assert f"kernel sit link {SIT}" in check, check
    for ns, before in ((probe_ns, probe_links), (check_ns, check_links)):
        assert _link_count(ns) == before, run(["ip", "-n", ns, "-o", "link"]).stdout


def test_sixgate_probe_sit_not_fooled_by_an_existing_sit_link(netns: Netns) -> None:
    """A sit link already there must not make ``probe`` say the driver is missing.

    The probe's throw-away link is local 192.0.2.1 with no remote (coordinator/probe.py); the
    kernel refuses a second sit link with the same endpoints (EEXIST), which only a sit driver
    can say. That is the case whenever two probes overlap in one namespace: ``sixgate run``,
    ``check`` and ``probe`` all probe, e.g. two gateways started together. Here the other link
    is made first, so the overlap is certain rather than a race.
    """
    ns, _ = _fresh_namespace(netns, "busy")
    run(["ip", "-n", ns, "tunnel", "add", "other", "mode", "sit", "local", "192.0.2.1",
         "remote", "any", "ttl", "64"])

    probe = run(in_ns(ns, [*sixgate_command(), "probe"])).stdout

    assert re.search(r"^kernel sit\s+yes\b", probe, re.MULTILINE), (
        "with another sit link present, `sixgate probe` says the kernel's sit is unavailable "
        f"(so backend auto falls back to userspace, backend kernel refuses to start):\n{probe}")
    assert re.search(r"^backend\s+kernel\b", probe, re.MULTILINE), probe
    assert "other" in run(["ip", "-n", ns, "-o", "link"]).stdout
