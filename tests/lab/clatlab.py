"""The CLAT lab (issue 18): the NAT64 lab's IPv6-only client runs sixgate as a CLAT.

```
 client namespace (-peer)              NAT64 namespace (-gw)        IPv4 namespace (-v4)
 IPv6 only; sixgate [clat]:            sixgate [nat64] (PLAT),      198.51.100.7   HTTP
 192.0.0.1 + IPv4 default route        unbound DNS64                198.51.100.53  dnsmasq
   on the CLAT device                                               198.51.100.22  sshd
 2001:db8:100::c1a7 (the CLAT's,
   answered for by proxy NDP)
```

Unmodified IPv4 programs in the client (curl, ping, dig, ssh, busybox's static wget) reach
IPv4 literals: the CLAT writes their packets as IPv6 from 2001:db8:100::c1a7 to
64:ff9b::<IPv4>, which the NAT64 translates again. The CLAT finds the prefix itself (RFC 7050:
the client's resolver is the DNS64, which synthesizes ipv4only.arpa's AAAA).
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import sys
from typing import Any

from nat64lab import Nat64Lab
from netlab import LabError, ServedFiles, sixgate_command, stop_process, tail, wait_until

from sixgate.coordinator.clat import candidate_address

CLAT6 = "2001:db8:100::c1a7"
CLIENTS_64 = "2001:db8:100::/64"  # the client's /64, where an "auto" CLAT address is picked
CLAT4 = "192.0.0.1"


# TAYGA as the PLAT: its own IPv4 address and the pool it maps IPv6 sources to, masqueraded
# behind the NAT64 namespace's IPv4 address by the kernel (RFC 1918 space, never routed out).
TAYGA_IPV4 = "192.168.255.1"
TAYGA_POOL = "192.168.255.0/24"
TAYGA_IPV6 = "2001:db8:6464::1"
TAYGA_PREFIX = "2001:db8:64::/96"


# Router advertisements with a PREF64 option, from the interface's link-local address.
RA_SENDER = """
import sys, time
from scapy.arch import get_if_hwaddr
from scapy.layers.inet6 import ICMPv6ND_RA, ICMPv6NDOptPREF64, IPv6
from scapy.layers.l2 import Ether
from scapy.sendrecv import sendp
from scapy.utils6 import in6_mactoifaceid
iface, prefix = sys.argv[1], sys.argv[2]
mac = get_if_hwaddr(iface)
address, length = prefix.split("/")
plc = {96: 0, 64: 1, 56: 2, 48: 3, 40: 4, 32: 5}[int(length)]
ra = (Ether(src=mac, dst="33:33:00:00:00:01")
      / IPv6(src="fe80::" + in6_mactoifaceid(mac).lower(), dst="ff02::1", hlim=255)
      / ICMPv6ND_RA(routerlifetime=0)
      / ICMPv6NDOptPREF64(scaledlifetime=225, plc=plc, prefix=address))
print("sending", flush=True)
while True:
    sendp(ra, iface=iface, verbose=False)
    time.sleep(0.5)
"""


class ClatLab(Nat64Lab):
    """The NAT64 lab plus a second ``sixgate run`` in the client namespace, in CLAT mode.
    ``plat``: who translates again in the NAT64 namespace, sixgate's ``[nat64]`` or TAYGA
    (Debian's package, an independent implementation) with kernel masquerading."""

    def __init__(self, files: ServedFiles, *, plat: str = "sixgate",
                 advertise: str | None = None, clat_toml: str = "") -> None:
        super().__init__(1, files)
        self.plat = plat
        # Against sixgate the CLAT finds the prefix itself (RFC 7050 through the lab's DNS64,
        # which synthesizes under sixgate's; or a router advertisement's PREF64, RFC 8781);
        # TAYGA's is named.
        self.plat_prefix = "auto" if plat == "sixgate" else TAYGA_PREFIX
        # A PREF64 the NAT64 namespace advertises from the start (``advertise_pref64``).
        self.advertise = advertise
        # Against TAYGA the CLAT picks its address itself ("auto"), and the first one it
        # would pick is taken already (by the NAT64 namespace): duplicate address detection
        # must make it pick another.
        self.clat_address = CLAT6 if plat == "sixgate" else "auto"
        self.taken_address = (candidate_address(ipaddress.IPv6Network(CLIENTS_64), self.name, 0)
                              if plat != "sixgate" else None)
        self.clat_config = self.tmp / "clat.toml"
        self.clat_toml = clat_toml  # more [clat] keys

    def start_gateway(self, timeout: float = 30, key: str = "sixgate") -> None:
        if self.plat == "sixgate":
            super().start_gateway(timeout, key)
        else:
            self.start_tayga()

    def start_tayga(self) -> None:
        binary = shutil.which("tayga")
        if binary is None:
            raise LabError("tayga is not installed (apt-get install tayga)")
        device = f"{self.name}t"
        data_dir = self.tmp / "tayga"
        data_dir.mkdir()
        config = self.tmp / "tayga.conf"
        # A network-specific prefix: under the well-known one TAYGA 0.9.2 refuses the lab's
        # documentation addresses (RFC 6052 §3.1) with no switch to allow them. Its own IPv6
        # address sources the ICMPv6 errors it makes.
        config.write_text(f"tun-device {device}\nipv4-addr {TAYGA_IPV4}\n"
                          f"ipv6-addr {TAYGA_IPV6}\nprefix {TAYGA_PREFIX}\n"
                          f"dynamic-pool {TAYGA_POOL}\ndata-dir {data_dir}\n")
        self.sysctl(self.gw_ns, "net.ipv6.conf.all.forwarding=1", "net.ipv4.ip_forward=1")
        process = self.spawn("tayga", self.gw_ns, [binary, "--nodetach", "-c", str(config)])

        def device_exists() -> bool:
            if process.poll() is not None:
                raise LabError(f"tayga exited:\n{tail(self.log_path('tayga'))}")
            return device in self.gw(["ip", "-o", "link", "show"]).stdout

        wait_until(device_exists, timeout=10, what=f"tayga's TUN device {device}")
        self.ip(self.gw_ns, "link", "set", device, "up")
        self.ip(self.gw_ns, "route", "add", TAYGA_PREFIX, "dev", device)
        self.ip(self.gw_ns, "route", "add", TAYGA_POOL, "dev", device)
        self.ip(self.gw_ns, "route", "add", TAYGA_IPV6, "dev", device)
        # The table lives and dies with the namespace.
        self.gw(["nft", "-f", "-"], check=True, input=(
            "table ip taygaplat {\n chain post {\n  type nat hook postrouting priority 100;\n"
            f'  oifname "veth4" ip saddr {TAYGA_POOL} masquerade\n }}\n}}\n'))

    def start(self) -> None:
        super().start()
        self.clat_config.write_text(
            "[gateway]\n"
            f'name = "{self.name}"\n'
            f'run_dir = "{self.tmp / "clat-run"}"\n'
            "\n[clat]\n"
            f'plat_prefix = "{self.plat_prefix}"\n'
            f'ipv6_address = "{self.clat_address}"\n{self.clat_toml}')
        if self.taken_address is not None:
            self.ip(self.gw_ns, "addr", "add", f"{self.taken_address}/64", "dev", "veth6",
                    "nodad")
        self.state_before = self.client_state()
        if self.advertise is not None:
            self.advertise_pref64(self.advertise)
        self.start_clat()

    def start_clat(self, key: str = "clat") -> None:
        self.spawn(key, self.peer_ns, [*sixgate_command(), "run", "--config",
                                       str(self.clat_config)])

        def ready() -> bool:
            if not self.alive(key):
                raise LabError(f"the CLAT exited {self.processes[key].returncode}:\n"
                               f"{self.log_path(key).read_text()}")
            return self.clat_sixgate("flows", "--json").returncode == 0

        wait_until(ready, timeout=30, what="the CLAT's `sixgate flows` to exit 0")
        picked = re.search(r"CLAT: address (\S+) picked", self.log_path(key).read_text())
        if picked:
            self.clat_address = picked.group(1)

    def advertise_pref64(self, prefix: str) -> None:
        """The NAT64 namespace's router advertisements (scapy: Debian's radvd 2.19 has no
        PREF64) carry ``prefix`` as PREF64 (RFC 8781) from now on, every 0.5 s, from its
        link-local address with hop limit 255 and router lifetime 0 (the client keeps its own
        default route)."""
        key = "ra"
        if key in self.processes:
            stop_process(self.processes.pop(key), 5)
        self.spawn(key, self.gw_ns, [sys.executable, "-c", RA_SENDER, "veth6", prefix])
        wait_until(lambda: "sending" in self.log_path(key, "out").read_text(), timeout=15,
                   what="the router advertisement sender")

    def clat_sixgate(self, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """``sixgate <args> --config <the CLAT's>`` in the client namespace."""
        return self.peer([*sixgate_command(), *args, "--config", str(self.clat_config)],
                         timeout=timeout)

    def stop_clat(self, key: str = "clat") -> int:
        return stop_process(self.processes[key], 10)

    def client_state(self) -> dict[str, Any]:
        """What the CLAT leaves in the client namespace: routes, addresses, links, switches."""
        return {
            "ipv4 routes": self.peer(["ip", "-4", "route", "show"]).stdout.strip(),
            "ipv4 addresses": self.peer(["ip", "-4", "-o", "addr", "show"]).stdout.strip(),
            "ipv6 routes to the CLAT": self.peer(["ip", "-6", "route", "show", "table", "all",
                                                  "proto", "boot"]).stdout.strip(),
            "links": sorted(line.split(":")[1].strip().split("@")[0] for line in self.peer(
                ["ip", "-o", "link", "show"]).stdout.splitlines()),
            "proxy": self.peer(["ip", "-6", "neigh", "show", "proxy"]).stdout.strip(),
            "forwarding": self.peer(["sysctl", "-n", "net.ipv6.conf.all.forwarding"]
                                    ).stdout.strip(),
            "proxy_ndp": self.peer(["sysctl", "-n", "net.ipv6.conf.veth6.proxy_ndp"]
                                   ).stdout.strip(),
        }
