"""A host's Ansible variables, and the gateway config they render to, validated on the controller.

The gateway config is rendered from the role's own template (``roles/sixgate/templates/
gateway.toml.j2``) with Jinja2 configured as Ansible's ``template`` module configures it
(``trim_blocks``), then parsed by the gateway's own ``parse_config``. So the text validated here
before any host is touched is the text Ansible writes on the host, where ``sixgate check`` of
the new release validates it once more before the switch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jinja2

from sixgate.coordinator.config import ConfigError, parse_config
from sixgate.deploy.inventory import (
    CLUSTER_VARIABLES,
    NAT64_VARIABLES,
    Host,
    Inventory,
    has_nat64,
)
from sixgate.deploy.source import KeyPath

ANSIBLE_DIR = Path(__file__).resolve().parent / "ansible"
ROLE_DIR = ANSIBLE_DIR / "roles" / "sixgate"
GATEWAY_TEMPLATE = "gateway.toml.j2"
UNIT_TEMPLATE = "sixgate.service.j2"

# Gateway config keys (as ConfigError names them) -> the inventory variable that sets them.
CONFIG_KEY_TO_VARIABLE = {
    "tunnel.mode": "mode", "tunnel.local_ipv4": "local_ipv4", "tunnel.relay_ipv4": "relay_ipv4",
    "tunnel.public_ipv4": "public_ipv4",
    "tunnel.uplink": "uplink", "tunnel.public_ipv4_url": "public_ipv4_url",
    "tunnel.public_ipv4_check_s": "public_ipv4_check_s",
    "tunnel.remote_ipv4": "remote_ipv4", "tunnel.prefix": "prefix",
    "tunnel.ipv4_mask_len": "ipv4_mask_len", "tunnel.border_relay_ipv4": "border_relay_ipv4",
    "tunnel.addresses": "addresses", "tunnel.mtu": "mtu", "tunnel": "mode",
    "tunnel.name": "tunnel_name",
    "gateway.workers": "workers", "gateway.pool": "pool", "gateway.name": "gateway_name",
    "gateway.backend": "backend", "gateway.log_level": "log_level",
    "gateway.run_dir": "install_root", "metrics.listen": "metrics_listen",
    "gateway.user": "user", "nat64": "nat64_clients", "nat64.pool4": "nat64_pool4",
    **{f"nat64.{key.removeprefix('nat64_')}": key for key in NAT64_VARIABLES},
    "cluster": "cluster_announce",
    **{f"cluster.{key.removeprefix('cluster_')}": key for key in CLUSTER_VARIABLES},
}


def host_paths(install_root: str) -> dict[str, str]:
    """Where sixgate lives under ``install_root`` (the role's defaults/main.yml says the same)."""
    root = "" if install_root == "/" else install_root.rstrip("/")
    return {
        "sixgate_root": root,
        "sixgate_home": f"{root}/opt/sixgate",
        "sixgate_etc": f"{root}/etc/sixgate",
        "sixgate_run_dir": f"{root}/run/sixgate",
        "sixgate_log_dir": f"{root}/var/log/sixgate",
        "sixgate_pidfile": f"{root}/run/sixgate-supervisor.pid",
    }


def ansible_host_vars(host: Host) -> dict[str, Any]:
    """Everything Ansible needs about ``host``: connection variables and ``sixgate_*``."""
    v = host.vars
    hostvars: dict[str, Any] = {
        "ansible_host": v["ssh"],
        "ansible_port": v["ssh_port"],
        "ansible_user": v["ssh_user"],
        "ansible_python_interpreter": v["python"],
    }
    if v["ssh_user"] != "root":
        hostvars["ansible_become"] = True
    if v["ssh_key"]:
        hostvars["ansible_ssh_private_key_file"] = v["ssh_key"]
    if v["known_hosts"]:
        hostvars["ansible_ssh_common_args"] = (f"-o UserKnownHostsFile={v['known_hosts']} "
                                               "-o StrictHostKeyChecking=yes")
    paths = host_paths(v["install_root"])
    hostvars["ansible_remote_tmp"] = f"{paths['sixgate_root']}/var/lib/sixgate/ansible-tmp"
    hostvars.update(paths)
    hostvars.update({
        "sixgate_service": v["service"],
        "sixgate_user": v["user"],
        "sixgate_python": v["python"],
        "sixgate_mode": v["mode"],
        "sixgate_local_ipv4": v["local_ipv4"],
        "sixgate_relay_ipv4": v["relay_ipv4"],
        "sixgate_public_ipv4": v["public_ipv4"],
        "sixgate_uplink": v["uplink"],
        "sixgate_public_ipv4_url": v["public_ipv4_url"],
        "sixgate_public_ipv4_check_s": v["public_ipv4_check_s"],
        "sixgate_remote_ipv4": v["remote_ipv4"],
        "sixgate_prefix": v["prefix"],
        "sixgate_ipv4_mask_len": v["ipv4_mask_len"],
        "sixgate_border_relay_ipv4": v["border_relay_ipv4"],
        "sixgate_addresses": v["addresses"],
        "sixgate_mtu": v["mtu"],
        "sixgate_workers": v["workers"],
        "sixgate_pool": v["pool"],
        "sixgate_gateway_name": v["gateway_name"],
        "sixgate_backend": v["backend"],
        "sixgate_log_level": v["log_level"],
        "sixgate_metrics_listen": v["metrics_listen"],
        "sixgate_forward": [dict(rule) for rule in host.forward],
        "sixgate_ping_target": v["ping_target"],
        # The [nat64] table: its keys as the gateway names them, only those set.
        "sixgate_nat64": ({key.removeprefix("nat64_"): v[key] for key in NAT64_VARIABLES
                           if v[key] is not None and key != "nat64_pool4"}
                          if has_nat64(v) else None),
        "sixgate_nat64_pool4": v["nat64_pool4"] or [],
        "sixgate_bird_socket": v["bird_socket"],
        "sixgate_tunnel_name": v["tunnel_name"],
        "sixgate_extra_tunnels": v["extra_tunnels"] or [],
        # The [cluster] table, when the host announces anything: the keys set.
        "sixgate_cluster": ({key.removeprefix("cluster_"): v[key] for key in CLUSTER_VARIABLES
                             if v[key] is not None} if v["cluster_announce"] else None),
    })
    return hostvars


def template_environment() -> jinja2.Environment:
    """Jinja2 set up like Ansible's ``template`` module (trim_blocks on, undefined is an error)."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(ROLE_DIR / "templates"),
                              trim_blocks=True, keep_trailing_newline=True,
                              undefined=jinja2.StrictUndefined, autoescape=False)


def render_template(name: str, host: Host) -> str:
    """The role's template ``name`` rendered with ``host``'s variables."""
    variables = {"inventory_hostname": host.name, **ansible_host_vars(host)}
    return template_environment().get_template(name).render(variables)


def render_gateway_config(host: Host) -> str:
    """The gateway TOML Ansible will write on ``host``."""
    return render_template(GATEWAY_TEMPLATE, host)


def check_gateway_config(inventory: Inventory, host: Host) -> str:
    """Render and validate ``host``'s gateway config; ConfigError pointing at the inventory key
    that set the offending value."""
    text = render_gateway_config(host)
    try:
        parse_config(text, f"<gateway config of {host.name}>")
    except ConfigError as exc:
        where = _inventory_key(host, exc.key)
        raise inventory.source.error(where, f"host {host.name!r}: its gateway config would be "
                                     f"refused at {exc.key or 'the top'}: {exc.message}") \
            from None
    return text


def _inventory_key(host: Host, config_key: str) -> KeyPath:
    """The inventory key path that produced gateway config key ``config_key``."""
    pool4 = re.fullmatch(r"nat64\.pool4(?:\[(\d+)\])?(?:\..*)?", config_key)
    if pool4 and "nat64_pool4" in host.origin:
        return (*host.origin["nat64_pool4"], *((int(pool4.group(1)),) if pool4.group(1) else ()))
    extra = re.fullmatch(r"tunnel\[(\d+)\](?:\.(.*))?", config_key)
    if extra and "extra_tunnels" in host.origin and int(extra.group(1)) > 0:
        return (*host.origin["extra_tunnels"], int(extra.group(1)) - 1)
    if extra:  # the first of several: its flat variables
        config_key = f"tunnel.{extra.group(2)}" if extra.group(2) else "tunnel"
    match = re.fullmatch(r"forward(?:\[(\d+)\])?(?:\..*)?", config_key)
    if match:
        index = int(match.group(1) or 0)
        if index < len(host.forward_origin):
            return host.forward_origin[index]
    variable = CONFIG_KEY_TO_VARIABLE.get(config_key)
    if variable and variable in host.origin:
        return host.origin[variable]
    return ("hosts", host.name)
