"""Real rollouts: ``sixgate deploy`` runs ansible-playbook from the controller namespace over SSH to
four hosts in namespaces (fleet.py), each with its own sshd and install root.

The stages run in order on one fleet: first install everywhere; the upgrade in Ansible's check
mode (nothing may change); the upgrade in batches
(serial [1, "25%", "100%"]) to the same checkout built as <version>+upgrade; a broken config
(a mistyped tunnel broker: `sixgate check` accepts it, the health gate's ICMPv6 echo fails) that
must stop after the first batch and be rolled back there, leaving the other hosts untouched; a
new release on one host whose health gate fails, rolled back while a download through it goes
on (its sessions handed to the new release and back); and ``sixgate deploy rollback`` of one
host. Every assertion reads the hosts' real state: the links
and virtualenvs in their install roots, the processes behind the pidfiles (and the network
namespace they run in), /readyz and /metrics of each gateway, and a real ``ping -6`` through it
from the IPv6 side. The last host also runs a NAT64 beside its tunnel (variables nat64_*): its
health gate pings an IPv4 address through the NAT64, and so does a real ``ping -6`` of
64:ff9b::198.51.100.1 from its kernel. Ansible's output is only printed when something fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fleet as fleet_module
import pytest
from fleet import STAGE_SECONDS, Fleet, host_ipv4

from sixgate.deploy.build import checkout_version
from sixgate.deploy.inventory import load_inventory
from sixgate.deploy.render import render_gateway_config

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(900)]

PROGRAMS = fleet_module.LAB_DIR / "programs"

HOSTS = (1, 2, 3, 4)
CLUSTER_HOST = 2  # a [cluster] node: its BIRD (started after the install) announces its address
RELEASE = checkout_version()
UPGRADE = f"{RELEASE}+upgrade"
# A typo in the broker's address: a valid config that `sixgate check` accepts and /readyz
# passes, but nothing answers at 198.51.100.99, so no echo comes back through the tunnel.
BROKEN = ('mode = "6in4"\nremote_ipv4 = "198.51.100.99"\nprefix = "2001:db8:bad::/64"\n')
GOOD = 'mode = "6to4"\nrelay_ipv4 = "198.51.100.1"\n'
# A health gate that cannot pass: nothing answers this address beyond the relay.
UNANSWERED = "2001:db8:dead::1"

_done: list[str] = []


def inventory_text(fleet: Fleet, tunnel: str = GOOD,
                   ping_target: str = fleet_module.PEER_IPV6) -> str:
    text = (
        "[defaults]\n"
        f'ssh_key = "{fleet.key}"\n'
        f'known_hosts = "{fleet.known_hosts}"\n'
        'service = "pidfile"\n'
        f"{tunnel}"
        "workers = 1\n"
        f'ping_target = "{ping_target}"\n'
        'rules = ["web"]\n'
        "\n[rules.web]\n"
        'forward = [{ proto = "tcp", port = 80, to = "127.0.0.1:8080" }]\n'
        '\n[groups.canary]\nhosts = ["h1"]\n'
    )
    for number in HOSTS:
        text += (f"\n[hosts.h{number}]\n"
                 f'ssh = "{host_ipv4(number)}"\n'
                 f'local_ipv4 = "{host_ipv4(number)}"\n'
                 f'install_root = "{fleet.root(number)}"\n')
        if number == CLUSTER_HOST:
            # Issue 20: a BGP node. Its BIRD peers with the controller, where nothing answers:
            # what is checked is the static route BIRD takes from sixgate's anchor device.
            text += (f'cluster_announce = ["{host_ipv4(number)}/32"]\n'
                     "cluster_local_as = 65001\ncluster_peer_as = 65000\n"
                     f'cluster_neighbors = ["{fleet_module.CONTROLLER_IPV4}"]\n'
                     f'cluster_router_id = "{host_ipv4(number)}"\n'
                     "cluster_drain_quiet_s = 1\n"
                     f'bird_socket = "{bird_socket(fleet)}"\n')
        if number == fleet.nat64_host:
            # A NAT64 beside its 6to4 tunnel; its health gate pings IPv4 through the NAT64.
            text += (f'nat64_clients = ["{fleet_module.NAT64_CLIENTS}"]\n'
                     "nat64_allow_non_global = true\n"  # documentation addresses (RFC 6052 §3.1)
                     f'nat64_pool4 = [{{ address = "{fleet_module.nat64_pool4(number)}", '
                     'icmp = "0-65535", tcp = "61001-65535" }]\n'
                     f'ping_target = "{fleet_module.PEER_IPV4}"\n')
    return text


def bird_socket(fleet: Fleet) -> Path:
    return fleet.root(CLUSTER_HOST) / "run" / "bird.ctl"


def birdc(fleet: Fleet, *args: str) -> str:
    done = fleet.host(CLUSTER_HOST, ["birdc", "-s", str(bird_socket(fleet)), *args])
    return done.stdout + done.stderr


def announced_by_bird(fleet: Fleet) -> bool:
    """Whether the cluster host's BIRD has the route of its anchor device (gateway up)."""
    return f"{host_ipv4(CLUSTER_HOST)}/32" in birdc(fleet, "show", "route")


# The health gate's wait where it must pass, and where it is meant to fail (a stage waits it out).
HEALTH_S = 10
FAILING_HEALTH_S = 5  # the least [health] timeout_s takes


def rollout_text(release: str, serial: str, health_s: int = HEALTH_S) -> str:
    return ("[release]\n"
            f"{release}\n"
            'wheelhouse = "wheelhouse"\n'
            f"\n[batches]\nserial = {serial}\nmax_fail_percentage = 0\n"
            f"\n[health]\ntimeout_s = {health_s}\nping_count = 1\n"
            '\n[on_failure]\nrollback = "batch"\n')


def write_files(fleet: Fleet, inventory: str, rollout: str) -> tuple[str, str]:
    inventory_path = fleet.tmp / "inventory.toml"
    rollout_path = fleet.tmp / "rollout.toml"
    inventory_path.write_text(inventory)
    rollout_path.write_text(rollout)
    return str(inventory_path), str(rollout_path)


@dataclass(frozen=True)
class HostState:
    """What one host really runs, read from its install root, /proc and its gateway."""

    current: str | None  # release directory name behind <root>/opt/sixgate/current
    previous: str | None
    config: str | None  # <root>/etc/sixgate/gateway.toml
    config_mtime_ns: int | None
    supervisor_pid: int | None  # alive, from the pidfile, and really the supervisor
    gateway_pid: int | None  # alive, from the gateway's own coordinator.pid
    gateway_release: str | None  # releases/<this>/bin/... in the gateway's command line
    gateway_namespace: str | None  # `ip netns identify <pid>`
    gateway_started: int | None  # /proc/<pid>/stat starttime, clock ticks since boot
    readyz: int | None
    build_version: str | None  # sixgate_build_info{version=...} of /metrics

    def runs(self, release: str) -> bool:
        return (self.current == release and self.gateway_release == release
                and self.build_version == release and self.readyz == 200)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _pid(path: Path, marker: str) -> int | None:
    text = _read(path)
    if not text or not text.strip().isdigit():
        return None
    pid = int(text)
    cmdline = fleet_module.netlab.process_cmdline(pid)
    alive = not fleet_module.netlab.process_gone(pid)
    return pid if alive and any(marker in part for part in cmdline) else None


def _link(path: Path) -> str | None:
    return Path(os.readlink(path)).name if path.is_symlink() else None


def host_state(fleet: Fleet, number: int) -> HostState:
    root = fleet.root(number)
    config = root / "etc" / "sixgate" / "gateway.toml"
    gateway = _pid(root / "run" / "sixgate" / "coordinator.pid", "sixgate")
    release = namespace = started = None
    if gateway:
        for part in fleet_module.netlab.process_cmdline(gateway):
            match = re.search(r"/opt/sixgate/releases/([^/]+)/bin/", part)
            release = release or (match.group(1) if match else None)
        namespace = fleet_module.netlab.run(["ip", "netns", "identify", str(gateway)],
                                            check=False).stdout.strip()
        stat = _read(Path(f"/proc/{gateway}/stat")) or ""
        started = int(stat.rpartition(")")[2].split()[19]) if stat else None
    code = fleet.host(number, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                               "--max-time", "3", "http://127.0.0.1:9641/readyz"]).stdout
    metrics = fleet.host(number, ["curl", "-s", "--max-time", "3",
                                  "http://127.0.0.1:9641/metrics"]).stdout
    version = re.search(r'sixgate_build_info\{[^}]*version="([^"]+)"', metrics)
    return HostState(
        current=_link(root / "opt" / "sixgate" / "current"),
        previous=_link(root / "opt" / "sixgate" / "previous"),
        config=_read(config),
        config_mtime_ns=config.stat().st_mtime_ns if config.exists() else None,
        supervisor_pid=_pid(root / "run" / "sixgate-supervisor.pid", "sixgate-host"),
        gateway_pid=gateway, gateway_release=release, gateway_namespace=namespace,
        gateway_started=started, readyz=int(code) if code.isdigit() else None,
        build_version=version.group(1) if version else None)


def installed_version(fleet: Fleet, number: int, release: str) -> str:
    """The sixgate version importlib.metadata reports inside the host's release virtualenv."""
    python = fleet.root(number) / "opt" / "sixgate" / "releases" / release / "bin" / "python"
    done = fleet.host(number, [str(python), "-I", "-c", "import importlib.metadata as m; "
                               "print(m.version('sixgate'))"])
    return done.stdout.strip() or done.stderr.strip()


def deploy(fleet: Fleet, *args: str) -> tuple[int, str]:
    started = time.monotonic()
    done = fleet.deploy(*args, timeout=420)
    output = (f"----- sixgate deploy {' '.join(args)} ({time.monotonic() - started:.0f} s) "
              f"-----\n{done.stdout}{done.stderr}")
    print(output)  # shown with -s, and by pytest when the test fails
    return done.returncode, output


def assert_serving(fleet: Fleet, number: int, release: str, output: str) -> HostState:
    """Host ``number`` runs ``release`` under its supervisor, in its namespace, ready, and a
    real ping -6 through its gateway gets answers."""
    state = host_state(fleet, number)
    assert state.runs(release), f"h{number}: {state}\n{output}"
    assert state.supervisor_pid, f"h{number}: no supervisor behind the pidfile\n{output}"
    assert state.gateway_namespace == fleet.host_ns(number), state
    assert installed_version(fleet, number, release) == release
    assert fleet.ping6(number) >= 1, f"h{number}: no ping -6 reply through its gateway"
    if number == fleet.nat64_host:
        assert "[nat64]" in (state.config or ""), state.config
        assert fleet.ping_nat64(number) >= 1, f"h{number}: no ping -6 reply through its NAT64"
    return state


class LongDownload:
    """A paced HTTP download from the IPv6 side through host ``number``'s gateway (its port-80
    rule, to an http.server on the host's 127.0.0.1:8080) that lasts until ``finish``."""

    def __init__(self, fleet: Fleet, number: int, size: int = 48 << 20) -> None:
        self.fleet, self.number, self.size = fleet, number, size
        self.directory = fleet.tmp / f"www-h{number}"
        self.go_file = fleet.tmp / f"download-h{number}.go"
        self.process: subprocess.Popen[str] | None = None
        self.sha256 = ""

    def __enter__(self) -> LongDownload:
        self.directory.mkdir(exist_ok=True)
        self.go_file.unlink(missing_ok=True)
        self.sha256 = fleet_module.netlab.write_random_file(self.directory / "big.bin",
                                                            self.size).sha256
        key = f"http-h{self.number}"
        if not self.fleet.alive(key):
            self.fleet.spawn(key, self.fleet.host_ns(self.number), [
                sys.executable, str(PROGRAMS / "http_server.py"), "127.0.0.1", "8080",
                str(self.directory)])
            fleet_module.wait_for(lambda: self.fleet.host(self.number, [
                "ss", "-Hltn", "sport = :8080"]).stdout.strip(), 15, "http.server")
        self.process = subprocess.Popen(fleet_module.netlab.in_ns(self.fleet.net_ns, [
            sys.executable, str(PROGRAMS / "paced_download.py"),
            fleet_module.gateway_address(self.number), "80", "/big.bin",
            str(self.go_file)]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert self.running(), self.process.communicate(timeout=10)
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def finish(self) -> dict[str, Any]:
        assert self.process is not None
        self.go_file.touch()
        stdout, stderr = self.process.communicate(timeout=120)
        assert stdout.strip(), stderr
        return dict(json.loads(stdout.strip().splitlines()[-1]))

    def __exit__(self, *exc: object) -> None:
        if self.running():
            assert self.process is not None
            fleet_module.netlab.stop_process(self.process, 5)


def stage(name: str, started: float) -> None:
    STAGE_SECONDS[name] = time.monotonic() - started
    _done.append(name)


def require(*stages: str) -> None:
    missing = [name for name in stages if name not in _done]
    if missing:
        pytest.fail(f"an earlier stage did not pass: {', '.join(missing)}", pytrace=False)


def wheel_of(wheelhouse: Path, version: str) -> str:
    """The wheel of ``version`` in the wheelhouse, as the rollout names it: platform tags
    since the compiled fast path (workers/engine/_fastpath.c)."""
    [wheel] = wheelhouse.glob(f"sixgate-{version}-*.whl")
    return f"wheelhouse/{wheel.name}"


def test_first_install_everywhere(fleet: Fleet, wheelhouse: Path) -> None:
    started = time.monotonic()
    assert all(fleet.ssh_ok(n) for n in HOSTS)
    inventory, rollout = write_files(fleet, inventory_text(fleet), rollout_text(
        f'wheel = "{wheel_of(wheelhouse, RELEASE)}"', '["100%"]'))
    code, output = deploy(fleet, "apply", "-i", inventory, "-r", rollout)
    assert code == 0, output
    fleet_inventory = load_inventory(inventory)
    for number in HOSTS:
        state = assert_serving(fleet, number, RELEASE, output)
        assert state.previous is None
        # Ansible's rendering on the host is the text validated on the controller.
        assert state.config == render_gateway_config(fleet_inventory.host(f"h{number}"))
    # The [cluster] host got its BIRD config; its BIRD (started now, as an operator would)
    # announces the host's address through the running gateway's anchor device.
    bird_conf = fleet.root(CLUSTER_HOST) / "etc" / "sixgate" / "bird.conf"
    assert f"route {host_ipv4(CLUSTER_HOST)}/32 via" in bird_conf.read_text()
    fleet.spawn("bird", fleet.host_ns(CLUSTER_HOST), [
        "bird", "-f", "-c", str(bird_conf), "-s", str(bird_socket(fleet))])
    fleet_module.wait_for(lambda: announced_by_bird(fleet), 10, "BIRD's route of the cluster host")
    stage("install", started)


def test_check_mode_changes_nothing(fleet: Fleet, wheelhouse: Path) -> None:
    """apply --check of the upgrade: Ansible's check mode asks every host, changes nothing."""
    require("install")
    started = time.monotonic()
    before = {n: host_state(fleet, n) for n in HOSTS}
    inventory, rollout = write_files(fleet, inventory_text(fleet), rollout_text(
        f'wheel = "{wheel_of(wheelhouse, UPGRADE)}"', '["100%"]'))
    code, output = deploy(fleet, "apply", "--check", "-i", inventory, "-r", rollout)
    assert code == 0, output
    for number in HOSTS:
        assert host_state(fleet, number) == before[number], output
        releases = fleet.root(number) / "opt" / "sixgate" / "releases"
        assert sorted(p.name for p in releases.iterdir()) == [RELEASE], output
    stage("check mode", started)


def test_upgrade_in_batches(fleet: Fleet, wheelhouse: Path) -> None:
    """The upgrade to a second release, in batches; a download through h1's gateway that runs
    all along survives h1's upgrade byte-identical (issue 17: the stopping release hands its
    sessions over in the run directory, the new release resumes them)."""
    require("install", "check mode")
    started = time.monotonic()
    before = {n: host_state(fleet, n) for n in HOSTS}
    log = fleet.root(1) / "var" / "log" / "sixgate" / "gateway.log"
    log_before = log.stat().st_size
    reconfigured_before = birdc(fleet, "show", "status")
    download = LongDownload(fleet, 1)
    inventory, rollout = write_files(fleet, inventory_text(fleet), rollout_text(
        f'wheel = "{wheel_of(wheelhouse, UPGRADE)}"', '[1, "25%", "100%"]'))
    with download:
        code, output = deploy(fleet, "apply", "-i", inventory, "-r", rollout)
        assert code == 0, output
        assert download.running(), "the download ended before the rollout did"
        result = download.finish()
    assert (result["status"], result["bytes"], result.get("sha256")) == (
        200, download.size, download.sha256), result
    text = log.read_text()[log_before:]
    assert "handed over to the next run" in text and re.search(
        r"resuming [1-9]\d* session\(s\) handed over", text), text[-3000:]
    # By take-over (sixgate run --take-over): the new release's workers were ready before
    # the old release was stopped.
    assert "take-over: this run's" in text, text[-3000:]
    # The [cluster] host was drained before its restart (withdrawn, then stopped once quiet),
    # its BIRD reconfigured, and the new gateway announces again.
    cluster_log = (fleet.root(CLUSTER_HOST) / "var" / "log" / "sixgate" / "gateway.log"
                   ).read_text()
    assert "cluster: drain asked" in cluster_log and "cluster: drained" in cluster_log, (
        cluster_log[-3000:])
    assert reconfigured_before != birdc(fleet, "show", "status"), output
    fleet_module.wait_for(lambda: announced_by_bird(fleet), 15, "BIRD's route after the upgrade")
    after = {n: assert_serving(fleet, n, UPGRADE, output) for n in HOSTS}
    for number in HOSTS:
        assert after[number].previous == RELEASE, after[number]
        assert after[number].gateway_pid != before[number].gateway_pid
        # The previous release stays installed, ready for a rollback.
        assert installed_version(fleet, number, RELEASE) == RELEASE
    # Batches [h1], [h2], [h3, h4]: each batch's gateways started after the batch before.
    start = {n: after[n].gateway_started or 0 for n in HOSTS}
    assert start[1] < start[2] < min(start[3], start[4]), (start, output)
    stage("upgrade", started)


def test_broken_config_stops_after_first_batch_and_rolls_back(fleet: Fleet,
                                                              wheelhouse: Path) -> None:
    require("install", "check mode", "upgrade")
    started = time.monotonic()
    before = {n: host_state(fleet, n) for n in HOSTS}
    log = fleet.root(1) / "var" / "log" / "sixgate" / "gateway.log"
    log_before = log.stat().st_size
    inventory, rollout = write_files(fleet, inventory_text(fleet, BROKEN), rollout_text(
        f'version = "{UPGRADE}"', '[1, "25%", "100%"]', FAILING_HEALTH_S))
    code, output = deploy(fleet, "apply", "-i", inventory, "-r", rollout)
    assert code == 1, output
    # h1 really switched to the broken config (its gateway started a 6in4 tunnel) ...
    assert "6in4 tunnel" in log.read_text()[log_before:], output
    # ... and was rolled back: same release, the previous config, a new gateway process.
    first = assert_serving(fleet, 1, UPGRADE, output)
    assert first.config == before[1].config and "6to4" in (first.config or "")
    assert first.gateway_pid != before[1].gateway_pid
    # The rollout stopped after that batch: the other hosts were not touched at all.
    for number in (2, 3, 4):
        state = assert_serving(fleet, number, UPGRADE, output)
        assert state == before[number], f"h{number} changed:\n{before[number]}\n{state}"
        candidate = fleet.root(number) / "etc" / "sixgate" / "gateway.toml.candidate"
        assert "6in4" not in candidate.read_text()
    stage("broken config", started)


def test_a_failed_release_hands_the_sessions_back(fleet: Fleet, wheelhouse: Path) -> None:
    """Issue 17: a new release on h1 whose health gate fails (its echo goes unanswered) is
    rolled back, and a download through h1's gateway running all along arrives byte-identical:
    the stopping release hands its sessions to the new one, which hands them back at its stop
    (the same config: the same fan-out and addresses)."""
    require("install", "check mode", "upgrade", "broken config")
    started = time.monotonic()
    before = host_state(fleet, 1)
    log = fleet.root(1) / "var" / "log" / "sixgate" / "gateway.log"
    log_before = log.stat().st_size
    download = LongDownload(fleet, 1)
    inventory, rollout = write_files(
        fleet, inventory_text(fleet, ping_target=UNANSWERED),
        rollout_text(f'version = "{RELEASE}"', '["100%"]', FAILING_HEALTH_S))
    with download:
        code, output = deploy(fleet, "apply", "-i", inventory, "-r", rollout, "--limit", "h1")
        assert code == 1, output
        assert download.running(), "the download ended before the rollback did"
        result = download.finish()
    assert (result["status"], result["bytes"], result.get("sha256")) == (
        200, download.size, download.sha256), result
    # h1 ran the new release (its gateway took the sessions), then the old one again.
    text = log.read_text()[log_before:]
    assert text.count("handed over to the next run") >= 2, text[-3000:]
    assert len(re.findall(r"resuming [1-9]\d* session\(s\) handed over", text)) >= 2, (
        text[-3000:])
    state = assert_serving(fleet, 1, UPGRADE, output)
    assert state.config == before.config and state.gateway_pid != before.gateway_pid
    stage("failed release", started)


def test_rollback_command(fleet: Fleet, wheelhouse: Path) -> None:
    require("install", "check mode", "upgrade", "broken config", "failed release")
    started = time.monotonic()
    before = {n: host_state(fleet, n) for n in HOSTS}
    inventory, rollout = write_files(fleet, inventory_text(fleet), rollout_text(
        f'version = "{UPGRADE}"', '[1, "25%", "100%"]'))
    code, output = deploy(fleet, "rollback", "-i", inventory, "-r", rollout, "--limit", "h4")
    assert code == 0, output
    state = assert_serving(fleet, 4, RELEASE, output)
    assert state.previous == UPGRADE
    for number in (1, 2, 3):
        assert host_state(fleet, number) == before[number]
    stage("rollback", started)
