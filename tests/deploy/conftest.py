"""Fixtures of the deploy tests: a fleet of SSH hosts in namespaces (fleet.py) and a wheelhouse.

Without root, /dev/net/tun, sshd (Debian openssh-server) or ansible-playbook the ``-m deploy``
tests are skipped with the reason, said loudly in the terminal summary; with
``SIXGATE_LAB_REQUIRED=1`` (CI) a missing requirement fails them instead.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import fleet as fleet_module
import pytest

_skip_reason: list[str] = []
STAGE_SECONDS = fleet_module.STAGE_SECONDS


@pytest.fixture(scope="module")
def fleet() -> Iterator[fleet_module.Fleet]:
    """Four hosts with sshd, the controller and the IPv6 side; all removed afterwards."""
    unmet = "; ".join(fleet_module.missing_requirements())
    if unmet and os.environ.get("SIXGATE_LAB_REQUIRED") == "1":
        pytest.fail(f"DEPLOY TESTS CANNOT RUN: {unmet}", pytrace=False)
    elif unmet:
        _skip_reason.append(f"DEPLOY TESTS CANNOT RUN: {unmet}")
        pytest.skip(_skip_reason[-1])
    fleet_module.sweep_leftovers()
    with fleet_module.sigterm_as_interrupt(), fleet_module.open_fleet(4) as the_fleet:
        yield the_fleet
    leftovers = [ns for ns in fleet_module.netlab.list_namespaces()
                 if ns.startswith(f"{the_fleet.tag}-")]
    assert not leftovers, f"namespaces left behind: {leftovers}"
    assert not the_fleet.tmp.exists(), f"{the_fleet.tmp} left behind"


@pytest.fixture(scope="module")
def wheelhouse(fleet: fleet_module.Fleet) -> Path:
    """This checkout's wheel and its dependencies, plus the same checkout as <version>+upgrade:
    built once, on the controller (with the package index at hand), as an operator would."""
    out = fleet.tmp / "wheelhouse"
    for extra in ([], ["--local-version", "upgrade", "--no-deps"]):
        done = subprocess.run([*fleet_module.netlab.sixgate_command(), "deploy", "build",
                               "--out", str(out), *extra], capture_output=True, text=True,
                              timeout=600, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    return out


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly that the deploy tests did not run; show how long each stage took."""
    for reason in _skip_reason[:1]:
        terminalreporter.write_sep("!", reason, red=True, bold=True)
    if STAGE_SECONDS:
        stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in STAGE_SECONDS.items())
        terminalreporter.write_line(f"deploy stages: {stages}; total "
                                    f"{sum(STAGE_SECONDS.values()):.0f} s")
