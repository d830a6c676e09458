"""What a config reload may change while sixgate runs (issue 17: SIGHUP, ``sixgate reload``).

A reload re-reads the config file and validates it as ``sixgate check`` does; a bad file
changes nothing (the error, ``file:line: key: problem``, is logged and
``sixgate_config_last_reload_successful`` goes to 0, as Prometheus does it). A good one may
change the forward rules, the flow limits, timeouts and rate limits, the NAT64 policy (clients,
filtering, quota, port hold time, binding log, non-global destinations), the log level and the
metrics address: the workers apply them in place (``Datapath.reconfigure``), every flow whose
rule still exists goes on, and the flows of a removed rule (or of a NAT64 client no longer
listed) end with a RST on both sides.
Anything else (the tunnel, its addresses, the pool, pool4, the worker count, ...) is refused
with the keys that changed: that needs a restart, which a take-over (``sixgate reload
--or-take-over``, the unit's ExecReload) does without an outage; it keeps every session of a
worker count change where ``[gateway] shards`` stays (``take_over_keeps_sessions``).
The kernel backend reloads too: its relays close the listeners of removed rules, open those
of new ones (not a privileged port: they run unprivileged, so such a reload is refused,
kernel_backend.new_privileged_ports) and reset the sessions of removed rules; the input table
follows the rules. Pure: Settings in, a verdict out.
"""

from __future__ import annotations

import dataclasses

from sixgate.workers.engine.settings import Settings

# Settings fields a running gateway takes on at a reload.
LIVE_FIELDS = frozenset({
    "forwards", "max_flows", "max_flows_per_prefix", "max_flows_per_48",
    "max_flows_per_ipv4_source", "timeouts", "icmp_errors_per_s", "icmp_error_burst",
    "echo_replies_per_s", "echo_burst", "log_level", "metrics_listen", "source_file",
    # The NAT64 policy (its prefix and pool4 are the network's shape: a restart).
    "nat64_clients", "nat64_allow_non_global", "nat64_filtering", "nat64_ports_per_client",
    "nat64_client_prefix", "nat64_port_hold_s", "nat64_log_bindings",
    "clat_rediscovery_interval_s", "probe_interval_s",
    "take_over_drain_s",  # read by a relay when it retires
    "compiled_fast_path",  # the engine switches its batch loops (Datapath.reconfigure)
})


def restart_needed(running: Settings, new: Settings) -> list[str]:
    """The fields that differ and cannot change while sixgate runs (empty: reloadable)."""
    return [f.name for f in dataclasses.fields(Settings)
            if f.name not in LIVE_FIELDS and getattr(running, f.name) != getattr(new, f.name)]


def take_over_keeps_sessions(running: Settings, new: Settings, blocked: list[str]) -> bool:
    """Whether a take-over with ``new`` resumes every session of ``running``: only the worker
    count changes, and the fan-out shards stay (workers/journal.py rebucket) or the backend
    is the kernel (the retiring run keeps its connections whatever the new one's count)."""
    return set(blocked) <= {"workers", "shards"} and (
        running.backend == "kernel" or running.shard_count == new.shard_count)


def as_running(running: Settings, new: Settings) -> Settings:
    """``new`` as the running gateway would see it: what the start decided and the config
    cannot say again (the random fan-out seed, the backend ``auto`` chose, a CLAT's "auto"
    address and prefix) is kept."""
    backend = running.backend if new.backend == "auto" else new.backend
    new = dataclasses.replace(new, hash_seed=running.hash_seed, backend=backend)
    if running.clat_enabled and new.clat_enabled:
        # The CLAT's "auto" address and prefix were found at the start (and a PREF64 may
        # have changed the prefix since): "auto" again keeps what runs.
        if new.clat_ipv6_address == "auto":
            new = dataclasses.replace(new, clat_ipv6_address=running.clat_ipv6_address)
        if new.clat_plat_prefix == "auto":
            new = dataclasses.replace(new, clat_plat_prefix=running.clat_plat_prefix,
                                      prefix=running.prefix)
    return new


def changed(running: Settings, new: Settings) -> list[str]:
    """The live fields a reload changes, for the log."""
    return [name for name in sorted(LIVE_FIELDS - {"source_file"})
            if getattr(running, name) != getattr(new, name)]
