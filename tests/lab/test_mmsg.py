"""Batched I/O against the real kernel, each test in a namespace of its own.

workers/mmsg.py: a raw protocol-41 socket sends 150 packets with one sendmmsg-based
``BatchSender.send`` (three batches of 64), one of them to an address with no route: that one
packet is refused and counted, the rest arrive, in order and byte for byte, at a
``BatchReceiver`` reading batches.

workers/uring.py: 600 IPv4 UDP packets of sizes up to 60000 bytes go into a TUN device
through ``UringWriter.write`` (three io_uring batches, the rings wrapping inside one), one of
them no IP packet at all: that one is refused and counted, the rest reach a UDP socket behind
the TUN, in order and byte for byte. A ring that fails as a whole raises OSError (the worker
then falls back to write(2)).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import netlab
import pytest
from support.helpers import require_compiled

pytestmark = pytest.mark.lab

@pytest.fixture()
def namespace(served_files: netlab.ServedFiles) -> Iterator[str]:
    """A namespace named like the lab's (swept after a crash); ``served_files`` checks the
    lab's requirements first (skip, or fail under SIXGATE_LAB_REQUIRED=1)."""
    name = f"{netlab.NAME_PREFIX}{os.getpid()}x999-gw"
    netlab.run(["ip", "netns", "add", name])
    try:
        netlab.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
        yield name
    finally:
        netlab.delete_namespace(name)


def test_sendmmsg_and_recvmmsg_batches_with_one_refused_send(namespace: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", namespace, sys.executable,
                           str(netlab.PROGRAMS / "mmsg_batches.py")],
                          capture_output=True, text=True, timeout=60, cwd=netlab.REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "149", "True"], done.stdout + done.stderr


@pytest.mark.usefixtures("io_uring")
@pytest.mark.parametrize("loops", ["compiled", "python"])
def test_io_uring_writes_to_a_tun_device_in_batches_with_one_refused(namespace: str,
                                                                      loops: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", namespace, sys.executable,
                           str(netlab.PROGRAMS / "uring_batches.py"), loops],
                          capture_output=True, text=True, timeout=60, cwd=netlab.REPO_ROOT)
    if done.stdout.strip() == "compiled-helper-missing":
        require_compiled(None, "workers/_tunread.c")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "True", "599", "True", "refused", "True"], \
        done.stdout + done.stderr


def test_a_full_capture_buffer_is_counted_as_capture_overflow(namespace: str) -> None:
    """workers/capture.py: what the kernel drops because a worker's capture socket is full
    (the worker fell behind) is counted under ``capture_overflow`` at its next tick, once:
    every one of 2000 packets is either still held by the socket or counted."""
    done = subprocess.run(["ip", "netns", "exec", namespace, sys.executable,
                           str(netlab.PROGRAMS / "capture_overflow.py")],
                          capture_output=True, text=True, timeout=60, cwd=netlab.REPO_ROOT)
    assert done.returncode == 0, done.stderr
    dropped, again, held = (int(word) for word in done.stdout.split())
    assert dropped > 0 and again == 0 and dropped + held == 2000, done.stdout
