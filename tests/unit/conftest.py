"""Unit-suite fixtures: every test that drives a Datapath must leave INTERNAL_ERROR at 0."""

from __future__ import annotations

from collections.abc import Iterator

import helpers
import pytest


@pytest.fixture(autouse=True)
def no_internal_error() -> Iterator[None]:
    helpers.internal_errors()
    yield
    assert helpers.internal_errors() == 0, "a packet raised inside the engine (INTERNAL_ERROR)"
