"""``sixgate flows``' summary of the gateway's answer (coordinator/cli.py ``summarize``)."""

from __future__ import annotations

from typing import Any

from sixgate.coordinator.cli import summarize


def _process(client: str, drops: int, packets: int) -> dict[str, Any]:
    return {"up": True, "bindings": [{"client": client, "worker": 0}],
            "counters": {"drops": {"spoofed_6to4": drops}, "packets": {"inbound/tcp": packets},
                         "bytes": {"inbound/tcp": 100 * packets}},
            "flows": {"active": 1}}


def test_a_retiring_runs_connections_are_listed_marked_without_its_counters() -> None:
    """Issue 17, kernel backend: while a take-over's retiring run carries connections, the
    new run's listing shows them, marked; that run's counters are its own, not summed."""
    status = {"coordinator": {"drops": {"spoofed_6to4": 0}},
              "workers": [_process("[2001:db8::1]:1000", 1, 2)],
              "retiring": [{**_process("[2001:db8::2]:2000", 5, 7), "index": 0, "pid": 9}]}
    summary = summarize(status)
    assert summary["bindings"] == [{"client": "[2001:db8::1]:1000", "worker": 0},
                                   {"client": "[2001:db8::2]:2000", "worker": 0,
                                    "retiring": True}]
    assert summary["drops"] == {"spoofed_6to4": 1}
    assert summary["traffic"] == {"inbound": [2, 200]}
    assert summarize({**status, "retiring": []})["bindings"] == status["workers"][0]["bindings"]
