"""An independent userspace 6in4 / 6to4 / 6rd tunnel peer: the lab's "other end" of the tunnel.

It bridges a TUN device (IPv6 packets of the peer namespace's real kernel stack) and an IPv4
protocol-41 raw socket, RFC 4213 §3 (6in4) and RFC 3056 §5 (6to4):

- outbound: an IPv6 packet read from the TUN is encapsulated in IPv4 protocol 41 and sent to
  ``--remote`` (6in4) or to the IPv4 address embedded in a 2002::/16 destination (6to4), or
  in a destination of the 6rd prefix (6rd, RFC 5969 §7.1.1: this end's first
  ``--ipv4-mask-len`` bits, then the address's bits after the 6rd prefix); the kernel builds
  the outer IPv4 header.
- inbound: a protocol-41 packet from the raw socket (it arrives with its IPv4 header) is
  decapsulated (strip IHL*4 bytes, trim to 40 + IPv6 payload length) and written into the TUN.
  In 6in4 mode only packets from ``--remote`` are accepted (RFC 4213 §3.6).

It must never import sixgate's own ``workers``/``coordinator`` packages: a codec bug in the
gateway must not be able to cancel itself out here. Plain ``struct`` code only; it never raises
for any packet (odd packets are counted and dropped). Readiness: once the TUN exists and the
socket is bound, it creates ``--ready-file``. SIGTERM/SIGINT end it with exit code 0 and a line of
counters on stderr.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import os
import select
import signal
import socket
import struct
import sys
from collections import Counter
from pathlib import Path

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IPPROTO_IPV6_IN_IPV4 = 41
PREFIX_6TO4 = b"\x20\x02"
MAX_PACKET_BYTES = 65535
BATCH = 64  # packets taken per readable fd per wakeup: amortises select() over a burst
SOCKET_BUFFER_BYTES = 8 * 1024 * 1024  # a 100 MB download at full speed must not overflow it


def open_tun(name: str) -> int:
    """Open (create) the TUN device ``name`` without packet-info header; non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
    fcntl.ioctl(fd, TUNSETIFF, ifr)
    return fd


def open_raw_socket(local: str) -> socket.socket:
    """Protocol-41 raw socket bound to ``local`` (filters what we receive, sets our source)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_IPV6_IN_IPV4)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            force = 33 if opt == socket.SO_RCVBUF else 32  # SO_RCVBUFFORCE / SO_SNDBUFFORCE
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER_BYTES)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
    sock.bind((local, 0))
    sock.setblocking(False)
    return sock


def internet_checksum(data: bytes) -> int:
    """RFC 1071, for the Packet Too Big messages this peer makes."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def packet_too_big(router: bytes, packet: bytes, mtu: int) -> bytes:
    """ICMPv6 Packet Too Big (RFC 4443 §3.2) from ``router`` about ``packet``, at most
    1280 bytes (RFC 4443 §2.4(c))."""
    body = struct.pack("!BBHI", 2, 0, 0, mtu) + packet[:1280 - 48]
    destination = packet[8:24]
    pseudo = router + destination + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", internet_checksum(pseudo + body)) + body[4:]
    return struct.pack("!IHBB", 6 << 28, len(body), 58, 64) + router + destination + body


class TunnelPeer:
    """The encapsulate/decapsulate decisions, kept apart from the select loop."""

    def __init__(self, mode: str, remote: str | None, relay: str | None,
                 path_mtu: int | None = None, router: str | None = None,
                 sixrd_prefix: str | None = None, ipv4_mask_len: int = 0,
                 local: str | None = None) -> None:
        self.mode = mode
        # 6rd: the domain's prefix and the high IPv4 bits every CE shares (ours).
        self.sixrd = ipaddress.IPv6Network(sixrd_prefix) if sixrd_prefix else None
        self.shared = (int(ipaddress.IPv4Address(local)) >> (32 - ipv4_mask_len)
                       << (32 - ipv4_mask_len) if local and ipv4_mask_len else 0)
        self.ipv4_mask_len = ipv4_mask_len
        # Acting as a router whose next hop has a smaller MTU: packets from the tunnel larger
        # than ``path_mtu`` are answered with Packet Too Big from ``router`` (RFC 8201 §4).
        self.path_mtu = path_mtu
        self.router = ipaddress.IPv6Address(router).packed if router else None
        self.remote = remote
        self.remote_bytes = socket.inet_aton(remote) if remote else None
        self.relay = relay
        self.stats: Counter[str] = Counter()

    def repoint(self, remote: str) -> None:
        """6in4: the other end moved (a broker's tunnel after an update of its address)."""
        ipaddress.IPv4Address(remote)
        self.remote, self.remote_bytes = remote, socket.inet_aton(remote)
        self.stats["repointed"] += 1

    def outer_destination(self, packet: bytes) -> str | None:
        """IPv4 address to which an IPv6 packet from the TUN is sent, or None to drop it."""
        if len(packet) < 40 or packet[0] >> 4 != 6:
            self.stats["outbound_not_ipv6"] += 1
            return None
        if self.mode == "6in4":
            return self.remote
        destination = packet[24:40]
        if self.sixrd is not None:
            address = ipaddress.IPv6Address(destination)
            if address in self.sixrd:
                bits = 32 - self.ipv4_mask_len
                shift = 128 - self.sixrd.prefixlen - bits
                low = (int(address) >> shift) & ((1 << bits) - 1)
                return str(ipaddress.IPv4Address(self.shared | low))
            return self.relay
        # RFC 3056 §5.3: a 2002::/16 destination is reached at its embedded IPv4 address.
        if destination[:2] == PREFIX_6TO4:
            return socket.inet_ntoa(destination[2:6])
        if self.relay:
            return self.relay
        self.stats["outbound_no_route"] += 1
        return None

    def decapsulate(self, datagram: bytes) -> bytes | None:
        """Inner IPv6 packet of a received IPv4 protocol-41 datagram, or None to drop it."""
        if len(datagram) < 20 or datagram[0] >> 4 != 4:
            self.stats["inbound_bad_ipv4"] += 1
            return None
        header_bytes = (datagram[0] & 0x0F) * 4
        if header_bytes < 20 or datagram[9] != IPPROTO_IPV6_IN_IPV4:
            self.stats["inbound_bad_ipv4"] += 1
            return None
        # RFC 4213 §3.6: a configured tunnel accepts packets from its remote end only.
        if self.mode == "6in4" and datagram[12:16] != self.remote_bytes:
            self.stats["inbound_wrong_peer"] += 1
            return None
        inner = datagram[header_bytes:]
        if len(inner) < 40 or inner[0] >> 4 != 6:
            self.stats["inbound_bad_ipv6"] += 1
            return None
        (payload_bytes,) = struct.unpack_from("!H", inner, 4)
        if 40 + payload_bytes > len(inner):
            self.stats["inbound_truncated"] += 1
            return None
        return inner[: 40 + payload_bytes]


def pump_outbound(peer: TunnelPeer, tun: int, sock: socket.socket) -> None:
    """Move up to BATCH packets from the TUN to the raw socket."""
    for _ in range(BATCH):
        try:
            packet = os.read(tun, MAX_PACKET_BYTES)
        except BlockingIOError:
            return
        except OSError:
            peer.stats["tun_read_error"] += 1
            return
        destination = peer.outer_destination(packet)
        if destination is None:
            continue
        try:
            sock.sendto(packet, (destination, 0))
            peer.stats["encapsulated"] += 1
        except OSError:
            peer.stats["send_error"] += 1


def pump_inbound(peer: TunnelPeer, tun: int, sock: socket.socket) -> None:
    """Move up to BATCH packets from the raw socket into the TUN."""
    for _ in range(BATCH):
        try:
            datagram = sock.recv(MAX_PACKET_BYTES)
        except BlockingIOError:
            return
        except OSError:
            peer.stats["recv_error"] += 1
            return
        inner = peer.decapsulate(datagram)
        if inner is None:
            continue
        if peer.path_mtu and peer.router and len(inner) > peer.path_mtu:
            reply = packet_too_big(peer.router, inner, peer.path_mtu)
            try:
                sock.sendto(reply, (socket.inet_ntoa(datagram[12:16]), 0))
                peer.stats["packet_too_big_sent"] += 1
            except OSError:
                peer.stats["send_error"] += 1
            continue
        try:
            os.write(tun, inner)
            peer.stats["decapsulated"] += 1
        except OSError:
            peer.stats["tun_write_error"] += 1


def run(args: argparse.Namespace) -> int:
    """Open the TUN and the socket, signal readiness, pump until SIGTERM."""
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    tun = open_tun(args.tun)
    sock = open_raw_socket(args.local)
    peer = TunnelPeer(args.mode, args.remote, args.relay, args.path_mtu, args.router,
                      args.sixrd_prefix, args.ipv4_mask_len, args.local)

    def repoint(_signum: int, _frame: object) -> None:
        if args.remote_file:
            try:
                peer.repoint(Path(args.remote_file).read_text().strip())
            except (OSError, ValueError):
                peer.stats["repoint_failed"] += 1

    signal.signal(signal.SIGUSR1, repoint)
    if args.ready_file:
        Path(args.ready_file).write_text(f"{os.getpid()}\n")
    print(f"tunnel_peer ready: mode={args.mode} tun={args.tun} local={args.local}", flush=True)
    raw_fd = sock.fileno()
    while not stopping:
        try:
            readable, _, _ = select.select([tun, raw_fd], [], [], 0.5)
        except InterruptedError:
            continue
        if tun in readable:
            pump_outbound(peer, tun, sock)
        if raw_fd in readable:
            pump_inbound(peer, tun, sock)
    print(f"tunnel_peer stats: {dict(sorted(peer.stats.items()))}", file=sys.stderr, flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; 6in4 needs --remote."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tun", required=True, help="TUN device name to create")
    parser.add_argument("--mode", choices=("6to4", "6in4", "6rd"), required=True)
    parser.add_argument("--local", required=True, help="our IPv4 tunnel endpoint")
    parser.add_argument("--remote", help="6in4: the remote IPv4 endpoint")
    parser.add_argument("--relay", help="6to4: IPv4 relay for non-2002::/16 destinations; "
                        "6rd: the border relay, for destinations outside the 6rd prefix")
    parser.add_argument("--sixrd-prefix", help="6rd: the domain's 6rd prefix")
    parser.add_argument("--ipv4-mask-len", type=int, default=0,
                        help="6rd: IPv4 bits every CE of the domain shares")
    parser.add_argument("--ready-file", help="created once the tunnel is up")
    parser.add_argument("--remote-file", help="6in4: on SIGUSR1 the remote endpoint is read "
                        "again from this file (as a broker re-points a tunnel)")
    parser.add_argument("--path-mtu", type=int, help="act as a router with this next-hop "
                        "MTU: bigger packets from the tunnel get Packet Too Big")
    parser.add_argument("--router", help="IPv6 source address of those Packet Too Big")
    args = parser.parse_args(argv)
    if args.mode == "6in4" and not args.remote:
        parser.error("--mode 6in4 needs --remote")
    if args.mode == "6rd" and not args.sixrd_prefix:
        parser.error("--mode 6rd needs --sixrd-prefix")
    for address in (args.local, args.remote, args.relay):
        if address:
            ipaddress.IPv4Address(address)
    return args


if __name__ == "__main__":
    sys.exit(run(parse_args()))
