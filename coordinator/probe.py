"""``sixgate probe``: what this kernel and these privileges allow, one line each with the reason.

Every check really tries the thing (opens the socket, creates and deletes the device) rather
than guessing from versions; a check never leaves anything behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sixgate.workers.engine.fastpath import compiled
from sixgate.workers.engine.settings import Settings


@dataclass(frozen=True)
class Capability:
    name: str
    ok: bool
    detail: str


def _raw_proto41() -> Capability:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, 41).close()
        return Capability("raw socket (IPv4 proto 41)", True, "can receive and send 6in4/6to4")
    except PermissionError:
        return Capability("raw socket (IPv4 proto 41)", False,
                          "permission denied: run as root or grant CAP_NET_RAW")
    except OSError as exc:
        return Capability("raw socket (IPv4 proto 41)", False, str(exc))


def _af_packet() -> Capability:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)).close()
        return Capability("AF_PACKET", True, "packet capture available")
    except PermissionError:
        return Capability("AF_PACKET", False, "permission denied: needs CAP_NET_RAW")
    except OSError as exc:
        return Capability("AF_PACKET", False, str(exc))


def _tun() -> Capability:
    import fcntl
    import struct
    if not os.path.exists("/dev/net/tun"):
        return Capability("TUN", False, "/dev/net/tun is missing: load the tun module or, in a "
                          "container, pass the device in (--device /dev/net/tun)")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as exc:
        return Capability("TUN", False, f"cannot open /dev/net/tun: {exc.strerror}")
    try:
        name = f"sgprobe{os.getpid() % 10000}"
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), 0x1001))
        return Capability("TUN", True, "can create TUN devices (delivery method: tun)")
    except OSError as exc:
        reason = ("needs CAP_NET_ADMIN" if exc.errno == errno.EPERM else exc.strerror)
        return Capability("TUN", False, f"cannot create a TUN device: {reason}")
    finally:
        os.close(fd)


def _nftables() -> Capability:
    nft = shutil.which("nft")
    if nft is None:
        return Capability("nftables", False, "the nft command is not installed (apt-get install "
                          "nftables); not needed by the tun delivery method")
    result = subprocess.run([nft, "list", "tables"], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        return Capability("nftables", False, result.stderr.strip() or "nft list tables failed")
    return Capability("nftables", True, "nft works (not needed by the tun delivery method)")


def _kernel_ipv6() -> Capability:
    if not Path("/proc/net/if_inet6").exists():
        return Capability("kernel IPv6", False, "the kernel has no IPv6 (no /proc/net/if_inet6);"
                          " sixgate provides the IPv6 stack in userspace")
    try:
        disabled = Path("/proc/sys/net/ipv6/conf/all/disable_ipv6").read_text().strip()
    except OSError:
        disabled = "0"
    if disabled == "1":
        return Capability("kernel IPv6", False, "disabled (net.ipv6.conf.all.disable_ipv6=1); "
                          "sixgate provides the IPv6 stack in userspace")
    return Capability("kernel IPv6", True, "enabled")


def _kernel_sit() -> Capability:
    """Try to create a sit link (then delete it): the only reliable test of the driver."""
    try:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
    except ImportError as exc:  # pragma: no cover - a dependency
        return Capability("kernel sit", False, f"pyroute2 missing: {exc}")
    name = f"sgsit{os.getpid() % 10000}"
    # A per-probe local address (RFC 5737 TEST-NET-1), so probes running at the same time
    # rarely ask for identical tunnels; when they do, EEXIST still proves the driver is there.
    local = f"192.0.2.{os.getpid() % 254 + 1}"
    try:
        with IPRoute() as ipr:
            try:
                ipr.link("add", ifname=name, kind="sit", sit_local=local)
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:
                    return Capability("kernel sit", True, "sit tunnels can be created (an "
                                      "identical sit tunnel exists already)")
                if exc.code == errno.EPERM:
                    return Capability("kernel sit", False, "needs CAP_NET_ADMIN to test")
                return Capability("kernel sit", False, "the kernel has no sit driver "
                                  f"(CONFIG_IPV6_SIT): {os.strerror(exc.code)}")
            index = ipr.link_lookup(ifname=name)
            if index:
                ipr.link("del", index=index[0])
            return Capability("kernel sit", True, "sit tunnels can be created")
    except OSError as exc:
        return Capability("kernel sit", False, str(exc))


def probe() -> list[Capability]:
    return [_raw_proto41(), _af_packet(), _tun(), _nftables(), _kernel_ipv6(), _kernel_sit()]


def delivery_method(capabilities: list[Capability]) -> tuple[str | None, str]:
    """Which way translated packets reach the services here, and why."""
    by_name = {c.name: c for c in capabilities}
    tun = by_name["TUN"]
    if tun.ok:
        return "tun", "TUN device per worker; the pool is routed to it (no firewall rule)"
    return None, f"no delivery method: {tun.detail}"


def fast_path_method(settings: Settings, backend: str | None) -> tuple[str, str]:
    """How the workers' fast path runs: ("compiled" | "python" | "none", why)."""
    if backend == "kernel":
        return "none", "the kernel's sit link translates nothing: the workers relay sockets"
    if not settings.compiled_fast_path:
        return "python", "configured (compiled_fast_path = false)"
    if compiled is None:
        return "python", ("the compiled loops (workers/engine/_fastpath.c) were not built at "
                          "install: install gcc and the Python headers (Debian: gcc "
                          "python3-dev), then reinstall sixgate")
    return "compiled", ("batch loops in C (workers/engine/_fastpath.c) for the plain packets "
                        "of live sessions; the engine in Python decides the rest")


def choose_backend(requested: str, capabilities: list[Capability]) -> tuple[str | None, str]:
    """Resolve ``[gateway] backend``: (backend or None when impossible, why)."""
    by_name = {c.name: c for c in capabilities}
    sit, ipv6 = by_name["kernel sit"], by_name["kernel IPv6"]
    kernel_ok = sit.ok and ipv6.ok
    if requested == "userspace":
        return "userspace", "configured (backend = \"userspace\")"
    if requested == "kernel":
        if kernel_ok:
            return "kernel", "configured; the kernel has sit and IPv6"
        missing = sit if not sit.ok else ipv6
        return None, (f"backend = \"kernel\" but {missing.name} is unavailable: "
                      f"{missing.detail}; use backend = \"auto\" or \"userspace\"")
    if kernel_ok:
        return "kernel", "auto: the kernel has sit and IPv6 and we may configure them"
    missing = sit if not sit.ok else ipv6
    return "userspace", f"auto: {missing.name} unavailable ({missing.detail})"
