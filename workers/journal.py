"""The shard journal's wire and the coordinator's copy (issue 17: no connection lost when a
worker crashes).

A worker journals the sessions it makes, changes (TCP state, assurance) and removes
(``FlowTable.take_journal``) and pushes them to the coordinator at most every
``FLUSH_INTERVAL_S`` over ZeroMQ (``ipc://<run_dir>/journal``), one JSON message per flush,
never pickle: a worker is the less trusted side. The coordinator keeps each worker's shard as
``ShardCopy`` and, before it starts a worker again after a crash, writes that shard to
``<run_dir>/worker-<i>.shard``; the new worker resumes it (``FlowTable.restore``, which checks
every record) and deletes the file.

What a crash can lose: the sessions made or changed in the last flush interval before it (at
most ``FLUSH_INTERVAL_S`` of new flows; their packets then meet no session, like after any
restart). Timers restart at the resumption, so a resumed session can only live longer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sixgate.workers.engine.flows import Key, Record, journal_key, record_key

FLUSH_INTERVAL_S = 0.05
JOURNAL_VERSION = 1
# The coordinator's copy of a shard holds at most this many times the worker's flow limit:
# a worker that misbehaves cannot grow the coordinator without bound.
COPY_SLACK = 2


def journal_endpoint(run_dir: str) -> str:
    """Where the workers push their journals (the coordinator pulls)."""
    return f"ipc://{run_dir}/journal"


def shard_path(run_dir: str, index: int) -> Path:
    """The shard the coordinator hands to worker ``index`` when it starts it again."""
    return Path(run_dir) / f"worker-{index}.shard"


def encode(index: int, records: list[Record], removed: list[Key]) -> bytes:
    return json.dumps({"v": JOURNAL_VERSION, "worker": index, "records": records,
                       "removed": [journal_key(key) for key in removed]},
                      separators=(",", ":")).encode()


class ShardCopy:
    """The coordinator's copy of every worker's shard, built from their journal messages."""

    def __init__(self, workers: int, limit_per_worker: int) -> None:
        self.shards: list[dict[tuple[Any, ...], list[Any]]] = [{} for _ in range(workers)]
        self.limit = limit_per_worker * COPY_SLACK
        self.refused = 0  # messages or records not applied (malformed, over the limit)

    def apply(self, message: bytes) -> int | None:
        """Apply one journal message; the worker it came from, or None when refused."""
        try:
            doc = json.loads(message)
            index = doc["worker"]
            records, removed = doc["records"], doc["removed"]
            if (doc.get("v") != JOURNAL_VERSION or not isinstance(index, int)
                    or not 0 <= index < len(self.shards) or not isinstance(records, list)
                    or not isinstance(removed, list)):
                raise ValueError("not a journal message")
        except (ValueError, KeyError, TypeError):
            self.refused += 1
            return None
        shard = self.shards[index]
        for key in removed:
            if isinstance(key, list):
                shard.pop(tuple(key), None)
        for record in records:
            if not isinstance(record, list) or len(record) < 5:
                self.refused += 1
                continue
            try:
                key = record_key(record)
                hash(key)
            except TypeError:
                self.refused += 1
                continue
            if key not in shard and len(shard) >= self.limit:
                self.refused += 1
                continue
            shard[key] = record
        return index

    def sessions(self, index: int) -> int:
        return len(self.shards[index])

    def write(self, run_dir: str, index: int) -> int:
        """Write worker ``index``'s shard for its next start (0600, replaced atomically); the
        number of sessions in it."""
        path = shard_path(run_dir, index)
        records = list(self.shards[index].values())
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(records, out, separators=(",", ":"))
        temporary.replace(path)
        return len(records)


def read_shard(run_dir: str, index: int) -> list[Any] | None:
    """The shard left for worker ``index`` (then deleted), or None when there is none."""
    path = shard_path(run_dir, index)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    finally:
        path.unlink(missing_ok=True)
    try:
        records = json.loads(text)
    except ValueError:
        return []
    return records if isinstance(records, list) else []
