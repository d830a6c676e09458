"""workers/engine/settings.py: forward rules, the JSON hand-over to workers and the pool slices."""

from __future__ import annotations

import ipaddress

import pytest
from support.helpers import FORWARDS, make_settings

from sixgate.workers.engine.flows import Timeouts
from sixgate.workers.engine.settings import (
    Forward,
    Settings,
    pool_addresses,
    pool_shard,
    pool_size,
    shard_pools,
    worker_pool,
    worker_pool_range,
    worker_routes,
)


@pytest.mark.parametrize(("rule", "port", "target"), [
    (Forward("tcp", 80, 80, "127.0.0.1", 8080), 80, 8080),
    (Forward("tcp", 8000, 8009, "127.0.0.2", None), 8005, 8005),
    (Forward("udp", 7000, 7009, "127.0.0.3", 9000), 7000, 9000),
    (Forward("udp", 7000, 7009, "127.0.0.3", 9000), 7009, 9009),
])
def test_forward_target_port_shifts_with_range(rule: Forward, port: int, target: int) -> None:
    assert rule.target_for(port) == target


@pytest.mark.parametrize(("rule", "label"), [
    (Forward("tcp", 80, 80, "127.0.0.1", 8080), "tcp/80 -> 127.0.0.1:8080"),
    (Forward("tcp", 8000, 8009, "127.0.0.2", None), "tcp/8000-8009 -> 127.0.0.2"),
    (Forward("udp", 7000, 7009, "127.0.0.3", 9000), "udp/7000-7009 -> 127.0.0.3:9000-9009"),
    (Forward("udp", 53, 53, "127.0.0.1", None), "udp/53 -> 127.0.0.1"),
])
def test_forward_label(rule: Forward, label: str) -> None:
    assert rule.label == label


@pytest.mark.parametrize("mode", ["6to4", "6in4"])
def test_settings_json_round_trip(mode: str) -> None:
    settings = make_settings(mode, timeouts=Timeouts(udp_s=123.0),
                             martian_ipv4=(("10.0.0.0/8", "RFC 1918"),))
    again = Settings.from_json(settings.to_json())
    assert again == settings
    assert again.forwards == FORWARDS and isinstance(again.forwards, tuple)
    assert again.timeouts.udp_s == 123.0


def test_settings_json_other_version_refused() -> None:
    text = make_settings().to_json().replace('"version": 1', '"version": 2')
    with pytest.raises(ValueError, match="version 2"):
        Settings.from_json(text)


@pytest.mark.parametrize(("mtu", "mss"), [(1280, 1220), (1480, 1420)])
def test_max_mss_is_mtu_minus_ipv6_and_tcp_headers(mtu: int, mss: int) -> None:
    assert make_settings(mtu=mtu).max_mss == mss


@pytest.mark.parametrize(("pool", "workers"), [
    ("100.64.0.0/29", 1), ("100.64.0.0/29", 2), ("100.64.0.0/24", 3), ("100.64.0.0/16", 4),
    ("100.64.0.0/24", 7),
])
def test_worker_pool_slices_disjoint_and_cover_the_pool(pool: str, workers: int) -> None:
    slices = [worker_pool(pool, workers, i) for i in range(workers)]
    flat = [a for s in slices for a in s]
    assert len(flat) == len(set(flat))
    assert sorted(flat) == sorted(a.packed for a in pool_addresses(pool))
    net = ipaddress.IPv4Network(pool)
    assert net.network_address.packed not in flat and net.broadcast_address.packed not in flat


@pytest.mark.parametrize(("pool", "workers"), [("100.64.0.0/24", 4), ("100.64.0.0/16", 3)])
def test_worker_routes_cover_exactly_the_slice(pool: str, workers: int) -> None:
    for i in range(workers):
        first, last = worker_pool_range(pool, workers, i)
        nets = worker_routes(pool, workers, i)
        covered = sum(n.num_addresses for n in nets)
        assert covered == last - first + 1
        assert int(nets[0].network_address) == first
        assert int(nets[-1].broadcast_address) == last
        for address in worker_pool(pool, workers, i):
            assert any(ipaddress.IPv4Address(address) in n for n in nets)


@pytest.mark.parametrize(("pool", "shards", "workers"), [
    ("100.64.0.0/24", 8, 3), ("100.64.0.0/16", 64, 5), ("100.64.0.0/28", 4, 4),
    ("100.64.0.0/24", 7, 2),
])
def test_shard_pools_slice_the_pool_by_shard_and_each_worker_routes_its_own(
        pool: str, shards: int, workers: int) -> None:
    """[gateway] shards: shard s is worker s % workers's; its addresses are the pool's s-th
    slice whoever owns it (so it moves with them), pool_shard names it back, and the
    worker's routes cover exactly its shards' slices."""
    by_worker = [shard_pools(pool, shards, workers, i) for i in range(workers)]
    assert sorted(s for owned in by_worker for s in owned) == list(range(shards))
    flat = [a for owned in by_worker for addresses in owned.values() for a in addresses]
    assert sorted(flat) == sorted(a.packed for a in pool_addresses(pool))
    for index, owned in enumerate(by_worker):
        nets = worker_routes(pool, workers, index, shards)
        for shard, addresses in owned.items():
            assert shard % workers == index and addresses == worker_pool(pool, shards, shard)
            assert all(pool_shard(pool, shards)(a) == shard for a in addresses)
        covered = {int(a) for n in nets for a in n}
        assert covered == {v for shard in owned for v in range(
            worker_pool_range(pool, shards, shard)[0],
            worker_pool_range(pool, shards, shard)[1] + 1)}


@pytest.mark.parametrize("pool", ["100.64.0.0/32", "100.64.0.8/31", "100.64.0.0/30",
                                  "100.64.0.0/24", "100.64.0.0/16"])
def test_pool_size_counts_what_pool_addresses_lists(pool: str) -> None:
    assert pool_size(pool) == len(pool_addresses(pool))


def test_pool_addresses_leave_out_network_and_broadcast() -> None:
    assert [str(a) for a in pool_addresses("100.64.0.0/30")] == ["100.64.0.1", "100.64.0.2"]
    assert [str(a) for a in pool_addresses("100.64.0.8/31")] == ["100.64.0.8", "100.64.0.9"]
