"""A kernel-backend lab INSIDE the qemu guest: two namespaces, real services, real ``sixgate run``.

```
 peer namespace                                       gw namespace (kernel IPv6 on)
 ping -6 / curl -6 / dig                              sixgate run --config <tmp>/sixgate.toml
        │ IPv6                                          backend = "kernel": sit link sgksit,
      t6 (`ip tunnel add ... mode sit`)                 workers relay tcp/80 and udp/53 to
        │ IPv4 proto 41, 198.51.100.1                   127.0.0.1:8080 http.server
      veth-peer ───────────────────────────────────── veth-gw 192.0.2.10    127.0.0.1:5353 dnsmasq
```

Only documentation addresses are used, and the guest has no network device: every packet stays
in these namespaces of the throw-away kernel. Processes are started with ``ip netns exec`` (it
execs, so the PID is the program's own) and stopped by PID only; the namespaces themselves
belong to the ``netns`` fixture. Readiness is polled (a service answering, ``sixgate flows``
exiting 0), never slept for.

Python under qemu's emulation starts slowly (``sixgate flows`` alone takes seconds: it imports
pyroute2 and zmq), so callers do many checks per gateway run and poll only where they must.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from guestnet import ip

REPO_ROOT = Path(__file__).resolve().parents[3]
# The host lab's process helpers (stdlib only), shared rather than written twice.
sys.path.insert(0, str(REPO_ROOT / "tests" / "lab"))
import netlab  # noqa: E402
from netlab import (  # noqa: E402
    process_cmdline,
    process_gone,
    stop_process,
    wait_until,
)

GW_IPV4 = "192.0.2.10"
PEER_IPV4 = "198.51.100.1"
RELAY_IPV4 = "192.88.99.1"  # RFC 3068 anycast (deprecated by RFC 7526); nothing answers it here
BORDER_RELAY_IPV4 = "203.0.113.1"  # the 6rd domain's border relay; nothing answers it here
SIXRD_PREFIX_LEN = 33
SIXRD_PREFIX = f"2001:db8:8000::/{SIXRD_PREFIX_LEN}"
SIXRD_MASK_LEN = 5
SIXRD_RELAY_PREFIX = f"192.0.0.0/{SIXRD_MASK_LEN}"  # the IPv4 bits every CE of it shares
NAME = "sgk"
SIT = f"{NAME}sit"  # coordinator/kernel_backend.py: "<name>sit"
PEER_SIT = "t6"
MTU = 1480
HTTP_PORT = 8080
DNS_PORT = 5353
DNS_NAME = "small.test"
DNS_ANSWER = "192.0.2.99"
FILE_NAME = "file"
FILE_BYTES = 3 << 20

# Mode -> (gateway address, peer address with its prefix length, TOML of the [tunnel] table).
MODES: dict[str, tuple[str, str, str]] = {
    "6in4": ("2001:db8:1::1", "2001:db8:ffff::1/64",
             f'mode = "6in4"\nlocal_ipv4 = "{GW_IPV4}"\nremote_ipv4 = "{PEER_IPV4}"\n'
             'prefix = "2001:db8:1::/64"\naddresses = ["2001:db8:1::1"]\n'),
    # 2002:c000:20a::/48 is 192.0.2.10's 6to4 prefix, 2002:c633:6401::/48 is 198.51.100.1's.
    "6to4": ("2002:c000:20a::1", "2002:c633:6401::1/16",
             f'mode = "6to4"\nlocal_ipv4 = "{GW_IPV4}"\nrelay_ipv4 = "{RELAY_IPV4}"\n'
             'addresses = ["2002:c000:20a::1"]\n'),
    # RFC 5969: a 6rd domain 2001:db8:8000::/33 whose CEs share the first 5 bits of their IPv4
    # addresses (192.0.2.10 and 198.51.100.1 both start 11000): the gateway's delegated prefix
    # is 2001:db8:8000:20a0::/60, the peer's 2001:db8:e336:4010::/60 (tests/lab/netlab.py).
    "6rd": ("2001:db8:8000:20a0::1", f"2001:db8:e336:4010::1/{SIXRD_PREFIX_LEN}",
            f'mode = "6rd"\nlocal_ipv4 = "{GW_IPV4}"\nprefix = "{SIXRD_PREFIX}"\n'
            f'ipv4_mask_len = {SIXRD_MASK_LEN}\nborder_relay_ipv4 = "{BORDER_RELAY_IPV4}"\n'
            'addresses = ["2001:db8:8000:20a0::1"]\n'),
}

FORWARD_TOML = (f'[[forward]]\nproto = "tcp"\nport = 80\nto = "127.0.0.1:{HTTP_PORT}"\n\n'
                f'[[forward]]\nproto = "udp"\nport = 53\nto = "127.0.0.1:{DNS_PORT}"\n')

# A coordinator and two workers each import pyroute2/zmq, under software emulation beside the
# rest of the suite: CI-style runs of 2026-12-07 (the guest session alone 880 s, not 300)
# timed out at 60 s in gateways of both backends, before any packet.
GATEWAY_READY_TIMEOUT_S = 240.0
# A take-over is two starts in a row: its standby workers load beside the running gateway
# (30 s here), then it sets up as a start does (CI's run of 2026-12-07 hit 60 s).
TAKE_OVER_READY_TIMEOUT_S = 2 * GATEWAY_READY_TIMEOUT_S
GATEWAY_STOP_TIMEOUT_S = 30.0
WORKERS_GONE_TIMEOUT_S = 20.0

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sixgate_command() -> list[str]:
    """The ``sixgate`` script beside this interpreter (the guest sees the host's venv)."""
    script = Path(sys.executable).parent / "sixgate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sixgate.coordinator.cli"]


def in_ns(namespace: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", namespace, *argv]


def run(argv: Sequence[str], *, timeout: float = 60, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    """The host lab's ``run`` with a longer default timeout (the VM is software-emulated)."""
    return netlab.run(argv, timeout=timeout, check=check)


def run_together(commands: Sequence[Sequence[str]], timeout: float = 60) -> list[str]:
    """Run the commands side by side; their stdouts, or AssertionError naming a failed one."""
    processes = [subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=REPO_ROOT) for argv in commands]
    outputs = []
    try:
        for argv, process in zip(commands, processes, strict=True):
            try:
                out, err = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"`{' '.join(argv)}` did not finish in {timeout} s"
                                     ) from None
            if process.returncode != 0:
                raise AssertionError(f"`{' '.join(argv)}` exited {process.returncode}:\n"
                                     f"{out}{err}")
            outputs.append(out)
    finally:
        for process in processes:
            stop_process(process, 5)
    return outputs


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


@contextlib.contextmanager
def inside(namespace: str) -> Iterator[None]:
    """Run this thread inside ``namespace`` for the block: sockets made here stay there.

    Cheaper than a Python subprocess in the guest; Python 3.11 has no ``os.setns``.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


def tail(path: Path, max_bytes: int = 5000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return f"<{path} not readable>"
    return ("[...]\n" if len(data) > max_bytes else "") + data[-max_bytes:].decode(
        errors="replace")


def config_text(mode: str, run_dir: Path, backend: str = "kernel", workers: int = 2) -> str:
    return (f"[tunnel]\n{MODES[mode][2]}mtu = {MTU}\n\n"
            f'[gateway]\nbackend = "{backend}"\nworkers = {workers}\nrun_dir = "{run_dir}"\n'
            f'name = "{NAME}"\n\n{FORWARD_TOML}')


class GatewayRun:
    """One ``sixgate run`` process (the coordinator) and what it logged."""

    def __init__(self, process: subprocess.Popen[bytes], stderr_path: Path) -> None:
        self.process = process
        self.stderr_path = stderr_path
        self.worker_pids: list[int] = []

    @property
    def stderr(self) -> str:
        return tail(self.stderr_path, 20000)


class KernelLab:
    """The two namespaces of one mode, their services and the gateway runs made in them."""

    def __init__(self, netns: Callable[[str], str], mode: str) -> None:
        self.mode = mode
        self.gw_address, self.peer_address, _ = MODES[mode]
        self.gw_ns = netns("gw")
        self.peer_ns = netns("peer")
        self.tmp = Path(tempfile.mkdtemp(prefix="sgk-"))  # short: ipc:// paths live in it
        self.tmp.chmod(0o755)  # the gateway's user must reach its run_dir in here
        self.run_dir = self.tmp / "run"
        self.config_path = self.tmp / "sixgate.toml"
        self.files = self.tmp / "www"
        self.services: dict[str, subprocess.Popen[bytes]] = {}
        self.runs: list[GatewayRun] = []
        self.file_sha256 = ""
        self.workers = 2

    # -- lifecycle

    def __enter__(self) -> KernelLab:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            # Captured by pytest; the host twin prints it with the failure.
            print(self.diagnostics())
        self.close()

    def close(self) -> None:
        """Stop every process this lab started, by PID (workers of a killed run too)."""
        for gateway in self.runs:
            stop_process(gateway.process, 10)
        for pid in self.live_workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in self.services.values():
            stop_process(process, 5)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- network

    def build(self) -> None:
        """veth between the namespaces, on-link IPv4 both ways, the peer's kernel sit tunnel."""
        gw, peer = self.gw_ns, self.peer_ns
        ip("link", "add", "veth-gw", "netns", gw, "type", "veth", "peer", "name", "veth-peer",
           "netns", peer)
        for ns, dev, mine, theirs in ((gw, "veth-gw", GW_IPV4, PEER_IPV4),
                                      (peer, "veth-peer", PEER_IPV4, GW_IPV4)):
            run(in_ns(ns, ["sysctl", "-q", "net.ipv6.conf.all.disable_ipv6=0",
                           "net.ipv6.conf.default.disable_ipv6=0"]))
            ip("addr", "add", f"{mine}/24", "dev", dev, netns=ns)
            ip("link", "set", dev, "up", netns=ns)
            ip("route", "add", f"{theirs}/32", "dev", dev, netns=ns)
        # A plain kernel sit peer: 6in4 names the gateway as remote; a 6to4 host has none (with
        # local set it does not collide with the fallback device sit0); a 6rd CE is a 6to4
        # link with the domain's 6rd prefix and shared IPv4 bits (RFC 5969 §4).
        ip("tunnel", "add", PEER_SIT, "mode", "sit", "local", PEER_IPV4, "remote",
           GW_IPV4 if self.mode == "6in4" else "any", "ttl", "64", netns=peer)
        if self.mode == "6rd":
            ip("tunnel", "6rd", "dev", PEER_SIT, "6rd-prefix", SIXRD_PREFIX,
               "6rd-relay_prefix", SIXRD_RELAY_PREFIX, netns=peer)
        ip("link", "set", PEER_SIT, "up", netns=peer)
        ip("-6", "addr", "add", self.peer_address, "dev", PEER_SIT, "nodad", netns=peer)
        if self.mode == "6in4":
            # The routed prefix lives behind the tunnel; 6to4's 2002::/16 and the 6rd prefix are
        # on-link already (the peer's address carries their length).
            ip("-6", "route", "add", "2001:db8:1::/64", "dev", PEER_SIT, netns=peer)

    def gw(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run(in_ns(self.gw_ns, argv), **kwargs)

    def peer(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run(in_ns(self.peer_ns, argv), **kwargs)

    def gw_links(self) -> list[str]:
        return [link["ifname"] for link in json.loads(self.gw(["ip", "-j", "link"]).stdout)]

    # -- services

    def _spawn(self, key: str, namespace: str, argv: Sequence[str]) -> tuple[
            subprocess.Popen[bytes], Path]:
        err = self.tmp / f"{key}.err"
        with (self.tmp / f"{key}.out").open("wb") as out_file, err.open("wb") as err_file:
            process = subprocess.Popen(in_ns(namespace, argv), stdin=subprocess.DEVNULL,
                                       stdout=out_file, stderr=err_file, cwd=REPO_ROOT,
                                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
        return process, err

    def start_services(self, dns: bool = True) -> None:
        """IPv4-only services on the gateway's loopback (not waited for: see wait_services)."""
        self.files.mkdir()
        body = os.urandom(FILE_BYTES)
        (self.files / FILE_NAME).write_bytes(body)
        self.file_sha256 = hashlib.sha256(body).hexdigest()
        # `python3 -m http.server`, with this interpreter: the guest's `python3` is a slow shim.
        self.services["http"], _ = self._spawn("http", self.gw_ns, [
            sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
            str(self.files), str(HTTP_PORT)])
        if dns:
            self.services["dnsmasq"], _ = self._spawn("dnsmasq", self.gw_ns, [
                "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
                "--pid-file=", "--listen-address=127.0.0.1", f"--port={DNS_PORT}",
                "--bind-interfaces", f"--address=/{DNS_NAME}/{DNS_ANSWER}"])

    def wait_services(self) -> None:
        """Each service answers over IPv4 loopback, so a later failure is the gateway's."""
        def http_up() -> bool:
            self._check_alive(self.services)
            done = self.gw(["curl", "-sS", "-o", "/dev/null", "--max-time", "5",
                            f"http://127.0.0.1:{HTTP_PORT}/{FILE_NAME}"], check=False)
            return done.returncode == 0

        wait_until(http_up, timeout=30, what=lambda: "http.server to serve over IPv4 loopback")
        if "dnsmasq" in self.services:
            def dns_up() -> bool:
                self._check_alive(self.services)
                return self.dig("127.0.0.1", "-p", str(DNS_PORT)) == DNS_ANSWER

            wait_until(dns_up, timeout=30, what=lambda: "dnsmasq to answer over IPv4 loopback")

    def _check_alive(self, processes: dict[str, subprocess.Popen[bytes]]) -> None:
        for key, process in processes.items():
            if process.poll() is not None:
                raise AssertionError(f"{key} exited {process.returncode}:\n"
                                     f"{tail(self.tmp / f'{key}.err')}")

    def dig(self, server: str, *options: str, namespace: str | None = None) -> str:
        done = run(in_ns(namespace or self.gw_ns, [
            "dig", f"@{server}", *options, DNS_NAME, "A", "+short", "+time=3", "+tries=2"]),
            check=False)
        return done.stdout.strip()

    # -- the gateway

    def write_config(self, backend: str = "kernel", workers: int = 2) -> None:
        self.workers = workers
        self.config_path.write_text(config_text(self.mode, self.run_dir, backend, workers))

    def sixgate(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``sixgate ARGS --config F`` in the gateway namespace (exit code not checked)."""
        return self.gw([*sixgate_command(), *args, "--config", str(self.config_path)],
                       timeout=timeout, check=False)

    def spawn_gateway(self, *flags: str) -> GatewayRun:
        number = len(self.runs) + 1
        process, err = self._spawn(f"sixgate-{number}", self.gw_ns,
                                   [*sixgate_command(), "run", "--config",
                                    str(self.config_path), *flags])
        gateway = GatewayRun(process, err)
        self.runs.append(gateway)
        return gateway

    def wait_gateway(self, gateway: GatewayRun,
                     timeout: float = GATEWAY_READY_TIMEOUT_S) -> None:
        """Ready once ``sixgate flows --json`` exits 0; then note the workers' PIDs.

        Each ``sixgate flows`` costs seconds of imports here and gives up after 5 s without an
        answer, so the first is asked once the coordinator has logged "sixgate up" (a cheap
        poll of its log file), not while it is still starting.
        """
        def exited() -> None:
            if gateway.process.poll() is not None:
                raise AssertionError(f"sixgate run exited {gateway.process.returncode} before "
                                     f"it was ready; its stderr:\n{gateway.stderr}")

        def logged_up() -> bool:
            exited()
            return "sixgate up:" in gateway.stderr

        def ready() -> bool:
            exited()
            return self.sixgate("flows", "--json", timeout=30).returncode == 0

        wait_until(logged_up, timeout=timeout,
                   what=lambda: f"the gateway to log \"sixgate up:\"; its stderr:\n"
                                f"{gateway.stderr}")
        wait_until(ready, timeout=GATEWAY_READY_TIMEOUT_S,
                   what=lambda: f"`sixgate flows --json` to exit 0; gateway stderr:\n"
                                f"{gateway.stderr}")
        gateway.worker_pids = [int(path.read_text())
                               for path in sorted(self.run_dir.glob("worker-*.pid"))]
        assert len(gateway.worker_pids) == self.workers, (
            f"expected {self.workers} worker pidfiles, found {gateway.worker_pids}:\n"
            f"{gateway.stderr}")

    def flows(self) -> dict[str, Any]:
        done = self.sixgate("flows", "--json")
        assert done.returncode == 0, (
            f"sixgate flows --json exited {done.returncode}:\n{done.stdout}{done.stderr}\n"
            f"gateway stderr:\n{self.runs[-1].stderr}")
        return dict(json.loads(done.stdout))

    def live_workers(self) -> list[int]:
        """PIDs of living worker processes started for this lab's run directory."""
        settings = f"{self.run_dir}/settings.json"
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                argv = process_cmdline(int(entry.name))
                if "sixgate.workers.main" in argv and settings in argv and not process_gone(
                        int(entry.name)):
                    found.append(int(entry.name))
        return found

    def wait_workers_gone(self, gateway: GatewayRun) -> None:
        wait_until(lambda: all(process_gone(pid) for pid in gateway.worker_pids)
                   and not self.live_workers(), timeout=WORKERS_GONE_TIMEOUT_S,
                   what=lambda: f"the workers {gateway.worker_pids} to exit (still running: "
                                f"{self.live_workers()}); gateway stderr:\n{gateway.stderr}")

    # -- checks shared by the tests

    def sit_details(self) -> str:
        return self.gw(["ip", "-d", "link", "show", "dev", SIT]).stdout

    def ping(self, count: int = 3) -> str:
        done = self.peer(["ping", "-6", "-c", str(count), "-i", "0.2", "-w", "20",
                          self.gw_address], check=False)
        assert re.search(rf"\b{count} received\b", done.stdout), (
            f"ping -6 {self.gw_address} from the peer:\n{done.stdout}{done.stderr}\n"
            f"gateway stderr:\n{self.runs[-1].stderr}")
        return done.stdout

    def curl_sha256(self) -> str:
        """Fetch the file over IPv6 through the gateway; its sha256."""
        target = self.tmp / "fetched"
        target.unlink(missing_ok=True)
        done = self.peer(["curl", "-6", "-g", "-sS", "--max-time", "60", "-o", str(target),
                          f"http://[{self.gw_address}]/{FILE_NAME}"], check=False, timeout=90)
        assert done.returncode == 0, (
            f"curl -6 through the gateway exited {done.returncode}: {done.stderr}\n"
            f"gateway stderr:\n{self.runs[-1].stderr}")
        return hashlib.sha256(target.read_bytes()).hexdigest()

    def diagnostics(self) -> str:
        parts = [f"----- {path.name} -----\n{tail(path, 4000)}"
                 for path in sorted(self.tmp.glob("*.err")) if path.stat().st_size]
        for ns in (self.gw_ns, self.peer_ns):
            for argv in (["ip", "-d", "addr"], ["ip", "-6", "route"]):
                done = run(in_ns(ns, argv), check=False)
                parts.append(f"----- {ns}: {' '.join(argv)} -----\n{done.stdout}{done.stderr}")
        return "\n".join(parts)


def counter_total(summary: dict[str, Any], kind: str, key: str) -> int:
    """A packet or byte counter (``kind`` "packets"/"bytes", ``key`` "inbound/tcp") summed over
    the coordinator and every worker that answered."""
    status = summary["counters"]
    total = int(status["coordinator"][kind].get(key, 0))
    for worker in status["workers"]:
        if worker.get("up"):
            total += int(worker["counters"][kind].get(key, 0))
    return total


def hold_tcp(namespace: str, address: str, port: int) -> socket.socket:
    """A TCP connection from ``namespace`` to [address]:port, left open for the caller."""
    with inside(namespace):
        return socket.create_connection((address, port), timeout=15)
