"""``deploy/inventory.toml``: the fleet (hosts, groups, variables, forward rule sets).

Layout (see the commented example beside this file)::

    [defaults]            variables every host starts from
    [rules.NAME]          forward = [{proto, port, to}, ...]: a named rule set
    [groups.NAME]         hosts = [...] and variables for those hosts
    [hosts.NAME]          variables of one host (``ssh`` is where Ansible connects)

A variable set on a host beats its groups, a group beats ``[defaults]``. Two groups of one host
setting the same variable differently is an error (Ansible would pick one by group name order,
silently). Every value is checked where it is written, so an error names that file, line and key;
the gateway config rendered from a host's variables is then validated whole by the gateway's own
parser (``coordinator.config``) before any host is touched.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from sixgate.coordinator.config import DEFAULT_POOL, ConfigError
from sixgate.deploy.source import KeyPath, TomlSource, load_toml, reject_unknown, table_at

HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # Ansible warns on other group names
# Strings go into the gateway's TOML and Ansible's YAML as they are: no quotes, no escapes.
SAFE_TEXT = re.compile(r"[A-Za-z0-9_.:/\[\]+@%-]*")
RESERVED_GROUPS = frozenset({"all", "ungrouped", "sixgate"})


@dataclass(frozen=True)
class Variable:
    """One inventory variable: how it is checked, its default, what it means."""

    check: Callable[[TomlSource, KeyPath, Any], Any]
    default: Any
    help: str


def _text(source: TomlSource, path: KeyPath, value: Any) -> str:
    if not isinstance(value, str) or not SAFE_TEXT.fullmatch(value):
        raise source.error(path, f"{value!r} must be a string of letters, digits and . : / - _ "
                           "[ ] + @ % (no spaces or quotes)")
    return value


def _host(source: TomlSource, path: KeyPath, value: Any) -> str:
    text = _text(source, path, value)
    if not text:
        raise source.error(path, "must not be empty; write the host's address or DNS name")
    return text


def _address(kind: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address], label: str,
             example: str) -> Callable[[TomlSource, KeyPath, Any], str]:
    def check(source: TomlSource, path: KeyPath, value: Any) -> str:
        try:
            return str(kind(value))
        except (ipaddress.AddressValueError, ValueError, TypeError):
            raise source.error(path, f"{value!r} is not an {label} address; write it like "
                               f"\"{example}\"") from None
    return check


_ipv4 = _address(ipaddress.IPv4Address, "IPv4", "192.0.2.10")


def _int_range(lo: int, hi: int) -> Callable[[TomlSource, KeyPath, Any], int]:
    def check(source: TomlSource, path: KeyPath, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise source.error(path, f"{value!r} must be a whole number from {lo} to {hi}")
        return value
    return check


def _choice(*choices: str) -> Callable[[TomlSource, KeyPath, Any], str]:
    def check(source: TomlSource, path: KeyPath, value: Any) -> str:
        if value not in choices:
            raise source.error(path, f"{value!r} must be one of "
                               f"{', '.join(repr(c) for c in choices)}")
        return str(value)
    return check


def _absolute(source: TomlSource, path: KeyPath, value: Any) -> str:
    text = _text(source, path, value)
    if not text.startswith("/") or ".." in PurePosixPath(text).parts:
        raise source.error(path, f"{value!r} must be an absolute path on the host, like "
                           "\"/usr/bin/python3\"")
    return str(PurePosixPath(text))


def _local_file(source: TomlSource, path: KeyPath, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise source.error(path, "must be a file name (relative to this file, or absolute)")
    resolved = source.resolve(value)
    if not resolved.is_file():
        raise source.error(path, f"{str(resolved)!r} does not exist on this controller")
    return str(resolved)


def _string_list(source: TomlSource, path: KeyPath, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise source.error(path, "must be a list of strings, like [\"2002:c000:20a::1\"]")
    return [_text(source, (*path, index), item) for index, item in enumerate(value)]


def _bool(source: TomlSource, path: KeyPath, value: Any) -> bool:
    if not isinstance(value, bool):
        raise source.error(path, f"{value!r} must be true or false")
    return value


def _client_prefix(source: TomlSource, path: KeyPath, value: Any) -> int:
    if value not in (64, 128) or isinstance(value, bool):
        raise source.error(path, f"{value!r} must be 64 or 128")
    return int(value)


def _ping_target(source: TomlSource, path: KeyPath, value: Any) -> str:
    """An IPv6 address (pinged through the tunnel) or an IPv4 one (through the NAT64)."""
    try:
        return str(ipaddress.ip_address(value))
    except (ValueError, TypeError):
        raise source.error(path, f"{value!r} is not an IP address; write an IPv6 address "
                           "reached through the tunnel, like \"2001:db8::1\", or an IPv4 one "
                           "reached through the NAT64, like \"198.51.100.1\"") from None


POOL4_KEYS = frozenset({"address", "tcp", "udp", "icmp"})


def _pool4(source: TomlSource, path: KeyPath, value: Any) -> list[dict[str, str]]:
    """NAT64 pool4 entries as the gateway's [[nat64.pool4]] tables; the gateway's parser checks
    them further once rendered (addresses, ranges, overlaps)."""
    if not isinstance(value, list) or not value:
        raise source.error(path, "must be a list of tables like "
                           "[{ address = \"203.0.113.5\", tcp = \"61001-65535\" }]")
    rows = []
    for index, row in enumerate(value):
        where = (*path, index)
        if not isinstance(row, dict):
            raise source.error(where, "must be a table { address = ..., tcp = ..., udp = ..., "
                               "icmp = ... }")
        reject_unknown(source, row, where, POOL4_KEYS)
        if "address" not in row:
            raise source.error(where, "missing address")
        rows.append({"address": _ipv4(source, (*where, "address"), row["address"]),
                     **{key: _text(source, (*where, key), row[key])
                        for key in ("tcp", "udp", "icmp") if key in row}})
    return rows


EXTRA_TUNNEL_KEYS = frozenset({"name", "mode", "remote_ipv4", "relay_ipv4", "prefix",
                               "ipv4_mask_len", "border_relay_ipv4", "addresses", "mtu",
                               "martian_ipv4"})


def _extra_tunnels(source: TomlSource, path: KeyPath, value: Any) -> list[dict[str, Any]]:
    """Further tunnels of the host ([[tunnel]] after the first, README "Several tunnels"): each
    a table of the gateway's tunnel keys but the shared local_ipv4/public_ipv4; the gateway's
    parser checks them once rendered."""
    if not isinstance(value, list) or not value:
        raise source.error(path, "must be a list of tables like [{ name = \"backup\", mode = "
                           "\"6in4\", remote_ipv4 = \"198.51.100.3\", prefix = "
                           "\"2001:db8:2::/64\" }]")
    tunnels = []
    for index, tunnel in enumerate(value):
        where = (*path, index)
        if not isinstance(tunnel, dict):
            raise source.error(where, "must be a table { name = ..., mode = ..., ... }")
        reject_unknown(source, tunnel, where, EXTRA_TUNNEL_KEYS)
        if "mode" not in tunnel:
            raise source.error(where, "missing mode")
        tunnels.append(dict(tunnel))
    return tunnels


FORWARD_KEYS = frozenset({"proto", "port", "to"})


def _forward(source: TomlSource, path: KeyPath, value: Any) -> list[dict[str, str]]:
    """Forward rules as the gateway's [[forward]] tables; the gateway's parser checks them
    further once rendered (port ranges, targets)."""
    if not isinstance(value, list):
        raise source.error(path, "must be a list of tables like "
                           "[{ proto = \"tcp\", port = 80, to = \"127.0.0.1:8080\" }]")
    rules = []
    for index, rule in enumerate(value):
        where = (*path, index)
        if not isinstance(rule, dict):
            raise source.error(where, "must be a table { proto = ..., port = ..., to = ... }")
        reject_unknown(source, rule, where, FORWARD_KEYS)
        missing = sorted(FORWARD_KEYS - set(rule))
        if missing:
            raise source.error(where, f"missing {', '.join(missing)}")
        port = rule["port"]
        if isinstance(port, int) and not isinstance(port, bool):
            port = str(port)
        rules.append({"proto": _choice("tcp", "udp")(source, (*where, "proto"), rule["proto"]),
                      "port": _text(source, (*where, "port"), port),
                      "to": _text(source, (*where, "to"), rule["to"])})
    return rules


VARIABLES: dict[str, Variable] = {
    # -- how Ansible reaches the host
    "ssh": Variable(_host, None, "address or DNS name Ansible connects to (ansible_host)"),
    "ssh_port": Variable(_int_range(1, 65535), 22, "sshd port"),
    "ssh_user": Variable(_host, "root", "login (root, or a user with sudo: become is used "
                                        "when it is not root)"),
    "ssh_key": Variable(_local_file, None, "private key file on the controller"),
    "known_hosts": Variable(_local_file, None, "known_hosts file with the hosts' keys "
                                               "(StrictHostKeyChecking=yes)"),
    "python": Variable(_absolute, "/usr/bin/python3", "the host's Python 3.11+, with venv"),
    # -- where and how sixgate lives on the host
    "install_root": Variable(_absolute, "/", "prefix of /opt/sixgate, /etc/sixgate, /run, "
                                             "/var/log/sixgate on the host"),
    "service": Variable(_choice("systemd", "pidfile"), "systemd",
                        "systemd unit, or pidfile supervision for hosts without systemd"),
    "user": Variable(_text, "sixgate", "systemd hosts: the system user made for the gateway, "
                     "the unit's User= and [gateway] user (pidfile hosts: [gateway] user's "
                     "default, nobody)"),
    # -- the gateway's config (README "Configuration")
    "tunnel_name": Variable(_text, None, "tunnel.name of the first tunnel (its metrics' label)"),
    "extra_tunnels": Variable(_extra_tunnels, None, "further tunnels on the same local_ipv4, "
                              "each a table of tunnel keys: [{ name, mode, remote_ipv4, prefix, "
                              "... }] (README \"Several tunnels\")"),
    "mode": Variable(_choice("6to4", "6in4", "6rd", "nat64"), None, "tunnel.mode; \"nat64\": no "
                     "tunnel, the host is a NAT64 only (nat64_* below)"),
    "local_ipv4": Variable(_ipv4, None, "tunnel.local_ipv4: the host's public IPv4 (not "
                           "for mode \"nat64\")"),
    "public_ipv4": Variable(_ipv4, None, "tunnel.public_ipv4: behind a 1:1 NAT, the address "
                            "the tunnel is known by (default: local_ipv4)"),
    "uplink": Variable(_text, None, "tunnel.uplink (6in4): the interface whose IPv4 address "
                       "the tunnel follows without a restart"),
    "public_ipv4_url": Variable(_text, None, "tunnel.public_ipv4_url (6in4 behind a 1:1 NAT): "
                                "a \"what is my address\" service"),
    "public_ipv4_check_s": Variable(_int_range(5, 86400), None,
                                    "tunnel.public_ipv4_check_s"),
    "relay_ipv4": Variable(_ipv4, None, "tunnel.relay_ipv4 (6to4)"),
    "remote_ipv4": Variable(_ipv4, None, "tunnel.remote_ipv4 (6in4 broker endpoint)"),
    "prefix": Variable(_text, None, "tunnel.prefix (6in4 routed prefix, 6rd: the ISP's 6rd "
                       "prefix)"),
    "ipv4_mask_len": Variable(_int_range(0, 32), None, "tunnel.ipv4_mask_len (6rd)"),
    "border_relay_ipv4": Variable(_ipv4, None, "tunnel.border_relay_ipv4 (6rd)"),
    "addresses": Variable(_string_list, None, "tunnel.addresses"),
    "mtu": Variable(_int_range(1280, 1480), None, "tunnel.mtu"),
    "workers": Variable(_int_range(1, 256), None, "gateway.workers (default: CPUs)"),
    "pool": Variable(_text, None, "gateway.pool"),
    "gateway_name": Variable(_text, None, "gateway.name (TUN devices <name>0..)"),
    "backend": Variable(_choice("auto", "userspace", "kernel"), None, "gateway.backend"),
    "log_level": Variable(_choice("debug", "info", "warning", "error"), None,
                          "gateway.log_level"),
    "metrics_listen": Variable(_text, "127.0.0.1:9641", "metrics.listen (the health gate "
                                                         "asks its /readyz)"),
    "rules": Variable(_string_list, [], "names of [rules.NAME] sets, forwarded first"),
    "forward": Variable(_forward, [], "forward rules of this host/group, after the sets"),
    # -- NAT64 (README "NAT64"): a [nat64] table is written when mode is "nat64" or any of
    # these is set (beside the tunnel of a 6to4/6in4 host)
    "nat64_prefix": Variable(_text, None, "nat64.prefix (default 64:ff9b::/96)"),
    "nat64_clients": Variable(_string_list, None, "nat64.clients: IPv6 prefixes that may use it"),
    "nat64_input": Variable(_choice("tun", "tunnel"), None, "nat64.input"),
    "nat64_pool4": Variable(_pool4, None, "the [[nat64.pool4]] entries: [{ address, tcp, udp, "
                            "icmp }]"),
    "nat64_mtu": Variable(_int_range(1280, 65535), None, "nat64.mtu (mode \"nat64\" only)"),
    "nat64_allow_non_global": Variable(_bool, None, "nat64.allow_non_global"),
    "nat64_filtering": Variable(_choice("endpoint-independent", "address-dependent"), None,
                                "nat64.filtering"),
    "nat64_ports_per_client": Variable(_int_range(1, 1 << 20), None, "nat64.ports_per_client"),
    "nat64_client_prefix": Variable(_client_prefix, None, "nat64.client_prefix"),
    "nat64_port_hold_s": Variable(_int_range(0, 3600), None, "nat64.port_hold_s"),
    "nat64_log_bindings": Variable(_bool, None, "nat64.log_bindings"),
    "nat64_egress_table": Variable(_int_range(0, 2**31 - 1), None, "nat64.egress_table (the "
                                   "routing table of the NAT64's translated IPv4; 0: main)"),
    # -- a fleet behind ECMP (README "A fleet behind ECMP"): a [cluster] table is written when
    # cluster_announce is set; each node its own router_id
    "cluster_announce": Variable(_string_list, None, "cluster.announce: the prefixes this "
                                 "node announces over BGP while ready"),
    "cluster_announce_pool": Variable(_bool, None, "cluster.announce_pool: announce the "
                                      "node's pool and pool4 too (each node a pool of its own)"),
    "cluster_local_as": Variable(_int_range(1, 4294967294), None, "cluster.local_as"),
    "cluster_peer_as": Variable(_int_range(1, 4294967294), None, "cluster.peer_as"),
    "cluster_neighbors": Variable(_string_list, None, "cluster.neighbors: the routers"),
    "cluster_router_id": Variable(_ipv4, None, "cluster.router_id (unique per node)"),
    "cluster_hold_time_s": Variable(_int_range(3, 65535), None, "cluster.hold_time_s"),
    "cluster_withdraw_after_s": Variable(_int_range(1, 300), None,
                                         "cluster.withdraw_after_s"),
    "cluster_drain_timeout_s": Variable(_int_range(1, 86400), None, "cluster.drain_timeout_s"),
    "cluster_drain_quiet_s": Variable(_int_range(1, 600), None, "cluster.drain_quiet_s"),
    "bird_socket": Variable(_absolute, "/run/bird/bird.ctl", "[cluster] hosts: the running "
                            "BIRD's control socket; a rollout writes <etc>/bird.conf and runs "
                            "`birdc configure` on it when it exists"),
    # -- the health gate
    "ping_target": Variable(_ping_target, None, "what `sixgate ping` must reach through the "
                            "new gateway: an IPv6 address through the tunnel, or an IPv4 "
                            "address through the NAT64"),
}
REQUIRED = ("ssh", "mode")
NAT64_VARIABLES = tuple(key for key in VARIABLES if key.startswith("nat64_"))
CLUSTER_VARIABLES = tuple(key for key in VARIABLES if key.startswith("cluster_"))


def has_nat64(variables: dict[str, Any]) -> bool:
    """Whether a host with these variables gets a [nat64] table."""
    return variables["mode"] == "nat64" or any(variables[key] is not None
                                               for key in NAT64_VARIABLES)


@dataclass(frozen=True)
class Host:
    """One host: its effective variables and, for each, the key path that set it."""

    name: str
    vars: dict[str, Any]
    origin: dict[str, KeyPath]
    groups: tuple[str, ...]
    forward: tuple[dict[str, str], ...]
    forward_origin: tuple[KeyPath, ...]  # where each forward rule was written


@dataclass(frozen=True)
class Inventory:
    """The validated fleet, hosts in file order."""

    source: TomlSource
    hosts: tuple[Host, ...]
    groups: dict[str, tuple[str, ...]]

    @property
    def file(self) -> str:
        return self.source.file

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def select(self, limit: str | None) -> list[Host]:
        """Hosts matched by ``--limit`` (comma-separated host or group names, or "all")."""
        if not limit:
            return list(self.hosts)
        wanted: set[str] = set()
        for word in (w.strip() for w in limit.split(",")):
            if word == "all" or word == "sixgate":
                wanted.update(h.name for h in self.hosts)
            elif word in self.groups:
                wanted.update(self.groups[word])
            elif any(h.name == word for h in self.hosts):
                wanted.add(word)
            else:
                raise ConfigError("--limit", "", None, f"{word!r} is neither a host nor a group "
                                  f"of {self.file}; hosts: "
                                  f"{', '.join(h.name for h in self.hosts)}; groups: "
                                  f"{', '.join(self.groups) or '(none)'}")
        return [h for h in self.hosts if h.name in wanted]


def _check_vars(source: TomlSource, table: dict[str, Any], path: KeyPath,
                extra: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Checked values of the variables set in ``table`` (keys in ``extra`` are skipped)."""
    reject_unknown(source, table, path, set(VARIABLES) | extra)
    return {key: VARIABLES[key].check(source, (*path, key), value)
            for key, value in table.items() if key not in extra}


def load_inventory(path: str) -> Inventory:
    """Read and validate an inventory file; ConfigError naming file, line and key."""
    source = load_toml(path, "inventory")
    doc = source.doc
    reject_unknown(source, doc, (), {"defaults", "rules", "groups", "hosts"})
    defaults = _check_vars(source, table_at(source, doc, "defaults"), ("defaults",))
    rule_sets = _load_rule_sets(source)
    hosts_table = table_at(source, doc, "hosts")
    if not hosts_table:
        raise source.error(("hosts",), "no hosts; add a [hosts.NAME] table with ssh = "
                           "\"192.0.2.11\" for each host")
    host_vars: dict[str, dict[str, Any]] = {}
    for name, table in hosts_table.items():
        if not HOST_NAME.fullmatch(name):
            raise source.error(("hosts", name), "host names are letters, digits, . _ - "
                               "(starting with a letter or digit)")
        if not isinstance(table, dict):
            raise source.error(("hosts", name), "must be a table of variables")
        host_vars[name] = _check_vars(source, table, ("hosts", name))
    groups, group_vars = _load_groups(source, host_vars)
    hosts = [_effective(source, name, defaults, groups, group_vars, host_vars[name], rule_sets)
             for name in host_vars]
    _check_unique(source, hosts)
    _check_pools(source, hosts)
    return Inventory(source, tuple(hosts), {g: tuple(m) for g, m in groups.items()})


def _load_rule_sets(source: TomlSource) -> dict[str, list[dict[str, str]]]:
    sets = {}
    for name, table in table_at(source, source.doc, "rules").items():
        path: KeyPath = ("rules", name)
        if not isinstance(table, dict):
            raise source.error(path, "must be a table with forward = [...]")
        reject_unknown(source, table, path, {"forward"})
        sets[name] = _forward(source, (*path, "forward"), table.get("forward", []))
    return sets


def _load_groups(source: TomlSource, host_vars: dict[str, dict[str, Any]]) -> tuple[
        dict[str, list[str]], dict[str, dict[str, Any]]]:
    groups: dict[str, list[str]] = {}
    group_vars: dict[str, dict[str, Any]] = {}
    for name, table in table_at(source, source.doc, "groups").items():
        path: KeyPath = ("groups", name)
        if not GROUP_NAME.fullmatch(name) or name in RESERVED_GROUPS:
            raise source.error(path, "group names are letters, digits and _ (not starting "
                               f"with a digit), and not {', '.join(sorted(RESERVED_GROUPS))}")
        if name in host_vars:
            raise source.error(path, f"{name!r} is also a host name; Ansible's --limit could "
                               "not tell them apart")
        if not isinstance(table, dict):
            raise source.error(path, "must be a table with hosts = [...] and variables")
        members = table.get("hosts")
        if not isinstance(members, list) or not members:
            raise source.error((*path, "hosts"), "must list the group's hosts, like "
                               "hosts = [\"edge1\", \"edge2\"]")
        for index, member in enumerate(members):
            if member not in host_vars:
                raise source.error((*path, "hosts", index), f"{member!r} is not a host of this "
                                   "inventory; add [hosts." f"{member}] or fix the name")
        groups[name] = list(dict.fromkeys(members))
        group_vars[name] = _check_vars(source, table, path, frozenset({"hosts"}))
    return groups, group_vars


def _effective(source: TomlSource, name: str, defaults: dict[str, Any],
               groups: dict[str, list[str]], group_vars: dict[str, dict[str, Any]],
               own: dict[str, Any], rule_sets: dict[str, list[dict[str, str]]]) -> Host:
    values = {key: VARIABLES[key].default for key in VARIABLES}
    origin: dict[str, KeyPath] = {}
    values.update(defaults)
    origin.update({key: ("defaults", key) for key in defaults})
    member_of = tuple(group for group, members in groups.items() if name in members)
    from_group: dict[str, str] = {}
    for group in member_of:
        for key, value in group_vars[group].items():
            if key in from_group and key not in own and values[key] != value:
                raise source.error(("groups", group, key), f"host {name!r} gets {key} from "
                                   f"groups {from_group[key]!r} and {group!r} with different "
                                   "values; set it on the host or in one group only")
            values[key] = value
            origin[key] = ("groups", group, key)
            from_group[key] = group
    values.update(own)
    origin.update({key: ("hosts", name, key) for key in own})
    required = REQUIRED if values["mode"] == "nat64" else (*REQUIRED, "local_ipv4")
    for key in required:
        if values[key] is None:
            raise source.error(("hosts", name, key), f"host {name!r} has no {key} "
                               f"({VARIABLES[key].help}); set it on the host, a group or "
                               "[defaults]")
    forward: list[dict[str, str]] = []
    forward_origin: list[KeyPath] = []
    for index, rule_set in enumerate(values["rules"]):
        if rule_set not in rule_sets:
            where = origin.get("rules", ("hosts", name, "rules"))
            raise source.error((*where, index), f"no rule set [rules.{rule_set}] in this file; "
                               f"sets: {', '.join(rule_sets) or '(none)'}")
        forward += rule_sets[rule_set]
        forward_origin += [("rules", rule_set, "forward", i)
                           for i in range(len(rule_sets[rule_set]))]
    forward += values["forward"]
    forward_origin += [(*origin["forward"], i) for i in range(len(values["forward"]))]
    return Host(name, values, origin, member_of, tuple(forward), tuple(forward_origin))


def _anycast(host: Host) -> bool:
    """The host's tunnel address is an anycast one: it announces it as a [cluster] node."""
    local = host.vars["local_ipv4"]
    return local is not None and f"{local}/32" in (host.vars["cluster_announce"] or ())


def _check_pools(source: TomlSource, hosts: list[Host]) -> None:
    """[cluster] nodes that announce their pool (cluster_announce_pool) need pools of their
    own: the services' replies to a pool address route to the node that announces it."""
    owners: list[tuple[ipaddress.IPv4Network, str]] = []
    for host in hosts:
        if not host.vars["cluster_announce_pool"] or host.vars["mode"] == "nat64":
            continue
        try:
            pool = ipaddress.IPv4Network(host.vars["pool"] or DEFAULT_POOL)
        except ValueError:
            continue  # the gateway config check names it
        for other, name in owners:
            if pool.overlaps(other):
                raise source.error(host.origin.get("pool", host.origin["cluster_announce_pool"]),
                                   f"host {host.name!r} announces its pool {pool}, which "
                                   f"overlaps host {name!r}'s {other}: give each node a pool "
                                   "of its own (pool = \"100.64.N.0/24\")")
        owners.append((pool, host.name))


def _check_unique(source: TomlSource, hosts: list[Host]) -> None:
    """Two hosts with one SSH endpoint, one tunnel address or one pool4 address are a
    copy-paste mistake (each NAT64 owns its pool4: replies route to one host); [cluster]
    nodes that announce their tunnel address share it by design (anycast)."""
    seen: dict[tuple[str, Any], str] = {}
    anycast: dict[tuple[str, Any], str] = {}  # the [cluster] nodes' shared tunnel addresses
    for host in hosts:
        for key in ("ssh", "local_ipv4", "nat64_pool4"):
            if key == "ssh":
                marks = [(host.vars[key], host.vars["ssh_port"])]
            elif key == "nat64_pool4":
                marks = [row["address"] for row in host.vars[key] or ()]
            else:
                marks = [host.vars[key]] if host.vars[key] is not None else []
            for value in marks:
                mark = (key, value)
                if key == "local_ipv4" and _anycast(host):
                    anycast.setdefault(mark, host.name)
                    if mark not in seen:
                        continue
                elif mark in anycast:
                    seen[mark] = anycast[mark]
                if mark in seen:
                    shown = value if key == "nat64_pool4" else host.vars[key]
                    raise source.error(host.origin[key], f"host {host.name!r} has the same "
                                       f"{key} {shown!r} as host {seen[mark]!r}")
                seen[mark] = host.name
