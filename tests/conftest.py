"""Root of the suites: the one INTERNAL_ERROR guard. Every engine a test makes through
``support.helpers.make_datapath`` must end the test with no packet counted as internal_error
(workers/engine/drops.py: a packet that raised inside the engine is a bug, whatever the suite)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import helpers


@pytest.fixture(autouse=True)
def no_internal_error() -> Iterator[None]:
    helpers.internal_errors()
    yield
    assert helpers.internal_errors() == 0, "a packet raised inside the engine (INTERNAL_ERROR)"
