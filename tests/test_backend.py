"""Backend selection on this host, whose kernel has no sit: ``auto`` must choose userspace and
say why; ``kernel`` must refuse to run with a message naming what is missing.

Runs the real ``sixgate`` command inside a throw-away network namespace (the probe really tries
to create TUN and sit devices, which must not happen in the host's own namespace).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_config import GOOD_6TO4

pytestmark = pytest.mark.lab


def _sixgate() -> list[str]:
    exe = Path(sys.executable).parent / "sixgate"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "sixgate.coordinator.cli"]


@pytest.fixture()
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        if os.environ.get("SIXGATE_LAB_REQUIRED") == "1":
            pytest.fail("needs root for a network namespace (SIXGATE_LAB_REQUIRED=1)")
        pytest.skip("SKIPPED LOUDLY: needs root to create a network namespace")
    name = f"sgb{os.getpid()}{uuid.uuid4().hex[:4]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _in_ns(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *_sixgate(), *args],
                          capture_output=True, text=True, timeout=60, check=False)


def _kernel_has_sit() -> bool:
    return Path("/sys/module/sit").exists()


def test_auto_chooses_userspace_without_sit_and_says_why(netns: str, tmp_path: Path) -> None:
    if _kernel_has_sit():
        pytest.skip("SKIPPED LOUDLY: this kernel has sit; the kvm tests cover that case")
    config = tmp_path / "gw.toml"
    config.write_text(GOOD_6TO4)
    result = _in_ns(netns, "check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.strip().startswith("backend"))
    assert "userspace" in line and "auto:" in line and "sit" in line, line
    probe = _in_ns(netns, "probe")
    assert probe.returncode == 0
    assert any(x.startswith("kernel sit") and " no " in x for x in probe.stdout.splitlines())
    assert any(x.startswith("backend") and "userspace" in x for x in probe.stdout.splitlines())


def test_kernel_backend_refused_without_sit(netns: str, tmp_path: Path) -> None:
    if _kernel_has_sit():
        pytest.skip("SKIPPED LOUDLY: this kernel has sit; the kvm tests cover that case")
    config = tmp_path / "gw.toml"
    config.write_text(GOOD_6TO4.replace("workers = 2", f'workers = 2\nbackend = "kernel"\n'
                                        f'run_dir = "{tmp_path}/run"'))
    result = _in_ns(netns, "run", "--config", str(config))
    assert result.returncode == 1
    assert 'backend = "kernel" but kernel sit is unavailable' in result.stderr, result.stderr
    assert "use backend" in result.stderr
    links = subprocess.run(["ip", "netns", "exec", netns, "ip", "-o", "link"],
                           capture_output=True, text=True, check=True).stdout
    assert "sit" not in links.replace("sit0", "")


def test_kernel_backend_input_policy_loads_and_opens_only_forwarded_ports(netns: str) -> None:
    """Issue 13, finding 4: the sit link's input policy (coordinator/kernel_backend.py) is
    valid nftables on this kernel and names exactly the forwarded ports and addresses; the
    kvm tests check what it lets through a real sit link."""
    from support.helpers import make_settings

    from sixgate.coordinator.kernel_backend import input_ruleset, table_name
    from sixgate.workers.engine.settings import Forward

    settings = make_settings("6in4", backend="kernel", forwards=(
        Forward("tcp", 80, 80, "127.0.0.1", 8080), Forward("udp", 53, 53, "127.0.0.1", 5353),
        Forward("tcp", 1000, 1010, "198.51.100.7", None)))
    rules = input_ruleset(settings, "sgtestsit")
    assert "tcp dport { 80, 1000-1010 } accept" in rules
    assert "udp dport { 53 } accept" in rules
    assert 'iifname != "sgtestsit" accept' in rules
    assert "ip saddr != { 198.51.100.7 }" in rules  # only the remote target may reach the pool
    assert rules.rstrip().endswith("}") and 'counter name "not_forwarded" drop' in rules
    loaded = subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=rules,
                            capture_output=True, text=True, check=False)
    assert loaded.returncode == 0, loaded.stderr
    listed = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "table", "inet",
                             table_name(settings)], capture_output=True, text=True, check=True)
    assert "not_forwarded" in listed.stdout
