"""Measurements on one system under test: trials, the loss-free rate search, latency, flows.

A trial runs the generator for ``duration_s`` at a fixed rate (or flat out) and reads three
things: the totals after the queues drained (sent vs arrived: the loss), and a window in the
middle of the run (25% to 95% of it) for the steady rate and the CPU of the gateway's
processes, so that packets still queued when the generator stops neither inflate the rate at
overload nor hide in the CPU figure. Per-core efficiency is the window's delivered packets per
CPU second of all the gateway's processes (= delivered pps / (CPU seconds / run seconds)).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import labs
from bench.programs import SinkCounts, read_counts

LOSS_LIMIT = 0.001  # "carried" = less than 0.1% lost
FOREIGN_WARN = 0.05  # other load on the gateway CPUs worth a mention, in cores
KEEP_PACE = 0.97  # delivered in the window / offered, for a rate to count as carried
WINDOW = (0.25, 0.95)  # part of a trial whose rate and CPU are reported
FLOWS = ("--subnets", "64", "--hosts", "1", "--ports", "16")  # 1024 flows over 64 /64s
SERVICE_FLOWS = (*FLOWS, "--dport", str(labs.SERVICE_PORT))  # those flows to the sink


@dataclass
class Trial:
    """One generator run against one system."""

    target: str
    payload: int
    kind: str  # forward | round trip | syn flood
    rate: float  # requested packets/s (0 = flat out)
    sent: int
    gen_seconds: float
    arrived: int  # counted by the end (at the service; back at the peer for round trips)
    window_s: float
    window_packets: int  # counted in the window (same side as ``arrived``)
    window_cpu_s: dict[str, float]  # CPU seconds per gateway process in the window
    # Busy seconds of the gateway CPUs in the window (None unpinned): what is not the gateway's
    # own is other load on this machine, which lowers absolute rates (not per-core figures).
    window_busy_s: float | None = None
    drops: dict[str, int] = field(default_factory=dict)  # why packets were lost, by reason

    @property
    def offered_pps(self) -> float:
        return self.sent / self.gen_seconds if self.gen_seconds else 0.0

    @property
    def loss(self) -> float:
        return 1 - self.arrived / self.sent if self.sent else 1.0

    @property
    def delivered_pps(self) -> float:
        return self.window_packets / self.window_s if self.window_s else 0.0

    @property
    def cpu_cores(self) -> float | None:
        """CPU seconds per second of all the gateway's processes (None: not measurable)."""
        if not self.window_cpu_s or not self.window_s:
            return None
        return sum(self.window_cpu_s.values()) / self.window_s

    @property
    def foreign_cores(self) -> float | None:
        """CPU of the gateway CPUs used by anything but the gateway, per second of window."""
        if self.window_busy_s is None or not self.window_s:
            return None
        return max(0.0, self.window_busy_s - sum(self.window_cpu_s.values())) / self.window_s

    @property
    def per_core_pps(self) -> float | None:
        cores = self.cpu_cores
        return self.delivered_pps / cores if cores else None

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(offered_pps=self.offered_pps, loss=self.loss, foreign_cores=self.foreign_cores,
                    delivered_pps=self.delivered_pps, cpu_cores=self.cpu_cores,
                    per_core_pps=self.per_core_pps)
        return data


def carried(trial: Trial) -> bool:
    """Carried without loss: under 0.1% lost, and the gateway kept pace during the window
    (its queues hold tens of thousands of packets: a short overload run can end loss-free
    with the backlog still draining, which is not a rate the gateway sustains)."""
    return trial.loss < LOSS_LIMIT and trial.delivered_pps >= KEEP_PACE * trial.offered_pps


class Bench:
    """Trials against one system under test, with its sinks already running."""

    def __init__(self, target: labs.BenchTarget, programs: dict[str, Path], duration_s: float,
                 log: Callable[[str], None] = print) -> None:
        self.target = target
        self.programs = programs
        self.duration_s = duration_s
        self.log = log
        self.trials: list[Trial] = []
        # The kernel's forwarding belongs to no process: its CPU is the interrupt and softirq
        # time of the gateway CPUs (where RPS sends it) plus their ksoftirqd threads.
        self.gateway_cpus = labs.cpu_list(target.gateway_cpus) if target.gateway_cpus else None

    def cpu_sample(self) -> tuple[dict[str, float], float | None]:
        """(CPU seconds per gateway process, busy seconds of the gateway CPUs) so far."""
        busy = labs.cpu_busy_s(self.gateway_cpus) if self.gateway_cpus else None
        if isinstance(self.target, labs.KernelLab):
            return ({} if busy is None else labs.kernel_cpu_s(self.gateway_cpus or [])), busy
        return self.target.cpu_sample(), busy

    def kernel_drops(self) -> dict[str, int]:
        """Counters of the kernel that explain losses outside the gateway's own accounting."""
        found: dict[str, int] = {}
        raw = self.target.exec_in(self.target.gw_ns, ["cat", "/proc/net/raw"]).stdout
        # Protocol-41 sockets' receive buffers (sixgate's capture): local_address ends ":0029".
        found["kernel_raw41_rcvbuf"] = sum(
            int(words[-1]) for words in map(str.split, raw.splitlines())
            if len(words) > 12 and words[1].endswith(":0029"))
        # TUN devices' transmit queues: what the kernel had for a gateway that did not read
        # it in time (sixgate's replies from the services, everything for TAYGA).
        links = json.loads(self.target.exec_in(self.target.gw_ns, [
            "ip", "-s", "-j", "link", "show", "type", "tun"]).stdout or "[]")
        found["kernel_tun_txqueue"] = sum(int(link.get("stats64", {}).get("tx", {})
                                              .get("dropped", 0)) for link in links)
        snmp = self.target.exec_in(self.target.service_ns, ["cat", "/proc/net/snmp",
                                                            "/proc/net/snmp6"]).stdout
        names: list[str] = []
        for line in snmp.splitlines():
            words = line.split()
            if words and words[0] == "Udp:":
                if not names:
                    names = words[1:]
                else:
                    found["sink_udp_rcvbuf"] = int(dict(zip(names, words[1:],
                                                            strict=False))["RcvbufErrors"])
            elif words and words[0] == "Udp6RcvbufErrors":
                found["sink_udp_rcvbuf"] = found.get("sink_udp_rcvbuf", 0) + int(words[1])
        softnet = Path("/proc/net/softnet_stat").read_text().split("\n")
        found["kernel_backlog"] = sum(int(line.split()[1], 16) for line in softnet if line)
        return found

    def gateway_drops(self) -> dict[str, int]:
        """sixgate's drop counters by reason (summed over processes) plus the kernel's."""
        found = self.kernel_drops()
        series = self.target.metrics().get("sixgate_drops_total", {})
        for labels, value in series.items():
            reason = dict(labels).get("reason", "?")
            found[reason] = found.get(reason, 0) + int(value)
        return found

    def trial(self, counted: Path, payload: int, rate: float, *, kind: str = "forward",
              gen_args: tuple[str, ...] = FLOWS, also: Path | None = None,
              duration_s: float | None = None) -> Trial:
        """One run of the generator; ``counted`` is the counter that says what arrived
        (``also``: another one that must drain too before the totals are read)."""
        duration = duration_s or self.duration_s

        def drained() -> tuple[SinkCounts, SinkCounts | None]:
            return read_counts(counted), read_counts(also) if also else None

        drops_before = self.gateway_drops()
        start_counts = read_counts(counted)
        also_start = read_counts(also) if also is not None else None
        gen = self.target.start_gen(self.programs["gen"], "--payload", str(payload),
                                    "--rate", f"{rate:.0f}", "--duration", f"{duration}",
                                    *gen_args)
        started = time.monotonic()
        samples = []
        for fraction in WINDOW:
            time.sleep(max(0.0, started + fraction * duration - time.monotonic()))
            samples.append((time.monotonic(), read_counts(counted), self.cpu_sample()))
        out, err = gen.communicate(timeout=duration + 30)
        if gen.returncode != 0:
            raise labs.netlab.LabError(f"gen exited {gen.returncode}: {err}")
        summary = json.loads(out)
        labs.wait_quiet(drained)
        end_counts = read_counts(counted)
        drops_after = self.gateway_drops()
        if also is not None:  # the reflector's refused sends
            drops_before["reflector_refused"] = also_start.reflect_errors if also_start else 0
            drops_after["reflector_refused"] = read_counts(also).reflect_errors
        (t0, c0, (cpu0, busy0)), (t1, c1, (cpu1, busy1)) = samples
        trial = Trial(
            target=self.target.label, payload=payload, kind=kind, rate=rate,
            sent=int(summary["sent"]), gen_seconds=float(summary["seconds"]),
            arrived=end_counts.minus(start_counts).packets, window_s=t1 - t0,
            window_packets=c1.minus(c0).packets,
            window_cpu_s={name: cpu1[name] - cpu0[name] for name in cpu1 if name in cpu0},
            window_busy_s=None if busy0 is None or busy1 is None else busy1 - busy0,
            drops={reason: after - drops_before.get(reason, 0)
                   for reason, after in drops_after.items()
                   if after - drops_before.get(reason, 0) > 0})
        self.trials.append(trial)
        self.log(f"    {trial.target:<11} {payload:>4} B {kind:<10} offered "
                 f"{trial.offered_pps / 1e3:8.1f}k/s  carried {trial.delivered_pps / 1e3:8.1f}k/s"
                 f"  loss {trial.loss * 100:6.2f}%  cpu {_cores(trial.cpu_cores)}"
                 + (f"  other load {trial.foreign_cores:.2f}"
                    if (trial.foreign_cores or 0) > FOREIGN_WARN else "")
                 + (f"  drops {trial.drops}" if trial.drops else ""))
        return trial

    def search(self, counted: Path, payload: int, *, kind: str = "forward",
               also: Path | None = None, max_trials: int = 6, tolerance: float = 1.04,
               hint_pps: float = 0.0, duration_s: float | None = None,
               gen_args: Callable[[], tuple[str, ...]] | None = None,
               ) -> tuple[Trial, Trial | None]:
        """(throughput at overload, the highest rate carried with < 0.1% loss or None).

        Overload first (flat out), then a geometric bisection between the best carried rate
        and the lowest failed one, starting at what overload carried or ``hint_pps``."""
        def run(rate: float) -> Trial:
            args = gen_args() if gen_args else SERVICE_FLOWS
            return self.trial(counted, payload, rate, kind=kind, gen_args=args, also=also,
                              duration_s=duration_s)

        overload = run(0)
        if carried(overload):
            return overload, overload  # the generator, not the gateway, is the limit
        best: Trial | None = None
        high = overload.offered_pps
        rate = min(max(overload.delivered_pps * 0.95, hint_pps, 1000.0), high * 0.9)
        for _ in range(max_trials):
            trial = run(rate)
            if carried(trial):
                if best is None or trial.offered_pps > best.offered_pps:
                    best = trial
            else:
                high = min(high, rate)
            if best is not None and high / best.rate < tolerance:
                break
            # Upwards at most 2x a step: a thrashing gateway can carry far less at overload
            # than its capacity, so the first guess may be far too low.
            rate = min(math.sqrt(best.rate * high), best.rate * 2) if best else rate * 0.6
        return overload, best

    def warm_up(self, counters: Path) -> None:
        """Every flow twice at a gentle rate: bindings exist before anything is measured."""
        self.target.run_gen(self.programs["gen"], "--payload", "18", "--dport",
                            str(labs.SERVICE_PORT), "--rate", "5000", "--count", "2048", *FLOWS)
        labs.wait_quiet(lambda: read_counts(counters))

    # -- latency

    def latency(self, load_pps: float, count: int, interval_ms: int, loaded_count: int,
                loaded_interval_ms: int) -> dict[str, Any]:
        """Echo round trips, idle and while the generator offers ``load_pps`` (64 B). Under
        load both systems of a run have stalls of 1-5 ms (this machine's, a few per second:
        seen with TAYGA too), so p99 is only a figure with ``loaded_count`` of 1000 or more:
        of 150 pings it was the second slowest, one stall more or less (issue 21)."""
        idle = self.target.ping(self.programs["pinger"], count, interval_ms)
        load_s = loaded_count * loaded_interval_ms / 1000 + 5
        gen = self.target.start_gen(self.programs["gen"], "--payload", "18", "--dport",
                                    str(labs.SERVICE_PORT), "--rate", f"{load_pps:.0f}",
                                    "--duration", f"{load_s}", *FLOWS)
        time.sleep(0.5)
        loaded = self.target.ping(self.programs["pinger"], loaded_count, loaded_interval_ms)
        labs.netlab.stop_process(gen, 5)
        result = {"load_pps": load_pps, "idle": summarise_rtts(idle),
                  "loaded": summarise_rtts(loaded)}
        self.log(f"    {self.target.label:<11} echo RTT idle p50 {_us(result['idle']['p50_us'])}"
                 f" p99 {_us(result['idle']['p99_us'])}; at {load_pps / 1e3:.1f}k/s p50 "
                 f"{_us(result['loaded']['p50_us'])} p99 {_us(result['loaded']['p99_us'])}")
        return result


def summarise_rtts(reply: dict[str, Any]) -> dict[str, Any]:
    """p50/p99 of pinger.c's round trips (microseconds)."""
    rtts = sorted(float(value) for value in reply["rtt_us"])
    return {"sent": reply["sent"], "received": reply["received"],
            "p50_us": percentile(rtts, 50), "p99_us": percentile(rtts, 99)}


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of sorted values (None when empty)."""
    if not values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(values)))
    return values[rank - 1]


def _cores(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:5.2f}"


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} µs"


# --------------------------------------------------------------------------- flows (sixgate)

SYN_FLOWS = ("--subnets", "64", "--hosts", "16", "--ports", "64000", "--port-base", "1024",
             "--syn", "--dport", str(labs.TCP_PORT))  # 65M distinct flows: none repeats
MEMORY_CLIENTS = ("--subnets", "256", "--hosts", "4")  # 1024 clients (one pool address each)
MEMORY_PORT_BASE = 20000  # apart from the throughput flows' ports 1024..1039
MEMORY_PASSES = 4
MEMORY_MIN_RATE = 1000.0  # new bindings per second: the slowest pass offered
GEN_MAX_PPS = 1_000_000  # more than gen.c sends on one core here: flows never repeat


def metric_sum(series: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str) -> float:
    """A metric summed over all its label sets."""
    return sum(series.get(name, {}).values())


def syn_flood(bench: Bench, duration_s: float, max_trials: int) -> dict[str, Any]:
    """New TCP flows per second: SYNs from 1024 clients x 64000 ports (each SYN a new flow:
    every trial starts where the last one stopped), flat out and the highest rate whose
    flows are all set up; a flow is set up when the service's SYN+ACK came back through the
    gateway to the peer."""
    target = bench.target
    sink = bench.programs["sink"]
    starts = itertools.count(0, int(GEN_MAX_PPS * duration_s) + 1)

    def fresh_flows() -> tuple[str, ...]:
        return (*SYN_FLOWS, "--first-flow", str(next(starts)))

    listener = target.start_sink(sink, "--tcp-listen", target.tcp_listen_endpoint())
    try:
        with target.flow_state(), target.return_counter(sink, synack=True) as synacks:
            created_before = metric_sum(target.metrics(), "sixgate_flows_created_total")
            trials_before = len(bench.trials)
            overload, best = bench.search(synacks, 0, kind="syn flood", gen_args=fresh_flows,
                                          max_trials=max_trials, duration_s=duration_s)
            created = metric_sum(target.metrics(), "sixgate_flows_created_total") - created_before
    finally:
        target.stop_sink(listener)
    result = {"overload": {"syn_offered_pps": overload.offered_pps,
                           "flows_per_s": overload.delivered_pps,
                           "cpu_cores": overload.cpu_cores,
                           "per_core_flows_per_s": overload.per_core_pps,
                           "drops": overload.drops},
              "loss_free": None if best is None else {
                  "flows_per_s": best.offered_pps, "cpu_cores": best.cpu_cores,
                  "per_core_flows_per_s": best.per_core_pps},
              "flows_created": created, "trials": len(bench.trials) - trials_before}
    bench.log(f"    {target.label:<11} SYN flood: {overload.delivered_pps / 1e3:.1f}k flows/s set "
              f"up at {overload.offered_pps / 1e3:.1f}k SYN/s; all set up up to "
              f"{(best.offered_pps if best else 0) / 1e3:.1f}k/s")
    return result


def memory_per_binding(bench: Bench, counters: Path, sizes: tuple[int, ...],
                       rate: float) -> list[dict[str, Any]]:
    """RSS of the workers with 10k, 100k, 1M ... live UDP bindings, each a client address and
    port whose datagram the service answered (an assured binding: it lives the UDP timeout,
    2 min, where an unanswered one lives 30 s, less than a million take to set up here).

    Each pass offers every binding once at the pace of the one before, starting at ``rate``;
    a pass that leaves bindings missing (the worker sets up fewer per second than offered: the
    kernel drops the rest at its capture, counted as capture_overflow) is repeated at 0.8 of
    the rate the worker did set them up at in it, until all are there, so a million is
    measured directly, not extrapolated (issue 21)."""
    target = bench.target

    def workers_rss() -> int:
        return sum(labs.process_rss_bytes(pid) for name, pid in
                   target.gateway_processes().items() if name.startswith("worker"))

    def bindings() -> int:
        return int(metric_sum(target.metrics(), "sixgate_flows_active"))

    base_rss, base_bindings = workers_rss(), bindings()
    rows = []
    for size in sizes:
        started = time.monotonic()
        passes = []
        live = 0
        for _ in range(MEMORY_PASSES):
            before = bindings()
            sent = target.run_gen(bench.programs["gen"], "--payload", "18", "--dport",
                           str(labs.SERVICE_PORT), "--rate", f"{rate:.0f}", "--count", str(size),
                           *MEMORY_CLIENTS, "--ports", str(-(-size // 1024)),
                           "--port-base", str(MEMORY_PORT_BASE), timeout=size / rate * 3 + 60)
            labs.wait_quiet(lambda: read_counts(counters))
            after = bindings()
            live = after - base_bindings
            passes.append(rate)
            if live >= size * 0.99:
                break
            set_up_per_s = (after - before) / max(float(sent["seconds"]), 0.1)
            rate = max(MEMORY_MIN_RATE, min(rate, 0.8 * set_up_per_s))
        rss = workers_rss()
        total = bindings()
        row = {"target_bindings": size, "bindings": total, "new_bindings": live,
               "workers_rss_bytes": rss, "bytes_per_binding": rss / total if total else None,
               "marginal_bytes_per_binding": (rss - base_rss) / live if live else None,
               "seconds": time.monotonic() - started, "pass_rates": passes}
        rows.append(row)
        bench.log(f"    {target.label:<11} {total:>9,} bindings: workers' RSS "
                  f"{rss / 2**20:7.1f} MiB = {_bytes(row['bytes_per_binding'])}/binding "
                  f"({_bytes(row['marginal_bytes_per_binding'])} each above the "
                  f"{base_bindings:,}-binding baseline); offered at "
                  + ", then ".join(f"{r / 1e3:.1f}k/s" for r in passes))
    return rows


def _bytes(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} B"
