"""workers/_tunread.c: a batch of read(2)s gives each packet whole, in order, up to the limit,
and stops quietly when nothing is left. A SOCK_SEQPACKET socket pair keeps packet boundaries
as a TUN device does (the labs read real TUN devices through it)."""

from __future__ import annotations

import socket

import pytest
from support.helpers import require_compiled

from sixgate.workers.main import read_packets


@pytest.fixture()
def pair() -> tuple[socket.socket, socket.socket]:
    require_compiled(read_packets, "workers/_tunread.c")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    yield a, b
    a.close()
    b.close()


def test_each_packet_whole_in_order_up_to_the_limit(pair: tuple[socket.socket, socket.socket]
                                                     ) -> None:
    a, b = pair
    sent = [b"\x60" + bytes([i]) * size for i, size in enumerate((0, 39, 1279, 60000, 7))]
    for packet in sent:
        a.send(packet)
    assert read_packets is not None
    assert read_packets(b.fileno(), 3) == sent[:3]
    assert read_packets(b.fileno(), 256) == sent[3:]
    assert read_packets(b.fileno(), 256) == []  # EAGAIN: an empty batch, no error


def test_an_error_before_the_first_packet_is_raised(pair: tuple[socket.socket, socket.socket]
                                                    ) -> None:
    assert read_packets is not None
    with pytest.raises(OSError):
        read_packets(-1, 4)
