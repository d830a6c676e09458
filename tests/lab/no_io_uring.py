"""Run a command with io_uring refused, as a container's default seccomp profile does.

``python tests/lab/no_io_uring.py CMD [ARGS...]``: installs a classic BPF seccomp filter that
answers io_uring_setup(2) with EPERM and allows everything else, then execs the command (same
PID); its children inherit the filter. The lab uses it to run the real ``sixgate run`` the
way Docker's default profile would, to see the workers fall back to write(2).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1
SYS_IO_URING_SETUP = 425  # the same on every architecture (asm-generic's unified table)
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET


def program(arch: int) -> bytes:
    """struct seccomp_data: nr at offset 0, arch at 4. Another architecture: allowed as is."""
    instructions = [
        (LD_W_ABS, 0, 0, 4),
        (JEQ_K, 0, 3, arch),
        (LD_W_ABS, 0, 0, 0),
        (JEQ_K, 0, 1, SYS_IO_URING_SETUP),
        (RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM),
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    return b"".join(struct.pack("HBBI", *instruction) for instruction in instructions)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: no_io_uring.py CMD [ARGS...]", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    code = program(AUDIT_ARCH[platform.machine()])
    filters = ctypes.create_string_buffer(code, len(code))
    fprog = ctypes.create_string_buffer(struct.pack("HL", len(code) // 8,
                                                    ctypes.addressof(filters)))
    if (libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            or libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fprog, 0, 0) != 0):
        print(f"no_io_uring: seccomp filter refused: {os.strerror(ctypes.get_errno())}",
              file=sys.stderr)
        return 1
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
