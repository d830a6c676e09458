"""The CI share of ``make fuzz`` (bench/fuzz.py): 100k mutated protocol-41 packets of every
kind through the default (kernel fan-out) entry of a 6to4 and a 6in4 engine; not one raises."""

from __future__ import annotations

from bench import fuzz


def test_100k_mutated_packets_never_raise(capsys: object) -> None:
    assert fuzz.run(100_000, seed=41) == 0
