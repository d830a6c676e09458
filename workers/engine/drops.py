"""The registries of every reason sixgate drops a packet and of every event it counts.

Modelled on Linux ``include/net/dropreason-core.h``: a drop is always counted under exactly one
of these names, so an operator can tell a hostile peer from a full table from our own bug.
What is not a drop (a flow created, an ICMPv6 error or RST sent, one suppressed by the rate
limit) is an ``Event``, also written here once, so nothing has to parse a name back.
Pure: no I/O.
"""

from __future__ import annotations

import enum


class DropReason(enum.Enum):
    """Why a packet did not go on; ``value`` is the metric/log label."""

    TRUNCATED = "truncated"
    """Shorter than its headers or its length fields claim (RFC 791, RFC 8200 §3)."""
    BAD_VERSION = "bad_version"
    """IP version field is not 4 (outer) or not 6 (inner) (RFC 4213 §3.6)."""
    BAD_HEADER = "bad_header"
    """Impossible field: IHL < 5, broken chain, lying UDP length/TCP offset (RFC 7915 §5.1)."""
    BAD_CHECKSUM = "bad_checksum"
    """IPv4 header or TCP/UDP/ICMPv6 checksum does not verify (RFC 791, RFC 8200 §8.1)."""
    NOT_PROTO_41 = "not_proto_41"
    """Outer IPv4 packet does not carry IPv6 (protocol 41, RFC 4213 §3.5)."""
    WRONG_TUNNEL_PEER = "wrong_tunnel_peer"
    """6in4 outer source is not the configured remote; dropped silently (RFC 4213 §3.6)."""
    SPOOFED_6TO4 = "spoofed_6to4"
    """2002::/16 address does not embed the outer IPv4 address (RFC 3964 §5.2, Linux sit)."""
    SPOOFED_6RD = "spoofed_6rd"
    """6rd source not its CE's outer address, or not from the border relay (RFC 5969 §12)."""
    MARTIAN_SOURCE = "martian_source"
    """Source address that must never appear on the wire (RFC 4213 §3.6, RFC 3964 §5.3)."""
    MARTIAN_DESTINATION = "martian_destination"
    """Destination that is multicast, unspecified, loopback or mapped (RFC 3964 §5.3)."""
    NOT_OUR_ADDRESS = "not_our_address"
    """Inner destination is not one of our addresses: we terminate, never relay (RFC 7526)."""
    NEIGHBOR_DISCOVERY = "neighbor_discovery"
    """ND/redirect/router messages are never decapsulated from 6to4 (RFC 3964 §5.1)."""
    NO_RULE = "no_rule"
    """No forward rule for the port; answered with RST (RFC 9293 §3.10.7.1) or ICMPv6 1/4."""
    SOURCE_NOT_ALLOWED = "source_not_allowed"
    """Source outside the rule's ``from`` list: answered as if there were no rule (RFC 6092)."""
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    """Not TCP/UDP/ICMPv6; answered with parameter problem 4/1 (RFC 4443 §3.4)."""
    UNRECOGNIZED_OPTION = "unrecognized_option"
    """An option whose type says discard (RFC 8200 §4.2 bits 01, 10, 11); 10/11 answered 4/2."""
    ICMP_NOT_TRANSLATED = "icmp_not_translated"
    """ICMP type that RFC 7915 §4.2/§5.2 says to drop (ND, MLD, redirect, info messages)."""
    HOP_LIMIT_EXCEEDED = "hop_limit_exceeded"
    """Hop limit/TTL reached zero while forwarding (RFC 7915 §4.1, §5.1; RFC 4443 §3.3)."""
    NO_SESSION = "no_session"
    """IPv4 packet from a service that matches no live session (RFC 6146 §3.5)."""
    FLOW_LIMIT = "flow_limit"
    """Global flow table limit reached; answered with ICMPv6 1/1 (RFC 6888 REQ-4/REQ-11)."""
    PREFIX_FLOW_LIMIT = "prefix_flow_limit"
    """Per source /64 or /48 flow limit reached; answered with ICMPv6 1/1 (RFC 6888 REQ-4)."""
    SOURCE_FLOW_LIMIT = "source_flow_limit"
    """Flows per outer IPv4 source (a 6to4 relay or router) reached (RFC 6888 REQ-4/REQ-5)."""
    POOL_EXHAUSTED = "pool_exhausted"
    """No IPv4 pool address left for a new client; answered with ICMPv6 1/1 (RFC 6888)."""
    PORT_QUOTA = "port_quota"
    """A NAT64 client (/64 or /128) holds its quota of pool4 ports (RFC 6888 REQ-4)."""
    NON_GLOBAL_DESTINATION = "non_global_destination"
    """The well-known NAT64 prefix never stands for a non-global IPv4 address (RFC 6052 §3.1)."""
    FILTERED = "filtered"
    """An IPv4 packet to a NAT64 binding its filtering refuses (RFC 6146 §3.5.1, RFC 4787)."""
    PORT_IN_USE = "port_in_use"
    """IPv4 session key already held by another IPv6 session (RFC 6146 §3.1)."""
    FRAGMENT_LIMIT = "fragment_limit"
    """Reassembly memory/queue bound reached (RFC 6146 §3.4, RFC 8200 §4.5)."""
    FRAGMENT_TIMEOUT = "fragment_timeout"
    """Fragments not completed within 60 s (RFC 8200 §4.5)."""
    BAD_FRAGMENT = "bad_fragment"
    """Overlapping or inconsistent fragments (RFC 5722) or a fragmented ICMP (RFC 7915 §1.2)."""
    TOO_BIG = "too_big"
    """Too big for the next hop with DF set (RFC 7915 §4.1), or for one IPv4 packet (RFC 791)."""
    ICMP_RATE_LIMITED = "icmp_rate_limited"
    """An echo request left unanswered by the per-source echo limit (RFC 4443 §2.4(f))."""
    SEND_FAILED = "send_failed"
    """The kernel refused a send (ENOBUFS, no route); never retried (RFC 1812 §5.3.6)."""
    QUEUE_FULL = "queue_full"
    """A bounded worker queue was full: overload is dropped, never buffered (RFC 6888 REQ-5)."""
    OTHER_SHARD = "other_shard"
    """A service's packet to another worker's shard (its route moving there); never reset."""
    CAPTURE_OVERFLOW = "capture_overflow"
    """The kernel dropped tunnel packets: the capture socket's buffer was full (packet(7))."""
    INTERNAL_ERROR = "internal_error"
    """A bug in sixgate: the packet raised; counted, logged, the loop goes on (no RFC)."""


ALL_REASONS: tuple[DropReason, ...] = tuple(DropReason)


class Event(enum.Enum):
    """Something counted that is not a drop; ``value`` is the key in the counters' JSON."""

    FLOWS_CREATED_TCP = "flows_created_tcp"
    """A TCP session was created (RFC 6146 §3.5.2)."""
    FLOWS_CREATED_UDP = "flows_created_udp"
    """A UDP session was created (RFC 6146 §3.5.1)."""
    FLOWS_CREATED_ICMP = "flows_created_icmp"
    """An ICMP query session was created, its identifier used as a port (RFC 6146 §3.5.3)."""
    FLOWS_EXPIRED = "flows_expired"
    """A session reached its timeout and was removed (RFC 6146 §3.5)."""
    FLOWS_EVICTED = "flows_evicted"
    """An unassured session was removed early to make room, as conntrack's early drop."""
    ECHO_REPLIES = "echo_replies"
    """An ICMPv6 echo reply was sent (RFC 4443 §4.2)."""
    NEIGHBOR_ADVERTISEMENTS = "neighbor_advertisements"
    """A Neighbor Advertisement answered the tunnel peer's NUD probe (RFC 4213 §3.8)."""
    TCP_RST_SENT = "tcp_rst_sent"
    """A TCP RST refused a segment to a closed port (RFC 9293 §3.10.7.1)."""
    REPLIES_SUPPRESSED = "replies_suppressed"
    """An ICMPv6 error or RST was not sent: its source's rate limit (RFC 4443 §2.4(f))."""
    ERROR_DEST_UNREACHABLE_ADMIN = "icmp_error_1_1"
    """ICMPv6 destination unreachable, administratively prohibited, sent (RFC 4443 §3.1)."""
    ERROR_PORT_UNREACHABLE = "icmp_error_1_4"
    """ICMPv6 destination unreachable, port unreachable, sent (RFC 4443 §3.1)."""
    ERROR_TIME_EXCEEDED = "icmp_error_3_0"
    """ICMPv6 time exceeded, hop limit, sent (RFC 4443 §3.3)."""
    ERROR_REASSEMBLY_TIME_EXCEEDED = "icmp_error_3_1"
    """ICMPv6 time exceeded, fragment reassembly, sent (RFC 8200 §4.5, RFC 4443 §3.3)."""
    ERROR_ERRONEOUS_HEADER = "icmp_error_4_0"
    """ICMPv6 parameter problem, erroneous header field, sent (RFC 4443 §3.4, RFC 8200 §4)."""
    ERROR_UNRECOGNIZED_NEXT_HEADER = "icmp_error_4_1"
    """ICMPv6 parameter problem, unrecognized next header, sent (RFC 4443 §3.4)."""
    ERROR_UNRECOGNIZED_OPTION = "icmp_error_4_2"
    """ICMPv6 parameter problem, unrecognized option, sent (RFC 4443 §3.4, RFC 8200 §4.2)."""
    ERROR_INCOMPLETE_CHAIN = "icmp_error_4_3"
    """ICMPv6 parameter problem, first fragment without the header chain (RFC 7112 §5)."""
    ICMP_ERRORS_TRANSLATED = "icmp_errors_translated"
    """An ICMP error about a session was translated to the other family (RFC 7915 §4.2/§5.2)."""
    FRAGMENTS_SENT = "fragments_sent"
    """An IPv6 fragment was sent for a reply larger than the tunnel MTU (RFC 7915 §4.1)."""
    UDP_SERVICE_ERRORS = "udp_service_errors"
    """A relayed UDP service answered with an ICMP error (kernel backend)."""
    TCP_SERVICE_UNREACHABLE = "tcp_service_unreachable"
    """A relayed TCP service refused or did not answer; the client got a reset (kernel backend)."""
    CONTROL_ERRORS = "control_errors"
    """A malformed control request was answered with an error."""
    WORKER_RESTARTS = "worker_restarts"
    """The coordinator restarted a worker that had died."""
    PACKETS_FANNED_OUT = "packets_fanned_out"
    """A captured packet was queued to a worker (coordinator fan-out)."""
    BATCHES_SENT = "batches_sent"
    """A batch of captured packets was queued to a worker (coordinator fan-out)."""
    TUNNEL_PACKETS_RECEIVED = "tunnel_packets_received"
    """A protocol-41 packet was received, before any check."""
    TUNNEL_BYTES_RECEIVED = "tunnel_bytes_received"
    """Bytes of those packets, outer IPv4 header included."""
    CHECKSUMS_COMPLETED = "checksums_completed"
    """A local kernel peer's packet had its inner checksum left to offload: computed here."""
    OUTER_REASSEMBLED = "outer_reassembled"
    """Outer IPv4 fragments of a protocol-41 packet were put back together (RFC 791 §3.2)."""
    FLOWS_RESUMED = "flows_resumed"
    """A worker started again after a crash resumed a session of its shard's journal."""
    FLOWS_ENDED_BY_RELOAD = "flows_ended_by_reload"
    """A session ended because a reloaded config no longer has its forward rule."""
    JOURNAL_LOST = "journal_lost"
    """A shard journal message was not sent: the coordinator's queue was full."""


# The ICMPv6 errors the gateway originates, by (type, code), and the type each belongs to.
ICMP_ERROR_EVENTS: dict[tuple[int, int], Event] = {
    (1, 1): Event.ERROR_DEST_UNREACHABLE_ADMIN,
    (1, 4): Event.ERROR_PORT_UNREACHABLE,
    (3, 0): Event.ERROR_TIME_EXCEEDED,
    (3, 1): Event.ERROR_REASSEMBLY_TIME_EXCEEDED,
    (4, 0): Event.ERROR_ERRONEOUS_HEADER,
    (4, 1): Event.ERROR_UNRECOGNIZED_NEXT_HEADER,
    (4, 2): Event.ERROR_UNRECOGNIZED_OPTION,
    (4, 3): Event.ERROR_INCOMPLETE_CHAIN,
}
