"""Host twins of the guest tests: one host test per test function in tests/kvm/guest/test_*.py.

The twins are generated from the guest modules' source, so a new guest test needs nothing
here: guest ``test_x`` appears on the host as ``tests/kvm/test_in_vm.py::test_x`` and passes
only if ``test_x`` (every parameter set of it) passed in the VM; on failure it shows the guest's
traceback and captured output. A guest test skipped inside the VM is skipped here with the
guest's reason, or fails under ``SIXGATE_KVM_REQUIRED=1``. ``-k`` on the host also narrows
what the guest runs.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import vmsession
from vmsession import GuestSession

pytestmark = pytest.mark.kvm

GUEST_TESTS = vmsession.guest_tests()


def _twin(name: str, guest_nodeid: str) -> Callable[[GuestSession], None]:
    def twin(guest_session: GuestSession) -> None:
        vmsession.check_guest_test(guest_session, guest_nodeid)

    twin.__name__ = twin.__qualname__ = name
    twin.__doc__ = f"{guest_nodeid} passed inside the VM."
    twin.guest_nodeid = guest_nodeid  # type: ignore[attr-defined]  # read by guest_session
    return twin


for _name, _guest_nodeid in GUEST_TESTS.items():
    globals()[_name] = _twin(_name, _guest_nodeid)


def test_guest_session_reported_every_requested_test(guest_session: GuestSession) -> None:
    """The guest collected cleanly, every requested guest test reported, and every guest
    result has a twin (a test in a class or a subdirectory would otherwise pass unseen)."""
    if guest_session.report is None:
        pytest.fail(f"the guest session produced no report; vmrun exit "
                    f"{guest_session.vmrun_exit}\n{guest_session.transcript_tail()}",
                    pytrace=False)
    errors = guest_session.report["collect_errors"]
    assert not errors, "guest collection errors:\n" + "\n".join(
        f"{nodeid}: {text}" for nodeid, text in errors.items())
    twins = set(GUEST_TESTS.values())
    orphans = [nodeid for nodeid in guest_session.tests if nodeid.split("[")[0] not in twins]
    assert not orphans, f"guest tests without a host twin (module-level functions only): {orphans}"
    whole_dir = not any("::" in requested for requested in guest_session.requested)
    expected = twins if whole_dir else set(guest_session.requested)
    silent = sorted(nodeid for nodeid in expected if not guest_session.results_for(nodeid))
    assert not silent, f"requested guest tests that reported nothing: {silent}"
