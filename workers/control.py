"""The control protocol between ``sixgate`` commands, the coordinator and the workers.

ZeroMQ REQ/REP over ``ipc://`` sockets in the run directory, one JSON object each way:
request ``{"v": 1, "cmd": "ping" | "flows"}``, reply ``{"v": 1, "ok": true, ...}`` or
``{"v": 1, "ok": false, "error": "..."}``. Versioned and plain JSON (never pickle), so the same
requests work over ``tcp://`` once workers live on other hosts.
"""

from __future__ import annotations

import json
import os
from typing import Any

CONTROL_VERSION = 1


def coordinator_endpoint(run_dir: str) -> str:
    """Where the coordinator answers ``sixgate flows`` and friends."""
    return f"ipc://{run_dir}/control"


def data_endpoint(run_dir: str, index: int) -> str:
    """Where the coordinator pushes batches for worker ``index``."""
    return f"ipc://{run_dir}/worker-{index}.data"


def control_endpoint(run_dir: str, index: int) -> str:
    """Where worker ``index`` answers control requests."""
    return f"ipc://{run_dir}/worker-{index}.ctl"


def request(cmd: str) -> dict[str, Any]:
    return {"v": CONTROL_VERSION, "cmd": cmd}


def parse_request(raw: bytes) -> tuple[str, dict[str, Any] | None]:
    """The command of a request, or ("", the error reply to send instead)."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return "", error("bad json")
    if not isinstance(doc, dict) or doc.get("v") != CONTROL_VERSION:
        return "", error(f"unsupported control version; this is version {CONTROL_VERSION}")
    return str(doc.get("cmd", "")), None


def ok(**fields: Any) -> dict[str, Any]:
    return {"v": CONTROL_VERSION, "ok": True, "pid": os.getpid(), **fields}


def error(message: str) -> dict[str, Any]:
    return {"v": CONTROL_VERSION, "ok": False, "error": message}
