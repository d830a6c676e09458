"""The packet engine: pure functions and tables, bytes in and bytes (or a named drop reason)
out, ``now`` passed in. No I/O, no clock, no randomness, no threads: checked default-deny by
tests/unit/test_layering.py (only the standard library modules it lists, and this package).

packet (headers, checksums), tunnel (RFC 3056/4213 checks), translate (RFC 7915), icmp (what
the gateway originates), fragment (RFC 8200 §4.5), flows (RFC 6146 sessions), fastpath
(per-session templates), datapath (the engine's entries), wire (batch framing, fan-out hash),
counters, drops (every drop reason and event), settings (a worker's configuration).
"""
