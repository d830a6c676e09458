"""Issue 17: a config reload loses no connection. The real ``sixgate run`` (6to4, two workers)
serves a rate-limited 100 MB ``curl -6`` through the port-80 rule while its config is reloaded
four times, by ``sixgate reload`` and by SIGHUP: a rule added, then removed again (a connection
held through it is reset on both sides at once), a broken file and a change that needs a
restart (both refused: nothing changes, the error is logged and
``sixgate_config_last_reload_successful`` says 0), then a good one (back to 1). The download
completes byte-identical on its unchanged binding.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import netlab
import pytest
from netlab import Lab

pytestmark = pytest.mark.lab

ADDED_PORT = 8081  # the rule the first reload adds and the second removes
RATE = "8M"  # bytes/s: the 100 MB download outlasts the four reloads


@pytest.fixture
def reload_lab(served_files: netlab.ServedFiles) -> Iterator[Lab]:
    with Lab("6to4", 2, served_files, fanout="kernel") as lab:
        yield lab


def metric(lab: Lab, name: str) -> float:
    body = lab.gw(["curl", "-sf", "http://127.0.0.1:9641/metrics"]).stdout
    found = re.search(rf"^{name} (\S+)$", body, re.MULTILINE)
    assert found, f"{name} not exported"
    return float(found.group(1))


def established_to_http(lab: Lab) -> int:
    """TCP connections the loopback HTTP service holds (through the gateway's pool)."""
    out = lab.gw(["ss", "-Htn", "state", "established", f"( sport = :{netlab.HTTP_PORT} )"])
    return len([line for line in out.stdout.splitlines() if line.strip()])


HOLD = """
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print("connected", flush=True)
sock.settimeout(30)
try:
    print("eof" if sock.recv(1) == b"" else "data", flush=True)
except ConnectionResetError:
    print("reset", flush=True)
except OSError as exc:
    print(f"error {exc}", flush=True)
"""


def reload_cli(lab: Lab) -> subprocess.CompletedProcess[str]:
    return lab.sixgate("reload")


def test_reloads_change_rules_refuse_bad_files_and_lose_no_connection(
        reload_lab: Lab, served_files: netlab.ServedFiles) -> None:
    lab = reload_lab
    gateway_pid = lab.processes["sixgate"].pid
    original = lab.config_text()
    assert metric(lab, "sixgate_config_last_reload_successful") == 1
    loaded_at = metric(lab, "sixgate_config_last_reload_success_timestamp_seconds")

    big = served_files.big
    curl = subprocess.Popen(netlab.in_ns(lab.peer_ns, [
        "bash", "-c", "set -o pipefail; curl -6 -g -sS --fail --max-time 120 --limit-rate "
        f"{RATE} {netlab.http_url(lab, big.name)} | sha256sum"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hold: subprocess.Popen[str] | None = None
    try:
        netlab.wait_until(lambda: any(b["proto"] == "tcp" for b in lab.flows()["bindings"]),
                          timeout=10, what="the download's session")
        download = [b for b in lab.flows()["bindings"] if b["proto"] == "tcp"]

        # 1. A rule added (and the log level changed) by `sixgate reload`.
        lab.config_path.write_text(original.replace("[gateway]\n", '[gateway]\nlog_level = '
                                                    '"debug"\n') + (
            f'\n[[forward]]\nproto = "tcp"\nport = {ADDED_PORT}\n'
            f'to = "127.0.0.1:{netlab.HTTP_PORT}"\n'))
        done = reload_cli(lab)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "forwards, log_level changed" in done.stdout, done.stdout
        hold = subprocess.Popen(netlab.in_ns(lab.peer_ns, [
            sys.executable, "-c", HOLD, lab.plan.gateway_address, str(ADDED_PORT)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert hold.stdout is not None and hold.stdout.readline().strip() == "connected"
        netlab.wait_until(lambda: established_to_http(lab) == 2, timeout=5,
                          what="the held connection at the service")

        # 2. The rule removed again, by SIGHUP: the held connection is reset on both sides.
        lab.config_path.write_text(original)
        os.kill(gateway_pid, signal.SIGHUP)
        assert hold.stdout.readline().strip() == "reset"
        netlab.wait_until(lambda: established_to_http(lab) == 1, timeout=5,
                          what="the service's side of the held connection reset")
        netlab.wait_until(lambda: "1 flow(s) of removed rules ended" in
                          lab.log_path("sixgate").read_text(), timeout=5, what="reload logged")

        # 3. A broken file: refused with file:line, nothing changes, the metric says so.
        lab.config_path.write_text(original.replace("workers = 2", 'workers = "two"'))
        done = reload_cli(lab)
        assert done.returncode == 2, done.stdout + done.stderr
        assert re.search(rf"{re.escape(str(lab.config_path))}:\d+: gateway.workers",
                         done.stderr), done.stderr
        assert metric(lab, "sixgate_config_last_reload_successful") == 0
        assert "config reload refused" in lab.log_path("sixgate").read_text()

        # 4. A change only a restart can make: refused, naming it.
        lab.config_path.write_text(original.replace("workers = 2", "workers = 3"))
        done = reload_cli(lab)
        assert done.returncode == 2 and "workers cannot change while sixgate runs: restart " \
            "needed" in done.stderr, done.stderr

        # 5. Good again.
        lab.config_path.write_text(original)
        done = reload_cli(lab)
        assert done.returncode == 0, done.stderr
        assert metric(lab, "sixgate_config_last_reload_successful") == 1
        assert metric(lab, "sixgate_config_last_reload_success_timestamp_seconds") > loaded_at

        still = [b for b in lab.flows()["bindings"] if b["proto"] == "tcp"]
        keys = ("client", "pool", "target", "worker", "rule")
        assert [{k: b[k] for k in keys} for b in still] == \
            [{k: b[k] for k in keys} for b in download]
        stdout, stderr = curl.communicate(timeout=150)
    finally:
        for process in (curl, hold):
            if process is not None and process.poll() is None:
                netlab.stop_process(process, 5)
    assert curl.returncode == 0, stderr
    assert stdout.split()[0] == big.sha256, "the download arrived damaged"
    assert lab.processes["sixgate"].pid == gateway_pid and lab.alive("sixgate")
    assert netlab.drops(lab)["internal_error"] == 0

