"""Fixtures of the real-network lab: one lab + real ``sixgate run`` per (mode, workers).

The lab needs root, /dev/net/tun and iproute2/ping/dig/dnsmasq/curl/ss. Without them every lab
test is skipped with the reason, and a banner in the terminal summary says so; with
``SIXGATE_LAB_REQUIRED=1`` (set it in CI) a missing requirement is an error instead.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator

import netlab
import pytest

_skip_reason: list[str] = []


@pytest.fixture(scope="session")
def io_uring() -> None:
    """For tests of the io_uring path: a loud skip on a host that refuses io_uring, an error
    under SIXGATE_LAB_REQUIRED=1 (CI's hosts allow it)."""
    refused = netlab.io_uring_refusal()
    if refused:
        if os.environ.get("SIXGATE_LAB_REQUIRED") == "1":
            pytest.fail(refused, pytrace=False)
        pytest.skip(refused)


@pytest.fixture(scope="session")
def served_files() -> Iterator[netlab.ServedFiles]:
    """Check requirements, sweep leftovers of dead runs, make the document root once."""
    missing = netlab.missing_requirements()
    if missing:
        reason = "LAB TESTS CANNOT RUN: " + "; ".join(missing)
        if os.environ.get("SIXGATE_LAB_REQUIRED") == "1":
            pytest.fail(reason, pytrace=False)
        _skip_reason.append(reason)
        pytest.skip(reason)
    netlab.sweep_leftovers()
    # SIGTERM (a CI timeout) becomes KeyboardInterrupt, so the finalizers still clean up.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    files = netlab.make_served_files()
    yield files
    shutil.rmtree(files.directory, ignore_errors=True)
    signal.signal(signal.SIGTERM, previous)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


@pytest.fixture(scope="class", params=[1, 4], ids=lambda workers: f"workers{workers}")
def lab(request: pytest.FixtureRequest, served_files: netlab.ServedFiles) -> Iterator[netlab.Lab]:
    """Lab + gateway for the class's MODE (and FANOUT, default "coordinator", and TUN_WRITES,
    default "io_uring") and this worker count, shared by the class's tests.

    Teardown proves the shutdown contract: no INTERNAL_ERROR drop over all the traffic,
    SIGTERM ends ``sixgate run`` with exit code 0 (asserted only if no test of the class failed,
    so one bug is not reported twice), and no link named after the gateway is left behind.
    """
    failed_before = request.session.testsfailed
    fanout = getattr(request.cls, "FANOUT", "coordinator")
    tun_writes = getattr(request.cls, "TUN_WRITES", "io_uring")
    with netlab.Lab(request.cls.MODE, request.param, served_files, fanout=fanout,
                    tun_writes=tun_writes) as the_lab:
        yield the_lab
        problems = netlab.shutdown_problems(the_lab, request.session.testsfailed > failed_before)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failing lab test, attach the gateway's stderr and the other processes' logs."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed and report.when == "call":
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, netlab.Lab):
                report.sections.append(("lab process logs", value.diagnostics()))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly that the real-network tests did not run."""
    for reason in _skip_reason[:1]:
        terminalreporter.write_sep("!", reason, red=True, bold=True)
