"""Forward rules whose target is another IPv4 host: let the replies in, and nothing else.

A translated packet to a target on another host leaves through the worker's TUN device and the
kernel forwards it out (``forwarding`` is set on the TUN device by the worker). The target
routes the pool back to this host, and its reply arrives on the uplink interface addressed to
a pool address: the kernel only forwards it on to the TUN device if forwarding is on for the
interface it arrived on (net.ipv4.conf.<if>.forwarding).

So for each interface a remote target is reached through, sixgate switches forwarding on if it
was off, and then installs its own nftables table whose forward hook drops everything arriving
on that interface except packets to the pool: the host does not become a router for anyone
else. On stop both are undone; a state file in the run directory lets the next start undo what
a crashed run left.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import subprocess
from pathlib import Path

from pyroute2 import IPRoute

from workers.settings import Settings

log = logging.getLogger("sixgate.forwarding")

STATE_FILE = "forwarding.json"
RTN_LOCAL = 2


class ForwardingError(Exception):
    pass


def table_name(settings: Settings) -> str:
    return f"sixgate_{settings.name}"


def _state_path(settings: Settings) -> Path:
    return Path(settings.run_dir) / STATE_FILE


def _sysctl_path(ifname: str) -> Path:
    return Path(f"/proc/sys/net/ipv4/conf/{ifname}/forwarding")


def uplinks_for_remote_targets(settings: Settings) -> dict[str, list[str]]:
    """Interface name -> remote targets reached through it (loopback and local targets need
    no forwarding and are left out)."""
    targets = sorted({r.target_ipv4 for r in settings.forwards
                      if not ipaddress.IPv4Address(r.target_ipv4).is_loopback})
    out: dict[str, list[str]] = {}
    if not targets:
        return out
    with IPRoute() as ipr:
        for target in targets:
            try:
                route = ipr.route("get", dst=target)[0]
            except Exception as exc:  # noqa: BLE001 - pyroute2 raises NetlinkError subclasses
                raise ForwardingError(f"no route to forward target {target}: {exc}; add a "
                                      "route or fix the rule's \"to\"") from None
            if route["type"] == RTN_LOCAL:
                continue
            oif = route.get_attr("RTA_OIF")
            ifname = ipr.get_links(oif)[0].get_attr("IFLA_IFNAME")
            out.setdefault(ifname, []).append(target)
    return out


def _nft(script: str) -> None:
    nft = shutil.which("nft")
    if nft is None:
        raise ForwardingError("the nft command is missing (apt-get install nftables): sixgate "
                              "needs it to limit the forwarding that remote targets require")
    result = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise ForwardingError(f"nft failed: {result.stderr.strip()}")


def enable(settings: Settings) -> None:
    """Open forwarding for the replies of remote targets (see the module docstring)."""
    undo(settings)
    uplinks = uplinks_for_remote_targets(settings)
    changed: list[tuple[str, str]] = []
    for ifname, targets in sorted(uplinks.items()):
        path = _sysctl_path(ifname)
        old = path.read_text().strip()
        if old != "1":
            changed.append((ifname, old))
            log.info("forwarding on %s switched on for replies from %s (restored on stop)",
                     ifname, ", ".join(targets))
    if not changed:
        return
    table = table_name(settings)
    names = ", ".join(f'"{ifname}"' for ifname, _ in changed)
    script = (f"table ip {table} {{\n"
              "  chain forward {\n"
              "    type filter hook forward priority filter; policy accept;\n"
              f"    iifname {{ {names} }} ip daddr != {settings.pool} drop\n"
              "  }\n}\n")
    _nft(script)
    _state_path(settings).write_text(json.dumps({"sysctls": changed, "table": table}))
    for ifname, _old in changed:
        _sysctl_path(ifname).write_text("1")


def undo(settings: Settings) -> None:
    """Restore what ``enable`` (of this run or a crashed earlier one) changed."""
    path = _state_path(settings)
    if not path.exists():
        return
    try:
        state = json.loads(path.read_text())
    except ValueError:
        state = {}
    for ifname, old in state.get("sysctls", []):
        try:
            _sysctl_path(ifname).write_text(old)
        except OSError as exc:
            log.warning("cannot restore forwarding=%s on %s: %s", old, ifname, exc)
    table = state.get("table")
    if table:
        try:
            _nft(f"delete table ip {table}\n")
        except ForwardingError as exc:
            log.warning("cannot delete nftables table %s: %s", table, exc)
    path.unlink(missing_ok=True)
