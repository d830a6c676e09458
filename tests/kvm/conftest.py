"""Fixtures of the VM tests: one qemu guest per pytest session (see vmsession.py).

Without qemu-system-x86_64, busybox-static or a kernel package from apt, every VM test is
skipped with the reason and a banner in the terminal summary says so; with
``SIXGATE_KVM_REQUIRED=1`` (set it in CI) they fail instead.

tests/kvm/guest/ holds the tests that run INSIDE the guest; it is collected only there
(``SIXGATE_IN_VM=1``, set by tools/vmrun.py).
"""

from __future__ import annotations

import os

import pytest
import vmsession

collect_ignore = [] if os.environ.get("SIXGATE_IN_VM") == "1" else ["guest"]

_skip_reason: list[str] = []
_session_summary: list[str] = []


@pytest.fixture(scope="session")
def guest_session(request: pytest.FixtureRequest) -> vmsession.GuestSession:
    """Prepare the VM cache, then run the guest tests whose twins were selected (all of them
    when none was) in one VM. Never fails for what happened inside the guest: each host twin
    judges its own test."""
    try:
        vmsession.prepare()
    except vmsession.CannotRun as error:
        reason = f"KVM TESTS CANNOT RUN: {error}"
        if vmsession.REQUIRED:
            pytest.fail(reason + " (SIXGATE_KVM_REQUIRED=1)", pytrace=False)
        _skip_reason.append(reason)
        pytest.skip(reason)
    selected: set[str] = {
        nodeid for item in request.session.items
        if (nodeid := getattr(getattr(item, "function", None), "guest_nodeid", None))}
    if selected and selected != set(vmsession.guest_tests().values()):
        requested = sorted(selected)
    else:  # the whole directory, so a guest test that has no twin shows up as an orphan
        requested = [str(vmsession.GUEST_DIR.relative_to(vmsession.REPO_ROOT))]
    session = vmsession.run_session(requested)
    _session_summary.append(
        f"kvm: one VM session ran {len(session.tests)} guest test(s) in {session.elapsed_s:.1f} s"
        f" (vmrun exit {session.vmrun_exit})")
    # Where the guest's time goes (the rest is the boot and the guest pytest's own start-up).
    _session_summary.extend(
        f"  {result['duration_s']:6.1f} s  {nodeid}"
        for nodeid, result in sorted(session.tests.items(), key=lambda kv: -kv[1]["duration_s"]))
    return session


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly that the VM tests did not run; otherwise how long the VM session took."""
    for reason in _skip_reason[:1]:
        terminalreporter.write_sep("!", reason, red=True, bold=True)
    for line in _session_summary:
        terminalreporter.write_line(line)
