"""A fleet of SSH hosts in network namespaces, for real ``sixgate deploy`` rollouts.

```
 controller namespace (ansible-playbook, ssh)              <tag>-ctl
   br0 192.0.2.1/24 ──┬── veth ── <tag>-h1  eth0 192.0.2.11/24   sshd, install root <tmp>/h1/root
                      ├── veth ── <tag>-h2  eth0 192.0.2.12/24   ...
                      ├── ...                                    (kernel IPv6 off in every host)
                      └── veth ── <tag>-net eth0 198.51.100.1/24  the IPv6 side: tunnel_peer.py
                                  (6to4) on tun6 2002:c633:6401::1/48, route 2002::/16, real ping -6
```

The last host is also a NAT64 (its gateway has a [nat64] table beside the 6to4 tunnel): its
kernel IPv6 is on, with ``NAT64_CLIENT6`` on eth0 (one of its NAT64 clients), and the IPv4
side routes its pool4 address ``nat64_pool4(N)`` back to it, so its health gate pings the IPv4
peer 198.51.100.1 through the NAT64.

Each host runs its own Debian sshd (``/usr/sbin/sshd -D``) on its documentation address, with a
host key made for the run, root login by a throwaway ed25519 key only, and a private ``/run``
(a tmpfs mounted in the mount namespace ``ip netns exec`` gives sshd, so the privilege separation
directory /run/sshd never touches the machine's own /run). The controller trusts exactly those
host keys through a generated known_hosts. The gateway of host N (6to4, local_ipv4 192.0.2.1N)
answers at ``gateway_address(N)`` (2002:c000:20b::1 for host 1); the IPv6 namespace reaches it
through the independent userspace 6to4 peer of the namespace lab (tests/lab/tunnel_peer.py).

Safety as in tests/lab/netlab.py: documentation addresses only, veth pairs created inside the
namespaces (nothing appears in the host namespace), processes stopped by PID, namespaces named
``sgd<pid>x<n>-...`` after the creating process and swept when that process is gone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lab import (
    netlab,  # namespaces, processes, polling
    sshd,  # the hosts' SSH servers
)

LAB_DIR = Path(netlab.__file__).resolve().parent

NAME_PREFIX = "sgd"
NAMESPACE_PATTERN = re.compile(rf"^{NAME_PREFIX}(\d+)x(\d+)-(ctl|net|h\d+)$")
TMPDIR_PATTERN = re.compile(rf"^{NAME_PREFIX}(\d+)x(\d+)-")
CONTROLLER_IPV4 = "192.0.2.1"
PEER_IPV4 = "198.51.100.1"  # the 6to4 peer, also every gateway's relay
PEER_IPV6 = "2002:c633:6401::1"  # RFC 3056 §2: 2002:<198.51.100.1>::1, what health gates ping
SSHD = sshd.SSHD
REQUIRED_PROGRAMS = ("ip", "ping", "curl", "ss", "ssh", "ssh-keygen", "bird", "birdc")

_fleet_numbers = itertools.count(1)
STAGE_SECONDS: dict[str, float] = {}  # how long each rollout stage took, for the summary


NAT64_CLIENTS = "2001:db8:64::/64"


def nat64_client6(number: int) -> str:
    """The NAT64 host's own IPv6 address, inside ``NAT64_CLIENTS``."""
    return f"2001:db8:64::{10 + number}"


def nat64_pool4(number: int) -> str:
    """The NAT64 host's pool4 address: 203.0.113.1N."""
    return f"203.0.113.{10 + number}"


def host_ipv4(number: int) -> str:
    """192.0.2.11, .12, ... for hosts 1, 2, ..."""
    return f"192.0.2.{10 + number}"


def gateway_address(number: int) -> str:
    """The 6to4 gateway address of host ``number``: 2002:<its IPv4>::1 (RFC 3056 §2)."""
    packed = ipaddress.IPv4Address(host_ipv4(number)).packed
    return str(ipaddress.IPv6Address(b"\x20\x02" + packed + bytes(9) + b"\x01"))


def missing_requirements() -> list[str]:
    """Why a fleet cannot be built here (root, TUN, programs, sshd, ansible-playbook)."""
    missing = netlab.missing_requirements()
    missing = [m for m in missing if "'dig'" not in m and "'dnsmasq'" not in m]
    missing += [f"program {p!r} not on PATH" for p in REQUIRED_PROGRAMS[4:] if not shutil.which(p)]
    if not Path(SSHD).exists():
        missing.append(f"{SSHD} is missing (Debian package openssh-server)")
    if not (Path(sys.executable).parent / "ansible-playbook").exists() \
            and not shutil.which("ansible-playbook"):
        missing.append("ansible-playbook is missing (pip install -e '.[test]' brings "
                       "ansible-core)")
    return missing


def sweep_leftovers() -> list[str]:
    """Remove namespaces and temp dirs of earlier fleet runs whose process is gone."""
    swept = []
    for namespace in netlab.list_namespaces():
        match = NAMESPACE_PATTERN.match(namespace)
        if match and not netlab.pid_alive(int(match.group(1))):
            netlab.delete_namespace(namespace)
            swept.append(namespace)
    for entry in Path(tempfile.gettempdir()).iterdir():
        match = TMPDIR_PATTERN.match(entry.name)
        if match and entry.is_dir() and not netlab.pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            swept.append(str(entry))
    return swept


@contextlib.contextmanager
def open_fleet(count: int = 4) -> Iterator[Fleet]:
    """A started fleet; everything it made is gone afterwards, also when starting failed."""
    fleet = Fleet(count)
    with fleet.cleanup:
        fleet.start()
        yield fleet


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a CI timeout) raises KeyboardInterrupt meanwhile, so finalizers still run."""
    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Fleet:
    """Controller, ``count`` SSH hosts and the IPv6 side (use ``open_fleet``).

    Every resource registers its cleanup on ``self.cleanup`` the moment it exists, so a failure
    half-way still removes everything; deleting a namespace kills (by PID) whatever still runs
    in it, which includes gateways, supervisors and SSH master connections Ansible started.
    """

    def __init__(self, count: int = 4) -> None:
        self.count = count
        self.nat64_host = count  # the last host is also a NAT64
        self.tag = f"{NAME_PREFIX}{os.getpid()}x{next(_fleet_numbers)}"
        self.ctl_ns = f"{self.tag}-ctl"
        self.net_ns = f"{self.tag}-net"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        # Each host's run_dir is in here: the gateway user ("nobody") must reach it, as it
        # reaches /run/sixgate on a real host (the SSH key file itself stays 0600).
        self.tmp.chmod(0o755)
        self.key = self.tmp / "id_ed25519"
        self.known_hosts = self.tmp / "known_hosts"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.cleanup = contextlib.ExitStack()
        self.cleanup.callback(shutil.rmtree, self.tmp, ignore_errors=True)

    def host_ns(self, number: int) -> str:
        return f"{self.tag}-h{number}"

    def root(self, number: int) -> Path:
        """Host ``number``'s install root (its /opt, /etc, /run, /var below it)."""
        return self.tmp / f"h{number}" / "root"

    # -- lifecycle

    def start(self) -> None:
        self.create_network()
        self.start_tunnel_peer()
        self.make_keys()
        for number in range(1, self.count + 1):
            self.start_sshd(number)
        for number in range(1, self.count + 1):
            self.wait_sshd(number)

    # -- network

    def ip(self, namespace: str, *args: str) -> None:
        netlab.run(["ip", "-n", namespace, *args])

    def add_namespace(self, namespace: str, ipv6: bool) -> None:
        netlab.run(["ip", "netns", "add", namespace])
        self.cleanup.callback(netlab.delete_namespace, namespace)
        value = "0" if ipv6 else "1"
        netlab.run(netlab.in_ns(namespace, ["sysctl", "-q", "-w",
                                            f"net.ipv6.conf.all.disable_ipv6={value}",
                                            f"net.ipv6.conf.default.disable_ipv6={value}"]))
        self.ip(namespace, "link", "set", "lo", "up")

    def plug(self, namespace: str, port: str, cidr: str) -> None:
        """A veth from bridge port ``port`` (controller side) to ``eth0`` in ``namespace``."""
        self.ip(self.ctl_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", namespace)
        self.ip(self.ctl_ns, "link", "set", port, "master", "br0", "up")
        self.ip(namespace, "addr", "add", cidr, "dev", "eth0")
        self.ip(namespace, "link", "set", "eth0", "up")

    def create_network(self) -> None:
        self.add_namespace(self.ctl_ns, ipv6=False)
        self.ip(self.ctl_ns, "link", "add", "br0", "type", "bridge")
        self.ip(self.ctl_ns, "addr", "add", f"{CONTROLLER_IPV4}/24", "dev", "br0")
        self.ip(self.ctl_ns, "link", "set", "br0", "up")
        self.add_namespace(self.net_ns, ipv6=True)
        self.plug(self.net_ns, "net", f"{PEER_IPV4}/24")
        self.ip(self.net_ns, "route", "add", "192.0.2.0/24", "dev", "eth0", "src", PEER_IPV4)
        for number in range(1, self.count + 1):
            namespace = self.host_ns(number)
            nat64 = number == self.nat64_host
            # The gateway is the host's IPv6 stack; the NAT64 host's kernel is its client.
            self.add_namespace(namespace, ipv6=nat64)
            self.plug(namespace, f"h{number}", f"{host_ipv4(number)}/24")
            self.ip(namespace, "route", "add", "198.51.100.0/24", "dev", "eth0")
            if nat64:
                self.ip(namespace, "addr", "add", f"{nat64_client6(number)}/64", "dev", "eth0",
                        "nodad")
                self.ip(self.net_ns, "route", "add", nat64_pool4(number), "via",
                        host_ipv4(number))
            self.root(number).mkdir(parents=True)

    def start_tunnel_peer(self) -> None:
        """tests/lab/tunnel_peer.py in 6to4 mode: 2002::/16 leaves through it, encapsulated to
        the IPv4 address each 2002:V4ADDR::/48 embeds."""
        ready = self.tmp / "tunnel_peer.ready"
        self.spawn("tunnel_peer", self.net_ns, [
            sys.executable, str(LAB_DIR / "tunnel_peer.py"), "--tun", "tun6", "--mode", "6to4",
            "--local", PEER_IPV4, "--ready-file", str(ready)])
        netlab.wait_until(lambda: ready.exists() or not self.alive("tunnel_peer"), timeout=15,
                          what="tunnel_peer.py ready file")
        if not self.alive("tunnel_peer"):
            raise netlab.LabError(f"tunnel_peer.py died:\n{self.log('tunnel_peer')}")
        self.ip(self.net_ns, "link", "set", "tun6", "mtu", str(netlab.TUNNEL_MTU), "up")
        self.ip(self.net_ns, "addr", "add", f"{PEER_IPV6}/48", "dev", "tun6", "nodad")
        self.ip(self.net_ns, "route", "add", "2002::/16", "dev", "tun6")

    # -- ssh

    def make_keys(self) -> None:
        self.key = sshd.client_key(self.tmp)
        lines = []
        for number in range(1, self.count + 1):
            _, line = sshd.server_files(self.tmp / f"h{number}", host_ipv4(number), self.key)
            lines.append(line)
        self.known_hosts.write_text("".join(lines))

    def start_sshd(self, number: int) -> None:
        self.spawn(f"sshd-h{number}", self.host_ns(number),
                   sshd.sshd_argv(self.tmp / f"h{number}" / "sshd_config"))

    def wait_sshd(self, number: int) -> None:
        key = f"sshd-h{number}"

        def listening() -> bool:
            if not self.alive(key):
                raise netlab.LabError(f"sshd of h{number} died:\n{self.log(key)}")
            out = self.exec_in(self.host_ns(number), ["ss", "-Hltn", "sport = :22"]).stdout
            return bool(out.strip())

        netlab.wait_until(listening, timeout=15, what=f"sshd of h{number} listening")

    # -- processes

    def spawn(self, key: str, namespace: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with (self.tmp / f"{key}.log").open("wb") as log:
            process = subprocess.Popen(netlab.in_ns(namespace, argv), stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT, env=env)
        self.processes[key] = process
        self.cleanup.callback(netlab.stop_process, process, 5)
        return process

    def alive(self, key: str) -> bool:
        process = self.processes.get(key)
        return process is not None and process.poll() is None

    def log(self, key: str) -> str:
        return netlab.tail(self.tmp / f"{key}.log")

    def exec_in(self, namespace: str, argv: Sequence[str], *, timeout: float = 30,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(netlab.in_ns(namespace, argv), capture_output=True, text=True,
                                  timeout=timeout, check=False, env=env)
        except subprocess.TimeoutExpired as exc:
            raise netlab.LabError(f"timed out after {timeout}s: {' '.join(argv)}") from exc

    def host(self, number: int, argv: Sequence[str], **kwargs: Any
             ) -> subprocess.CompletedProcess[str]:
        return self.exec_in(self.host_ns(number), argv, **kwargs)

    def deploy(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``sixgate deploy <args>`` in the controller namespace (temp files in the fleet's)."""
        tmp = self.tmp / "controller-tmp"
        tmp.mkdir(exist_ok=True)
        env = dict(os.environ, TMPDIR=str(tmp), ANSIBLE_NOCOLOR="1", PYTHONUNBUFFERED="1")
        return self.exec_in(self.ctl_ns, [*netlab.sixgate_command(), "deploy", *args],
                            timeout=timeout, env=env)

    def ping6(self, number: int, count: int = 2) -> int:
        """Real ``ping -6`` from the IPv6 side to host ``number``'s gateway: replies received."""
        done = self.exec_in(self.net_ns, ["ping", "-6", "-n", "-c", str(count), "-i", "0.2",
                                          "-W", "2", gateway_address(number)], timeout=30)
        return netlab.ping_received(done.stdout)

    def ping_nat64(self, number: int, count: int = 2) -> int:
        """Real ``ping -6`` from the NAT64 host's kernel to the IPv4 peer through its NAT64
        (RFC 6052: 64:ff9b::198.51.100.1): replies received."""
        done = self.host(number, ["ping", "-6", "-n", "-c", str(count), "-i", "0.2", "-W", "2",
                                  f"64:ff9b::{PEER_IPV4}"], timeout=30)
        return netlab.ping_received(done.stdout)

    def ssh_ok(self, number: int) -> bool:
        """The controller reaches host ``number`` over SSH with the fleet's key and known_hosts."""
        done = self.exec_in(self.ctl_ns, [
            "ssh", "-i", str(self.key), "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
            f"root@{host_ipv4(number)}", "true"], timeout=20)
        return done.returncode == 0


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    """Poll ``predicate`` (never sleep for readiness)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.2)
