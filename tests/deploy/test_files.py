"""``sixgate deploy`` files: inventory and rollout validation (every mistake names file, line and
key, before any host is touched), batches identical to Ansible's own, the rendered gateway
config, the generated Ansible directory. No root, no SSH: the real rollouts are in
test_rollout.py (``-m deploy``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from sixgate.coordinator.config import ConfigError, parse_config
from sixgate.deploy.emit import emit
from sixgate.deploy.inventory import load_inventory
from sixgate.deploy.render import check_gateway_config, render_gateway_config, render_template
from sixgate.deploy.rollout import batches, load_rollout
from sixgate.deploy.source import format_path, key_lines

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "deploy"

INVENTORY = """\
[defaults]
mode = "6to4"
relay_ipv4 = "198.51.100.1"
ping_target = "2002:c633:6401::1"
rules = ["web"]

[rules.web]
forward = [
  { proto = "tcp", port = 80, to = "127.0.0.1:8080" },
]

[groups.eu]
hosts = ["edge1", "edge2"]
workers = 1

[hosts.edge1]
ssh = "192.0.2.11"
local_ipv4 = "192.0.2.11"

[hosts.edge2]
ssh = "192.0.2.12"
local_ipv4 = "192.0.2.12"
"""

ROLLOUT = """\
[release]
version = "0.1.0"
wheelhouse = "wheelhouse"

[batches]
serial = [1, "25%", "100%"]
"""


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A directory with a wheelhouse holding a (dummy) sixgate 0.1.0 wheel."""
    (tmp_path / "wheelhouse").mkdir()
    (tmp_path / "wheelhouse" / "sixgate-0.1.0-py3-none-any.whl").write_bytes(b"")
    return tmp_path


def write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(text)
    return str(path)


def inventory_error(directory: Path, text: str) -> ConfigError:
    path = write(directory, "inventory.toml", text)
    with pytest.raises(ConfigError) as caught:
        inventory = load_inventory(path)
        for host in inventory.hosts:
            check_gateway_config(inventory, host)
    return caught.value


def line_of(text: str, fragment: str) -> int:
    """1-based line of the first line containing ``fragment``."""
    return next(n for n, line in enumerate(text.splitlines(), 1) if fragment in line)


# --------------------------------------------------------------------------- the examples


def test_the_shipped_examples_are_valid(tmp_path: Path) -> None:
    """deploy/inventory.toml and deploy/rollout.toml load, and every host's config is valid."""
    (tmp_path / "deploy").mkdir()
    wheelhouse = tmp_path / "dist" / "wheelhouse"
    wheelhouse.mkdir(parents=True)
    (wheelhouse / "sixgate-0.1.0-py3-none-any.whl").write_bytes(b"")
    for name in ("inventory.toml", "rollout.toml"):
        shutil.copy(EXAMPLES / name, tmp_path / "deploy" / name)
    inventory = load_inventory(str(tmp_path / "deploy" / "inventory.toml"))
    rollout = load_rollout(str(tmp_path / "deploy" / "rollout.toml"))
    assert [h.name for h in inventory.hosts] == ["edge1", "edge2", "edge3", "edge4", "nat1"]
    for host in inventory.hosts:
        check_gateway_config(inventory, host)
    assert parse_config(render_gateway_config(inventory.host("nat1"))).mode == "nat64"
    assert rollout.version == "0.1.0"
    assert batches([h.name for h in inventory.hosts], rollout.serial) == [
        ["edge1"], ["edge2"], ["edge3", "edge4", "nat1"]]
    edge4 = inventory.host("edge4")
    assert edge4.vars["workers"] == 1 and edge4.origin["workers"] == ("groups", "resolvers",
                                                                       "workers")
    assert [r["port"] for r in edge4.forward] == ["80", "443", "53", "8000-8099"]


def test_precedence_host_beats_group_beats_defaults(files: Path) -> None:
    text = INVENTORY.replace('local_ipv4 = "192.0.2.12"', 'local_ipv4 = "192.0.2.12"\nworkers = 3')
    inventory = load_inventory(write(files, "inventory.toml", text))
    assert inventory.host("edge1").vars["workers"] == 1
    assert inventory.host("edge2").vars["workers"] == 3
    assert inventory.host("edge2").origin["workers"] == ("hosts", "edge2", "workers")
    assert inventory.host("edge1").vars["mode"] == "6to4"
    assert inventory.select("eu") == list(inventory.hosts)
    assert [h.name for h in inventory.select("edge2")] == ["edge2"]


# --------------------------------------------------------------------------- mistakes

# (what is wrong, text replaced, replacement, key path reported, line fragment, message fragment)
INVENTORY_MISTAKES = [
    ("unknown variable", 'workers = 1', 'wrokers = 1', "groups.eu.wrokers", "wrokers",
     "unknown key"),
    ("bad IPv4", 'local_ipv4 = "192.0.2.11"', 'local_ipv4 = "192.0.2.300"',
     "hosts.edge1.local_ipv4", '"192.0.2.300"', "not an IPv4 address"),
    ("bad mode", 'mode = "6to4"', 'mode = "6rdx"', "defaults.mode", '"6rdx"', "must be one of"),
    ("workers out of range", 'workers = 1', 'workers = 0', "groups.eu.workers", "workers = 0",
     "from 1 to 256"),
    ("group of unknown host", 'hosts = ["edge1", "edge2"]', 'hosts = ["edge1", "edge9"]',
     "groups.eu.hosts[1]", "edge9", "not a host"),
    ("unknown rule set", 'rules = ["web"]', 'rules = ["www"]', "defaults.rules[0]",
     'rules = ["www"]', "no rule set [rules.www]"),
    ("bad forward proto", 'proto = "tcp"', 'proto = "sctp"', "rules.web.forward[0].proto",
     "forward = [", "must be one of"),
    ("missing ssh", 'ssh = "192.0.2.12"\n', '', "hosts.edge2.ssh", "[hosts.edge2]",
     "has no ssh"),
    ("quote in a string", 'relay_ipv4 = "198.51.100.1"', 'pool = "100.64.0.0/16\\" x"',
     "defaults.pool", "pool =", "no spaces or quotes"),
    ("same local_ipv4 twice", 'local_ipv4 = "192.0.2.12"', 'local_ipv4 = "192.0.2.11"',
     "hosts.edge2.local_ipv4", 'local_ipv4 = "192.0.2.11"\n\n[hosts.edge2]', "same local_ipv4"),
    ("relative python", 'mode = "6to4"', 'mode = "6to4"\npython = "python3"',
     "defaults.python", "python =", "absolute path"),
    ("key file missing", 'mode = "6to4"', 'mode = "6to4"\nssh_key = "no-such-key"',
     "defaults.ssh_key", "ssh_key", "does not exist"),
    ("ping target not an address", 'ping_target = "2002:c633:6401::1"',
     'ping_target = "gw.example"', "defaults.ping_target", "ping_target", "not an IP address"),
    ("pool4 address", 'local_ipv4 = "192.0.2.11"',
     'local_ipv4 = "192.0.2.11"\nnat64_clients = ["2001:db8:100::/56"]\n'
     'nat64_pool4 = [{ address = "203.0.113.500" }]', "hosts.edge1.nat64_pool4[0].address",
     "nat64_pool4", "not an IPv4 address"),
    ("pool4 unknown key", 'local_ipv4 = "192.0.2.11"',
     'local_ipv4 = "192.0.2.11"\nnat64_clients = ["2001:db8:100::/56"]\n'
     'nat64_pool4 = [{ address = "203.0.113.5", sctp = "1-2" }]', "hosts.edge1.nat64_pool4[0].sctp",
     "nat64_pool4", "unknown key"),
    ("pool4 range refused by the gateway", 'local_ipv4 = "192.0.2.11"',
     'local_ipv4 = "192.0.2.11"\nnat64_clients = ["2001:db8:100::/56"]\n'
     'nat64_pool4 = [{ address = "203.0.113.5", tcp = "9-2" }]', "hosts.edge1.nat64_pool4[0]",
     "nat64_pool4", "low first"),
    ("same pool4 address on two hosts", 'local_ipv4 = "192.0.2.12"',
     'local_ipv4 = "192.0.2.12"\nnat64_clients = ["2001:db8:100::/56"]\n'
     'nat64_pool4 = [{ address = "203.0.113.5", tcp = "61001-65535" }]\n\n'
     '[groups.nat]\nhosts = ["edge1"]\nnat64_clients = ["2001:db8:100::/56"]\n'
     'nat64_pool4 = [{ address = "203.0.113.5", tcp = "61001-65535" }]',
     "hosts.edge2.nat64_pool4", "nat64_pool4 = [{", "same nat64_pool4 '203.0.113.5'"),
    ("NAT64 filtering", 'workers = 1', 'workers = 1\nnat64_filtering = "full-cone"',
     "groups.eu.nat64_filtering", "nat64_filtering", "must be one of"),
]


@pytest.mark.parametrize(("replace", "by", "key", "line_fragment", "message"),
                         [m[1:] for m in INVENTORY_MISTAKES],
                         ids=[m[0] for m in INVENTORY_MISTAKES])
def test_inventory_mistake_names_file_line_and_key(files: Path, replace: str, by: str,
                                                   key: str, line_fragment: str,
                                                   message: str) -> None:
    assert replace in INVENTORY
    text = INVENTORY.replace(replace, by, 1)
    error = inventory_error(files, text)
    assert error.file.endswith("inventory.toml")
    assert error.key == key
    # The same-address case points at the second host's line, after the first host's.
    fragment = line_fragment.split("\n")[0]
    expected = [n for n, line in enumerate(text.splitlines(), 1) if fragment in line]
    assert error.line in expected, (error, expected)
    assert message in error.message


def test_gateway_config_refusal_points_at_the_inventory_key(files: Path) -> None:
    """6to4 without relay_ipv4 passes the inventory checks but the gateway's own parser refuses
    the rendered config: the error names the key that set the mode."""
    text = INVENTORY.replace('relay_ipv4 = "198.51.100.1"\n', "")
    error = inventory_error(files, text)
    assert (error.key, error.line) == ("defaults.mode", line_of(text, 'mode = "6to4"'))
    assert "relay_ipv4 is missing" in error.message and "edge1" in error.message


def test_gateway_config_refusal_of_a_rule_points_at_the_rule(files: Path) -> None:
    text = INVENTORY.replace('to = "127.0.0.1:8080"', 'to = "127.0.0.1:70000"')
    error = inventory_error(files, text)
    assert error.key == "rules.web.forward[0]"
    assert "port must be 1..65535" in error.message


def test_groups_disagreeing_on_a_variable_is_an_error(files: Path) -> None:
    text = INVENTORY + '\n[groups.big]\nhosts = ["edge1"]\nworkers = 4\n'
    error = inventory_error(files, text)
    assert error.key == "groups.big.workers" and "groups 'eu' and 'big'" in error.message
    assert error.line == line_of(text, "workers = 4")


def test_not_toml_at_all(files: Path) -> None:
    error = inventory_error(files, "[hosts.edge1\n")
    assert error.line == 1 and "not valid TOML" in error.message


ROLLOUT_MISTAKES = [
    ("serial zero", 'serial = [1, "25%", "100%"]', 'serial = [1, 0]', "batches.serial[1]",
     "host count"),
    ("serial percent", 'serial = [1, "25%", "100%"]', 'serial = ["250%"]',
     "batches.serial[0]", "percentage"),
    ("serial fraction", 'serial = [1, "25%", "100%"]', 'serial = [1, "33.3%"]',
     "batches.serial[1]", "whole percentage"),
    ("both wheel and version", 'version = "0.1.0"',
     'version = "0.1.0"\nwheel = "wheelhouse/sixgate-0.1.0-py3-none-any.whl"', "release",
     "exactly one"),
    ("version not in wheelhouse", 'version = "0.1.0"', 'version = "0.2.0"', "release.version",
     "no sixgate-0.2.0-*.whl"),
    ("no wheelhouse", 'wheelhouse = "wheelhouse"', 'wheelhouse = "nowhere"',
     "release.wheelhouse", "not a directory"),
    ("not a sixgate wheel", 'version = "0.1.0"', 'wheel = "wheelhouse/zmq-1-py3-none-any.whl"',
     "release.wheel", "not a sixgate wheel"),
    ("unknown failure policy", '[batches]', '[on_failure]\nrollback = "all"\n\n[batches]',
     "on_failure.rollback", "\"batch\""),
    ("timeout too short", '[batches]', '[health]\ntimeout_s = 1\n\n[batches]',
     "health.timeout_s", "from 5 to 3600"),
    ("unknown table", '[batches]', '[batch]', "batch", "unknown key"),
]


@pytest.mark.parametrize(("replace", "by", "key", "message"), [m[1:] for m in ROLLOUT_MISTAKES],
                         ids=[m[0] for m in ROLLOUT_MISTAKES])
def test_rollout_mistake_names_file_line_and_key(files: Path, replace: str, by: str, key: str,
                                                 message: str) -> None:
    text = ROLLOUT.replace(replace, by, 1)
    with pytest.raises(ConfigError) as caught:
        load_rollout(write(files, "rollout.toml", text))
    error = caught.value
    assert error.file.endswith("rollout.toml") and error.key == key
    assert error.line is not None and error.message and message in error.message


def test_rollback_needs_no_release(files: Path) -> None:
    path = write(files, "rollout.toml", ROLLOUT.replace('version = "0.1.0"', 'version = "9"'))
    rollout = load_rollout(path, need_release=False)
    assert rollout.version == "" and rollout.serial == (1, "25%", "100%")


def test_key_lines_of_dotted_quoted_and_array_tables() -> None:
    text = ('[a]\nx = 1\n[hosts."edge-1"]\nssh = "h"\n[[forward]]\nport = 1\n[[forward]]\n'
            'port = 2\nb.c = 3\n')
    lines = key_lines(text)
    assert lines[("a", "x")] == 2
    assert lines[("hosts", "edge-1", "ssh")] == 4
    assert lines[("forward", "1", "port")] == 8
    assert lines[("forward", "1", "b", "c")] == 9
    assert format_path(("hosts", "edge-1", "forward", 0, "to")) == 'hosts.edge-1.forward[0].to'


# --------------------------------------------------------------------------- batches


class _Inventory:
    def __init__(self, hosts: list[str]) -> None:
        self.hosts = hosts

    def get_hosts(self, _pattern: Any, order: Any = None) -> list[str]:
        return list(self.hosts)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 7, 10, 33])
@pytest.mark.parametrize("serial", [[1, "25%", "100%"], ["100%"], [1], [2, 3], ["10%"],
                                    ["30%", "50%"], [1, "33%"], [5]])
def test_batches_are_ansibles_own(count: int, serial: list[int | str], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Our plan is computed with the same algorithm ansible-playbook runs: compared with
    Ansible's PlaybookExecutor._get_serialized_batches itself."""
    # Importing Ansible makes its local temp directory: not in this machine's ~/.ansible.
    monkeypatch.setenv("ANSIBLE_HOME", str(tmp_path))
    monkeypatch.setenv("ANSIBLE_LOCAL_TEMP", str(tmp_path / "tmp"))
    # ansible-core is a test dependency (the deploy extra): missing, this test fails.
    from ansible.executor import playbook_executor as executor
    hosts = [f"h{i}" for i in range(count)]
    stub = SimpleNamespace(_inventory=_Inventory(hosts))
    play = SimpleNamespace(hosts="sixgate", order="inventory", serial=serial)
    theirs = executor.PlaybookExecutor._get_serialized_batches(stub, play)
    assert batches(hosts, tuple(serial)) == theirs


# --------------------------------------------------------------------------- rendering


def test_rendered_config_is_what_the_gateway_parses(files: Path) -> None:
    inventory = load_inventory(write(files, "inventory.toml", INVENTORY.replace(
        '[hosts.edge1]', '[hosts.edge1]\ninstall_root = "/srv/gw1"\nmtu = 1400\n'
        'addresses = ["2002:c000:20b::1", "2002:c000:20b::2"]\n'
        'forward = [{ proto = "udp", port = "5000-5009", to = "127.0.0.1:6000" }]')))
    text = render_gateway_config(inventory.host("edge1"))
    settings = parse_config(text)
    assert settings.local_ipv4 == "192.0.2.11" and settings.relay_ipv4 == "198.51.100.1"
    assert settings.mtu == 1400 and settings.workers == 1
    assert list(settings.addresses) == ["2002:c000:20b::1", "2002:c000:20b::2"]
    assert str(settings.run_dir) == "/srv/gw1/run/sixgate"
    assert [(f.proto, f.port_lo, f.port_hi, f.target_port) for f in settings.forwards] == [
        ("tcp", 80, 80, 8080), ("udp", 5000, 5009, 6000)]
    assert settings.metrics_listen == "127.0.0.1:9641"


NAT64_HOSTS = """
[hosts.nat1]
ssh = "192.0.2.21"
mode = "nat64"
rules = []
ping_target = "198.51.100.1"
nat64_clients = ["2001:db8:100::/56", "2001:db8:200::/64"]
nat64_allow_non_global = true
nat64_filtering = "address-dependent"
nat64_mtu = 1400
nat64_egress_table = 100
nat64_pool4 = [
  { address = "203.0.113.5", tcp = "61001-65535", udp = "61001-65535", icmp = "0-65535" },
  { address = "203.0.113.6", tcp = "1024-65535" },
]

[hosts.both]
ssh = "192.0.2.22"
local_ipv4 = "192.0.2.22"
nat64_prefix = "2001:db8:64::/96"
nat64_input = "tunnel"
nat64_clients = ["2002:c000:216::/48"]
nat64_pool4 = [{ address = "203.0.113.7", udp = "40000-49999" }]
"""


def test_a_host_behind_a_1to1_nat_renders_both_addresses(files: Path) -> None:
    """Issue 19: ``public_ipv4`` reaches the gateway's [tunnel] (and its 6to4 prefix); a host
    without it renders none (the gateway's default: local_ipv4)."""
    inventory = load_inventory(write(files, "inventory.toml", INVENTORY.replace(
        '[hosts.edge1]\nssh = "192.0.2.11"\nlocal_ipv4 = "192.0.2.11"',
        '[hosts.edge1]\nssh = "192.0.2.11"\nlocal_ipv4 = "10.0.0.11"\n'
        'public_ipv4 = "192.0.2.11"')))
    behind = parse_config(render_gateway_config(inventory.host("edge1")))
    assert (behind.local_ipv4, behind.public_ipv4, behind.prefix) == (
        "10.0.0.11", "192.0.2.11", "2002:c000:20b::/48")
    assert "public_ipv4" not in render_gateway_config(inventory.host("edge2"))


def test_a_6in4_host_renders_what_its_tunnel_follows(files: Path) -> None:
    """Issue 19: ``uplink`` and ``public_ipv4_url`` reach the gateway's [tunnel]; a 6to4 host
    with uplink is refused at the render check, naming the inventory variable."""
    inventory = load_inventory(write(files, "inventory.toml", INVENTORY.replace(
        '[hosts.edge1]\nssh = "192.0.2.11"\nlocal_ipv4 = "192.0.2.11"',
        '[hosts.edge1]\nssh = "192.0.2.11"\nlocal_ipv4 = "10.0.0.11"\nmode = "6in4"\n'
        'public_ipv4 = "192.0.2.11"\nremote_ipv4 = "198.51.100.1"\n'
        'prefix = "2001:db8:1::/64"\nuplink = "eth0"\n'
        'public_ipv4_url = "https://ipv4.icanhazip.com/"\npublic_ipv4_check_s = 600')))
    settings = parse_config(render_gateway_config(inventory.host("edge1")))
    assert (settings.uplink, settings.public_ipv4_url, settings.public_ipv4_check_s) == (
        "eth0", "https://ipv4.icanhazip.com/", 600)
    assert "uplink" not in render_gateway_config(inventory.host("edge2"))
    sixto4 = load_inventory(write(files, "bad.toml", INVENTORY.replace(
        '[hosts.edge1]\nssh = "192.0.2.11"\nlocal_ipv4 = "192.0.2.11"',
        '[hosts.edge1]\nssh = "192.0.2.11"\nlocal_ipv4 = "192.0.2.11"\nuplink = "eth0"')))
    with pytest.raises(ConfigError, match="uplink"):
        check_gateway_config(sixto4, sixto4.host("edge1"))


def test_a_6rd_host_renders_its_domain(files: Path) -> None:
    """Issue 19: a 6rd host's 6rd prefix, IPv4MaskLen and border relay reach its [tunnel];
    the gateway derives the delegated prefix from them."""
    inventory = load_inventory(write(files, "inventory.toml", INVENTORY.replace(
        '[hosts.edge1]\nssh = "192.0.2.11"\nlocal_ipv4 = "192.0.2.11"',
        '[hosts.edge1]\nssh = "192.0.2.11"\nlocal_ipv4 = "192.0.2.11"\nmode = "6rd"\n'
        'prefix = "2001:db8:8000::/33"\nipv4_mask_len = 5\n'
        'border_relay_ipv4 = "198.51.100.1"')))
    sixrd = parse_config(render_gateway_config(inventory.host("edge1")))
    assert (sixrd.mode, sixrd.sixrd_prefix, sixrd.ipv4_mask_len, sixrd.relay_ipv4,
            sixrd.prefix) == ("6rd", "2001:db8:8000::/33", 5, "198.51.100.1",
                              "2001:db8:8000:20b0::/60")


def test_nat64_hosts_render_the_nat64_table(files: Path) -> None:
    """A NAT64-only host (mode "nat64": no [tunnel], no local_ipv4 needed) and a 6to4 host with
    a NAT64 beside its tunnel: the gateway's parser reads back what the inventory said."""
    inventory = load_inventory(write(files, "inventory.toml", INVENTORY + NAT64_HOSTS))
    nat = inventory.host("nat1")
    text = check_gateway_config(inventory, nat)
    assert "[tunnel]" not in text and "local_ipv4" not in text
    settings = parse_config(text)
    assert settings.mode == "nat64" and settings.nat64_prefix == "64:ff9b::/96"
    assert settings.nat64_clients == ("2001:db8:100::/56", "2001:db8:200::/64")
    assert settings.nat64_allow_non_global and settings.nat64_filtering == "address-dependent"
    assert settings.mtu == 1400 and settings.forwards == () and settings.nat64_egress_table == 100
    assert sorted(settings.nat64_pool4) == [
        ("203.0.113.5", "icmp", 0, 65535), ("203.0.113.5", "tcp", 61001, 65535),
        ("203.0.113.5", "udp", 61001, 65535), ("203.0.113.6", "tcp", 1024, 65535)]
    both = parse_config(check_gateway_config(inventory, inventory.host("both")))
    assert both.mode == "6to4" and both.local_ipv4 == "192.0.2.22"
    assert both.nat64_prefix == "2001:db8:64::/96" and both.nat64_input == "tunnel"
    assert both.nat64_pool4 == (("203.0.113.7", "udp", 40000, 49999),)
    assert [f.port_lo for f in both.forwards] == [80]
    # A 6to4 host without nat64_* variables gets no [nat64] table.
    assert "[nat64]" not in render_gateway_config(inventory.host("edge1"))


def test_nat64_without_clients_is_refused_at_the_host(files: Path) -> None:
    text = INVENTORY + NAT64_HOSTS.replace(
        'nat64_clients = ["2001:db8:100::/56", "2001:db8:200::/64"]\n', "")
    error = inventory_error(files, text)
    assert error.key == "hosts.nat1" and "clients" in error.message, error


def test_systemd_unit_runs_the_current_release(files: Path) -> None:
    inventory = load_inventory(write(files, "inventory.toml", INVENTORY))
    unit = render_template("sixgate.service.j2", inventory.host("edge1"))
    assert "ExecStart=/opt/sixgate/current/bin/sixgate run --config " \
           "/etc/sixgate/gateway.toml" in unit
    assert "RestartPreventExitStatus=2" in unit and "WantedBy=multi-user.target" in unit


def test_systemd_unit_is_hardened_and_valid(files: Path, tmp_path: Path) -> None:
    """Least privilege in the unit (hostile-input issue, finding 10), and systemd itself
    accepts every line of it (systemd-analyze verify, with the paths made to exist)."""
    inventory = load_inventory(write(files, "inventory.toml", INVENTORY))
    unit = render_template("sixgate.service.j2", inventory.host("edge1"))
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "MemoryMax=", "TasksMax=",
                 "SystemCallFilter=@system-service", "CapabilityBoundingSet=CAP_NET_ADMIN",
                 "ReadWritePaths=", "LimitNOFILE=", "User=sixgate\n",
                 "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE\n"):
        assert line in unit, line
    # Never root: no capability to change user or to signal others' processes is granted.
    for capability in ("CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_SYS_ADMIN"):
        assert capability not in unit, capability
    assert 'user = "sixgate"' in render_template("gateway.toml.j2", inventory.host("edge1"))
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("SIXGATE_LAB_REQUIRED") == "1":
            pytest.fail("systemd-analyze is missing (apt-get install systemd)")
        pytest.skip("SKIPPED LOUDLY: systemd-analyze is missing; the unit was not verified")
    exe = tmp_path / "sixgate"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    path = tmp_path / "sixgate.service"
    path.write_text(re.sub(r"/opt/sixgate/current/bin/sixgate", str(exe), unit))
    done = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                          check=False, timeout=60)
    problems = [line for line in done.stderr.splitlines()
                if "sixgate.service" in line and "Unknown" in line or "Invalid" in line
                or "Failed to parse" in line]
    assert not problems, done.stderr


# --------------------------------------------------------------------------- emit and CLI


def test_emitted_directory_is_an_ansible_project(files: Path, tmp_path: Path) -> None:
    inventory = load_inventory(write(files, "inventory.toml", INVENTORY))
    rollout = load_rollout(write(files, "rollout.toml", ROLLOUT))
    out = tmp_path / "out"
    emit(out, inventory, rollout)
    stage, site = yaml.safe_load((out / "site.yml").read_text())
    # The release goes on every host at once first (no serial), then the batches switch.
    assert "serial" not in stage and stage["max_fail_percentage"] == 0
    assert stage["tasks"][0]["ansible.builtin.include_role"]["tasks_from"] == "stage.yml"
    assert site["serial"] == [1, "25%", "100%"] and site["max_fail_percentage"] == 0
    assert site["roles"] == ["sixgate"] and site["vars"]["sixgate_version"] == "0.1.0"
    hosts = yaml.safe_load((out / "inventory.yml").read_text())["all"]["children"]
    assert hosts["sixgate"]["hosts"]["edge2"]["ansible_host"] == "192.0.2.12"
    assert hosts["sixgate"]["hosts"]["edge2"]["sixgate_forward"] == [
        {"proto": "tcp", "port": "80", "to": "127.0.0.1:8080"}]
    assert set(hosts["eu"]["hosts"]) == {"edge1", "edge2"}
    for name in ("tasks/main.yml", "tasks/stage.yml", "tasks/rollback.yml", "handlers/main.yml",
                 "templates/gateway.toml.j2", "files/sixgate_host.py"):
        assert (out / "roles" / "sixgate" / name).is_file(), name
    with tarfile.open(out / "bundle.tar") as archive:
        names = archive.getnames()
        helper = archive.getmember("bin/sixgate-host")
    marker = f".bundle-{site['vars']['sixgate_bundle_id']}"
    assert sorted(names) == [marker, "bin/sixgate-host",
                             "wheelhouse/sixgate-0.1.0-py3-none-any.whl"]
    assert helper.mode == 0o755


def sixgate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "sixgate"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "sixgate.coordinator.cli"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, check=False,
                          timeout=120, cwd=cwd)


def test_plan_shows_batches_and_ansible_accepts_the_playbook(files: Path) -> None:
    write(files, "inventory.toml", INVENTORY)
    write(files, "rollout.toml", ROLLOUT)
    done = sixgate("deploy", "plan", "-i", "inventory.toml", "-r", "rollout.toml", cwd=files)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "batch 1: edge1\n  batch 2: edge2\n" in done.stdout
    if "not checked" not in done.stdout:
        assert "ansible-playbook --syntax-check: OK" in done.stdout


def test_bad_inventory_exits_2_before_touching_any_host(files: Path) -> None:
    write(files, "inventory.toml", INVENTORY.replace('"192.0.2.12"\nlocal', '"192.0.2.12"\nlokal'))
    write(files, "rollout.toml", ROLLOUT)
    for command in ("plan", "apply", "rollback"):
        done = sixgate("deploy", command, "-i", "inventory.toml", "-r", "rollout.toml",
                       cwd=files)
        assert done.returncode == 2, done.stdout + done.stderr
        line = line_of(INVENTORY, 'ssh = "192.0.2.12"') + 1
        assert f"inventory.toml:{line}: hosts.edge2.lokal_ipv4: unknown key" in done.stderr
        assert "batch" not in done.stdout


def test_limit_naming_nothing_known_exits_2(files: Path) -> None:
    write(files, "inventory.toml", INVENTORY)
    write(files, "rollout.toml", ROLLOUT)
    done = sixgate("deploy", "plan", "-i", "inventory.toml", "-r", "rollout.toml", "--limit",
                   "edge7", cwd=files)
    assert done.returncode == 2 and "'edge7' is neither a host nor a group" in done.stderr


def test_the_wheel_installs_one_import_name(tmp_path: Path) -> None:
    """Issue 14: installed, everything is under ``sixgate`` (no generic top-level ``workers``,
    ``coordinator`` or ``deploy`` in site-packages); the Ansible files ride along."""
    import zipfile

    from sixgate.deploy.build import build

    wheel = build(tmp_path / "wheels", with_dependencies=False)
    names = zipfile.ZipFile(wheel).namelist()
    # sixgate-<version>-<tags>.whl: platform tags since the compiled fast path (like pyzmq's
    # wheel beside it in the wheelhouse, built for the controller's Python and platform).
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert {name.split("/")[0] for name in names} == {"sixgate", dist_info}, names
    assert any(name.startswith("sixgate/workers/engine/_fastpath") and name.endswith(".so")
               for name in names), names
    assert "sixgate/workers/engine/datapath.py" in names
    assert "sixgate/deploy/ansible/roles/sixgate/templates/sixgate.service.j2" in names
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "sixgate = sixgate.coordinator.cli:main" in entry_points


def test_a_cluster_node_renders_its_announcements(files: Path) -> None:
    """Issue 20: the cluster_* variables reach the gateway's [cluster] (a host without them
    has none); a bad one is refused at the render check, naming the inventory variable."""
    node = ('[hosts.edge1]\nssh = "192.0.2.11"\nlocal_ipv4 = "192.0.2.11"\n'
            'cluster_announce = ["192.0.2.11/32"]\ncluster_local_as = 65001\n'
            'cluster_peer_as = 65000\ncluster_neighbors = ["198.51.100.1"]\n'
            'cluster_router_id = "198.51.100.2"\ncluster_hold_time_s = 9')
    inventory = load_inventory(write(files, "inventory.toml", INVENTORY.replace(
        '[hosts.edge1]\nssh = "192.0.2.11"\nlocal_ipv4 = "192.0.2.11"', node)))
    settings = parse_config(render_gateway_config(inventory.host("edge1")))
    assert (settings.cluster_announce, settings.cluster_local_as, settings.cluster_peer_as,
            settings.cluster_neighbors, settings.cluster_router_id,
            settings.cluster_hold_time_s) == (("192.0.2.11/32",), 65001, 65000,
                                               ("198.51.100.1",), "198.51.100.2", 9)
    assert "[cluster]" not in render_gateway_config(inventory.host("edge2"))
    bad = load_inventory(write(files, "bad.toml", INVENTORY.replace(
        '[hosts.edge1]\nssh = "192.0.2.11"\nlocal_ipv4 = "192.0.2.11"',
        node.replace('["192.0.2.11/32"]', '["192.0.2.11/24"]'))))
    with pytest.raises(ConfigError, match="cluster_announce"):
        check_gateway_config(bad, bad.host("edge1"))


def test_a_host_with_several_tunnels_renders_each(files: Path) -> None:
    """Issue 19: ``tunnel_name`` and ``extra_tunnels`` render [[tunnel]] tables on the host's
    local_ipv4 (a host without them keeps its single [tunnel]); a mistake in an extra tunnel
    is refused at the render check, naming its entry of extra_tunnels."""
    node = ('[hosts.edge1]\nssh = "192.0.2.11"\nlocal_ipv4 = "192.0.2.11"\nmode = "6in4"\n'
            'tunnel_name = "he"\nremote_ipv4 = "198.51.100.1"\nprefix = "2001:db8:1::/64"\n'
            'extra_tunnels = [{ name = "backup", mode = "6in4", remote_ipv4 = "198.51.100.3", '
            'prefix = "2001:db8:2::/64" }, { mode = "6to4", relay_ipv4 = "192.88.99.1" }]')
    inventory = load_inventory(write(files, "inventory.toml", INVENTORY.replace(
        '[hosts.edge1]\nssh = "192.0.2.11"\nlocal_ipv4 = "192.0.2.11"', node)))
    text = check_gateway_config(inventory, inventory.host("edge1"))
    settings = parse_config(text)
    assert settings.tunnel_name == "he" and settings.remote_ipv4 == "198.51.100.1"
    assert [(t.name, t.mode, t.remote_ipv4, t.prefix) for t in settings.tunnels] == [
        ("backup", "6in4", "198.51.100.3", "2001:db8:2::/64"),
        ("6to4", "6to4", None, "2002:c000:20b::/48")]
    assert "[[tunnel]]" not in render_gateway_config(inventory.host("edge2"))
    bad = load_inventory(write(files, "bad.toml", INVENTORY.replace(
        '[hosts.edge1]\nssh = "192.0.2.11"\nlocal_ipv4 = "192.0.2.11"',
        node.replace('"198.51.100.3"', '"198.51.100.1"'))))
    with pytest.raises(ConfigError, match="extra_tunnels") as info:
        check_gateway_config(bad, bad.host("edge1"))
    assert "one tunnel per broker" in str(info.value), str(info.value)


def test_cluster_nodes_share_the_anycast_address_they_announce(files: Path) -> None:
    """Issue 20: [cluster] nodes announcing their tunnel address share it (anycast): both
    load; a host that does not announce it is still refused as a copy-paste mistake."""
    anycast = ('local_ipv4 = "192.0.2.10"\ncluster_announce = ["192.0.2.10/32"]\n'
               'cluster_local_as = 65001\ncluster_peer_as = 65000\n'
               'cluster_neighbors = ["198.51.100.1"]\n')
    text = (INVENTORY.replace('local_ipv4 = "192.0.2.11"',
                              anycast + 'cluster_router_id = "198.51.100.2"')
            .replace('local_ipv4 = "192.0.2.12"', anycast + 'cluster_router_id = "198.51.100.6"'))
    inventory = load_inventory(write(files, "inventory.toml", text))
    assert [parse_config(render_gateway_config(host)).local_ipv4
            for host in inventory.hosts] == ["192.0.2.10", "192.0.2.10"]
    plain = text + '\n[hosts.edge3]\nssh = "192.0.2.13"\nlocal_ipv4 = "192.0.2.10"\n'
    error = inventory_error(files, plain)
    assert error.key == "hosts.edge3.local_ipv4" and "same local_ipv4" in error.message, error
    first = INVENTORY.replace('local_ipv4 = "192.0.2.11"', 'local_ipv4 = "192.0.2.10"')
    error = inventory_error(files, first.replace('local_ipv4 = "192.0.2.12"',
                                                 anycast + 'cluster_router_id = "198.51.100.6"'))
    assert error.key == "hosts.edge2.local_ipv4" and "same local_ipv4" in error.message, error


def test_nodes_announcing_their_pool_need_pools_of_their_own(files: Path) -> None:
    """cluster_announce_pool: the services' replies to a pool address go to the node that
    announces it, so two such nodes with overlapping pools (both the default, here) are
    refused before any host is touched; pools of their own render and load."""
    anycast = ('local_ipv4 = "192.0.2.10"\ncluster_announce = ["192.0.2.10/32"]\n'
               'cluster_announce_pool = true\ncluster_local_as = 65001\n'
               'cluster_peer_as = 65000\ncluster_neighbors = ["198.51.100.1"]\n')
    text = (INVENTORY.replace('local_ipv4 = "192.0.2.11"',
                              anycast + 'cluster_router_id = "198.51.100.2"')
            .replace('local_ipv4 = "192.0.2.12"', anycast + 'cluster_router_id = "198.51.100.6"'))
    error = inventory_error(files, text)
    assert error.key == "hosts.edge2.cluster_announce_pool", error
    assert "overlaps host 'edge1'" in error.message and "pool of its own" in error.message
    own = (text.replace('cluster_router_id = "198.51.100.2"',
                        'cluster_router_id = "198.51.100.2"\npool = "100.64.1.0/24"')
           .replace('cluster_router_id = "198.51.100.6"',
                    'cluster_router_id = "198.51.100.6"\npool = "100.64.2.0/24"'))
    inventory = load_inventory(write(files, "inventory.toml", own))
    assert [parse_config(render_gateway_config(host)).cluster_announce
            for host in inventory.hosts] == [("192.0.2.10/32", "100.64.1.0/24"),
                                             ("192.0.2.10/32", "100.64.2.0/24")]
