"""End-to-end benchmark: sixgate beside TAYGA and the kernel, same generator and sinks, one run.

    make bench-quick     # about 4 minutes: .venv/bin/python -m bench.e2e --quick
    make bench           # everything, about 30 minutes: .venv/bin/python -m bench.e2e

Builds namespace labs from the test lab's pieces (bench/labs.py), compiles the C traffic
programs (bench/gen.c, sink.c, pinger.c) and measures, for 64- and 1400-byte UDP payloads, the
highest rate carried with < 0.1% loss and the throughput at overload, forward (peer -> gateway
-> service) and round trip (a reflector sends every datagram back: service -> gateway -> peer),
with the CPU of every gateway process from /proc; per worker count for sixgate; then echo
latency idle and at 50% of the loss-free rate, new TCP flows per second under a SYN flood and
memory per binding. Prints tables and the ratios, writes bench/results/<UTC time>.json and a
PNG chart beside it. Figures, not assertions (STYLE.md): it exits 0 whenever it measured.

Needs root, network namespaces, /dev/net/tun, gcc and tayga (bench/bootstrap.sh installs them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import chart, labs, measure
from bench.programs import build

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Plan:
    """How much to measure."""

    name: str
    duration_s: float  # one trial
    search_trials: int  # trials after the overload one, per search
    workers: tuple[int, ...]
    forward_payloads: tuple[int, ...]
    round_trip_payloads: tuple[int, ...]
    pings: int  # idle: as far apart as an idle gateway's pings are
    ping_interval_ms: int
    loaded_pings: int  # under load: enough that p99 is not one or two of them (issue 21)
    loaded_interval_ms: int
    memory_sizes: tuple[int, ...]
    syn_flood_s: float
    paired_rounds: int  # NAT64 and TAYGA flat out, alternated (``paired``)


def plans(cores: int) -> dict[str, Plan]:
    workers = tuple(sorted({1, 2, cores}))
    return {
        "quick": Plan("quick", 1.2, 4, tuple(sorted({1, cores})), (64, 1400), (64,), 150, 10,
                      1000, 2, (10_000, 100_000), 2.0, 3),
        "full": Plan("full", 5.0, 8, workers, (64, 1400), (64, 1400), 1000, 5, 3000, 2,
                     (10_000, 100_000, 1_000_000), 5.0, 5),
    }


# The load under which the echo RTT is measured: the same for every system of a run (half a
# system's own loss-free rate when that is lower), since the pinger shares its CPU with the
# generator and the sink, whose work grows with the rate: at each system's own half rate, the
# fastest gateway had its pings measured beside the most traffic (issue 21).
LATENCY_LOAD_PPS = 50_000


def log(text: str) -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------- one system


def trial_summary(overload: measure.Trial, best: measure.Trial | None) -> dict[str, Any]:
    """The figures of one search: throughput at overload and the loss-free rate."""
    def figures(trial: measure.Trial) -> dict[str, Any]:
        window = trial.window_s or 1.0
        return {"offered_pps": trial.offered_pps, "delivered_pps": trial.delivered_pps,
                "loss": trial.loss, "cpu_cores": trial.cpu_cores,
                "per_core_pps": trial.per_core_pps, "drops": trial.drops,
                "foreign_cores": trial.foreign_cores,
                "cpu_cores_by_process": {name: cpu / window
                                         for name, cpu in trial.window_cpu_s.items()}}
    return {"overload": figures(overload), "loss_free": figures(best) if best else None,
            # Carried flat out: the generator's core, not the system, was the limit.
            "generator_limited": best is overload}


def measure_system(lab: labs.BenchTarget, plan: Plan, programs: dict[str, Path], *,
                   latency: bool, flows: bool, memory: bool = False,
                   round_trip: bool = True) -> dict[str, Any]:
    """Every figure the plan asks of one system (its lab is up)."""
    bench = measure.Bench(lab, programs, plan.duration_s, log)
    sink = programs["sink"]
    out: dict[str, Any] = {"label": lab.label, "forward": {}, "round_trip": {}}
    with lab.service_sink(sink, reflect=False) as counters:
        bench.warm_up(counters)
        for payload in plan.forward_payloads:
            overload, best = bench.search(counters, payload, max_trials=plan.search_trials)
            out["forward"][str(payload)] = trial_summary(overload, best)
        loss_free_64 = _loss_free(out, "forward", 64)
        if latency:
            out["latency"] = bench.latency(min(LATENCY_LOAD_PPS, 0.5 * (loss_free_64 or 0)),
                                           plan.pings, plan.ping_interval_ms,
                                           plan.loaded_pings, plan.loaded_interval_ms)
    if plan.round_trip_payloads and round_trip:
        with lab.service_sink(sink, reflect=True) as counters, \
                lab.return_counter(sink) as returns:
            for payload in plan.round_trip_payloads:
                # Each round trip is two translations: half the forward rate is a fair start.
                hint = 0.5 * (_loss_free(out, "forward", payload) or 0)
                overload, best = bench.search(returns, payload, kind="round trip", also=counters,
                                              max_trials=plan.search_trials, hint_pps=hint)
                out["round_trip"][str(payload)] = trial_summary(overload, best)
    if memory:
        # The service answers each binding (assured: it lives 2 min, long enough for 1M to
        # be set up); the answers go back through the gateway to the peer, which drops them.
        # Before the SYN flood, whose sessions would still be live (30 s unassured).
        with lab.service_sink(sink, reflect=True) as counters, lab.return_counter(sink):
            out["memory"] = measure.memory_per_binding(
                bench, counters, plan.memory_sizes, rate=max(0.5 * (loss_free_64 or 0), 5000))
    if flows:
        out["syn_flood"] = measure.syn_flood(bench, plan.syn_flood_s, plan.search_trials)
    out["trials"] = [trial.as_json() for trial in bench.trials]
    return out


def paired(make: tuple[Callable[[], labs.BenchTarget], Callable[[], labs.BenchTarget]],
           plan: Plan, programs: dict[str, Path]) -> dict[str, Any]:
    """Two systems' per-core figures flat out at each forward payload, alternated round by
    round (each lab up for its trials): a machine that speeds up or slows down during the run
    (2x over a day here) moves both sides of a round alike, where the searches measure them
    minutes apart. Per payload: each round's two figures, their ratio, the median ratio."""
    rounds: dict[int, list[list[float | None]]] = {payload: [] for payload in
                                                   plan.forward_payloads}
    for number in range(1, plan.paired_rounds + 1):
        figures: dict[int, list[float | None]] = {payload: [] for payload in
                                                  plan.forward_payloads}
        for make_lab in make:
            with make_lab() as lab:  # type: ignore[attr-defined]
                bench = measure.Bench(lab, programs, plan.duration_s, lambda _text: None)
                with lab.service_sink(programs["sink"], reflect=False) as counters:
                    bench.warm_up(counters)
                    for payload in plan.forward_payloads:
                        figures[payload].append(bench.trial(
                            counters, payload, 0, gen_args=measure.SERVICE_FLOWS).per_core_pps)
        for payload, row in figures.items():
            rounds[payload].append(row)
        log(f"    round {number}: " + ", ".join(
            f"{payload} B {_k(row[0])} / {_k(row[1])}" for payload, row in figures.items())
            + " per core")
    out = {}
    for payload, rows in rounds.items():
        ratios = [ours / theirs for ours, theirs in rows if ours is not None and theirs]
        out[str(payload)] = {"per_core_pps": rows, "ratios": ratios,
                             "median": statistics.median(ratios) if ratios else None}
    return out


def _loss_free(system: dict[str, Any], kind: str, payload: int) -> float | None:
    figures = system.get(kind, {}).get(str(payload), {}).get("loss_free")
    return float(figures["offered_pps"]) if figures else None


def _per_core(system: dict[str, Any], kind: str, payload: int,
              which: str = "overload") -> float | None:
    """Delivered packets per CPU-second of the gateway's processes; by default saturated
    (flat-out offer): the figure least moved by other load on the machine, since a saturated
    gateway batches the same however much CPU it is left."""
    figures = system.get(kind, {}).get(str(payload), {}).get(which)
    return figures.get("per_core_pps") if figures else None


def _per_core_loss_free(system: dict[str, Any], kind: str, payload: int) -> float | None:
    return _per_core(system, kind, payload, "loss_free")


def run_system(results: dict[str, Any], key: str, make_lab: Callable[[], labs.BenchTarget],
               plan: Plan, programs: dict[str, Path], **extras: bool) -> None:
    """Measure one system into ``results["systems"][key]``; a failure is recorded, not fatal."""
    started = time.monotonic()
    log(f"\n-- {key}")
    try:
        with make_lab() as lab:  # type: ignore[attr-defined]
            results["systems"][key] = measure_system(lab, plan, programs, **extras)
    except (labs.netlab.LabError, OSError, subprocess.SubprocessError, ValueError) as exc:
        log(f"    {key} could not be measured: {exc}")
        results["systems"][key] = {"label": key, "error": str(exc),
                                   "traceback": traceback.format_exc()}
    results["systems"][key]["seconds"] = round(time.monotonic() - started, 1)


# --------------------------------------------------------------------------- report


def _k(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e3:.1f}k"


def _f(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def report(results: dict[str, Any], plan: Plan) -> list[str]:
    """The printed tables and ratio lines."""
    systems = results["systems"]
    machine = results["machine"]
    pins = machine["pinning"]
    lines: list[str] = [
        "", f"== sixgate beside TAYGA and the kernel ({plan.name}): {machine['cores']} cores "
        f"({machine['cpu_model']}), commit {machine['commit']} ==",
        f"pinning: traffic programs on CPU {pins['traffic_cpus']}, gateways on CPU "
        f"{pins['gateway_cpus']} ({pins['how']})" if pins["gateway_cpus"] else "pinning: none",
        "CPU = cores busy with the gateway's processes (user + system, /proc/<pid>/stat); for "
        "the kernel: interrupt + softirq time of the gateway CPUs (/proc/stat) + ksoftirqd"]
    for kind, payloads, title in (("forward", plan.forward_payloads,
                                   "forward: peer -> gateway -> service"),
                                  ("round_trip", plan.round_trip_payloads,
                                   "round trip: peer -> gateway -> reflector -> gateway -> peer")):
        for payload in payloads:
            lines += ["", f"== {payload} B UDP payload, {title} (pps) ==",
                      f"{'system':<12}{'loss-free':>10}{'CPU':>6}{'per core':>10} |"
                      f"{'overload':>10}{'offered':>10}{'CPU':>6}{'per core':>10} | "
                      "CPU by process at overload (cores)"]
            losses = []
            for system in systems.values():
                figures = system.get(kind, {}).get(str(payload))
                if not figures:
                    lines.append(f"{system['label']:<12}{'not measured':>10}"
                                 + (f" ({system['error'][:60]})" if "error" in system else ""))
                    continue
                best, over = figures["loss_free"] or {}, figures["overload"]
                by_process = " ".join(f"{name} {cores:.2f}"
                                      for name, cores in over["cpu_cores_by_process"].items())
                limited = "+" if figures.get("generator_limited") else ""
                lines.append(
                    f"{system['label']:<12}{_k(best.get('offered_pps')) + limited:>10}"
                    f"{_f(best.get('cpu_cores')):>6}{_k(best.get('per_core_pps')):>10} |"
                    f"{_k(over['delivered_pps']):>10}{_k(over['offered_pps']):>10}"
                    f"{_f(over['cpu_cores']):>6}{_k(over['per_core_pps']):>10} | {by_process}")
                if over["drops"]:
                    losses.append(f"  {system['label']}: " + ", ".join(
                        f"{reason} {count:,}" for reason, count in sorted(over["drops"].items())))
            if losses:
                lines += ["packets lost at overload, by where they were counted:", *losses]
            busy = [f"{system['label']} {name} {figures[which]['foreign_cores']:.2f}"
                    for system in systems.values()
                    if (figures := system.get(kind, {}).get(str(payload)))
                    for which, name in (("loss_free", "loss-free"), ("overload", "overload"))
                    if figures.get(which) and (figures[which].get("foreign_cores") or 0)
                    > measure.FOREIGN_WARN]
            if busy:
                lines.append("other load on the gateway CPUs (cores; lowers absolute rates, "
                             "not per-core figures): " + ", ".join(busy))
    lines += ["", "+: carried all the generator sent flat out (a lower bound: the traffic CPU "
              "was the limit)", "", *ratio_lines(systems, plan, results.get("nat64_paired"))]
    lines += latency_lines(systems)
    lines += flow_lines(systems)
    return lines


def best_sixgate(systems: dict[str, Any], kind: str, payload: int,
                 key: Callable[[dict[str, Any], str, int], float | None]) -> dict[str, Any] | None:
    """The sixgate configuration (worker count) with the highest ``key`` figure."""
    return best_of(systems, "sixgate", kind, payload, key)


def best_of(systems: dict[str, Any], prefix: str, kind: str, payload: int,
            key: Callable[[dict[str, Any], str, int], float | None]) -> dict[str, Any] | None:
    """The configuration of the systems named ``prefix ...`` with the highest ``key``."""
    candidates = [s for name, s in systems.items()
                  if name.startswith(prefix) and key(s, kind, payload) is not None]
    return max(candidates, key=lambda s: key(s, kind, payload) or 0.0, default=None)


def ratio_lines(systems: dict[str, Any], plan: Plan,
                pairs: dict[str, Any] | None = None) -> list[str]:
    """sixgate/TAYGA and sixgate/kernel, each with the sixgate configuration it used
    (``pairs``: ``paired``'s NAT64 and TAYGA rounds)."""
    tayga, kernel = systems.get("TAYGA", {}), systems.get("kernel", {})
    lines = []
    best = best_sixgate(systems, "forward", 64, _per_core)
    sixgate_pc = _per_core(best, "forward", 64) if best else None
    tayga_pc = _per_core(tayga, "forward", 64)
    lines.append(f"sixgate/TAYGA per-core ratio: {_ratio(sixgate_pc, tayga_pc)}")
    lines.append(f"  (64 B forward, delivered packets per CPU-second, saturated: "
                 f"{best['label'] if best else 'sixgate'} {_k(sixgate_pc)}, TAYGA {_k(tayga_pc)})")
    foreign = {system["label"]: load for system in (best, tayga) if system
               if (load := (system.get("forward", {}).get("64", {}).get("overload") or {})
                   .get("foreign_cores") or 0) > measure.FOREIGN_WARN}
    if foreign:
        lines.append("  warning: other load took " + ", ".join(
            f"{load:.2f} cores beside {label}" for label, load in foreign.items())
            + " on the gateway CPUs in these trials: even per-core figures suffer from it")
    best_lf = best_sixgate(systems, "forward", 64, _per_core_loss_free)
    lf_pc = _per_core_loss_free(best_lf, "forward", 64) if best_lf else None
    tayga_lf = _per_core_loss_free(tayga, "forward", 64)
    lines.append(f"  at the loss-free rate instead: {_ratio(lf_pc, tayga_lf)} "
                 f"({best_lf['label'] if best_lf else 'sixgate'} {_k(lf_pc)}, "
                 f"TAYGA {_k(tayga_lf)})")
    for kind in ("forward", "round_trip"):
        payloads = plan.forward_payloads if kind == "forward" else plan.round_trip_payloads
        for payload in payloads:
            top = best_sixgate(systems, kind, payload, _loss_free)
            rate = _loss_free(top, kind, payload) if top else None
            name = top["label"] if top else "sixgate"
            lines.append(
                f"loss-free rate, {kind.replace('_', ' ')} {payload} B: {name} {_k(rate)}, "
                f"sixgate/TAYGA {_ratio(rate, _loss_free(tayga, kind, payload))}, "
                f"sixgate/kernel {_ratio(rate, _loss_free(kernel, kind, payload))}")
    lines += nat64_ratio_lines(systems, plan, tayga, pairs)
    lines += clat_ratio_lines(systems)
    lines += journal_lines(systems, plan)
    lines += compiled_lines(systems, plan)
    shares = []
    for system in systems.values():
        over = system.get("forward", {}).get("64", {}).get("overload")
        if over and "coordinator" in over["cpu_cores_by_process"] and over["cpu_cores"]:
            share = over["cpu_cores_by_process"]["coordinator"] / over["cpu_cores"]
            shares.append(f"{system['label']} {share * 100:.0f}%")
    if shares:
        lines.append("coordinator's share of sixgate's CPU at overload (64 B forward): "
                     + ", ".join(shares))
    return lines


def compiled_lines(systems: dict[str, Any], plan: Plan) -> list[str]:
    """The compiled fast path over the Python one (``--only ... python``), same run."""
    workers = plan.workers[0]
    lines = []
    for name, compiled, python in (
            ("6to4", f"sixgate {workers}w", f"python-loops {workers}w"),
            ("NAT64", f"nat64 {workers}w", f"nat64-python-loops {workers}w")):
        on, off = systems.get(compiled), systems.get(python)
        if not on or not off:
            continue
        lines.append(f"compiled/python fast path per-core ratio, {name} {workers}w: " + ", ".join(
            f"{kind.replace('_', ' ')} {payload} B "
            f"{_ratio(_per_core(on, kind, payload), _per_core(off, kind, payload))}"
            for kind, payload in (("forward", 64), ("forward", 1400), ("round_trip", 64))))
    return lines


def journal_lines(systems: dict[str, Any], plan: Plan) -> list[str]:
    """The shard journal's cost: sixgate with it on (the default) over sixgate with it off,
    the same worker count, same run (issue 17: at least 0.95)."""
    workers = plan.workers[0]
    on, off = systems.get(f"sixgate {workers}w"), systems.get(f"journal-off {workers}w")
    if not on or not off:
        return []
    return [f"flow journal on/off per-core ratio: "
            f"{_ratio(_per_core(on, 'forward', 64), _per_core(off, 'forward', 64))} "
            f"(64 B forward, sixgate {workers}w {_k(_per_core(on, 'forward', 64))} with, "
            f"{_k(_per_core(off, 'forward', 64))} without; goal >= 0.95)"]


def clat_ratio_lines(systems: dict[str, Any]) -> list[str]:
    """sixgate's CLAT beside TAYGA as a CLAT: the same IPv4 in, the same IPv6 out (issue 18)."""
    ours, theirs = systems.get("clat", {}), systems.get("TAYGA-clat", {})
    if not ours and not theirs:
        return []
    lines = [f"sixgate-clat/TAYGA-clat per-core ratio: "
             f"{_ratio(_per_core(ours, 'forward', 64), _per_core(theirs, 'forward', 64))} "
             f"(64 B forward, sixgate {_k(_per_core(ours, 'forward', 64))}, TAYGA "
             f"{_k(_per_core(theirs, 'forward', 64))})"]
    for payload in (1400,):
        ratio = _ratio(_per_core(ours, "forward", payload), _per_core(theirs, "forward", payload))
        lines.append(f"  {payload} B forward: sixgate-clat/TAYGA-clat {ratio}")
    return lines


def nat64_ratio_lines(systems: dict[str, Any], plan: Plan, tayga: dict[str, Any],
                      pairs: dict[str, Any] | None = None) -> list[str]:
    """sixgate's NAT64 mode beside TAYGA: the same input, prefix and sink (like with like)."""
    best = best_of(systems, "nat64", "forward", 64, _per_core)
    if best is None:
        return []
    lines = [f"sixgate-nat64/TAYGA per-core ratio: "
             f"{_ratio(_per_core(best, 'forward', 64), _per_core(tayga, 'forward', 64))}",
             f"  (64 B forward, same plain IPv6 UDP in, same IPv4 sink: {best['label']} "
             f"{_k(_per_core(best, 'forward', 64))}, TAYGA {_k(_per_core(tayga, 'forward', 64))})"]
    for payload, pair in (pairs or {}).items():
        if pair["median"] is not None:
            lines.append(f"  alternated, nat64 1w and TAYGA one after the other in each round, "
                         f"{payload} B: median {pair['median']:.2f} (rounds: "
                         + ", ".join(f"{ratio:.2f}" for ratio in pair["ratios"]) + ")")
    for kind in ("forward", "round_trip"):
        payloads = plan.forward_payloads if kind == "forward" else plan.round_trip_payloads
        for payload in payloads:
            top = best_of(systems, "nat64", kind, payload, _per_core)
            ours = _per_core(top, kind, payload) if top else None
            lines.append(f"  {kind.replace('_', ' ')} {payload} B per core: "
                         f"{top['label'] if top else 'nat64'} {_k(ours)}, sixgate-nat64/TAYGA "
                         f"{_ratio(ours, _per_core(tayga, kind, payload))}")
    return lines


def latency_lines(systems: dict[str, Any]) -> list[str]:
    rows = [s for s in systems.values() if "latency" in s]
    if not rows:
        return []
    lines = ["", "== ICMPv6 echo round trip through the gateway (pinger.c; sixgate answers "
                 "itself, TAYGA's is answered by the IPv4 kernel behind it) ==",
             f"{'system':<12}{'idle p50':>10}{'idle p99':>10}{'load':>10}{'p50':>10}{'p99':>10}"
             f"{'lost':>6}"]
    for system in rows:
        lat = system["latency"]
        idle, loaded = lat["idle"], lat["loaded"]
        lost = (idle["sent"] - idle["received"]) + (loaded["sent"] - loaded["received"])
        lines.append(f"{system['label']:<12}{_us(idle['p50_us']):>10}{_us(idle['p99_us']):>10}"
                     f"{_k(lat['load_pps']) + '/s':>10}{_us(loaded['p50_us']):>10}"
                     f"{_us(loaded['p99_us']):>10}{lost:>6}")
    tayga = systems.get("TAYGA", {}).get("latency")
    if tayga:
        lines.append("echo RTT sixgate/TAYGA of this run (goal <= 1.0): "
                     "idle p50, at load p50, at load p99")
        for system in rows:
            if system["label"] == "TAYGA":
                continue
            lat = system["latency"]
            lines.append(f"  {system['label']:<11}" + ", ".join(
                _ratio(lat[which][pct], tayga[which][pct])
                for which, pct in (("idle", "p50_us"), ("loaded", "p50_us"),
                                   ("loaded", "p99_us"))))
    return lines


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}µs"


def flow_lines(systems: dict[str, Any]) -> list[str]:
    lines = []
    for system in systems.values():
        if "syn_flood" in system:
            flood = system["syn_flood"]
            over, best = flood["overload"], flood["loss_free"] or {}
            lines += ["", f"== Flows ({system['label']}; a flow counts once its SYN+ACK is back "
                          "at the peer) ==",
                      f"new TCP flows/s, all set up: {_k(best.get('flows_per_s'))} "
                      f"(CPU {_f(best.get('cpu_cores'))}, "
                      f"{_k(best.get('per_core_flows_per_s'))} per CPU-second); under a SYN "
                      f"flood of {_k(over['syn_offered_pps'])}/s from 1024 clients: "
                      f"{_k(over['flows_per_s'])}"]
        for row in system.get("memory", []):
            per = row["bytes_per_binding"]
            marginal = row["marginal_bytes_per_binding"]
            lines.append(f"{row['bindings']:>10,} live bindings: workers' RSS "
                         f"{row['workers_rss_bytes'] / 2**20:.1f} MiB, "
                         f"{'n/a' if per is None else f'{per:.0f}'} B per binding "
                         f"({'n/a' if marginal is None else f'{marginal:.0f}'} B each beyond "
                         "the idle baseline)")
    kernel = systems.get("kernel", {}).get("syn_flood")
    if kernel:
        # Rates, as the forward lines compare with the kernel: its softirq time on the
        # gateway CPU is not all seen in /proc here (its CPU reads near 0).
        lines.append("new TCP flows/s, sixgate/kernel (the same SYN flood forwarded by the "
                     "kernel with conntrack, a state per flow), all set up, flat out:")
        for system in systems.values():
            if "syn_flood" in system and system is not systems["kernel"]:
                lines.append(f"  {system['label']:<11}" + ", ".join(
                    _ratio(ours, theirs) for ours, theirs in
                    zip(_flow_rates(system["syn_flood"]), _flow_rates(kernel),
                        strict=True)))
    return lines


def _flow_rates(flood: dict[str, Any]) -> tuple[float | None, float | None]:
    """New flows per second of a SYN flood's search: (all set up, flat out)."""
    return (flood["loss_free"] or {}).get("flows_per_s"), flood["overload"].get("flows_per_s")


# --------------------------------------------------------------------------- main


def machine(traffic: str, gateway: str | None) -> dict[str, Any]:
    def output(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {
        "cores": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(),
        "cpu_model": next((line.split(":", 1)[1].strip() for line in
                           Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), "?"),
        "tayga": output(["dpkg-query", "-W", "-f=${Version}", "tayga"]) or None,
        "commit": output(["git", "-C", str(labs.REPO_ROOT), "rev-parse", "--short", "HEAD"]),
        "pinning": {"traffic_cpus": traffic, "gateway_cpus": gateway,
                    "how": "taskset (processes), rps_cpus (kernel forwarding), harness "
                           "sched_setaffinity"} if gateway else
                   {"traffic_cpus": None, "gateway_cpus": None, "how": "none"},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick subset (about 4 minutes)")
    parser.add_argument("--pin", choices=("split", "none"), default="split",
                        help="split: traffic programs on CPU 0, gateways on the other CPUs "
                             "(default); none: no pinning")
    parser.add_argument("--only", nargs="*", default=None,
                        help="measure only these systems: sixgate journal (sixgate with "
                             "[gateway] flow_journal off, beside it) nat64 TAYGA python "
                             "(sixgate and its NAT64 with compiled_fast_path = false, beside "
                             "them) clat (sixgate's CLAT and TAYGA as a CLAT) kernel")
    parser.add_argument("--gateway-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a [gateway] setting for every sixgate run (VALUE in TOML, e.g. "
                             "workers-independent options of the datapath); repeatable")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = os.cpu_count() or 1
    plan = plans(cores)["quick" if args.quick else "full"]
    missing = labs.netlab.missing_requirements()
    if missing:
        log("bench: cannot run: " + "; ".join(missing))
        return 1
    programs = build()
    labs.sweep_leftovers()
    signal.signal(signal.SIGTERM, _interrupt)  # cleanups run on SIGTERM too
    traffic, gateway = ("", None)
    if args.pin == "split" and cores >= 2:
        traffic, gateway = "0", "1" if cores == 2 else f"1-{cores - 1}"
    if gateway:
        os.sched_setaffinity(0, {0})  # the harness (and curl, ip ...) stays off the gateway CPUs
    started = datetime.datetime.now(datetime.UTC)
    results: dict[str, Any] = {"plan": plan.__dict__, "started": started.isoformat(),
                               "machine": machine(traffic, gateway), "systems": {}}
    pins = results["machine"]["pinning"]
    log(f"sixgate end-to-end benchmark ({plan.name}), {cores} cores "
        f"({results['machine']['cpu_model']}), kernel {platform.release()}, "
        f"TAYGA {results['machine']['tayga'] or 'not installed'}, "
        f"commit {results['machine']['commit']}")
    log(f"pinning: traffic programs and this harness on CPU {pins['traffic_cpus']}, gateways on "
        f"CPU {pins['gateway_cpus']} ({pins['how']})" if gateway else "pinning: none")
    log("inputs: sixgate gets 6to4 (IPv6 UDP in IPv4 proto 41); TAYGA (NAT64) and the kernel "
        "(plain IPv6 forwarding, no translation) get the same IPv6 UDP without the outer header")
    wanted = set(args.only) if args.only else {"sixgate", "journal", "nat64", "TAYGA",
                                                "clat", "kernel"}
    common = {"traffic_cpus": traffic or None, "gateway_cpus": gateway}
    settings = dict(item.split("=", 1) for item in args.gateway_set)
    results["gateway_settings"] = settings
    if settings:
        log("sixgate [gateway] settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items()))
    # The per-core figures of latency and flow setup come from the most workers that each
    # have a gateway CPU of their own: more share them (two on the one gateway CPU of a
    # two-core machine), and a ping or a SYN then waits for the other worker's turn.
    gateway_cpus = len(labs.cpu_list(gateway)) if gateway else cores
    own_cpu = max((w for w in plan.workers if w <= gateway_cpus), default=plan.workers[0])
    try:
        if "sixgate" in wanted:
            for workers in plan.workers:
                run_system(results, f"sixgate {workers}w",
                           lambda w=workers: labs.SixgateLab(w, max_flows=4_000_000,
                                                             gateway_settings=settings, **common),
                           plan, programs, latency=workers in (own_cpu, plan.workers[-1]),
                           flows=workers in (own_cpu, plan.workers[-1]),
                           memory=workers == plan.workers[-1])
        if "sixgate" in wanted and "journal" in wanted:
            # The shard journal's cost (issue 17): the same gateway with it off, same run.
            workers = plan.workers[0]
            run_system(results, f"journal-off {workers}w",
                       lambda w=workers: labs.SixgateLab(
                           w, max_flows=4_000_000, label="journal-off",
                           gateway_settings={**settings, "flow_journal": "false"}, **common),
                       plan, programs, latency=False, flows=False)
        if "nat64" in wanted:
            # TAYGA's job on the same engine: its input, its prefix, its IPv4 sink.
            for workers in plan.workers:
                run_system(results, f"nat64 {workers}w",
                           lambda w=workers: labs.Sixgate64Lab(
                               w, gateway_settings=settings, **common), plan, programs,
                           latency=workers == plan.workers[0], flows=False)
        if "python" in wanted:
            # The compiled fast path's worth (workers/engine/_fastpath.c): the same gateways
            # with the Python loops, same run.
            off = {**settings, "compiled_fast_path": "false"}
            workers = plan.workers[0]
            if "sixgate" in wanted:
                run_system(results, f"python-loops {workers}w",
                           lambda w=workers: labs.SixgateLab(
                               w, max_flows=4_000_000, label="python-loops",
                               gateway_settings=off, **common),
                           plan, programs, latency=False, flows=False)
            if "nat64" in wanted:
                run_system(results, f"nat64-python-loops {workers}w",
                           lambda w=workers: labs.Sixgate64Lab(
                               w, label="NAT64 python-loops", gateway_settings=off, **common),
                           plan, programs, latency=False, flows=False)
        if "TAYGA" in wanted:
            run_system(results, "TAYGA", lambda: labs.TaygaLab(**common), plan, programs,
                       latency=True, flows=False)
        if "nat64" in wanted and "TAYGA" in wanted and plan.paired_rounds:
            log("\n-- nat64 1w and TAYGA, alternated")
            try:
                results["nat64_paired"] = paired(
                    (lambda: labs.Sixgate64Lab(1, gateway_settings=settings, **common),
                     lambda: labs.TaygaLab(**common)), plan, programs)
            except (labs.netlab.LabError, OSError, subprocess.SubprocessError,
                    ValueError) as exc:
                log(f"    could not be measured: {exc}")
        if "clat" in wanted:
            # The host side of 464XLAT: sixgate's CLAT beside TAYGA run as a CLAT (issue 18);
            # forward only (pinger.c has no IPv4 mode, the sink's replies would not cross
            # the CLAT the way the peer's return counter sees them).
            for key, make in (("clat", labs.SixgateClatLab), ("TAYGA-clat", labs.TaygaClatLab)):
                run_system(results, key, lambda make=make: make(**common), plan, programs,
                           latency=False, flows=False, round_trip=False)
        if "kernel" in wanted:
            run_system(results, "kernel", lambda: labs.KernelLab(**common), plan, programs,
                       latency=False, flows=True)
    finally:
        results["seconds"] = round((datetime.datetime.now(datetime.UTC) - started)
                                   .total_seconds(), 1)
        args.results.mkdir(parents=True, exist_ok=True)
        stamp = started.strftime("%Y%m%dT%H%M%SZ")
        json_path = args.results / f"{stamp}.json"
        json_path.write_text(json.dumps(results, indent=1) + "\n")
    lines = report(results, plan)
    png_path = args.results / f"{stamp}.png"
    drawn = chart.draw(results, png_path)
    lines += ["", f"results: {json_path}", f"chart:   {png_path if drawn is None else drawn}",
              f"took {results['seconds']:.0f} s"]
    log("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
