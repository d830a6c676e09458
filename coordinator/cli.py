"""The ``sixgate`` command line: run, check, probe, ping, flows, status.

Exit codes: 0 ok, 2 bad config (or bad usage), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli
import zmq

from sixgate.coordinator.config import SCHEMA as CONFIG_SCHEMA
from sixgate.coordinator.config import ConfigError, effective_values, load_config
from sixgate.workers import control
from sixgate.workers.engine.nat64 import Nat64Prefix
from sixgate.workers.engine.settings import (
    PROTOCOL_NUMBERS,
    Settings,
    worker_pool4,
    worker_routes,
    worker_shards,
)

PROTOCOL_NAMES = {number: name for name, number in PROTOCOL_NUMBERS.items()}

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2
DEFAULT_CONFIG = "/etc/sixgate/gateway.toml"
DEFAULT_RUN_DIR = next(str(key.default) for key in CONFIG_SCHEMA
                       if (key.table, key.name) == ("gateway", "run_dir"))


def _load(path: str) -> Settings:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"sixgate: bad config: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s coordinator %(levelname)s %(message)s")
    from sixgate.coordinator.gateway import run_gateway
    from sixgate.coordinator.probe import choose_backend, delivery_method, probe
    log = logging.getLogger("sixgate")
    caps = probe()
    backend, why = choose_backend(settings.backend, caps)
    if backend is None:
        log.error("sixgate cannot run: %s", why)
        return EXIT_RUNTIME
    log.info("backend %s: %s", backend, why)
    if backend == "userspace":
        method, why = delivery_method(caps)
        if method is None:
            log.error("sixgate cannot deliver packets to the services: %s", why)
            return EXIT_RUNTIME
    return run_gateway(dataclasses.replace(settings, backend=backend),
                       take_over=args.take_over)


def _print_further_tunnels(settings: Settings) -> None:
    """``check``: the [[tunnel]]s after the first, which share its local address."""
    print(f"  name          {settings.tunnel_name} (its metrics' tunnel label)")
    for tunnel in settings.tunnels:
        peer = {"6in4": f"remote {tunnel.remote_ipv4} (its only source)",
                "6to4": f"relay {tunnel.relay_ipv4}",
                "6rd": f"6rd prefix {tunnel.sixrd_prefix}/{tunnel.ipv4_mask_len} bits shared, "
                       f"border relay {tunnel.relay_ipv4}"}[tunnel.mode]
        print(f"  tunnel {tunnel.name!r}: {tunnel.mode} on the same local IPv4, {peer}, prefix "
              f"{tunnel.prefix}, addresses {', '.join(tunnel.addresses)}, mtu {tunnel.mtu}")
    print(f"  several       a packet is the tunnel's of its 6in4 broker, else the "
          "6to4/6rd one's; answers leave by the tunnel of the address they come from; "
          f"the engine fragments to the smallest mtu ({settings.engine_mtu})")


def cmd_check(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    from sixgate.coordinator.probe import (
        choose_backend,
        delivery_method,
        fast_path_method,
        probe,
    )
    caps = probe()
    method, why = delivery_method(caps)
    backend, backend_why = choose_backend(settings.backend, caps)
    print(f"config {args.config}: OK")
    print(f"  backend       {backend or 'NONE'}: {backend_why}")
    fast_path, fast_path_why = fast_path_method(settings, backend)
    print(f"  fast path     {fast_path}: {fast_path_why}")
    from sixgate.coordinator.forwarding import pool4_problem
    problem = pool4_problem(settings) if settings.nat64_prefix else ""
    if problem:
        print(f"sixgate: {args.config}: nat64.pool4: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if settings.mode == "nat64":
        _print_nat64(settings)
        if settings.clat_enabled:  # a 464XLAT box
            _print_clat(settings)
        _print_every_key(settings, args.config)
        return EXIT_OK
    if settings.mode == "clat":
        found = _print_clat(settings)
        _print_every_key(settings, args.config)
        return EXIT_OK if found else EXIT_RUNTIME
    kinds = {"6to4": "RFC 3056 6to4", "6in4": "RFC 4213 configured tunnel",
             "6rd": "RFC 5969 6rd: the 6to4 mechanism inside an ISP's prefix"}
    print(f"  tunnel        {settings.mode} ({kinds[settings.mode]})")
    public = settings.known_ipv4
    if public == settings.local_ipv4:
        print(f"  local IPv4    {settings.local_ipv4}")
    else:
        # Behind a 1:1 NAT: say which address does what.
        print(f"  local IPv4    {settings.local_ipv4} (the capture and the sending socket bind "
              "it: the NAT delivers the tunnel's packets here)")
        print(f"  public IPv4   {public} (what the tunnel is known by: "
              + ("embedded in the 6to4 prefix, checked by the RFC 3964 rules)"
                 if settings.mode == "6to4" else
                 "the broker's remote for this tunnel, our 6in4 link-local fe80::"
                 f"{public})"))
    if settings.uplink:
        print(f"  uplink        {settings.uplink}: when its IPv4 address changes, the tunnel "
              "moves to the new one without a restart, sessions kept"
              + (", and the broker is told" if settings.broker_url else ""))
    if settings.public_ipv4_url:
        print(f"  public from   {settings.public_ipv4_url}, asked at the start and every "
              f"{settings.public_ipv4_check_s:g} s: a new answer moves the tunnel's public "
              "address without a restart")
    derived_from = 'public_ipv4' if public != settings.local_ipv4 else 'local_ipv4'
    if settings.mode == "6to4":
        print(f"  6to4 prefix   {settings.prefix} (derived from {derived_from})")
        print(f"  relay         {settings.relay_ipv4} (for non-2002::/16 destinations)")
    elif settings.mode == "6rd":
        print(f"  6rd prefix    {settings.sixrd_prefix}, IPv4MaskLen {settings.ipv4_mask_len}: "
              f"6rd destinations go straight to the IPv4 address they embed (RFC 5969 §7.1.1)")
        print(f"  delegated     {settings.prefix} (RFC 5969 §4: the 6rd prefix, then "
              f"{derived_from} {public} without its {settings.ipv4_mask_len} shared bits)")
        print(f"  border relay  {settings.relay_ipv4} (for destinations outside the 6rd "
              "prefix, and the only source of packets from outside it, RFC 5969 §12)")
    else:
        print(f"  remote        {settings.remote_ipv4} (only source accepted, RFC 4213 §3.6)")
        print(f"  prefix        {settings.prefix}")
        if settings.broker_url:
            from sixgate.coordinator.broker import KeyFileError, broker_of
            try:
                broker_of(settings)
            except KeyFileError as exc:
                print(f"sixgate: {args.config}: {exc}", file=sys.stderr)
                return EXIT_CONFIG
            print(f"  broker        {settings.broker_url}: tunnel {settings.broker_tunnel_id} "
                  f"as {settings.broker_username} is told {public} at each start "
                  f"(`sixgate tunnel update` by hand); key file {settings.broker_key_file}")
    print(f"  addresses     {', '.join(settings.addresses)}")
    print(f"  mtu           {settings.mtu} (TCP MSS clamped to {settings.max_mss})")
    if settings.tunnels:
        _print_further_tunnels(settings)
    print(f"  workers       {settings.workers}, fan-out by the {settings.fanout}"
          + (" (ZeroMQ batches)" if settings.fanout == "coordinator"
             else " (a BPF filter on each worker's capture socket)"))
    if settings.shard_count != settings.workers:
        print(f"  shards        {settings.shard_count}, shard s in worker s mod "
              f"{settings.workers}: a take-over may change the worker count up to "
              f"{settings.shard_count} and keep every session")
    for index in range(settings.workers):
        routes = ", ".join(str(n) for n in worker_routes(settings.pool, settings.workers,
                                                          index, settings.shard_count))
        print(f"    worker {index}: TUN {settings.name}{index}, pool slice {routes}")
    print(f"  pool          {settings.pool}")
    print(f"  run dir       {settings.run_dir}")
    print(f"  limits        {settings.max_flows} flows, {settings.max_flows_per_prefix} per "
          f"source /64, {settings.max_flows_per_48} per source /48, "
          f"{settings.max_flows_per_ipv4_source} per outer IPv4 source (6to4)")
    print(f"  rate limits   ICMPv6 errors and RSTs {settings.icmp_errors_per_s:g}/s burst "
          f"{settings.icmp_error_burst}, echo replies {settings.echo_replies_per_s:g}/s burst "
          f"{settings.echo_burst}; each source /64 a tenth of either")
    t = settings.timeouts
    print(f"  timeouts      tcp established {t.tcp_established_s:g} s, transitory "
          f"{t.tcp_transitory_s:g} s, udp {t.udp_s:g} s, icmp {t.icmp_s:g} s, unassured "
          f"{t.unassured_s:g} s")
    martians = ", ".join(cidr for cidr, _ in settings.martian_ipv4)
    print(f"  martian IPv4  {martians or '(none: the check is off)'}")
    if settings.forwards:
        for rule in settings.forwards:
            allowed = f" (from {', '.join(rule.sources)} only)" if rule.sources else ""
            print(f"  forward       {rule.label}{allowed}")
    else:
        print("  forward       (none: only ICMPv6 echo is answered)")
    if backend == "kernel":
        print(f"  delivery      kernel sit link {settings.name}sit; workers relay the "
              "forwarded ports from IPv6 sockets")
    else:
        print(f"  delivery      {method or 'NONE'}: {why}")
    if settings.nat64_prefix:
        print("  NAT64 beside the tunnel:")
        _print_nat64(settings)
    if settings.cluster_announce:
        from sixgate.coordinator.cluster import anchor_name, drain_anchor_name
        print(f"  cluster       BIRD announces {', '.join(settings.cluster_announce)} through "
              f"{anchor_name(settings)} while this node is ready, through "
              f"{drain_anchor_name(settings)} with the GRACEFUL_SHUTDOWN community while it "
              f"drains (AS {settings.cluster_local_as} to "
              f"{', '.join(settings.cluster_neighbors)} AS "
              f"{settings.cluster_peer_as}, router id {settings.cluster_router_id}, hold time "
              f"{settings.cluster_hold_time_s} s); `sixgate cluster bird-config` writes its "
              "config")
    _print_every_key(settings, args.config)
    return EXIT_OK


def cmd_tunnel_update(args: argparse.Namespace) -> int:
    """``sixgate tunnel update``: tell the 6in4 broker our address now ([broker])."""
    from sixgate.coordinator.broker import RESULTS, KeyFileError, broker_of, update
    settings = _load(args.config)
    if not settings.broker_url:
        print(f"sixgate: {args.config}: no [broker] table: nothing to update (see README "
              "\"With a real tunnel broker\")", file=sys.stderr)
        return EXIT_CONFIG
    myip = args.myip or settings.known_ipv4
    if not args.myip and settings.uplink:
        # The tunnel follows the uplink (coordinator/uplink.py): its address now.
        from pyroute2 import IPRoute

        from sixgate.coordinator.uplink import follow, ipv4_addresses
        with IPRoute() as ipr:
            myip = follow(myip, ipv4_addresses(ipr, settings.uplink)) or myip
    try:
        broker = broker_of(settings)
    except KeyFileError as exc:
        print(f"sixgate: {args.config}: broker.key_file: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    done = update(broker, myip)
    print(f"{done.result}: {done.detail}")
    fix = RESULTS[done.result]
    if fix is not None:
        print(f"sixgate: {fix}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def cmd_dns64_emit(args: argparse.Namespace) -> int:
    from sixgate.coordinator.dns64 import EmitError, tnat64_config, unbound_config
    settings = _load(args.config)
    try:
        print(unbound_config(settings) if args.unbound else tnat64_config(settings), end="")
    except EmitError as exc:
        print(f"sixgate: {args.config}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def _print_nat64(settings: Settings) -> None:
    """``sixgate check`` of a NAT64 gateway: prefix, clients, pool4 and its worker slices,
    and the way packets take."""
    prefix = Nat64Prefix.parse(settings.nat64_prefix)
    kind = ("the well-known prefix (RFC 6052 §2.1)" if prefix.well_known
            else "a network-specific prefix (RFC 6052 §2.2)")
    print("  mode          NAT64 (RFC 6146 stateful, RFC 7915 translation)")
    print(f"  prefix        {settings.nat64_prefix}: {kind}; non-global IPv4 destinations "
          + ("allowed (allow_non_global)" if settings.nat64_allow_non_global or
             not prefix.well_known else "refused (RFC 6052 §3.1)"))
    print(f"  clients       {', '.join(settings.nat64_clients)} (everyone else refused)")
    from sixgate.coordinator.forwarding import local_pool4, nat64_steered
    owned = local_pool4(settings)
    for address, proto, lo, hi in settings.nat64_pool4:
        print(f"  pool4         {address} {proto} {lo}-{hi}"
              + (" (an address of this host: these ports are the NAT64's, the rest stay the "
                 "host's)" if address in owned else ""))
    if any(a in owned and proto == "icmp" for a, proto, _lo, _hi in settings.nat64_pool4):
        print("  note          echo replies to this host's own address with an identifier in "
              "pool4's icmp range go to the NAT64: pings of the host's own from that address "
              "may lose theirs; narrow icmp to leave identifiers free")
    shards = settings.shard_count
    for index in range(settings.workers):
        # Its shards' slices ([gateway] shards; one per worker by default).
        slices: dict[int, list[tuple[bytes, int, int]]] = {}
        for shard in worker_shards(shards, settings.workers, index):
            for number, rows in worker_pool4(settings.nat64_pool4, shards, shard).items():
                slices.setdefault(number, []).extend(rows)
        text = "; ".join(f"{PROTOCOL_NAMES[number]} " + ", ".join(
            f"{ipaddress.IPv4Address(a)}:{lo}-{hi}" for a, lo, hi in rows)
            for number, rows in slices.items())
        print(f"    worker {index}: TUN {settings.name}{index}, pool4 "
              f"{'slices' if shards > settings.workers else 'slice'} {text}")
    print(f"  filtering     {settings.nat64_filtering} (RFC 6146 §3.5.1); quota "
          f"{settings.nat64_ports_per_client} ports per client /{settings.nat64_client_prefix} "
          f"(RFC 6888 REQ-4), freed ports held {settings.nat64_port_hold_s:g} s (REQ-8)")
    print(f"  mtu           {settings.mtu} on the IPv6 side (TCP MSS clamped to "
          f"{settings.max_mss})")
    if settings.nat64_input == "tun":
        print(f"  packets in    IPv6: the kernel routes {settings.nat64_prefix} to the TUN "
              "devices; IPv4: it routes the pool4 addresses there"
              + (" (steered to the owning worker by sixgate's nftables marks)"
                 if nat64_steered(settings, owned) else ""))
        print("  packets out   written to the TUN devices; the kernel forwards them (sixgate "
              "turns IPv4 and IPv6 forwarding on while it runs)"
              + (f", the IPv4 by routing table {settings.nat64_egress_table} "
                 "(nat64.egress_table)" if settings.nat64_egress_table else ""))
    else:
        print(f"  packets in    IPv6 to {settings.nat64_prefix} over the tunnel; IPv4: the "
              "kernel routes the pool4 addresses to the TUN devices")
        print("  packets out   IPv4 written to the TUN devices (the kernel forwards it: sixgate "
              "turns the uplink's IPv4 forwarding on while it runs); IPv6 back into the "
              "tunnel")
    t = settings.timeouts
    print(f"  timeouts      tcp established {t.tcp_established_s:g} s, transitory "
          f"{t.tcp_transitory_s:g} s, udp {t.udp_s:g} s, icmp {t.icmp_s:g} s, unassured "
          f"{t.unassured_s:g} s")


def _print_clat(settings: Settings) -> bool:
    """``sixgate check`` of a CLAT: the PLAT prefix found and how, the addresses and the
    routes it makes; False when no prefix can be found."""
    from sixgate.coordinator.clat import plat_prefix
    from sixgate.workers.main import clat_device
    from sixgate.workers.tun import CLAT_ROUTE_METRIC
    prefix, _source, how = plat_prefix(settings)
    device = clat_device(settings)
    address = settings.clat_ipv6_address
    print("  CLAT          RFC 6877 §6: this host's IPv4 as " + (
        address if address != "auto" else "an address picked at the start in the /64 of the "
        "IPv6 default route's interface (duplicate address detection, RFC 4862)"))
    print(f"  PLAT prefix   {prefix or 'NONE'}: {how}")
    if settings.mode == "nat64":
        print("                the NAT64 beside it (worker 0 translates for both); its own "
              "address is one of the NAT64's clients")
    print(f"  IPv4          {settings.clat_ipv4_address} on {device}, a default "
          f"route through it (metric {CLAT_ROUTE_METRIC}, MTU {settings.clat_mtu}) unless this "
          "host has an IPv4 default route of its own")
    print(f"  IPv6          {settings.clat_ipv6_address} routed to {device}, "
          "answered for on the uplink (proxy neighbour discovery)")
    return prefix is not None


def _print_every_key(settings: Settings, config: str) -> None:
    print("every key (README \"Every key\"; * = set in the file, else the default):")
    text = Path(config).read_text(encoding="utf-8")
    for key, value, given in effective_values(settings, text):
        print(f"  {'*' if given else ' '} {key.table + '.' + key.name:<35} {value!r}")


def cmd_probe(_args: argparse.Namespace) -> int:
    from sixgate.coordinator.probe import choose_backend, delivery_method, probe
    caps = probe()
    width = max(len(c.name) for c in caps)
    for cap in caps:
        print(f"{cap.name:<{width}}  {'yes' if cap.ok else 'no '}  {cap.detail}")
    method, why = delivery_method(caps)
    print(f"{'delivery':<{width}}  {method or 'none'}  {why}")
    backend, backend_why = choose_backend("auto", caps)
    print(f"{'backend':<{width}}  {backend}  {backend_why}")
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    """Hand the file's text (read here, as the caller) to the running gateway, which validates
    it as ``check`` does and against what it runs, then applies or refuses it; a refusal is
    also logged and exported by the gateway. A file too broken to name its run_dir is sent to
    the run_dir it would have by default."""
    try:
        text = Path(args.config).read_text(encoding="utf-8")
    except OSError as exc:
        print(f"sixgate reload: cannot read {args.config} ({exc.strerror})", file=sys.stderr)
        return EXIT_CONFIG
    valid = True
    try:
        run_dir = load_config(args.config).run_dir
    except ConfigError as exc:
        print(f"sixgate: bad config: {exc}", file=sys.stderr)
        run_dir = _run_dir_of(text)
        valid = False
    try:
        if args.or_take_over:
            from sixgate.coordinator.service_manager import installation
            running = query_gateway(run_dir, "ping").get("installation")
            if running != installation():
                # Another installation runs (an older one has no answer): an upgrade. A bad
                # file (said above) starts nothing.
                if not valid:
                    return EXIT_CONFIG
                return _take_over(args.config, run_dir, f"the running gateway is "
                                  f"{running or 'an older sixgate'}, this is {installation()}")
        reply = query_gateway(run_dir, "reload", config=os.path.abspath(args.config),
                              text=text)
    except RuntimeError as exc:
        print(f"sixgate reload: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    if not reply.get("ok"):
        if args.or_take_over and reply.get("restart_needed"):
            return _take_over(args.config, run_dir, str(reply.get("error")))
        print(f"sixgate reload: refused: {reply.get('error')}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"sixgate reload: {reply.get('message')}")
    return EXIT_OK


TAKE_OVER_DEADLINE_S = 140.0  # its workers' load and the old run's stop (the unit allows 150)


def _take_over(config: str, run_dir: str, why: str) -> int:
    """``reload --or-take-over``: this installation's ``sixgate run --take-over`` in the
    background (its own session; its output is this command's: the unit's log), waited for
    until it serves in place of the running gateway (it answers from the run directory) or
    exits (the running gateway then runs on, unless the new run got as far as stopping it).
    ``config`` parsed (by this command, or by the running gateway's refusal)."""
    script = Path(sys.argv[0])
    argv = ([str(script)] if script.is_absolute() and script.is_file()
            else [sys.executable, "-m", "sixgate.coordinator.cli"])
    print(f"sixgate reload: taking over ({why})", flush=True)
    child = subprocess.Popen([*argv, "run", "--take-over", "--config", config],
                             stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + TAKE_OVER_DEADLINE_S
    while time.monotonic() < deadline:
        if child.poll() is not None:
            print(f"sixgate reload: the take-over failed: `sixgate run --take-over` exited "
                  f"{child.returncode} (its log says why); {_who_serves(run_dir)}",
                  file=sys.stderr)
            return EXIT_RUNTIME
        try:
            if query_gateway(run_dir, "ping", timeout_ms=500).get("pid") == child.pid:
                print(f"sixgate reload: taken over by pid {child.pid}")
                return EXIT_OK
        except RuntimeError:
            pass  # between the two runs: nobody answers for a moment
        time.sleep(0.05)
    print(f"sixgate reload: pid {child.pid} did not take over within "
          f"{TAKE_OVER_DEADLINE_S:.0f} s; it runs on (see its log)", file=sys.stderr)
    return EXIT_RUNTIME


def _who_serves(run_dir: str) -> str:
    """After a failed take-over: the gateway that answers (the old run, or the kernel
    backend's retired run handed back to), or none."""
    try:
        pid = query_gateway(run_dir, "ping", timeout_ms=1000).get("pid")
    except RuntimeError:
        return "no gateway answers: start sixgate again"
    return f"pid {pid} serves as before"


def cmd_drain(args: argparse.Namespace) -> int:
    """[cluster]: the running node withdraws its announcements, then stops once its traffic
    has ended (or at drain_timeout_s); this command waits for that end."""
    settings = _load(args.config)
    try:
        reply = query_gateway(settings, "drain")
    except RuntimeError as exc:
        print(f"sixgate drain: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    if not reply.get("ok"):
        print(f"sixgate drain: refused: {reply.get('error')}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"sixgate drain: {reply.get('message')}", flush=True)
    if args.no_wait:
        return EXIT_OK
    deadline = time.monotonic() + settings.cluster_drain_timeout_s + 30
    while time.monotonic() < deadline:
        try:
            query_gateway(settings, "ping", timeout_ms=1000)
        except RuntimeError:
            print("sixgate drain: the gateway has stopped")
            return EXIT_OK
        time.sleep(0.5)
    print("sixgate drain: the gateway still runs past its drain timeout", file=sys.stderr)
    return EXIT_RUNTIME


def cmd_cluster_bird_config(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if not settings.cluster_announce:
        print(f"sixgate cluster: {args.config} has no [cluster] table", file=sys.stderr)
        return EXIT_CONFIG
    from sixgate.coordinator.cluster import bird_config
    sys.stdout.write(bird_config(settings))
    return EXIT_OK


def cmd_ping(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    from sixgate.coordinator.ping import ping
    try:
        return ping(settings, args.address, args.count, interval_s=args.interval,
                    size=args.size)
    except PermissionError:
        print("sixgate ping: needs root or CAP_NET_RAW for its raw socket",
              file=sys.stderr)
        return EXIT_RUNTIME
    except ValueError as exc:
        print(f"sixgate ping: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _run_dir_of(text: str) -> str:
    """[gateway] run_dir of a config that does not validate, or the default one."""
    try:
        run_dir = tomli.loads(text).get("gateway", {}).get("run_dir")
    except (tomli.TOMLDecodeError, AttributeError):
        run_dir = None
    return run_dir if isinstance(run_dir, str) and run_dir else DEFAULT_RUN_DIR


def query_gateway(settings: Settings | str, cmd: str, timeout_ms: int = 15000,
                  **args: Any) -> dict[str, Any]:
    """Ask the running gateway's control socket (of ``settings``, or of a run_dir); raises
    RuntimeError when nobody answers."""
    run_dir = settings if isinstance(settings, str) else settings.run_dir
    endpoint = control.coordinator_endpoint(run_dir)
    if not os.path.exists(endpoint.removeprefix("ipc://")):
        # No socket file: no gateway runs with this run_dir (answer at once, don't wait).
        raise RuntimeError(f"no gateway runs with run_dir {run_dir} (no {endpoint}); "
                           "start `sixgate run` with this config")
    reply = control.ask(zmq.Context.instance(), [endpoint], control.request(cmd, **args),
                        timeout_ms)[0]
    if reply is None:
        raise RuntimeError(f"no gateway answers on {endpoint}; is `sixgate run` running "
                           "with this config?")
    return reply


def summarize(status: dict[str, Any]) -> dict[str, Any]:
    """Bindings of all workers and drops summed over every process, all reasons present."""
    drops: dict[str, int] = dict(status["coordinator"]["drops"])
    bindings: list[dict[str, Any]] = []
    traffic: dict[str, list[int]] = {}  # direction -> [packets, bytes], all protocols
    for worker in status["workers"]:
        if not worker.get("up"):
            continue
        bindings.extend(worker["bindings"])
        counters = worker["counters"]
        for reason, n in counters["drops"].items():
            drops[reason] = drops.get(reason, 0) + n
        for key, n in counters["packets"].items():
            direction = key.partition("/")[0]
            entry = traffic.setdefault(direction, [0, 0])
            entry[0] += n
            entry[1] += counters["bytes"][key]
    # A take-over's retiring run (kernel backend): its connections until they end, marked;
    # its counters are that run's, not this one's.
    for relay in status.get("retiring", []):
        bindings.extend({**binding, "retiring": True} for binding in relay["bindings"])
    return {"bindings": bindings, "drops": drops, "traffic": traffic, "counters": status}


def cmd_flows(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    try:
        status = query_gateway(settings, "flows", limit=args.limit)
    except RuntimeError as exc:
        print(f"sixgate flows: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    summary = summarize(status)
    if args.json:
        print(json.dumps(summary, indent=1))
        return EXIT_OK
    bindings = summary["bindings"]
    active = sum(w["flows"]["active"] for w in [
        *(w for w in status["workers"] if w.get("up")), *status.get("retiring", [])])
    more = f" ({active - len(bindings)} more not shown: --limit)" if active > len(bindings) \
        else ""
    print(f"{len(bindings)} binding(s){more}")
    if bindings:
        header = ("proto", "client (IPv6)", "pool (IPv4 seen by service)", "rule", "state",
                  "idle_s", "worker")
        rows = [(b["proto"], b["client"], b["pool"], b["rule"], b["state"], str(b["idle_s"]),
                 f"{b['worker']} (retiring)" if b.get("retiring") else str(b["worker"]))
                for b in bindings]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    for worker in status["workers"]:
        if not worker.get("up"):
            print(f"worker {worker['index']}: NOT ANSWERING (restarts {worker['restarts']})")
            continue
        f = worker["flows"]
        print(f"worker {worker['index']} pid {worker['pid']}: {f['active']}/{f['limit']} flows, "
              f"{f['created']} created, {f['expired']} expired, pool {f['pool_in_use']}/"
              f"{f['pool_size']}, restarts {worker['restarts']}")
    for relay in status.get("retiring", []):
        print(f"retiring run pid {relay['pid']}, worker {relay['index']}: "
              f"{relay['flows']['active']} connection(s), carried until they end")
    print("traffic: " + ", ".join(f"{direction} {p} pkt/{b} B" for direction, (p, b)
                                  in summary["traffic"].items()))
    nonzero = {r: n for r, n in summary["drops"].items() if n}
    print("drops: " + (", ".join(f"{r}={n}" for r, n in sorted(nonzero.items()))
                       if nonzero else "none"))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from sixgate.coordinator.status import EndpointError, metrics_url, watch
    url = args.url
    if url is None:
        settings = _load(args.config)
        if not settings.metrics_listen:
            print(f"sixgate status: {args.config} turns the metrics endpoint off ([metrics] "
                  'listen = ""); set it, e.g. "127.0.0.1:9641", or give --url',
                  file=sys.stderr)
            return EXIT_CONFIG
        url = metrics_url(settings.metrics_listen)
    try:
        watch(url, args.interval, once=args.once)
    except EndpointError as exc:
        print(f"sixgate status: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def cmd_deploy(args: argparse.Namespace) -> int:
    from sixgate.deploy.cli import run
    return run(args)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds, more than 0, at most 3600")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sixgate", description="Userspace IPv6 gateway for IPv4-only hosts (6to4/6in4 in, "
        "RFC 7915 translation to IPv4 services).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the gateway in the foreground")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--take-over", action="store_true",
                   help="an upgrade or restart with less outage: if a sixgate runs with this "
                   "run_dir, get ready beside it (this run's workers started and loaded), "
                   "then stop it and start in its place, resuming the sessions it hands over")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("check", help="validate a config and print the effective settings")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("probe", help="what this kernel and these privileges allow")
    p.set_defaults(func=cmd_probe)
    p = sub.add_parser("ping", help="ICMPv6 echo through the tunnel from userspace, or to an "
                       "IPv4 address through the NAT64")
    p.add_argument("address")
    p.add_argument("--count", "-c", type=int, default=4)
    p.add_argument("--interval", "-i", type=float, default=1.0)
    p.add_argument("--size", "-s", type=int, default=56)
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_ping)
    p = sub.add_parser("reload", help="re-read the config into the running gateway (as "
                       "SIGHUP does): rules, limits, timeouts, log level, metrics address")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--or-take-over", action="store_true",
                   help="when the running gateway is another installation of sixgate (an "
                   "upgrade) or the change needs a restart, this installation takes over "
                   "from it instead (sixgate run --take-over, in the background); returns "
                   "once it has. The systemd unit's ExecReload")
    p.set_defaults(func=cmd_reload)
    p = sub.add_parser("drain", help="[cluster]: withdraw this node's BGP announcements, "
                       "then stop once its traffic has ended")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--no-wait", action="store_true", help="return once the drain started")
    p.set_defaults(func=cmd_drain)
    p = sub.add_parser("cluster", help="[cluster]: the node's BGP speaker")
    clustered = p.add_subparsers(dest="cluster_command", required=True)
    p = clustered.add_parser("bird-config", help="print the node's bird.conf (BIRD 2): its "
                             "announcements, up while sixgate holds them up")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_cluster_bird_config)
    p = sub.add_parser("flows", help="list the live bindings of a running gateway")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=control.FLOWS_PAGE_DEFAULT,
                   help=f"bindings per worker, at most {control.FLOWS_PAGE_MAX} "
                   f"(default {control.FLOWS_PAGE_DEFAULT})")
    p.set_defaults(func=cmd_flows)
    p = sub.add_parser("status", help="live view of a running gateway's metrics (rates, "
                       "drops, flows per worker); Ctrl-C ends it")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="read [metrics] listen from here (unless --url is given)")
    p.add_argument("--url", help="the /metrics URL (default: from [metrics] listen)")
    p.add_argument("--interval", "-i", type=_seconds, default=2.0,
                   help="seconds between scrapes; rates are over this span (default 2)")
    p.add_argument("--once", action="store_true",
                   help="print one plain frame (two scrapes --interval apart) and exit")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("tunnel", help="the tunnel's broker")
    tunnel = p.add_subparsers(dest="tunnel_command", required=True)
    p = tunnel.add_parser("update", help="tell the 6in4 broker our address now ([broker]: "
                          "HE's update API)")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--myip", help="the address to register (default: public_ipv4, else "
                   "local_ipv4, or [tunnel] uplink's address if it moved)")
    p.set_defaults(func=cmd_tunnel_update)
    p = sub.add_parser("dns64", help="configuration for the clients of a NAT64: a DNS64 "
                       "resolver, TNAT64")
    dns64 = p.add_subparsers(dest="dns64_command", required=True)
    p = dns64.add_parser("emit", help="print the configuration for the NAT64's prefix")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--unbound", action="store_true",
                      help="a server: clause for unbound's DNS64 module")
    what.add_argument("--tnat64", action="store_true", help="tnat64.conf (TNAT64_CONF_FILE)")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_dns64_emit)
    from sixgate.deploy.cli import add_parser as add_deploy_parser
    add_deploy_parser(sub).set_defaults(func=cmd_deploy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
