"""How the guest's pytest hands its per-test results to the host: one JSON line between markers.

The guest has no way to write files the host can read (its root is a tmpfs overlay), but its
stdout reaches the host live through ``tools/vmrun.py``. So the guest session, when
``SIXGATE_VM_REPORT=1``, ends by printing::

    ----- sixgate guest report begin -----
    {"pytest_exit": 0, "tests": {"tests/kvm/guest/test_guest.py::test_x": {...}}, ...}
    ----- sixgate guest report end -----

This module is imported on both sides: ``ReportPlugin`` runs in the guest, ``parse`` on the host.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

BEGIN = "----- sixgate guest report begin -----"
END = "----- sixgate guest report end -----"


class ReportPlugin:
    """Collects one result per test id (setup, call and teardown folded) and prints them."""

    def __init__(self) -> None:
        self.tests: dict[str, dict[str, Any]] = {}
        self.collect_errors: dict[str, str] = {}

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collect_errors[report.nodeid] = str(report.longrepr)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        result = self.tests.setdefault(
            report.nodeid, {"outcome": "passed", "details": "", "duration_s": 0.0})
        result["duration_s"] += report.duration
        # Each phase's report carries the output captured so far, so the last one has it all.
        result["sections"] = [[title, text] for title, text in report.sections]
        if report.failed:
            failure = "failed" if report.when == "call" else "error"
            if result["outcome"] != "failed":
                result["outcome"] = failure
            result["details"] += f"[{report.when}] {report.longrepr}\n"
        elif report.skipped and result["outcome"] == "passed":
            result["outcome"] = "skipped"
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            result["details"] += f"{reason}\n"

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, exitstatus: int) -> None:
        document = {"pytest_exit": int(exitstatus), "tests": self.tests,
                    "collect_errors": self.collect_errors}
        # Capture is suspended between tests, so this reaches the real stdout (vmrun's port).
        print(f"\n{BEGIN}\n{json.dumps(document)}\n{END}", file=sys.stdout, flush=True)


def parse(stdout: str) -> dict[str, Any] | None:
    """The guest's report from its stdout, or None when the session never got to print it."""
    begin = stdout.rfind(BEGIN)
    end = stdout.find(END, begin)
    if begin < 0 or end < 0:
        return None
    try:
        document: dict[str, Any] = json.loads(stdout[begin + len(BEGIN):end])
    except ValueError:
        return None
    return document
