"""Batched tunnel I/O (workers/mmsg.py) against the real kernel, in a namespace of its own.

A raw protocol-41 socket sends 150 packets with one sendmmsg-based ``BatchSender.send`` (three
batches of 64), one of them to an address with no route: that one packet is refused and
counted, the rest arrive, in order and byte for byte, at a ``BatchReceiver`` reading batches.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import netlab
import pytest

pytestmark = pytest.mark.lab

SCRIPT = r"""
import socket
from workers.mmsg import BatchReceiver, BatchSender

rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, 41)
rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
rx.setblocking(False)
tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, 41)
local = socket.inet_aton("127.0.0.1")
nowhere = socket.inet_aton("203.0.113.77")  # no route in this namespace
packets = [(bytes([i % 256]) * (40 + i), nowhere if i == 70 else local) for i in range(150)]
failed = BatchSender(tx, batch=64).send(packets)
receiver = BatchReceiver(rx, batch=64)
got = []
while True:
    batch = receiver.receive()
    if not batch:
        break
    assert len(batch) <= 64
    got += [bytes(p[20:]) for p in batch]  # the kernel adds the IPv4 header
sent = [p for p, dst in packets if dst == local]
print(failed, len(got), got == sent)
"""


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
    done = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", SCRIPT],
                          capture_output=True, text=True, timeout=60, cwd=netlab.REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "149", "True"], done.stdout + done.stderr
