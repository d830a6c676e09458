"""Batched writes to the TUN device through io_uring (io_uring_setup(2), io_uring_enter(2)).

A TUN device takes one packet per write(2), and on a virtual machine the system call itself
is a large share of what a packet costs a worker. Here a batch of packets is one
io_uring_enter: each packet is copied into its slot of a preallocated buffer, the slot's
submission queue entry (prepared once: IORING_OP_WRITE, the TUN fd, the slot's address) gets
the packet's length, and one call submits them all and waits for every completion, so no
slot is reused while the kernel may still read it. The TUN driver takes IOCB_NOWAIT, so the
writes run inline in that call, as write(2) would run them.

Raw system calls and mmap'd rings: liburing's helpers are inline C functions that no ctypes
caller can reach. Where io_uring is refused (``kernel.io_uring_disabled``, a container's
seccomp policy) ``UringWriter.open`` raises OSError and the worker writes one packet per
write(2) instead. I/O shell: the engine never sees it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

# The same numbers on every architecture since Linux 5.1 (asm-generic's unified table).
SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_OP_WRITE = 23
IORING_ENTER_GETEVENTS = 1
IORING_SETUP_SUBMIT_ALL = 1 << 7  # go on submitting after an entry that fails (Linux 5.18)
EINTR, EINVAL = 4, 22
CURRENT_POSITION = 0xFFFFFFFFFFFFFFFF  # offset -1: a stream, no file position

# struct io_uring_params: 10 words, then io_sqring_offsets and io_cqring_offsets (8 words and
# a 64-bit user_addr each).
PARAMS = struct.Struct("<10I8IQ8IQ")
# struct io_uring_sqe: opcode, flags, ioprio, fd, off, addr, len, rw_flags, user_data,
# buf_index, personality, splice_fd_in, addr3, pad
SQE = struct.Struct("<BBHiQQIIQHHiQQ")
SQE_LEN_AT = 24
CQE_SIZE = 16  # user_data (u64), res (s32), flags (u32)
U32 = struct.Struct("<I")

try:  # the per-packet copy and the system call compiled (workers/_tunread.c), when built
    from sixgate.workers._tunread import fill_slots, uring_enter
except ImportError:  # pragma: no cover - a host without a C compiler
    fill_slots = uring_enter = None  # type: ignore[assignment]
COMPILED = fill_slots is not None

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


class UringWriter:
    """Writes batches of packets to one file descriptor (the worker's TUN device)."""

    def __init__(self, ring_fd: int, params: tuple[int, ...], fd: int, slot: int) -> None:
        entries, cq_entries = params[0], params[1]
        (_sq_head, sq_tail, sq_mask, _sq_n, _sq_flags, _dropped, sq_array, _r1, _a1,
         cq_head, cq_tail, cq_mask, _cq_n, _overflow, cq_cqes, _cq_flags, _r2, _a2) = params[10:]
        self.ring_fd = ring_fd
        self.entries = entries
        self.slot = slot
        self.last_errno = 0
        # The compiled copy and system call (workers/_tunread.c) where built; tests turn
        # it off to compare the two.
        self.compiled = COMPILED
        self._sq = mmap.mmap(ring_fd, sq_array + 4 * entries, offset=IORING_OFF_SQ_RING)
        self._cq = mmap.mmap(ring_fd, cq_cqes + CQE_SIZE * cq_entries,
                             offset=IORING_OFF_CQ_RING)
        self._sqes = mmap.mmap(ring_fd, SQE.size * entries, offset=IORING_OFF_SQES)
        self._data = mmap.mmap(-1, slot * entries)  # anonymous: pages appear when first used
        self._view = memoryview(self._data)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._data))
        self._sq_tail_at, self._sq_mask = sq_tail, U32.unpack_from(self._sq, sq_mask)[0]
        self._cq_head_at, self._cq_tail_at = cq_head, cq_tail
        self._cq_mask = U32.unpack_from(self._cq, cq_mask)[0]
        self._cq_res = memoryview(self._cq).cast("i")  # res of CQE k: [cqes/4 + 4k + 2]
        self._cq_res_first = cq_cqes // 4 + 2
        # What workers/_tunread.c ``serve`` writes through (``compiled_ring``), made once.
        self._compiled = (ring_fd, self._sq, self._cq, self._sqes, self._data, sq_tail,
                          self._sq_mask, cq_head, cq_tail, self._cq_mask, cq_cqes, slot, entries)
        # Entry i always writes slot i; the SQ array maps ring position i to entry i. Where
        # slot i starts and where entry i keeps its length, computed once.
        self._slot_at = [slot * i for i in range(entries)]
        self._len_at = [SQE.size * i + SQE_LEN_AT for i in range(entries)]
        for i in range(entries):
            SQE.pack_into(self._sqes, SQE.size * i, IORING_OP_WRITE, 0, 0, fd,
                          CURRENT_POSITION, base + slot * i, 0, 0, i, 0, 0, 0, 0, 0)
            U32.pack_into(self._sq, sq_array + 4 * i, i)

    @classmethod
    def open(cls, fd: int, entries: int = 256, slot: int = 65536) -> UringWriter:
        """A writer for ``fd``; OSError where io_uring is refused or too old."""
        for flags in (IORING_SETUP_SUBMIT_ALL, 0):
            params = ctypes.create_string_buffer(PARAMS.size)
            struct.pack_into("<I", params, 8, flags)
            ring_fd = _syscall(ctypes.c_long(SYS_IO_URING_SETUP), ctypes.c_uint(entries),
                               params)
            if ring_fd >= 0 or ctypes.get_errno() != EINVAL:
                break
        _check(ring_fd, "io_uring_setup")
        try:
            return cls(ring_fd, PARAMS.unpack(params.raw), fd, slot)
        except (OSError, ValueError):
            os.close(ring_fd)
            raise

    def write(self, packets: list[bytes]) -> int:
        """Write every packet; the number the kernel refused (each refusal is one packet,
        never retried, as with write(2): RFC 1812 §5.3.6 lets routers drop)."""
        failed = 0
        entries, view, sqes, mask = self.entries, self._view, self._sqes, self._sq_mask
        slot_at, len_at, pack_len = self._slot_at, self._len_at, U32.pack_into
        for first in range(0, len(packets), entries):
            chunk = packets[first:first + entries]
            # The ring's own tail (this process is its only producer; workers/_tunread.c
            # ``serve`` submits through the same ring).
            start = U32.unpack_from(self._sq, self._sq_tail_at)[0]
            if self.compiled:
                fill_slots(self._data, sqes, chunk, start, mask, self.slot, SQE.size,
                           SQE_LEN_AT)
            else:
                for position, packet in enumerate(chunk, start):
                    i = position & mask
                    at = slot_at[i]
                    view[at:at + len(packet)] = packet
                    pack_len(sqes, len_at[i], len(packet))
            U32.pack_into(self._sq, self._sq_tail_at, (start + len(chunk)) & 0xFFFFFFFF)
            failed += self._submit_and_reap(len(chunk))
        return failed

    def compiled_ring(self) -> tuple[object, ...]:
        """The ring as workers/_tunread.c ``serve`` writes through it (the same slots,
        entries and submission order as ``write``): its descriptor, its four areas and their
        layout."""
        return self._compiled

    def _submit_and_reap(self, count: int) -> int:
        """Submit ``count`` entries and wait for all their completions; the failed ones."""
        to_submit, waiting = count, count
        failed = 0
        while waiting:
            if self.compiled:
                done = uring_enter(self.ring_fd, to_submit, waiting, IORING_ENTER_GETEVENTS)
                if done < 0:  # EINTR
                    continue
            else:
                done = _syscall(ctypes.c_long(SYS_IO_URING_ENTER), ctypes.c_int(self.ring_fd),
                                ctypes.c_uint(to_submit), ctypes.c_uint(waiting),
                                ctypes.c_uint(IORING_ENTER_GETEVENTS), None,
                                ctypes.c_size_t(0))
            if done < 0:
                code = ctypes.get_errno()
                if code == EINTR:
                    continue
                raise OSError(code, f"io_uring_enter: {os.strerror(code)}")
            to_submit -= min(done, to_submit)
            head = U32.unpack_from(self._cq, self._cq_head_at)[0]
            ready = (U32.unpack_from(self._cq, self._cq_tail_at)[0] - head) & 0xFFFFFFFF
            if ready:
                failed += self._failures(head, ready)
                U32.pack_into(self._cq, self._cq_head_at, (head + ready) & 0xFFFFFFFF)
                waiting -= ready
        return failed

    def _failures(self, head: int, ready: int) -> int:
        """How many of ``ready`` completions from ``head`` failed (res < 0)."""
        mask, res, first = self._cq_mask, self._cq_res, self._cq_res_first
        start = head & mask
        stop = min(start + ready, mask + 1)
        results = res[first + 4 * start:first + 4 * stop:4].tolist()
        if ready > stop - start:  # the ring wrapped
            results += res[first:first + 4 * (ready - (stop - start)):4].tolist()
        failed = [r for r in results if r < 0] if min(results) < 0 else []
        if failed:
            self.last_errno = -failed[-1]
        return len(failed)

    def close(self) -> None:
        self._view.release()
        self._cq_res.release()
        for area in (self._sq, self._cq, self._sqes):
            area.close()
        os.close(self.ring_fd)
