"""The CI share of ``make fuzz`` (bench/fuzz.py): 100k mutated protocol-41 packets of every
kind through the default (kernel fan-out) entry of a 6to4 and a 6in4 engine; not one raises."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import fuzz  # noqa: E402


def test_100k_mutated_packets_never_raise(capsys: object) -> None:
    assert fuzz.run(100_000, seed=41) == 0
