"""Client-side configuration derived from a NAT64 gateway's config: what ``sixgate dns64 emit``
prints, so the resolver and the hosts use exactly the prefix the gateway translates.

- ``unbound_config``: a ``server:`` clause for unbound's DNS64 module (RFC 6147): AAAA
  records synthesized from A records under the NAT64 prefix (RFC 6052).
- ``tnat64_config``: TNAT64's configuration (an LD_PRELOAD library that moves IPv4 TCP
  connects into the prefix), for programs that connect to IPv4 literals.

Pure: settings in, text out.
"""

from __future__ import annotations

import ipaddress

from sixgate.workers.engine.nat64 import Nat64Prefix
from sixgate.workers.engine.settings import Settings


class EmitError(Exception):
    """The config cannot be expressed for that client: why, and what to do."""


def _prefix(settings: Settings) -> Nat64Prefix:
    if settings.mode != "nat64":
        raise EmitError("the config has no [nat64] table; DNS64 and TNAT64 serve a NAT64")
    return Nat64Prefix.parse(settings.nat64_prefix)


def unbound_config(settings: Settings) -> str:
    """unbound.conf lines (a ``server:`` clause; unbound merges several) that turn DNS64 on
    for the gateway's prefix."""
    prefix = _prefix(settings)
    lines = [
        f"# DNS64 (RFC 6147) for the sixgate NAT64 {settings.name!r} ({settings.source_file})",
        "server:",
        "    # Add \"validator\" after dns64 if this resolver validates DNSSEC.",
        '    module-config: "dns64 iterator"',
        f"    dns64-prefix: {settings.nat64_prefix}",
    ]
    if prefix.well_known and not settings.nat64_allow_non_global:
        lines.append("    # RFC 6052 §3.1: the gateway refuses non-global IPv4 destinations under "
                     "the well-known prefix (non_global_destination): AAAA records synthesized "
                     "for private A records will not connect.")
    return "\n".join(lines) + "\n"


def tnat64_config(settings: Settings) -> str:
    """tnat64.conf (its TNAT64_CONF_FILE) with the gateway's prefix."""
    prefix = _prefix(settings)
    if prefix.length != 96:
        raise EmitError(f"TNAT64 appends the IPv4 address to a /96 prefix only; "
                        f"{settings.nat64_prefix} is a /{prefix.length}: use a /96 prefix")
    network = ipaddress.IPv6Address(prefix.network)
    return (f"# TNAT64 for the sixgate NAT64 {settings.name!r} ({settings.source_file})\n"
            f"nat64_prefix = {network}\n")
