"""``make soak``: the real gateway under sustained attack while a real client downloads.

One real ``sixgate run`` (6to4, two workers, the default limits) in the test lab, its services
and its tunnel peer; a real client (``curl -6`` through the peer) downloads a 10 MB file while
the C generator (bench/gen.c) floods the gateway from other 6to4 sites (198.51.100.3-.6, one
/48 each, so no flood starts with the sessions of the one before), for ``--seconds`` each
(default 60):

1. ``syn``: TCP SYNs to the forwarded HTTP port from 1M distinct sources (1024 /64s x 1024
   hosts), each a new session the gateway must track (RFC 6146 §3.5.2) until it expires;
2. ``fragments``: first fragments (RFC 8200 §4.5) of datagrams that never complete, from the
   same 1M sources, to the forwarded DNS port: the reassembler's budgets and eviction;
3. ``overload``: valid UDP datagrams to the forwarded DNS port, each source a new session.

Each flood is offered at ``--load`` (default 2) times the gateway's capacity, measured first as
the packets per second it takes in while the generator sends flat out (``capacity``). Printed
per flood: offered rate, the client's download time beside its time on the idle gateway (the
download must complete: exit 1 otherwise), the gateway's RSS before and after (flat, not
growing with the flood), sessions and drops by reason.

Beside it, the same SYN flood against the Linux kernel's own stateful path in the same run:
plain IPv6 forwarded through a namespace whose nftables ruleset uses conntrack, the same client
downloading the same file; printed: its download time and conntrack's table size and early
drops (/proc/net/stat/nf_conntrack), the behaviour sixgate's unassured-session eviction copies.

CI runs a short version (tests/test_soak_smoke.py: 2 s per flood).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import labs  # noqa: E402
from bench.labs import netlab  # noqa: E402
from bench.programs import build  # noqa: E402

# Each flood comes from a 6to4 site of its own (RFC 3056 §2: 2002:<IPv4>::/48), never the
# client's (198.51.100.1): the address added to the peer's veth and its /48.
FLOOD_SITES = {"calibrate": "198.51.100.3", "syn": "198.51.100.4", "fragments": "198.51.100.5",
               "overload": "198.51.100.6"}


def site_prefix48(ipv4: str) -> str:
    a, b, c, d = (int(x) for x in ipv4.split("."))
    return f"2002:{a << 8 | b:x}:{c << 8 | d:x}"


SOURCES = ("--subnets", "1024", "--hosts", "1024", "--ports", "1")  # 1M distinct sources
HTTP_PORT = 80  # forwarded to the lab's http.server (netlab.FORWARD_TOML)
DNS_PORT = 53  # forwarded to the lab's dnsmasq
CALIBRATE_S = 2.0
FLOODS = {
    "syn": ("--syn", "--dport", str(HTTP_PORT)),
    "fragments": ("--fragments", "--payload", "64", "--dport", str(DNS_PORT)),
    "overload": ("--payload", "32", "--dport", str(DNS_PORT)),
}
CONNTRACK_RULES = (f"table inet {labs.NFT_TABLE} {{\n"
                   " chain forward {\n"
                   "  type filter hook forward priority filter; policy accept;\n"
                   "  ct state established,related accept\n"
                   "  ct state new accept\n"
                   " }\n"
                   "}\n")


@dataclass
class Phase:
    name: str
    offered_pps: float = 0.0
    sent: int = 0
    download_s: float | None = None  # None: the download failed
    download_error: str = ""
    rss_before: int = 0
    rss_after: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def gateway_rss(pids: list[int]) -> int:
    return sum(labs.process_rss_bytes(pid) for pid in pids)


def metric_total(series: dict[str, dict[Any, float]], name: str,
                 **match: str) -> dict[str, float]:
    """Values of ``name`` summed per ``reason`` (or in total, key "")."""
    out: dict[str, float] = {}
    for labels, value in series.get(name, {}).items():
        labels = dict(labels)
        if all(labels.get(k) == v for k, v in match.items()):
            key = labels.get("reason", "")
            out[key] = out.get(key, 0.0) + value
    return out


class SoakLab(labs.BenchTarget, netlab.Lab):
    """The test lab (tunnel peer, http.server with the 10 MB file, dnsmasq, real gateway)."""

    label = "sixgate"
    gen_mode = "6to4"

    def __init__(self, files: netlab.ServedFiles) -> None:
        super().__init__("6to4", 2, files, fanout="kernel")
        self.site = FLOOD_SITES["calibrate"]

    def create_namespaces(self) -> None:
        super().create_namespaces()
        for address in FLOOD_SITES.values():
            self.ip(self.peer_ns, "addr", "add", f"{address}/24", "dev", "veth0")

    def gen_args(self) -> list[str]:
        return ["--mode", "6to4", "--src4", self.site, "--dst4", netlab.GATEWAY_IPV4,
                "--prefix48", site_prefix48(self.site), "--dst6", self.plan.gateway_address]

    def metrics(self) -> dict[str, dict[Any, float]]:
        return labs.SixgateLab.metrics(self)

    def gateway_pids(self) -> list[int]:
        coordinator = self.processes["sixgate"].pid
        return [coordinator, *labs.children(coordinator)]

    def received(self) -> float:
        return sum(metric_total(self.metrics(), "sixgate_tunnel_received_packets_total")
                   .values())


def download(lab: netlab.Lab, namespace: str, url: str, expected_sha256: str,
             timeout_s: float) -> tuple[float | None, str]:
    """curl -6 the file; (seconds, "") or (None, why it failed)."""
    target = lab.tmp / "soak.download"
    started = time.monotonic()
    done = netlab.run(netlab.in_ns(namespace, [
        "curl", "-6", "-g", "-sS", "--max-time", str(int(timeout_s)), "-o", str(target), url]),
        timeout=timeout_s + 10, check=False)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        return None, f"curl exit {done.returncode}: {done.stderr.strip()}"
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != expected_sha256:
        return None, "the file arrived changed"
    return elapsed, ""


def flood_while_downloading(lab: SoakLab | KernelReference, gen: Path, args: tuple[str, ...],
                            rate: float, seconds: float, url: str, sha256: str,
                            namespace: str, download_timeout_s: float
                            ) -> tuple[dict[str, Any], float | None, str]:
    """Start the flood, download during it, keep flooding for at least ``seconds``."""
    started = time.monotonic()
    flood = lab.start_gen(gen, *SOURCES, *args, "--rate", str(int(rate)),
                          "--duration", str(seconds + download_timeout_s))
    time.sleep(min(1.0, seconds / 4))  # the flood has built up before the client starts
    took, error = download(lab, namespace, url, sha256, download_timeout_s)
    left = seconds - (time.monotonic() - started)
    if left > 0:
        time.sleep(left)
    flood.terminate()
    out, _ = flood.communicate(timeout=10)
    return json.loads(out), took, error


def sixgate_phases(files: netlab.ServedFiles, gen: Path, seconds: float, load: float,
                   download_timeout_s: float) -> tuple[float, list[Phase], float | None]:
    """Capacity, the idle download time, then each flood."""
    phases = []
    with SoakLab(files) as lab:
        url = netlab.http_url(lab, f"/{files.mid.name}")
        idle_s, error = download(lab, lab.peer_ns, url, files.mid.sha256, download_timeout_s)
        if idle_s is None:
            raise SystemExit(f"soak: the idle download failed: {error}")
        before = lab.received()
        calibrate = lab.start_gen(gen, *SOURCES, *FLOODS["overload"], "--rate", "0",
                                  "--duration", str(CALIBRATE_S))
        calibrate.communicate(timeout=CALIBRATE_S + 30)
        capacity = (labs.wait_quiet(lab.received) - before) / CALIBRATE_S
        for name, args in FLOODS.items():
            phase = Phase(name, rss_before=gateway_rss(lab.gateway_pids()))
            lab.site = FLOOD_SITES[name]
            drops_before = metric_total(lab.metrics(), "sixgate_drops_total")
            sent, phase.download_s, phase.download_error = flood_while_downloading(
                lab, gen, args, capacity * load, seconds, url, files.mid.sha256, lab.peer_ns,
                download_timeout_s)
            phase.sent = int(sent["sent"])
            phase.offered_pps = sent["sent"] / sent["seconds"] if sent["seconds"] else 0.0
            series = lab.metrics()
            phase.rss_after = gateway_rss(lab.gateway_pids())
            after = metric_total(series, "sixgate_drops_total")
            phase.drops = {reason: int(after[reason] - drops_before.get(reason, 0))
                           for reason in after if after[reason] - drops_before.get(reason, 0)}
            phase.extra["sessions"] = int(sum(metric_total(series, "sixgate_flows_active")
                                              .values()))
            phases.append(phase)
        internal = metric_total(lab.metrics(), "sixgate_drops_total").get("internal_error", 0)
        if internal:
            raise SystemExit(f"soak: internal_error is {internal:.0f}, expected 0")
    return capacity, phases, idle_s


class KernelReference(labs.KernelLab):
    """The kernel forwarding plain IPv6 with conntrack (nftables ct), an http.server behind."""

    label = "kernel+conntrack"

    def __init__(self, files: netlab.ServedFiles) -> None:
        super().__init__()
        self.files_dir = files.directory

    def start(self) -> None:
        super().start()
        netlab.run(netlab.in_ns(self.gw_ns, ["nft", "-f", "-"]), input=CONNTRACK_RULES)
        self.sysctl(self.service_ns, "net.ipv4.tcp_syncookies=2")
        # The lab's http.server, listening on IPv6.
        self.spawn("http", self.service_ns, netlab.http_server_argv(
            labs.SERVICE_V6, HTTP_PORT, self.files_dir))
        netlab.wait_until(lambda: self.exec_in(self.service_ns, [
            "ss", "-Hltn", f"sport = :{HTTP_PORT}"]).stdout.strip() != "", timeout=15,
            what="the reference's http.server")

    def conntrack(self) -> dict[str, int]:
        """Entries in the table and early drops so far (per-CPU hex columns summed)."""
        count = int(self.exec_in(self.gw_ns, ["cat", "/proc/sys/net/netfilter/"
                                              "nf_conntrack_count"]).stdout.strip() or 0)
        lines = self.exec_in(self.gw_ns, ["cat", "/proc/net/stat/nf_conntrack"]).stdout.split(
            "\n")
        header = lines[0].split()
        early = sum(int(line.split()[header.index("early_drop")], 16)
                    for line in lines[1:] if line.strip())
        limit = int(self.exec_in(self.gw_ns, ["cat", "/proc/sys/net/netfilter/"
                                              "nf_conntrack_max"]).stdout.strip() or 0)
        return {"entries": count, "early_drop": early, "max": limit}


def kernel_phase(files: netlab.ServedFiles, gen: Path, seconds: float, rate: float,
                 download_timeout_s: float) -> tuple[Phase, float | None]:
    with KernelReference(files) as lab:
        url = f"http://[{labs.SERVICE_V6}]:{HTTP_PORT}/{files.mid.name}"
        idle_s, error = download(lab, lab.peer_ns, url, files.mid.sha256, download_timeout_s)
        if idle_s is None:
            raise SystemExit(f"soak: the reference's idle download failed: {error}")
        before = lab.conntrack()
        phase = Phase("syn")
        sent, phase.download_s, phase.download_error = flood_while_downloading(
            lab, gen, ("--syn", "--dport", str(HTTP_PORT)), rate, seconds, url,
            files.mid.sha256, lab.peer_ns, download_timeout_s)
        phase.sent = int(sent["sent"])
        phase.offered_pps = sent["sent"] / sent["seconds"] if sent["seconds"] else 0.0
        after = lab.conntrack()
        phase.extra = {"conntrack_entries": after["entries"], "conntrack_max": after["max"],
                       "early_drop": after["early_drop"] - before["early_drop"]}
        return phase, idle_s


def _mb(value: int) -> str:
    return f"{value / (1 << 20):.1f} MB"


def report(capacity: float, load: float, idle_s: float | None, phases: list[Phase],
           kernel: tuple[Phase, float | None] | None, seconds: float) -> bool:
    """Print the figures; whether every download completed."""
    ok = True
    print(f"soak: {seconds:g} s per flood from 1M sources of one 6to4 /48; sixgate capacity "
          f"{capacity / 1e3:.1f}k packets/s "
          f"(flat out, {CALIBRATE_S:g} s); floods offered at {load:g}x")
    print(f"  idle gateway: 10 MB download in {idle_s:.2f} s")
    for phase in phases:
        ok &= phase.download_s is not None
        took = (f"{phase.download_s:.2f} s ({phase.download_s / idle_s:.1f}x idle)"
                if phase.download_s is not None and idle_s else
                f"FAILED: {phase.download_error}")
        ratio = phase.offered_pps / capacity if capacity else 0.0
        print(f"  {phase.name:<9} offered {phase.offered_pps / 1e3:7.1f}k/s "
              f"({ratio:.1f}x capacity, {phase.sent} packets); download {took}")
        print(f"            RSS {_mb(phase.rss_before)} -> {_mb(phase.rss_after)}; "
              f"sessions at the end {phase.extra.get('sessions', 0)}; drops "
              + (", ".join(f"{reason} {count}" for reason, count in sorted(
                  phase.drops.items(), key=lambda item: -item[1])) or "none"))
    if kernel is not None:
        phase, kernel_idle = kernel
        took = (f"{phase.download_s:.2f} s ({phase.download_s / kernel_idle:.1f}x its idle "
                f"{kernel_idle:.2f} s)" if phase.download_s is not None and kernel_idle else
                f"FAILED: {phase.download_error}")
        print(f"  kernel+conntrack SYN flood offered {phase.offered_pps / 1e3:.1f}k/s: "
              f"download {took}; conntrack entries {phase.extra['conntrack_entries']} of "
              f"{phase.extra['conntrack_max']}, "
              f"early drops {phase.extra['early_drop']}")
        mine = next((p for p in phases if p.name == "syn"), None)
        if mine and mine.download_s and phase.download_s and idle_s and kernel_idle:
            print(f"  ratio (slowdown under SYN flood, sixgate / kernel): "
                  f"{(mine.download_s / idle_s) / (phase.download_s / kernel_idle):.2f}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="per flood")
    parser.add_argument("--load", type=float, default=2.0, help="times the capacity")
    parser.add_argument("--no-kernel", action="store_true", help="skip the kernel reference")
    parser.add_argument("--download-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    missing = netlab.missing_requirements()
    if missing:
        print("soak cannot run: " + "; ".join(missing), file=sys.stderr)
        return 2
    programs = build()
    labs.sweep_leftovers()
    files = netlab.make_served_files(big_mb=1, mid_mb=10)
    try:
        capacity, phases, idle_s = sixgate_phases(files, programs["gen"], args.seconds,
                                                  args.load, args.download_timeout)
        kernel = None if args.no_kernel else kernel_phase(
            files, programs["gen"], args.seconds, capacity * args.load, args.download_timeout)
    finally:
        subprocess.run(["rm", "-rf", str(files.directory)], check=False)
    return 0 if report(capacity, args.load, idle_s, phases, kernel, args.seconds) else 1


if __name__ == "__main__":
    sys.exit(main())
