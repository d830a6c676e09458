"""workers/journal.py: the coordinator's copy of the shards and the handover between runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from support.helpers import make_settings

from sixgate.workers import journal
from sixgate.workers.engine.flows import pack_record
from sixgate.workers.journal import (
    CrashLog,
    ShardCopy,
    crash_log_path,
    encode,
    handover_path,
    read_shard,
    shard_path,
    take_crash_log,
    take_handover,
    write_handover,
)

RECORD = [6, "20010db8" + "0" * 23 + "1", 40000, "20010db8" + "0" * 23 + "2", 80, "64400001",
          40000, "7f000001", 8080, "tcp/80 -> 127.0.0.1:8080", "established", 7440.0, True, ""]


def packed(*records: list[object]) -> list[bytes]:
    """Records as a worker's table journals them."""
    return [pack_record(record) for record in records]


def copy_with_one_session() -> ShardCopy:
    copy = ShardCopy(2, 10)
    assert copy.apply(encode(1, packed(RECORD), [])) == 1
    return copy


def test_messages_apply_in_order_and_garbage_is_refused() -> None:
    copy = copy_with_one_session()
    assert copy.sessions(1) == 1
    whole = encode(0, packed(other_record(40001)), [])
    for bad in (b"", b"[]", json.dumps({"v": 1, "worker": 0, "records": [RECORD],
                                        "removed": []}).encode(),  # the older JSON wire
                encode(7, [], []), whole + b"x", whole[:-1],
                journal.MESSAGE.pack(journal.MAGIC, 0, 0, 1, 0, 0) + b"\xff\xff"):
        assert copy.apply(bad) is None
    assert copy.apply(encode(0, [whole[24:-1], b"\x06", b""], [])) == 0  # records cut short
    assert copy.refused == 10 and copy.sessions(0) == 0 and copy.records(0) == []
    assert copy.apply(encode(1, [], [key_of(RECORD)])) == 1 and copy.sessions(1) == 0


def test_a_stopping_workers_last_message_says_so() -> None:
    """A worker's last message at its stop is marked (the coordinator hands the sessions
    over once every stopped worker's is in, instead of waiting for a quiet socket)."""
    copy = copy_with_one_session()
    assert copy.ended == set()
    assert copy.apply(encode(0, [], [], last=True)) == 0
    assert copy.ended == {0} and copy.sessions(1) == 1
    assert copy.apply(journal.MESSAGE.pack(journal.MAGIC, 1, 2, 0, 0, 0)) is None
    assert copy.ended == {0}  # only a 1 marks it


def test_the_copy_is_bounded() -> None:
    copy = ShardCopy(1, 1)  # twice the worker's flow limit at most
    copy.apply(encode(0, packed(*(other_record(port) for port in range(5))), []))
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


def test_a_handover_moves_to_another_worker_count_by_shard(tmp_path: Path) -> None:
    """[gateway] shards: a run of 2 workers over 6 shards hands over to one of 3; each
    session goes to the worker of the shard its pool address is in (shard s: worker s % 3),
    whichever worker had it; other shards are still refused."""
    settings = dataclasses.asdict(make_settings(workers=2, shards=6, pool="100.64.0.0/24"))
    records = {address: [*RECORD[:2], 40000 + i, *RECORD[3:5], address, *RECORD[6:]]
               for i, address in enumerate(("64400001", "64400050", "644000a0", "644000fe"))}
    copy = ShardCopy(2, 10)
    # 100.64.0.1 is shard 0, .0x50 (80) shard 1, .0xa0 (160) shard 3, .0xfe (254) shard 5
    # (42 addresses a shard); a first run of 2 workers had 0, 160 in worker 0 and 80, 254 in 1.
    copy.apply(encode(0, packed(records["64400001"], records["644000a0"]), []))
    copy.apply(encode(1, packed(records["64400050"], records["644000fe"]), []))
    write_handover(str(tmp_path), copy, settings, 1000.0)
    seed, shards, message = take_handover(str(tmp_path), {**settings, "workers": 3}, 1010.0)
    assert shards == [[records["64400001"], records["644000a0"]], [records["64400050"]],
                      [records["644000fe"]]], shards
    assert "from 2 worker(s) to 3, by shard" in message, message
    write_handover(str(tmp_path), copy, settings, 1000.0)
    seed, shards, message = take_handover(str(tmp_path), {**settings, "workers": 3,
                                                          "shards": 9}, 1010.0)
    assert (seed, shards) == (None, []) and "another shards" in message, message


def test_nat64_bindings_move_to_another_worker_count_by_their_pool4_port(
        tmp_path: Path) -> None:
    """A NAT64 binding's shard is the slice of pool4 its port is in (60 ports in 6 shards of
    10 here): 61005 is shard 0, 61015 shard 1, 61059 shard 5; with 3 workers, shard s is
    worker s % 3's."""
    pool4 = (("203.0.113.5", "udp", 61000, 61059),)
    settings = dataclasses.asdict(make_settings(workers=2, shards=6, nat64_pool4=pool4))
    def binding(port: int) -> list[object]:
        return [17, "20010db8" + "0" * 20 + f"{port:04x}", 40000, "0064ff9b" + "0" * 16
                + "c6336407", 53, "cb007105", port, "c6336407", 53, "nat64", "open", 300.0,
                True, ""]
    copy = ShardCopy(2, 10)
    copy.apply(encode(0, packed(binding(61005), binding(61059)), []))
    copy.apply(encode(1, packed(binding(61015)), []))
    write_handover(str(tmp_path), copy, settings, 1000.0)
    _, shards, _ = take_handover(str(tmp_path), {**settings, "workers": 3}, 1010.0)
    assert [[record[6] for record in shard] for shard in shards] == [[61005], [61015], [61059]]


def test_an_unreadable_handover_is_not_taken(tmp_path: Path) -> None:
    handover_path(str(tmp_path)).write_text("{not json")
    settings = dataclasses.asdict(make_settings())
    assert take_handover(str(tmp_path), settings, 0.0)[:2] == (None, [])


def other_record(port: int) -> list[object]:
    return [6, RECORD[1], port, *RECORD[3:6], port, *RECORD[7:]]


def key_of(record: list[object]) -> tuple[int, bytes, int, bytes, int]:
    """The flow table's key of a removed session (what ``encode`` takes)."""
    proto, client6, cport, gw6, gwport = record[:5]
    return (proto, bytes.fromhex(client6), cport, bytes.fromhex(gw6), gwport)  # type: ignore[arg-type]


def test_a_crashed_coordinators_session_log_is_replayed_by_the_next_run(tmp_path: Path) -> None:
    """The log holds the copy at the start and every message applied since; the line the
    crash cut short is skipped; the next run takes it once, with the fan-out seed."""
    settings = dataclasses.asdict(make_settings(workers=2, hash_seed=4321))
    copy = copy_with_one_session()
    log = CrashLog(str(tmp_path), settings, 1000.0)
    log.rewrite(copy)
    assert (crash_log_path(str(tmp_path)).stat().st_mode & 0o777) == 0o600
    for message in (encode(0, packed(other_record(40001)), []),
                    encode(1, [], [key_of(RECORD)]), encode(0, packed(other_record(40002)), [])):
        assert copy.apply(message) is not None
        log.append(message, copy)
    cut = encode(0, packed(other_record(40003)), [])
    with crash_log_path(str(tmp_path)).open("ab") as f:  # the write the crash cut short
        f.write(journal.LOG_FRAME.pack(len(cut)) + cut[:-9])
    seed, shards, message = take_crash_log(str(tmp_path), settings,
                                           crash_log_path(str(tmp_path)).stat().st_mtime + 5)
    assert seed == 4321 and "resuming 2 session(s)" in message and "crashed" in message
    assert shards == [[other_record(40001), other_record(40002)], []]
    assert take_crash_log(str(tmp_path), settings, 0.0) == (None, [], "")


def test_an_older_runs_session_log_is_replayed(tmp_path: Path) -> None:
    """A coordinator of the version before the packed journal crashed, and this version
    starts (an upgrade in between): its log, a JSON message per line, is still taken."""
    settings = dataclasses.asdict(make_settings(workers=2, hash_seed=77))
    header = {"v": 1, "started_unix": 1000.0, "hash_seed": 77,
              "settings": {key: settings[key] for key in journal.HANDOVER_KEYS}}
    lines = [header,
             {"v": 1, "worker": 1, "records": [RECORD, other_record(40001)], "removed": [],
              "held": [[17, "cb007105", 61004]]},
             {"v": 1, "worker": 1, "records": [], "removed": [RECORD[:5]], "held": []},
             {"v": 1, "worker": 0, "records": [other_record(40002), [6, "zz"]], "removed": [],
              "held": []}]
    crash_log_path(str(tmp_path)).write_text(
        "\n".join(json.dumps(line) for line in json.loads(json.dumps(lines))) + "\n{\"v\": 1, ")
    seed, shards, message = take_crash_log(str(tmp_path), settings,
                                           crash_log_path(str(tmp_path)).stat().st_mtime + 5)
    assert seed == 77 and "resuming 2 session(s)" in message, message
    assert shards == [[other_record(40002)], [other_record(40001)]]


def test_the_session_log_is_compacted_from_the_copy(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "CRASH_LOG_COMPACT_BYTES", 2000)
    settings = dataclasses.asdict(make_settings(workers=2))
    copy = ShardCopy(2, 100)
    log = CrashLog(str(tmp_path), settings, 1000.0)
    log.rewrite(copy)
    for port in range(50):  # each session made, then ended: the copy ends empty
        for message in (encode(0, packed(other_record(port)), []),
                        encode(0, [], [key_of(other_record(port))])):
            copy.apply(message)
            log.append(message, copy)
    assert crash_log_path(str(tmp_path)).stat().st_size < 2000 < 50 * 2 * 200
    _seed, shards, _message = take_crash_log(str(tmp_path), settings,
                                             crash_log_path(str(tmp_path)).stat().st_mtime)
    assert shards == [[], []]


@pytest.mark.parametrize(("change", "late", "why"), [
    ({"workers": 3}, 0.0, "another workers"),
    ({}, 400.0, "s old"),
])
def test_a_session_log_that_does_not_fit_is_not_taken(tmp_path: Path, change: dict[str, object],
                                                      late: float, why: str) -> None:
    settings = dataclasses.asdict(make_settings(workers=2))
    log = CrashLog(str(tmp_path), settings, 1000.0)
    log.rewrite(copy_with_one_session())
    now = crash_log_path(str(tmp_path)).stat().st_mtime + late
    seed, shards, message = take_crash_log(str(tmp_path), {**settings, **change}, now)
    assert (seed, shards) == (None, []) and why in message and "starting empty" in message
    assert not crash_log_path(str(tmp_path)).exists()


def test_a_handover_of_other_settings_waits_for_a_run_with_them(tmp_path: Path) -> None:
    """A deploy rolls a new config back: the run between (another mode) sets the first run's
    handover aside and hands over its own; the rolled-back run takes the first one, and the
    one between waits in turn. Each is taken once."""
    run_dir = str(tmp_path)
    first = dataclasses.asdict(make_settings(workers=2, hash_seed=1234))
    between = {**first, "mode": "6in4", "hash_seed": 99}
    write_handover(run_dir, copy_with_one_session(), first, 1000.0)
    seed, shards, message = take_handover(run_dir, between, 1010.0)
    assert (seed, shards) == (None, []) and "set aside" in message, message
    write_handover(run_dir, ShardCopy(2, 10), between, 1020.0)  # the run between stops
    seed, shards, message = take_handover(run_dir, first, 1030.0)
    assert (seed, shards) == (1234, [[], [RECORD]]), message
    assert "handed over by an earlier run" in message and "set aside" in message, message
    # The run between's (empty) handover waits now; the first one is gone.
    assert take_handover(run_dir, first, 1040.0)[:2] == (None, [])
    assert take_handover(run_dir, between, 1040.0)[:2] == (99, [[], []])
    assert not list(tmp_path.glob("handover*"))


def test_a_set_aside_handover_expires(tmp_path: Path) -> None:
    run_dir = str(tmp_path)
    first = dataclasses.asdict(make_settings(workers=2))
    write_handover(run_dir, copy_with_one_session(), first, 1000.0)
    take_handover(run_dir, {**first, "pool": "100.65.0.0/16"}, 1010.0)
    seed, _shards, message = take_handover(run_dir, first, 1000.0 + journal.HANDOVER_MAX_AGE_S
                                           + 1)
    assert seed is None and "s old" in message and "starting empty" in message
    assert not list(tmp_path.glob("handover*"))


def test_held_ports_leave_the_copy_when_their_hold_is_over(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy's held ports are bounded by their hold time, not only by its size: an expired
    one makes room for the next (it would otherwise refuse every hold once full) and is not
    written into a shard."""
    clock = [100.0]
    monkeypatch.setattr(journal.time, "monotonic", lambda: clock[0])
    copy = ShardCopy(1, 1, hold_s=120.0)  # room for two held ports (twice the flow limit)
    for port in (61001, 61002):
        copy.apply(encode(0, [], [], [(17, bytes([203, 0, 113, 5]), port)]))
    copy.apply(encode(0, [], [], [(17, bytes([203, 0, 113, 5]), 61003)]))
    assert copy.refused == 1  # full
    clock[0] = 221.0  # the first two are over
    copy.apply(encode(0, [], [], [(17, bytes([203, 0, 113, 5]), 61004)]))
    assert copy.refused == 1 and list(copy.held[0]) == [(17, bytes([203, 0, 113, 5]), 61004)]
    assert copy.write(str(tmp_path), 0) == 0
    assert read_shard(str(tmp_path), 0) == [["held", 17, "cb007105", 61004, 120.0]]


@pytest.mark.parametrize("counts", [(2**32 - 1, 0, 0), (0, 2**32 - 1, 0), (0, 0, 2**32 - 1),
                                    (1, 2**32 - 1, 0)])
def test_a_message_whose_counts_lie_is_refused_at_once(counts: tuple[int, int, int]) -> None:
    """A worker's message is not trusted: counts far beyond what its length holds are refused
    before any loop runs over them (the coordinator's journal thread must never stall)."""
    copy = ShardCopy(1, 10)
    message = journal.MESSAGE.pack(journal.MAGIC, 0, 0, *counts) + bytes(200)
    assert copy.apply(message) is None and copy.refused == 1
