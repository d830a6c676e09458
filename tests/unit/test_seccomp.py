"""workers/seccomp.py: the allow-list program, run through a classic BPF interpreter, and the
filter loaded into a real child process (refused calls fail with EPERM; threads still start)."""

from __future__ import annotations

import errno
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from sixgate.workers import seccomp

ARCHES = sorted(seccomp.SYSCALLS)
ALLOW = seccomp.SECCOMP_RET_ALLOW
EPERM = seccomp.SECCOMP_RET_ERRNO | errno.EPERM
ENOSYS = seccomp.SECCOMP_RET_ERRNO | errno.ENOSYS


def verdict(arch: str, name: str, arg0: int = 0, allowed: tuple[str, ...] = seccomp.ALLOWED,
            arch_id: int | None = None) -> int:
    program = seccomp.build_filter(arch, allowed)
    return seccomp.run_filter(program, seccomp.AUDIT_ARCH[arch] if arch_id is None else arch_id,
                              seccomp.SYSCALLS[arch][name], arg0)


# Older calls that aarch64 never had (its libc uses the *at / p* forms listed beside them).
NOT_ON_AARCH64 = {"poll", "epoll_wait", "readlink", "arch_prctl"}


@pytest.mark.parametrize("arch", ARCHES)
def test_every_allowed_name_has_a_number_on_every_arch(arch: str) -> None:
    names = set(seccomp.ALLOWED) | set(seccomp.RELAY_ALLOWED) | {"clone", "clone3", "prctl"}
    missing = names - set(seccomp.SYSCALLS[arch])
    assert missing == (NOT_ON_AARCH64 if arch == "aarch64" else set()), missing


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("name", ["read", "sendmmsg", "recvmmsg", "io_uring_enter", "futex",
                                  "epoll_pwait", "accept4", "exit_group"])
def test_the_loops_calls_are_allowed(arch: str, name: str) -> None:
    assert verdict(arch, name) == ALLOW


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("name", ["socket", "bind", "listen"])
def test_new_sockets_only_for_the_relay(arch: str, name: str) -> None:
    assert verdict(arch, name) == EPERM
    assert verdict(arch, name, allowed=seccomp.ALLOWED + seccomp.RELAY_ALLOWED) == ALLOW


@pytest.mark.parametrize("arch", ARCHES)
def test_threads_but_never_processes(arch: str) -> None:
    assert verdict(arch, "clone", arg0=seccomp.CLONE_THREAD | 0x3D0F00) == ALLOW
    assert verdict(arch, "clone", arg0=0x01200011) == EPERM  # fork(): SIGCHLD, no CLONE_THREAD
    assert verdict(arch, "clone3") == ENOSYS  # glibc then falls back to clone


@pytest.mark.parametrize("arch", ARCHES)
def test_prctl_names_threads_only(arch: str) -> None:
    assert verdict(arch, "prctl", arg0=seccomp.PR_SET_NAME) == ALLOW
    assert verdict(arch, "prctl", arg0=seccomp.PR_SET_NO_NEW_PRIVS) == EPERM


@pytest.mark.parametrize("arch", ARCHES)
def test_another_abi_is_refused(arch: str) -> None:
    assert verdict(arch, "read", arch_id=0x40000003) == EPERM  # i386


def test_unknown_numbers_refused() -> None:
    program = seccomp.build_filter("x86_64", seccomp.ALLOWED)
    for number in (59, 57, 58, 101, 165, 321, 246, 175):  # execve fork vfork ptrace mount bpf
        assert seccomp.run_filter(program, seccomp.AUDIT_ARCH["x86_64"], number) == EPERM


CHILD = r"""
import os, socket, sys, threading
from sixgate.workers import seccomp
print(seccomp.apply(seccomp.ALLOWED), flush=True)
results = []
try:
    os.fork()
    results.append("fork ran")
except OSError as exc:
    results.append(f"fork {exc.errno}")
try:
    socket.socket()
    results.append("socket ran")
except OSError as exc:
    results.append(f"socket {exc.errno}")
try:
    os.execv("/bin/true", ["true"])
except OSError as exc:
    results.append(f"exec {exc.errno}")
ran = []
thread = threading.Thread(target=lambda: ran.append(open("/proc/self/status").read()))
thread.start(); thread.join()
results.append("thread ran" if ran else "thread failed")
print(";".join(results))
"""


def test_filter_loaded_into_a_real_process_refuses_with_eperm() -> None:
    if platform.machine() not in seccomp.SYSCALLS:
        pytest.skip(f"SKIPPED LOUDLY: no allow-list for {platform.machine()}")
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2], check=False)
    assert done.returncode == 0, done.stderr
    said, results = done.stdout.strip().splitlines()
    assert "refused: EPERM, logged" in said
    assert results == f"fork {errno.EPERM};socket {errno.EPERM};exec {errno.EPERM};thread ran"
