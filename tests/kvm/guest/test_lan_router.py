"""Issue 19, seed 002's home router, INSIDE the qemu guest: a LAN behind the kernel backend.

```
 peer namespace (the IPv6 internet)   gw namespace: sixgate run, backend kernel   lan namespace
 http.server [2001:db8:ffff::1]:8081  sit link 6in4, [lan] interface = "lan0"     a host: SLAAC
        t6 (ip tunnel, 6in4) ─────────  sgksit         lan0 2001:db8:1:1::1/64 ── eth0
                                        radvd (its RAs), nftables "simple security"
```

The LAN host configures itself from the real radvd's router advertisements (the real
kernel's SLAAC: an address in 2001:db8:1:1::/64, the tunnel's MTU, a default route), reaches
an IPv6 server through the tunnel, and is reached from outside only through the
``[[lan.allow]]`` hole (tcp/8080) and by ping (RFC 4890), not on another port (dropped and
counted: RFC 6092 simple security). A clean stop takes radvd, the firewall, the router address
and the forwarding switch away again. Helpers: kernelgw.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest
from guestnet import ip
from kernelgw import (
    FILE_NAME,
    GATEWAY_STOP_TIMEOUT_S,
    MTU,
    NAME,
    PEER_SIT,
    KernelLab,
    config_text,
    in_ns,
    inside,
    run,
    wait_until,
)

pytestmark = pytest.mark.kvm

Netns = Callable[[str], str]
LAN_PREFIX = "2001:db8:1:1::/64"
ROUTER = "2001:db8:1:1::1"
PEER = "2001:db8:ffff::1"
SERVER_PORT = 8081
OPEN_PORT, CLOSED_PORT = 8080, 2222
LAN_TOML = (f'\n[lan]\ninterface = "lan0"\nprefix = "{LAN_PREFIX}"\nrdnss = ["{ROUTER}"]\n\n'
            f'[[lan.allow]]\nproto = "tcp"\nport = {OPEN_PORT}\n')


def _lan_address(lan_ns: str) -> str | None:
    """The LAN host's autoconfigured global address, once DAD has finished."""
    shown = json.loads(run(in_ns(lan_ns, ["ip", "-j", "-6", "addr", "show", "dev", "eth0",
                                          "scope", "global"])).stdout)
    for link in shown:
        for info in link.get("addr_info", []):
            if not info.get("tentative") and info["local"].startswith("2001:db8:1:1:"):
                return str(info["local"])
    return None


def _connects(namespace: str, address: str, port: int) -> bool:
    with inside(namespace):
        try:
            socket.create_connection((address, port), timeout=3).close()
        except (TimeoutError, OSError):
            return False
    return True


def test_a_lan_host_autoconfigures_reaches_out_and_is_reached_only_through_a_hole(
        netns: Netns) -> None:
    with KernelLab(netns, "6in4") as lab:
        lab.build()
        lan_ns = netns("lan")
        ip("link", "add", "lan0", "netns", lab.gw_ns, "type", "veth", "peer", "name", "eth0",
           "netns", lan_ns)
        run(in_ns(lan_ns, ["sysctl", "-q", "net.ipv6.conf.all.disable_ipv6=0",
                           "net.ipv6.conf.default.disable_ipv6=0"]))
        ip("link", "set", "eth0", "up", netns=lan_ns)
        # The broker routes the whole /48 to us, the LAN's /64 included.
        ip("-6", "route", "add", "2001:db8:1::/48", "dev", PEER_SIT, netns=lab.peer_ns)
        lab.start_services(dns=False)
        server = subprocess.Popen(in_ns(lab.peer_ns, [
            sys.executable, "-m", "http.server", "--bind", PEER, "--directory", str(lab.files),
            str(SERVER_PORT)]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lab.services["peer-http"] = server
        lab.workers = 1
        lab.config_path.write_text(config_text("6in4", lab.run_dir, workers=1).replace(
            'prefix = "2001:db8:1::/64"', 'prefix = "2001:db8:1::/48"') + LAN_TOML)
        gateway = lab.spawn_gateway()
        lab.wait_gateway(gateway)
        assert re.search(r"LAN lan0: 2001:db8:1:1::/64 routed there", gateway.stderr), (
            gateway.stderr)

        wait_until(lambda: _lan_address(lan_ns), timeout=60,
                   what=lambda: "the LAN host's SLAAC address; its addresses:\n"
                   + run(in_ns(lan_ns, ["ip", "-6", "addr"])).stdout + gateway.stderr)
        host = _lan_address(lan_ns)
        assert host is not None
        mtu = run(in_ns(lan_ns, ["cat", "/proc/sys/net/ipv6/conf/eth0/mtu"])).stdout.strip()
        assert mtu == str(MTU), f"the RA's MTU (RFC 4861 §4.6.4) was not taken: {mtu}"
        routes = run(in_ns(lan_ns, ["ip", "-6", "route"])).stdout
        assert re.search(r"^default via fe80::\S+ dev eth0 proto ra\b", routes, re.MULTILINE), (
            routes)

        # Out: a LAN host fetches from the IPv6 internet through the tunnel.
        fetched = run(in_ns(lan_ns, ["curl", "-6", "-g", "-sS", "--max-time", "30", "-o",
                                     "/dev/null", "-w", "%{http_code}",
                                     f"http://[{PEER}]:{SERVER_PORT}/{FILE_NAME}"]),
                      check=False, timeout=60)
        assert fetched.stdout == "200", f"{fetched.stdout} {fetched.stderr}\n{gateway.stderr}"

        # In: only the hole and ping.
        with inside(lan_ns):
            listeners = []
            for port in (OPEN_PORT, CLOSED_PORT):
                listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                listener.bind(("::", port))
                listener.listen()
                listeners.append(listener)
        try:
            assert _connects(lab.peer_ns, host, OPEN_PORT), "the [[lan.allow]] hole is shut"
            assert not _connects(lab.peer_ns, host, CLOSED_PORT), (
                f"port {CLOSED_PORT} of a LAN host was reached from the internet")
        finally:
            for listener in listeners:
                listener.close()
        ping = run(in_ns(lab.peer_ns, ["ping", "-6", "-c", "2", "-i", "0.2", "-w", "10", host]),
                   check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        refused = run(in_ns(lab.gw_ns, ["nft", "list", "counter", "ip6", f"sixgate_{NAME}_lan",
                                        "lan_refused"])).stdout
        found = re.search(r"packets (\d+)", refused)
        assert found and int(found.group(1)) >= 1, refused

        os.kill(gateway.process.pid, signal.SIGTERM)
        assert gateway.process.wait(timeout=GATEWAY_STOP_TIMEOUT_S) == 0, gateway.stderr
        tables = run(in_ns(lab.gw_ns, ["nft", "list", "tables"])).stdout
        assert f"sixgate_{NAME}_lan" not in tables, tables
        addresses = run(in_ns(lab.gw_ns, ["ip", "-6", "addr", "show", "dev", "lan0"])).stdout
        assert ROUTER not in addresses, addresses
        forwarding = run(in_ns(lab.gw_ns, ["sysctl", "-n",
                                           "net.ipv6.conf.all.forwarding"])).stdout.strip()
        assert forwarding == "0", forwarding
        assert not list(lab.run_dir.glob("radvd*")), list(lab.run_dir.iterdir())
