"""The shard journal's wire and the coordinator's copy (issue 17: no connection lost when a
worker crashes).

A worker journals the sessions it makes, changes (TCP state, assurance) and removes
(``FlowTable.take_journal``) and pushes them to the coordinator at most every
``FLUSH_INTERVAL_S`` over ZeroMQ (``ipc://<run_dir>/journal``), one packed message per flush
(``MESSAGE``), never pickle: a worker is the less trusted side. The coordinator keeps each
worker's shard as ``ShardCopy`` and, before it starts a worker again after a crash, writes
that shard to ``<run_dir>/worker-<i>.shard`` (JSON); the new worker resumes it
(``FlowTable.restore``, which checks every record) and deletes the file.

What a crash can lose: the sessions made or changed in the last flush interval before it (at
most ``FLUSH_INTERVAL_S`` of new flows; their packets then meet no session, like after any
restart). Timers restart at the resumption, so a resumed session can only live longer.

A clean stop hands the whole copy to the next run (``write_handover``: a restart, an upgrade);
a crash of the coordinator itself leaves ``CrashLog``, the copy as it changed, which the next
run (systemd's Restart=on-failure) resumes the same way.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sixgate.workers.engine.flows import (
    NAT64_RULE,
    PACKED_KEY,
    Key,
    Record,
    pack_record,
    packed_size,
    pool4_slices,
    port_shard,
    unpack_record,
    worker_share,
)
from sixgate.workers.engine.settings import pool_shard, worker_pool4

FLUSH_INTERVAL_S = 0.05
HELD = "held"  # a shard entry that is a NAT64 port on hold, not a session record
JOURNAL_VERSION = 1  # of the handover (and of the JSON journal of runs before the packed one)
# The coordinator's copy of a shard holds at most this many times the worker's flow limit:
# a worker that misbehaves cannot grow the coordinator without bound.
COPY_SLACK = 2


def journal_endpoint(run_dir: str) -> str:
    """Where the workers push their journals (the coordinator pulls)."""
    return f"ipc://{run_dir}/journal"


def shard_path(run_dir: str, index: int) -> Path:
    """The shard the coordinator hands to worker ``index`` when it starts it again."""
    return Path(run_dir) / f"worker-{index}.shard"


# One journal message: MESSAGE's header (the worker, whether it is its last, how many of each
# part follow), then each record (``FlowTable.take_journal``'s, packed) after its size, the
# keys of the removed sessions (PACKED_KEY), the ports put on hold (HELD_PORT). Packed, not
# JSON (issue 21): the coordinator stores the records as they came (its copy, the session
# log), and decodes them only for the files between runs.
MESSAGE = struct.Struct("!4sHBIII")
MAGIC = b"SGJ\x02"
RECORD_SIZE = struct.Struct("!H")
HELD_PORT = struct.Struct("!B4sH")
Journal = tuple[int, list[bytes], list[bytes], list[tuple[int, bytes, int]], bool]


def encode(index: int, records: list[bytes], removed: list[Key],
           held: Sequence[tuple[int, bytes, int]] = (), last: bool = False) -> bytes:
    """One journal message; ``last``: the worker is stopping and sends nothing after it (the
    coordinator hands the sessions over once every stopped worker's last one is in)."""
    size = RECORD_SIZE.pack
    return b"".join((MESSAGE.pack(MAGIC, index, last, len(records), len(removed), len(held)),
                     *(size(len(record)) + record for record in records),
                     *(PACKED_KEY.pack(*key) for key in removed),
                     *(HELD_PORT.pack(*port) for port in held)))


def decode(message: bytes) -> Journal:
    """(worker, records, removed keys, held ports, last) of a message; ValueError when it is
    not one (each part must fill exactly the length it says; the records' fields are checked
    by the worker that resumes them). The work is bounded by the message's length, whatever
    its counts say."""
    try:
        magic, index, last, count, removed_count, held_count = MESSAGE.unpack_from(message)
    except struct.error:
        raise ValueError("not a journal message") from None
    size = len(message)
    key, port = PACKED_KEY.size, HELD_PORT.size
    if (magic != MAGIC or last > 1 or MESSAGE.size + count * RECORD_SIZE.size
            + removed_count * key + held_count * port > size):
        raise ValueError("not a journal message")
    offset, records = MESSAGE.size, []
    for _ in range(count):
        start = offset + RECORD_SIZE.size
        offset = start + int.from_bytes(message[offset:start], "big")
        if offset > size:
            raise ValueError("a journal message's records overrun it")
        records.append(message[start:offset])
    removed = [message[at:at + key] for at in range(offset, offset + removed_count * key, key)]
    offset += removed_count * key
    held = list(HELD_PORT.iter_unpack(message[offset:offset + held_count * port]))
    if offset + held_count * port != size:
        raise ValueError("a journal message's parts do not fill it")
    return index, records, removed, held, bool(last)


def decode_json(message: bytes) -> Journal:
    """A message of an older run (JSON, journal version 1), as ``decode`` gives it: only its
    session log is ever read (a coordinator that crashed before an upgrade)."""
    doc = json.loads(message)
    if doc.get("v") != JOURNAL_VERSION or not isinstance(doc.get("worker"), int):
        raise ValueError("not a journal message")
    records = []
    for record in doc["records"]:
        try:
            records.append(pack_record(record))
        except (ValueError, TypeError):
            records.append(b"")  # refused by the copy, as before
    removed = [PACKED_KEY.pack(key[0], bytes.fromhex(key[1]), key[2], bytes.fromhex(key[3]),
                               key[4]) for key in doc["removed"]]
    held = [(proto, bytes.fromhex(address), port) for proto, address, port in doc["held"]]
    return doc["worker"], records, removed, held, doc.get("last") is True


class ShardCopy:
    """The coordinator's copy of every worker's shard, built from their journal messages:
    per shard, each session's packed record by its key."""

    def __init__(self, workers: int, limit_per_worker: int, hold_s: float = 0.0) -> None:
        self.shards: list[dict[bytes, bytes]] = [{} for _ in range(workers)]
        # NAT64: pool4 ports on hold (``hold_s``, RFC 6888 REQ-8), (protocol, address,
        # port) -> when (monotonic), oldest first: expired ones leave from the front.
        self.held: list[dict[tuple[int, bytes, int], float]] = [{} for _ in range(workers)]
        self.hold_s = hold_s
        self.limit = limit_per_worker * COPY_SLACK
        self.refused = 0  # messages or records not applied (malformed, over the limit)
        self.ended: set[int] = set()  # workers whose last message (at their stop) is in

    def apply(self, message: bytes, decoder: Callable[[bytes], Journal] = decode
              ) -> int | None:
        """Apply one journal message; the worker it came from, or None when refused."""
        try:
            index, records, removed, held, last = decoder(message)
        except (ValueError, KeyError, TypeError, struct.error):
            self.refused += 1
            return None
        if not 0 <= index < len(self.shards):
            self.refused += 1
            return None
        shard = self.shards[index]
        for key in removed:
            shard.pop(key, None)
        self._put(index, records)
        self._hold(index, held)
        if last:
            self.ended.add(index)
        return index

    def _hold(self, index: int, held: list[tuple[int, bytes, int]]) -> None:
        """Ports put on hold, within the limit (checked again by the worker that resumes)."""
        ports = self.held[index]
        now = time.monotonic()
        self._expire_held(ports, now)
        for key in held:
            if key not in ports and len(ports) >= self.limit:
                self.refused += 1
                continue
            ports.pop(key, None)  # to the back: the dict stays oldest first
            ports[key] = now

    def _expire_held(self, ports: dict[tuple[int, bytes, int], float], now: float) -> None:
        while ports:
            key, when = next(iter(ports.items()))
            if when + self.hold_s > now:
                return
            del ports[key]

    def _put(self, index: int, records: list[bytes]) -> None:
        """Store packed records in worker ``index``'s shard by their key, within the limit."""
        shard = self.shards[index]
        key_size = PACKED_KEY.size
        for record in records:
            if packed_size(record) != len(record):
                self.refused += 1
                continue
            key = record[:key_size]
            if key not in shard and len(shard) >= self.limit:
                self.refused += 1
                continue
            shard[key] = record

    def records(self, index: int) -> list[Record]:
        """Worker ``index``'s sessions as JSON records (for the files between runs); a record
        that does not unpack is left out (counted)."""
        out = []
        for packed in self.shards[index].values():
            try:
                out.append(unpack_record(packed))
            except ValueError:
                self.refused += 1
        return out

    def sessions(self, index: int) -> int:
        return len(self.shards[index])

    def load(self, index: int, records: list[Any]) -> None:
        """Worker ``index``'s shard as a previous run handed it over (JSON records)."""
        packed = []
        for record in records:
            try:
                packed.append(pack_record(record))
            except (ValueError, TypeError):
                self.refused += 1
        self._put(index, packed)

    def write(self, run_dir: str, index: int) -> int:
        """Write worker ``index``'s shard for its next start; the number of sessions in it.
        NAT64 ports still on hold follow the records as ``["held", protocol, address hex,
        port, seconds left]``."""
        records: list[Any] = self.records(index)
        sessions = len(records)
        ports = self.held[index]
        now = time.monotonic()
        self._expire_held(ports, now)
        records += [[HELD, proto, address.hex(), port, round(when + self.hold_s - now, 3)]
                    for (proto, address, port), when in ports.items()]
        _write_private_json(shard_path(run_dir, index), records)
        return sessions


def _write_private_json(path: Path, doc: Any) -> None:
    """``doc`` as JSON at ``path``, mode 0600, replaced atomically (a reader never sees half)."""
    _write_private_text(path, json.dumps(doc, separators=(",", ":")))


def _write_private_text(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    temporary.replace(path)


# --- a restart or an upgrade: the whole copy handed to the next run ---------------------------

HANDOVER_FILE = "handover.json"
# A recent handover of other settings, kept for a later run with those (``take_handover``).
SET_ASIDE_FILE = "handover.set-aside.json"
# A handover older than this is not taken: its sessions have likely ended meanwhile.
HANDOVER_MAX_AGE_S = 300.0
# What must be the same in the next run for its workers to own the same sessions: the fan-out
# (seed, shard count) sends each client to the same shard, which owns the same pool slice.
# The worker count may differ where the shards are more than the workers ([gateway] shards):
# each session goes to its shard's worker in the next run (``rebucket``).
HANDOVER_KEYS = ("workers", "shards", "mode", "local_ipv4", "pool", "nat64_pool4",
                 "nat64_prefix")
_SAME_KEYS = HANDOVER_KEYS[2:]


def shard_count(settings: dict[str, Any]) -> int:
    """The fan-out shards of these (saved) settings: ``shards``, or one per worker (a run
    before [gateway] shards saved none)."""
    return int(settings.get("shards") or settings.get("workers") or 0)


def rebucket(by_worker: list[list[Any]], settings: dict[str, Any]) -> list[list[Any]]:
    """Every worker's records as this run's ``settings["workers"]`` workers own them: each
    session with its shard (named by its pool address or pool4 port), shard s in worker
    s % workers. The same lists when the count is the same."""
    workers = settings["workers"]
    if len(by_worker) == workers:
        return by_worker
    shards = shard_count(settings)
    shard_of = pool_shard(settings["pool"], shards)
    rows = tuple((str(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in settings["nat64_pool4"])
    slices = pool4_slices({shard: worker_pool4(rows, shards, shard) for shard in range(shards)})
    out: list[list[Any]] = [[] for _ in range(workers)]
    for records in by_worker:
        for record in records:
            try:
                address = bytes.fromhex(record[5])
                # A NAT64 binding's shard is its pool4 port's slice, another session's its
                # pool address's.
                shard = (port_shard(slices, record[0], address, record[6])
                         if record[9] == NAT64_RULE else shard_of(address))
            except (TypeError, ValueError, IndexError):
                continue  # not a session record: parse_record would refuse it too
            if shard is not None:
                out[shard % workers].append(record)
    return out


def handover_path(run_dir: str) -> Path:
    return Path(run_dir) / HANDOVER_FILE


def write_handover(run_dir: str, copy: ShardCopy, settings: dict[str, Any], now_unix: float
                   ) -> int:
    """At a clean stop: every shard and what the next run needs to resume them (0600, replaced
    atomically); the number of sessions handed over."""
    _write_private_json(handover_path(run_dir), {
        "v": JOURNAL_VERSION, "written_unix": now_unix, "hash_seed": settings["hash_seed"],
        "settings": {key: settings[key] for key in HANDOVER_KEYS},
        "shards": [copy.records(index) for index in range(len(copy.shards))]})
    return sum(len(shard) for shard in copy.shards)


def set_aside_path(run_dir: str) -> Path:
    return Path(run_dir) / SET_ASIDE_FILE


def take_handover(run_dir: str, settings: dict[str, Any], now_unix: float
                  ) -> tuple[int | None, list[list[Any]], str]:
    """At a start: (the fan-out seed to keep, every worker's records, what happened) from the
    previous run's handover, which is deleted; (None, [], why) when there is none to take.

    A handover that is recent but of other settings (another mode, pool ...) is set aside, not
    lost: a run between with another config (one a deploy then rolls back for failing its
    health gate) leaves the sessions for a later run with the first settings, which takes them
    from there (within the same age limit)."""
    texts = ((_take_text(handover_path(run_dir)), "the previous run"),
             (_take_text(set_aside_path(run_dir)), "an earlier run"))  # set aside by it
    taken: tuple[int, list[list[Any]]] | None = None
    waiting: str | None = None  # the newest text refused only for its settings
    messages = []
    for text, who in texts:
        if text is None:
            continue
        fits, message, other_settings = _fitting(text, who, settings, now_unix)
        if fits is not None:
            if taken is not None:
                continue  # an older handover of these settings: the newer one was taken
            taken = fits
        elif other_settings and waiting is None:
            waiting = text
            message += " (its handover is set aside for a run with its settings)"
        messages.append(message)
    if waiting is not None:
        _write_private_text(set_aside_path(run_dir), waiting)
    message = "; ".join(messages)
    if taken is None:
        return None, [], message + (": starting empty" if message else "")
    return (*taken, message)


def _take_text(path: Path) -> str | None:
    """The file's text, the file deleted; None when there is none."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    finally:
        path.unlink(missing_ok=True)


def _fitting(text: str, who: str, settings: dict[str, Any], now_unix: float
             ) -> tuple[tuple[int, list[list[Any]]] | None, str, bool]:
    """((seed, shards) or None, what happened, whether it was refused only for other
    settings) of one handover's text."""
    try:
        doc = json.loads(text)
        seed, shards, saved = doc["hash_seed"], doc["shards"], doc["settings"]
        age = now_unix - float(doc["written_unix"])
        if (doc.get("v") != JOURNAL_VERSION or not isinstance(seed, int)
                or not isinstance(shards, list) or not isinstance(saved, dict)):
            raise ValueError("not a handover")
    except (ValueError, KeyError, TypeError):
        return None, f"{who}'s handover is unreadable", False
    refused = _refusal(who, "handover", age, saved, settings)
    if refused:
        return None, refused, 0 <= age <= HANDOVER_MAX_AGE_S
    if (len(shards) != saved.get("workers", len(shards))
            or not all(isinstance(s, list) for s in shards)):
        return None, f"{who}'s handover does not match", False
    moved = "" if len(shards) == settings["workers"] else (
        f" (from {len(shards)} worker(s) to {settings['workers']}, by shard)")
    shards = rebucket(shards, settings)
    return (seed, shards), (f"resuming{moved} {sum(len(s) for s in shards)} session(s) handed over "
                            f"by {who}"), False


def _refusal(who: str, what: str, age: float, saved: dict[str, Any],
             settings: dict[str, Any]) -> str:
    """Why ``who``'s sessions (its ``what``) cannot be resumed by this run ("" when they can):
    too old, or another fan-out or addressing (``HANDOVER_KEYS``)."""
    if not 0 <= age <= HANDOVER_MAX_AGE_S:
        return f"{who}'s {what} is {age:.0f} s old (at most {HANDOVER_MAX_AGE_S:.0f})"
    # JSON turns tuples into lists: compare as JSON sees them.
    differ = [key for key in _SAME_KEYS
              if json.loads(json.dumps(settings[key])) != saved.get(key)]
    if shard_count(settings) != shard_count(saved):
        differ.append("shards" if settings.get("shards") or saved.get("shards")
                      else "workers")
    if differ:
        return (f"{who} had another {', '.join(differ)}: its sessions belong to other workers "
                "or addresses")
    return ""


def take_previous_sessions(run_dir: str, settings: dict[str, Any], now_unix: float
                           ) -> tuple[int | None, list[list[Any]], list[str]]:
    """At a start: (seed, every worker's records, what happened) from the previous run's
    handover (a clean stop), else from the session log a crashed coordinator left; both are
    consumed."""
    seed, shards, message = take_handover(run_dir, settings, now_unix)
    if seed is not None:
        crash_log_path(run_dir).unlink(missing_ok=True)  # older than the handover
        return seed, shards, [message]
    crashed_seed, crashed_shards, crashed = take_crash_log(run_dir, settings, now_unix)
    return crashed_seed, crashed_shards, [m for m in (message, crashed) if m]


# --- a crash of the coordinator: its copy kept on disk as it changes ----------------------------

CRASH_LOG_FILE = "sessions.log"
# The session log's version: 1 had a JSON message per line; 2 has packed ones (``MESSAGE``),
# each after its size (LOG_FRAME).
LOG_VERSION = 2
LOG_FRAME = struct.Struct("!I")
# The crash log is rewritten from the copy (compacted) once it is past this size and twice
# the size of its last rewrite: writing it costs O(1) per journalled byte, however many
# sessions there are.
CRASH_LOG_COMPACT_BYTES = 8 << 20


def crash_log_path(run_dir: str) -> Path:
    return Path(run_dir) / CRASH_LOG_FILE


class CrashLog:
    """The coordinator's copy on disk, so that a coordinator restarted after a crash (SIGKILL,
    the OOM killer; its workers die with it) resumes every session the crashed one knew.

    ``<run_dir>/sessions.log`` (0600): a JSON header line (the log's version, the fan-out seed
    and the settings ``HANDOVER_KEYS`` names), then every journal message the copy applied, in
    order, each after its size: each is appended as it is applied (one write; the page cache
    keeps it when the process dies). Past ``CRASH_LOG_COMPACT_BYTES`` it is rewritten as the
    header and one message per shard. A clean stop removes it: its handover supersedes it."""

    def __init__(self, run_dir: str, settings: dict[str, Any], now_unix: float) -> None:
        self.path = crash_log_path(run_dir)
        self.header = json.dumps({
            "v": LOG_VERSION, "started_unix": now_unix, "hash_seed": settings["hash_seed"],
            "settings": {key: settings[key] for key in HANDOVER_KEYS}},
            separators=(",", ":")).encode() + b"\n"
        self.fd = -1
        self.size = 0
        self.compact_at = CRASH_LOG_COMPACT_BYTES

    def rewrite(self, copy: ShardCopy) -> None:
        """Write the header and the whole copy anew (atomically), then append from there."""
        temporary = self.path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(self.header)
            for index, shard in enumerate(copy.shards):
                message = encode(index, list(shard.values()), [], list(copy.held[index]))
                out.write(LOG_FRAME.pack(len(message)) + message)
        temporary.replace(self.path)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = os.fstat(self.fd).st_size
        self.compact_at = max(CRASH_LOG_COMPACT_BYTES, 2 * self.size)

    def append(self, message: bytes, copy: ShardCopy) -> None:
        """One applied journal message."""
        self.size += os.write(self.fd, LOG_FRAME.pack(len(message)) + message)
        if self.size > self.compact_at:
            self.rewrite(copy)

    def remove(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)


def logged_messages(body: bytes, version: int) -> Iterator[bytes]:
    """The messages of a session log after its header; a last one the crash cut short is
    left out."""
    if version == 1:  # an older run's: a JSON message per line
        yield from (line for line in body.split(b"\n") if line)
        return
    offset = 0
    while offset + LOG_FRAME.size <= len(body):
        (size,) = LOG_FRAME.unpack_from(body, offset)
        offset += LOG_FRAME.size
        if offset + size > len(body):
            return
        yield body[offset:offset + size]
        offset += size


def take_crash_log(run_dir: str, settings: dict[str, Any], now_unix: float
                   ) -> tuple[int | None, list[list[Any]], str]:
    """At a start with no handover: (seed, every worker's records, what happened) from the
    crash log a coordinator that died left (then deleted); (None, [], why) when none is to be
    taken. Its messages are replayed into a copy within the same limits; a message cut short
    by the crash is skipped."""
    path = crash_log_path(run_dir)
    try:
        age = now_unix - path.stat().st_mtime
        text = path.read_bytes()
    except FileNotFoundError:
        return None, [], ""
    finally:
        path.unlink(missing_ok=True)
    head, _, body = text.partition(b"\n")
    try:
        header = json.loads(head)
        seed, saved, version = header["hash_seed"], header["settings"], header.get("v")
        if (version not in (JOURNAL_VERSION, LOG_VERSION) or not isinstance(seed, int)
                or not isinstance(saved, dict)):
            raise ValueError("not a crash log")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, [], "the crashed run's session log is unreadable: starting empty"
    refused = _refusal("the crashed run", "session log", age, saved, settings)
    if refused:
        return None, [], refused + ": starting empty"
    workers = int(saved.get("workers") or settings["workers"])  # the crashed run's
    copy = ShardCopy(workers, worker_share(settings["max_flows"], workers) or 1)
    decoder = decode_json if version == 1 else decode
    for message in logged_messages(body, version):
        copy.apply(message, decoder)
    shards = rebucket([copy.records(index) for index in range(workers)], settings)
    return seed, shards, (f"resuming {sum(len(s) for s in shards)} session(s) the previous "
                          "run had when it crashed")


def split_held(doc: list[Any]) -> tuple[list[Any], list[tuple[int, bytes, int, float]]]:
    """A shard's session records, and its held NAT64 ports (protocol, address, port,
    seconds left); malformed held entries are left out."""
    records: list[Any] = []
    held: list[tuple[int, bytes, int, float]] = []
    for entry in doc:
        if not (isinstance(entry, list) and entry and entry[0] == HELD):
            records.append(entry)
            continue
        try:
            _, proto, address, port, left = entry
            packed = bytes.fromhex(address)
            if (isinstance(proto, int) and isinstance(port, int) and len(packed) == 4
                    and 0 <= port <= 0xFFFF and isinstance(left, (int, float)) and left > 0):
                held.append((proto, packed, port, float(left)))
        except (ValueError, TypeError):
            continue
    return records, held


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
