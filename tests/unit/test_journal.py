"""workers/journal.py: the coordinator's copy of the shards and the handover between runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from support.helpers import make_settings

from sixgate.workers.journal import (
    ShardCopy,
    encode,
    handover_path,
    read_shard,
    shard_path,
    take_handover,
    write_handover,
)

RECORD = [6, "20010db8" + "0" * 23 + "1", 40000, "20010db8" + "0" * 23 + "2", 80, "64400001",
          40000, "7f000001", 8080, "tcp/80 -> 127.0.0.1:8080", "established", 7440.0, True, ""]


def copy_with_one_session() -> ShardCopy:
    copy = ShardCopy(2, 10)
    assert copy.apply(encode(1, [RECORD], [])) == 1
    return copy


def test_messages_apply_in_order_and_garbage_is_refused() -> None:
    copy = copy_with_one_session()
    assert copy.sessions(1) == 1
    for bad in (b"", b"[]", b'{"v": 1, "worker": 7, "records": [], "removed": []}',
                json.dumps({"v": 2, "worker": 0, "records": [], "removed": []}).encode(),
                json.dumps({"v": 1, "worker": 0, "records": [[[1], 2, 3, 4, 5]],
                            "removed": []}).encode()):
        copy.apply(bad)
    assert copy.refused == 5 and copy.sessions(0) == 0
    removed = json.dumps({"v": 1, "worker": 1, "records": [], "removed": [RECORD[:5]]})
    assert copy.apply(removed.encode()) == 1 and copy.sessions(1) == 0


def test_the_copy_is_bounded() -> None:
    copy = ShardCopy(1, 1)  # twice the worker's flow limit at most
    records = [[6, "aa", port, "bb", 80] + RECORD[5:] for port in range(5)]
    copy.apply(encode(0, records, []))
    assert copy.sessions(0) == 2 and copy.refused == 3


def test_a_shard_file_is_read_once(tmp_path: Path) -> None:
    copy = copy_with_one_session()
    assert copy.write(str(tmp_path), 1) == 1
    assert (shard_path(str(tmp_path), 1).stat().st_mode & 0o777) == 0o600
    assert read_shard(str(tmp_path), 1) == [RECORD]
    assert read_shard(str(tmp_path), 1) is None


def test_the_next_run_takes_the_handover_with_the_fan_out_seed(tmp_path: Path) -> None:
    settings = dataclasses.asdict(make_settings(workers=2, hash_seed=1234))
    assert write_handover(str(tmp_path), copy_with_one_session(), settings, 1000.0) == 1
    seed, shards, message = take_handover(str(tmp_path), settings, 1010.0)
    assert (seed, shards) == (1234, [[], [RECORD]]) and "resuming 1 session(s)" in message
    assert not handover_path(str(tmp_path)).exists()
    assert take_handover(str(tmp_path), settings, 1010.0) == (None, [], "")


@pytest.mark.parametrize(("change", "now", "why"), [
    ({"workers": 3}, 1010.0, "another workers"),
    ({"pool": "100.65.0.0/16"}, 1010.0, "another pool"),
    ({}, 1400.0, "s old"),
])
def test_a_handover_that_does_not_fit_is_not_taken(tmp_path: Path, change: dict[str, object],
                                                   now: float, why: str) -> None:
    settings = dataclasses.asdict(make_settings(workers=2))
    write_handover(str(tmp_path), copy_with_one_session(), settings, 1000.0)
    seed, shards, message = take_handover(str(tmp_path), {**settings, **change}, now)
    assert (seed, shards) == (None, []) and why in message and "starting empty" in message


def test_an_unreadable_handover_is_not_taken(tmp_path: Path) -> None:
    handover_path(str(tmp_path)).write_text("{not json")
    settings = dataclasses.asdict(make_settings())
    assert take_handover(str(tmp_path), settings, 0.0)[:2] == (None, [])
