"""coordinator/dns64.py: what ``sixgate dns64 emit`` prints comes from the gateway's prefix."""

from __future__ import annotations

import pytest

from sixgate.coordinator.config import parse_config
from sixgate.coordinator.dns64 import EmitError, tnat64_config, unbound_config

NAT64 = """\
[nat64]
prefix = "{prefix}"
clients = ["2001:db8:100::/56"]
[[nat64.pool4]]
address = "203.0.113.5"
tcp = "61001-65535"
"""


def test_unbound_clause_names_the_prefix_and_the_dns64_module() -> None:
    text = unbound_config(parse_config(NAT64.format(prefix="2001:db8:64::/96")))
    assert "server:\n" in text
    assert '    module-config: "dns64 iterator"\n' in text
    assert "    dns64-prefix: 2001:db8:64::/96\n" in text


def test_tnat64_takes_a_slash96_only() -> None:
    assert tnat64_config(parse_config(NAT64.format(prefix="64:ff9b::/96"))).endswith(
        "nat64_prefix = 64:ff9b::\n")
    with pytest.raises(EmitError, match="/96 prefix only"):
        tnat64_config(parse_config(NAT64.format(prefix="2001:db8:100::/40")))


def test_a_tunnel_config_has_nothing_to_emit() -> None:
    tunnel = ('[tunnel]\nmode = "6in4"\nlocal_ipv4 = "192.0.2.10"\nremote_ipv4 = "203.0.113.1"\n'
              'prefix = "2001:db8:1::/64"\n')
    with pytest.raises(EmitError, match="no \\[nat64\\] table"):
        unbound_config(parse_config(tunnel))
