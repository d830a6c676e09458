"""The NAT64 lab (issue 16): an IPv6-only client, the sixgate NAT64 host and an IPv4 "internet".

```
 client namespace (-peer)          gateway namespace (-gw)               IPv4 namespace (-v4)
 IPv6 only, no IPv4 route          sixgate run ([nat64])                  real servers:
 2001:db8:100::10/64               2001:db8:100::1/64 on veth6            198.51.100.7:80   HTTP
 2001:db8:100:1::10/64             198.51.100.254/24 on veth4             198.51.100.53:53  dnsmasq
 2001:db8:999::10/64 (a stranger)  default via 198.51.100.1               route 203.0.113.5 -> gw
 default via 2001:db8:100::1       kernel IPv6 on, forwarding off         (pool4 of the NAT64)
```

The client reaches the IPv4 servers as 64:ff9b::198.51.100.x through the gateway's kernel,
which routes the prefix to sixgate's TUN device. Documentation addresses are not global, so
the config sets ``allow_non_global`` (RFC 6052 §3.1 would refuse them under the well-known
prefix). Built on ``netlab.Lab``: the same naming, cleanup, process and logging rules.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from netlab import (
    DNS_BIG_NAME,
    DNS_EDNS_MAX,
    DNS_SMALL_A,
    DNS_SMALL_NAME,
    SMALL_NAME,
    SMALL_TEXT,
    Lab,
    LabError,
    ServedFiles,
    big_txt_strings,
    delete_namespace,
    http_server_argv,
    run,
    stop_process,
    tail,
    wait_until,
)

PREFIX = "64:ff9b::/96"
CLIENT6 = "2001:db8:100::10"
CLIENT6_OTHER = "2001:db8:100:1::10"  # a second /64 of the allowed /56
STRANGER6 = "2001:db8:999::10"  # outside [nat64] clients
# One client address in each of 16 further /64s of the allowed /56: what spreads the clients
# over the workers (the gateway steers by source /64).
MANY_CLIENTS6 = tuple(f"2001:db8:100:{n:x}::10" for n in range(0x10, 0x20))
GATEWAY6 = "2001:db8:100::1"
GATEWAY4 = "198.51.100.254"
ROUTER4 = "198.51.100.1"  # the IPv4 namespace: the gateway's default route
HTTP4 = "198.51.100.7"
DNS4 = "198.51.100.53"
# Reached through a 1300-byte route of the gateway's: its packets over that get Fragmentation
# Needed from the gateway's own IPv4 routing (RFC 1191), like from a router on the path.
MTU_LIMITED4 = "198.51.100.8"
SSH4 = "198.51.100.22"
V4ONLY_NAME = "v4only.lab"  # has an A record (HTTP4) and no AAAA: DNS64 synthesizes one
SSHD = "/usr/sbin/sshd"
POOL4 = "203.0.113.5"
HTTP_PORT = 80
DNS_PORT = 53


def synthesized(ipv4: str) -> str:
    """The RFC 6052 address of ``ipv4`` under the well-known prefix."""
    return f"64:ff9b::{ipv4}"


class Nat64Lab(Lab):
    """Three namespaces, real IPv4 servers and the real ``sixgate run`` in NAT64 mode."""

    def __init__(self, workers: int, files: ServedFiles, *, extra_toml: str = "",
                 udp_ports: str = "61001-65535", with_clients_kit: bool = True,
                 pool4: str = POOL4, gateway_toml: str = "") -> None:
        super().__init__("6in4", workers, files, gateway_toml=gateway_toml)
        self.v4_ns = self.gw_ns.removesuffix("-gw") + "-v4"
        self.extra_toml = extra_toml
        self.udp_ports = udp_ports
        self.pool4 = pool4  # POOL4 (routed to the gateway) or GATEWAY4 (its own address)
        self.with_clients_kit = with_clients_kit
        self.ssh_key = self.tmp / "id_ed25519"
        self.known_hosts = self.tmp / "known_hosts"
        self.tnat64_conf = self.tmp / "tnat64.conf"

    def start(self) -> None:
        self.create_namespaces()
        self.start_services()
        self.write_config()
        self.start_gateway()
        if self.with_clients_kit:
            self.start_dns64()
            self.start_sshd()
            self.tnat64_conf.write_text(self.sixgate_out("dns64", "emit", "--tnat64"))

    def sixgate_out(self, *args: str) -> str:
        """stdout of ``sixgate <args> --config <file>`` (LabError unless it exits 0)."""
        done = self.sixgate(*args)
        if done.returncode != 0:
            raise LabError(f"sixgate {' '.join(args)} exited {done.returncode}: {done.stderr}")
        return str(done.stdout)

    def start_dns64(self, prefix: str | None = None) -> None:
        """unbound in the gateway namespace with the DNS64 clause ``sixgate dns64 emit
        --unbound`` prints, forwarding to the IPv4 dnsmasq; the client's resolv.conf names it
        (``ip netns exec`` mounts /etc/netns/<namespace>/resolv.conf over /etc/resolv.conf).
        ``prefix``: synthesize under that one instead (a network whose DNS64 changed; a running
        unbound is stopped first)."""
        if "unbound" in self.processes:
            stop_process(self.processes.pop("unbound"), 5)
        clause = self.sixgate_out("dns64", "emit", "--unbound")
        if prefix is not None:
            clause = re.sub(r"dns64-prefix: \S+", f"dns64-prefix: {prefix}", clause)
        config = self.tmp / "unbound.conf"
        config.write_text(clause + (
            "server:\n"
            f"    interface: {GATEWAY6}\n"
            "    port: 53\n"
            "    access-control: 2001:db8:100::/56 allow\n"
            "    do-daemonize: no\n"
            '    username: ""\n'
            '    chroot: ""\n'
            f'    directory: "{self.tmp}"\n'
            '    pidfile: ""\n'
            "    use-syslog: no\n"
            '    logfile: ""\n'
            "    num-threads: 1\n"
            "forward-zone:\n"
            '    name: "."\n'
            f"    forward-addr: {DNS4}\n"))
        self.spawn("unbound", self.gw_ns, ["unbound", "-d", "-c", str(config)])
        netns_etc = Path("/etc/netns") / self.peer_ns
        netns_etc.mkdir(parents=True, exist_ok=True)
        self._cleanup.callback(shutil.rmtree, netns_etc, ignore_errors=True)
        (netns_etc / "resolv.conf").write_text(f"nameserver {GATEWAY6}\n")

        def answering() -> bool:
            if not self.alive("unbound"):
                raise LabError(f"unbound died:\n{tail(self.log_path('unbound'))}")
            return bool(self.gw(["ss", "-Hlnu", "sport = :53"]).stdout.strip())

        wait_until(answering, timeout=15, what="unbound listening")

    def start_sshd(self) -> None:
        """Debian's sshd on SSH4 in the IPv4 namespace, a key of the client's trusted (a tmpfs
        /run in the mount namespace ``ip netns exec`` made, so the host's /run is untouched)."""
        host_key = self.tmp / "ssh_host_ed25519_key"
        for key in (self.ssh_key, host_key):
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
        public = host_key.with_suffix(".pub").read_text().split()
        self.known_hosts.write_text(f"{SSH4} {public[0]} {public[1]}\n")
        shutil.copy(self.ssh_key.with_suffix(".pub"), self.tmp / "authorized_keys")
        config = self.tmp / "sshd_config"
        config.write_text(
            f"ListenAddress {SSH4}:22\nHostKey {host_key}\nPidFile {self.tmp / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.tmp / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n")
        script = ("mount -t tmpfs -o mode=0755,size=16m sixgate-nat64-run /run"
                  ' && mkdir -m 0755 /run/sshd && exec "$0" -D -e -f "$1"')
        self.spawn("sshd", self.v4_ns, ["sh", "-c", script, SSHD, str(config)])
        self._wait_listening_v4("sshd", "-t", 22)

    def ssh_argv(self, command: str) -> list[str]:
        """A plain ``ssh root@SSH4 command`` (an IPv4 literal) that trusts only the lab's keys."""
        return ["ssh", "-F", "/dev/null", "-i", str(self.ssh_key), "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o",
                "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10", f"root@{SSH4}", command]

    def create_namespaces(self) -> None:
        for namespace in (self.gw_ns, self.peer_ns, self.v4_ns):
            run(["ip", "netns", "add", namespace])
            self._cleanup.callback(delete_namespace, namespace)
            self.ip(namespace, "link", "set", "lo", "up")
        self.sysctl(self.peer_ns, "net.ipv6.conf.all.disable_ipv6=0",
                    "net.ipv6.conf.default.disable_ipv6=0")
        self.sysctl(self.gw_ns, "net.ipv6.conf.all.disable_ipv6=0",
                    "net.ipv6.conf.default.disable_ipv6=0", "net.ipv6.conf.all.forwarding=0",
                    "net.ipv4.ip_forward=0")
        # Created inside the namespaces: no link ever appears in the host namespace.
        self.ip(self.gw_ns, "link", "add", "veth6", "type", "veth", "peer", "name", "veth6",
                "netns", self.peer_ns)
        self.ip(self.gw_ns, "link", "add", "veth4", "type", "veth", "peer", "name", "veth4",
                "netns", self.v4_ns)
        for namespace in (self.gw_ns, self.peer_ns):
            self.ip(namespace, "link", "set", "veth6", "up")
        for namespace in (self.gw_ns, self.v4_ns):
            self.ip(namespace, "link", "set", "veth4", "up")
        self.ip(self.gw_ns, "addr", "add", f"{GATEWAY6}/64", "dev", "veth6", "nodad")
        for prefix in ("2001:db8:100::/56", "2001:db8:999::/64"):
            self.ip(self.gw_ns, "-6", "route", "add", prefix, "dev", "veth6")
        self.ip(self.gw_ns, "addr", "add", f"{GATEWAY4}/24", "dev", "veth4")
        self.ip(self.gw_ns, "route", "add", "default", "via", ROUTER4)
        for address in (CLIENT6, CLIENT6_OTHER, STRANGER6, *MANY_CLIENTS6):
            # Only the first is chosen as a source by itself (RFC 6724 rule 3).
            extra = [] if address == CLIENT6 else ["preferred_lft", "0"]
            self.ip(self.peer_ns, "addr", "add", f"{address}/64", "dev", "veth6", "nodad",
                    *extra)
        self.ip(self.peer_ns, "-6", "route", "add", "default", "via", GATEWAY6)
        self.ip(self.v4_ns, "addr", "add", f"{ROUTER4}/24", "dev", "veth4")
        for address in (HTTP4, DNS4, MTU_LIMITED4, SSH4):
            self.ip(self.v4_ns, "addr", "add", f"{address}/32", "dev", "veth4")
        self.ip(self.gw_ns, "route", "add", f"{MTU_LIMITED4}/32", "via", ROUTER4, "mtu", "1300")
        self.ip(self.v4_ns, "route", "add", f"{POOL4}/32", "via", GATEWAY4)

    def start_services(self) -> None:
        self.spawn("http", self.v4_ns, http_server_argv(HTTP4, HTTP_PORT, self.files.directory))
        self.spawn("dnsmasq", self.v4_ns, [
            "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
            f"--listen-address={DNS4}", f"--port={DNS_PORT}", "--bind-interfaces",
            "--pid-file=", "--log-facility=-", f"--edns-packet-max={DNS_EDNS_MAX}",
            f"--host-record={DNS_SMALL_NAME},{DNS_SMALL_A}",
            f"--host-record={V4ONLY_NAME},{HTTP4}",
            # RFC 7050 §2.2: the well-known name a CLAT asks for (through DNS64) to learn
            # the NAT64's prefix.
            "--host-record=ipv4only.arpa,192.0.0.170", "--host-record=ipv4only.arpa,192.0.0.171",
            f"--txt-record={DNS_BIG_NAME}," + ",".join(big_txt_strings())])
        for key, flag, port in (("http", "-t", HTTP_PORT), ("dnsmasq", "-u", DNS_PORT)):
            self._wait_listening_v4(key, flag, port)
        body = self.v4(["curl", "-sS", "--max-time", "5",
                         f"http://{HTTP4}/{SMALL_NAME}"]).stdout
        if body != SMALL_TEXT:
            raise LabError(f"the IPv4 HTTP server does not serve {SMALL_NAME}: {body!r}")

    def _wait_listening_v4(self, key: str, proto_flag: str, port: int) -> None:
        def listening() -> bool:
            if not self.alive(key):
                raise LabError(f"{key} died:\n{tail(self.log_path(key))}")
            return bool(self.v4(["ss", "-Hln", proto_flag, f"sport = :{port}"]).stdout.strip())

        wait_until(listening, timeout=15, what=f"{key} listening on port {port}")

    def v4(self, argv: list[str], **kwargs: Any) -> Any:
        """Run a command in the IPv4 namespace."""
        return self.exec_in(self.v4_ns, argv, **kwargs)

    def config_text(self) -> str:
        return (
            "[gateway]\n"
            f"workers = {self.workers}\n"
            f'run_dir = "{self.tmp / "run"}"\n'
            f'name = "{self.name}"\n'
            f"{self.gateway_toml}"
            "\n[nat64]\n"
            f'prefix = "{PREFIX}"\n'
            'clients = ["2001:db8:100::/56"]\n'
            "allow_non_global = true  # documentation addresses (RFC 6052 §3.1)\n"
            f"{self.extra_toml}"
            "\n[[nat64.pool4]]\n"
            f'address = "{self.pool4}"\n'
            'tcp = "61001-65535"\n'
            f'udp = "{self.udp_ports}"\n'
            'icmp = "0-65535"\n'
        )
