"""NetTable's first-byte shortcut never changes an answer: membership equals ipaddress's."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from sixgate.workers.engine.tunnel import (
    DEFAULT_MARTIAN_IPV4,
    MARTIAN_IPV6_DESTINATION,
    MARTIAN_IPV6_SOURCE,
    NetTable,
)

TABLES = [DEFAULT_MARTIAN_IPV4, MARTIAN_IPV6_SOURCE, MARTIAN_IPV6_DESTINATION,
          (("0.0.0.0/0", "everything"),), (("128.0.0.0/1", "upper half"),),
          (("203.0.113.7/32", "one host"),)]


def reference(addr: bytes, rows: tuple[tuple[str, str], ...]) -> bool:
    ip = ipaddress.ip_address(addr)
    return any(ip.version == ipaddress.ip_network(c).version and ip in ipaddress.ip_network(c)
               for c, _ in rows)


@given(table=st.sampled_from(TABLES), addr=st.binary(min_size=4, max_size=4))
def test_ipv4_membership_matches_ipaddress(table: tuple[tuple[str, str], ...],
                                           addr: bytes) -> None:
    if ":" in table[0][0]:
        return
    assert (addr in NetTable(table)) == reference(addr, table)


@given(table=st.sampled_from(TABLES[1:3]),
       addr=st.one_of(st.binary(min_size=16, max_size=16),
                      st.binary(min_size=6, max_size=6).map(lambda b: bytes(10) + b),
                      st.binary(min_size=15, max_size=15).map(lambda b: b"\xfe" + b),
                      st.binary(min_size=15, max_size=15).map(lambda b: b"\xff" + b)))
def test_ipv6_membership_matches_ipaddress(table: tuple[tuple[str, str], ...],
                                           addr: bytes) -> None:
    assert (addr in NetTable(table)) == reference(addr, table)
