"""sixgate's userspace backend against a real Linux ``sit`` peer, INSIDE the qemu guest.

Issue 15: a kernel peer in the next namespace hands its TCP and UDP over veth with
CHECKSUM_PARTIAL (the veth's TX checksum offload is left on, as it is by default), which a raw
socket capture took for bad checksums: ICMPv6 worked and nothing else did. Here the peer is the
kernel's own sit tunnel made with ``ip tunnel``, the gateway is the real ``sixgate run`` with
``backend = "userspace"`` and kernel fan-out, and real ping, curl (sha256 of a 3 MB file), dig
(UDP) and a refused TCP port check what a user sees, in each mode (6rd: issue 19, the peer a
Linux sit CE of the same 6rd domain). Helpers: kernelgw.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Callable

import pytest
from kernelgw import DNS_ANSWER, GATEWAY_STOP_TIMEOUT_S, KernelLab

pytestmark = pytest.mark.kvm

Netns = Callable[[str], str]


@pytest.mark.parametrize("mode", ["6in4", "6to4", "6rd"])
def test_userspace_backend_serves_a_kernel_sit_peer_with_offloads_on(netns: Netns,
                                                                     mode: str) -> None:
    with KernelLab(netns, mode) as lab:
        lab.build()  # veth with its default offloads: TX checksumming on
        lab.start_services(dns=True)
        lab.write_config(backend="userspace", workers=1)  # one Python start less under TCG
        gateway = lab.spawn_gateway()
        lab.wait_services()
        lab.wait_gateway(gateway)
        assert "backend userspace" in gateway.stderr, gateway.stderr

        lab.ping()
        assert lab.curl_sha256() == lab.file_sha256
        answer = lab.dig(lab.gw_address, namespace=lab.peer_ns)
        assert answer == DNS_ANSWER, f"dig through the gateway: {answer!r}\n{gateway.stderr}"
        # A port no rule forwards: refused at once (RST, RFC 9293 §3.10.7.1), not a timeout.
        refused = lab.peer(["curl", "-6", "-g", "-sS", "--max-time", "20", "-o", "/dev/null",
                            f"http://[{lab.gw_address}]:81/"], check=False, timeout=40)
        assert refused.returncode == 7, f"curl to port 81: {refused.returncode} {refused.stderr}"

        summary = lab.flows()
        drops = summary["drops"]
        assert drops.get("bad_checksum", 0) == 0, drops
        events: dict[str, int] = {}
        for worker in summary["counters"]["workers"]:
            for name, count in worker.get("counters", {}).get("events", {}).items():
                events[name] = events.get(name, 0) + int(count)
        assert events.get("checksums_completed", 0) > 0, events  # the peer's kernel left them

        if mode == "6in4":
            # Issue 19, RFC 4213 §3.8: the kernel's sit answers the probe sent to its
            # link-local fe80::<its IPv4> (RFC 4213 §3.7), so the broker's end is reachable.
            body = lab.gw(["curl", "-sf", "http://127.0.0.1:9641/metrics"]).stdout
            reachable = re.search(r'^sixgate_tunnel_peer_reachable\{peer="198\.51\.100\.1"\} '
                                  r"(\S+)$", body, re.MULTILINE)
            assert reachable and float(reachable.group(1)) == 1.0, (
                "the Linux sit peer did not answer the RFC 4213 §3.8 probe:\n"
                + "\n".join(line for line in body.splitlines() if "peer" in line)
                + gateway.stderr)

        os.kill(gateway.process.pid, signal.SIGTERM)
        try:
            code = gateway.process.wait(timeout=GATEWAY_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"sixgate run did not stop:\n{gateway.stderr}") from None
        assert code == 0, gateway.stderr
