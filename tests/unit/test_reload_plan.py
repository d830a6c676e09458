"""coordinator/reload.py: what a reload may change while sixgate runs."""

from __future__ import annotations

import dataclasses

from sixgate.coordinator.config import parse_config
from sixgate.coordinator.reload import as_running, changed, restart_needed

BASE = """\
[tunnel]
mode = "6to4"
local_ipv4 = "192.0.2.10"
relay_ipv4 = "198.51.100.1"
[gateway]
workers = 2
[[forward]]
proto = "tcp"
port = 80
to = "127.0.0.1:8080"
"""


def running() -> object:
    settings = parse_config(BASE)
    return dataclasses.replace(settings, backend="userspace")


def test_rules_limits_and_log_level_change_live() -> None:
    old = running()
    new = as_running(old, parse_config(BASE.replace("port = 80", "port = 81").replace(
        "workers = 2", 'workers = 2\nmax_flows = 1000\nlog_level = "debug"')))
    assert restart_needed(old, new) == []
    assert changed(old, new) == ["forwards", "log_level", "max_flows"]
    # The fan-out seed drawn at the start and the backend auto chose stay.
    assert (new.hash_seed, new.backend) == (old.hash_seed, "userspace")


def test_the_tunnel_the_pool_and_the_worker_count_need_a_restart() -> None:
    old = running()
    new = as_running(old, parse_config(BASE.replace("192.0.2.10", "192.0.2.11").replace(
        "workers = 2", 'workers = 3\npool = "100.65.0.0/16"')))
    assert restart_needed(old, new) == ["local_ipv4", "prefix", "addresses", "workers", "pool",
                                        "public_ipv4"]


NAT64 = """\
[nat64]
prefix = "64:ff9b::/96"
clients = ["2001:db8:100::/56"]
[[nat64.pool4]]
address = "203.0.113.5"
tcp = "61001-65535"
udp = "61001-65535"
icmp = "0-65535"
"""


def test_the_nat64_policy_changes_live_its_prefix_and_pool4_need_a_restart() -> None:
    old = as_running(running(), parse_config(BASE + NAT64))
    policy = as_running(old, parse_config(BASE + NAT64.replace(
        '/56"]', '/56", "2001:db8:200::/48"]\nfiltering = "address-dependent"\n'
        'ports_per_client = 100\nclient_prefix = 128\nport_hold_s = 30\n'
        'log_bindings = false\nallow_non_global = true')))
    assert restart_needed(old, policy) == []
    assert changed(old, policy) == [
        "nat64_allow_non_global", "nat64_client_prefix", "nat64_clients", "nat64_filtering",
        "nat64_log_bindings", "nat64_port_hold_s", "nat64_ports_per_client"]
    shape = as_running(old, parse_config(BASE + NAT64.replace("64:ff9b::/96", "2001:db8:64::/96")
                                         .replace("203.0.113.5", "203.0.113.6")))
    assert restart_needed(old, shape) == ["nat64_prefix", "nat64_pool4"]


CLAT = """\
[clat]
plat_prefix = "auto"
[gateway]
log_level = "info"
"""


def test_a_clat_with_auto_keeps_what_the_start_found() -> None:
    """A CLAT's "auto" address and PLAT prefix were found at the start: reloading the same
    file changes nothing; a log level changes live; a named prefix needs a restart."""
    running = dataclasses.replace(parse_config(CLAT), backend="userspace",
                                  clat_ipv6_address="2001:db8:100::c1a7",
                                  clat_plat_prefix="64:ff9b::/96", prefix="64:ff9b::/96")
    same = as_running(running, parse_config(CLAT))
    assert restart_needed(running, same) == [] and changed(running, same) == []
    louder = as_running(running, parse_config(CLAT.replace('"info"', '"debug"')))
    assert restart_needed(running, louder) == [] and changed(running, louder) == ["log_level"]
    named = as_running(running, parse_config(CLAT.replace('"auto"', '"2001:db8:64::/96"')))
    assert restart_needed(running, named) == ["prefix", "clat_plat_prefix"]
