"""Is the 6in4 broker still there? RFC 4213 §3.8 reachability probes over the tunnel.

A configured tunnel has one peer, and nothing in the data path says when it went away (a
broker that stopped forwarding looks like quiet clients). So every ``probe_interval_s`` the
coordinator sends an ICMPv6 echo request from the tunnel's link-local address to the peer's
(RFC 4213 §3.7: fe80::<IPv4 address> on each end, as Linux sit configures them), encapsulated
to the broker, and waits ``PROBE_TIMEOUT_S`` for the reply; ``sixgate_tunnel_peer_reachable``
says how the last one went. The reply also reaches the workers, which count it like any echo
reply to the gateway (it is theirs to drop).

The raw socket is opened at the start, as root; its BPF filter (``wire.echo_reply_filter``)
queues only echo replies from the broker, not a copy of the whole tunnel.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time

from sixgate.workers.capture import attach_filter
from sixgate.workers.engine.icmp import ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, build_icmpv6
from sixgate.workers.engine.settings import Settings
from sixgate.workers.engine.tunnel import link_local_6in4
from sixgate.workers.engine.wire import echo_reply_filter, pack_filter

PROBE_TIMEOUT_S = 5.0  # a reply later than this counts as lost
PAYLOAD = b"sixgate tunnel peer probe"
IDENT = struct.Struct("!HH")


def probe_request(source: bytes, target: bytes, ident: int, seq: int) -> bytes:
    """The echo request (RFC 4443 §4.1) from ``source`` to ``target``, an IPv6 packet."""
    return build_icmpv6(source, target, ICMPV6_ECHO_REQUEST, 0, (ident << 16) | seq, PAYLOAD,
                        hop_limit=255)


def is_probe_reply(packet: bytes, peer_ipv4: bytes, source: bytes, target: bytes, ident: int,
                   seq: int) -> bool:
    """True when ``packet`` (protocol 41, the outer IPv4 header first) is the reply to that
    request: from the peer's address and link-local, to ours, same identifier and sequence."""
    if len(packet) < 68 or packet[0] != 0x45 or packet[9] != 41 or packet[12:16] != peer_ipv4:
        return False
    inner = packet[20:]
    return (inner[6] == 58 and inner[8:24] == target and inner[24:40] == source
            and inner[40] == ICMPV6_ECHO_REPLY and IDENT.unpack_from(inner, 44) == (ident, seq))


class PeerProbe:
    """The 6in4 peer's reachability, probed on demand (``probe``) from a thread of the
    coordinator."""

    def __init__(self, settings: Settings, remote_ipv4: str | None = None) -> None:
        """The broker ``remote_ipv4`` (a 6in4 [[tunnel]]'s), the first tunnel's by default."""
        remote_ipv4 = remote_ipv4 or settings.remote_ipv4
        assert remote_ipv4
        self.peer = remote_ipv4
        self.peer_ipv4 = ipaddress.IPv4Address(remote_ipv4).packed
        self.source = link_local_6in4(ipaddress.IPv4Address(settings.known_ipv4).packed)
        self.target = link_local_6in4(self.peer_ipv4)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 41)
        attach_filter(self.sock, pack_filter(echo_reply_filter(self.peer_ipv4)))
        self.sock.bind((settings.local_ipv4, 0))
        self.ident = time.monotonic_ns() & 0xFFFF
        self.seq = 0
        self.reachable: bool | None = None  # None until the first probe ends
        self.rtt_s: float | None = None
        self.sent = self.answered = 0

    def probe(self, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
        """One echo request to the peer; True when its reply came within ``timeout_s``."""
        self.seq = (self.seq + 1) & 0xFFFF
        request = probe_request(self.source, self.target, self.ident, self.seq)
        sent_at = time.monotonic()
        self.sent += 1
        try:
            self.sock.sendto(request, (self.peer, 0))
        except OSError:
            self.reachable = False  # no route to the broker at all
            return False
        deadline = sent_at + timeout_s
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([self.sock], [], [], remaining)
                if not ready:
                    break
                packet = self.sock.recv(65535)
                if is_probe_reply(packet, self.peer_ipv4, self.source, self.target,
                                  self.ident, self.seq):
                    self.answered += 1
                    self.rtt_s = time.monotonic() - sent_at
                    self.reachable = True
                    return True
        except (OSError, ValueError):
            pass  # the socket was closed under us: the gateway is stopping
        self.reachable = False
        return False

    def close(self) -> None:
        self.sock.close()
