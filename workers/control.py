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


# A request is a few dozen bytes; anything far larger is refused before it is parsed.
MAX_REQUEST_BYTES = 4096
# ``flows`` answers at most this many bindings per worker (``limit`` asks for fewer): a worker
# serializes them inside its packet loop, so the work per request is bounded.
FLOWS_PAGE_DEFAULT = 1000
FLOWS_PAGE_MAX = 10_000


def request(cmd: str, **args: Any) -> dict[str, Any]:
    return {"v": CONTROL_VERSION, "cmd": cmd, **args}


def parse_request(frames: list[bytes]) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """(command, the request's fields, None), or ("", {}, the error reply to send instead).

    Whatever arrives is answered: more than one frame, an oversized or deeply nested body
    (json raises RecursionError, not ValueError, on those), a wrong version."""
    if len(frames) != 1:
        return "", {}, error(f"a request is one frame, not {len(frames)}")
    raw = frames[0]
    if len(raw) > MAX_REQUEST_BYTES:
        return "", {}, error(f"request of {len(raw)} bytes; at most {MAX_REQUEST_BYTES}")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return "", {}, error("bad json")
    if not isinstance(doc, dict) or doc.get("v") != CONTROL_VERSION:
        return "", {}, error(f"unsupported control version; this is version {CONTROL_VERSION}")
    cmd = doc.get("cmd", "")
    if not isinstance(cmd, str):
        return "", {}, error("cmd must be a string")
    return cmd, doc, None


def page_limit(fields: dict[str, Any]) -> int:
    """How many bindings a ``flows`` request may get (``limit``, bounded)."""
    limit = fields.get("limit", FLOWS_PAGE_DEFAULT)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        return FLOWS_PAGE_DEFAULT
    return min(limit, FLOWS_PAGE_MAX)


def ok(**fields: Any) -> dict[str, Any]:
    return {"v": CONTROL_VERSION, "ok": True, "pid": os.getpid(), **fields}


def error(message: str) -> dict[str, Any]:
    return {"v": CONTROL_VERSION, "ok": False, "error": message}
