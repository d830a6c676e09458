"""workers/main.py InternalErrorLog: a packet that raises is logged at most once per interval,
by the workers and by the coordinator's capture loop alike (a flood of such packets must not
flood the log)."""

from __future__ import annotations

import logging

import pytest

from sixgate.workers import main


def test_a_flood_of_raising_packets_is_logged_once_per_interval(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(main.time, "monotonic", lambda: clock[0])
    errors = main.InternalErrorLog("coordinator")
    with caplog.at_level(logging.ERROR, logger="sixgate"):
        for _ in range(500):
            errors.packet_raised(ValueError("bug"))
        clock[0] += main.TRACEBACK_LOG_INTERVAL_S
        errors.packet_raised(ValueError("bug"))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["coordinator: packet raised ValueError('bug') (counted as internal_error)"] * 2
