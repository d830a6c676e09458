"""The benchmark's C programs: compiled at bench time, driven from here.

``gen.c`` sends (the generator is never Python), ``sink.c`` counts and reflects, ``pinger.c``
measures ICMPv6 echo round trips. They are built with the system's gcc into ``bench/build/``
(git-ignored) whenever a source is newer than its binary. A sink keeps its counters in a small
mmap'd file, read here at any time without disturbing it.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BUILD_DIR = BENCH_DIR / "build"
PROGRAMS = ("gen", "sink", "pinger")
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror")

COUNTERS = struct.Struct("<8Q")  # sink.c: packets, bytes, other, reflected, reflect_errors, ready


class BuildError(RuntimeError):
    """A C program did not compile (gcc missing or a compile error)."""


def build(out_dir: Path = BUILD_DIR) -> dict[str, Path]:
    """Compile the programs that are missing or older than their source; their paths."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in PROGRAMS:
        source, binary = BENCH_DIR / f"{name}.c", out_dir / name
        paths[name] = binary
        if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
            continue
        if gcc is None:
            raise BuildError("no C compiler: apt-get install gcc (bench/bootstrap.sh does)")
        done = subprocess.run([gcc, *CFLAGS, "-o", str(binary), str(source)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BuildError(f"gcc {source.name} failed:\n{done.stderr}")
    return paths


@dataclass(frozen=True)
class SinkCounts:
    """One reading of a sink's counters."""

    packets: int
    bytes: int
    other: int
    reflected: int
    reflect_errors: int
    ready: bool

    def minus(self, earlier: SinkCounts) -> SinkCounts:
        """What was counted since ``earlier``."""
        return SinkCounts(self.packets - earlier.packets, self.bytes - earlier.bytes,
                          self.other - earlier.other, self.reflected - earlier.reflected,
                          self.reflect_errors - earlier.reflect_errors, self.ready)


ZERO = SinkCounts(0, 0, 0, 0, 0, False)


def read_counts(path: Path) -> SinkCounts:
    """A sink's counters (all zero until it has created its file)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ZERO
    if len(data) < COUNTERS.size:
        return ZERO
    packets, nbytes, other, reflected, errors, ready, _, _ = COUNTERS.unpack_from(data)
    return SinkCounts(packets, nbytes, other, reflected, errors, bool(ready))
