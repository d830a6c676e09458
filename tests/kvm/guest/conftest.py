"""Set-up of the tests that run INSIDE the qemu guest (tools/vmrun.py, Debian's own kernel).

Every test here is marked ``kvm`` and is skipped anywhere but in the guest: they create
namespaces, tunnels and modules, which belong in a throw-away kernel. In the guest, with
``SIXGATE_VM_REPORT=1`` (set by the host's guest_session fixture), the session ends with the
per-test report the host twins read (tests/kvm/guestreport.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import guestnet
import guestreport
import pytest

GUEST_DIR = Path(__file__).resolve().parent


def in_vm() -> bool:
    """vmrun.py's guest: its environment variable, and its job on the kernel command line."""
    try:
        cmdline = Path("/proc/cmdline").read_text()
    except OSError:
        return False
    return os.environ.get("SIXGATE_IN_VM") == "1" and "sixgate_job=" in cmdline


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("SIXGATE_VM_REPORT") == "1":
        config.pluginmanager.register(guestreport.ReportPlugin(), "sixgate-guest-report")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    outside = not in_vm()
    for item in items:
        if GUEST_DIR in item.path.parents:
            item.add_marker(pytest.mark.kvm)
            if outside:
                item.add_marker(pytest.mark.skip(
                    reason="runs only inside the VM: python tools/vmrun.py -- python -m pytest "
                           "tests/kvm/guest (or pytest tests/kvm on the host)"))


@pytest.fixture
def netns() -> Iterator[Callable[[str], str]]:
    """Factory of network namespaces named after the test's purpose; all deleted at the end."""
    created: list[str] = []

    def make(purpose: str) -> str:
        name = guestnet.add_namespace(purpose)
        created.append(name)
        return name

    yield make
    for name in reversed(created):
        guestnet.delete_namespace(name)
