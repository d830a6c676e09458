"""Kernel backend: a real sit tunnel configured over netlink (pyroute2), where the kernel has it.

The kernel then does decapsulation, the RFC 3964 §5.2 spoofing checks (sit's
``packet_is_spoofed``), the RFC 4213 §3.6 peer check, ICMPv6 and IPv6 itself; the workers only
relay the forwarded ports to the IPv4 services (``workers/relay.py``).

What is created, per RFC:
- the sit link ``<name>sit``: 6to4 has no fixed remote and local = local_ipv4 (RFC 3056 §3);
  6in4 has remote = remote_ipv4 (RFC 4213 §3); MTU from the config (RFC 4213 §3.2.1),
  TTL 64 (RFC 4213 §3.3 lets the admin set it);
- the gateway's addresses on it (/128);
- routes: 6to4: 2002::/16 on the link (sit takes the IPv4 destination from the 6to4 address,
  RFC 3056 §5.3) and the default route via the relay in its ``::V4ADDR`` form; 6in4: the
  default route over the link.

Teardown deletes the link, which takes its addresses and routes along. A state file in the
run directory names what a run created, so the next start removes a crashed run's link.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from workers.settings import Settings

log = logging.getLogger("sixgate.kernel")

STATE_FILE = "kernel-backend.json"


class KernelBackendError(Exception):
    pass


def sit_name(settings: Settings) -> str:
    return f"{settings.name}sit"


def _state_path(settings: Settings) -> Path:
    return Path(settings.run_dir) / STATE_FILE


def remove_leftovers(settings: Settings) -> None:
    """Delete the sit link a crashed earlier run created (named in its state file)."""
    path = _state_path(settings)
    names = {sit_name(settings)}
    if path.exists():
        try:
            names.update(json.loads(path.read_text()).get("links", []))
        except ValueError:
            pass
    with IPRoute() as ipr:
        for name in sorted(names):
            index = ipr.link_lookup(ifname=name)
            if index:
                log.info("removing sit link %s left by an earlier run", name)
                ipr.link("del", index=index[0])
    path.unlink(missing_ok=True)


def setup(settings: Settings) -> str:
    """Create and configure the sit tunnel; returns the link name."""
    name = sit_name(settings)
    remove_leftovers(settings)
    link: dict[str, object] = {"ifname": name, "kind": "sit", "sit_local": settings.local_ipv4,
                               "sit_ttl": 64}
    if settings.mode == "6in4":
        link["sit_remote"] = settings.remote_ipv4
    with IPRoute() as ipr:
        try:
            ipr.link("add", **link)
        except NetlinkError as exc:
            if exc.code in (errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL):
                raise KernelBackendError(
                    "the kernel has no sit driver (CONFIG_IPV6_SIT); use backend = "
                    "\"userspace\" or \"auto\"") from None
            raise KernelBackendError(f"cannot create sit link {name}: "
                                     f"{exc.args[-1] if exc.args else exc}") from None
        _state_path(settings).write_text(json.dumps({"links": [name]}))
        index = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=index, mtu=settings.mtu, state="up")
        for address in settings.addresses:
            # IFA_F_NODAD: the tunnel has no neighbours to detect; bind at once.
            ipr.addr("add", index=index, address=address, prefixlen=128, family=10,
                     flags=0x02)
        if settings.mode == "6to4":
            ipr.route("add", dst="2002::", dst_len=16, oif=index, family=10)
            relay = ipaddress.IPv6Address("::" + str(settings.relay_ipv4))
            ipr.route("add", dst="::", dst_len=0, gateway=str(relay), oif=index, family=10)
        else:
            ipr.route("add", dst="::", dst_len=0, oif=index, family=10)
    log.info("kernel backend: sit link %s up (%s, local %s%s, mtu %d), addresses %s", name,
             settings.mode, settings.local_ipv4,
             f", remote {settings.remote_ipv4}" if settings.remote_ipv4 else "",
             settings.mtu, ", ".join(settings.addresses))
    return name


def teardown(settings: Settings) -> None:
    """Remove exactly what ``setup`` created."""
    try:
        remove_leftovers(settings)
    except (OSError, NetlinkError) as exc:
        log.warning("kernel backend teardown: %s", exc)
