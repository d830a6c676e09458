"""``make fuzz``: millions of mutated protocol-41 packets through the engine, none may raise.

Valid packets of every kind the lab sends (TCP SYN/ACK/FIN with and without options, UDP,
echo requests, Neighbor Solicitations, fragments, extension headers), each wrapped in an outer
IPv4 header from a plausible tunnel peer, are mutated by a seeded mutator (flipped bytes, cuts,
growth, lying lengths, random next headers, bogus fragment and extension headers, and the same
applied to the outer header) and fed in batches of 64 through ``Datapath.from_tunnel``
of a 6to4 and a 6in4 engine, the path the workers run by default; the services' answers go
back through ``from_services``. The packets are built with struct code of the lab's
probe (tests/lab/probe.py), not the engine's own codec.

Printed: packets per second, drops by reason, and ``internal_error`` (must be 0; exit 1
otherwise). ``--count`` (default 10 million); CI runs 100k through the test suite, and the
real gateway gets 20000 in ``tests/lab/test_under_attack.py``.
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "lab"))

import probe  # noqa: E402  (the lab's independent packet builder)

from sixgate.workers.engine.datapath import Datapath  # noqa: E402
from sixgate.workers.engine.drops import DropReason  # noqa: E402
from sixgate.workers.engine.flows import Timeouts  # noqa: E402
from sixgate.workers.engine.settings import Forward, Settings, worker_pool  # noqa: E402

GW4, CLIENT4, REMOTE4, RELAY4 = "192.0.2.10", "198.51.100.1", "203.0.113.1", "203.0.113.99"
MODES = {
    "6to4": dict(relay_ipv4=RELAY4, remote_ipv4=None, prefix="2002:c000:20a::/48",
                 addresses=("2002:c000:20a::1",), peer=CLIENT4, client="2002:c633:6401::1"),
    "6in4": dict(relay_ipv4=None, remote_ipv4=REMOTE4, prefix="2001:db8:1::/64",
                 addresses=("2001:db8:1::1",), peer=REMOTE4, client="2001:db8:ff::1"),
}
FORWARDS = (Forward("tcp", 80, 80, "127.0.0.1", 8080), Forward("udp", 53, 53, "127.0.0.1", 5353))


def engine(mode: str) -> Datapath:
    m = MODES[mode]
    settings = Settings(mode=mode, local_ipv4=GW4, relay_ipv4=m["relay_ipv4"],  # type: ignore[arg-type]
                        remote_ipv4=m["remote_ipv4"], prefix=m["prefix"],  # type: ignore[arg-type]
                        addresses=m["addresses"], mtu=1480, workers=1,  # type: ignore[arg-type]
                        pool="100.64.0.0/24", run_dir="/nonexistent", name="fuzz",
                        forwards=FORWARDS, timeouts=Timeouts(), max_flows=2000)
    return Datapath(settings, worker_pool(settings.pool, 1, 0))


def seeds(client: str, gateway: str, rng: random.Random) -> list[bytes]:
    """Valid inner packets of every kind."""
    src = probe.ipaddress.IPv6Address(client).packed
    dst = probe.ipaddress.IPv6Address(gateway).packed
    out = [probe.echo_request(client, gateway, 7, n) for n in range(4)]
    out.append(probe.neighbor_solicitation(client, gateway))
    for flags in (0x02, 0x10, 0x18, 0x11, 0x04):
        syn = bytearray(probe.tcp_syn(src, dst, rng.randrange(1024, 65535), 80, 1000))
        syn[40 + 13] = flags
        out.append(bytes(syn))
    udp = struct.pack("!HHHH", 40000, 53, 8 + 20, 0) + b"q" * 20
    out.append(struct.pack("!IHBB", 6 << 28, len(udp), 17, 64) + src + dst + udp)
    return out


def outer(inner: bytes, source: str) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(inner), 1, 0, 64, 41, 0,
                         probe.socket.inet_aton(source), probe.socket.inet_aton(GW4))
    return header + inner


def mutate_outer(packet: bytes, rng: random.Random) -> bytes:
    data = bytearray(packet)
    kind = rng.randrange(4)
    if kind == 0:
        data[rng.randrange(20)] = rng.randrange(256)
    elif kind == 1:
        del data[rng.randrange(1, len(data)):]
    elif kind == 2:
        data[9] = rng.randrange(256)  # protocol
    else:
        struct.pack_into("!H", data, 2, rng.randrange(65536))  # total length
    return bytes(data)


def run(count: int, seed: int) -> int:
    rng = random.Random(seed)
    total_drops: dict[str, int] = {}
    started = time.perf_counter()
    done = 0
    per_mode = count // len(MODES)
    for mode, m in MODES.items():
        datapath = engine(mode)
        valid = seeds(m["client"], m["addresses"][0], rng)  # type: ignore[index]
        now = 1000.0
        sent = 0
        while sent < per_mode:
            batch = []
            for _ in range(min(64, per_mode - sent)):
                inner = probe.mutate(rng.choice(valid), rng)
                packet = outer(inner, m["peer"] if rng.random() < 0.9  # type: ignore[arg-type]
                               else rng.choice([RELAY4, "10.1.1.1", "203.0.113.50"]))
                if rng.random() < 0.1:
                    packet = mutate_outer(packet, rng)
                batch.append(packet)
            output = datapath.from_tunnel(batch, now)
            answers = [bytes(p[:9]) + bytes([p[9]]) + bytes(p[10:12]) + p[16:20] + p[12:16]
                       + p[20:] for p in output.to_services[:8]]
            datapath.from_services(answers, now)
            sent += len(batch)
            now += 0.001
            if sent % 65536 < 64:
                datapath.tick(now)
        done += sent
        for reason, n in datapath.counters.drops.items():
            if n:
                total_drops[reason.value] = total_drops.get(reason.value, 0) + n
    elapsed = time.perf_counter() - started
    print(f"fuzz: {done} mutated protocol-41 packets in {elapsed:.1f} s "
          f"({done / elapsed / 1000:.0f}k/s), seed {seed}")
    for reason, n in sorted(total_drops.items(), key=lambda item: -item[1]):
        print(f"  {reason:22} {n}")
    internal = total_drops.get(DropReason.INTERNAL_ERROR.value, 0)
    print(f"internal_error: {internal}")
    return 1 if internal else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(2), "big"))
    args = parser.parse_args(argv)
    return run(args.count, args.seed)


if __name__ == "__main__":
    sys.exit(main())
