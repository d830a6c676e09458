"""Issue 17: no connection lost when a worker crashes. The real ``sixgate run`` in a lab of its
own per combination (6to4 and 6in4, kernel and coordinator fan-out, four workers): a real
``curl -6`` of the 100 MB file, rate-limited so it runs for seconds, goes on while the worker
that owns it is SIGKILLed twice; the coordinator starts it again with the sessions of its shard
(workers/journal.py), so the download completes byte-identical and a real SSH session (Debian's
ssh and sshd, behind a port-22 rule) prints every line. A UDP binding keeps its pool transport
address (what the service sees) across the restarts, and ``sixgate flows`` shows the same
bindings before and after. Last, a restart of the whole gateway (SIGTERM, a new ``sixgate run``)
keeps them too, and so does a crash of the coordinator (SIGKILL, then a new ``sixgate run``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netlab
import pytest
from netlab import Lab

pytestmark = pytest.mark.lab

RESTART_WITHIN_S = 15.0
RATE = "20M"  # bytes/s: the 100 MB download lasts 5 s unhindered; each crash stalls it
DNS_CLIENT_PORT = 45353


SSH_PORT = 22  # the forward rule's port; Debian's sshd listens on 127.0.0.1:SSHD_PORT
SSHD_PORT = 2222
SSHD = "/usr/sbin/sshd"


class SshLab(Lab):
    """The tunnel lab with a real sshd behind the gateway (a forward rule of port 22)."""

    def config_text(self) -> str:
        return super().config_text() + (
            f'\n[[forward]]\nproto = "tcp"\nport = {SSH_PORT}\nto = "127.0.0.1:{SSHD_PORT}"\n')

    def start_services(self) -> None:
        super().start_services()
        self.ssh_key = self.tmp / "id_ed25519"
        self.known_hosts = self.tmp / "known_hosts"
        host_key = self.tmp / "ssh_host_ed25519_key"
        for key in (self.ssh_key, host_key):
            netlab.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
        public = host_key.with_suffix(".pub").read_text().split()
        self.known_hosts.write_text(f"{self.plan.gateway_address} {public[0]} {public[1]}\n")
        (self.tmp / "authorized_keys").write_text(self.ssh_key.with_suffix(".pub").read_text())
        config = self.tmp / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1:{SSHD_PORT}\nHostKey {host_key}\n"
            f"PidFile {self.tmp / 'sshd.pid'}\nAuthorizedKeysFile {self.tmp / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n")
        # A private /run in the mount namespace ``ip netns exec`` made: the host's is untouched.
        script = ("mount -t tmpfs -o mode=0755,size=16m sixgate-lab-run /run"
                  ' && mkdir -m 0755 /run/sshd && exec "$0" -D -e -f "$1"')
        self.spawn("sshd", self.gw_ns, ["sh", "-c", script, SSHD, str(config)])
        self.wait_listening("sshd", "-t", SSHD_PORT)

    def ssh_argv(self, command: str) -> list[str]:
        """A real ``ssh -6`` to the gateway's port 22, trusting only the lab's keys."""
        return ["ssh", "-6", "-F", "/dev/null", "-i", str(self.ssh_key), "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o",
                "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10", "-p", str(SSH_PORT),
                f"root@{self.plan.gateway_address}", command]


@pytest.fixture(params=[("6to4", "kernel"), ("6to4", "coordinator"), ("6in4", "kernel"),
                        ("6in4", "coordinator")], ids=lambda p: f"{p[0]}-{p[1]}-fanout")
def crash_lab(request: pytest.FixtureRequest,
              served_files: netlab.ServedFiles) -> Iterator[SshLab]:
    mode, fanout = request.param
    with SshLab(mode, 4, served_files, fanout=fanout) as lab:
        yield lab


def bindings(lab: Lab) -> list[dict[str, Any]]:
    return list(lab.flows()["bindings"])


def workers(lab: Lab) -> dict[int, dict[str, Any]]:
    return {int(w["index"]): w for w in lab.flows()["counters"]["workers"]}


def dig_from_fixed_port(lab: Lab) -> str:
    """A DNS query through the gateway from one client transport address: the answer."""
    done = lab.peer(["dig", "-6", f"@{lab.plan.gateway_address}", "-p", "53", "-b",
                     f"{lab.plan.peer_address}#{DNS_CLIENT_PORT}", "+tries=1", "+time=3",
                     "+short", netlab.DNS_SMALL_NAME, "A"], timeout=20)
    return done.stdout.strip()


HTTP_TARGET = f"127.0.0.1:{netlab.HTTP_PORT}"
SSH_TARGET = f"127.0.0.1:{SSHD_PORT}"


# What makes a binding the same session (``idle_s`` and ``state`` move while it is in use).
SESSION_KEYS = ("client", "pool", "target", "worker", "rule")


def session_of(binding: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if binding is None else {k: binding[k] for k in SESSION_KEYS}


def binding_of(lab: Lab, proto: str, client_port: int | None = None,
               target: str | None = None) -> dict[str, Any] | None:
    for binding in bindings(lab):
        if binding["proto"] != proto or not binding["client"].startswith(
                f"[{lab.plan.peer_address}]"):
            continue
        if client_port is not None and not binding["client"].endswith(f"]:{client_port}"):
            continue
        if target is None or binding["target"] == target:
            return binding
    return None


def kill_and_wait_restart(lab: Lab, index: int) -> None:
    """SIGKILL worker ``index`` (checked to be the gateway's child), wait for its successor."""
    gateway_pid = lab.processes["sixgate"].pid
    victim = int(workers(lab)[index]["pid"])
    state = netlab.process_state(victim)
    assert state is not None and state[1] == gateway_pid, (victim, state)
    assert "sixgate.workers.main" in netlab.process_cmdline(victim)
    os.kill(victim, signal.SIGKILL)

    def back() -> bool:
        entry = workers(lab)[index]
        return bool(entry.get("up")) and entry.get("pid") not in (None, victim)

    netlab.wait_until(back, timeout=RESTART_WITHIN_S, what=f"worker {index} restarted",
                      interval=0.1)


def test_a_download_an_ssh_session_and_a_udp_binding_survive_two_worker_crashes(
        crash_lab: SshLab, served_files: netlab.ServedFiles) -> None:
    lab = crash_lab
    answer = dig_from_fixed_port(lab)
    assert answer == netlab.DNS_SMALL_A
    udp_before = binding_of(lab, "udp", DNS_CLIENT_PORT)
    assert udp_before is not None, bindings(lab)

    big = served_files.big
    curl = subprocess.Popen(netlab.in_ns(lab.peer_ns, [
        "bash", "-c", "set -o pipefail; curl -6 -g -sS --fail --max-time 120 --limit-rate "
        f"{RATE} {netlab.http_url(lab, big.name)} | sha256sum"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # An SSH session (Debian's ssh and sshd) printing a line every 0.25 s while it lasts.
    ssh = subprocess.Popen(netlab.in_ns(lab.peer_ns, lab.ssh_argv(
        "for i in $(seq 1 28); do echo line $i; sleep 0.25; done")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        netlab.wait_until(lambda: binding_of(lab, "tcp", None, HTTP_TARGET) is not None
                          and binding_of(lab, "tcp", None, SSH_TARGET) is not None,
                          timeout=10, what="the download's and the SSH session's sessions")
        tcp_before = binding_of(lab, "tcp", None, HTTP_TARGET)
        ssh_before = binding_of(lab, "tcp", None, SSH_TARGET)
        assert tcp_before is not None and ssh_before is not None
        owner = int(tcp_before["worker"])
        assert int(ssh_before["worker"]) == owner  # one client /64, one worker
        time.sleep(0.5)  # the download is under way: some of the file has crossed
        for _ in range(2):
            kill_and_wait_restart(lab, owner)
            time.sleep(0.5)
        for before in (tcp_before, ssh_before):
            after = binding_of(lab, "tcp", None, before["target"])
            assert after is not None, bindings(lab)
            # The same session: same client and pool transport addresses, on the same worker.
            assert session_of(after) == session_of(before)
        stdout, stderr = curl.communicate(timeout=150)
        ssh_out, ssh_err = ssh.communicate(timeout=60)
    finally:
        for process in (curl, ssh):
            if process.poll() is None:
                netlab.stop_process(process, 5)
    assert curl.returncode == 0, stderr
    assert stdout.split()[0] == big.sha256, "the download arrived damaged"
    assert ssh.returncode == 0, ssh_err
    assert ssh_out.split("\n")[:28] == [f"line {i}" for i in range(1, 29)], ssh_out

    assert dig_from_fixed_port(lab) == netlab.DNS_SMALL_A
    udp_after = binding_of(lab, "udp", DNS_CLIENT_PORT)
    assert udp_after is not None and udp_after["pool"] == udp_before["pool"], (udp_before,
                                                                             udp_after)
    entry = workers(lab)[owner]
    assert entry["restarts"] == 2, entry
    assert entry["counters"]["events"].get("flows_resumed", 0) >= 1, entry["counters"]["events"]
    body = lab.gw(["curl", "-sf", "http://127.0.0.1:9641/metrics"]).stdout
    resumed = re.search(rf'^sixgate_flows_resumed_total{{process="worker-{owner}"}} (\S+)$', body,
                        re.MULTILINE)
    assert resumed and float(resumed.group(1)) >= 1, body[:2000]
    assert "gets its shard of" in lab.gateway_stderr() or "gets its shard of" in \
        lab.log_path("sixgate").read_text()
    assert netlab.drops(lab)["internal_error"] == 0


@pytest.fixture
def restart_lab(served_files: netlab.ServedFiles) -> Iterator[Lab]:
    with Lab("6to4", 2, served_files, fanout="kernel") as lab:
        yield lab


def test_a_download_survives_a_restart_of_the_whole_gateway(
        restart_lab: Lab, served_files: netlab.ServedFiles) -> None:
    """SIGTERM ``sixgate run`` mid-download and start it again (what a restart, an upgrade or
    a deploy does): the stopping run hands its sessions over in the run directory, the next
    one resumes them with the same fan-out, and the download completes byte-identical on the
    same binding; the UDP binding keeps its pool transport address."""
    lab = restart_lab
    assert dig_from_fixed_port(lab) == netlab.DNS_SMALL_A
    udp_before = binding_of(lab, "udp", DNS_CLIENT_PORT)
    big = served_files.big
    curl = subprocess.Popen(netlab.in_ns(lab.peer_ns, [
        "bash", "-c", "set -o pipefail; curl -6 -g -sS --fail --max-time 120 --limit-rate "
        f"{RATE} {netlab.http_url(lab, big.name)} | sha256sum"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        netlab.wait_until(lambda: binding_of(lab, "tcp") is not None, timeout=10,
                          what="the download's session")
        tcp_before = binding_of(lab, "tcp")
        time.sleep(0.5)
        assert lab.stop_gateway(timeout=15) == 0, lab.gateway_stderr()
        assert "handed over to the next run" in lab.log_path("sixgate").read_text()
        lab.start_gateway(key="sixgate-next")
        log = lab.log_path("sixgate-next").read_text()
        assert re.search(r"resuming [1-9]\d* session\(s\) handed over", log), log
        tcp_after = binding_of(lab, "tcp")
        assert tcp_after is not None and tcp_before is not None
        assert session_of(tcp_after) == session_of(tcp_before)
        stdout, stderr = curl.communicate(timeout=150)
    finally:
        if curl.poll() is None:
            netlab.stop_process(curl, 5)
    assert curl.returncode == 0, stderr
    assert stdout.split()[0] == big.sha256, "the download arrived damaged"
    assert dig_from_fixed_port(lab) == netlab.DNS_SMALL_A
    udp_after = binding_of(lab, "udp", DNS_CLIENT_PORT)
    assert udp_before is not None and udp_after is not None
    assert udp_after["pool"] == udp_before["pool"], (udp_before, udp_after)


def test_a_download_survives_a_take_over_by_a_new_run(
        restart_lab: Lab, served_files: netlab.ServedFiles) -> None:
    """``sixgate run --take-over`` (an upgrade's or a restart's way with less outage): the
    new run's workers start and load beside the running gateway, which is then stopped and
    hands its sessions over; the waiting workers become the new run's (their pids), the
    sessions are resumed, the download completes byte-identical on the same binding. The
    longest gap of 20 ms pings to the gateway is printed (a figure, not asserted)."""
    lab = restart_lab
    big = served_files.big
    curl = subprocess.Popen(netlab.in_ns(lab.peer_ns, [
        "bash", "-c", "set -o pipefail; curl -6 -g -sS --fail --max-time 120 --limit-rate "
        f"{RATE} {netlab.http_url(lab, big.name)} | sha256sum"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ping = subprocess.Popen(netlab.in_ns(lab.peer_ns, [
        "ping", "-6", "-n", "-i", "0.02", "-c", "300", "-W", "1", lab.plan.gateway_address]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        netlab.wait_until(lambda: binding_of(lab, "tcp") is not None, timeout=10,
                          what="the download's session")
        tcp_before = binding_of(lab, "tcp")
        # A plain second run is refused, naming the way, and the first goes on.
        second = lab.gw([*netlab.sixgate_command(), "run", "--config", str(lab.config_path)],
                        timeout=60)
        assert second.returncode == 1 and "--take-over" in second.stderr, second.stderr
        assert lab.alive("sixgate") and session_of(binding_of(lab, "tcp")) == session_of(tcp_before)
        time.sleep(0.5)
        devices_before = worker_devices(lab)
        assert len(devices_before) == lab.workers, devices_before
        old = lab.processes["sixgate"]
        lab.spawn("next", lab.gw_ns, [*netlab.sixgate_command(), "run", "--take-over",
                                      "--config", str(lab.config_path)])
        new = lab.processes["next"]
        ready: list[int] = []

        def standing_by() -> bool:
            if "take-over: this run's" not in lab.log_path("next").read_text():
                return False
            # The new coordinator's children now: its workers, loaded, waiting.
            ready[:] = sorted(int(pid) for pid in Path(
                f"/proc/{new.pid}/task/{new.pid}/children").read_text().split())
            return True

        netlab.wait_until(standing_by, timeout=30, what="the new run's workers ready",
                          interval=0.02)
        assert old.wait(timeout=30) == 0, lab.gateway_stderr()
        netlab.wait_until(lambda: lab.sixgate("flows", "--json").returncode == 0, timeout=30,
                          what="the new run's `sixgate flows`")
        log = lab.log_path("next").read_text()
        assert re.search(r"resuming [1-9]\d* session\(s\) handed over", log), log
        pids = sorted(int((lab.tmp / "run" / f"worker-{i}.pid").read_text())
                      for i in range(lab.workers))
        assert pids == ready, (pids, ready, log)  # the waiting workers, not new ones
        # The old workers kept their TUN devices (with their routes) for the new ones: the
        # same devices, not deleted and made again in the middle of the take-over.
        assert worker_devices(lab) == devices_before, (worker_devices(lab), devices_before)
        assert log.count("kept by the previous run, taken over") == lab.workers, log
        assert "persist on" not in lab.gw(["ip", "-d", "link", "show", "type", "tun"]).stdout
        tcp_after = binding_of(lab, "tcp")
        assert tcp_after is not None and tcp_before is not None
        assert session_of(tcp_after) == session_of(tcp_before)
        stdout, stderr = curl.communicate(timeout=150)
        pings, _ = ping.communicate(timeout=30)
    finally:
        for process in (curl, ping):
            if process.poll() is None:
                netlab.stop_process(process, 5)
    assert curl.returncode == 0, stderr
    assert stdout.split()[0] == big.sha256, "the download arrived damaged"
    seqs = sorted(int(n) for n in re.findall(r"icmp_seq=(\d+)", pings))
    gap = max([(b - a - 1) * 20 for a, b in zip(seqs, seqs[1:], strict=False)] or [0])
    print(f"\ntake-over: longest gap of the 20 ms pings {gap} ms "
          f"({len(seqs)} of 300 answered)")


def worker_devices(lab: Lab) -> dict[str, int]:
    """The gateway's TUN devices by name: their interface index."""
    return {link["ifname"]: link["ifindex"] for link in lab.links(lab.gw_ns)
            if link["ifname"].startswith(lab.name)
            and link.get("linkinfo", {}).get("info_kind") == "tun"}


HOLD_IDLE = """
import socket, sys
sock = socket.create_connection((sys.argv[1], 80), timeout=10)
print("connected", flush=True)
sys.stdin.readline()  # idle until told
sock.sendall(b"GET /" + sys.argv[2].encode() + b" HTTP/1.0\\r\\n\\r\\n")
data = b""
while chunk := sock.recv(65536):
    data += chunk
print(data.split(b"\\r\\n\\r\\n", 1)[-1].decode(errors="replace"), flush=True)
"""


def test_a_run_with_another_mode_between_leaves_the_sessions_for_the_next(
        restart_lab: Lab) -> None:
    """A deploy rolls a config back: the gateway is stopped, started with another tunnel mode
    (6in4: its workers cannot own 6to4 sessions), stopped, started with the first config. The
    run between sets the first run's handover aside instead of dropping it, so the last run
    resumes it: an idle TCP connection held through all three gets its answer, and the UDP
    binding keeps its pool transport address."""
    lab = restart_lab
    assert dig_from_fixed_port(lab) == netlab.DNS_SMALL_A
    udp_before = binding_of(lab, "udp", DNS_CLIENT_PORT)
    hold = subprocess.Popen(netlab.in_ns(lab.peer_ns, [
        sys.executable, "-c", HOLD_IDLE, lab.plan.gateway_address, netlab.SMALL_NAME]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = lab.config_path.read_text()
    try:
        assert hold.stdout is not None and hold.stdout.readline().strip() == "connected"
        netlab.wait_until(lambda: binding_of(lab, "tcp") is not None, timeout=10,
                          what="the held connection's session")
        time.sleep(0.5)  # past the workers' journal interval
        assert lab.stop_gateway(timeout=15) == 0, lab.gateway_stderr()
        lab.config_path.write_text(first.replace(lab.plan.tunnel_toml,
                                                 netlab.PLANS["6in4"].tunnel_toml))
        lab.start_gateway(key="sixgate-6in4")
        between = lab.log_path("sixgate-6in4").read_text()
        assert "set aside for a run with its settings" in between, between
        assert netlab.stop_process(lab.processes.pop("sixgate-6in4"), 15) == 0
        lab.config_path.write_text(first)
        lab.start_gateway(key="sixgate-again")
        log = lab.log_path("sixgate-again").read_text()
        assert re.search(r"resuming [1-9]\d* session\(s\) handed over by an earlier run",
                         log), log
        assert hold.stdin is not None
        hold.stdin.write("go\n")
        hold.stdin.flush()
        stdout, stderr = hold.communicate(timeout=30)
    finally:
        lab.config_path.write_text(first)
        if hold.poll() is None:
            netlab.stop_process(hold, 5)
    assert hold.returncode == 0 and stdout.strip() == netlab.SMALL_TEXT.strip(), stderr
    assert dig_from_fixed_port(lab) == netlab.DNS_SMALL_A
    udp_after = binding_of(lab, "udp", DNS_CLIENT_PORT)
    assert udp_before is not None and udp_after is not None
    assert udp_after["pool"] == udp_before["pool"], (udp_before, udp_after)


def device_routes(lab: Lab, device: str) -> set[str]:
    """The IPv4 routes to ``device`` in the main table (its pool slice)."""
    return {line.split()[0] for line in lab.gw(["ip", "-4", "route", "show", "dev", device]
                                               ).stdout.splitlines() if line.strip()}


def test_devices_kept_for_a_next_run_are_taken_with_their_routes_put_right(
        restart_lab: Lab) -> None:
    """A run told to stop for a take-over (SIGUSR2, what ``sixgate run --take-over`` sends)
    keeps its TUN devices, persistent, with their routes. Here no new run takes them at once
    (as when a take-over fails before its workers start): the next start takes them (the same
    devices), puts their routes right for its own settings (a smaller pool here: other
    slices) and serves through them; its stop leaves no device behind."""
    lab = restart_lab
    before = worker_devices(lab)
    old_routes = {name: device_routes(lab, name) for name in before}
    assert all(old_routes.values()), old_routes
    os.kill(lab.processes["sixgate"].pid, signal.SIGUSR2)
    assert lab.processes["sixgate"].wait(timeout=15) == 0, lab.gateway_stderr()
    details = lab.gw(["ip", "-d", "link", "show", "type", "tun"]).stdout
    assert details.count("persist on") == lab.workers, details
    assert {name: device_routes(lab, name) for name in before} == old_routes
    first = lab.config_path.read_text()
    try:
        lab.config_path.write_text(first.replace("[gateway]\n",
                                                 '[gateway]\npool = "100.64.0.0/17"\n'))
        lab.start_gateway(key="sixgate-next")
        log = lab.log_path("sixgate-next").read_text()
        assert log.count("kept by the previous run, taken over") == lab.workers, log
        assert worker_devices(lab) == before
        assert "persist on" not in lab.gw(["ip", "-d", "link", "show", "type", "tun"]).stdout
        new_routes = {name: device_routes(lab, name) for name in before}
        assert new_routes == {f"{lab.name}0": {"100.64.0.0/18"},
                              f"{lab.name}1": {"100.64.64.0/18"}}, new_routes
        got = netlab.download(lab, netlab.http_url(lab, netlab.SMALL_NAME))
        assert got.exit_code == 0, got.stderr
        assert netlab.stop_process(lab.processes.pop("sixgate-next"), 15) == 0
    finally:
        lab.config_path.write_text(first)
    assert lab.gateway_links() == [], lab.gateway_links()


def test_a_take_over_by_fewer_workers_removes_the_devices_no_one_takes(
        restart_lab: Lab) -> None:
    """A take-over by a run with one worker where two ran: worker 0's device is taken over,
    the one worker 1 kept is removed once the new run's workers are up (no persistent device
    left behind), and the new run serves."""
    lab = restart_lab
    before = worker_devices(lab)
    first = lab.config_path.read_text()
    try:
        lab.config_path.write_text(first.replace("workers = 2\n", "workers = 1\n"))
        lab.spawn("fewer", lab.gw_ns, [*netlab.sixgate_command(), "run", "--take-over",
                                       "--config", str(lab.config_path)])
        assert lab.processes["sixgate"].wait(timeout=30) == 0, lab.gateway_stderr()
        netlab.wait_until(lambda: "sixgate up" in lab.log_path("fewer").read_text(),
                          timeout=30, what="the new run up")
        log = lab.log_path("fewer").read_text()
        assert f"removing device(s) {lab.name}1 kept for a next run" in log, log
        assert worker_devices(lab) == {f"{lab.name}0": before[f"{lab.name}0"]}
        assert "persist on" not in lab.gw(["ip", "-d", "link", "show", "type", "tun"]).stdout
        got = netlab.download(lab, netlab.http_url(lab, netlab.SMALL_NAME))
        assert got.exit_code == 0, got.stderr
        assert netlab.stop_process(lab.processes.pop("fewer"), 15) == 0
    finally:
        lab.config_path.write_text(first)
    assert lab.gateway_links() == [], lab.gateway_links()


SHARDS = 6


@pytest.fixture(params=["kernel", "coordinator"])
def sharded_lab(request: pytest.FixtureRequest,
                served_files: netlab.ServedFiles) -> Iterator[Lab]:
    with Lab("6to4", 2, served_files, fanout=request.param,
             gateway_toml=f"shards = {SHARDS}\n") as lab:
        yield lab


def pools_and_workers(lab: Lab, clients: list[str]) -> dict[str, tuple[str, int]]:
    """Each client's UDP binding: (pool transport address, worker)."""
    found = {}
    for binding in bindings(lab):
        address = binding["client"][1:].split("]")[0]
        if binding["proto"] == "udp" and address in clients:
            found[address] = (binding["pool"], int(binding["worker"]))
    return found


def test_a_take_over_to_another_worker_count_keeps_every_session_by_shard(
        sharded_lab: Lab, served_files: netlab.ServedFiles) -> None:
    """Issue 17, the worker count: with ``[gateway] shards = 6`` a plain reload of another
    worker count is refused, saying a take-over keeps every session; the take-over (what
    ``systemctl reload`` runs) from 2 workers to 3, then back to 2, hands each session to the
    worker of its shard (shard s in worker s mod N, the shard named by the pool address): a
    rate-limited download completes byte-identical on its binding, and 16 clients in 16 /64s
    keep their UDP pool addresses and are served by the worker their shard names."""
    lab = sharded_lab
    clients = lab.plan.extra_clients()
    assert netlab.fixed_port_queries(lab, clients, lab.plan.gateway_address,
                                     DNS_CLIENT_PORT) == len(clients)
    first = pools_and_workers(lab, clients)
    assert len(first) == len(clients), first
    assert len({worker for _, worker in first.values()}) == 2, first
    big = served_files.big
    curl = subprocess.Popen(netlab.in_ns(lab.peer_ns, [
        "bash", "-c", "set -o pipefail; curl -6 -g -sS --fail --max-time 120 --limit-rate "
        f"{RATE} {netlab.http_url(lab, big.name)} | sha256sum"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    original = lab.config_path.read_text()
    try:
        netlab.wait_until(lambda: binding_of(lab, "tcp") is not None, timeout=10,
                          what="the download's session")
        tcp_before = binding_of(lab, "tcp")
        lab.config_path.write_text(original.replace("workers = 2\n", "workers = 3\n"))
        refused = lab.sixgate("reload")
        assert refused.returncode == 2 and "keeps every session" in refused.stderr, (
            refused.stdout + refused.stderr)
        previous = "sixgate"
        for workers, key in ((3, "more"), (2, "fewer")):
            lab.config_path.write_text(original.replace("workers = 2\n",
                                                        f"workers = {workers}\n"))
            lab.spawn(key, lab.gw_ns, [*netlab.sixgate_command(), "run", "--take-over",
                                       "--config", str(lab.config_path)])
            assert lab.processes[previous].wait(timeout=60) == 0, lab.gateway_stderr(previous)
            previous = key
            netlab.wait_until(lambda key=key: "sixgate up" in lab.log_path(key).read_text(),
                              timeout=30, what=f"the run of {workers} workers up")
            log = lab.log_path(key).read_text()
            assert f"worker(s) to {workers}, by shard" in log, log
            tcp_after = binding_of(lab, "tcp")
            assert tcp_after is not None and tcp_before is not None
            assert {k: v for k, v in tcp_after.items() if k in SESSION_KEYS[:2]} == {
                k: v for k, v in tcp_before.items() if k in SESSION_KEYS[:2]}
            now = pools_and_workers(lab, clients)
            assert {c: pool for c, (pool, _) in now.items()} == {
                c: pool for c, (pool, _) in first.items()}, (first, now)
            for pool, worker in now.values():
                assert shard_of_pool(pool) % workers == worker, (pool, worker, now)
            assert netlab.fixed_port_queries(lab, clients, lab.plan.gateway_address,
                                     DNS_CLIENT_PORT) == len(clients)
            assert pools_and_workers(lab, clients) == now  # the same bindings served them
        stdout, stderr = curl.communicate(timeout=150)
    finally:
        lab.config_path.write_text(original)
        if curl.poll() is None:
            netlab.stop_process(curl, 5)
    assert curl.returncode == 0, stderr
    assert stdout.split()[0] == big.sha256, "the download arrived damaged"
    assert netlab.stop_process(lab.processes.pop("fewer"), 15) == 0
    assert lab.gateway_links() == [], lab.gateway_links()


def shard_of_pool(pool: str) -> int:
    """The shard of a pool address in the lab's default pool 100.64.0.0/16, cut in SHARDS
    slices (written out here, not the engine's function)."""
    address = int.from_bytes(bytes(int(x) for x in pool.split(":")[0].split(".")), "big")
    per = (1 << 16) // SHARDS
    return min((address - 0x64400000) // per, SHARDS - 1)


def _gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it holds no socket or device any more)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_download_survives_a_crash_of_the_coordinator(
        restart_lab: Lab, served_files: netlab.ServedFiles) -> None:
    """SIGKILL the coordinator mid-download: its workers die with it (PDEATHSIG), and the new
    ``sixgate run`` (what systemd's Restart=on-failure starts a second later) finds the session
    log the crashed one kept in the run directory (workers/journal.py ``CrashLog``), resumes
    every session with the same fan-out, and the download completes byte-identical on the
    same binding; the UDP binding keeps its pool transport address."""
    lab = restart_lab
    assert dig_from_fixed_port(lab) == netlab.DNS_SMALL_A
    udp_before = binding_of(lab, "udp", DNS_CLIENT_PORT)
    big = served_files.big
    curl = subprocess.Popen(netlab.in_ns(lab.peer_ns, [
        "bash", "-c", "set -o pipefail; curl -6 -g -sS --fail --max-time 120 --limit-rate "
        f"{RATE} {netlab.http_url(lab, big.name)} | sha256sum"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        netlab.wait_until(lambda: binding_of(lab, "tcp") is not None, timeout=10,
                          what="the download's session")
        tcp_before = binding_of(lab, "tcp")
        time.sleep(0.5)
        workers = [int(path.read_text()) for path in (lab.tmp / "run").glob("worker-*.pid")]
        assert len(workers) == 2, workers
        coordinator = lab.processes["sixgate"]
        os.kill(coordinator.pid, signal.SIGKILL)
        coordinator.wait(timeout=10)
        netlab.wait_until(lambda: all(_gone(pid) for pid in workers), timeout=10,
                          what="the workers to die with their coordinator")
        time.sleep(1.0)  # systemd's RestartSec
        lab.start_gateway(key="sixgate-next")
        log = lab.log_path("sixgate-next").read_text()
        assert re.search(r"resuming [1-9]\d* session\(s\) the previous run had when it "
                         r"crashed", log), log
        tcp_after = binding_of(lab, "tcp")
        assert tcp_after is not None and tcp_before is not None
        assert session_of(tcp_after) == session_of(tcp_before)
        stdout, stderr = curl.communicate(timeout=150)
    finally:
        if curl.poll() is None:
            netlab.stop_process(curl, 5)
    assert curl.returncode == 0, stderr
    assert stdout.split()[0] == big.sha256, "the download arrived damaged"
    assert dig_from_fixed_port(lab) == netlab.DNS_SMALL_A
    udp_after = binding_of(lab, "udp", DNS_CLIENT_PORT)
    assert udp_before is not None and udp_after is not None
    assert udp_after["pool"] == udp_before["pool"], (udp_before, udp_after)
