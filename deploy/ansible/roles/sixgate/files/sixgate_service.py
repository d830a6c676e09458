#!/usr/bin/env python3
"""sixgate-service: pidfile supervision of ``sixgate run`` on hosts without systemd.

Installed by ``sixgate deploy`` (role sixgate, ``service = "pidfile"``) next to the releases and
run by the host's own Python (standard library only, so it works whatever release is current):

    sixgate-service --home H --config C --run-dir R --pidfile P --log L start|stop|restart|status

``start`` detaches a supervisor (double fork, new session, stdio to the log), which writes its
PID to the pidfile and runs ``<release>/bin/sixgate run --config C``, where <release> is what
``H/current`` points to at that moment, so the process shows which release it is. When the
gateway exits with 1 or by a signal, the supervisor restarts it (1 s, doubling to 30 s; back to
1 s after a minute of uptime), as systemd's Restart=on-failure would; exit 0 (stopped) or 2 (bad
config: restarting cannot help) ends supervision. SIGTERM to the supervisor stops the gateway
(SIGTERM, SIGKILL after 20 s) and removes the pidfile. ``stop`` signals the PID in the pidfile,
only after /proc shows it is ours, and also a gateway left running by a killed supervisor
(``R/coordinator.pid``). ``status`` prints one line of JSON. Exit codes: 0 ok, 1 failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STOP_TIMEOUT_S = 20.0  # the gateway's own shutdown (workers, TUN devices) takes a few seconds
START_TIMEOUT_S = 10.0
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0  # a gateway up this long resets the restart backoff


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def alive(pid: int | None, marker: str) -> bool:
    """True when ``pid`` runs and its command line contains ``marker`` (never trust a stale
    pidfile: the PID may belong to another program by now)."""
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X") and any(marker in part for part in cmdline(pid))


def terminate(pid: int, marker: str, timeout_s: float) -> None:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL; only while ``pid`` is still ours."""
    if not alive(pid, marker):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive(pid, marker):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.05)


def release_of(pid: int) -> str | None:
    """The release directory name a running gateway was started from (releases/<version>)."""
    for part in cmdline(pid):
        parts = Path(part).parts
        if "releases" in parts[:-1]:
            return parts[parts.index("releases") + 1]
    return None


def supervise(args: argparse.Namespace) -> int:
    """The supervisor loop (runs detached)."""
    pidfile = Path(args.pidfile)
    pidfile.write_text(f"{os.getpid()}\n")
    child: subprocess.Popen[bytes] | None = None
    stopping = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    backoff = 1.0
    try:
        while not stopping:
            release = Path(args.home, "current").resolve()
            started = time.monotonic()
            log(f"starting {release}/bin/sixgate run --config {args.config}")
            child = subprocess.Popen([str(release / "bin" / "sixgate"), "run", "--config",
                                      args.config], stdin=subprocess.DEVNULL)
            while True:
                try:
                    code = child.wait(timeout=STOP_TIMEOUT_S if stopping else None)
                    break
                except subprocess.TimeoutExpired:
                    child.kill()
            log(f"sixgate run exited {code}")
            if stopping or code in (0, 2):
                break
            if time.monotonic() - started > STABLE_S:
                backoff = 1.0
            deadline = time.monotonic() + backoff
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.1)
            backoff = min(backoff * 2, BACKOFF_MAX_S)
    finally:
        if read_pid(pidfile) == os.getpid():
            pidfile.unlink()
    return 0


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} sixgate-service[{os.getpid()}] {message}",
          flush=True)


def start(args: argparse.Namespace) -> int:
    pidfile = Path(args.pidfile)
    pid = read_pid(pidfile)
    if alive(pid, "sixgate-service"):
        print(f"already running: supervisor pid {pid}")
        return 0
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    if pidfile.exists():
        pidfile.unlink()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            null = os.open(os.devnull, os.O_RDONLY)
            out = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.closerange(3, 1024)
            os.chdir("/")
            os._exit(supervise(args))
        os._exit(0)
    os.wait()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        pid = read_pid(pidfile)
        if alive(pid, "sixgate-service"):
            print(f"started: supervisor pid {pid}")
            return 0
        time.sleep(0.05)
    print(f"the supervisor did not write {pidfile}; see {args.log}", file=sys.stderr)
    return 1


def stop(args: argparse.Namespace) -> int:
    pid = read_pid(Path(args.pidfile))
    stopped = False
    if pid and alive(pid, "sixgate-service"):
        terminate(pid, "sixgate-service", STOP_TIMEOUT_S + 5)
        stopped = True
    gateway = read_pid(Path(args.run_dir, "coordinator.pid"))
    if gateway and alive(gateway, "sixgate"):
        terminate(gateway, "sixgate", STOP_TIMEOUT_S)  # left behind by a killed supervisor
        stopped = True
    print("stopped" if stopped else "not running")
    return 0


def status(args: argparse.Namespace) -> int:
    supervisor = read_pid(Path(args.pidfile))
    gateway = read_pid(Path(args.run_dir, "coordinator.pid"))
    gateway_alive = alive(gateway, "sixgate")
    print(json.dumps({
        "supervisor_pid": supervisor if alive(supervisor, "sixgate-service") else None,
        "gateway_pid": gateway if gateway_alive else None,
        "gateway_release": release_of(gateway) if gateway and gateway_alive else None,
    }))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="sixgate-service")
    parser.add_argument("--home", required=True, help="/opt/sixgate (holds current/)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir", required=True, help="the gateway's run_dir")
    parser.add_argument("--pidfile", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("action", choices=["start", "stop", "restart", "status"])
    args = parser.parse_args()
    if args.action == "restart":
        stop(args)
        return start(args)
    return {"start": start, "stop": stop, "status": status}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
