"""``sixgate ping``: ICMPv6 echo through the tunnel from userspace, on a host with no kernel IPv6.

Sends an echo request (RFC 4443 §4.1) from the gateway's first address, encapsulated in IPv4
protocol 41 towards the tunnel peer (RFC 3056 §5.3 / RFC 4213), once a second, and prints the
replies with their round-trip time the way ``ping -6`` does. Works beside a running gateway:
raw sockets each get a copy of every proto-41 packet.

With a ``[nat64]`` table, an IPv4 target (or an IPv6 one inside the NAT64 prefix) is pinged
through the NAT64 instead: an ICMPv6 echo from this host's kernel to the RFC 6052 address that
stands for it, which the gateway's route takes into its TUN device, translates (RFC 7915 §4.2,
RFC 6146 §3.5.3) and answers from the IPv4 side. The host's source address for the prefix must
be one of ``nat64.clients``; when it is not, nothing is sent and the fix is printed.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import time

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.icmp import ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, build_icmpv6
from sixgate.workers.engine.nat64 import Nat64Prefix
from sixgate.workers.engine.packet import PROTO_ICMPV6, parse_ipv6
from sixgate.workers.engine.settings import Settings
from sixgate.workers.engine.tunnel import TunnelPolicy, check_inbound, outer_destination

IP_MTU_DISCOVER = 10
IP_PMTUDISC_DONT = 0


def ping(settings: Settings, address: str, count: int, interval_s: float = 1.0,
         timeout_s: float = 2.0, size: int = 56) -> int:
    """Print ping -6 style lines; exit code 0 if any reply came back, 1 otherwise (2: the
    target cannot be pinged with this config)."""
    nat64_target = _nat64_target(settings, address)
    if nat64_target is not None:
        return _ping_nat64(settings, address, nat64_target, count, interval_s, timeout_s, size)
    if ipaddress.ip_address(address).version == 4:
        raise ValueError(f"{address} is an IPv4 address: it is pinged through a NAT64, and "
                         "this config has no [nat64] table")
    if settings.mode == "nat64":
        raise ValueError(f"{address} is not inside the NAT64 prefix {settings.nat64_prefix} "
                         "and this config has no [tunnel] to ping it through")
    target = ipaddress.IPv6Address(address).packed
    source = ipaddress.IPv6Address(settings.addresses[0]).packed
    outer = outer_destination(
        target, settings.mode,
        ipaddress.IPv4Address(settings.remote_ipv4).packed if settings.remote_ipv4 else None,
        ipaddress.IPv4Address(settings.relay_ipv4).packed if settings.relay_ipv4 else None,
        settings.sixrd)
    if outer is None:
        print(f"sixgate ping: no IPv4 tunnel destination for {address}")
        return 2
    outer_ip = socket.inet_ntoa(outer)
    policy = TunnelPolicy.build(settings.mode, settings.local_ipv4, settings.remote_ipv4,
                                list(settings.addresses), public_ipv4=settings.known_ipv4,
                                sixrd=settings.sixrd)
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 41)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 64)
    sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
    sock.bind((settings.local_ipv4, 0))
    ident = os.getpid() & 0xFFFF
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    print(f"PING {address} from {settings.addresses[0]} via {settings.mode} tunnel to "
          f"{outer_ip}: {size} data bytes")
    sent = 0
    rtts: list[float] = []
    try:
        for seq in range(1, count + 1):
            request = build_icmpv6(source, target, ICMPV6_ECHO_REQUEST, 0,
                                   (ident << 16) | seq, payload)
            sent_at = time.monotonic()
            sock.sendto(request, (outer_ip, 0))
            sent += 1
            deadline = sent_at + max(timeout_s, interval_s)
            got = False
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                ready, _, _ = select.select([sock], [], [], remaining)
                if not ready:
                    break
                packet = sock.recv(65535)
                result = check_inbound(packet, policy)
                if isinstance(result, DropReason):
                    continue
                inner, _src = result
                view = parse_ipv6(inner)
                if not isinstance(view, tuple) or view[4] != PROTO_ICMPV6:
                    continue
                off = view[5]
                if len(inner) < off + 8 or inner[off] != ICMPV6_ECHO_REPLY:
                    continue
                r_ident, r_seq = struct.unpack_from("!HH", inner, off + 4)
                if r_ident != ident or r_seq != seq or bytes(view[2]) != target:
                    continue
                if bytes(inner[off + 8:]) != payload:
                    print(f"reply seq={seq}: payload differs from what was sent")
                rtt = (time.monotonic() - sent_at) * 1000
                rtts.append(rtt)
                got = True
                print(f"{len(inner) - off} bytes from {address}: icmp_seq={seq} "
                      f"ttl={view[1]} time={rtt:.2f} ms", flush=True)
                break
            if not got:
                print(f"no reply for icmp_seq={seq}", flush=True)
            if seq < count:
                time.sleep(max(0.0, interval_s - (time.monotonic() - sent_at)))
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return _summary(address, sent, rtts)


def _summary(address: str, sent: int, rtts: list[float]) -> int:
    """ping's closing lines; the exit code: 0 when a reply came back."""
    loss = 100.0 * (sent - len(rtts)) / sent if sent else 0.0
    print(f"--- {address} ping statistics ---")
    print(f"{sent} packets transmitted, {len(rtts)} received, {loss:.0f}% packet loss")
    if rtts:
        print(f"rtt min/avg/max = {min(rtts):.3f}/{sum(rtts) / len(rtts):.3f}/"
              f"{max(rtts):.3f} ms")
    return 0 if rtts else 1


def _nat64_target(settings: Settings, address: str) -> bytes | None:
    """The RFC 6052 address an IPv4 ``address`` (or one inside the prefix) is pinged at, or
    None when the target is not the NAT64's (no [nat64], or an IPv6 address outside it)."""
    if not settings.nat64_prefix:
        return None
    prefix = Nat64Prefix.parse(settings.nat64_prefix)
    parsed = ipaddress.ip_address(address)
    if parsed.version == 4:
        return prefix.synthesize(parsed.packed)
    return parsed.packed if prefix.extract(parsed.packed) is not None else None


def _ping_nat64(settings: Settings, address: str, target: bytes, count: int, interval_s: float,
                timeout_s: float, size: int) -> int:
    """ICMPv6 echo from this host's kernel to ``target`` (RFC 4443 §4.1), through the NAT64."""
    shown = str(ipaddress.IPv6Address(target))
    if settings.nat64_input != "tun":
        raise ValueError("nat64.input is \"tunnel\": the NAT64 serves a site behind the "
                         "tunnel, not this host; ping from a client of that site")
    probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        probe.connect((shown, 9))
        source = probe.getsockname()[0].split("%")[0]
    except OSError as exc:
        raise ValueError(f"no route to {shown} ({exc.strerror}): is the gateway running? It "
                         f"routes {settings.nat64_prefix} into its TUN devices") from None
    finally:
        probe.close()
    clients = [ipaddress.IPv6Network(c) for c in settings.nat64_clients]
    if not any(ipaddress.IPv6Address(source) in net for net in clients):
        raise ValueError(f"this host sends to {shown} from {source}, which is not in "
                         f"nat64.clients ({', '.join(settings.nat64_clients)}); add "
                         f"\"{source}/128\" to clients, or ping from a client")
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    ident = os.getpid() & 0xFFFF
    payload = (bytes(range(256)) * (size // 256 + 1))[:size]
    print(f"PING {address} ({shown}) from {source} through the NAT64: {size} data bytes")
    rtts: list[float] = []
    sent = 0
    try:
        for seq in range(1, count + 1):
            # The kernel fills in the ICMPv6 checksum of a raw ICMPv6 socket (RFC 3542 §3.1).
            request = struct.pack("!BBHHH", ICMPV6_ECHO_REQUEST, 0, 0, ident, seq) + payload
            sent_at = time.monotonic()
            sock.sendto(request, (shown, 0))
            sent += 1
            rtt = _await_echo_reply(sock, target, ident, seq, payload, sent_at,
                                    sent_at + max(timeout_s, interval_s))
            if rtt is None:
                print(f"no reply for icmp_seq={seq}", flush=True)
            else:
                rtts.append(rtt)
                print(f"{len(payload) + 8} bytes from {address}: icmp_seq={seq} "
                      f"time={rtt:.2f} ms", flush=True)
            if seq < count:
                time.sleep(max(0.0, interval_s - (time.monotonic() - sent_at)))
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return _summary(address, sent, rtts)


def _await_echo_reply(sock: socket.socket, target: bytes, ident: int, seq: int, payload: bytes,
                      sent_at: float, deadline: float) -> float | None:
    """Milliseconds from ``sent_at`` until the echo reply to (``ident``, ``seq``) came from
    ``target``; None at ``deadline``."""
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], remaining)
        if not ready:
            break
        message, peer = sock.recvfrom(65535)
        if ipaddress.IPv6Address(peer[0].split("%")[0]).packed != target or len(message) < 8:
            continue
        if message[0] != ICMPV6_ECHO_REPLY or \
                struct.unpack_from("!HH", message, 4) != (ident, seq):
            continue
        if message[8:] != payload:
            print(f"reply seq={seq}: payload differs from what was sent")
        return (time.monotonic() - sent_at) * 1000
    return None
