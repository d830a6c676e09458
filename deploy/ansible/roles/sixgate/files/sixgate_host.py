#!/usr/bin/env python3
"""sixgate-host: the host side of ``sixgate deploy`` (role sixgate installs it as
``<home>/bin/sixgate-host`` and runs it with the host's own Python; standard library only, so it
works whatever release is current).

    sixgate-host --home H --config C --run-dir R --pidfile P --log L --metrics HOST:PORT ACTION

State on the host: ``H/releases/<version>/`` (one virtualenv per release), ``H/current`` and
``H/previous`` (symlinks to releases), ``C`` (the live gateway config), ``C.candidate`` (the one
a rollout renders and ``sixgate check`` accepted), ``C.previous`` (the one before the last switch).

Actions:
- ``status``: one line of JSON: current and previous release, config checksums, processes,
  the gateway's /readyz status.
- ``switch --release DIR``: unless DIR is current and the candidate is the live config already,
  keep current and live config as previous, then make DIR and the candidate current (each step
  an atomic rename). Prints "switched ..." or "unchanged".
- ``rollback``: swap current/previous release and config ("rolled back to ..."), or, with
  nothing before, remove current and the live config ("nothing to roll back to").
- ``start``, ``stop``, ``restart``: pidfile supervision of ``sixgate run`` for hosts without
  systemd. ``start`` detaches a supervisor (double fork, new session, stdio to the log) that
  writes its PID to the pidfile and runs ``<release>/bin/sixgate run --config C``, <release>
  being where ``H/current`` points at that moment, so the process shows which release it is.
  A gateway exiting 1 or by a signal is restarted (1 s, doubling to 30 s; back to 1 s after a
  minute up), as systemd's Restart=on-failure would; exit 0 (stopped) or 2 (bad config:
  restarting cannot help) ends supervision. SIGTERM to the supervisor stops the gateway
  (SIGTERM, SIGKILL after 20 s) and removes the pidfile. ``stop`` signals the PID in the pidfile
  only after /proc shows it is ours, and also a gateway a killed supervisor left running
  (``R/coordinator.pid``). ``restart`` of a running gateway whose new release knows
  ``sixgate run --take-over`` starts a new supervisor whose gateway takes over from the
  running one (its sessions handed over, a shorter outage than a stop and a start); the old
  gateway exits 0, which ends the old supervisor; it returns once the old gateway is gone.

Exit codes: 0 ok, 1 failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

STOP_TIMEOUT_S = 20.0  # the gateway's own shutdown (workers, TUN devices) takes a few seconds
START_TIMEOUT_S = 10.0
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0  # a gateway up this long resets the restart backoff
SUPERVISOR_MARK = Path(__file__).name  # sixgate-host as installed; in the supervisor's argv


# --------------------------------------------------------------------------- files


def link(path: Path) -> str | None:
    """Where a symlink points (absolute), or None."""
    return str(path.resolve()) if path.is_symlink() else None


def sha1(path: Path) -> str | None:
    try:
        return hashlib.sha1(path.read_bytes()).hexdigest()
    except OSError:
        return None


def replace_link(path: Path, target: str) -> None:
    """Point symlink ``path`` at ``target`` in one atomic rename."""
    temporary = path.with_name(f".{path.name}.new")
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    temporary.symlink_to(target)
    temporary.replace(path)


def replace_file(path: Path, source: Path) -> None:
    """Give ``path`` the content of ``source`` in one atomic rename."""
    temporary = path.with_name(f".{path.name}.new")
    shutil.copyfile(source, temporary)
    os.chmod(temporary, 0o644)
    temporary.replace(path)


def paths(args: argparse.Namespace) -> tuple[Path, Path, Path, Path, Path]:
    """(current link, previous link, live config, candidate config, previous config)."""
    home, config = Path(args.home), Path(args.config)
    return (home / "current", home / "previous", config,
            config.with_name(config.name + ".candidate"),
            config.with_name(config.name + ".previous"))


def switch(args: argparse.Namespace) -> int:
    current, previous, live, candidate, live_previous = paths(args)
    release = str(Path(args.release).resolve())
    if not Path(release, "bin", "sixgate").exists():
        print(f"{release} holds no installed release (no bin/sixgate)", file=sys.stderr)
        return 1
    if not candidate.exists():
        print(f"no {candidate}: render and check the config first", file=sys.stderr)
        return 1
    before = link(current)
    if before == release and sha1(live) == sha1(candidate):
        print("unchanged")
        return 0
    if before is not None:
        replace_link(previous, before)
    if live.exists():
        replace_file(live_previous, live)
    replace_link(current, release)
    replace_file(live, candidate)
    if before == release:
        print(f"switched to the new config (release {Path(release).name} unchanged)")
    else:
        print(f"switched to release {Path(release).name} and the new config (previous "
              f"release: {Path(before).name if before else 'none'})")
    return 0


def rollback(args: argparse.Namespace) -> int:
    current, previous, live, _candidate, live_previous = paths(args)
    before, target = link(current), link(previous)
    if target is None:
        for path in (current, live):
            if path.is_symlink() or path.exists():
                path.unlink()
        print("nothing to roll back to: no previous release; current release and config "
              "removed")
        return 0
    replace_link(current, target)
    if before is not None:
        replace_link(previous, before)
    if live.exists() and live_previous.exists():
        swap = live.with_name(f".{live.name}.swap")
        live.replace(swap)
        live_previous.replace(live)
        swap.replace(live_previous)
    print(f"rolled back to release {Path(target).name} and its config")
    return 0


# --------------------------------------------------------------------------- processes


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
    """The release a running gateway was started from (releases/<version>/bin/...)."""
    for part in cmdline(pid):
        parts = Path(part).parts
        if "releases" in parts[:-1]:
            return parts[parts.index("releases") + 1]
    return None


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} sixgate-host[{os.getpid()}] {message}",
          flush=True)


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
            take_over = ["--take-over"] if getattr(args, "take_over", False) else []
            args.take_over = False  # the first start only
            log(f"starting {release}/bin/sixgate run {' '.join(take_over)}"
                f"{' ' if take_over else ''}--config {args.config}")
            child = subprocess.Popen([str(release / "bin" / "sixgate"), "run", *take_over,
                                      "--config", args.config], stdin=subprocess.DEVNULL)
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


def start(args: argparse.Namespace, replacing: bool = False) -> int:
    """``replacing``: a restart by take-over, beside the running supervisor."""
    pidfile = Path(args.pidfile)
    pid = read_pid(pidfile)
    if alive(pid, SUPERVISOR_MARK) and not replacing:
        print(f"already running: supervisor pid {pid}")
        return 0
    if not Path(args.home, "current").is_symlink():
        print(f"no current release ({args.home}/current): nothing to start", file=sys.stderr)
        return 1
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    if pidfile.exists():
        pidfile.unlink()
    sys.stdout.flush()  # or the children inherit and repeat what is buffered
    reader, writer = os.pipe()
    if os.fork() == 0:
        os.close(reader)
        os.setsid()
        if os.fork() == 0:
            null = os.open(os.devnull, os.O_RDONLY)
            out = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.write(writer, f"{os.getpid()}\n".encode())
            os.closerange(3, 1024)
            os.chdir("/")
            os._exit(supervise(args))
        os._exit(0)
    os.close(writer)
    os.wait()
    with os.fdopen(reader) as pipe:
        pid = int(pipe.read().strip() or 0)
    # The supervisor writes the pidfile first thing; a gateway that refuses its config (exit 2)
    # ends supervision at once, which is a failed start.
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and alive(pid, SUPERVISOR_MARK):
        if read_pid(pidfile) == pid:
            print(f"started: supervisor pid {pid}")
            return 0
        time.sleep(0.05)
    print(f"the supervisor (pid {pid}) ended at once; see {args.log}", file=sys.stderr)
    return 1


def stop(args: argparse.Namespace) -> int:
    pid = read_pid(Path(args.pidfile))
    stopped = False
    if pid and alive(pid, SUPERVISOR_MARK):
        terminate(pid, SUPERVISOR_MARK, STOP_TIMEOUT_S + 5)
        stopped = True
    gateway = read_pid(Path(args.run_dir, "coordinator.pid"))
    if gateway and alive(gateway, "sixgate"):
        terminate(gateway, "sixgate", STOP_TIMEOUT_S)  # left behind by a killed supervisor
        stopped = True
    print("stopped" if stopped else "not running")
    return 0


def takes_over(release: Path) -> bool:
    """Whether ``release``'s ``sixgate run`` knows ``--take-over`` (older ones do not)."""
    try:
        done = subprocess.run([str(release / "bin" / "sixgate"), "run", "--help"],
                              capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return "--take-over" in done.stdout


def restart(args: argparse.Namespace) -> int:
    supervisor = read_pid(Path(args.pidfile))
    gateway = read_pid(Path(args.run_dir, "coordinator.pid"))
    if not (alive(supervisor, SUPERVISOR_MARK) and alive(gateway, "sixgate")
            and takes_over(Path(args.home, "current").resolve())):
        stop(args)
        return start(args)
    args.take_over = True
    if start(args, replacing=True) != 0:
        return 1
    new = read_pid(Path(args.pidfile))
    deadline = time.monotonic() + STOP_TIMEOUT_S + START_TIMEOUT_S
    coordinator = Path(args.run_dir, "coordinator.pid")
    # Taken over: the old gateway is gone, or (the kernel backend's) it retired, carrying
    # its relays' connections on, and the new one holds the run directory.
    while alive(gateway, "sixgate") and read_pid(coordinator) in (gateway, None):
        if not alive(new, SUPERVISOR_MARK) or time.monotonic() > deadline:
            # The new supervisor must not go on trying beside the running gateway; the old
            # one supervises it as before.
            if new:
                terminate(new, SUPERVISOR_MARK, STOP_TIMEOUT_S)
            Path(args.pidfile).write_text(f"{supervisor}\n")
            print(f"the take-over did not happen: gateway pid {gateway} runs on; see "
                  f"{args.log}", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"restarted by take-over: supervisor pid {new}")
    return 0


def readyz(listen: str) -> int | None:
    """HTTP status of the gateway's /readyz (None: nobody answers)."""
    if not listen:
        return None
    try:
        with urllib.request.urlopen(f"http://{listen}/readyz", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def status(args: argparse.Namespace) -> int:
    current, previous, live, candidate, live_previous = paths(args)
    supervisor = read_pid(Path(args.pidfile))
    gateway = read_pid(Path(args.run_dir, "coordinator.pid"))
    gateway_alive = alive(gateway, "sixgate")
    print(json.dumps({
        "current": link(current),
        "previous": link(previous),
        "config_sha1": sha1(live),
        "candidate_sha1": sha1(candidate),
        "previous_config_sha1": sha1(live_previous),
        "supervisor_pid": supervisor if alive(supervisor, SUPERVISOR_MARK) else None,
        "gateway_pid": gateway if gateway_alive else None,
        "gateway_release": release_of(gateway) if gateway and gateway_alive else None,
        "readyz": readyz(args.metrics),
    }))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="sixgate-host", description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", required=True, help="/opt/sixgate (releases/, current)")
    parser.add_argument("--config", required=True, help="the live gateway config")
    parser.add_argument("--run-dir", required=True, help="the gateway's run_dir")
    parser.add_argument("--pidfile", required=True, help="the supervisor's pidfile")
    parser.add_argument("--log", required=True, help="the supervised gateway's log")
    parser.add_argument("--metrics", default="", help="[metrics] listen, for status")
    parser.add_argument("--release", help="switch: the release directory to make current")
    parser.add_argument("action", choices=["status", "switch", "rollback", "start", "stop",
                                           "restart"])
    args = parser.parse_args()
    if args.action == "switch" and not args.release:
        parser.error("switch needs --release DIR")
    actions = {"status": status, "switch": switch, "rollback": rollback, "start": start,
               "stop": stop, "restart": restart}
    return actions[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
