"""Fixtures of the VM tests: one qemu guest per pytest session (see vmsession.py).

Without qemu-system-x86_64, busybox-static or a kernel package from apt, every VM test is
skipped with the reason and a banner in the terminal summary says so; with
``SIXGATE_KVM_REQUIRED=1`` (set it in CI) they fail instead.

tests/kvm/guest/ holds the tests that run INSIDE the guest; it is collected only there
(``SIXGATE_IN_VM=1``, set by tools/vmrun.py).

The VM session is the suite's longest block (five to six minutes under emulation) and mostly
waits on a qemu process, so it starts in a background thread as soon as collection is done and
the host twins run last: by then the guest has usually finished beside the rest of the suite.
``SIXGATE_KVM_BACKGROUND=0`` runs it in place instead (when the twins' turn comes).
"""

from __future__ import annotations

import os
import threading

import pytest
import vmsession

collect_ignore = [] if os.environ.get("SIXGATE_IN_VM") == "1" else ["guest"]

_skip_reason: list[str] = []
_session_summary: list[str] = []
BACKGROUND = os.environ.get("SIXGATE_KVM_BACKGROUND", "1") != "0"


class _Background:
    """The one VM session, run by a thread from the end of collection on."""

    def __init__(self, requested: list[str]) -> None:
        self.requested = requested
        self.session: vmsession.GuestSession | None = None
        self.cannot_run: vmsession.CannotRun | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="kvm-session", daemon=True)

    def _run(self) -> None:
        try:
            self.session = _prepare_and_run(self.requested)
        except vmsession.CannotRun as error:
            self.cannot_run = error
        except BaseException as error:  # noqa: BLE001 - handed to the fixture, which raises it
            self.error = error


_background: list[_Background] = []


def _requested(items: list[pytest.Item]) -> list[str]:
    """The guest node ids whose twins were selected (the whole directory when all were)."""
    selected: set[str] = {
        nodeid for item in items
        if (nodeid := getattr(getattr(item, "function", None), "guest_nodeid", None))}
    if selected and selected != set(vmsession.guest_tests().values()):
        return sorted(selected)
    # the whole directory, so a guest test that has no twin shows up as an orphan
    return [str(vmsession.GUEST_DIR.relative_to(vmsession.REPO_ROOT))]


def _prepare_and_run(requested: list[str]) -> vmsession.GuestSession:
    vmsession.prepare()
    return vmsession.run_session(requested)


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: a VM only for twins that will run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The VM twins run last, and their VM starts now in the background (module docstring)."""
    if os.environ.get("SIXGATE_IN_VM") == "1":
        return
    twins = [item for item in items if "guest_session" in getattr(item, "fixturenames", ())]
    if not twins:
        return
    others = [item for item in items if "guest_session" not in getattr(item, "fixturenames",
                                                                        ())]
    items[:] = others + twins
    if BACKGROUND and not config.option.collectonly:
        background = _Background(_requested(twins))
        _background.append(background)
        background.thread.start()


@pytest.fixture(scope="session")
def guest_session(request: pytest.FixtureRequest) -> vmsession.GuestSession:
    """The VM session (started in the background at collection, else here): the guest tests
    whose twins were selected (all of them when none was) in one VM. Never fails for what
    happened inside the guest: each host twin judges its own test."""
    cannot_run: vmsession.CannotRun | None = None
    session: vmsession.GuestSession | None = None
    if _background:
        background = _background[0]
        background.thread.join()
        if background.error is not None:
            raise background.error
        cannot_run, session = background.cannot_run, background.session
    else:
        try:
            session = _prepare_and_run(_requested(request.session.items))
        except vmsession.CannotRun as error:
            cannot_run = error
    if cannot_run is not None or session is None:
        reason = f"KVM TESTS CANNOT RUN: {cannot_run}"
        if vmsession.REQUIRED:
            pytest.fail(reason + " (SIXGATE_KVM_REQUIRED=1)", pytrace=False)
        _skip_reason.append(reason)
        pytest.skip(reason)
    _session_summary.append(
        f"kvm: one VM session ran {len(session.tests)} guest test(s) in {session.elapsed_s:.1f} s"
        f" (vmrun exit {session.vmrun_exit})")
    # Where the guest's time goes (the rest is the boot and the guest pytest's own start-up).
    _session_summary.extend(
        f"  {result['duration_s']:6.1f} s  {nodeid}"
        for nodeid, result in sorted(session.tests.items(), key=lambda kv: -kv[1]["duration_s"]))
    return session


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A session ended before the twins ran (-x, Ctrl-C): its VM does not outlive it."""
    vmsession.stop_running()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly that the VM tests did not run; otherwise how long the VM session took."""
    for reason in _skip_reason[:1]:
        terminalreporter.write_sep("!", reason, red=True, bold=True)
    for line in _session_summary:
        terminalreporter.write_line(line)
