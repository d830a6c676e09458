"""Issue 17, the kernel backend's reload: which new forward ports its unprivileged relays
cannot open (the VM test tests/kvm/guest/test_kernel_backend.py reloads a real one)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sixgate.coordinator import kernel_backend
from sixgate.coordinator.config import parse_config
from sixgate.workers.engine.settings import Forward

CONFIG = ('[tunnel]\nmode = "6in4"\nlocal_ipv4 = "192.0.2.10"\nremote_ipv4 = "198.51.100.1"\n'
          'prefix = "2001:db8:1::/64"\n[gateway]\npool = "100.64.0.0/16"\n'
          '[[forward]]\nproto = "tcp"\nport = 80\nto = "127.0.0.1:8080"\n')


def test_only_new_ports_below_the_unprivileged_start_need_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    start = tmp_path / "ip_unprivileged_port_start"
    start.write_text("1024\n")
    monkeypatch.setattr(kernel_backend, "UNPRIVILEGED_PORT_START", start)
    running = parse_config(CONFIG)
    new = dataclasses.replace(running, forwards=(
        *running.forwards, Forward("udp", 53, 53, "127.0.0.1", 5353),
        Forward("tcp", 8081, 8081, "127.0.0.1", 8080), Forward("tcp", 442, 443, "127.0.0.1",
                                                               8443)))
    # tcp/80 was open already; 8081 is anyone's to bind.
    assert kernel_backend.new_privileged_ports(running, new) == ["tcp/442", "tcp/443", "udp/53"]
    start.write_text("0\n")  # a host that lets anyone bind any port
    assert kernel_backend.new_privileged_ports(running, new) == []


def test_a_take_over_keeps_the_link_only_when_it_is_made_the_same_way() -> None:
    """The kept link's description goes through the state file (JSON) and must compare equal
    to the new config's; another broker or local address is another link."""
    import json
    settings = parse_config(CONFIG)
    spec = kernel_backend.link_spec(settings)
    assert spec == {"ifname": "sixgatesit", "kind": "sit", "sit_local": "192.0.2.10", "sit_ttl": 64,
                    "sit_remote": "198.51.100.1"}
    assert json.loads(json.dumps(spec)) == spec
    assert json.loads(json.dumps(spec)) == kernel_backend.link_spec(
        dataclasses.replace(settings, forwards=()))  # the rules are not the link's
    assert kernel_backend.link_spec(parse_config(CONFIG.replace("198.51.100.1",
                                                                "198.51.100.2"))) != spec
