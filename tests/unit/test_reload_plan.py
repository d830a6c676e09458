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
    assert restart_needed(old, new) == ["local_ipv4", "prefix", "addresses", "workers", "pool"]
