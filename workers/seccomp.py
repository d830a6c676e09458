"""A seccomp allow-list for a worker once it has given up root (issue 13, finding 10).

A worker parses packets from anyone next to ctypes pointer code, so after ``Worker.open`` and
``drop_privileges`` it also gives up every system call its loop does not make: a bug that
hands an attacker the process still cannot exec, fork, ptrace, mount, load BPF or kernel
modules, change credentials or open new kinds of sockets. Like Docker's default profile and
systemd's ``SystemCallFilter=``, a refused call fails with EPERM rather than killing the
process (a packet that reaches an unexpected path costs an error, not the worker), and the
filter is loaded with SECCOMP_FILTER_FLAG_LOG so the kernel logs every refused call (audit
type 1326, ``dmesg``): never silent. ``clone3`` answers ENOSYS so glibc falls back to ``clone``,
whose flags a classic BPF filter can check: only new threads (CLONE_THREAD), never processes.

The allow-list is what the worker loops were seen to call under the lab's traffic
(``strace -f`` over the lab tests), plus what CPython and libzmq call on rarer paths (imports
while formatting a traceback, zmq accepting a control connection). seccomp(2), linux/filter.h.

I/O shell: prctl/seccomp through ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

PR_SET_NO_NEW_PRIVS = 38
PR_SET_NAME = 15
SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_LOG = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
CLONE_THREAD = 0x00010000

# Classic BPF, linux/filter.h: opcodes and the seccomp_data offsets they read.
_LD_W_ABS, _JEQ_K, _JSET_K, _RET_K = 0x20, 0x15, 0x45, 0x06
_NR_AT, _ARCH_AT, _ARG0_LOW_AT = 0, 4, 16

# What every worker (userspace datapath and kernel-backend relay) may call, by name.
ALLOWED = (
    # memory, threads, signals, time: CPython, glibc and libzmq's own
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "futex", "set_robust_list",
    "get_robust_list", "rseq", "sched_yield", "sched_getaffinity", "membarrier", "getrandom",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall",
    "nanosleep", "clock_nanosleep", "clock_gettime", "clock_getres", "gettimeofday",
    "exit", "exit_group", "getpid", "gettid", "getppid", "tgkill", "getuid", "geteuid",
    "getgid", "getegid", "getrlimit", "prlimit64", "getrusage", "uname", "arch_prctl",
    "set_tid_address", "sysinfo", "sched_getparam", "sched_getscheduler", "sched_setscheduler",
    # descriptors and files (as the unprivileged user: imports, tracebacks, /proc reads)
    "read", "write", "readv", "writev", "pread64", "pwrite64", "close", "fstat", "newfstatat",
    "statx", "lseek", "fcntl", "ioctl", "dup", "dup3", "pipe2", "openat", "readlink",
    "readlinkat", "getdents64", "getcwd", "faccessat2", "eventfd2",
    # waiting
    "poll", "ppoll", "pselect6", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
    # the packet path and ZeroMQ's sockets
    "recvfrom", "recvmsg", "recvmmsg", "sendto", "sendmsg", "sendmmsg", "accept4", "connect",
    "shutdown", "getsockname", "getpeername", "getsockopt", "setsockopt", "socketpair",
    "io_uring_enter",
)
# The kernel backend's relays open sockets for each client (to the services).
RELAY_ALLOWED = ("socket", "bind", "listen", "accept")

_X86_64 = {
    "read": 0, "write": 1, "close": 3, "fstat": 5, "poll": 7, "lseek": 8, "mmap": 9,
    "mprotect": 10, "munmap": 11, "brk": 12, "rt_sigaction": 13, "rt_sigprocmask": 14,
    "rt_sigreturn": 15, "ioctl": 16, "pread64": 17, "pwrite64": 18, "readv": 19, "writev": 20,
    "sched_yield": 24, "sched_getparam": 143, "sched_setscheduler": 144, "sched_getscheduler": 145,
    "mremap": 25, "madvise": 28, "dup": 32, "nanosleep": 35, "getpid": 39, "socket": 41,
    "connect": 42, "accept": 43, "sendto": 44, "recvfrom": 45, "sendmsg": 46, "recvmsg": 47,
    "shutdown": 48, "bind": 49, "listen": 50, "getsockname": 51, "getpeername": 52,
    "socketpair": 53, "setsockopt": 54, "getsockopt": 55, "clone": 56, "prctl": 157, "exit": 60,
    "uname": 63, "fcntl": 72, "getcwd": 79, "readlink": 89, "gettimeofday": 96, "getrlimit": 97,
    "getrusage": 98, "sysinfo": 99, "getuid": 102, "getgid": 104, "geteuid": 107, "getegid": 108,
    "getppid": 110, "sigaltstack": 131, "arch_prctl": 158, "gettid": 186, "futex": 202,
    "sched_getaffinity": 204, "getdents64": 217, "set_tid_address": 218, "restart_syscall": 219,
    "clock_gettime": 228, "clock_getres": 229, "clock_nanosleep": 230, "exit_group": 231,
    "epoll_wait": 232, "epoll_ctl": 233, "tgkill": 234, "openat": 257, "newfstatat": 262,
    "readlinkat": 267, "pselect6": 270, "ppoll": 271, "set_robust_list": 273,
    "get_robust_list": 274, "epoll_pwait": 281, "accept4": 288, "eventfd2": 290,
    "epoll_create1": 291, "dup3": 292, "pipe2": 293, "recvmmsg": 299, "prlimit64": 302,
    "sendmmsg": 307, "getrandom": 318, "membarrier": 324, "statx": 332, "rseq": 334,
    "io_uring_enter": 426, "clone3": 435, "faccessat2": 439,
}
_AARCH64 = {
    "read": 63, "write": 64, "close": 57, "fstat": 80, "lseek": 62, "mmap": 222, "mprotect": 226,
    "munmap": 215, "brk": 214, "rt_sigaction": 134, "rt_sigprocmask": 135, "rt_sigreturn": 139,
    "ioctl": 29, "pread64": 67, "pwrite64": 68, "readv": 65, "writev": 66, "sched_yield": 124,
    "sched_setscheduler": 119, "sched_getscheduler": 120, "sched_getparam": 121, "mremap": 216,
    "madvise": 233, "dup": 23, "nanosleep": 101, "getpid": 172, "socket": 198, "connect": 203,
    "accept": 202, "sendto": 206, "recvfrom": 207, "sendmsg": 211, "recvmsg": 212, "shutdown": 210,
    "bind": 200, "listen": 201, "getsockname": 204, "getpeername": 205, "socketpair": 199,
    "setsockopt": 208, "getsockopt": 209, "clone": 220, "prctl": 167, "exit": 93, "uname": 160,
    "fcntl": 25, "getcwd": 17, "gettimeofday": 169, "getrlimit": 163, "getrusage": 165,
    "sysinfo": 179, "getuid": 174, "getgid": 176, "geteuid": 175, "getegid": 177, "getppid": 173,
    "sigaltstack": 132, "gettid": 178, "futex": 98, "sched_getaffinity": 123, "getdents64": 61,
    "set_tid_address": 96, "restart_syscall": 128, "clock_gettime": 113, "clock_getres": 114,
    "clock_nanosleep": 115, "exit_group": 94, "epoll_ctl": 21, "tgkill": 131, "openat": 56,
    "newfstatat": 79, "readlinkat": 78, "pselect6": 72, "ppoll": 73, "set_robust_list": 99,
    "get_robust_list": 100, "epoll_pwait": 22, "accept4": 242, "eventfd2": 19, "epoll_create1": 20,
    "dup3": 24, "pipe2": 59, "recvmmsg": 243, "prlimit64": 261, "sendmmsg": 269, "getrandom": 278,
    "membarrier": 283, "statx": 291, "rseq": 293, "io_uring_enter": 426, "clone3": 435,
    "faccessat2": 439,
}
SYSCALLS = {"x86_64": _X86_64, "aarch64": _AARCH64}

_INSN = struct.Struct("=HBBI")


def build_filter(arch: str, allowed: tuple[str, ...]) -> list[tuple[int, int, int, int]]:
    """The classic BPF program (code, jt, jf, k) of the allow-list for ``arch``.

    Pure: a unit test runs it against syscall numbers without loading it."""
    table = SYSCALLS[arch]
    numbers = sorted({table[name] for name in allowed if name in table})
    refuse = SECCOMP_RET_ERRNO | errno.EPERM
    program = [
        (_LD_W_ABS, 0, 0, _ARCH_AT),
        # Another ABI (x32, a 32-bit call) would give other numbers meaning: refused.
        (_JEQ_K, 1, 0, AUDIT_ARCH[arch]),
        (_RET_K, 0, 0, refuse),
        (_LD_W_ABS, 0, 0, _NR_AT),
    ]
    for number in numbers:
        program += [(_JEQ_K, 0, 1, number), (_RET_K, 0, 0, SECCOMP_RET_ALLOW)]
    # glibc falls back from clone3 (flags in memory, unreadable here) to clone on ENOSYS.
    program += [(_JEQ_K, 0, 1, table["clone3"]), (_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS)]
    # clone: threads only (the first argument, flags, has CLONE_THREAD), never a process.
    program += [(_JEQ_K, 0, 4, table["clone"]),
                (_LD_W_ABS, 0, 0, _ARG0_LOW_AT),
                (_JSET_K, 0, 1, CLONE_THREAD),
                (_RET_K, 0, 0, SECCOMP_RET_ALLOW),
                (_RET_K, 0, 0, refuse)]
    # prctl: naming a thread only (libzmq names its I/O threads as they start).
    program += [(_JEQ_K, 0, 4, table["prctl"]),
                (_LD_W_ABS, 0, 0, _ARG0_LOW_AT),
                (_JEQ_K, 0, 1, PR_SET_NAME),
                (_RET_K, 0, 0, SECCOMP_RET_ALLOW),
                (_RET_K, 0, 0, refuse)]
    program.append((_RET_K, 0, 0, refuse))
    return program


def run_filter(program: list[tuple[int, int, int, int]], arch_id: int, number: int,
               arg0: int = 0) -> int:
    """What ``program`` returns for one call: a tiny classic BPF interpreter for the opcodes
    ``build_filter`` uses, so tests check the program itself, not a copy of its logic."""
    data = {_NR_AT: number, _ARCH_AT: arch_id, _ARG0_LOW_AT: arg0 & 0xFFFFFFFF}
    accumulator = 0
    pc = 0
    while True:
        code, jt, jf, k = program[pc]
        if code == _LD_W_ABS:
            accumulator = data[k]
        elif code == _JEQ_K:
            pc += jt if accumulator == k else jf
        elif code == _JSET_K:
            pc += jt if accumulator & k else jf
        elif code == _RET_K:
            return k
        else:
            raise ValueError(f"opcode {code:#x} not understood")
        pc += 1


def apply(allowed: tuple[str, ...]) -> str:
    """Load the allow-list into every thread of this process (libzmq's I/O threads exist
    already: SECCOMP_FILTER_FLAG_TSYNC), with refused calls logged by the kernel; returns
    what was done, or raises OSError."""
    arch = platform.machine()
    if arch not in SYSCALLS:
        return f"no seccomp allow-list for {arch}: system calls not filtered"
    program = build_filter(arch, allowed)
    code = b"".join(_INSN.pack(*insn) for insn in program)
    instructions = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(program), ctypes.addressof(instructions))
    fprog_buffer = ctypes.create_string_buffer(fprog, len(fprog))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    flags = SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_LOG
    result = libc.syscall(ctypes.c_long(SYS_SECCOMP[arch]), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                          ctypes.c_long(flags), fprog_buffer)
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"seccomp(SECCOMP_SET_MODE_FILTER) failed: "
                             f"{errno.errorcode.get(error, error)}")
    return f"seccomp allow-list of {len(set(allowed))} system calls (refused: EPERM, logged)"
