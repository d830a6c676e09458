"""Property suite set-up: a modest hypothesis profile (the whole suite runs in well under a
minute). Shared helpers are ``support``; the INTERNAL_ERROR guard is tests/conftest.py's."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "sixgate", max_examples=150, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("sixgate")
