"""A LAN behind the tunnel (issue 19, seed 002's home router), on the kernel backend.

What ``setup`` does, each undone by ``teardown`` (and by the next start, from the state file,
when a run crashed):
- IPv6 forwarding on (``net.ipv6.conf.all.forwarding``, its old value restored at stop); the
  router's address, the LAN prefix's ::1/64, on the LAN interface (so the prefix is routed
  there);
- a real radvd (Debian's) with a config generated here (``radvd_config``): the prefix for
  SLAAC (RFC 4862), the tunnel's MTU (RFC 4861 §4.6.4: hosts then never send more than the
  tunnel carries) and the DNS servers (RFC 8106 RDNSS);
- an nftables table (``lan_ruleset``) in RFC 6092's "simple security" style: from the
  internet to the LAN only what belongs to a flow a LAN host opened (REC-11, conntrack
  established/related), the ICMPv6 RFC 4890 §4.3.1 says must pass (errors, echo), and the
  ``[[lan.allow]]`` holes (REC-48: an administrator's explicit choice); everything else
  counted and dropped. From the LAN only its own prefix as source (RFC 6092 REC-5, BCP 38).
  Nothing else is forwarded between the tunnel and other interfaces.

The userspace backend has no LAN: the host's kernel has no IPv6 to route with, and sixgate's
engine does not forward between the tunnel and an Ethernet segment (config refuses it).

Pure: ``radvd_config``, ``lan_ruleset``, ``router_address``. I/O shell: the rest.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from sixgate.coordinator.forwarding import ForwardingError, nft, replace_table
from sixgate.workers.engine.settings import Settings

log = logging.getLogger("sixgate.lan")

STATE_FILE = "lan.json"
FORWARDING = Path("/proc/sys/net/ipv6/conf/all/forwarding")
# RFC 4890 §4.3.1: ICMPv6 a firewall must not drop in transit (errors, echo for diagnosis).
ICMPV6_TRANSIT = ("destination-unreachable", "packet-too-big", "time-exceeded",
                  "parameter-problem", "echo-request", "echo-reply")
MAX_RA_INTERVAL_S = 60  # unsolicited router advertisements (hosts also ask: RS, RFC 4861 §6.3.7)
RADVD_READY_S = 5.0


class LanError(Exception):
    pass


def router_address(settings: Settings) -> str:
    """The router's own address on the LAN: the prefix's ::1."""
    return str(ipaddress.IPv6Network(settings.lan_prefix).network_address + 1)


def table_name(settings: Settings) -> str:
    return f"sixgate_{settings.name}_lan"


def radvd_config(settings: Settings) -> str:
    """radvd.conf for the LAN (radvd.conf(5)). Pure."""
    lines = [f"interface {settings.lan_interface} {{",
             "    AdvSendAdvert on;",
             f"    MaxRtrAdvInterval {MAX_RA_INTERVAL_S};",
             f"    AdvLinkMTU {settings.mtu};",  # RFC 4861 §4.6.4: the tunnel's MTU
             f"    prefix {settings.lan_prefix} {{",
             "        AdvOnLink on;",
             "        AdvAutonomous on;",  # RFC 4862 §5.5.3: hosts make their addresses
             "    };"]
    if settings.lan_rdnss:
        lines += [f"    RDNSS {' '.join(settings.lan_rdnss)} {{", "    };"]  # RFC 8106 §5.1
    lines.append("};")
    return "\n".join(lines) + "\n"


def lan_ruleset(settings: Settings, sit_link: str) -> str:
    """The LAN's firewall (``nft -f`` input; module docstring). Pure."""
    lan, prefix = settings.lan_interface, settings.lan_prefix
    lines = [f"table ip6 {table_name(settings)} {{",
             "  counter lan_refused {",
             "  }",
             "  counter lan_spoofed {",
             "  }",
             "  chain forward {",
             "    type filter hook forward priority filter; policy accept;",
             # RFC 6092 REC-5: what leaves the LAN carries a LAN source.
             f'    iifname "{lan}" ip6 saddr != {prefix} counter name "lan_spoofed" drop',
             f'    iifname "{lan}" oifname "{sit_link}" accept',
             f'    iifname "{sit_link}" oifname "{lan}" jump from_internet',
             # Nothing else crosses between the tunnel, the LAN and other interfaces.
             f'    iifname {{ "{lan}", "{sit_link}" }} drop',
             f'    oifname {{ "{lan}", "{sit_link}" }} drop',
             "  }",
             "  chain from_internet {",
             "    ct state established,related accept",  # RFC 6092 REC-11
             "    ct state invalid drop",
             f"    icmpv6 type {{ {', '.join(ICMPV6_TRANSIT)} }} accept"]
    for proto, lo, hi, address in settings.lan_allow:
        ports = str(lo) if lo == hi else f"{lo}-{hi}"
        host = f"ip6 daddr {address} " if address else ""
        lines.append(f"    {host}{proto} dport {ports} accept")
    lines += ['    counter name "lan_refused" drop',
              "  }",
              "}"]
    return "\n".join(lines) + "\n"


def _state_path(settings: Settings) -> Path:
    return Path(settings.run_dir) / STATE_FILE


def _write_state(settings: Settings, state: dict[str, Any]) -> None:
    _state_path(settings).write_text(json.dumps(state))


def _radvd_paths(settings: Settings) -> tuple[Path, Path]:
    run_dir = Path(settings.run_dir)
    return run_dir / "radvd.conf", run_dir / "radvd.pid"


def setup(settings: Settings, sit_link: str) -> subprocess.Popen[bytes]:
    """Route, advertise and guard the LAN; returns the radvd process."""
    radvd = shutil.which("radvd")
    if radvd is None:
        raise LanError("radvd is missing (apt-get install radvd): the LAN's hosts configure "
                       "themselves from its router advertisements")
    try:
        lan_index = socket.if_nametoindex(settings.lan_interface)
    except OSError:
        raise LanError(f"[lan] interface {settings.lan_interface!r} is not an interface of "
                       "this host; name the LAN's (ip link)") from None
    remove_leftovers(settings)
    state: dict[str, Any] = {"forwarding": FORWARDING.read_text().strip()}
    _write_state(settings, state)
    FORWARDING.write_text("1\n")
    address = router_address(settings)
    with IPRoute() as ipr:
        ipr.link("set", index=lan_index, state="up")
        try:
            ipr.addr("add", index=lan_index, address=address, prefixlen=64,
                     family=socket.AF_INET6, flags=0x02)  # IFA_F_NODAD: ours by config
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise LanError(f"cannot put {address}/64 on {settings.lan_interface}: "
                               f"{exc.args[-1] if exc.args else exc}") from None
        state["address"] = [lan_index, address]
        _write_state(settings, state)
    try:
        nft(replace_table("ip6", table_name(settings), lan_ruleset(settings, sit_link)))
    except ForwardingError as exc:
        raise LanError(f"cannot install the LAN's firewall: {exc}") from None
    state["table"] = table_name(settings)
    _write_state(settings, state)
    config, pidfile = _radvd_paths(settings)
    config.write_text(radvd_config(settings))
    config.chmod(0o644)  # radvd refuses a config others may write
    argv = [radvd, "--nodaemon", "--config", str(config), "--pidfile", str(pidfile),
            "--logmethod", "stderr"]
    if settings.user and os.geteuid() == 0:
        # radvd drops to the gateway's user, so the coordinator (that user from now on) can
        # stop it.
        argv += ["--username", settings.user]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    state["radvd"] = [process.pid, str(config)]
    _write_state(settings, state)
    try:
        process.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        pass
    else:
        raise LanError(f"radvd exited {process.returncode} at once (its error is logged above)")
    log.info("LAN %s: %s routed there (router %s), radvd advertising it with MTU %d%s; "
             "firewall table ip6 %s: from the internet only replies, RFC 4890 ICMPv6 and %d "
             "[[lan.allow]] hole(s)", settings.lan_interface, settings.lan_prefix, address,
             settings.mtu, f" and DNS {', '.join(settings.lan_rdnss)}" if settings.lan_rdnss
             else "", table_name(settings), len(settings.lan_allow))
    return process


def _is_our_radvd(pid: int, config: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and argv[0].endswith(b"radvd") and config.encode() in argv


def remove_leftovers(settings: Settings) -> None:
    """Undo what a run left (named in its state file): radvd (by its PID, if it is still the
    radvd we started), the router address, the firewall table, the forwarding switch."""
    path = _state_path(settings)
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    radvd = state.get("radvd")
    if isinstance(radvd, list) and len(radvd) == 2 and _is_our_radvd(int(radvd[0]),
                                                                        str(radvd[1])):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(radvd[0]), signal.SIGTERM)
    table = state.get("table")
    if isinstance(table, str):
        try:
            nft(replace_table("ip6", table))
        except ForwardingError as exc:
            log.warning("cannot delete nftables table ip6 %s: %s", table, exc)
    address = state.get("address")
    if isinstance(address, list) and len(address) == 2:
        with IPRoute() as ipr, contextlib.suppress(NetlinkError):
            ipr.addr("del", index=int(address[0]), address=str(address[1]), prefixlen=64,
                     family=socket.AF_INET6)
    forwarding = state.get("forwarding")
    if forwarding in ("0", "1"):
        try:
            FORWARDING.write_text(f"{forwarding}\n")
        except OSError as exc:
            log.warning("cannot restore net.ipv6.conf.all.forwarding=%s: %s", forwarding, exc)
    for leftover in (path, *_radvd_paths(settings)):
        leftover.unlink(missing_ok=True)


def teardown(settings: Settings, radvd: subprocess.Popen[bytes] | None) -> None:
    """Stop radvd (by its PID) and undo the rest."""
    if radvd is not None and radvd.poll() is None:
        radvd.terminate()
        try:
            radvd.wait(timeout=5)
        except subprocess.TimeoutExpired:
            radvd.kill()
            radvd.wait()
    try:
        remove_leftovers(settings)
    except (OSError, NetlinkError) as exc:
        log.warning("LAN teardown: %s", exc)
