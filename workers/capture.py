"""The tunnel's capture: protocol-41 packets read with AF_PACKET, as the IP layer gets them.

Why not a raw IPv4 socket: a kernel peer on the same host or hypervisor (a sit tunnel in the
next namespace over veth, a VM over virtio-net, a container link) hands its TCP and UDP over
with CHECKSUM_PARTIAL: the transport checksum field holds only the pseudo-header sum, because
an offload that never runs was to finish it; GRO leaves merged packets that way too. A raw
socket gives no sign of it, so the engine's strict verification would drop every such segment.
AF_PACKET with PACKET_AUXDATA says so per packet (TP_STATUS_CSUMNOTREADY): those, and only
those, get their inner checksum computed (``tunnel.complete_checksum``); every packet off the
wire is verified as before.

What reading below the IP layer takes over from it, in the kernel where it can:
- the capture filter (``wire.capture_filter``) accepts only protocol 41 to ``local_ipv4``, never
  a packet this host sends, and a plain header only with a valid header checksum (RFC 791);
- outer fragments are put back together here (``fragment.OuterReassembler``, RFC 791 §3.2);
- the host's nftables/iptables INPUT rules do not see the capture (they still apply to the IP
  layer's copy, which a raw protocol-41 socket that accepts nothing takes, so the kernel sends
  no Protocol Unreachable): sixgate's tunnel checks (``tunnel.check_inbound``) are the filter.

The socket is bound to the interface that holds ``local_ipv4`` (a bridge, bond or VLAN device
rather than its ports, so a packet is read once), or to every interface when the address is on
loopback. I/O shell: the engine never sees it.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence

from sixgate.workers.engine.counters import Counters, TunnelTraffic
from sixgate.workers.engine.drops import DropReason, Event
from sixgate.workers.engine.fragment import OuterReassembler
from sixgate.workers.engine.settings import TunnelEntry
from sixgate.workers.engine.tunnel import complete_checksum
from sixgate.workers.engine.wire import capture_filter, pack_filter
from sixgate.workers.mmsg import TP_STATUS_CSUMNOTREADY, BatchReceiver

ETH_P_IP = 0x0800
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_STATISTICS = 6  # struct tpacket_stats: tp_packets, tp_drops (read and cleared)
SO_ATTACH_FILTER = 26


# Classic BPF "ret #0": accept nothing (struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}).
DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)


def attach_filter(sock: socket.socket, program: bytes) -> None:
    """SO_ATTACH_FILTER with a classic BPF program (packed sock_filter instructions). The
    kernel copies the program, so the buffer need not outlive the call."""
    instructions = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(instructions))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def interface_of(address: str) -> int:
    """The index of the interface holding IPv4 ``address``; 0 (every interface) when it is on
    loopback or nowhere."""
    from pyroute2 import IPRoute  # netlink; the capture is opened once, as root

    with IPRoute() as ipr:
        for message in ipr.get_addr(family=socket.AF_INET, address=address):
            index = int(message["index"])
            link = ipr.get_links(index)[0]
            if link.get_attr("IFLA_IFNAME") != "lo":
                return index
    return 0


class TunnelCapture:
    """One capture socket: ``receive`` gives whole, checksum-ready protocol-41 packets."""

    def __init__(self, local_ipv4: str, share: list[tuple[int, int, int, int]] | None,
                 fragments: bool, counters: Counters, batch: int = 64,
                 rcvbuf: int = 8 << 20, tunnels: Sequence[TunnelEntry] = ()) -> None:
        self.counters = counters
        self.traffic = TunnelTraffic(counters, tunnels)  # per tunnel, for the metrics
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        try:
            self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            attach_filter(self.sock, pack_filter(capture_filter(
                socket.inet_aton(local_ipv4), share, fragments)))
            index = interface_of(local_ipv4)
            if index:  # else unbound: every interface
                self.sock.bind((socket.if_indextoname(index), ETH_P_IP))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.receiver = BatchReceiver(self.sock, batch, auxdata=True)
        self.batch = batch
        self.fragments = fragments  # whether the filter lets outer fragments through
        self.reassembler = OuterReassembler()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def receive(self, now: float) -> tuple[list[bytes], int]:
        """The packets waiting now (at most a batch), whole and checksum-ready; and how many
        were read (0: nothing waits)."""
        packets, statuses = self.receiver.receive_with_status()
        if not packets:
            return packets, 0
        size = sum(map(len, packets))
        self.counted(len(packets), size)
        self.traffic.received(packets, size)
        if not self.fragments and not any(statuses):
            return packets, len(packets)  # the common batch: nothing to complete or reassemble
        return self.complete(packets, statuses, now), len(packets)

    def counted(self, count: int, size: int) -> None:
        """Count ``count`` packets of ``size`` bytes captured (by ``receive``, or by the
        compiled loop around the poll, workers/_tunread.c ``serve``)."""
        counters = self.counters
        counters.event(Event.TUNNEL_PACKETS_RECEIVED, count)
        counters.event(Event.TUNNEL_BYTES_RECEIVED, size)

    def complete(self, packets: list[bytes], statuses: list[int], now: float) -> list[bytes]:
        """Captured packets made whole and checksum-ready: outer fragments put back together
        (RFC 791 §3.2), a kernel peer's offloaded checksums completed."""
        counters = self.counters
        out: list[bytes] = []
        for packet, status in zip(packets, statuses, strict=True):
            if packet[6] & 0x3F or packet[7]:  # MF or a fragment offset: reassemble first
                self._fragment(packet, now, out)
                continue
            if status & TP_STATUS_CSUMNOTREADY:
                packet = complete_checksum(packet)
                counters.event(Event.CHECKSUMS_COMPLETED)
            out.append(packet)
        return out

    def _fragment(self, packet: bytes, now: float, out: list[bytes]) -> None:
        reassembler = self.reassembler
        whole = reassembler.add(packet, now)
        if reassembler.evicted:
            self.counters.drop(DropReason.FRAGMENT_LIMIT, reassembler.evicted)
            reassembler.evicted = 0
        if isinstance(whole, DropReason):
            self.counters.drop(whole)
        elif whole is not None:
            self.counters.event(Event.OUTER_REASSEMBLED)
            out.append(whole)

    def tick(self, now: float) -> None:
        """Forget outer datagrams that did not complete in time; count what the kernel
        dropped because the socket's receive buffer was full."""
        timed_out = self.reassembler.expire(now)
        if timed_out:
            self.counters.drop(DropReason.FRAGMENT_TIMEOUT, timed_out)
        overflowed = self.overflowed()
        if overflowed:
            self.counters.drop(DropReason.CAPTURE_OVERFLOW, overflowed)

    def overflowed(self) -> int:
        """Packets the kernel dropped since the last call, the socket's receive buffer full
        (packet(7) PACKET_STATISTICS: reading it clears it)."""
        try:
            _packets, drops = struct.unpack("II", self.sock.getsockopt(
                SOL_PACKET, PACKET_STATISTICS, 8))
        except OSError:
            return 0
        return int(drops)
