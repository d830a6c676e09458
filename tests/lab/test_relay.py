"""The kernel backend's relays (workers/relay.py), on this host, without sit.

The VM tests (tests/kvm) prove the whole kernel backend on a kernel with sit. Here the worker
process runs the relays alone, exactly as ``sixgate run`` starts it with the kernel backend
(``python -m sixgate.workers.main --settings FILE --index 0``), in a namespace whose
loopback carries the gateway's IPv6 address, so the relay rules that need no tunnel are
checked in every run: TCP and UDP relaying to IPv4-only services, the per /64 flow limit (RFC
6888 REQ-4) counted and never evicting, sessions listed over the control socket, clean SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netlab
import pytest
import zmq

from sixgate.coordinator.config import parse_config
from sixgate.workers import control

pytestmark = pytest.mark.lab

GATEWAY6 = "2001:db8:1::1"
POOL = "100.64.0.0/16"  # the default [gateway] pool
CONFIG = """\
[tunnel]
mode = "6in4"
local_ipv4 = "192.0.2.10"
remote_ipv4 = "198.51.100.1"
prefix = "2001:db8:1::/64"

[gateway]
workers = 1
pool = "{pool}"
max_flows = 5000
max_flows_per_prefix = 2
run_dir = "{run_dir}"

[[forward]]
proto = "tcp"
port = 80
to = "127.0.0.1:{http_port}"

[[forward]]
proto = "udp"
port = 53
to = "127.0.0.1:{dns_port}"

[[forward]]
proto = "tcp"
port = 81
to = "127.0.0.1:{http_port}"
from = ["2001:db8:ffff::/48"]

[[forward]]
proto = "tcp"
port = 82
to = "127.0.0.1:{http_port}"
from = ["2001:db8:ffff::/48", "2001:db8:1::/64"]
"""


@dataclasses.dataclass
class RelayLab:
    namespace: str
    run_dir: Path
    worker: subprocess.Popen[bytes]
    log: Path

    def exec(self, argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.namespace, *argv],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def ask(self, cmd: str) -> dict[str, Any]:
        return ask_worker(self.run_dir, cmd, self.log)

    def start_worker(self, settings_text: str, directory: Path) -> tuple[
            subprocess.Popen[bytes], Path]:
        """A relay worker of ``settings_text`` (a config) in this namespace, as ``sixgate
        run`` starts it with the kernel backend; its log in ``directory``."""
        (directory / "run").mkdir(parents=True)
        settings = dataclasses.replace(parse_config(settings_text, "relay.toml"),
                                       backend="kernel")
        settings_file = directory / "settings.json"
        settings_file.write_text(settings.to_json())
        log = directory / "worker.log"
        with log.open("wb") as out:
            worker = subprocess.Popen(["ip", "netns", "exec", self.namespace, sys.executable,
                                       "-m", "sixgate.workers.main", "--settings",
                                       str(settings_file), "--index", "0"], stderr=out)
        return worker, log


def ask_worker(run_dir: Path, cmd: str, log: Path) -> dict[str, Any]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(control.control_endpoint(str(run_dir), 0))
    try:
        req.send_json(control.request(cmd))
        assert req.poll(10_000), f"worker did not answer {cmd!r}:\n{netlab.tail(log)}"
        reply: dict[str, Any] = json.loads(req.recv())
        return reply
    finally:
        req.close(0)


@pytest.fixture(scope="module")
def relay_lab(served_files: netlab.ServedFiles, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[RelayLab]:
    missing = netlab.missing_requirements()
    if missing:
        if os.environ.get("SIXGATE_LAB_REQUIRED") == "1":
            pytest.fail(f"lab requirements missing: {missing}")
        pytest.skip(f"SKIPPED LOUDLY: lab requirements missing: {missing}")
    tmp = tmp_path_factory.mktemp("relay")
    namespace = f"{netlab.NAME_PREFIX}{os.getpid()}x990-gw"  # swept like the lab's own
    processes: list[subprocess.Popen[bytes]] = []
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        ns = ["ip", "netns", "exec", namespace]
        subprocess.run([*ns, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run([*ns, "ip", "-6", "addr", "add", f"{GATEWAY6}/128", "dev", "lo",
                        "nodad"], check=True)
        # What the coordinator's kernel backend does before it starts the relays
        # (coordinator/kernel_backend.py setup): the pool is local, each client's source.
        subprocess.run([*ns, "ip", "route", "add", "local", POOL, "dev", "lo"], check=True)
        http_port, dns_port = 8080, 5353
        processes.append(subprocess.Popen(
            [*ns, *netlab.http_server_argv("127.0.0.1", http_port, served_files.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        processes.append(subprocess.Popen(
            [*ns, "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts",
             "--conf-file=/dev/null", "--listen-address=127.0.0.1", f"--port={dns_port}",
             "--bind-interfaces", "--pid-file=", "--log-facility=-",
             f"--host-record={netlab.DNS_SMALL_NAME},{netlab.DNS_SMALL_A}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        lab = RelayLab(namespace, tmp / "run", None, tmp / "worker.log")  # type: ignore[arg-type]
        worker, _ = lab.start_worker(CONFIG.format(run_dir=lab.run_dir, http_port=http_port,
                                                   dns_port=dns_port, pool=POOL), tmp)
        processes.append(worker)
        lab.worker = worker
        netlab.wait_until(lambda: lab.exec(["ss", "-Hlnt", "sport = :80"]).stdout.strip()
                          and lab.exec(["ss", "-Hlnt", f"sport = :{http_port}"]).stdout.strip(),
                          timeout=30, what="relay and http.server listening")
        assert lab.ask("ping")["ok"]
        yield lab
    finally:
        for process in reversed(processes):
            netlab.stop_process(process, 10)
        subprocess.run(["ip", "netns", "del", namespace], check=False)


def test_tcp_relayed_to_ipv4_only_service(relay_lab: RelayLab) -> None:
    """curl -6 over the IPv6 listener gets the file from http.server on 127.0.0.1."""
    done = relay_lab.exec(["curl", "-6", "-g", "-sS", "--max-time", "10",
                           f"http://[{GATEWAY6}]/{netlab.SMALL_NAME}"])
    assert done.returncode == 0, done.stderr
    assert done.stdout == netlab.SMALL_TEXT


def test_udp_relayed_with_a_session_per_client(relay_lab: RelayLab) -> None:
    """dig over UDP reaches dnsmasq on 127.0.0.1; the session is listed with the IPv4
    address and port the service saw: a pool address of the client's own, never 127.0.0.1
    (issue 13, finding 4: a service that trusts localhost must not trust the internet)."""
    done = relay_lab.exec(["dig", f"@{GATEWAY6}", "-p", "53", netlab.DNS_SMALL_NAME, "A",
                           "+short", "+tries=1", "+time=5"])
    assert done.stdout.strip() == netlab.DNS_SMALL_A, done.stdout + done.stderr
    bindings = relay_lab.ask("flows")["bindings"]
    udp = [b for b in bindings if b["proto"] == "udp"]
    assert udp and udp[0]["pool"].startswith("100.64."), bindings
    assert udp[0]["rule"] == "udp/53 -> 127.0.0.1:5353"


def test_rfc6888_req4_per_prefix_limit_refuses_and_never_evicts(relay_lab: RelayLab) -> None:
    """max_flows_per_prefix = 2: with the UDP session of the test before (or one held TCP
    connection) and one more held, the next connection from the same /64 is refused and
    counted as prefix_flow_limit; the held ones keep working."""
    before = relay_lab.ask("flows")
    held = before["flows"]["active"]
    holders = []
    try:
        for _ in range(max(0, 2 - held)):
            proc = subprocess.Popen(["ip", "netns", "exec", relay_lab.namespace,
                                     sys.executable, str(netlab.PROGRAMS / "hold_connections.py"),
                                     GATEWAY6, "80", "1", "5"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline()) == {"connected": 1}
            holders.append(proc)
        netlab.wait_until(lambda: relay_lab.ask("flows")["flows"]["active"] >= 2, timeout=10,
                          what="two live sessions")
        refused = relay_lab.exec(["curl", "-6", "-g", "-sS", "--max-time", "5",
                                  f"http://[{GATEWAY6}]/{netlab.SMALL_NAME}"])
        assert refused.returncode != 0, refused.stdout
        after = relay_lab.ask("flows")
        assert after["counters"]["drops"]["prefix_flow_limit"] == (
            before["counters"]["drops"]["prefix_flow_limit"] + 1)
        assert after["flows"]["active"] == 2  # nothing was evicted to make room
    finally:
        for proc in holders:
            netlab.stop_process(proc, 5)


def test_rule_from_list_refuses_other_sources(relay_lab: RelayLab) -> None:
    """[[forward]] from: a client outside the list meets a closed port (reset) and is counted
    as source_not_allowed; a client inside it is relayed."""
    before = relay_lab.ask("flows")["counters"]["drops"]["source_not_allowed"]
    refused = relay_lab.exec(["curl", "-6", "-g", "-sS", "--max-time", "5",
                              f"http://[{GATEWAY6}]:81/{netlab.SMALL_NAME}"])
    assert refused.returncode != 0, refused.stdout
    allowed = relay_lab.exec(["curl", "-6", "-g", "-sS", "--max-time", "10",
                              f"http://[{GATEWAY6}]:82/{netlab.SMALL_NAME}"])
    assert allowed.returncode == 0 and allowed.stdout == netlab.SMALL_TEXT, allowed.stderr
    after = relay_lab.ask("flows")["counters"]["drops"]["source_not_allowed"]
    assert after == before + 1


def test_open_files_limit_raised_for_max_flows(relay_lab: RelayLab) -> None:
    """Two descriptors per TCP session: the relay worker raised RLIMIT_NOFILE to what its
    max_flows needs (the default 1024 let about a thousand UDP sessions stop it, EMFILE)."""
    from sixgate.workers.relay import descriptors_needed

    limits = Path(f"/proc/{relay_lab.worker.pid}/limits").read_text()
    line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
    soft = int(line.split()[3])
    settings = parse_config(CONFIG.format(run_dir=relay_lab.run_dir, http_port=8080,
                                          dns_port=5353, pool=POOL), "relay.toml")
    assert soft >= descriptors_needed(dataclasses.replace(settings, backend="kernel")), line


# Two relays of one forward rule, each with a run directory of its own: a take-over's old and
# new run (the coordinator's part and the sit link's are the VM test's, tests/kvm).
TAKE_OVER_CONFIG = f"""\
[tunnel]
mode = "6in4"
local_ipv4 = "192.0.2.10"
remote_ipv4 = "198.51.100.1"
prefix = "2001:db8:1::/64"

[gateway]
workers = 1
pool = "{POOL}"
max_flows = 5000
run_dir = "{{run_dir}}"

[[forward]]
proto = "tcp"
port = 90
to = "127.0.0.1:8080"
"""
# Connects, says so, waits for a line on stdin, then fetches PATH over that connection and
# prints the body's sha256.
HELD_CLIENT = """\
import hashlib, socket, sys
sock = socket.create_connection((sys.argv[1], 90), timeout=30)
print("connected", flush=True)
sys.stdin.readline()
sock.sendall(f"GET /{sys.argv[2]} HTTP/1.0\\r\\n\\r\\n".encode())
data = b""
while chunk := sock.recv(65536):
    data += chunk
head, _, body = data.partition(b"\\r\\n\\r\\n")
print(head.split(b"\\r\\n")[0].decode(), hashlib.sha256(body).hexdigest())
"""


def test_a_retiring_relay_carries_its_connection_on_while_the_next_takes_new_ones(
        relay_lab: RelayLab, served_files: netlab.ServedFiles, tmp_path: Path) -> None:
    """Issue 17, the kernel backend's take-over as the relays live it: the next run's relay
    listens beside the old one (SO_REUSEPORT); SIGUSR1 retires the old: its listener closes
    (new clients reach the next relay), the connection it carries goes on and completes a
    whole exchange afterwards, and the old relay exits 0 by itself once it ended."""
    ns = ["ip", "netns", "exec", relay_lab.namespace]
    started: list[subprocess.Popen[Any]] = []

    def listeners() -> int:
        return len(relay_lab.exec(["ss", "-Hlnt", "sport = :90"]).stdout.splitlines())

    try:
        old, old_log = relay_lab.start_worker(
            TAKE_OVER_CONFIG.format(run_dir=tmp_path / "old" / "run"), tmp_path / "old")
        started.append(old)
        netlab.wait_until(lambda: listeners() == 1, timeout=30, what="the old relay")
        held = subprocess.Popen([*ns, sys.executable, "-c", HELD_CLIENT, GATEWAY6,
                                 served_files.mid.name], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        started.append(held)
        assert held.stdout is not None and held.stdin is not None
        assert held.stdout.readline().strip() == "connected"
        netlab.wait_until(lambda: ask_worker(tmp_path / "old" / "run", "flows",
                                             old_log)["bindings"], timeout=10,
                          what="the held connection's relay")
        new, new_log = relay_lab.start_worker(
            TAKE_OVER_CONFIG.format(run_dir=tmp_path / "new" / "run"), tmp_path / "new")
        started.append(new)
        netlab.wait_until(lambda: listeners() == 2, timeout=30, what="the new relay")
        assert ask_worker(tmp_path / "new" / "run", "ping", new_log)["ok"]
        os.kill(old.pid, signal.SIGUSR1)
        netlab.wait_until(lambda: "retiring: listeners closed" in netlab.tail(old_log),
                          timeout=10, what="the old relay to retire")
        assert listeners() == 1
        for _ in range(3):
            done = relay_lab.exec(["curl", "-6", "-g", "-sS", "--max-time", "10",
                                   f"http://[{GATEWAY6}]:90/{netlab.SMALL_NAME}"])
            assert done.stdout == netlab.SMALL_TEXT, done.stderr
        created = ask_worker(tmp_path / "new" / "run", "flows", new_log)["flows"]["created"]
        assert created == 3, created  # every new client reached the next relay
        assert old.poll() is None, netlab.tail(old_log)  # it still carries the held one
        # Its worker-0 endpoint is the next run's now; the next coordinator lists what the
        # old relay carries at the endpoint named by the old coordinator's pid (here this
        # process: the relays' parent) until it ends.
        [retiring] = control.ask_retiring(zmq.Context.instance(), str(tmp_path / "old" / "run"),
                                          os.getpid(), 1, "flows", 10_000)
        assert [b["state"] for b in retiring["bindings"]] == ["established"], retiring
        out, _ = held.communicate("go\n", timeout=60)
        assert out.split() == ["HTTP/1.0", "200", "OK", served_files.mid.sha256], out
        assert old.wait(timeout=15) == 0, netlab.tail(old_log)
        assert "retired: its last connection ended" in netlab.tail(old_log)
    finally:
        for process in reversed(started):
            netlab.stop_process(process, 10)


def test_sigterm_stops_the_relay_worker_cleanly(relay_lab: RelayLab) -> None:
    """Last in the module: SIGTERM ends the worker with exit code 0."""
    os.kill(relay_lab.worker.pid, signal.SIGTERM)
    assert relay_lab.worker.wait(timeout=15) == 0, netlab.tail(relay_lab.log)
