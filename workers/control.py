"""The control protocol between ``sixgate`` commands, the coordinator and the workers.

ZeroMQ REQ/REP over ``ipc://`` sockets in the run directory, one JSON object each way:
request ``{"v": 1, "cmd": "ping" | "flows"}``, reply ``{"v": 1, "ok": true, ...}`` or
``{"v": 1, "ok": false, "error": "..."}``. Versioned and plain JSON (never pickle), so the same
requests work over ``tcp://`` once workers live on other hosts. ``ask`` is the one client every
caller uses (``sixgate flows``, the coordinator asking its workers, /metrics and /readyz).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import zmq

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


def retiring_endpoint(run_dir: str, coordinator: int, index: int) -> str:
    """Where worker ``index`` of the coordinator with pid ``coordinator`` answers too: a
    kernel-backend relay keeps answering there after a take-over made its run retire (its
    ``worker-N`` endpoint is the next run's then), so the next run lists the connections it
    still carries."""
    return f"ipc://{run_dir}/relay-{coordinator}-{index}.ctl"


def ask_retiring(ctx: zmq.Context[Any], run_dir: str, coordinator: int, count: int, cmd: str,
                 timeout_ms: int, **args: Any) -> list[dict[str, Any]]:
    """``cmd`` to the relays of a retiring run (``retiring_endpoint``): the replies of those
    that still run, each with its ``index``."""
    endpoints = [retiring_endpoint(run_dir, coordinator, index) for index in range(count)]
    return [{**reply, "index": index}
            for index, reply in enumerate(ask(ctx, endpoints, request(cmd, **args), timeout_ms))
            if reply is not None and reply.get("ok")]


# A request is a few dozen bytes; anything far larger is refused before it is parsed. The
# coordinator takes a config file's text in ``reload`` (sixgate reload), up to a megabyte.
MAX_REQUEST_BYTES = 4096
MAX_RELOAD_BYTES = 1 << 20
# ``flows`` answers at most this many bindings per worker (``limit`` asks for fewer): a worker
# serializes them inside its packet loop, so the work per request is bounded.
FLOWS_PAGE_DEFAULT = 1000
FLOWS_PAGE_MAX = 10_000
# ``ask``: how soon ZeroMQ tries a connection again to a process still binding its socket.
RECONNECT_IVL_MS = 5


def request(cmd: str, **args: Any) -> dict[str, Any]:
    return {"v": CONTROL_VERSION, "cmd": cmd, **args}


def parse_request(frames: list[bytes], max_bytes: int = MAX_REQUEST_BYTES
                  ) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """(command, the request's fields, None), or ("", {}, the error reply to send instead).

    Whatever arrives is answered: more than one frame, an oversized or deeply nested body
    (json raises RecursionError, not ValueError, on those), a wrong version."""
    if len(frames) != 1:
        return "", {}, error(f"a request is one frame, not {len(frames)}")
    raw = frames[0]
    if len(raw) > max_bytes:
        return "", {}, error(f"request of {len(raw)} bytes; at most {max_bytes}")
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


def error(message: str, **fields: Any) -> dict[str, Any]:
    return {"v": CONTROL_VERSION, "ok": False, "error": message, **fields}


def ask(ctx: zmq.Context[Any], endpoints: list[str], req: dict[str, Any],
        timeout_ms: int) -> list[dict[str, Any] | None]:
    """Send ``req`` to every endpoint at once; each one's reply (a JSON object), or None for an
    endpoint that did not answer within ``timeout_ms`` (all share the one deadline) or
    answered something that is not a JSON object."""
    replies: list[dict[str, Any] | None] = [None] * len(endpoints)
    sockets = []
    poller = zmq.Poller()
    try:
        for endpoint in endpoints:
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            # A process that is starting binds its endpoint any moment: ZeroMQ tries the
            # connection again after RECONNECT_IVL_MS, not its default 100 ms (a start's, a
            # take-over's and a restarted worker's wait for the first answer).
            sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
            sock.connect(endpoint)
            sock.send_json(req)
            sockets.append(sock)
            poller.register(sock, zmq.POLLIN)
        position = {sock: index for index, sock in enumerate(sockets)}
        deadline = time.monotonic() + timeout_ms / 1000
        pending = len(sockets)
        while pending:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            for sock, _event in poller.poll(left_ms):
                poller.unregister(sock)
                pending -= 1
                try:
                    reply = json.loads(sock.recv())
                except (ValueError, RecursionError):
                    continue
                if isinstance(reply, dict):
                    replies[position[sock]] = reply
    finally:
        for sock in sockets:
            sock.close(0)
    return replies


def ask_workers(ctx: zmq.Context[Any], run_dir: str, count: int, cmd: str,
                timeout_ms: int, **args: Any) -> list[dict[str, Any] | None]:
    """``cmd`` to every worker at once; each one's successful reply, else None."""
    endpoints = [control_endpoint(run_dir, index) for index in range(count)]
    return [reply if reply is not None and reply.get("ok") else None
            for reply in ask(ctx, endpoints, request(cmd, **args), timeout_ms)]
