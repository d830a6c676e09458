"""TOML config -> validated immutable ``Settings``; every mistake is reported with the file,
line, key path and what to do about it.

The whole file is validated before anything is used, so a running gateway never half-applies
a bad config. Fixed keys come from the gateway issue; the rest are documented in README.md.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import tomli

from workers.engine.flows import Timeouts
from workers.engine.settings import Forward, Settings, pool_addresses
from workers.engine.tunnel import DEFAULT_MARTIAN_IPV4, prefix_6to4

DEFAULT_POOL = "100.64.0.0/16"  # RFC 6598 shared address space: never a real peer of ours
DEFAULT_RUN_DIR = "/run/sixgate"
# Directories a run_dir must never be: sixgate chmods its run_dir to 0700 and cleans it.
SYSTEM_DIRECTORIES = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/media", "/mnt", "/opt",
    "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/run",
    "/var/tmp", "/var/lib", "/usr/local", "/run/user"})


class ConfigError(Exception):
    """A config problem: file, line, key path, and what the user must do."""

    def __init__(self, file: str, key: str, line: int | None, message: str) -> None:
        self.file = file
        self.key = key
        self.line = line
        self.message = message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


ALLOWED: dict[str, set[str]] = {
    "tunnel": {"mode", "local_ipv4", "relay_ipv4", "remote_ipv4", "prefix", "addresses", "mtu",
               "martian_ipv4"},
    "gateway": {"workers", "pool", "run_dir", "name", "max_flows", "max_flows_per_prefix",
                "max_flows_per_48", "max_flows_per_ipv4_source",
                "icmp_errors_per_s", "icmp_error_burst", "queue_batches", "batch_packets",
                "echo_replies_per_s", "echo_burst",
                "hash_seed", "fragment_datagrams", "fragment_bytes", "log_level", "backend",
                "fanout", "tun_writes", "user"},
    "timeouts": {"tcp_established_s", "tcp_transitory_s", "udp_s", "icmp_s", "unassured_s"},
    "forward": {"proto", "port", "to", "from"},
    "metrics": {"listen"},
}

# Every [gateway] default is the Settings field's own default: written once (workers/engine/
# settings.py), read here.
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Settings)
                            if f.default is not MISSING}
DEFAULT_METRICS_LISTEN = DEFAULTS["metrics_listen"]  # 9641: free in Prometheus' allocations


def _given(table: dict[str, Any], key: str) -> Any:
    """``key`` of a config table, or its Settings default when the file does not set it."""
    return table.get(key, DEFAULTS[key])


def _locate(text: str, table: str, key: str | None, index: int = 0) -> int | None:
    """Line number (1-based) of ``key`` inside ``[table]`` (or the ``index``-th ``[[table]]``)."""
    current = None
    seen = -1
    header = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.]+)\s*\]\]?")
    for number, line in enumerate(text.splitlines(), 1):
        match = header.match(line)
        if match:
            current = match.group(1)
            if current == table:
                seen += 1
                if key is None and seen == index:
                    return number
            continue
        if current == table and seen == index and key is not None:
            if re.match(rf"^\s*{re.escape(key)}\s*=", line):
                return number
    return None


@dataclass
class _Ctx:
    file: str
    text: str

    def error(self, table: str, key: str | None, message: str, index: int | None = None) -> (
            ConfigError):
        path = table if key is None else f"{table}.{key}"
        if index is not None:
            path = f"{table}[{index}]" + (f".{key}" if key else "")
        line = _locate(self.text, table, key, index or 0)
        if line is None and key is not None:
            line = _locate(self.text, table, None, index or 0)
        return ConfigError(self.file, path, line, message)


def _ipv4(ctx: _Ctx, table: str, key: str, value: Any) -> str:
    try:
        if not isinstance(value, str):
            raise TypeError(value)  # ipaddress takes integers (and True) as addresses too
        return str(ipaddress.IPv4Address(value))
    except (ipaddress.AddressValueError, ValueError, TypeError):
        raise ctx.error(table, key, f"{value!r} is not an IPv4 address; write it like "
                                    f"\"192.0.2.10\"") from None


def _int(ctx: _Ctx, table: str, key: str, value: Any, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ctx.error(table, key, f"{value!r} must be a whole number from {lo} to {hi}")
    return value


def _number(ctx: _Ctx, table: str, key: str, value: Any, lo: float,
            hi: float = 1e9) -> float:
    # nan and inf are TOML numbers too: a nan timeout would stop expiry for good.
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or not lo <= value <= hi):
        raise ctx.error(table, key, f"{value!r} must be a number from {lo:g} to {hi:g}")
    return float(value)


# RFC 6890 special-purpose IPv4 blocks no forward rule may target: "this network", multicast,
# reserved and the limited broadcast address are never one service.
_BAD_TARGETS = (
    (ipaddress.IPv4Network("0.0.0.0/8"), "\"this network\" (RFC 6890)"),
    (ipaddress.IPv4Network("224.0.0.0/4"), "multicast (RFC 5771)"),
    (ipaddress.IPv4Network("240.0.0.0/4"), "reserved or broadcast (RFC 6890)"),
)


def _parse_forward(ctx: _Ctx, index: int, raw: Any) -> Forward:
    if not isinstance(raw, dict):
        raise ctx.error("forward", None, f"{raw!r} is not a rule; write each rule as a "
                        "[[forward]] table with proto, port and to", index)
    for key in raw:
        if key not in ALLOWED["forward"]:
            raise ctx.error("forward", key, f"unknown key; allowed: "
                            f"{', '.join(sorted(ALLOWED['forward']))}", index)
    proto = raw.get("proto")
    if proto not in ("tcp", "udp"):
        raise ctx.error("forward", "proto", f"{proto!r} must be \"tcp\" or \"udp\"", index)
    port = raw.get("port")
    if isinstance(port, int) and not isinstance(port, bool):
        lo = hi = port
    elif isinstance(port, str) and re.fullmatch(r"\d+-\d+", port):
        lo, hi = (int(p) for p in port.split("-"))
    elif isinstance(port, str) and port.isdigit():
        lo = hi = int(port)
    else:
        raise ctx.error("forward", "port", f"{port!r} must be a port (80) or a range "
                        "(\"8000-8099\")", index)
    if not (1 <= lo <= hi <= 65535):
        raise ctx.error("forward", "port", f"{port!r}: ports run from 1 to 65535, low first",
                        index)
    to = raw.get("to")
    if not isinstance(to, str):
        raise ctx.error("forward", "to", "missing; write the IPv4 service as "
                        "\"127.0.0.1:8080\"", index)
    host, _, tport = to.partition(":")
    try:
        target_ip = str(ipaddress.IPv4Address(host))
    except ValueError:
        raise ctx.error("forward", "to", f"{to!r}: {host!r} is not an IPv4 address; write "
                        "\"127.0.0.1:8080\"", index) from None
    for block, what in _BAD_TARGETS:
        if ipaddress.IPv4Address(target_ip) in block:
            raise ctx.error("forward", "to", f"{to!r}: {target_ip} is {what}, not a service "
                            "address; name the host the service runs on", index)
    target_port: int | None = None
    if tport:
        if not tport.isdigit() or not 1 <= int(tport) <= 65535:
            raise ctx.error("forward", "to", f"{to!r}: port must be 1..65535", index)
        target_port = int(tport)
        if target_port + (hi - lo) > 65535:
            raise ctx.error("forward", "to", f"{to!r}: the range {lo}-{hi} shifted to "
                            f"{target_port} runs past 65535", index)
    sources = raw.get("from", [])
    if not isinstance(sources, list) or not sources and "from" in raw:
        raise ctx.error("forward", "from", f"{sources!r} must be a non-empty list of IPv6 "
                        "prefixes like [\"2001:db8::/32\"] (leave it out to allow everyone)",
                        index)
    nets = []
    for cidr in sources:
        try:
            if not isinstance(cidr, str):
                raise TypeError(cidr)
            nets.append(str(ipaddress.IPv6Network(cidr)))
        except (ValueError, TypeError):
            raise ctx.error("forward", "from", f"{cidr!r} is not an IPv6 prefix; write it "
                            "like \"2001:db8::/32\" (host bits zero)", index) from None
    return Forward(proto=proto, port_lo=lo, port_hi=hi, target_ipv4=target_ip,
                   target_port=target_port, sources=tuple(nets))


def parse_config(text: str, file: str = "<config>") -> Settings:
    """Validate a whole config text; raises ``ConfigError`` for the first problem found."""
    ctx = _Ctx(file, text)
    try:
        doc = tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        raise ConfigError(file, "", int(match.group(1)) if match else None,
                          f"not valid TOML ({exc}); fix the syntax") from None
    for table in doc:
        if table not in ALLOWED:
            raise ConfigError(file, table, _locate(text, table, None), "unknown table; "
                              f"allowed: {', '.join(sorted(ALLOWED))}")
    for table, keys in ALLOWED.items():
        if table == "forward":
            continue
        section = doc.get(table, {})
        if not isinstance(section, dict):
            raise ctx.error(table, None, "must be a table ([" + table + "])")
        for key in section:
            if key not in keys:
                raise ctx.error(table, key, f"unknown key; allowed: {', '.join(sorted(keys))}")

    tunnel = doc.get("tunnel")
    if not tunnel:
        raise ConfigError(file, "tunnel", None, "missing [tunnel] table; see README.md")
    mode = tunnel.get("mode")
    if mode not in ("6to4", "6in4"):
        raise ctx.error("tunnel", "mode", f"{mode!r} must be \"6to4\" (RFC 3056) or "
                        "\"6in4\" (RFC 4213 configured tunnel)")
    if "local_ipv4" not in tunnel:
        raise ctx.error("tunnel", None, "local_ipv4 is missing; set this host's public IPv4")
    local_ipv4 = _ipv4(ctx, "tunnel", "local_ipv4", tunnel["local_ipv4"])
    relay_ipv4 = remote_ipv4 = None
    if mode == "6to4":
        if "relay_ipv4" not in tunnel:
            # RFC 7526: the anycast relay is deprecated, so there is no silent default.
            raise ctx.error("tunnel", None, "relay_ipv4 is missing: 6to4 needs a relay for "
                            "non-2002::/16 destinations; name one (RFC 7526 deprecated the "
                            "192.88.99.1 anycast default)")
        relay_ipv4 = _ipv4(ctx, "tunnel", "relay_ipv4", tunnel["relay_ipv4"])
        if "remote_ipv4" in tunnel:
            raise ctx.error("tunnel", "remote_ipv4", "only for mode = \"6in4\"; remove it")
        derived = prefix_6to4(local_ipv4)
        if "prefix" in tunnel and _ipv6_network(tunnel["prefix"]) != derived:
            raise ctx.error("tunnel", "prefix", f"in 6to4 mode the prefix is derived from "
                            f"local_ipv4 ({derived}); remove the key")
        prefix = derived
    else:
        if "remote_ipv4" not in tunnel:
            raise ctx.error("tunnel", None, "remote_ipv4 is missing: 6in4 needs the tunnel "
                            "broker's IPv4 endpoint")
        remote_ipv4 = _ipv4(ctx, "tunnel", "remote_ipv4", tunnel["remote_ipv4"])
        if "prefix" not in tunnel:
            raise ctx.error("tunnel", None, "prefix is missing: 6in4 needs the routed prefix "
                            "your broker gave you, e.g. \"2001:db8:1::/64\"")
        try:
            if not isinstance(tunnel["prefix"], str):
                raise TypeError(tunnel["prefix"])
            prefix = ipaddress.IPv6Network(tunnel["prefix"])
        except (ValueError, TypeError) as exc:
            raise ctx.error("tunnel", "prefix", f"{tunnel['prefix']!r} is not an IPv6 prefix "
                            f"({exc}); write it like \"2001:db8:1::/64\"") from None
        if "relay_ipv4" in tunnel:
            raise ctx.error("tunnel", "relay_ipv4", "only for mode = \"6to4\"; remove it")
    raw_addresses = tunnel.get("addresses", [str(prefix.network_address + 1)])
    if not isinstance(raw_addresses, list) or not raw_addresses:
        raise ctx.error("tunnel", "addresses", "must be a non-empty list of IPv6 addresses")
    addresses = []
    for value in raw_addresses:
        try:
            if not isinstance(value, str):
                raise TypeError(value)
            addr = ipaddress.IPv6Address(value)
        except (ValueError, TypeError):
            raise ctx.error("tunnel", "addresses", f"{value!r} is not an IPv6 address") from None
        if addr not in prefix:
            raise ctx.error("tunnel", "addresses", f"{addr} is outside the tunnel prefix "
                            f"{prefix}; packets for it would never reach this host")
        addresses.append(str(addr))
    mtu = tunnel.get("mtu", 1480)
    # RFC 4213 §3.2.1: a static tunnel MTU is 1280..1480.
    mtu = _int(ctx, "tunnel", "mtu", mtu, 1280, 1480)
    martian_rows = DEFAULT_MARTIAN_IPV4
    if "martian_ipv4" in tunnel:
        if not isinstance(tunnel["martian_ipv4"], list):
            raise ctx.error("tunnel", "martian_ipv4", "must be a list of IPv4 prefixes like "
                            "[\"10.0.0.0/8\"] ([] turns the check off)")
        rows = []
        for cidr in tunnel["martian_ipv4"]:
            try:
                if not isinstance(cidr, str):
                    raise TypeError(cidr)
                rows.append((str(ipaddress.IPv4Network(cidr)), "configured"))
            except (ValueError, TypeError):
                raise ctx.error("tunnel", "martian_ipv4", f"{cidr!r} is not an IPv4 prefix "
                                "like \"10.0.0.0/8\"") from None
        martian_rows = tuple(rows)

    gateway = doc.get("gateway", {})
    workers = _int(ctx, "gateway", "workers", gateway.get("workers", os.cpu_count() or 1), 1,
                   64)
    pool_text = gateway.get("pool", DEFAULT_POOL)
    try:
        if not isinstance(pool_text, str):
            raise TypeError(pool_text)
        pool = ipaddress.IPv4Network(pool_text)
    except (ValueError, TypeError) as exc:
        raise ctx.error("gateway", "pool", f"{pool_text!r} is not an IPv4 prefix ({exc}); "
                        "write it like \"100.64.0.0/16\"") from None
    if len(pool_addresses(str(pool))) < workers:
        raise ctx.error("gateway", "pool", f"{pool} has fewer addresses than workers "
                        f"({workers}); use a larger block")
    forwards_raw = doc.get("forward", [])
    if not isinstance(forwards_raw, list):
        raise ctx.error("forward", None, "write forward rules as [[forward]] tables")
    forwards = tuple(_parse_forward(ctx, i, f) for i, f in enumerate(forwards_raw))
    seen: dict[tuple[str, int], int] = {}
    for i, rule in enumerate(forwards):
        if rule.target_ipv4 == local_ipv4:
            raise ctx.error("forward", "to", f"{rule.target_ipv4} is tunnel.local_ipv4, the "
                            "tunnel's own address: a service on this host is reached as "
                            "\"127.0.0.1:PORT\"", i)
        if ipaddress.IPv4Address(rule.target_ipv4) in pool:
            raise ctx.error("forward", "to", f"{rule.target_ipv4} is inside the pool {pool}; "
                            "choose another pool or target", i)
        for port in range(rule.port_lo, rule.port_hi + 1):
            other = seen.setdefault((rule.proto, port), i)
            if other != i:
                raise ctx.error("forward", "port", f"{rule.proto} port {port} is already "
                                f"forwarded by rule {other}; each port may have one rule", i)
    for key, value in (("local_ipv4", local_ipv4), ("relay_ipv4", relay_ipv4),
                       ("remote_ipv4", remote_ipv4)):
        if value and ipaddress.IPv4Address(value) in pool:
            raise ctx.error("gateway", "pool", f"the pool {pool} contains tunnel.{key} "
                            f"{value}; choose a pool no real host uses")
    name = gateway.get("name", "sixgate")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9]{0,9}", name):
        raise ctx.error("gateway", "name", f"{name!r} must be 1-10 lower-case letters/digits "
                        "starting with a letter (TUN devices are named <name><worker>)")
    run_dir = gateway.get("run_dir", DEFAULT_RUN_DIR)
    if not isinstance(run_dir, str) or not run_dir.startswith("/"):
        raise ctx.error("gateway", "run_dir", f"{run_dir!r} must be an absolute path")
    if os.path.normpath(run_dir) in SYSTEM_DIRECTORIES:
        # sixgate makes its run directory mode 0700 and deletes sockets and pidfiles in it.
        raise ctx.error("gateway", "run_dir", f"{run_dir!r} is a system directory; give "
                        "sixgate one of its own, like \"/run/sixgate\"")
    log_level = _given(gateway, "log_level")
    if log_level not in ("debug", "info", "warning", "error"):
        raise ctx.error("gateway", "log_level", f"{log_level!r} must be debug, info, warning "
                        "or error")

    user = _given(gateway, "user")
    if not isinstance(user, str) or not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}|", user):
        raise ctx.error("gateway", "user", f"{user!r} must be a user name like \"nobody\" "
                        "(or \"\" to keep the workers root)")
    backend = _given(gateway, "backend")
    if backend not in ("auto", "userspace", "kernel"):
        raise ctx.error("gateway", "backend", f"{backend!r} must be \"auto\", \"userspace\" "
                        "or \"kernel\"")

    timeouts_raw = doc.get("timeouts", {})
    defaults = Timeouts()
    # RFC 6146 §4 / RFC 4787 REQ-5: UDP below 2 min breaks applications; RFC 5382 REQ-5 asks
    # at least 2 h 4 min for established TCP, so those are the floors.
    timeouts = Timeouts(
        tcp_established_s=_number(ctx, "timeouts", "tcp_established_s", timeouts_raw.get(
            "tcp_established_s", defaults.tcp_established_s), 7440),
        tcp_transitory_s=_number(ctx, "timeouts", "tcp_transitory_s", timeouts_raw.get(
            "tcp_transitory_s", defaults.tcp_transitory_s), 240),
        udp_s=_number(ctx, "timeouts", "udp_s", timeouts_raw.get("udp_s", defaults.udp_s),
                      120),
        icmp_s=_number(ctx, "timeouts", "icmp_s", timeouts_raw.get("icmp_s", defaults.icmp_s),
                       1),
        # Linux conntrack: 30 s for an unanswered UDP flow, 60 s for a half-open TCP one.
        unassured_s=_number(ctx, "timeouts", "unassured_s", timeouts_raw.get(
            "unassured_s", defaults.unassured_s), 1, 240),
    )
    return Settings(
        mode=mode, local_ipv4=local_ipv4, relay_ipv4=relay_ipv4, remote_ipv4=remote_ipv4,
        prefix=str(prefix), addresses=tuple(addresses), mtu=mtu, workers=workers,
        pool=str(pool), run_dir=run_dir, name=name, forwards=forwards,
        max_flows=_int(ctx, "gateway", "max_flows", _given(gateway, "max_flows"), 1,
                       10_000_000),
        max_flows_per_prefix=_int(ctx, "gateway", "max_flows_per_prefix",
                                  _given(gateway, "max_flows_per_prefix"), 1, 10_000_000),
        max_flows_per_48=_int(ctx, "gateway", "max_flows_per_48",
                              _given(gateway, "max_flows_per_48"), 1, 10_000_000),
        max_flows_per_ipv4_source=_int(ctx, "gateway", "max_flows_per_ipv4_source",
                                       _given(gateway, "max_flows_per_ipv4_source"), 1,
                                       10_000_000),
        timeouts=timeouts,
        icmp_errors_per_s=_number(ctx, "gateway", "icmp_errors_per_s",
                                  _given(gateway, "icmp_errors_per_s"), 0),
        icmp_error_burst=_int(ctx, "gateway", "icmp_error_burst",
                              _given(gateway, "icmp_error_burst"), 1, 1_000_000),
        echo_replies_per_s=_number(ctx, "gateway", "echo_replies_per_s",
                                   _given(gateway, "echo_replies_per_s"), 0),
        echo_burst=_int(ctx, "gateway", "echo_burst", _given(gateway, "echo_burst"), 1,
                        1_000_000),
        queue_batches=_int(ctx, "gateway", "queue_batches", _given(gateway, "queue_batches"),
                           1, 1_000_000),
        batch_packets=_int(ctx, "gateway", "batch_packets", _given(gateway, "batch_packets"),
                           1, 1024),
        # A seed outsiders cannot know: drawn at each start unless the config names one.
        hash_seed=_int(ctx, "gateway", "hash_seed", gateway.get(
            "hash_seed", int.from_bytes(os.urandom(4), "big")), 0, 0xFFFFFFFF),
        fragment_datagrams=_int(ctx, "gateway", "fragment_datagrams",
                                _given(gateway, "fragment_datagrams"), 1, 1_000_000),
        fragment_bytes=_int(ctx, "gateway", "fragment_bytes",
                            _given(gateway, "fragment_bytes"), 65536, 1 << 34),
        martian_ipv4=martian_rows, log_level=log_level, source_file=file, backend=backend,
        user=user,
        metrics_listen=_metrics_listen(ctx, doc.get("metrics", {})),
        # Kernel fan-out is the default: no packet crosses the coordinator, so capture scales
        # with the workers (README "Benchmarks": 0.58 -> 0.85 of TAYGA's per-core rate).
        fanout=_choice(ctx, "gateway", "fanout", _given(gateway, "fanout"), {
            "kernel": "each worker captures its share with a kernel filter",
            "coordinator": "the coordinator captures and sends batches over ZeroMQ"}),
        tun_writes=_choice(ctx, "gateway", "tun_writes", _given(gateway, "tun_writes"), {
            "io_uring": "a batch of packets per system call (write(2) where io_uring is refused)",
            "write": "one write(2) per packet"}),
    )


def _choice(ctx: _Ctx, table: str, key: str, value: object, allowed: dict[str, str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        choices = "; ".join(f'"{name}": {what}' for name, what in allowed.items())
        raise ctx.error(table, key, f"{value!r} is not one of: {choices}")
    return str(value)


def _ipv6_network(value: object) -> ipaddress.IPv6Network | None:
    try:
        return ipaddress.IPv6Network(str(value), strict=False)
    except ValueError:
        return None


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError saying what is wrong."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("must be \"host:port\" with a port 1-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    else:
        ipaddress.IPv4Address(host)
    return host, int(port_text)


def _metrics_listen(ctx: _Ctx, metrics: dict[str, Any]) -> str:
    listen = metrics.get("listen", DEFAULT_METRICS_LISTEN)
    if listen == "":
        return ""  # explicitly off
    if not isinstance(listen, str):
        raise ctx.error("metrics", "listen", "must be a string like \"127.0.0.1:9641\"")
    try:
        parse_listen(listen)
    except ValueError as exc:
        raise ctx.error("metrics", "listen", f"{listen!r} {exc}; write e.g. "
                        "\"127.0.0.1:9641\" or \"[::1]:9641\", or \"\" to turn metrics "
                        "off") from None
    return listen


def load_config(path: str) -> Settings:
    """Read and validate a config file; unreadable files are a ConfigError too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, "", None, f"cannot read the file ({exc.strerror}); check the "
                          "path given to --config") from None
    return parse_config(text, str(path))
