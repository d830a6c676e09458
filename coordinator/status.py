"""``sixgate status``: a live terminal view of the gateway's ``/metrics`` (GitHub issue 3).

For operators without Grafana: rates per direction, drops by reason, flows against the limits
of each worker, ICMPv6 errors and processing latency, from the same endpoint Prometheus
scrapes (metric names: coordinator/metrics.py). It needs no privileges and no control socket,
only HTTP access to ``[metrics] listen``.

Two layers. The pure part takes text and times from its caller and does no I/O, so it is
unit-tested with hand-made exposition text: ``parse_sample`` (text -> ``Sample``), ``rates``
(two samples -> ``View``, computed like PromQL's ``increase()`` and ``histogram_quantile()``)
and ``render`` (``View`` -> rich tables). The shell, ``watch``, fetches with urllib and
refreshes a ``rich.live.Live`` until Ctrl-C. It must not raise a traceback at the operator:
an unreachable endpoint is an ``EndpointError`` with one line saying what to do.
"""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from sixgate.coordinator.config import parse_listen
from sixgate.workers.engine.counters import DIRECTIONS

FETCH_TIMEOUT_S = 10.0  # a scrape waits at most 1.5 s for the workers (metrics.py)
LATENCY_DIRECTIONS = ("inbound", "from_services")  # sixgate_packet_processing_seconds

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs: hashable, order-free


class EndpointError(RuntimeError):
    """The metrics endpoint could not be read; the message says what to check."""


@dataclass(frozen=True)
class Sample:
    """One scrape: every series' value and when it was taken.

    ``now`` is monotonic (rates divide by differences of it); ``unix_now`` is wall-clock
    time, only for the uptime against ``sixgate_start_time_seconds``.
    """

    now: float
    unix_now: float
    values: dict[tuple[str, Labels], float]


@dataclass(frozen=True)
class Header:
    """The first line: what runs, and whether it is ready."""

    version: str
    backend: str
    delivery: str
    mode: str
    ready: bool | None  # None: the gauge is missing
    uptime_s: float | None


@dataclass(frozen=True)
class Traffic:
    """One direction, summed over workers and protocols."""

    direction: str
    packets_per_s: float
    bits_per_s: float


@dataclass(frozen=True)
class DropRate:
    """One drop reason, summed over every process."""

    reason: str
    per_s: float
    total: float


@dataclass(frozen=True)
class WorkerRow:
    """One worker: its table use against its limits, its process."""

    process: str
    up: bool
    flows_active: float | None  # None: the worker did not answer this scrape
    flow_limit: float | None
    pool_in_use: float | None
    pool_size: float | None
    restarts: float
    cpu_percent: float | None  # 100 = one core busy
    resident_bytes: float | None
    queue_drops_per_s: float

    @property
    def flow_percent(self) -> float | None:
        if self.flows_active is None or not self.flow_limit:
            return None
        return 100 * self.flows_active / self.flow_limit


@dataclass(frozen=True)
class Latency:
    """Engine time per packet of one direction (1 packet in 16 sampled)."""

    direction: str
    p50_s: float | None  # None: no packet was sampled in the interval
    p99_s: float | None


@dataclass(frozen=True)
class View:
    """What one frame shows: rates over ``interval_s``, totals and gauges at its end."""

    interval_s: float
    header: Header
    traffic: list[Traffic]
    tunnel_received_per_s: float
    drops: list[DropRate]  # non-zero reasons only, fastest first
    workers: list[WorkerRow]
    icmp_errors_sent_per_s: float
    tcp_resets_sent_per_s: float
    icmp_errors_suppressed_per_s: float
    latency: list[Latency]


# --------------------------------------------------------------------------- pure: parse


def parse_sample(text: str, now: float, unix_now: float) -> Sample:
    """Prometheus text exposition -> ``Sample``; ValueError when it is not that format."""
    values: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    if not values:
        raise ValueError("no metrics in the answer")
    return Sample(now, unix_now, values)


def _series(sample: Sample, name: str, match: dict[str, str]) -> Iterator[tuple[Labels, float]]:
    """(labels, value) of every series called ``name`` whose labels include ``match``."""
    for (series_name, labels), value in sample.values.items():
        if series_name == name and all((k, v) in labels for k, v in match.items()):
            yield labels, value


def _gauge(sample: Sample, name: str, **match: str) -> float | None:
    """Sum of the matching series; None when there is none (a worker that did not answer)."""
    found = [value for _, value in _series(sample, name, match)]
    return sum(found) if found else None


def _increases(before: Sample, after: Sample, name: str,
               match: dict[str, str]) -> Iterator[tuple[Labels, float]]:
    """How much each matching counter grew, like PromQL ``increase()`` (without
    extrapolation).

    A counter that went down was reset (its process restarted) and has counted from 0 since:
    all of its new value is increase. A series absent from ``before`` (a worker that did not
    answer the first scrape) has no increase yet; counting its whole total would show a spike.
    """
    for labels, value in _series(after, name, match):
        old = before.values.get((name, labels))
        if old is not None:
            yield labels, value - old if value >= old else value


def _increase(before: Sample, after: Sample, name: str, **match: str) -> float:
    """The increase summed over the matching series."""
    return sum(increase for _, increase in _increases(before, after, name, match))


def _label(sample: Sample, name: str, label: str) -> str:
    """The ``label`` of the first ``name`` series (info-style gauges), "?" if absent."""
    for labels, _ in _series(sample, name, {}):
        return dict(labels).get(label, "?")
    return "?"


# --------------------------------------------------------------------------- pure: quantiles


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of cumulative (upper bound, count) buckets sorted by bound, the last
    one +Inf, estimated as Prometheus' ``histogram_quantile`` does: linear interpolation inside
    the bucket that holds the rank, the lower edge of the first bucket taken as 0, and the
    highest finite bound when the rank falls in +Inf. None when nothing was observed."""
    if len(buckets) < 2 or buckets[-1][0] != math.inf:
        return None
    # Counts can dip when series reset at different moments; Prometheus evens them out too.
    counts: list[float] = []
    for _, count in buckets:
        counts.append(max(count, counts[-1]) if counts else count)
    rank = q * counts[-1]
    if counts[-1] <= 0:
        return None
    index = next(i for i, count in enumerate(counts) if count >= rank)
    if index == len(buckets) - 1:
        return buckets[-2][0]
    upper = buckets[index][0]
    if index == 0:
        if upper <= 0:
            return upper
        lower, below = 0.0, 0.0
    else:
        lower, below = buckets[index - 1][0], counts[index - 1]
    return lower + (upper - lower) * (rank - below) / (counts[index] - below)


def _bucket_increase(before: Sample, after: Sample, name: str,
                     **match: str) -> list[tuple[float, float]]:
    """(upper bound, increase) of a histogram's ``le`` buckets, summed over the matching
    series, sorted by bound."""
    by_bound: dict[float, float] = {}
    for labels, increase in _increases(before, after, f"{name}_bucket", match):
        bound = float(dict(labels)["le"])
        by_bound[bound] = by_bound.get(bound, 0.0) + increase
    return sorted(by_bound.items())


# --------------------------------------------------------------------------- pure: the view


def _worker_order(process: str) -> tuple[int, str]:
    """worker-2 before worker-10."""
    number = process.rpartition("-")[2]
    return (int(number) if number.isdigit() else -1, process)


def rates(before: Sample, after: Sample) -> View:
    """The view between two samples of the same endpoint (``after`` taken later)."""
    interval_s = after.now - before.now
    if interval_s <= 0:
        raise ValueError(f"samples {interval_s:.3f} s apart: `after` must be taken later")

    def per_s(name: str, **match: str) -> float:
        return _increase(before, after, name, **match) / interval_s

    start = _gauge(after, "sixgate_start_time_seconds")
    ready = _gauge(after, "sixgate_ready")
    header = Header(
        version=_label(after, "sixgate_build_info", "version"),
        backend=_label(after, "sixgate_backend_info", "backend"),
        delivery=_label(after, "sixgate_backend_info", "delivery"),
        mode=_label(after, "sixgate_backend_info", "tunnel_mode"),
        ready=None if ready is None else ready == 1,
        uptime_s=None if start is None else max(0.0, after.unix_now - start))

    traffic = [Traffic(direction, per_s("sixgate_packets_total", direction=direction),
                       8 * per_s("sixgate_bytes_total", direction=direction))
               for direction in DIRECTIONS]

    reasons = {dict(labels)["reason"] for labels, _ in _series(after, "sixgate_drops_total", {})}
    drops = [DropRate(reason, per_s("sixgate_drops_total", reason=reason),
                      _gauge(after, "sixgate_drops_total", reason=reason) or 0.0)
             for reason in reasons]
    drops = sorted((d for d in drops if d.total > 0 or d.per_s > 0),
                   key=lambda d: (-d.per_s, -d.total, d.reason))

    processes = sorted({dict(labels)["process"] for labels, _
                        in _series(after, "sixgate_worker_up", {})}, key=_worker_order)
    workers = []
    for process in processes:
        active = [value for labels, value in _series(after, "sixgate_flows_active",
                                                     {"process": process})]
        cpu_seen = _gauge(after, "sixgate_cpu_seconds_total", process=process) is not None
        workers.append(WorkerRow(
            process=process,
            up=_gauge(after, "sixgate_worker_up", process=process) == 1,
            flows_active=sum(active) if active else None,
            flow_limit=_gauge(after, "sixgate_flow_limit", process=process),
            pool_in_use=_gauge(after, "sixgate_pool_addresses_in_use", process=process),
            pool_size=_gauge(after, "sixgate_pool_addresses", process=process),
            restarts=_gauge(after, "sixgate_worker_restarts_total", process=process) or 0.0,
            cpu_percent=(100 * per_s("sixgate_cpu_seconds_total", process=process)
                         if cpu_seen else None),
            resident_bytes=_gauge(after, "sixgate_resident_memory_bytes", process=process),
            queue_drops_per_s=per_s("sixgate_queue_drops_total", process=process)))

    latency = []
    for direction in LATENCY_DIRECTIONS:
        buckets = _bucket_increase(before, after, "sixgate_packet_processing_seconds",
                                   direction=direction)
        latency.append(Latency(direction, histogram_quantile(0.5, buckets),
                               histogram_quantile(0.99, buckets)))

    return View(
        interval_s=interval_s, header=header, traffic=traffic,
        tunnel_received_per_s=per_s("sixgate_tunnel_received_packets_total"),
        drops=drops, workers=workers,
        icmp_errors_sent_per_s=per_s("sixgate_icmp_errors_sent_total"),
        tcp_resets_sent_per_s=per_s("sixgate_tcp_resets_sent_total"),
        icmp_errors_suppressed_per_s=per_s("sixgate_icmp_errors_suppressed_total"),
        latency=latency)


# --------------------------------------------------------------------------- pure: render


def _scaled(value: float, unit: str = "") -> str:
    """12, 3.4, 1.2k, 56M ...: three significant figures at most, SI prefixes."""
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{prefix}{unit}"
    if value == 0:
        return f"0{unit}"
    return f"{value:.3g}{unit}" if abs(value) >= 0.01 else f"<0.01{unit}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.3g} µs"
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def _percent(value: float | None) -> str:
    """Whole percent, two figures below 10 so that 1 flow of 100000 is not "0%"."""
    if value is None:
        return "-"
    return f"{value:.0f}%" if value >= 10 or value == 0 else f"{value:.2g}%"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False)
    table.add_column(columns[0])
    for column in columns[1:]:
        table.add_column(column, justify="right")
    return table


def render(view: View) -> RenderableType:
    """One frame: a header line and tables (the same for ``Live`` and ``--once``)."""
    h = view.header
    ready = {True: "[green]READY[/]", False: "[red]NOT READY[/]", None: "ready ?"}[h.ready]
    title = Text.from_markup(
        f"[bold]sixgate {h.version}[/]  {h.mode}  backend {h.backend}/{h.delivery}  {ready}  "
        f"up {_duration(h.uptime_s)}  [dim](rates over {view.interval_s:.1f} s)[/]")

    traffic = _table("traffic", "direction", "packets/s", "bits/s")
    traffic.add_row("tunnel received", _scaled(view.tunnel_received_per_s), "",
                    style="dim")
    for row in view.traffic:
        traffic.add_row(row.direction, _scaled(row.packets_per_s), _scaled(row.bits_per_s))

    drops = _table("drops", "reason", "/s", "total")
    for drop in view.drops:
        drops.add_row(drop.reason, _scaled(drop.per_s), _count(drop.total),
                      style="red" if drop.per_s > 0 else None)
    if not view.drops:
        drops.add_row("(none)", "", "")

    workers = _table("workers", "worker", "up", "flows", "of limit", "pool in use",
                     "restarts", "CPU", "memory", "queue drops/s")
    for w in view.workers:
        percent = w.flow_percent
        workers.add_row(
            w.process, "yes" if w.up else "[red]NO[/]",
            f"{_count(w.flows_active)}/{_count(w.flow_limit)}",
            _percent(percent),
            f"{_count(w.pool_in_use)}/{_count(w.pool_size)}",
            _count(w.restarts),
            _percent(w.cpu_percent),
            "-" if w.resident_bytes is None else _scaled(w.resident_bytes, "B"),
            _scaled(w.queue_drops_per_s),
            style=None if w.up and (percent or 0) < 90 else "red")

    latency = _table("processing time", "direction", "p50", "p99")
    for timing in view.latency:
        latency.add_row(timing.direction, _seconds(timing.p50_s), _seconds(timing.p99_s))

    errors = Text(f"ICMPv6 errors sent {_scaled(view.icmp_errors_sent_per_s)}/s, "
                  f"TCP RSTs sent {_scaled(view.tcp_resets_sent_per_s)}/s, "
                  f"suppressed by the rate limit "
                  f"{_scaled(view.icmp_errors_suppressed_per_s)}/s")
    top = Table.grid(padding=(0, 4))
    top.add_row(traffic, drops, latency)
    return Group(title, Text(), top, Text(), workers, Text(), errors)


# --------------------------------------------------------------------------- the shell


def metrics_url(listen: str) -> str:
    """The /metrics URL of a ``[metrics] listen`` address; an unspecified host (0.0.0.0, ::)
    is reached on loopback."""
    host, port = parse_listen(listen)
    if ":" in host:
        return f"http://[{'::1' if host == '::' else host}]:{port}/metrics"
    return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/metrics"


def fetch_sample(url: str, timeout_s: float = FETCH_TIMEOUT_S) -> Sample:
    """One scrape of ``url``; EndpointError saying what to check when it fails."""
    # No proxy: http_proxy in the environment must not capture a loopback endpoint.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"Accept": "text/plain"})
    started, unix_now = time.monotonic(), time.time()
    try:
        with opener.open(request, timeout=timeout_s) as answer:
            text = answer.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        raise EndpointError(f"{url} answered HTTP {exc.code} {exc.reason}; is it the "
                            "gateway's /metrics path?") from None
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        raise EndpointError(f"cannot read {url} ({why}); is `sixgate run` running, with "
                            "[metrics] listen at this address? (or give --url)") from None
    # The gateway scraped somewhere during the request: date the sample at its middle.
    now = (started + time.monotonic()) / 2
    try:
        return parse_sample(text, now, unix_now)
    except ValueError as exc:
        raise EndpointError(f"{url} did not answer Prometheus text format ({exc})") from None


def watch(url: str, interval_s: float, once: bool, console: Console | None = None) -> None:
    """Show rates between scrapes ``interval_s`` apart: one plain frame with ``once``, else a
    live view until Ctrl-C (which returns normally). EndpointError if the first two scrapes
    fail; later failures are shown in the view while it keeps trying."""
    try:
        before = fetch_sample(url)
        time.sleep(interval_s)
        after = fetch_sample(url)
        frame = render(rates(before, after))
        if once:
            (console or Console(color_system=None, width=120)).print(frame)
            return
        with Live(frame, console=console, auto_refresh=False) as live:
            while True:
                time.sleep(max(0.0, interval_s - (time.monotonic() - after.now)))
                try:
                    latest = fetch_sample(url)
                except EndpointError as exc:
                    problem = Text(f"{exc} - retrying every {interval_s:g} s", style="red")
                    live.update(Group(problem, frame), refresh=True)
                    continue
                before, after = after, latest
                frame = render(rates(before, after))
                live.update(frame, refresh=True)
    except KeyboardInterrupt:
        return
