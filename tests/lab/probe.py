"""Client-side probes the lab runs inside the peer namespace; each prints one line of JSON.

Like tunnel_peer.py this never imports sixgate's packages: packets are built with plain struct
code, so the gateway's codec is checked against an independent one.

Subcommands:
  tcp-many     N concurrent HTTP/1.0 GETs (all connected before any request is sent)
  hold-tcp     open one TCP connection, report its local address, hold it until stdin closes
  udp-refused  send a datagram on a connected UDP socket; did ICMPv6 port unreachable come back?
  send41       send IPv4 protocol-41 packets carrying ICMPv6 echo requests from a chosen outer
               and inner source; count echo replies that come back
  synflood41   send TCP SYNs from random sources of one /48 over protocol 41
  fuzz41       send malformed protocol-41 packets built from valid echo requests
  exchange41   send one given IPv6 packet over protocol 41; print the inner IPv6 packets the
               gateway sends back (hex) within a time limit
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import select
import socket
import struct
import sys
import threading
import time
from typing import Any

IPPROTO_IPV6_IN_IPV4 = 41
ICMPV6 = 58
ECHO_REQUEST = 128
TCP = 6
ECHO_REPLY = 129
NEIGHBOR_SOLICITATION = 135
NEIGHBOR_ADVERTISEMENT = 136


# --------------------------------------------------------------------------- tcp-many


def http_get(address: str, port: int, path: str, source: str | None, timeout_s: float,
             go: threading.Event, connected: threading.Semaphore) -> tuple[str, bytes]:
    """Connect (from ``source`` if given), wait for ``go``, GET; return (error or "", body)."""
    try:
        sock = socket.create_connection((address, port), timeout=timeout_s,
                                        source_address=(source, 0) if source else None)
    except OSError as exc:
        connected.release()
        return f"connect: {exc!r}", b""
    connected.release()
    with sock:
        go.wait(timeout_s)
        try:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: lab\r\n\r\n".encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError as exc:
            return f"request: {exc!r}", b""
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200") and not head.startswith(b"HTTP/1.1 200"):
        return f"status: {head[:60]!r}", body
    return "", body


def tcp_many(args: argparse.Namespace) -> dict[str, Any]:
    """Open ``count`` connections at once, then request on all; report what came back."""
    go = threading.Event()
    connected = threading.Semaphore(0)
    results: list[tuple[str, bytes] | None] = [None] * args.count
    sources = args.sources.split(",") if args.sources else [None]

    def worker(index: int) -> None:
        source = sources[index % len(sources)]
        results[index] = http_get(args.addr, args.port, args.path, source, args.timeout, go,
                                  connected)

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.count)]
    for thread in threads:
        thread.start()
    for _ in threads:
        connected.acquire(timeout=args.timeout)
    connect_s = time.monotonic() - started
    go.set()
    for thread in threads:
        thread.join(args.timeout)
    expected = args.expect.encode()
    errors = [r[0] if r else "no result (thread hung)" for r in results if not r or r[0]]
    wrong = sum(1 for r in results if r and not r[0] and r[1] != expected)
    ok = sum(1 for r in results if r and not r[0] and r[1] == expected)
    return {"count": args.count, "ok": ok, "wrong_body": wrong, "errors": errors[:10],
            "error_count": len(errors), "connect_s": round(connect_s, 3),
            "elapsed_s": round(time.monotonic() - started, 3)}


# --------------------------------------------------------------------------- hold-tcp


def hold_tcp(args: argparse.Namespace) -> dict[str, Any]:
    """Connect, print the local endpoint, keep the connection until stdin reaches EOF."""
    sock = socket.create_connection((args.addr, args.port), timeout=args.timeout)
    local = sock.getsockname()
    print(json.dumps({"local_addr": local[0], "local_port": local[1]}), flush=True)
    sys.stdin.read()
    sock.close()
    return {"closed": True}


# --------------------------------------------------------------------------- udp-refused


def udp_refused(args: argparse.Namespace) -> dict[str, Any]:
    """RFC 4443 §3.1 code 4 on a connected UDP socket surfaces as ECONNREFUSED."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.settimeout(args.timeout)
    sock.connect((args.addr, args.port))
    started = time.monotonic()
    sock.send(b"anyone there?")
    try:
        data = sock.recv(2048)
        result = f"answered {len(data)} bytes"
    except ConnectionRefusedError:
        result = "refused"
    except TimeoutError:
        result = "timeout"
    return {"result": result, "elapsed_s": round(time.monotonic() - started, 3)}


# --------------------------------------------------------------------------- send41


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(source: str, destination: str, ident: int, seq: int) -> bytes:
    """An IPv6 packet carrying an ICMPv6 echo request (RFC 4443 §4.1), checksum included."""
    src = ipaddress.IPv6Address(source).packed
    dst = ipaddress.IPv6Address(destination).packed
    payload = b"sixgate-lab-probe" + os.urandom(8)
    icmp = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq) + payload
    # RFC 8200 §8.1: the upper-layer checksum covers a pseudo-header.
    pseudo = src + dst + struct.pack("!I3xB", len(icmp), ICMPV6)
    icmp = icmp[:2] + struct.pack("!H", checksum(pseudo + icmp)) + icmp[4:]
    header = struct.pack("!IHBB", 6 << 28, len(icmp), ICMPV6, 64) + src + dst
    return header + icmp


def neighbor_solicitation(source: str, target: str) -> bytes:
    """A unicast NUD probe (RFC 4861 §7.2.2): ICMPv6 135 to the target, hop limit 255."""
    src = ipaddress.IPv6Address(source).packed
    dst = ipaddress.IPv6Address(target).packed
    icmp = struct.pack("!BBHI", NEIGHBOR_SOLICITATION, 0, 0, 0) + dst
    pseudo = src + dst + struct.pack("!I3xB", len(icmp), ICMPV6)
    icmp = icmp[:2] + struct.pack("!H", checksum(pseudo + icmp)) + icmp[4:]
    return struct.pack("!IHBB", 6 << 28, len(icmp), ICMPV6, 255) + src + dst + icmp


def matches_advertisement(datagram: bytes, target: str) -> bool:
    """A protocol-41 datagram carrying a solicited Neighbor Advertisement for ``target``."""
    inner = datagram[(datagram[0] & 0x0F) * 4:]
    if len(inner) < 64 or inner[0] >> 4 != 6 or inner[6] != ICMPV6 or inner[7] != 255:
        return False
    icmp_type, _, _, flags = struct.unpack_from("!BBHI", inner, 40)
    return bool(icmp_type == NEIGHBOR_ADVERTISEMENT and flags & 0x40000000
                and inner[48:64] == ipaddress.IPv6Address(target).packed)


def matches_reply(datagram: bytes, ident: int) -> bool:
    """A protocol-41 datagram carrying an ICMPv6 echo reply with our identifier."""
    inner = datagram[(datagram[0] & 0x0F) * 4:]
    if len(inner) < 48 or inner[0] >> 4 != 6 or inner[6] != ICMPV6:
        return False
    icmp_type, _, _, reply_ident = struct.unpack_from("!BBHH", inner, 40)
    return bool(icmp_type == ECHO_REPLY and reply_ident == ident)


def send41(args: argparse.Namespace) -> dict[str, Any]:
    """Send ``count`` encapsulated echo requests; listen ``listen_s`` for replies."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_IPV6_IN_IPV4)
    sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_IPV6_IN_IPV4)
    sender.bind((args.outer_src, 0))  # the kernel builds the outer header from this source
    ident = int.from_bytes(os.urandom(2), "big")
    for seq in range(args.count):
        packet = (neighbor_solicitation(args.inner_src, args.inner_dst) if args.kind == "nud"
                  else echo_request(args.inner_src, args.inner_dst, ident, seq))
        sender.sendto(packet, (args.outer_dst, 0))
    replies, to_far, seen = 0, 0, 0
    deadline = time.monotonic() + args.listen_s
    while (remaining := deadline - time.monotonic()) > 0:
        if not select.select([listener], [], [], remaining)[0]:
            break
        datagram, _ = listener.recvfrom(65535)
        seen += 1
        replies += (matches_advertisement(datagram, args.inner_dst) if args.kind == "nud"
                    else matches_reply(datagram, ident))
        to_far += datagram[16:20] == socket.inet_aton(args.far)
        if args.stop_early and replies >= args.count:
            break
    return {"sent": args.count, "replies": replies, "to_far": to_far, "seen": seen}


def exchange41(args: argparse.Namespace) -> dict[str, Any]:
    """Send ``packet`` (hex IPv6) inside IPv4 protocol 41; collect what the gateway (the outer
    destination) sends back for ``listen_s``, or until the first answer with --stop-early."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_IPV6_IN_IPV4)
    sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_IPV6_IN_IPV4)
    sender.bind((args.outer_src, 0))
    sender.sendto(bytes.fromhex(args.packet), (args.outer_dst, 0))
    gateway = socket.inet_aton(args.outer_dst)
    answers: list[str] = []
    deadline = time.monotonic() + args.listen_s
    while (remaining := deadline - time.monotonic()) > 0:
        if not select.select([listener], [], [], remaining)[0]:
            break
        datagram, _ = listener.recvfrom(65535)
        if datagram[12:16] != gateway:
            continue
        answers.append(datagram[(datagram[0] & 0x0F) * 4:].hex())
        if args.stop_early:
            break
    return {"answers": answers}


# --------------------------------------------------------------------------- synflood41


def tcp_syn(source: bytes, destination: bytes, sport: int, dport: int, seq: int) -> bytes:
    """An IPv6 packet carrying a bare TCP SYN (RFC 9293 §3.1), checksum included."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 65535, 0, 0)
    pseudo = source + destination + struct.pack("!I3xB", len(tcp), TCP)
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    return struct.pack("!IHBB", 6 << 28, len(tcp), TCP, 64) + source + destination + tcp


def synflood41(args: argparse.Namespace) -> dict[str, Any]:
    """``count`` SYNs, each from a random address of a random /64 of ``--inner-prefix`` (a
    /48), as a flood of spoofed sources behind one 6to4 router would come."""
    rng = random.Random(args.seed)
    sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_IPV6_IN_IPV4)
    sender.bind((args.outer_src, 0))
    prefix = ipaddress.IPv6Network(args.inner_prefix).network_address.packed[:6]
    destination = ipaddress.IPv6Address(args.inner_dst).packed
    sent = 0
    for _ in range(args.count):
        source = prefix + rng.randbytes(10)
        packet = tcp_syn(source, destination, rng.randrange(1024, 65536), args.port,
                         rng.randrange(2**32))
        try:
            sender.sendto(packet, (args.outer_dst, 0))
            sent += 1
        except OSError:
            pass
    return {"sent": sent}


# --------------------------------------------------------------------------- fuzz41


def mutate(packet: bytes, rng: random.Random) -> bytes:
    """One malformed variant of a valid IPv6 packet: flipped bytes, cut short, grown, a
    different next header, a bogus fragment header or extension chain."""
    data = bytearray(packet)
    kind = rng.randrange(7)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:
        del data[rng.randrange(1, len(data)):]
    elif kind == 2:
        data += rng.randbytes(rng.randint(1, 64))
    elif kind == 3:
        data[6] = rng.randrange(256)  # next header
    elif kind == 4:  # a fragment header with random offset/M/id in front of the payload
        frag = struct.pack("!BBHI", data[6], 0, rng.randrange(65536), rng.randrange(2**32))
        data = data[:40] + bytearray(frag) + data[40:]
        data[6] = 44
        struct.pack_into("!H", data, 4, len(data) - 40)
    elif kind == 5:  # payload length that lies
        struct.pack_into("!H", data, 4, rng.randrange(65536))
    else:  # an extension header chain of random bytes
        chain = bytearray(rng.randbytes(8 * rng.randint(1, 4)))
        chain[0] = data[6]
        chain[1] = len(chain) // 8 - 1
        data = data[:40] + chain + data[40:]
        data[6] = rng.choice([0, 43, 60])
        struct.pack_into("!H", data, 4, len(data) - 40)
    return bytes(data)


def fuzz41(args: argparse.Namespace) -> dict[str, Any]:
    """Send ``count`` malformed protocol-41 datagrams built from valid echo requests."""
    rng = random.Random(args.seed)
    sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_IPV6_IN_IPV4)
    sender.bind((args.outer_src, 0))
    sent = 0
    for seq in range(args.count):
        packet = mutate(echo_request(args.inner_src, args.inner_dst, 7, seq), rng)
        try:
            sender.sendto(packet, (args.outer_dst, 0))
            sent += 1
        except OSError:
            pass
    return {"sent": sent}


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Subcommands and their options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    many = sub.add_parser("tcp-many")
    many.add_argument("--addr", required=True)
    many.add_argument("--port", type=int, default=80)
    many.add_argument("--path", default="/small.txt")
    many.add_argument("--expect", required=True, help="expected body")
    many.add_argument("--count", type=int, default=200)
    many.add_argument("--timeout", type=float, default=60)
    many.add_argument("--sources", help="comma-separated source addresses, used in turn")
    hold = sub.add_parser("hold-tcp")
    hold.add_argument("--addr", required=True)
    hold.add_argument("--port", type=int, default=80)
    hold.add_argument("--timeout", type=float, default=10)
    udp = sub.add_parser("udp-refused")
    udp.add_argument("--addr", required=True)
    udp.add_argument("--port", type=int, required=True)
    udp.add_argument("--timeout", type=float, default=3)
    addresses = argparse.ArgumentParser(add_help=False)  # outer and inner ends of a proto-41
    for flag in ("--outer-src", "--outer-dst", "--inner-src", "--inner-dst"):
        addresses.add_argument(flag, required=True)
    s41 = sub.add_parser("send41", parents=[addresses])
    s41.add_argument("--count", type=int, default=3)
    s41.add_argument("--listen-s", type=float, default=1.0)
    s41.add_argument("--far", default="203.0.113.1", help="count datagrams sent to this IPv4")
    s41.add_argument("--stop-early", action="store_true", help="stop once all replies came")
    s41.add_argument("--kind", choices=("echo", "nud"), default="echo",
                     help="echo requests, or NUD probes (Neighbor Solicitations)")
    flood = sub.add_parser("synflood41")
    for flag in ("--outer-src", "--outer-dst", "--inner-prefix", "--inner-dst"):
        flood.add_argument(flag, required=True)
    flood.add_argument("--port", type=int, default=80)
    flood.add_argument("--count", type=int, default=2000)
    flood.add_argument("--seed", type=int, default=3)
    exchange = sub.add_parser("exchange41")
    for flag in ("--outer-src", "--outer-dst", "--packet"):
        exchange.add_argument(flag, required=True)
    exchange.add_argument("--listen-s", type=float, default=2.0)
    exchange.add_argument("--stop-early", action="store_true", help="stop at the first answer")
    fuzz = sub.add_parser("fuzz41", parents=[addresses])
    fuzz.add_argument("--count", type=int, default=2000)
    fuzz.add_argument("--seed", type=int, default=41)
    return parser.parse_args(argv)


COMMANDS = {"tcp-many": tcp_many, "hold-tcp": hold_tcp, "udp-refused": udp_refused,
            "send41": send41, "fuzz41": fuzz41, "synflood41": synflood41,
            "exchange41": exchange41}

if __name__ == "__main__":
    arguments = parse_args()
    print(json.dumps(COMMANDS[arguments.command](arguments)), flush=True)
