"""Host side of the VM tests: run the guest tests in ONE qemu guest and judge each result.

Python under qemu's software emulation is ~20x slower than on the host, so the guest is booted
once per pytest session (``tools/vmrun.py``), runs every requested guest test in one pytest
session and prints a per-test report (guestreport.py). Each host twin (test_in_vm.py) then
passes or fails with its guest test.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import guestreport
import pytest

KVM_DIR = Path(__file__).resolve().parent
REPO_ROOT = KVM_DIR.parents[1]
GUEST_DIR = KVM_DIR / "guest"
VMRUN = REPO_ROOT / "tools" / "vmrun.py"
EXIT_SETUP = 3  # vmrun.py: the VM cannot be prepared or started here
REQUIRED = os.environ.get("SIXGATE_KVM_REQUIRED") == "1"
# Downloading and unpacking the 70 MB kernel package takes ~10 s on a warm mirror.
PREPARE_TIMEOUT_S = 600
# A session takes about 300 s here alone and 600-710 s beside the rest of the suite (TCG, 2
# cores, twelve guest tests; the 6in4 kernel-backend test alone 60-150 s), 880 s on a host half
# as fast (2026-12-07): these bound a hang, with room for a slower machine under the same load.
SESSION_TIMEOUT_S = 2400
# Per guest test, so one hang fails that test instead of losing the whole session's report
# (above a take-over's two gateway starts: kernelgw.TAKE_OVER_READY_TIMEOUT_S).
GUEST_TEST_TIMEOUT_S = 900
TRANSCRIPT_TAIL_CHARS = 6000
RUNNING: list[subprocess.Popen[str]] = []  # vmrun.py processes of this pytest session


class CannotRun(Exception):
    """This machine cannot run the VM (no qemu, no busybox-static, no kernel from apt)."""


@dataclass
class GuestSession:
    """What the one VM session produced: vmrun's exit code, its output and the parsed report."""

    vmrun_exit: int
    stdout: str
    stderr: str
    elapsed_s: float
    requested: list[str]
    report: dict[str, Any] | None = None
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)

    def transcript_tail(self) -> str:
        text = (f"----- guest stdout -----\n{self.stdout}\n"
                f"----- guest stderr (and vmrun's messages) -----\n{self.stderr}")
        return text[-TRANSCRIPT_TAIL_CHARS:]

    def results_for(self, guest_nodeid: str) -> dict[str, dict[str, Any]]:
        """The guest results of one test function: its own id, or one id per parameter set."""
        return {nodeid: result for nodeid, result in self.tests.items()
                if nodeid == guest_nodeid or nodeid.startswith(guest_nodeid + "[")}


def guest_tests() -> dict[str, str]:
    """Guest test function name -> guest node id, read from the guest modules' source (they
    are never imported on the host). Names must be unique across guest modules."""
    found: dict[str, str] = {}
    for module in sorted(GUEST_DIR.glob("test_*.py")):
        tree = ast.parse(module.read_text(), filename=str(module))
        for node in tree.body:
            if (isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                    and node.name.startswith("test")):
                if node.name in found:
                    raise ValueError(f"guest test {node.name} is defined twice: "
                                     f"{found[node.name]} and {module}")
                found[node.name] = f"{module.relative_to(REPO_ROOT)}::{node.name}"
    return found


def prepare() -> None:
    """``vmrun.py --prepare``; CannotRun with vmrun's reason when this machine lacks a piece."""
    prepared = subprocess.run([sys.executable, str(VMRUN), "--prepare"], capture_output=True,
                              text=True, timeout=PREPARE_TIMEOUT_S, check=False)
    if prepared.returncode == EXIT_SETUP:
        lines = [line for line in prepared.stderr.splitlines() if line.strip()]
        raise CannotRun(lines[-1].removeprefix("vmrun: ").removeprefix("cannot run the VM: ")
                        if lines else "vmrun.py gave no reason")
    if prepared.returncode != 0:
        raise RuntimeError(f"vmrun.py --prepare exited {prepared.returncode}:\n{prepared.stderr}")


def guest_pytest_command(requested: list[str]) -> list[str]:
    # The guest uses the host's interpreter: it sees the host's root at the same paths.
    command = [sys.executable, "-m", "pytest", *requested, "-p", "no:cacheprovider",
               # hypothesis' plugin costs seconds to import under emulation and is unused here
               "-p", "no:hypothesispytest", "-v"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        command.append(f"--timeout={GUEST_TEST_TIMEOUT_S}")
    return command


def run_session(requested: list[str]) -> GuestSession:
    """One VM running the guest pytest on ``requested`` (node ids or the guest directory)."""
    env = dict(os.environ, SIXGATE_VM_REPORT="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTEST_ADDOPTS", None)  # the host's options (-k, -x ...) are not the guest's
    command = [sys.executable, str(VMRUN), "--timeout", str(SESSION_TIMEOUT_S),
               "--modules", "sit veth tun", "--", *guest_pytest_command(requested)]
    started = time.monotonic()
    with subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, errors="replace") as vmrun:
        RUNNING.append(vmrun)
        try:
            stdout, stderr = vmrun.communicate()
        finally:
            RUNNING.remove(vmrun)
    session = GuestSession(vmrun.returncode, stdout, stderr, time.monotonic() - started,
                           requested)
    session.report = guestreport.parse(stdout)
    if session.report is not None:
        session.tests = session.report["tests"]
    return session


def stop_running() -> None:
    """SIGTERM a VM session still running (by its vmrun PID: vmrun then kills its qemu and
    removes its files), e.g. when the host session ends early."""
    for vmrun in list(RUNNING):
        if vmrun.poll() is None:
            vmrun.terminate()


def check_guest_test(session: GuestSession, guest_nodeid: str) -> None:
    """Pass iff ``guest_nodeid`` passed in the VM; otherwise show what the guest said."""
    results = session.results_for(guest_nodeid)
    if not results:
        cause = ("the guest session produced no report" if session.report is None else
                 "the guest report has no result for it (collection error?)")
        pytest.fail(f"{guest_nodeid}: {cause}; vmrun exit {session.vmrun_exit}\n"
                    f"{session.transcript_tail()}", pytrace=False)
    failed = {nodeid: result for nodeid, result in results.items()
              if result["outcome"] in ("failed", "error")}
    if failed:
        pytest.fail("\n\n".join(
            f"{nodeid} {result['outcome'].upper()} in the VM ({result['duration_s']:.1f} s):\n"
            f"{result['details']}{_guest_output(result)}"
            for nodeid, result in failed.items()), pytrace=False)
    skipped = [f"{nodeid}: {result['details'].strip()}" for nodeid, result in results.items()
               if result["outcome"] == "skipped"]
    if len(skipped) == len(results):
        message = "skipped inside the VM: " + "; ".join(skipped)
        if REQUIRED:
            pytest.fail(message + " (SIXGATE_KVM_REQUIRED=1)", pytrace=False)
        pytest.skip(message)


def _guest_output(result: dict[str, Any]) -> str:
    return "".join(f"----- guest {title} -----\n{text}\n" for title, text in result["sections"])
