"""Worker restart backoff (hostile-input issue, finding 10): a worker that crashes again and
again waits longer each time; one that had run a stable while starts the backoff over."""

from __future__ import annotations

from typing import Any

from sixgate.coordinator import gateway
from sixgate.workers.engine.counters import Counters


class DeadProcess:
    pid = 4242
    returncode = -9

    def poll(self) -> int:
        return self.returncode


def coordinator_with_one_worker() -> Any:
    coord = gateway.Coordinator.__new__(gateway.Coordinator)
    coord.workers = [gateway.WorkerProcess(0)]
    coord.counters = Counters()
    coord._spawn = lambda worker: None  # type: ignore[method-assign]
    coord.shard_copy = None  # no journal
    return coord


def delays(coord: Any, runs_s: list[float]) -> list[float]:
    """Let the worker die after each run length; the backoff chosen each time."""
    worker = coord.workers[0]
    out, now = [], 1000.0
    for run_s in runs_s:
        worker.started = now
        now += run_s
        worker.proc = DeadProcess()
        coord._supervise(now)
        out.append(round(worker.next_start - now, 3))
        now = worker.next_start
        coord._supervise(now)  # restarted
    return out


def test_backoff_grows_while_the_worker_keeps_crashing() -> None:
    assert delays(coordinator_with_one_worker(), [1, 1, 1, 1, 1, 1]) == [
        0.5, 1.0, 2.0, 5.0, 10.0, 10.0]


def test_backoff_resets_after_a_stable_run() -> None:
    coord = coordinator_with_one_worker()
    assert delays(coord, [1, 1, 1, gateway.STABLE_RUN_S, 1]) == [0.5, 1.0, 2.0, 0.5, 1.0]
    assert coord.workers[0].restarts == 5
