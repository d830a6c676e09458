"""Layering (STYLE.md "Layers and direction"): the engine and the flow table do no I/O and
read no clock or randomness; nothing in workers/ imports the coordinator. Checked on the
source with ``ast``, so a lazy import inside a function is caught as well."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

WORKERS = Path(__file__).resolve().parents[2] / "workers"
ENGINE = WORKERS / "engine"
# Default deny: an engine module may import these standard library modules and the engine
# package itself, nothing else. A new module under workers/engine/ is checked without being
# listed anywhere; a new import needs a reason to be added here.
ENGINE_MAY_IMPORT = frozenset({"__future__", "bisect", "collections", "dataclasses", "enum",
                               "heapq", "ipaddress", "itertools", "json", "struct", "typing",
                               "zlib"})
# What the engine must never reach, named so the allow-list can be checked against it: I/O,
# clocks, randomness, processes, threads, native code.
FORBIDDEN = frozenset({"socket", "zmq", "prometheus_client", "pyroute2", "logging", "time",
                       "random", "os", "select", "ctypes", "mmap", "fcntl", "subprocess",
                       "asyncio", "threading", "multiprocessing", "signal", "pathlib", "io",
                       "sys"})


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


ENGINE_FILES = sorted(ENGINE.rglob("*.py"))


def test_the_engine_package_holds_the_engine() -> None:
    names = {path.stem for path in ENGINE_FILES}
    assert {"packet", "tunnel", "translate", "icmp", "fragment", "flows", "fastpath",
            "datapath", "drops"} <= names, names


def test_allow_list_and_forbidden_list_do_not_meet() -> None:
    assert not ENGINE_MAY_IMPORT & FORBIDDEN


@pytest.mark.parametrize("path", ENGINE_FILES, ids=lambda path: path.stem)
def test_engine_modules_import_only_the_allowed_stdlib_and_the_engine(path: Path) -> None:
    for name in sorted(imported_modules(path.read_text())):
        parts = name.split(".")
        if parts[0] == "sixgate":
            # ``from sixgate.workers.engine.x import y`` lists ...x.y too: x is checked.
            assert len(parts) > 3 and parts[1:3] == ["workers", "engine"], \
                f"workers/engine/{path.name} imports {name}, outside the engine"
        else:
            assert parts[0] in ENGINE_MAY_IMPORT, \
                f"workers/engine/{path.name} imports {name}, not in the engine's allow-list"


def test_nothing_in_workers_imports_coordinator() -> None:
    files = sorted(WORKERS.rglob("*.py"))
    assert len(files) > len(ENGINE_FILES)
    for path in files:
        names = imported_modules(path.read_text())
        assert not any(name == "sixgate.coordinator" or name.startswith("sixgate.coordinator.")
                       for name in names), f"{path.relative_to(WORKERS.parent)} imports it"
        assert "coordinator" not in top_levels(names), path


def test_the_engines_compiled_loops_include_nothing_that_does_io() -> None:
    """workers/engine/_fastpath.c is the engine too: it may include Python's API (with its
    member definitions: the Session's slots) and the C headers of integers and memory
    copies, nothing that reaches a file, socket, clock or process (the same rule as
    FORBIDDEN for the Python modules)."""
    source = (WORKERS / "engine" / "_fastpath.c").read_text()
    includes = set(re.findall(r"^#include\s+[<\"]([^>\"]+)[>\"]", source, re.M))
    assert includes == {"Python.h", "structmember.h", "stdint.h", "string.h"}, includes
