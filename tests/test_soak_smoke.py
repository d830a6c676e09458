"""``make soak``'s short version (bench/soak.py): 2 s of each flood against the real gateway
while a real client downloads 10 MB. The download must complete under every flood and the
gateway must count no internal error (bench/soak.py exits 1 / raises otherwise); the figures
themselves (rates, times, RSS) are printed, never asserted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lab import netlab

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.lab


def test_soak_short_version_every_download_completes_under_each_flood() -> None:
    missing = netlab.missing_requirements()
    if not shutil.which("gcc"):
        missing.append("gcc is missing (bench/bootstrap.sh installs it)")
    if missing:
        reason = "LAB TESTS CANNOT RUN: " + "; ".join(missing)
        if os.environ.get("SIXGATE_LAB_REQUIRED") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    done = subprocess.run([sys.executable, "-m", "bench.soak", "--seconds", "2",
                           "--download-timeout", "90"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    for flood in ("syn", "fragments", "overload"):
        line = next((x for x in done.stdout.splitlines() if x.strip().startswith(flood)), "")
        assert "download" in line and "FAILED" not in line, done.stdout
    # Each flood was seen by the gateway and met the limit meant for it.
    assert "prefix_flow_limit" in done.stdout, done.stdout
    assert "fragment_limit" in done.stdout, done.stdout
    assert "kernel+conntrack SYN flood" in done.stdout, done.stdout
