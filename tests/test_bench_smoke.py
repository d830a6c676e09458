"""The end-to-end benchmark's harness works (bench/e2e.py); its figures are not asserted.

A few seconds of the quick path at a tiny scale: the C programs compile, a short burst goes
through a real 1-worker ``sixgate run`` and the UDP sink counts exactly what the gateway's
/metrics say it delivered to the service; reflected, the peer-side counter sees exactly what
the gateway sent back into the tunnel; a timed trial reads the CPU of every gateway process.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench import labs, measure
from bench.programs import build, read_counts

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.lab

BURST = 3000
BURST_RATE = "5000"  # far below what any gateway carries: the harness is tested, not it


def packets(lab: labs.SixgateLab, direction: str) -> int:
    """sixgate_packets_total of one direction, UDP, summed over the processes."""
    series = lab.metrics().get("sixgate_packets_total", {})
    return int(sum(value for labels, value in series.items()
                   if ("direction", direction) in labels and ("protocol", "udp") in labels))


def burst(lab: labs.SixgateLab, programs: dict[str, Path]) -> dict[str, int]:
    """BURST datagrams of 64 bytes over the benchmark's 1024 flows."""
    sent = lab.run_gen(programs["gen"], "--payload", "64", "--rate", BURST_RATE, "--count",
                       str(BURST), *measure.SERVICE_FLOWS)
    return {key: int(value) for key, value in sent.items() if key != "seconds"}


@pytest.fixture(scope="module")
def bench_lab(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    missing = labs.netlab.missing_requirements()
    if not shutil.which("gcc"):
        missing.append("gcc is missing (bench/bootstrap.sh installs it)")
    if missing:
        reason = "LAB TESTS CANNOT RUN: " + "; ".join(missing)
        if os.environ.get("SIXGATE_LAB_REQUIRED") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    programs = build(tmp_path_factory.mktemp("bench-build"))
    labs.sweep_leftovers()
    with labs.SixgateLab(1) as lab:
        yield lab, programs


def test_sink_counts_what_sixgate_delivered(bench_lab) -> None:  # type: ignore[no-untyped-def]
    lab, programs = bench_lab
    with lab.service_sink(programs["sink"], reflect=False) as counters:
        before = packets(lab, "to_services")
        assert burst(lab, programs) == {"sent": BURST, "errors": 0}
        arrived = labs.wait_quiet(lambda: read_counts(counters))
        delivered = packets(lab, "to_services") - before
    assert arrived.packets == delivered
    assert arrived.packets > BURST * 0.9, f"a gentle burst lost packets: {arrived}"
    assert arrived.bytes == arrived.packets * 64


def test_reflected_packets_counted_at_the_peer(bench_lab) -> None:  # type: ignore[no-untyped-def]
    lab, programs = bench_lab
    sink = programs["sink"]
    with lab.service_sink(sink, reflect=True) as counters, lab.return_counter(sink) as returns:
        before = packets(lab, "outbound")
        burst(lab, programs)
        back = labs.wait_quiet(lambda: (read_counts(counters), read_counts(returns)))[1]
        sent_back = packets(lab, "outbound") - before
        reflected = read_counts(counters).reflected
    assert back.packets == sent_back
    # How many the gateway loses is the benchmark's business; the counters must agree.
    assert reflected > BURST * 0.9 and back.packets > reflected * 0.9


def test_trial_reads_rates_and_cpu(bench_lab) -> None:  # type: ignore[no-untyped-def]
    lab, programs = bench_lab
    bench = measure.Bench(lab, programs, duration_s=1.0, log=lambda _line: None)
    with lab.service_sink(programs["sink"], reflect=False) as counters:
        trial = bench.trial(counters, 64, 10_000,
                            gen_args=measure.SERVICE_FLOWS)
    assert 8_000 < trial.offered_pps < 12_000
    assert measure.carried(trial), trial
    assert set(trial.window_cpu_s) == {"coordinator", "worker-0"}
    assert trial.cpu_cores is not None and trial.cpu_cores > 0


def test_memory_per_binding_sets_up_every_binding(bench_lab) -> None:  # type: ignore[no-untyped-def]
    """The memory figure's bindings are all there when RSS is read, offered faster than the
    worker sets them up (passes are repeated at the pace it showed), and answered by the
    service (assured, so they outlive their setup)."""
    lab, programs = bench_lab
    bench = measure.Bench(lab, programs, duration_s=1.0, log=lambda _line: None)
    sink = programs["sink"]
    answered_before = packets(lab, "outbound")
    with lab.service_sink(sink, reflect=True) as counters, lab.return_counter(sink):
        [row] = measure.memory_per_binding(bench, counters, (2048,), rate=1_000_000)
        answered = packets(lab, "outbound") - answered_before
    assert row["new_bindings"] >= 2048 * 0.99, row
    assert row["pass_rates"][0] == 1_000_000 and len(row["pass_rates"]) <= measure.MEMORY_PASSES
    assert row["workers_rss_bytes"] > 0 and row["marginal_bytes_per_binding"] is not None
    assert answered >= 2048 * 0.99, answered  # each binding's datagram came back through


def test_engine_benchmark_runs_every_path() -> None:
    """bench/engine.py (in-process, no namespace) prints its reference, both directions of
    the tunnel, both of the NAT64 and both of the CLAT, and the flow setup rows (each SYN a
    new session, checked inside the benchmark)."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "engine.py"), "--packets",
                           "6400"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if "pkt/s" in line]
    assert [row.split(":")[0].strip() for row in rows] == [
        "reference", "sixgate inbound", "sixgate return", "sixgate NAT64 IPv6 -> IPv4",
        "sixgate NAT64 IPv4 -> IPv6", "sixgate CLAT IPv4 -> IPv6", "sixgate CLAT IPv6 -> IPv4",
        "sixgate inbound, Python loops", "sixgate NAT64 IPv6 -> IPv4, Python loops"
    ], done.stdout
    setups = [line for line in done.stdout.splitlines() if "flows/s" in line]
    assert [row.split(":")[0].strip() for row in setups] == [
        "sixgate new TCP sessions", "sixgate new TCP sessions",
        "sixgate NAT64 new TCP sessions", "sixgate NAT64 new TCP sessions",
        "sixgate new TCP sessions, Python loops", "sixgate new TCP sessions, Python loops",
        "sixgate NAT64 new TCP sessions, Python loops",
        "sixgate NAT64 new TCP sessions, Python loops"], done.stdout


def test_nat64_target_delivers_and_reflects_a_burst(bench_lab) -> None:  # type: ignore[no-untyped-def]
    """The NAT64 system (TAYGA's input and job on sixgate) carries the same burst to the
    IPv4 sink and back, as its /metrics count."""
    _lab, programs = bench_lab
    sink = programs["sink"]
    with labs.Sixgate64Lab(1) as lab:
        with lab.service_sink(sink, reflect=True) as counters, \
                lab.return_counter(sink) as returns:
            before = packets(lab, "to_services"), packets(lab, "outbound")
            assert burst(lab, programs) == {"sent": BURST, "errors": 0}
            arrived, back = labs.wait_quiet(lambda: (read_counts(counters),
                                                     read_counts(returns)))
            after = packets(lab, "to_services"), packets(lab, "outbound")
        assert arrived.packets == after[0] - before[0] > BURST * 0.9
        assert back.packets == after[1] - before[1] > arrived.packets * 0.9


def test_paired_rounds_measure_both_systems_each_round(bench_lab) -> None:  # type: ignore[no-untyped-def]
    """bench/e2e.py ``paired``: NAT64 and TAYGA flat out one after the other in each round,
    at each payload a ratio per round and their median."""
    from bench import e2e
    _lab, programs = bench_lab
    plan = dataclasses.replace(e2e.plans(2)["quick"], duration_s=0.5, paired_rounds=2)
    pairs = e2e.paired((lambda: labs.Sixgate64Lab(1), lambda: labs.TaygaLab()), plan, programs)
    assert sorted(pairs) == ["1400", "64"], pairs
    for pair in pairs.values():
        assert len(pair["per_core_pps"]) == 2, pairs
        assert all(ours > 0 and theirs > 0 for ours, theirs in pair["per_core_pps"]), pairs
        assert pair["ratios"] == [ours / theirs for ours, theirs in pair["per_core_pps"]]
        assert pair["median"] == statistics.median(pair["ratios"])


def test_the_kernel_reference_sets_up_a_conntrack_state_per_new_flow(bench_lab) -> None:  # type: ignore[no-untyped-def]
    """The new-flows reference (bench/labs.py KernelLab ``flow_state``): the kernel forwards
    the SYN flood's SYNs to the service's listener and their SYN+ACKs back to the peer, where
    the SYN+ACK counter sees them, with conntrack making a state for each new flow (its
    ``ct state new`` rule counts every SYN); after, the forwarding is stateless again."""
    _lab, programs = bench_lab
    sink = programs["sink"]
    syns = 1000
    with labs.KernelLab() as lab:
        listener = lab.start_sink(sink, "--tcp-listen", lab.tcp_listen_endpoint())
        with lab.flow_state(), lab.return_counter(sink, synack=True) as synacks:
            sent = lab.run_gen(programs["gen"], "--rate", BURST_RATE, "--count", str(syns),
                               *measure.SYN_FLOWS, "--first-flow", "0")
            back = labs.wait_quiet(lambda: read_counts(synacks))
            table = lab.exec_in(lab.gw_ns, ["nft", "list", "table", "inet",
                                            labs.NFT_CONNTRACK_TABLE]).stdout
        lab.stop_sink(listener)
        assert sent["sent"] == syns and back.packets == syns
        assert f"packets {syns} " in table, table
        tables = lab.exec_in(lab.gw_ns, ["nft", "list", "tables"]).stdout
        assert labs.NFT_CONNTRACK_TABLE not in tables
