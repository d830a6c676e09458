"""Property suite set-up: shared helpers from tests/unit on the path, a modest hypothesis
profile (the whole suite runs in well under a minute), and the INTERNAL_ERROR guard."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

import helpers  # noqa: E402

settings.register_profile(
    "sixgate", max_examples=150, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("sixgate")


@pytest.fixture(autouse=True)
def no_internal_error() -> Iterator[None]:
    helpers.internal_errors()
    yield
    assert helpers.internal_errors() == 0, "a packet raised inside the engine (INTERNAL_ERROR)"
