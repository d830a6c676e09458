"""Layering (STYLE.md "Layers and direction"): the engine and the flow table do no I/O and
read no clock or randomness; nothing in workers/ imports the coordinator. Checked on the
source with ``ast``, so a lazy import inside a function is caught as well."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

WORKERS = Path(__file__).resolve().parents[2] / "workers"
PURE_MODULES = ("packet", "tunnel", "fragment", "icmp", "flows", "translate", "fastpath",
                "datapath", "wire", "settings", "counters", "drops")
FORBIDDEN = frozenset({"socket", "zmq", "prometheus_client", "pyroute2", "logging", "time",
                       "random", "os", "select"})


def imported_modules(source: str) -> set[str]:
    """Every module name an ``import``/``from ... import`` in ``source`` names, anywhere."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "__import__" and node.args
              and isinstance(node.args[0], ast.Constant)):
            names.add(str(node.args[0].value))
    return names


def top_levels(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def test_the_checker_itself_sees_every_import_form() -> None:
    source = ("import os\nimport logging.handlers\nfrom time import monotonic\n"
              "def f():\n    import socket\n    __import__('random')\n"
              "from coordinator.config import load\n")
    assert top_levels(imported_modules(source)) >= {"os", "logging", "time", "socket", "random",
                                                    "coordinator"}


@pytest.mark.parametrize("module", PURE_MODULES)
def test_engine_and_flow_table_modules_do_no_io(module: str) -> None:
    path = WORKERS / f"{module}.py"
    assert path.is_file(), f"{path} is missing"
    bad = top_levels(imported_modules(path.read_text())) & FORBIDDEN
    assert not bad, f"workers/{module}.py imports {sorted(bad)}"


def test_pure_modules_import_only_pure_workers_modules() -> None:
    for module in PURE_MODULES:
        names = imported_modules((WORKERS / f"{module}.py").read_text())
        for name in names:
            parts = name.split(".")
            if parts[0] == "workers" and len(parts) > 1 and parts[1] not in PURE_MODULES:
                # ``from workers.x import y`` lists workers.x.y too; only x matters
                pytest.fail(f"workers/{module}.py imports {name}, not an engine module")


def test_nothing_in_workers_imports_coordinator() -> None:
    files = sorted(WORKERS.rglob("*.py"))
    assert len(files) >= len(PURE_MODULES)
    for path in files:
        names = top_levels(imported_modules(path.read_text()))
        assert "coordinator" not in names, f"{path.relative_to(WORKERS.parent)} imports it"
