# Types of the compiled batch loops (workers/engine/_fastpath.c; the rules: fastpath.py).
from collections.abc import Callable
from typing import Any

def inbound(packets: list[bytes], start: int, caches: dict[int, dict[bytes, Any]], outer: int,
            ident: int, now: float, established: str, df_threshold: int, out: list[bytes],
            to_tunnel: list[tuple[bytes, bytes]], echoes: dict[bytes, Any] | None,
            allow: Callable[[bytes, float], bool] | None, mtu: int,
            opener: Callable[[bytes, float], object] | None = None,
            max_mss: int = 0) -> tuple[int, ...]: ...  # (index, ident, 13 totals)
def returning(packets: list[bytes], start: int, caches: dict[int, dict[bytes, Any]], mtu: int,
              now: float, established: str, to_tunnel: list[tuple[bytes, bytes]],
              to_ipv6: list[bytes], returner: Callable[[bytes, float], object] | None = None,
              max_mss: int = 0) -> tuple[int, ...]: ...  # (index, 0, 9 totals)
def clat(packets: list[bytes], start: int, out_cache: dict[bytes, tuple[bytes, int]],
         in_cache: dict[bytes, tuple[bytes, int, int]], address4: bytes, address6: bytes,
         df_threshold: int, out: list[bytes]) -> tuple[int, ...]: ...  # (index, 0, 12 totals)
def untrack(object: object, /) -> None: ...
