"""The three systems under test, each in namespaces built from the test lab's pieces.

All three get the same generator (``gen.c``, in the peer namespace) and the same UDP sink /
reflector (``sink.c``, on the service side); the return path is counted by ``sink.c`` on an
AF_PACKET socket on the peer's veth, where an nftables rule then drops the packets (no socket
owns their destination, and the peer's kernel must not answer them).

```
sixgate  peer ─6to4 (IPv4 proto 41)─> gw: sixgate run (raw socket, workers, TUN) -> 127.0.0.1:9000
TAYGA    peer ─plain IPv6 UDP──────> gw: kernel IPv6 route -> TUN -> tayga (NAT64) -> TUN
                                          -> 192.0.2.10:9000
kernel   peer ─plain IPv6 UDP──────> gw: kernel IPv6 forwarding ──veth──> svc namespace:
                                          [2001:db8:64::c000:20a]:9000
```

TAYGA's input is plain IPv6 (it is a NAT64, it has no tunnel side), sixgate's is 6to4: each
gets the input it is built for. The kernel reference forwards the same plain IPv6 packets as
TAYGA gets, one namespace to the next (no translation at all): the ceiling of this machine.

Naming and cleanup are the test lab's (``tests/lab/netlab.py``: ``sgl<pid>x<n>-gw|peer``, swept
when their process is gone); the kernel reference's third namespace is ``...-svc`` and swept
here. Every resource registers its cleanup the moment it exists (the lab's ExitStack).
Addresses are documentation ranges only (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
2001:db8::/32, 2002::/16 derived from them).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.programs import SinkCounts, read_counts

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "lab"))
import netlab  # noqa: E402  (the test lab is not a package: it lives beside its tests)

SERVICE_PORT = 9000  # UDP: forwarded to the sink
TCP_PORT = 8000  # TCP: forwarded to a listener that never accepts (SYN flood)
NAT64_PREFIX = "2001:db8:64::"  # TAYGA's /96 (RFC 6052 §2.2 network-specific prefix)
SERVICE_IPV4 = netlab.GATEWAY_IPV4  # TAYGA delivers to the namespace's own 192.0.2.10
SERVICE_V6 = f"{NAT64_PREFIX}c000:20a"  # 192.0.2.10 in that prefix
CLIENTS_48 = "2001:db8:ffff"  # plain IPv6 clients (TAYGA, kernel): <48>:<subnet>::<host>
PEER_LINK_V6 = "2001:db8:fffe::1"
GW_LINK_V6 = "2001:db8:fffe::2"
SVC_LINK_GW_V6 = "2001:db8:fffd::1"
SVC_LINK_V6 = "2001:db8:fffd::2"
TAYGA_POOL = "203.0.113.0/24"
TAYGA_IPV4 = "203.0.113.1"
NFT_TABLE = "sixgatebench"
NFT_CONNTRACK_TABLE = f"{NFT_TABLE}_ct"  # the kernel's state per flow (KernelLab.flow_state)
GEN_NICE = 10
SVC_PATTERN = re.compile(rf"^{netlab.NAME_PREFIX}(\d+)x(\d+)-svc$")
SIXGATE_PINGER_SOURCE = f"{netlab.PLANS['6to4'].client_prefix}:ffff::1"
FORWARD_TOML = (
    "[[forward]]\n"
    'proto = "udp"\n'
    f"port = {SERVICE_PORT}\n"
    f'to = "127.0.0.1:{SERVICE_PORT}"\n'
    "\n"
    "[[forward]]\n"
    'proto = "tcp"\n'
    f"port = {TCP_PORT}\n"
    f'to = "127.0.0.1:{TCP_PORT}"\n'
)
NO_FILES = netlab.ServedFiles(Path("/nonexistent"), netlab.ServedFile("", 0, ""),
                              netlab.ServedFile("", 0, ""))


def sweep_leftovers() -> list[str]:
    """The test lab's sweep, plus the kernel reference's ``-svc`` namespaces of dead runs."""
    swept = netlab.sweep_leftovers()
    for namespace in netlab.list_namespaces():
        match = SVC_PATTERN.match(namespace)
        if match and not netlab.pid_alive(int(match.group(1))):
            netlab.delete_namespace(namespace)
            swept.append(namespace)
    return swept


def taskset(cpus: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` pinned to ``cpus`` (a taskset list such as "0" or "1-3"), or as it is."""
    return ["taskset", "-c", cpus, *argv] if cpus else list(argv)


# --------------------------------------------------------------------------- CPU from /proc


def process_cpu_s(pid: int) -> float | None:
    """user + system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/statm."""
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state = netlab.process_state(int(entry.name))
            if state is not None and state[1] == pid:
                found.append(int(entry.name))
    return sorted(found)


def cpu_busy_s(cpus: Sequence[int]) -> float:
    """Non-idle seconds of these CPUs since boot (/proc/stat: all but idle and iowait)."""
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(v) for v in values[:8]]
            total += sum(ticks) - ticks[3] - ticks[4]
    return total / os.sysconf("SC_CLK_TCK")


def kernel_cpu_s(cpus: Sequence[int]) -> dict[str, float]:
    """The kernel's packet work on these CPUs so far: interrupt + softirq time (/proc/stat)
    and the CPU of their ksoftirqd threads (softirq work deferred to a thread)."""
    irq = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            irq += int(values[5]) + int(values[6])
    threads = 0.0
    for cpu in cpus:
        for pid in pids_named(f"ksoftirqd/{cpu}"):
            threads += process_cpu_s(pid) or 0.0
    return {"softirq": irq / os.sysconf("SC_CLK_TCK"), "ksoftirqd": threads}


def pids_named(name: str) -> list[int]:
    """PIDs whose command name is ``name``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == name:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


# --------------------------------------------------------------------------- the common part


class BenchTarget:
    """What every system under test offers the measurements (mixed into a ``netlab.Lab``)."""

    label = "?"
    gen_mode = "ipv6"
    return_family = 6
    return_proto = 17
    traffic_cpus: str | None = None
    gateway_cpus: str | None = None
    # provided by netlab.Lab
    gw_ns: str
    peer_ns: str
    tmp: Path
    processes: dict[str, subprocess.Popen[bytes]]
    _cleanup: contextlib.ExitStack
    spawn: Any
    ip: Any
    sysctl: Any
    exec_in: Any

    _sink_number = 0

    @property
    def service_ns(self) -> str:
        return self.gw_ns

    def gen_args(self) -> list[str]:
        """gen.c's addressing arguments for this target."""
        raise NotImplementedError

    def pinger_args(self) -> list[str]:
        """pinger.c's addressing arguments for this target."""
        raise NotImplementedError

    def sink_endpoint(self) -> str:
        raise NotImplementedError

    def gateway_processes(self) -> dict[str, int]:
        """name -> PID of every process of the gateway (empty for the kernel)."""
        return {}

    def cpu_sample(self) -> dict[str, float]:
        """CPU seconds so far per gateway process."""
        return {name: cpu for name, pid in self.gateway_processes().items()
                if (cpu := process_cpu_s(pid)) is not None}

    def metrics(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """The gateway's /metrics (sixgate only)."""
        return {}

    # -- new TCP flows (the SYN flood)

    syn_return_proto = 6  # what the service's SYN+ACK comes back to the peer as: plain TCP

    def tcp_listen_endpoint(self) -> str:
        """Where the SYN flood's listener (sink.c --tcp-listen) binds, in the service's
        namespace."""
        raise NotImplementedError

    def flow_state(self) -> contextlib.AbstractContextManager[None]:
        """What makes this system keep a state per flow while the SYN flood runs (sixgate
        always does)."""
        return contextlib.nullcontext()

    # -- traffic programs (pinned to the traffic CPUs)

    def spawn_traffic(self, key: str, namespace: str,
                      argv: Sequence[str]) -> subprocess.Popen[bytes]:
        process: subprocess.Popen[bytes] = self.spawn(key, namespace,
                                                      taskset(self.traffic_cpus, argv))
        return process

    def start_sink(self, sink: Path, *args: str) -> Path:
        """Start a sink (counters file returned once it is ready)."""
        BenchTarget._sink_number += 1
        key = f"sink{BenchTarget._sink_number}"
        counters = self.tmp / f"{key}.counters"
        namespace = self.peer_ns if "--packet" in args else self.service_ns
        process = self.spawn_traffic(key, namespace,
                                     [str(sink), "--counters", str(counters), *args])

        def ready() -> bool:
            if process.poll() is not None:
                raise netlab.LabError(f"sink {' '.join(args)} exited:\n"
                                      f"{netlab.tail(self.tmp / f'{key}.err')}")
            return read_counts(counters).ready

        netlab.wait_until(ready, timeout=10, what=f"sink {' '.join(args)}")
        return counters

    def stop_sink(self, counters: Path) -> SinkCounts:
        """Stop the sink that writes ``counters``; its last counts."""
        key = counters.name.removesuffix(".counters")
        netlab.stop_process(self.processes[key], 5)
        return read_counts(counters)

    @contextlib.contextmanager
    def service_sink(self, sink: Path, reflect: bool) -> Iterator[Path]:
        """The UDP service: counts what arrives, and sends it back when ``reflect``."""
        counters = self.start_sink(sink, "--udp", self.sink_endpoint(),
                                   *(["--reflect"] if reflect else []))
        try:
            yield counters
        finally:
            self.stop_sink(counters)

    @contextlib.contextmanager
    def return_counter(self, sink: Path, synack: bool = False) -> Iterator[Path]:
        """Counts what comes back to the peer on its veth; the peer's kernel then drops it.
        ``synack``: only the SYN+ACKs (as ``syn_return_proto``)."""
        family = "ip" if self.return_family == 4 else "ip6"
        field = "protocol" if self.return_family == 4 else "nexthdr"
        proto = self.syn_return_proto if synack else self.return_proto
        rule = (f"table inet {NFT_TABLE} {{\n chain pre {{\n"
                "  type filter hook prerouting priority -300; policy accept;\n"
                f'  iifname "veth0" {family} {field} {proto} drop\n }}\n}}\n')
        netlab.run(netlab.in_ns(self.peer_ns, ["nft", "-f", "-"]), input=rule)
        try:
            counters = self.start_sink(sink, "--packet", "veth0", "--family",
                                       str(self.return_family), "--proto", str(proto),
                                       *(["--synack"] if synack else []))
            try:
                yield counters
            finally:
                self.stop_sink(counters)
        finally:
            netlab.run(netlab.in_ns(self.peer_ns, ["nft", "delete", "table", "inet",
                                                   NFT_TABLE]), check=False)

    def run_gen(self, gen: Path, *args: str, timeout: float = 120) -> dict[str, Any]:
        """Run the generator in the peer namespace until it ends; its JSON summary."""
        argv = netlab.in_ns(self.peer_ns, taskset(self.traffic_cpus,
                                                  [str(gen), *self.gen_args(), *args]))
        done = netlab.run(argv, timeout=timeout)
        return dict(json.loads(done.stdout))

    def start_gen(self, gen: Path, *args: str) -> subprocess.Popen[str]:
        """The generator in the background (stdout: its JSON summary at the end). Niced: flat
        out it would starve the sinks that share its CPU, and count their lag as loss."""
        argv = netlab.in_ns(self.peer_ns, ["nice", "-n", str(GEN_NICE), *taskset(
            self.traffic_cpus, [str(gen), *self.gen_args(), *args])])
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        self._cleanup.callback(netlab.stop_process, process, 5)
        return process

    def ping(self, pinger: Path, count: int, interval_ms: int) -> dict[str, Any]:
        """Echo round trips through the gateway (pinger.c's JSON)."""
        argv = netlab.in_ns(self.peer_ns, taskset(self.traffic_cpus, [
            str(pinger), *self.pinger_args(), "--count", str(count),
            "--interval-ms", str(interval_ms)]))
        done = netlab.run(argv, timeout=count * (interval_ms / 1000 + 1) + 10)
        return dict(json.loads(done.stdout))

    def resolve_neighbours(self, *pairs: tuple[str, str]) -> None:
        """Ping each (namespace, address) once: neighbour discovery is done before the first
        measured packet (the generator's raw sends would otherwise wait in a short queue)."""
        for namespace, address in pairs:
            netlab.wait_until(lambda ns=namespace, a=address: self.exec_in(
                ns, ["ping", "-6", "-c", "1", "-W", "1", a]).returncode == 0,
                timeout=10, what=f"{address} reachable from {namespace}")

    def ipv6_on(self, namespace: str, *links: str, forwarding: bool = False) -> None:
        """Kernel IPv6 back on in a namespace the lab made without it."""
        settings = ["net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0",
                    *(f"net.ipv6.conf.{link}.disable_ipv6=0" for link in links)]
        if forwarding:
            settings.append("net.ipv6.conf.all.forwarding=1")
        self.sysctl(namespace, *settings)


# --------------------------------------------------------------------------- sixgate


class SixgateLab(BenchTarget, netlab.Lab):
    """The real ``sixgate run`` (6to4, userspace backend) in the lab's gateway namespace."""

    gen_mode = "6to4"
    return_family = 4
    return_proto = 41
    syn_return_proto = 41  # the SYN+ACK inside the tunnel

    def __init__(self, workers: int, *, max_flows: int = 200_000,
                 gateway_settings: dict[str, str] | None = None,
                 traffic_cpus: str | None = None, gateway_cpus: str | None = None,
                 label: str = "sixgate") -> None:
        # The product's default fan-out; --gateway-set 'fanout="coordinator"' for the other.
        super().__init__("6to4", workers, NO_FILES, fanout="kernel")
        self.label = f"{label} {workers}w"
        self.max_flows = max_flows
        # More [gateway] settings (key -> TOML value), replacing the lab's: the variants of
        # the datapath to compare (bench/e2e.py --gateway-set).
        # The generator's clients all sit in one 6to4 /48 behind one IPv4 address, so the
        # per-source limits (meant for hostile sources) are opened to the table size here.
        self.gateway_settings = {"max_flows": str(max_flows),
                                 "max_flows_per_prefix": str(max_flows),
                                 "max_flows_per_48": str(max_flows),
                                 "max_flows_per_ipv4_source": str(max_flows),
                                 "log_level": '"warning"', **(gateway_settings or {})}
        self.traffic_cpus = traffic_cpus
        self.gateway_cpus = gateway_cpus

    def start(self) -> None:
        self.create_namespaces()
        # The SYN flood's service: the kernel answers every SYN with a cookie, keeps no state
        # and never retransmits a SYN+ACK (which would count twice).
        self.sysctl(self.gw_ns, "net.ipv4.tcp_syncookies=2")
        self.write_config()
        start_pinned(self)

    def config_text(self) -> str:
        # The lab's config with the benchmark's forward rules, and the limits raised: the
        # memory figures hold up to 1M bindings of 1024 clients (RFC 6888 REQ-4 limits are
        # the operator's choice).
        text = super().config_text()
        if netlab.FORWARD_TOML not in text or "[gateway]\n" not in text:
            raise netlab.LabError("the test lab's gateway config changed shape: "
                                  "update SixgateLab.config_text")
        head, _, tail = text.replace(netlab.FORWARD_TOML, FORWARD_TOML).partition("[gateway]\n")
        section, blank, rest = tail.partition("\n\n")
        kept = [line for line in section.splitlines()
                if line.split("=")[0].strip() not in self.gateway_settings]
        added = [f"{key} = {value}" for key, value in self.gateway_settings.items()]
        return head + "[gateway]\n" + "\n".join(kept + added) + blank + rest

    def gen_args(self) -> list[str]:
        return ["--mode", "6to4", "--src4", netlab.PEER_IPV4, "--dst4", netlab.GATEWAY_IPV4,
                "--prefix48", self.plan.client_prefix, "--dst6", self.plan.gateway_address]

    def pinger_args(self) -> list[str]:
        return ["--mode", "6to4", "--src4", netlab.PEER_IPV4, "--dst4", netlab.GATEWAY_IPV4,
                "--src6", SIXGATE_PINGER_SOURCE, "--dst6", self.plan.gateway_address]

    def sink_endpoint(self) -> str:
        return f"127.0.0.1:{SERVICE_PORT}"

    def gateway_processes(self) -> dict[str, int]:
        return sixgate_processes(self)

    def metrics(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        return sixgate_metrics(self)

    def tcp_listen_endpoint(self) -> str:
        return f"127.0.0.1:{TCP_PORT}"  # the lab forwards the port to this host's loopback


def start_pinned(lab: Any) -> None:
    """``sixgate run`` in the lab's gateway namespace, pinned to the gateway CPUs (the
    workers inherit them)."""
    previous = os.environ.get("SIXGATE_LAB_COMMAND")
    # netlab starts the gateway with this command.
    os.environ["SIXGATE_LAB_COMMAND"] = " ".join(
        taskset(lab.gateway_cpus, netlab.sixgate_command()))
    try:
        lab.start_gateway(timeout=60)
    finally:
        if previous is None:
            del os.environ["SIXGATE_LAB_COMMAND"]
        else:
            os.environ["SIXGATE_LAB_COMMAND"] = previous


def sixgate_processes(lab: Any) -> dict[str, int]:
    """The coordinator and its workers by name."""
    coordinator = lab.processes["sixgate"].pid
    found = {"coordinator": coordinator}
    for pid in children(coordinator):
        argv = netlab.process_cmdline(pid)
        index = argv[argv.index("--index") + 1] if "--index" in argv else str(pid)
        found[f"worker-{index}"] = pid
    return found


def sixgate_metrics(lab: Any) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The gateway's /metrics, by name and label set."""
    text = lab.exec_in(lab.gw_ns, ["curl", "-sS", "--max-time", "10",
                                   "http://127.0.0.1:9641/metrics"], timeout=15).stdout
    series: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            series.setdefault(sample.name, {})[labels] = sample.value
    return series


# --------------------------------------------------------------------------- TAYGA


class PlainIPv6Target(BenchTarget):
    """TAYGA and the kernel: plain IPv6 from <CLIENTS_48>:<subnet>::<host> to SERVICE_V6, in
    the lab's two namespaces (the gateway one without a gateway: built here)."""

    def __init__(self, *, traffic_cpus: str | None = None,
                 gateway_cpus: str | None = None) -> None:
        super().__init__("6to4", 1, NO_FILES, with_gateway=False)  # type: ignore[call-arg]
        self.traffic_cpus = traffic_cpus
        self.gateway_cpus = gateway_cpus

    def gen_args(self) -> list[str]:
        return ["--mode", "ipv6", "--prefix48", CLIENTS_48, "--dst6", SERVICE_V6]

    def pinger_args(self) -> list[str]:
        return ["--mode", "ipv6", "--src6", PEER_LINK_V6, "--dst6", SERVICE_V6]


class TaygaLab(PlainIPv6Target, netlab.Lab):
    """TAYGA 0.9.2 (Debian package), NAT64 over TUN, in the lab's gateway namespace."""

    label = "TAYGA"

    def __init__(self, **cpus: str | None) -> None:
        super().__init__(**cpus)
        self.tun = f"{self.name}t"

    def start(self) -> None:
        binary = shutil.which("tayga")
        if binary is None:
            raise netlab.LabError("tayga is not installed (apt-get install tayga; "
                                  "bench/bootstrap.sh does)")
        self.create_namespaces()
        self.ipv6_on(self.gw_ns, "veth0", "lo", forwarding=True)
        self.ip(self.peer_ns, "addr", "add", f"{PEER_LINK_V6}/64", "dev", "veth0", "nodad")
        self.ip(self.gw_ns, "addr", "add", f"{GW_LINK_V6}/64", "dev", "veth0", "nodad")
        self.ip(self.peer_ns, "route", "add", f"{NAT64_PREFIX}/96", "via", GW_LINK_V6)
        self.ip(self.gw_ns, "route", "add", f"{CLIENTS_48}::/48", "via", PEER_LINK_V6)
        # The lab routed 203.0.113.0/24 to the peer; here it is TAYGA's pool.
        self.ip(self.gw_ns, "route", "del", TAYGA_POOL)
        data_dir = self.tmp / "tayga"
        data_dir.mkdir()
        config = self.tmp / "tayga.conf"
        config.write_text(f"tun-device {self.tun}\nipv4-addr {TAYGA_IPV4}\n"
                          f"prefix {NAT64_PREFIX}/96\ndynamic-pool {TAYGA_POOL}\n"
                          f"data-dir {data_dir}\n")
        process = self.spawn("tayga", self.gw_ns,
                             taskset(self.gateway_cpus, [binary, "--nodetach", "-c", str(config)]))

        def tun_exists() -> bool:
            if process.poll() is not None:
                raise netlab.LabError(f"tayga exited:\n{netlab.tail(self.log_path('tayga'))}")
            return any(link["ifname"] == self.tun for link in self.links(self.gw_ns))

        netlab.wait_until(tun_exists, timeout=10, what=f"tayga's TUN device {self.tun}")
        self.ip(self.gw_ns, "link", "set", self.tun, "up")
        self.ip(self.gw_ns, "route", "add", f"{NAT64_PREFIX}/96", "dev", self.tun)
        self.ip(self.gw_ns, "route", "add", TAYGA_POOL, "dev", self.tun)
        self.resolve_neighbours((self.peer_ns, GW_LINK_V6))

    def sink_endpoint(self) -> str:
        return f"{SERVICE_IPV4}:{SERVICE_PORT}"

    def gateway_processes(self) -> dict[str, int]:
        return {"tayga": self.processes["tayga"].pid}


# --------------------------------------------------------------------------- sixgate NAT64


class Sixgate64Lab(PlainIPv6Target, netlab.Lab):
    """The real ``sixgate run`` in NAT64 mode with TAYGA's input and TAYGA's job: the same
    plain IPv6 UDP to the same /96 (RFC 6052 network-specific prefix), translated to the
    same IPv4 sink, the bindings from pool4 ports of one address."""

    def __init__(self, workers: int, label: str = "NAT64",
                 gateway_settings: dict[str, str] | None = None, **cpus: str | None) -> None:
        super().__init__(**cpus)
        self.workers = workers
        self.label = f"{label} {workers}w"
        self.gateway_settings = gateway_settings or {}

    def start(self) -> None:
        self.create_namespaces()
        self.ipv6_on(self.gw_ns, "veth0", "lo")  # forwarding: sixgate switches it on itself
        self.ip(self.peer_ns, "addr", "add", f"{PEER_LINK_V6}/64", "dev", "veth0", "nodad")
        self.ip(self.gw_ns, "addr", "add", f"{GW_LINK_V6}/64", "dev", "veth0", "nodad")
        self.ip(self.peer_ns, "route", "add", f"{NAT64_PREFIX}/96", "via", GW_LINK_V6)
        self.ip(self.gw_ns, "route", "add", f"{CLIENTS_48}::/48", "via", PEER_LINK_V6)
        # The lab routed 203.0.113.0/24 to the peer; here 203.0.113.1 is pool4.
        self.ip(self.gw_ns, "route", "del", TAYGA_POOL)
        self.write_config()
        start_pinned(self)
        self.resolve_neighbours((self.peer_ns, GW_LINK_V6))

    def config_text(self) -> str:
        return (
            "[gateway]\n"
            f"workers = {self.workers}\n"
            f'run_dir = "{self.tmp / "run"}"\n'
            f'name = "{self.name}"\n'
            'log_level = "warning"\n'
            "max_flows = 4000000\nmax_flows_per_prefix = 4000000\nmax_flows_per_48 = 4000000\n"
            + "".join(f"{key} = {value}\n" for key, value in self.gateway_settings.items())
            + "\n[nat64]\n"
            f'prefix = "{NAT64_PREFIX}/96"\n'
            # The generator's clients, and the pinger on the peer's link.
            f'clients = ["{CLIENTS_48}::/48", "{PEER_LINK_V6}/128"]\n'
            "ports_per_client = 64512\n"
            "log_bindings = false\n"
            "\n[[nat64.pool4]]\n"
            f'address = "{TAYGA_IPV4}"\n'
            'tcp = "1024-65535"\nudp = "1024-65535"\nicmp = "0-65535"\n')

    def sink_endpoint(self) -> str:
        return f"{SERVICE_IPV4}:{SERVICE_PORT}"

    def gateway_processes(self) -> dict[str, int]:
        return sixgate_processes(self)

    def metrics(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        return sixgate_metrics(self)


# --------------------------------------------------------------------------- CLAT


CLAT_HOST_IPV4 = "192.0.0.1"  # RFC 7335: the host's IPv4 address on the CLAT device
CLAT_IPV6 = "2001:db8:fffe::c1a7"  # the CLAT's address, in the peer's link /64
TAYGA_CLAT_IPV4 = "192.0.0.2"  # TAYGA's own address as a CLAT


class ClatTarget(BenchTarget):
    """A CLAT on the peer (the host whose IPv4 programs speak through it): the generator sends
    plain IPv4 UDP from 192.0.0.1 to SERVICE_IPV4 (the flows are source ports), the CLAT
    writes it as IPv6 from CLAT_IPV6 to SERVICE_V6 (NAT64_PREFIX), and the sink in the gateway
    namespace receives it there: the CLAT's own job, translation and nothing else."""

    def __init__(self, *, traffic_cpus: str | None = None,
                 gateway_cpus: str | None = None) -> None:
        super().__init__("6to4", 1, NO_FILES, with_gateway=False)  # type: ignore[call-arg]
        self.traffic_cpus = traffic_cpus
        self.gateway_cpus = gateway_cpus

    def gen_args(self) -> list[str]:
        return ["--mode", "ipv4", "--src4", CLAT_HOST_IPV4, "--dst4", SERVICE_IPV4]

    def pinger_args(self) -> list[str]:
        raise NotImplementedError("pinger.c has no IPv4 mode: no latency for a CLAT yet")

    def sink_endpoint(self) -> str:
        return f"[{SERVICE_V6}]:{SERVICE_PORT}"

    def build_network(self) -> None:
        """The peer: IPv6 only towards the gateway namespace (its IPv4 route to the sink's
        network removed), the NAT64 prefix routed there; the sink's address on the gateway's
        loopback."""
        self.create_namespaces()
        self.ipv6_on(self.gw_ns, "veth0", "lo")
        self.ip(self.peer_ns, "route", "del", "192.0.2.0/24")
        self.ip(self.peer_ns, "addr", "add", f"{PEER_LINK_V6}/64", "dev", "veth0", "nodad")
        self.ip(self.gw_ns, "addr", "add", f"{GW_LINK_V6}/64", "dev", "veth0", "nodad")
        self.ip(self.gw_ns, "addr", "add", f"{SERVICE_V6}/128", "dev", "lo")
        self.ip(self.peer_ns, "route", "add", f"{NAT64_PREFIX}/96", "via", GW_LINK_V6)


class SixgateClatLab(ClatTarget, netlab.Lab):
    """The real ``sixgate run`` with [clat] in the peer namespace, pinned to the gateway
    CPUs."""

    label = "sixgate-clat"

    def start(self) -> None:
        self.build_network()
        self.config_path.write_text(
            "[gateway]\n"
            f'run_dir = "{self.tmp / "run"}"\n'
            f'name = "{self.name}"\n'
            'log_level = "warning"\n'
            "\n[clat]\n"
            f'plat_prefix = "{NAT64_PREFIX}/96"\n'
            f'ipv6_address = "{CLAT_IPV6}"\n')
        self.spawn("sixgate", self.peer_ns, taskset(self.gateway_cpus, [
            *netlab.sixgate_command(), "run", "--config", str(self.config_path)]))
        netlab.wait_until(lambda: self.exec_in(self.peer_ns, [
            *netlab.sixgate_command(), "flows", "--json", "--config", str(self.config_path)]
        ).returncode == 0, timeout=60, what="the CLAT's `sixgate flows`")
        self.resolve_neighbours((self.peer_ns, GW_LINK_V6))

    def gateway_processes(self) -> dict[str, int]:
        return sixgate_processes(self)


class TaygaClatLab(ClatTarget, netlab.Lab):
    """TAYGA 0.9.2 as a CLAT, the way clatd runs it: the host's 192.0.0.1 mapped to the CLAT's
    IPv6 address (``map``), the IPv4 default route through its device, proxy NDP for the
    address on the uplink."""

    label = "TAYGA-clat"

    def start(self) -> None:
        binary = shutil.which("tayga")
        if binary is None:
            raise netlab.LabError("tayga is not installed (apt-get install tayga; "
                                  "bench/bootstrap.sh does)")
        self.build_network()
        device = f"{self.name}t"
        data_dir = self.tmp / "tayga"
        data_dir.mkdir()
        config = self.tmp / "tayga.conf"
        config.write_text(f"tun-device {device}\nipv4-addr {TAYGA_CLAT_IPV4}\n"
                          f"prefix {NAT64_PREFIX}/96\nmap {CLAT_HOST_IPV4} {CLAT_IPV6}\n"
                          f"data-dir {data_dir}\n")
        process = self.spawn("tayga", self.peer_ns,
                             taskset(self.gateway_cpus, [binary, "--nodetach", "-c",
                                                         str(config)]))
        netlab.wait_until(lambda: process.poll() is None and any(
            link["ifname"] == device for link in self.links(self.peer_ns)), timeout=10,
            what=f"tayga's TUN device {device}")
        self.sysctl(self.peer_ns, "net.ipv6.conf.all.forwarding=1",
                    "net.ipv6.conf.veth0.proxy_ndp=1")
        self.ip(self.peer_ns, "link", "set", device, "up")
        self.ip(self.peer_ns, "addr", "add", f"{CLAT_HOST_IPV4}/32", "dev", device)
        self.ip(self.peer_ns, "route", "add", "default", "dev", device, "mtu", "1260")
        self.ip(self.peer_ns, "route", "add", f"{CLAT_IPV6}/128", "dev", device)
        self.ip(self.peer_ns, "-6", "neigh", "add", "proxy", CLAT_IPV6, "dev", "veth0")
        self.resolve_neighbours((self.peer_ns, GW_LINK_V6))

    def gateway_processes(self) -> dict[str, int]:
        return {"tayga": self.processes["tayga"].pid}


# --------------------------------------------------------------------------- kernel


class KernelLab(PlainIPv6Target, netlab.Lab):
    """The kernel forwarding plain IPv6 from the peer, through the gateway namespace, to a
    third namespace holding the sink: no translation, the ceiling of this machine.

    veth receive work normally runs on the sending CPU (the generator's); RPS on the gateway
    namespace's links moves the forwarding to the gateway CPUs, as a gateway process would be.
    """

    label = "kernel"

    def __init__(self, **cpus: str | None) -> None:
        super().__init__(**cpus)
        self.svc_ns = self.gw_ns.removesuffix("-gw") + "-svc"

    @property
    def service_ns(self) -> str:
        return self.svc_ns

    def start(self) -> None:
        self.create_namespaces()
        netlab.run(["ip", "netns", "add", self.svc_ns])
        self._cleanup.callback(netlab.delete_namespace, self.svc_ns)
        self.ipv6_on(self.gw_ns, "veth0", "lo", forwarding=True)
        self.ipv6_on(self.svc_ns)
        self.ip(self.svc_ns, "link", "set", "lo", "up")
        self.ip(self.gw_ns, "link", "add", "veth1", "type", "veth",
                "peer", "name", "veth0", "netns", self.svc_ns)
        for namespace, link, address in ((self.peer_ns, "veth0", PEER_LINK_V6),
                                         (self.gw_ns, "veth0", GW_LINK_V6),
                                         (self.gw_ns, "veth1", SVC_LINK_GW_V6),
                                         (self.svc_ns, "veth0", SVC_LINK_V6)):
            self.ip(namespace, "addr", "add", f"{address}/64", "dev", link, "nodad")
            self.ip(namespace, "link", "set", link, "up")
        self.ip(self.svc_ns, "addr", "add", f"{SERVICE_V6}/128", "dev", "lo")
        self.ip(self.peer_ns, "route", "add", f"{NAT64_PREFIX}/96", "via", GW_LINK_V6)
        self.ip(self.gw_ns, "route", "add", f"{NAT64_PREFIX}/96", "via", SVC_LINK_V6)
        self.ip(self.gw_ns, "route", "add", f"{CLIENTS_48}::/48", "via", PEER_LINK_V6)
        self.ip(self.svc_ns, "route", "add", "default", "via", SVC_LINK_GW_V6)
        if self.gateway_cpus:
            mask = sum(1 << cpu for cpu in cpu_list(self.gateway_cpus))
            for link in ("veth0", "veth1"):
                self.exec_in(self.gw_ns, ["sh", "-c", f"echo {mask:x} > "
                                          f"/sys/class/net/{link}/queues/rx-0/rps_cpus"],
                             check=True)
        self.resolve_neighbours((self.peer_ns, GW_LINK_V6), (self.gw_ns, SVC_LINK_V6))

    def sink_endpoint(self) -> str:
        return f"[{SERVICE_V6}]:{SERVICE_PORT}"

    # The SYN flood through the kernel: plain IPv6 forwarded to a listener in the service's
    # namespace, with conntrack keeping a state per flow (the kernel's own flow setup, as a
    # stateful firewall or NAT does it), for a same-run reference of sixgate's new flows.
    def tcp_listen_endpoint(self) -> str:
        return f"[{SERVICE_V6}]:{TCP_PORT}"

    @contextlib.contextmanager
    def flow_state(self) -> Iterator[None]:
        """Conntrack on for what the gateway namespace forwards (any ct expression in a
        table does it), the service answering every SYN with a cookie as sixgate's lab's
        does; off again after (the forward figures are the stateless kernel's)."""
        self.sysctl(self.svc_ns, "net.ipv4.tcp_syncookies=2")
        table = NFT_CONNTRACK_TABLE
        netlab.run(netlab.in_ns(self.gw_ns, ["nft", "-f", "-"]), input=(
            f"table inet {table} {{\n chain forward {{\n"
            "  type filter hook forward priority filter; policy accept;\n"
            "  ct state new counter accept\n }\n}\n"))
        try:
            yield
        finally:
            netlab.run(netlab.in_ns(self.gw_ns, ["nft", "delete", "table", "inet", table]),
                       check=False)


def cpu_list(text: str) -> list[int]:
    """"0", "1-3", "0,2" -> CPU numbers."""
    cpus: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return cpus


def wait_quiet(read: Any, quiet_s: float = 0.3, timeout_s: float = 5.0) -> Any:
    """Poll ``read()`` until its value stops changing for ``quiet_s``; the last value."""
    last, since = read(), time.monotonic()
    deadline = since + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
        if value != last:
            last, since = value, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last
