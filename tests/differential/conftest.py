"""Differential suite set-up: scapy is the independent implementation that reads what the
engine writes and writes what the engine reads. Shared helpers come from tests/unit."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

import helpers  # noqa: E402

settings.register_profile("sixgate-differential", max_examples=60, deadline=None)
settings.load_profile("sixgate-differential")


@pytest.fixture(autouse=True)
def no_internal_error() -> Iterator[None]:
    helpers.internal_errors()
    yield
    assert helpers.internal_errors() == 0, "a packet raised inside the engine (INTERNAL_ERROR)"
