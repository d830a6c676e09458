"""Static checks of STYLE.md: ruff (E, F, W, I, B, UP) on the tree, mypy --strict on workers/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> list[str]:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return [str(exe)]
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"SKIPPED: {name} is not installed (pip install -e '.[test]' brings it)")
    return [found]


def test_ruff_clean() -> None:
    result = subprocess.run([*_tool("ruff"), "check", "coordinator", "workers", "tests"],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_workers() -> None:
    result = subprocess.run([*_tool("mypy")], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_test_module_basenames_are_unique() -> None:
    """pytest imports test modules by basename (rootdir, no packages): two of one name stop
    the whole run at collection, which only the full suite shows."""
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if "guest" in path.parts:
            continue  # collected only inside the VM, on its own
        other = seen.setdefault(path.name, path)
        if other != path:
            clashes.append(f"{other.relative_to(ROOT)} and {path.relative_to(ROOT)}")
    assert not clashes, "rename one of each: " + "; ".join(clashes)
