"""Differential suite set-up: scapy is the independent implementation that reads what the
engine writes and writes what the engine reads. Shared helpers are ``support``; the
INTERNAL_ERROR guard is tests/conftest.py's."""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("sixgate-differential", max_examples=60, deadline=None)
settings.load_profile("sixgate-differential")
