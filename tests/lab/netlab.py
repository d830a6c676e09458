"""The real-network test lab: two namespaces, a userspace tunnel peer, real services, real sixgate.

```
 peer namespace (kernel IPv6 on)                      gateway namespace (kernel IPv6 OFF)
 ping -6 / curl -6 / dig / probe.py                   sixgate run --config <tmp>/sixgate.toml
        │ IPv6                                          │ IPv4 (translated)
      tun6 (MTU 1480) <-> tunnel_peer.py                127.0.0.1:8080 python -m http.server
        │ IPv4 proto 41, 198.51.100.1                   127.0.0.1:5353 dnsmasq
      veth0 ───────────────────────────────────────── veth0 192.0.2.10
      198.51.100.1/24, 198.51.100.2/24, 203.0.113.1/24
```

Safety: traffic stays inside the two namespaces; only documentation addresses are used
(192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32 and the 2002::/16 prefixes derived
from them). The veth pair is created directly inside the namespaces, so no link ever appears in
the host namespace. Namespaces are named ``sgl<pid>x<n>-gw|peer`` after the creating process;
``sweep_leftovers`` removes those of processes that are gone. Processes are stopped by PID only
(what still lives in one of our namespaces when it is deleted is killed by PID too).

Readiness is always polled (a ready file, a listening port, ``sixgate flows`` exiting 0), never
slept for. Nothing here imports sixgate's ``workers``/``coordinator`` packages: the gateway is
driven only through its command line, as an operator would.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import itertools
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAB_DIR = Path(__file__).resolve().parent
PROGRAMS = LAB_DIR / "programs"  # what the tests run inside the namespaces
REPO_ROOT = LAB_DIR.parents[1]
NAME_PREFIX = "sgl"
NAMESPACE_PATTERN = re.compile(rf"^{NAME_PREFIX}(\d+)x(\d+)-([a-z0-9]+)$")
TMPDIR_PATTERN = re.compile(rf"^{NAME_PREFIX}(\d+)(x\d+|-files)-")

GATEWAY_IPV4 = "192.0.2.10"
PEER_IPV4 = "198.51.100.1"
PEER_OTHER_IPV4 = "198.51.100.2"  # on the peer, but not the configured 6in4 remote
PEER_FAR_IPV4 = "203.0.113.1"  # embedded in the spoofed 6to4 source 2002:cb00:7101::1
RELAY_IPV4 = "192.88.99.1"  # RFC 3068 anycast (deprecated, RFC 7526); no route to it here
PEER_TUN = "tun6"
TUNNEL_MTU = 1480  # 1500-byte veth minus the 20-byte outer IPv4 header (RFC 4213 §3.2)
HTTP_PORT = 8080
DNS_PORT = 5353
UNFORWARDED_TCP_PORT = 81
UNFORWARDED_UDP_PORT = 54
# Forwarded to loopback ports where nothing listens: the service is down, not unconfigured.
CLOSED_UDP_PORT = 5400
CLOSED_UDP_TARGET_PORT = 5499
CLOSED_TCP_PORT = 8100
CLOSED_TCP_TARGET_PORT = 8199
# Forwarded to a service on another IPv4 host: 203.0.113.1 in the peer namespace (only started
# by the tests that need it; that host must route the gateway's pool back to 192.0.2.10).
FAR_HTTP_PORT = 8181
# Forwarded to the HTTP service for one prefix the lab's client is not in ([[forward]] from).
ALLOWLIST_TCP_PORT = 8282
ALLOWLIST_FROM = "2001:db8:eeee::/48"

REQUIRED_PROGRAMS = ("ip", "ping", "dig", "dnsmasq", "curl", "ss", "sysctl",
                     # the NAT64 lab's resolver, clients and server (tests/lab/nat64lab.py)
                     "unbound", "tnat64", "ssh", "ssh-keygen", "sshd")

SMALL_NAME = "small.txt"
SMALL_TEXT = "sixgate lab: a small file served over IPv4 loopback, fetched over IPv6\n"
DNS_SMALL_NAME = "small.lab"
DNS_SMALL_A = "192.0.2.53"
DNS_BIG_NAME = "big.lab"
TXT_STRING_BYTES = 250  # a TXT character-string holds at most 255 bytes (RFC 1035 §3.3)
TXT_STRINGS = 16  # 16 * 250 = 4000 bytes: the UDP answer is far larger than the tunnel MTU
DNS_EDNS_MAX = 8192  # dnsmasq 2.90 defaults to 1232 and would set TC on the big answer


class LabError(RuntimeError):
    """The lab itself could not be built or driven (not a gateway test failure)."""


@dataclass(frozen=True)
class TunnelPlan:
    """Addressing of one tunnel mode, for both ends."""

    mode: str
    gateway_address: str  # the gateway's IPv6 address clients talk to
    peer_address: str  # the peer namespace's IPv6 source address
    peer_cidr: str  # configured on the peer's TUN
    peer_route: str  # routed into the peer's TUN
    tunnel_toml: str  # the [tunnel] table of the gateway config
    client_prefix: str  # the peer's /48: extra client addresses come from its /64s

    @property
    def router_address(self) -> str:
        """A router in the peer's /48 (for Packet Too Big from "the client's path")."""
        return f"{self.client_prefix}:ffff::fe"

    def extra_clients(self, count: int = 16) -> list[str]:
        """Client addresses in ``count`` further /64s of the peer's /48, one per /64.

        sixgate shards by source /64 (workers/engine/wire.py fanout_index), so clients in many
        /64s are what spreads traffic over several workers.
        """
        return [f"{self.client_prefix}:{n:x}::1" for n in range(1, count + 1)]


PLANS: dict[str, TunnelPlan] = {
    # RFC 3056 §2: 2002:V4ADDR::/48; 192.0.2.10 = c000:020a, 198.51.100.1 = c633:6401.
    "6to4": TunnelPlan(
        mode="6to4",
        gateway_address="2002:c000:20a::1",
        peer_address="2002:c633:6401::1",
        peer_cidr="2002:c633:6401::1/48",
        peer_route="2002::/16",
        client_prefix="2002:c633:6401",
        tunnel_toml=(
            "[tunnel]\n"
            'mode = "6to4"\n'
            f'local_ipv4 = "{GATEWAY_IPV4}"\n'
            f'relay_ipv4 = "{RELAY_IPV4}"\n'
            'addresses = ["2002:c000:20a::1"]\n'
            f"mtu = {TUNNEL_MTU}\n"
        ),
    ),
    # RFC 4213: a configured tunnel to a broker at 198.51.100.1 routing 2001:db8:1::/64 to us.
    "6in4": TunnelPlan(
        mode="6in4",
        gateway_address="2001:db8:1::1",
        peer_address="2001:db8:ffff::1",
        peer_cidr="2001:db8:ffff::1/64",
        peer_route="2001:db8:1::/64",
        client_prefix="2001:db8:ffff",
        tunnel_toml=(
            "[tunnel]\n"
            'mode = "6in4"\n'
            f'local_ipv4 = "{GATEWAY_IPV4}"\n'
            f'remote_ipv4 = "{PEER_IPV4}"\n'
            'prefix = "2001:db8:1::/64"\n'
            'addresses = ["2001:db8:1::1"]\n'
            f"mtu = {TUNNEL_MTU}\n"
        ),
    ),
    # RFC 5969: an ISP's 6rd domain 2001:db8:8000::/33 whose CEs share the first 5 bits of
    # their IPv4 addresses (192.0.2.10 and 198.51.100.1 both start 11000): a CE's delegated
    # prefix is the 6rd prefix and its address's other 27 bits, a /60. 192.0.2.10's 27 bits
    # are 0x000020a: 2001:db8:8000:20a0::/60; 198.51.100.1's are 0x6336401:
    # 2001:db8:e336:4010::/60. The peer is a CE and the border relay; its extra clients are
    # outside the 6rd prefix (2001:db8:1::/48), so they come through the relay.
    "6rd": TunnelPlan(
        mode="6rd",
        gateway_address="2001:db8:8000:20a0::1",
        peer_address="2001:db8:e336:4010::1",
        peer_cidr="2001:db8:e336:4010::1/60",
        peer_route="2001:db8:8000::/33",
        client_prefix="2001:db8:1",
        tunnel_toml=(
            "[tunnel]\n"
            'mode = "6rd"\n'
            f'local_ipv4 = "{GATEWAY_IPV4}"\n'
            'prefix = "2001:db8:8000::/33"\n'
            "ipv4_mask_len = 5\n"
            f'border_relay_ipv4 = "{PEER_IPV4}"\n'
            'addresses = ["2001:db8:8000:20a0::1"]\n'
            f"mtu = {TUNNEL_MTU}\n"
        ),
    ),
}

FORWARD_TOML = (
    "[[forward]]\n"
    'proto = "tcp"\n'
    "port = 80\n"
    f'to = "127.0.0.1:{HTTP_PORT}"\n'
    "\n"
    "[[forward]]\n"
    'proto = "udp"\n'
    "port = 53\n"
    f'to = "127.0.0.1:{DNS_PORT}"\n'
    "\n"
    "[[forward]]\n"
    'proto = "udp"\n'
    f"port = {CLOSED_UDP_PORT}\n"
    f'to = "127.0.0.1:{CLOSED_UDP_TARGET_PORT}"\n'
    "\n"
    "[[forward]]\n"
    'proto = "tcp"\n'
    f"port = {CLOSED_TCP_PORT}\n"
    f'to = "127.0.0.1:{CLOSED_TCP_TARGET_PORT}"\n'
    "\n"
    "[[forward]]\n"
    'proto = "tcp"\n'
    f"port = {FAR_HTTP_PORT}\n"
    f'to = "{PEER_FAR_IPV4}:{FAR_HTTP_PORT}"\n'
    "\n"
    "[[forward]]\n"
    'proto = "tcp"\n'
    f"port = {ALLOWLIST_TCP_PORT}\n"
    f'to = "127.0.0.1:{HTTP_PORT}"\n'
    f'from = ["{ALLOWLIST_FROM}"]\n'
)


# --------------------------------------------------------------------------- requirements


def io_uring_refusal() -> str | None:
    """Why this host refuses io_uring, or None. Only a refusal counts (EPERM: the
    kernel.io_uring_disabled sysctl or a seccomp policy; ENOSYS: no io_uring in the kernel);
    any other error is a bug of workers/uring.py and raises."""
    from sixgate.workers.uring import UringWriter

    fd = os.open("/dev/null", os.O_WRONLY)
    try:
        UringWriter.open(fd, entries=2, slot=16).close()
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOSYS):
            raise
        return f"io_uring is refused on this host ({exc}): the write(2) path is what runs"
    finally:
        os.close(fd)
    return None


def missing_requirements() -> list[str]:
    """Why the lab cannot run on this machine; empty when it can."""
    missing = []
    if os.geteuid() != 0:
        missing.append("not root (network namespaces and TUN need CAP_NET_ADMIN)")
    if not Path("/dev/net/tun").exists():
        missing.append("/dev/net/tun is missing")
    missing += [f"program {p!r} not on PATH" for p in REQUIRED_PROGRAMS if not shutil.which(p)]
    return missing


def sixgate_command() -> list[str]:
    """$SIXGATE_LAB_COMMAND, else the ``sixgate`` script beside this interpreter, else ``-m``."""
    override = os.environ.get("SIXGATE_LAB_COMMAND")
    if override:
        return shlex.split(override)
    script = Path(sys.executable).parent / "sixgate"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "sixgate.coordinator.cli"]


# --------------------------------------------------------------------------- small helpers


def run(argv: Sequence[str], *, timeout: float = 30, check: bool = True,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, text output captured; LabError with the end of its stdout and its
    stderr when check fails."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              input=input, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
    if check and done.returncode != 0:
        raise LabError(f"exit {done.returncode}: {' '.join(argv)}\n{done.stdout[-2000:]}"
                       f"{done.stderr.strip()}")
    return done


def in_ns(namespace: str, argv: Sequence[str]) -> list[str]:
    """argv to run inside ``namespace`` (``ip netns exec`` execs it: same PID)."""
    return ["ip", "netns", "exec", namespace, *argv]


def wait_until(predicate: Callable[[], Any], *, timeout: float,
               what: str | Callable[[], str], interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; LabError after ``timeout``
    saying what was awaited (a callable ``what`` is asked then, to show the latest logs)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            awaited = what if isinstance(what, str) else what()
            raise LabError(f"timed out after {timeout:.0f} s waiting for {awaited}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True while a process with this PID exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process(process: subprocess.Popen[Any], timeout: float = 10) -> int:
    """SIGTERM by PID, wait ``timeout`` s, then SIGKILL; returns the exit code."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def process_state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent PID) from /proc/<pid>/stat; None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may contain spaces
    return fields[0], int(fields[1])


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie nobody reaped yet counts as exited)."""
    state = process_state(pid)
    return state is None or state[0] in ("Z", "X")


def process_cmdline(pid: int) -> list[str]:
    """argv of a live process (empty when it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def tail(path: Path, max_bytes: int = 6000) -> str:
    """The end of a log file (or a note that it is absent)."""
    try:
        data = path.read_bytes()
    except OSError:
        return f"<{path} not readable>"
    text = data[-max_bytes:].decode(errors="replace")
    return ("[...]\n" if len(data) > max_bytes else "") + text


# --------------------------------------------------------------------------- namespaces


def list_namespaces() -> list[str]:
    """Names of all named network namespaces."""
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(namespace: str) -> list[int]:
    """PIDs of the processes living in ``namespace``."""
    out = run(["ip", "netns", "pids", namespace], check=False).stdout
    return [int(word) for word in out.split() if word.isdigit()]


def delete_namespace(namespace: str) -> None:
    """Kill (by PID) what still lives in one of our namespaces, then delete it."""
    for pid in namespace_pids(namespace):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    run(["ip", "netns", "del", namespace], check=False)


def sweep_leftovers() -> list[str]:
    """Remove namespaces and temp dirs of earlier lab runs whose process is gone."""
    swept = []
    for namespace in list_namespaces():
        match = NAMESPACE_PATTERN.match(namespace)
        if match and not pid_alive(int(match.group(1))):
            delete_namespace(namespace)
            swept.append(namespace)
    for entry in Path(tempfile.gettempdir()).iterdir():
        match = TMPDIR_PATTERN.match(entry.name)
        if match and entry.is_dir() and not pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            swept.append(str(entry))
    return swept


# --------------------------------------------------------------------------- served files


@dataclass(frozen=True)
class ServedFile:
    """A file the HTTP service serves, with what a client must receive."""

    name: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class ServedFiles:
    """The session's document root."""

    directory: Path
    big: ServedFile
    mid: ServedFile


def http_server_argv(address: str, port: int, directory: Path) -> list[str]:
    """tests/lab/programs/http_server.py: http.server with a listen backlog of 1024."""
    return [sys.executable, str(PROGRAMS / "http_server.py"), address, str(port),
            str(directory)]


def write_random_file(path: Path, size_bytes: int) -> ServedFile:
    """Write ``size_bytes`` random bytes; return their digest."""
    digest = hashlib.sha256()
    chunk_bytes = 1 << 20
    with path.open("wb") as out:
        for offset in range(0, size_bytes, chunk_bytes):
            chunk = os.urandom(min(chunk_bytes, size_bytes - offset))
            digest.update(chunk)
            out.write(chunk)
    return ServedFile(path.name, size_bytes, digest.hexdigest())


def make_served_files(big_mb: int = 100, mid_mb: int = 10) -> ServedFiles:
    """Create the document root once per session (remove it with ``shutil.rmtree``)."""
    directory = Path(tempfile.mkdtemp(prefix=f"{NAME_PREFIX}{os.getpid()}-files-"))
    (directory / SMALL_NAME).write_text(SMALL_TEXT)
    big = write_random_file(directory / "big.bin", big_mb << 20)
    mid = write_random_file(directory / "mid.bin", mid_mb << 20)
    return ServedFiles(directory, big, mid)


def big_txt_strings() -> list[str]:
    """The TXT record's character-strings: distinct, letters only (dnsmasq splits on commas)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    return [(f"part{i:02d}" + alphabet * 10)[:TXT_STRING_BYTES] for i in range(TXT_STRINGS)]


# --------------------------------------------------------------------------- the lab

_lab_numbers = itertools.count(1)


def base36(value: int) -> str:
    """``value`` in digits and lower-case letters."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        value, rest = divmod(value, 36)
        text = digits[rest] + text
        if not value:
            return text


def next_tag() -> str:
    """A new ``sgl<pid>x<n>`` prefix for a lab's namespaces and temp dir (swept by
    ``sweep_leftovers`` once this process is gone)."""
    return f"{NAME_PREFIX}{os.getpid()}x{next(_lab_numbers)}"


def gateway_name(pid: int, number: int) -> str:
    """The gateway's ``name`` (its TUN devices are ``<name><worker>``): at most 8 characters
    so that ``<name><worker>`` fits IFNAMSIZ; pid and lab number keep it unique per run."""
    return f"sg{base36(pid)}{base36(number)}"[:8]


class Lab:
    """Namespaces, veth, tunnel peer, services and (optionally) the real gateway.

    Use as a context manager; every resource registers its own cleanup the moment it exists,
    so a failure half-way still removes everything.
    """

    def __init__(self, mode: str, workers: int, files: ServedFiles, *,
                 with_gateway: bool = True, path_mtu: int | None = None,
                 fanout: str = "coordinator", tun_writes: str = "io_uring",
                 gateway_wrapper: Sequence[str] = (), gateway_toml: str = "") -> None:
        self.path_mtu = path_mtu
        self.gateway_toml = gateway_toml  # more [gateway] lines
        self.fanout = fanout
        self.tun_writes = tun_writes
        self.gateway_wrapper = list(gateway_wrapper)  # argv the gateway runs under
        self.plan = PLANS[mode]
        self.mode = mode
        self.workers = workers
        self.files = files
        self.with_gateway = with_gateway
        number = next(_lab_numbers)
        tag = f"{NAME_PREFIX}{os.getpid()}x{number}"
        self.gw_ns = f"{tag}-gw"
        self.peer_ns = f"{tag}-peer"
        self.name = gateway_name(os.getpid(), number)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
        # The gateway's run_dir is in here: its user ("nobody") must be able to reach it, as
        # it reaches /run/sixgate in production.
        self.tmp.chmod(0o755)
        self.config_path = self.tmp / "sixgate.toml"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.gateway_exit_code: int | None = None
        self._cleanup = contextlib.ExitStack()
        self._cleanup.callback(shutil.rmtree, self.tmp, ignore_errors=True)

    # -- lifecycle

    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Build everything, in dependency order."""
        self.create_namespaces()
        self.start_tunnel_peer()
        self.start_services()
        self.write_config()
        if self.with_gateway:
            self.start_gateway()

    def close(self) -> None:
        """Stop what we started and delete what we created (idempotent)."""
        self._cleanup.close()

    # -- namespaces and links

    def create_namespaces(self) -> None:
        """Two namespaces joined by one veth pair; IPv6 off in the gateway's."""
        for namespace in (self.gw_ns, self.peer_ns):
            run(["ip", "netns", "add", namespace])
            self._cleanup.callback(delete_namespace, namespace)
        self.sysctl(self.gw_ns, "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1")
        self.sysctl(self.peer_ns, "net.ipv6.conf.all.disable_ipv6=0",
                    "net.ipv6.conf.default.disable_ipv6=0")
        self.ip(self.gw_ns, "link", "set", "lo", "up")
        self.ip(self.peer_ns, "link", "set", "lo", "up")
        # Created inside the namespaces: the pair never exists in the host namespace.
        self.ip(self.gw_ns, "link", "add", "veth0", "type", "veth",
                "peer", "name", "veth0", "netns", self.peer_ns)
        self.ip(self.gw_ns, "addr", "add", f"{GATEWAY_IPV4}/24", "dev", "veth0")
        self.ip(self.gw_ns, "link", "set", "veth0", "up")
        for prefix in ("198.51.100.0/24", "203.0.113.0/24"):
            self.ip(self.gw_ns, "route", "add", prefix, "dev", "veth0")
        for address in (PEER_IPV4, PEER_OTHER_IPV4, PEER_FAR_IPV4):
            self.ip(self.peer_ns, "addr", "add", f"{address}/24", "dev", "veth0")
        self.ip(self.peer_ns, "link", "set", "veth0", "up")
        self.ip(self.peer_ns, "route", "add", "192.0.2.0/24", "dev", "veth0", "src", PEER_IPV4)

    def add_namespace(self, namespace: str) -> None:
        """A further namespace of this lab (a test's extra peer), deleted at ``close``."""
        run(["ip", "netns", "add", namespace])
        self._cleanup.callback(delete_namespace, namespace)

    def ip(self, namespace: str, *args: str) -> None:
        """``ip -n namespace ...``, checked."""
        run(["ip", "-n", namespace, *args])

    def sysctl(self, namespace: str, *settings: str) -> None:
        """Set sysctls inside ``namespace``."""
        run(in_ns(namespace, ["sysctl", "-q", "-w", *settings]))

    def links(self, namespace: str) -> list[dict[str, Any]]:
        """``ip -d -j link`` of a namespace."""
        out = run(["ip", "-d", "-j", "-n", namespace, "link", "show"]).stdout
        return list(json.loads(out or "[]"))

    def gateway_links(self) -> list[str]:
        """Links in the gateway namespace named with the gateway's configured ``name``."""
        return [f"{link['ifname']} ({link.get('linkinfo', {}).get('info_kind', '?')})"
                for link in self.links(self.gw_ns) if link["ifname"].startswith(self.name)]

    # -- processes

    def spawn(self, key: str, namespace: str, argv: Sequence[str], *,
              stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
        """Start a long-running process in ``namespace``, logs in <tmp>/<key>.out|.err."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with (self.tmp / f"{key}.out").open("wb") as out, \
                (self.tmp / f"{key}.err").open("wb") as err:
            process = subprocess.Popen(in_ns(namespace, argv), stdin=stdin, stdout=out,
                                       stderr=err, cwd=REPO_ROOT, env=env)
        self.processes[key] = process
        self._cleanup.callback(stop_process, process, 5)
        return process

    def log_path(self, key: str, stream: str = "err") -> Path:
        """Where a spawned process's stdout ("out") or stderr ("err") goes."""
        return self.tmp / f"{key}.{stream}"

    def alive(self, key: str) -> bool:
        """True while the named process runs."""
        process = self.processes.get(key)
        return process is not None and process.poll() is None

    def exec_in(self, namespace: str, argv: Sequence[str], *, timeout: float = 30,
                check: bool = False, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a short command inside ``namespace``."""
        return run(in_ns(namespace, argv), timeout=timeout, check=check, input=input)

    def peer(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a command in the peer (IPv6 client) namespace."""
        return self.exec_in(self.peer_ns, argv, **kwargs)

    def gw(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a command in the gateway namespace."""
        return self.exec_in(self.gw_ns, argv, **kwargs)

    def probe(self, *args: str, timeout: float = 60) -> dict[str, Any]:
        """Run ``probe.py`` in the peer namespace; its one line of JSON output."""
        done = self.peer([sys.executable, str(LAB_DIR / "probe.py"), *args], timeout=timeout)
        if done.returncode != 0:
            raise LabError(f"probe {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
        return dict(json.loads(done.stdout))

    # -- tunnel peer

    def start_tunnel_peer(self) -> None:
        """Start tunnel_peer.py on tun6 in the peer namespace; address and route the TUN."""
        ready = self.tmp / "tunnel_peer.ready"
        argv = [sys.executable, str(LAB_DIR / "tunnel_peer.py"), "--tun", PEER_TUN,
                "--mode", self.mode, "--local", PEER_IPV4, "--ready-file", str(ready)]
        if self.mode == "6in4":
            argv += ["--remote", GATEWAY_IPV4, "--remote-file", str(self.tmp / "remote")]
        if self.mode == "6rd":
            argv += ["--sixrd-prefix", "2001:db8:8000::/33", "--ipv4-mask-len", "5"]
        if self.path_mtu:
            argv += ["--path-mtu", str(self.path_mtu), "--router", self.plan.router_address]
        self.spawn("tunnel_peer", self.peer_ns, argv)
        wait_until(lambda: ready.exists() or not self.alive("tunnel_peer"), timeout=15,
                   what="tunnel_peer.py ready file")
        if not self.alive("tunnel_peer"):
            raise LabError(f"tunnel_peer.py died:\n{tail(self.log_path('tunnel_peer'))}")
        self.ip(self.peer_ns, "link", "set", PEER_TUN, "mtu", str(TUNNEL_MTU), "up")
        self.ip(self.peer_ns, "addr", "add", self.plan.peer_cidr, "dev", PEER_TUN, "nodad")
        self.ip(self.peer_ns, "route", "add", self.plan.peer_route, "dev", PEER_TUN)
        if self.mode == "6in4":
            # RFC 4213 §3.7: the broker's end has fe80::<its IPv4> (Linux sit configures it),
            # which the gateway probes (RFC 4213 §3.8, coordinator/liveness.py).
            link_local = ipaddress.IPv6Address(
                b"\xfe\x80" + bytes(10) + ipaddress.IPv4Address(PEER_IPV4).packed)
            self.ip(self.peer_ns, "addr", "add", f"{link_local}/64", "dev", PEER_TUN, "nodad")
        # Deprecated (preferred_lft 0, RFC 6724 rule 3): never chosen as a source address
        # by themselves, so ping/curl/dig keep using peer_address; probes bind them explicitly.
        batch = "".join(f"addr add {address}/64 dev {PEER_TUN} nodad preferred_lft 0\n"
                        for address in self.plan.extra_clients())
        run(["ip", "-n", self.peer_ns, "-batch", "-"], input=batch)

    # -- services

    def start_services(self) -> None:
        """http.server and dnsmasq on IPv4 loopback in the gateway namespace, checked directly."""
        self.spawn("http", self.gw_ns, http_server_argv("127.0.0.1", HTTP_PORT,
                                                        self.files.directory))
        self.spawn("dnsmasq", self.gw_ns, self.dnsmasq_argv())
        self.wait_listening("http", "-t", HTTP_PORT)
        self.wait_listening("dnsmasq", "-u", DNS_PORT)
        self.check_services_directly()

    def dnsmasq_argv(self) -> list[str]:
        """dnsmasq with a small A record and a TXT record whose answer exceeds the MTU."""
        return [
            "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
            "--listen-address=127.0.0.1", f"--port={DNS_PORT}", "--bind-interfaces",
            "--pid-file=", "--log-facility=-", f"--edns-packet-max={DNS_EDNS_MAX}",
            f"--host-record={DNS_SMALL_NAME},{DNS_SMALL_A}",
            f"--txt-record={DNS_BIG_NAME}," + ",".join(big_txt_strings()),
        ]

    def wait_listening(self, key: str, proto_flag: str, port: int) -> None:
        """Poll ``ss`` in the gateway namespace until ``port`` is bound."""
        def listening() -> bool:
            if not self.alive(key):
                raise LabError(f"{key} died:\n{tail(self.log_path(key))}")
            out = self.gw(["ss", "-Hln", proto_flag, f"sport = :{port}"]).stdout
            return bool(out.strip())

        wait_until(listening, timeout=15, what=f"{key} listening on port {port}")

    def check_services_directly(self) -> None:
        """The services answer over IPv4 loopback (so a later failure is the gateway's)."""
        body = self.gw(["curl", "-sS", "--max-time", "5",
                        f"http://127.0.0.1:{HTTP_PORT}/{SMALL_NAME}"]).stdout
        if body != SMALL_TEXT:
            raise LabError(f"http.server does not serve {SMALL_NAME}: {body!r}")
        answer = self.gw(["dig", "@127.0.0.1", "-p", str(DNS_PORT), "+short", "+tries=1",
                          "+time=3", DNS_SMALL_NAME, "A"]).stdout.strip()
        if answer != DNS_SMALL_A:
            raise LabError(f"dnsmasq does not answer {DNS_SMALL_NAME}: {answer!r}")

    # -- gateway

    def config_text(self) -> str:
        """The gateway's TOML configuration for this lab."""
        return (
            f"{self.plan.tunnel_toml}\n"
            "[gateway]\n"
            f"workers = {self.workers}\n"
            f'run_dir = "{self.tmp / "run"}"\n'
            f'name = "{self.name}"\n'
            f'fanout = "{self.fanout}"\n'
            f'tun_writes = "{self.tun_writes}"\n'
            f"{self.gateway_toml}"
            "\n"
            f"{FORWARD_TOML}"
        )

    def write_config(self) -> None:
        """Write the gateway config into the lab's temp dir."""
        self.config_path.write_text(self.config_text())

    def sixgate(self, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """``sixgate <args> --config <file>`` in the gateway namespace (not checked)."""
        return self.gw([*sixgate_command(), *args, "--config", str(self.config_path)],
                       timeout=timeout)

    def start_gateway(self, timeout: float = 30, key: str = "sixgate") -> None:
        """``sixgate run`` in the gateway namespace; ready once ``sixgate flows`` exits 0.

        ``key`` names the process and its logs; a second run under another key (after the
        first was killed) keeps the first run's logs. Only "sixgate" is what ``stop_gateway``
        stops; any other key is stopped by PID at ``close`` like every spawned process.
        """
        self.spawn(key, self.gw_ns, [*self.gateway_wrapper, *sixgate_command(), "run",
                                     "--config", str(self.config_path)])
        if key == "sixgate":
            self._cleanup.callback(self.stop_gateway)

        def ready() -> bool:
            if not self.alive(key):
                raise LabError(f"sixgate run exited {self.processes[key].returncode} "
                               f"before ready:\n{self.gateway_stderr(key)}")
            return self.sixgate("flows", "--json", timeout=10).returncode == 0

        wait_until(ready, timeout=timeout, what="`sixgate flows --json` to exit 0", interval=0.1)

    def stop_gateway(self, timeout: float = 10) -> int | None:
        """SIGTERM the gateway by PID (SIGKILL after ``timeout``); its exit code."""
        process = self.processes.get("sixgate")
        if process is None:
            return None
        if self.gateway_exit_code is None:
            self.gateway_exit_code = stop_process(process, timeout)
        return self.gateway_exit_code

    def gateway_stderr(self, key: str = "sixgate") -> str:
        """The tail of the gateway's stderr."""
        return tail(self.log_path(key))

    def flows(self) -> dict[str, Any]:
        """``sixgate flows --json``, parsed."""
        done = self.sixgate("flows", "--json")
        if done.returncode != 0:
            raise LabError(f"sixgate flows --json exited {done.returncode}:\n{done.stderr}")
        return dict(json.loads(done.stdout))

    # -- debugging aids

    def diagnostics(self) -> str:
        """Logs of every process, for a failure report."""
        parts = []
        for key in self.processes:
            for stream in ("err", "out"):
                text = tail(self.log_path(key, stream), 3000).strip()
                if text:
                    parts.append(f"----- {key} std{stream} -----\n{text}")
        return "\n".join(parts)


def drops(lab: Lab) -> dict[str, int]:
    """The gateway's drop counters (total over all processes) by reason name."""
    return {str(k): int(v) for k, v in lab.flows()["drops"].items()}


def events(lab: Lab) -> dict[str, int]:
    """Worker events summed over the workers (``sixgate flows --json``)."""
    total: dict[str, int] = {}
    for worker in lab.flows()["counters"]["workers"]:
        for name, count in worker.get("counters", {}).get("events", {}).items():
            total[name] = total.get(name, 0) + int(count)
    return total


def drops_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Reasons whose counter changed, with the change."""
    return {k: after.get(k, 0) - before.get(k, 0)
            for k in sorted(set(before) | set(after)) if after.get(k, 0) != before.get(k, 0)}


def wait_for_drops(lab: Lab, before: dict[str, int], reason: str, at_least: int,
                   timeout: float = 10) -> dict[str, int]:
    """Poll the counters until ``reason`` grew by ``at_least`` (or time out); the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        last = drops(lab)
        if last.get(reason, 0) - before.get(reason, 0) >= at_least:
            return last
        if time.monotonic() > deadline:
            return last
        time.sleep(0.2)


# --------------------------------------------------------------------------- real clients


def ping(lab: Lab, payload_bytes: int = 56, count: int = 3) -> subprocess.CompletedProcess[str]:
    """Real ``ping -6`` from the peer namespace to the gateway's address."""
    return lab.peer(["ping", "-6", "-n", "-c", str(count), "-i", "0.2", "-W", "3",
                     "-s", str(payload_bytes), lab.plan.gateway_address], timeout=30)


def ping_received(output: str) -> int:
    """Number of echo replies in ping's summary line."""
    match = re.search(r"(\d+) (?:packets )?received", output)
    return int(match.group(1)) if match else 0


def dig(lab: Lab, name: str, rtype: str, *options: str) -> subprocess.CompletedProcess[str]:
    """Real ``dig`` over UDP from the peer namespace to the gateway's port 53."""
    return lab.peer(["dig", "-6", f"@{lab.plan.gateway_address}", "-p", "53", "+tries=1",
                     "+time=3", *options, name, rtype], timeout=20)


# A DNS query for DNS_SMALL_NAME A (id 0x1234), as bytes on the wire (RFC 1035 §4.1).
SMALL_QUERY = bytes.fromhex("12340100000100000000000005736d616c6c036c61620000010001")


def fixed_port_queries(lab: Lab, sources: Sequence[str], server: str, port: int) -> int:
    """One DNS query for DNS_SMALL_NAME from each source address, each from UDP ``port`` (a
    client keeps its binding from one call to the next), in one process in the peer
    namespace; how many were answered."""
    done = lab.peer([sys.executable, "-c", (
        "import socket, sys\n"
        f"query = bytes.fromhex({SMALL_QUERY.hex()!r})\n"
        "answered = 0\n"
        f"for source in {list(sources)!r}:\n"
        "    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:\n"
        "        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"        s.bind((source, {port}))\n"
        "        s.settimeout(3)\n"
        f"        s.sendto(query, ({server!r}, 53))\n"
        "        try:\n"
        "            answered += s.recv(2048)[:2] == query[:2]\n"
        "        except OSError:\n"
        "            pass\n"
        "print(answered)\n")], timeout=120)
    if done.returncode != 0:
        raise LabError(f"the DNS queries failed: {done.stderr}")
    return int(done.stdout)


def dig_txt_strings(output: str) -> list[str]:
    """The character-strings of the TXT records in dig's answer section."""
    strings: list[str] = []
    for line in output.splitlines():
        fields = line.split(None, 4)
        if not line.startswith(";") and len(fields) == 5 and fields[3] == "TXT":
            strings += re.findall(r'"((?:[^"\\]|\\.)*)"', fields[4])
    return strings


def dig_message_bytes(output: str) -> int:
    """Size of the DNS answer as dig reports it (0 when absent)."""
    match = re.search(r"MSG SIZE\s+rcvd:\s+(\d+)", output)
    return int(match.group(1)) if match else 0


def dig_flags(output: str) -> set[str]:
    """Header flags of dig's answer (``qr aa rd ...``); ``tc`` would mean truncated."""
    match = re.search(r";; flags: ([a-z ]+);", output)
    return set(match.group(1).split()) if match else set()


@dataclass(frozen=True)
class Download:
    """What ``curl`` fetched."""

    exit_code: int
    size_bytes: int
    sha256: str
    elapsed_s: float
    stderr: str

    @property
    def megabytes_per_s(self) -> float:
        """Throughput in MB/s (10**6 bytes)."""
        return self.size_bytes / max(self.elapsed_s, 1e-9) / 1e6


def http_url(lab: Lab, path: str, port: int = 80) -> str:
    """URL of ``path`` on the gateway's IPv6 address."""
    return f"http://[{lab.plan.gateway_address}]:{port}/{path.lstrip('/')}"


def download(lab: Lab, url: str, max_time_s: float = 120, family: str = "-6") -> Download:
    """Real ``curl -6`` (or ``family``) in the peer namespace; the body is hashed as it
    streams in."""
    argv = in_ns(lab.peer_ns, ["curl", family, "-g", "-sS", "--fail", "--max-time",
                               str(max_time_s), url])
    digest, size = hashlib.sha256(), 0
    started = time.monotonic()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None and process.stderr is not None
        while chunk := process.stdout.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        stderr = process.stderr.read().decode(errors="replace")
        exit_code = process.wait()
    return Download(exit_code, size, digest.hexdigest(), time.monotonic() - started, stderr)


def curl_exit(lab: Lab, url: str, max_time_s: float = 5) -> tuple[int, float, str]:
    """(curl exit code, seconds taken, stderr) for a request whose body is thrown away."""
    started = time.monotonic()
    done = lab.peer(["curl", "-6", "-g", "-sS", "-o", "/dev/null", "--max-time",
                     str(max_time_s), url], timeout=max_time_s + 10)
    return done.returncode, time.monotonic() - started, done.stderr.strip()


@contextlib.contextmanager
def open_tcp_connection(lab: Lab, port: int = 80) -> Iterator[tuple[str, int]]:
    """Hold one TCP connection from the peer to the gateway; yields its (address, port)."""
    argv = in_ns(lab.peer_ns, [sys.executable, str(LAB_DIR / "probe.py"), "hold-tcp",
                               "--addr", lab.plan.gateway_address, "--port", str(port)])
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdin is not None
        ready, _, _ = select.select([process.stdout], [], [], 15)
        line = process.stdout.readline() if ready else ""
        if not line:
            stop_process(process, 2)
            stderr = process.stderr.read() if process.stderr else ""
            raise LabError(f"hold-tcp did not connect: {stderr}")
        local = json.loads(line)
        yield local["local_addr"], int(local["local_port"])
    finally:
        if process.stdin and not process.stdin.closed:
            process.stdin.close()
        stop_process(process, 5)


DEFAULT_RULES4 = ("0: from all lookup local", "32766: from all lookup main",
                  "32767: from all lookup default")
DEFAULT_RULES6 = ("0: from all lookup local", "32766: from all lookup main")


def shutdown_problems(lab: Lab, tests_failed: bool,
                      sysctls: tuple[str, ...] = ("net.ipv4.conf.veth0.forwarding",)) -> list[str]:
    """What went wrong at the end of a combination (empty when all is well); ``sysctls``:
    forwarding switches of the gateway namespace that must be back at 0."""
    problems = []
    if lab.alive("sixgate"):
        internal_errors = drops(lab).get("internal_error")
        if internal_errors != 0:
            problems.append(f"drops['internal_error'] is {internal_errors}, expected 0")
    else:
        problems.append("sixgate run was no longer running at the end of the tests")
    exit_code = lab.stop_gateway(timeout=10)
    if exit_code != 0 and not tests_failed:
        problems.append(f"sixgate run exited {exit_code} after SIGTERM, expected 0")
    leftovers = lab.gateway_links()
    if leftovers:
        problems.append(f"links named {lab.name!r} left after SIGTERM: {leftovers}")
    # A forward rule to another host made the gateway open forwarding on the uplink and guard
    # it with its own nftables table; both must be undone.
    tables = lab.gw(["nft", "list", "tables"]).stdout.strip()
    if tables:
        problems.append(f"nftables tables left in the gateway namespace: {tables}")
    # Policy rules (a NAT64's steering, and the local table's rule it moves for pool4 on the
    # host's own address) must be the kernel's defaults again.
    for family, default in (("-4", DEFAULT_RULES4), ("-6", DEFAULT_RULES6)):
        rules = lab.gw(["ip", family, "rule", "show"]).stdout.split("\n")
        rules = [" ".join(line.split()) for line in rules if line.strip()]
        if rules != list(default):
            problems.append(f"ip {family} rule show after stop: {rules}, expected {default}")
    for key in sysctls:
        forwarding = lab.gw(["sysctl", "-n", key]).stdout.strip()
        if forwarding != "0":
            problems.append(f"{key} is {forwarding!r} after stop, expected 0")
    if problems:
        problems.append(f"----- sixgate stderr (tail) -----\n{lab.gateway_stderr()}")
    return problems
