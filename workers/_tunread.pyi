# Types of workers/_tunread.c.
from collections.abc import Callable
from typing import Any

def read_packets(fd: int, limit: int) -> list[bytes]: ...
def fill_slots(data: object, sqes: object, packets: list[bytes], start: int, mask: int,
               slot: int, sqe_size: int, len_at: int) -> None: ...
def uring_enter(ring_fd: int, to_submit: int, min_complete: int, flags: int) -> int: ...
def serve(watch: list[int], timeout_ms: int, ipv6_fd: int, ipv4_fd: int, write_fd: int,
          inbound: object, in_caches: dict[int, Any], returning: object,
          out_caches: dict[int, Any], ident: int, established: object, df_threshold: int,
          mtu: int, writer: Callable[[list[bytes]], int] | None, limit: int
          ) -> tuple[list[int], int, list[bytes], list[bytes], list[tuple[bytes, bytes]],
                     tuple[int, ...], tuple[int, ...], float, float, int, int, int]: ...
