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


URING_SCRIPT = r"""
import errno, ipaddress, os, socket
from workers.engine.packet import PROTO_UDP, build_ipv4, pseudo_sum_v4, set_checksum
from workers.tun import configure_tun, open_tun
from workers.uring import UringWriter

fd = open_tun("sgu0")
configure_tun("sgu0", [ipaddress.IPv4Network("100.64.0.0/24")])
service = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
service.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
service.bind(("127.0.0.1", 9000))
service.settimeout(2)
src, dst = socket.inet_aton("100.64.0.1"), socket.inet_aton("127.0.0.1")
payloads = [bytes([i % 251]) * (i * 97 % 1500 if i != 300 else 60000) for i in range(600)]
packets = []
for i, payload in enumerate(payloads):
    segment = bytearray((40000 + i).to_bytes(2, "big") + (9000).to_bytes(2, "big")
                        + (8 + len(payload)).to_bytes(2, "big") + bytes(2) + payload)
    set_checksum(segment, 6, pseudo_sum_v4(src, dst, PROTO_UDP, len(segment)), udp=True)
    packets.append(bytes(build_ipv4(src, dst, PROTO_UDP, segment)))
packets[123] = bytes(40)  # version 0: the TUN driver refuses it (EINVAL)
writer = UringWriter.open(fd, entries=256)
# 100, then 256 + 244: the rings' ends fall inside a batch (both wrap).
failed = writer.write(packets[:100]) + writer.write(packets[100:])
got = [service.recv(65536) for _ in range(599)]
sent = [p for i, p in enumerate(payloads) if i != 123]
print(failed, writer.last_errno == errno.EINVAL, len(got), got == sent)
writer.close()
broken = UringWriter.open(fd, entries=8)
os.close(broken.ring_fd)  # the ring fails as a whole: an OSError for the worker to act on
try:
    broken.write(packets[:3])
    print("no-error")
except OSError as exc:
    print("refused", exc.errno == errno.EBADF)
"""


@pytest.mark.usefixtures("io_uring")
def test_io_uring_writes_to_a_tun_device_in_batches_with_one_refused(namespace: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c",
                           URING_SCRIPT], capture_output=True, text=True, timeout=60,
                          cwd=netlab.REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "True", "599", "True", "refused", "True"], \
        done.stdout + done.stderr
