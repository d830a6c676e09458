"""``sixgate ping``: ICMPv6 echo through the tunnel from userspace, on a host with no kernel IPv6.

Sends an echo request (RFC 4443 §4.1) from the gateway's first address, encapsulated in IPv4
protocol 41 towards the tunnel peer (RFC 3056 §5.3 / RFC 4213), once a second, and prints the
replies with their round-trip time the way ``ping -6`` does. Works beside a running gateway:
raw sockets each get a copy of every proto-41 packet.
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
from sixgate.workers.engine.packet import PROTO_ICMPV6, parse_ipv6
from sixgate.workers.engine.settings import Settings
from sixgate.workers.engine.tunnel import TunnelPolicy, check_inbound, outer_destination

IP_MTU_DISCOVER = 10
IP_PMTUDISC_DONT = 0


def ping(settings: Settings, address: str, count: int, interval_s: float = 1.0,
         timeout_s: float = 2.0, size: int = 56) -> int:
    """Print ping -6 style lines; exit code 0 if any reply came back, 1 otherwise."""
    target = ipaddress.IPv6Address(address).packed
    source = ipaddress.IPv6Address(settings.addresses[0]).packed
    outer = outer_destination(
        target, settings.mode,
        ipaddress.IPv4Address(settings.remote_ipv4).packed if settings.remote_ipv4 else None,
        ipaddress.IPv4Address(settings.relay_ipv4).packed if settings.relay_ipv4 else None)
    if outer is None:
        print(f"sixgate ping: no IPv4 tunnel destination for {address}")
        return 2
    outer_ip = socket.inet_ntoa(outer)
    policy = TunnelPolicy.build(settings.mode, settings.local_ipv4, settings.remote_ipv4,
                                list(settings.addresses))
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 41)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 64)
    sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
    sock.bind((settings.local_ipv4, 0))
    ident = os.getpid() & 0xFFFF
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    print(f"PING {address} from {settings.addresses[0]} via {settings.mode} tunnel to "
          f"{outer_ip}: {size} data bytes")
    sent = received = 0
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
                received += 1
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
    loss = 100.0 * (sent - received) / sent if sent else 0.0
    print(f"--- {address} ping statistics ---")
    print(f"{sent} packets transmitted, {received} received, {loss:.0f}% packet loss")
    if rtts:
        print(f"rtt min/avg/max = {min(rtts):.3f}/{sum(rtts) / len(rtts):.3f}/"
              f"{max(rtts):.3f} ms")
    return 0 if received else 1
