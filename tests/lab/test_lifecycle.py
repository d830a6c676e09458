"""The gateway's life cycle and operator commands, through the real ``sixgate`` subprocess.

Shared lab per (mode, workers) (conftest ``lab``): ``sixgate ping`` from the gateway host itself
(the "alternative workflow" on a host with no kernel IPv6), ``sixgate probe``, services that are
down (the kernel's ICMPv4 error / RST translated back), a service on another IPv4 host.

Private lab per test (``private_lab``), for what kills or disturbs the gateway: a worker
SIGKILLed and restarted by the coordinator, the coordinator SIGKILLed (its workers and TUN
devices go with it; the next run cleans the stale run directory), a second ``sixgate run`` on the
same run directory refused, SIGINT as a clean stop. Processes are signalled by PID only, after
checking they are the ones this test started (or their children).
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import as_service_user
import netlab
import pytest
from netlab import Lab

pytestmark = pytest.mark.lab

PING_COUNT = 3
PING_INTERVAL_S = "0.2"
REFUSED_WITHIN_S = 2.0  # "at once": far below curl's timeout and any SYN retransmission
WORKER_RESTART_WITHIN_S = 15.0  # supervision runs every 0.2 s, first backoff 0.5 s
DIE_WITH_PARENT_WITHIN_S = 5.0  # PR_SET_PDEATHSIG SIGTERM; a worker's poll loop wakes every 0.5 s
STOP_WITHIN_S = 15.0
CAPABILITIES = ("raw socket (IPv4 proto 41)", "AF_PACKET", "TUN", "nftables", "kernel IPv6",
                "kernel sit")


# --------------------------------------------------------------------------- helpers


def status(lab: Lab) -> dict[str, Any]:
    """The coordinator's raw status (pid, settings, per-worker entries) from ``flows --json``."""
    return dict(lab.flows()["counters"])


def workers_by_index(lab: Lab) -> dict[int, dict[str, Any]]:
    """``counters.workers[]`` of ``sixgate flows --json`` keyed by worker index."""
    return {int(w["index"]): w for w in status(lab)["workers"]}


def totals(lab: Lab) -> Counter[str]:
    """Worker events, drops and packet counters summed over the workers that answer."""
    total: Counter[str] = Counter()
    for worker in status(lab)["workers"]:
        if worker.get("up"):
            counters = worker["counters"]
            total.update(counters["events"])
            total.update({f"drop:{k}": v for k, v in counters["drops"].items()})
            total.update({f"packets:{k}": v for k, v in counters["packets"].items()})
    return total


def delta(before: Counter[str], after: Counter[str], key: str) -> int:
    """How much one counter grew."""
    return after.get(key, 0) - before.get(key, 0)


def eventually(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until truthy; False (not an exception) after ``timeout``."""
    try:
        netlab.wait_until(predicate, timeout=timeout, what="condition", interval=interval)
    except netlab.LabError:
        return False
    return True


def sixgate_ping(lab: Lab, address: str, count: int) -> subprocess.CompletedProcess[str]:
    """``sixgate ping`` in the gateway namespace (whose kernel has IPv6 disabled)."""
    return lab.sixgate("ping", address, "--count", str(count), "--interval", PING_INTERVAL_S,
                       timeout=30)


def assert_ping6_answered(lab: Lab) -> None:
    """Real ``ping -6`` from the peer namespace gets all its replies."""
    done = netlab.ping(lab)
    assert netlab.ping_received(done.stdout) == 3, done.stdout + done.stderr


def assert_http_small_file(lab: Lab) -> None:
    """Real ``curl -6`` fetches /small.txt from the loopback http.server through the gateway."""
    done = lab.peer(["curl", "-6", "-g", "-sS", "--max-time", "10",
                     netlab.http_url(lab, netlab.SMALL_NAME)], timeout=20)
    assert done.returncode == 0, done.stderr
    assert done.stdout == netlab.SMALL_TEXT


def assert_child_of(pid: int, parent: int) -> None:
    """Before signalling ``pid``: it is a live sixgate worker whose parent is ``parent``."""
    state = netlab.process_state(pid)
    assert state is not None, f"pid {pid} does not exist"
    assert state[1] == parent, f"pid {pid} has parent {state[1]}, not the gateway {parent}"
    assert "sixgate.workers.main" in netlab.process_cmdline(pid), netlab.process_cmdline(pid)


def assert_is_our_gateway(lab: Lab, key: str = "sixgate") -> int:
    """The PID of the ``sixgate run`` this lab spawned, checked to still run sixgate."""
    process = lab.processes[key]
    assert process.poll() is None, f"{key} already exited {process.returncode}"
    argv = netlab.process_cmdline(process.pid)
    assert "run" in argv and any("sixgate" in a for a in argv), argv
    return process.pid


def run_dir(lab: Lab) -> Path:
    """The gateway's run_dir, as the lab configures it."""
    return lab.tmp / "run"


def leftover_runtime_files(lab: Lab) -> list[str]:
    """Sockets and pidfiles in the run directory."""
    directory = run_dir(lab)
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir()
                  if p.is_socket() or p.suffix == ".pid")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def private_lab(request: pytest.FixtureRequest,
                served_files: netlab.ServedFiles) -> Iterator[Lab]:
    """A lab + gateway of its own (mode, workers[, fanout[, wrapper argv]]) for one test that
    kills or disturbs it."""
    mode, workers, *rest = request.param
    with Lab(mode, workers, served_files, fanout=rest[0] if rest else "coordinator",
             gateway_wrapper=rest[1] if len(rest) > 1 else ()) as the_lab:
        yield the_lab


@pytest.fixture(scope="class")
def far_service(lab: Lab) -> Path:
    """http.server on 203.0.113.1:8181 in the PEER namespace (an IPv4 host that is not the
    gateway), and the route back to the gateway's pool that the README asks of such a host.
    Checked over plain IPv4 from the gateway namespace first, so a failure later is the
    gateway's. Returns the path of the server's access log (its stderr)."""
    lab.spawn("far_http", lab.peer_ns, [
        sys.executable, "-m", "http.server", "--bind", netlab.PEER_FAR_IPV4,
        str(netlab.FAR_HTTP_PORT), "--directory", str(lab.files.directory)])

    def listening() -> bool:
        if not lab.alive("far_http"):
            raise netlab.LabError(f"far http.server died:\n{netlab.tail(lab.log_path('far_http'))}")
        out = lab.peer(["ss", "-Hlnt", f"sport = :{netlab.FAR_HTTP_PORT}"]).stdout
        return bool(out.strip())

    netlab.wait_until(listening, timeout=15, what="far http.server listening")
    pool = status(lab)["settings"]["pool"]
    lab.ip(lab.peer_ns, "route", "replace", pool, "via", netlab.GATEWAY_IPV4)
    direct = lab.gw(["curl", "-sS", "--max-time", "5",
                     f"http://{netlab.PEER_FAR_IPV4}:{netlab.FAR_HTTP_PORT}/{netlab.SMALL_NAME}"])
    if direct.stdout != netlab.SMALL_TEXT:
        raise netlab.LabError(f"far http.server not reachable over IPv4: {direct.stderr}")
    return lab.log_path("far_http")


# --------------------------------------------------------------------------- shared lab


class LifecycleBehaviour:
    """Operator commands and unreachable services, in both tunnel modes (subclasses set MODE)."""

    MODE = ""

    def test_rfc4443_sixgate_ping_from_gateway_host_answered_by_peer_kernel(
            self, lab: Lab) -> None:
        """The alternative workflow: on the gateway host (kernel IPv6 off) ``sixgate ping``
        sends ICMPv6 echo requests through the tunnel from userspace while the gateway runs;
        the peer namespace's real kernel answers (RFC 4443 §4.2) via the tunnel peer."""
        address = lab.plan.peer_address
        done = sixgate_ping(lab, address, PING_COUNT)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        replies = re.findall(rf"^\d+ bytes from {re.escape(address)}: icmp_seq=(\d+) "
                             r"ttl=\d+ time=(\d+(?:\.\d+)?) ms$", done.stdout, re.MULTILINE)
        assert [int(seq) for seq, _ in replies] == list(range(1, PING_COUNT + 1)), output
        assert all(float(rtt) > 0 for _, rtt in replies), output
        assert f"{PING_COUNT} packets transmitted, {PING_COUNT} received" in done.stdout, output

    def test_sixgate_ping_to_silent_address_exits_1_with_nothing_received(
            self, lab: Lab) -> None:
        """An address routed to the peer that no host owns (the peer's kernel does not forward,
        so it drops the request silently): every request goes unanswered, exit code 1."""
        address = f"{lab.plan.client_prefix}::dead"
        done = sixgate_ping(lab, address, 1)
        output = done.stdout + done.stderr
        assert done.returncode == 1, output
        assert "1 packets transmitted, 0 received" in done.stdout, output
        assert "bytes from" not in done.stdout, output

    def test_rfc7915_4_2_closed_udp_service_port_unreachable_translated(self, lab: Lab) -> None:
        """UDP 5400 is forwarded to 127.0.0.1:5499 where nothing listens: the kernel answers
        ICMPv4 port unreachable, which the gateway translates to ICMPv6 destination
        unreachable code 4 (RFC 7915 §4.2); a connected AF_INET6 socket gets ECONNREFUSED.
        Counters prove it was translated, not made up by the gateway (no icmp_error_1_4)."""
        before = totals(lab)
        result = lab.probe("udp-refused", "--addr", lab.plan.gateway_address,
                           "--port", str(netlab.CLOSED_UDP_PORT), "--timeout", "3")
        after = totals(lab)
        assert result["result"] == "refused", result
        assert delta(before, after, "icmp_errors_translated") >= 1, (before, after)
        assert delta(before, after, "icmp_error_1_4") == 0
        assert delta(before, after, "drop:no_rule") == 0

    def test_rfc7915_closed_tcp_service_rst_translated_refuses_at_once(self, lab: Lab) -> None:
        """TCP 8100 is forwarded to 127.0.0.1:8199 where nothing listens: the kernel's RST
        comes back through the worker's TUN and is translated to IPv6, so curl fails at once
        with "connection refused" (exit 7); the gateway sent no RST of its own."""
        before = totals(lab)
        url = netlab.http_url(lab, "/", port=netlab.CLOSED_TCP_PORT)
        exit_code, elapsed_s, stderr = netlab.curl_exit(lab, url, max_time_s=5)
        after = totals(lab)
        assert exit_code == 7, stderr
        assert elapsed_s < REFUSED_WITHIN_S, f"took {elapsed_s:.2f} s: {stderr}"
        assert delta(before, after, "packets:from_services/tcp") >= 1, (before, after)
        assert delta(before, after, "tcp_rst_sent") == 0
        assert delta(before, after, "drop:no_rule") == 0

    def test_forward_to_ipv4_host_beyond_loopback_serves_page_from_pool_address(
            self, lab: Lab, far_service: Path) -> None:
        """A rule may target any IPv4 host: TCP 8181 -> 203.0.113.1:8181 (in the peer
        namespace, which routes the pool back to 192.0.2.10 as the README asks). curl -6 gets
        the page, and the server saw a client address from the gateway's pool."""
        pool = ipaddress.IPv4Network(status(lab)["settings"]["pool"])
        log_before = len(far_service.read_text())  # the lab's own direct IPv4 check is in it
        done = lab.peer(["curl", "-6", "-g", "-sS", "--max-time", "5",
                         netlab.http_url(lab, netlab.SMALL_NAME, port=netlab.FAR_HTTP_PORT)],
                        timeout=20)
        forwarding = lab.gw(["sysctl", "net.ipv4.conf.all.forwarding",
                             "net.ipv4.conf.veth0.forwarding"]).stdout.strip()
        assert done.returncode == 0, (
            f"curl -6 to port {netlab.FAR_HTTP_PORT} failed: {done.stderr.strip()}\n"
            f"gateway namespace: {forwarding.replace(chr(10), ', ')}\n"
            f"far server log:\n{netlab.tail(far_service)}")
        assert done.stdout == netlab.SMALL_TEXT
        clients = [ipaddress.IPv4Address(m) for m in re.findall(
            rf"^(\d+\.\d+\.\d+\.\d+) - - .*\"GET /{netlab.SMALL_NAME} ",
            far_service.read_text()[log_before:], re.MULTILINE)]
        assert clients and all(c in pool for c in clients), (clients, netlab.tail(far_service))
        # Forwarding was opened on the uplink only for replies to the pool: the gateway's own
        # nftables table drops anything else arriving there for forwarding.
        ruleset = lab.gw(["nft", "list", "ruleset"]).stdout
        assert f"table ip sixgate_{lab.name}" in ruleset, ruleset
        assert f'iifname "veth0" ip daddr != {pool} drop' in ruleset, ruleset

    def test_sixgate_probe_reports_each_capability_kernel_ipv6_and_sit_off(
            self, lab: Lab) -> None:
        """``sixgate probe`` in the gateway namespace: one line each for raw socket,
        AF_PACKET, TUN, nftables, kernel IPv6 and kernel sit, each with yes/no and a reason;
        kernel IPv6 is "no" (disabled here) and so is kernel sit; exit code 0."""
        done = lab.gw([*netlab.sixgate_command(), "probe"], timeout=30)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        lines = done.stdout.splitlines()
        found: dict[str, tuple[str, str]] = {}
        for name in CAPABILITIES:
            matching = [m for line in lines
                        if (m := re.match(rf"^{re.escape(name)}\s+(yes|no)\s+(\S.*)$", line))]
            assert len(matching) == 1, f"{name!r}: {len(matching)} lines\n{output}"
            found[name] = (matching[0].group(1), matching[0].group(2))
        assert found["kernel IPv6"][0] == "no", output
        assert "disable_ipv6" in found["kernel IPv6"][1], output
        assert found["kernel sit"][0] == "no", output


# None of these depends on the worker count, so one shared lab per mode (4 workers: the ICMP
# error or RST must find the worker that owns the pool address) keeps the file fast.
ONE_LAB_WITH_4_WORKERS = pytest.mark.parametrize("lab", [4], ids=["workers4"], indirect=True)


@ONE_LAB_WITH_4_WORKERS
class TestLifecycleSixToFour(LifecycleBehaviour):
    """6to4 (RFC 3056): sixgate ping goes to the IPv4 address embedded in 2002:c633:6401::/48."""

    MODE = "6to4"


@ONE_LAB_WITH_4_WORKERS
class TestLifecycleSixInFour(LifecycleBehaviour):
    """6in4 (RFC 4213): sixgate ping goes to the configured remote 198.51.100.1."""

    MODE = "6in4"


# --------------------------------------------------------------------------- private labs


@pytest.mark.parametrize("private_lab", [("6in4", 4), ("6in4", 4, "kernel")],
                         ids=["6in4-workers4", "6in4-workers4-kernel-fanout"], indirect=True)
def test_killed_worker_is_restarted_and_traffic_resumes(private_lab: Lab) -> None:
    """SIGKILL the worker that owns the client's /64: the coordinator notices, restarts it
    (a new PID answers in ``sixgate flows``, ``restarts`` 1, the other three untouched) and
    ping -6, curl -6 and dig work again, through the restarted worker."""
    lab = private_lab
    gateway_pid = assert_is_our_gateway(lab)
    assert netlab.dig(lab, netlab.DNS_SMALL_NAME, "A", "+short").stdout.strip() == \
        netlab.DNS_SMALL_A
    owners = {b["worker"] for b in lab.flows()["bindings"]
              if b["proto"] == "udp" and b["client"].startswith(f"[{lab.plan.peer_address}]")}
    assert len(owners) == 1, owners
    owner = owners.pop()
    before = workers_by_index(lab)
    assert sorted(before) == list(range(lab.workers)) and all(w["up"] for w in before.values())
    victim = int(before[owner]["pid"])
    assert_child_of(victim, gateway_pid)

    os.kill(victim, signal.SIGKILL)
    assert eventually(lambda: netlab.process_gone(victim), 5), f"worker pid {victim} still there"

    def restarted() -> dict[int, dict[str, Any]] | None:
        now = workers_by_index(lab)
        entry = now[owner]
        return now if entry.get("up") and entry.get("pid") not in (None, victim) else None

    after: dict[int, dict[str, Any]] | None = None
    deadline = time.monotonic() + WORKER_RESTART_WITHIN_S
    while after is None and time.monotonic() < deadline and lab.alive("sixgate"):
        after = restarted()
        time.sleep(0.1)
    assert after is not None, (f"worker {owner} not back within {WORKER_RESTART_WITHIN_S} s\n"
                               f"{lab.gateway_stderr()}")
    assert after[owner]["restarts"] == 1, after[owner]
    assert_child_of(int(after[owner]["pid"]), gateway_pid)
    assert len(after) == 4 and all(w["up"] for w in after.values()), after
    for index, entry in after.items():
        if index != owner:
            assert (entry["pid"], entry["restarts"]) == (before[index]["pid"], 0), entry
    assert sorted(lab.gateway_links()) == sorted(
        f"{lab.name}{i} (tun)" for i in range(lab.workers)), lab.gateway_links()

    assert_ping6_answered(lab)
    assert_http_small_file(lab)
    assert netlab.dig(lab, netlab.DNS_SMALL_NAME, "A", "+short").stdout.strip() == \
        netlab.DNS_SMALL_A
    served_by = {b["worker"] for b in lab.flows()["bindings"]
                 if b["client"].startswith(f"[{lab.plan.peer_address}]")}
    assert served_by == {owner}, served_by
    assert lab.alive("sixgate"), lab.gateway_stderr()
    assert netlab.drops(lab)["internal_error"] == 0


NO_IO_URING = [sys.executable, str(Path(__file__).with_name("no_io_uring.py"))]


@pytest.mark.parametrize("private_lab", [("6to4", 2, "kernel", NO_IO_URING)],
                         ids=["6to4-workers2-seccomp"], indirect=True)
def test_io_uring_refused_by_seccomp_workers_fall_back_to_write(private_lab: Lab) -> None:
    """Under a seccomp filter that refuses io_uring_setup(2) with EPERM, as Docker's default
    profile does, each worker says so and writes one packet per write(2) to the services;
    ping -6, curl -6 and dig all work, and no packet raised."""
    lab = private_lab
    log = lab.log_path("sixgate").read_text()
    for index in range(lab.workers):
        assert f"worker {index}: io_uring refused ([Errno 1]" in log, lab.gateway_stderr()
        assert f"worker {index}: packets to the device by write(2)" in log, log
    assert_ping6_answered(lab)
    assert_http_small_file(lab)
    assert netlab.dig(lab, netlab.DNS_SMALL_NAME, "A", "+short").stdout.strip() == \
        netlab.DNS_SMALL_A
    assert netlab.drops(lab)["internal_error"] == 0


AS_SERVICE_USER = [sys.executable, str(Path(__file__).with_name("as_service_user.py"))]


def capability_fields(pid: int) -> dict[str, str]:
    status_text = Path(f"/proc/{pid}/status").read_text()
    return {key: value.strip() for key, value in
            (line.split(":", 1) for line in status_text.splitlines() if ":" in line)}


@pytest.mark.parametrize("private_lab", [("6to4", 2, "kernel", AS_SERVICE_USER)],
                         ids=["6to4-workers2-as-nobody"], indirect=True)
def test_started_unprivileged_like_systemd_serves_restarts_workers_and_stops_cleanly(
        private_lab: Lab) -> None:
    """``sixgate run`` started as the deploy unit starts it (User=nobody with only ambient
    capabilities, tests/lab/as_service_user.py), never root: it sets up, serves ping -6 and
    curl -6, keeps no more than it was given, starts a SIGKILLed worker again (which needs
    the inherited capabilities) and on SIGTERM removes its nftables table, devices and files."""
    lab = private_lab
    gateway_pid = assert_is_our_gateway(lab)
    fields = capability_fields(gateway_pid)
    uid = str(pwd.getpwnam("nobody").pw_uid)
    assert fields["Uid"].split() == [uid] * 4, fields["Uid"]
    given = as_service_user.capability_mask()
    for capability_set in ("CapEff", "CapPrm", "CapAmb"):
        assert int(fields[capability_set], 16) == given, (capability_set, fields)
    assert fields["NoNewPrivs"] == "1"
    assert_ping6_answered(lab)
    assert_http_small_file(lab)

    before = workers_by_index(lab)
    for entry in before.values():
        worker = capability_fields(int(entry["pid"]))
        assert worker["Uid"].split() == [uid] * 4 and int(worker["CapEff"], 16) == 0, worker
        assert int(worker["CapAmb"], 16) == 0 and int(worker["CapPrm"], 16) == 0, worker
    victim = int(before[0]["pid"])
    assert_child_of(victim, gateway_pid)
    os.kill(victim, signal.SIGKILL)
    assert eventually(lambda: (lambda w: w.get("up") and w.get("pid") not in (None, victim))(
        workers_by_index(lab)[0]), WORKER_RESTART_WITHIN_S), lab.gateway_stderr()
    for _ in range(3):  # the restarted worker owns about half the flows: try a few
        assert_http_small_file(lab)
    assert_ping6_answered(lab)
    tables = lab.gw(["nft", "list", "tables"]).stdout
    assert "sixgate" in tables, tables

    gateway = lab.processes["sixgate"]
    os.kill(gateway_pid, signal.SIGTERM)
    exit_code = gateway.wait(STOP_WITHIN_S)
    lab.gateway_exit_code = exit_code
    assert exit_code == 0, lab.gateway_stderr()
    assert lab.gateway_links() == [], lab.gateway_stderr()
    assert leftover_runtime_files(lab) == [], lab.gateway_stderr()
    tables = lab.gw(["nft", "list", "tables"]).stdout
    assert "sixgate" not in tables, tables


@pytest.mark.parametrize("private_lab", [("6to4", 2)], ids=["6to4-workers2"], indirect=True)
def test_killed_coordinator_takes_workers_along_and_next_run_cleans_stale_run_dir(
        private_lab: Lab) -> None:
    """SIGKILL ``sixgate run`` itself: its workers die with it (PR_SET_PDEATHSIG) and their
    TUN devices vanish; the next ``sixgate run`` with the same config reports the stale run it
    cleans up, works, and stops with exit code 0 on SIGTERM leaving no device behind."""
    lab = private_lab
    first = lab.processes["sixgate"]
    gateway_pid = assert_is_our_gateway(lab)
    first_status = status(lab)
    assert first_status["pid"] == gateway_pid
    worker_pids = [int(w["pid"]) for w in first_status["workers"]]
    for pid in worker_pids:
        assert_child_of(pid, gateway_pid)
    assert len(lab.gateway_links()) == lab.workers

    os.kill(gateway_pid, signal.SIGKILL)
    first.wait(5)
    assert eventually(lambda: all(netlab.process_gone(p) for p in worker_pids),
                      DIE_WITH_PARENT_WITHIN_S), \
        [p for p in worker_pids if not netlab.process_gone(p)]
    assert eventually(lambda: not lab.gateway_links(), DIE_WITH_PARENT_WITHIN_S), \
        lab.gateway_links()

    lab.start_gateway(key="sixgate-again")
    again = lab.processes["sixgate-again"]
    stderr = lab.gateway_stderr("sixgate-again")
    assert f"cleaning up after a stale run (pid {gateway_pid})" in stderr, stderr
    second_status = status(lab)
    assert second_status["pid"] == again.pid
    assert [w["up"] for w in second_status["workers"]] == [True] * lab.workers
    assert not {int(w["pid"]) for w in second_status["workers"]} & set(worker_pids)
    assert_ping6_answered(lab)
    assert_http_small_file(lab)

    exit_code = netlab.stop_process(again, STOP_WITHIN_S)
    assert exit_code == 0, lab.gateway_stderr("sixgate-again")
    assert lab.gateway_links() == []
    assert leftover_runtime_files(lab) == []


@pytest.mark.parametrize("private_lab", [("6in4", 2)], ids=["6in4-workers2"], indirect=True)
def test_second_run_with_same_run_dir_refused_naming_first_pid(private_lab: Lab) -> None:
    """A second ``sixgate run`` with the first one's run_dir exits 1 and names the PID that
    holds it; the first gateway keeps its run directory, its devices and keeps answering.
    The refused run never had workers, so it must not report the first gateway's TUN devices
    as its own leftovers (an operator would delete them and break the running gateway)."""
    lab = private_lab
    gateway_pid = assert_is_our_gateway(lab)
    second = lab.spawn("sixgate-second", lab.gw_ns, [
        *netlab.sixgate_command(), "run", "--config", str(lab.config_path)])
    try:
        exit_code = second.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the second sixgate run still runs after 20 s:\n"
                    f"{lab.gateway_stderr('sixgate-second')}")
    stderr = lab.gateway_stderr("sixgate-second")
    assert exit_code == 1, stderr
    assert re.search(rf"\bpid {gateway_pid}\b", stderr), stderr

    assert lab.alive("sixgate"), lab.gateway_stderr()
    assert status(lab)["pid"] == gateway_pid
    assert (run_dir(lab) / "coordinator.pid").read_text().strip() == str(gateway_pid)
    assert all(w["up"] for w in status(lab)["workers"])
    assert len(lab.gateway_links()) == lab.workers, lab.gateway_links()
    assert_ping6_answered(lab)
    assert_http_small_file(lab)
    claimed = [f"{lab.name}{i}" for i in range(lab.workers)
               if re.search(rf"TUN device {lab.name}{i} still exists", stderr)]
    assert not claimed, ("the refused run warns that the running gateway's TUN devices "
                         f"{claimed} were left behind by its own workers:\n{stderr}")


@pytest.mark.parametrize("private_lab", [("6to4", 2)], ids=["6to4-workers2"], indirect=True)
def test_sigint_stops_gateway_cleanly(private_lab: Lab) -> None:
    """Ctrl-C (SIGINT to ``sixgate run``) is a clean stop like SIGTERM: exit code 0, workers
    gone, no TUN device left, the run directory's sockets and pidfiles removed."""
    lab = private_lab
    gateway = lab.processes["sixgate"]
    gateway_pid = assert_is_our_gateway(lab)
    worker_pids = [int(w["pid"]) for w in status(lab)["workers"]]
    assert leftover_runtime_files(lab), "no sockets/pidfiles while running: nothing to check"

    os.kill(gateway_pid, signal.SIGINT)
    try:
        exit_code = gateway.wait(STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sixgate run still runs {STOP_WITHIN_S} s after SIGINT:\n"
                    f"{lab.gateway_stderr()}")
    lab.gateway_exit_code = exit_code
    assert exit_code == 0, lab.gateway_stderr()
    assert all(netlab.process_gone(p) for p in worker_pids), worker_pids
    assert lab.gateway_links() == [], lab.gateway_stderr()
    assert leftover_runtime_files(lab) == [], lab.gateway_stderr()


@pytest.mark.parametrize("mode", ["6to4", "6in4"])
def test_rfc7915_5_2_path_mtu_below_tunnel_mtu_download_completes(
        mode: str, served_files: netlab.ServedFiles) -> None:
    """A router on the client's path has a 1280-byte next hop, smaller than the 1480-byte
    tunnel: it answers the gateway's full-size segments with ICMPv6 Packet Too Big. The
    gateway must translate them to ICMPv4 "fragmentation needed" for the service (RFC 7915
    §5.2), whose TCP then sends smaller segments; without that, the download would stall in a
    path-MTU black hole. curl fetches the 10 MB file intact."""
    with netlab.Lab(mode, 1, served_files, path_mtu=1280) as lab:
        got = netlab.download(lab, netlab.http_url(lab, served_files.mid.name), max_time_s=60)
        assert got.exit_code == 0, f"{got.stderr}\n{lab.diagnostics()}"
        assert got.sha256 == served_files.mid.sha256
        flows = lab.flows()
        events = flows["counters"]["workers"][0]["counters"]["events"]
        assert events.get("icmp_errors_translated", 0) >= 1, events
        assert netlab.drops(lab)["internal_error"] == 0
        assert lab.stop_gateway() == 0
