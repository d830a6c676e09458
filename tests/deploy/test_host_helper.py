"""sixgate-host (deploy/ansible/roles/sixgate/files/sixgate_host.py), the host side of a rollout,
run as the role runs it (``python3 sixgate-host ...``) against a fake install root: the switch
and rollback state machine, status, and the pidfile supervisor with a stand-in gateway. No root,
no SSH; the real thing runs in test_rollout.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HELPER = (Path(__file__).resolve().parents[2] / "deploy" / "ansible" / "roles" / "sixgate" /
          "files" / "sixgate_host.py")

# A stand-in for `sixgate run --config C`: C's first line is the run_dir, where it writes
# coordinator.pid like the gateway; it exits 0 on SIGTERM, or at once with the code written in
# <release>/exit-code when that file exists.
FAKE_GATEWAY = """\
import os, signal, sys, time
from pathlib import Path
release = Path(sys.argv[0]).resolve().parents[1]
if (release / "exit-code").exists():
    sys.exit(int((release / "exit-code").read_text()))
run_dir = Path(Path(sys.argv[3]).read_text().splitlines()[0])
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "coordinator.pid").write_text(f"{os.getpid()}\\n")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(0.1)
"""


# A release that knows `sixgate run --take-over`: it says so in --help; with it, it stops the
# gateway of coordinator.pid (SIGTERM) and waits for it to go before it runs in its place.
TAKE_OVER_GATEWAY = """\
import os, signal, sys, time
from pathlib import Path
if "--help" in sys.argv:
    print("usage: sixgate run [--take-over] --config FILE")
    sys.exit(0)
config = Path(sys.argv[sys.argv.index("--config") + 1])
run_dir = Path(config.read_text().splitlines()[0])
run_dir.mkdir(parents=True, exist_ok=True)
pidfile = run_dir / "coordinator.pid"
if "--take-over" in sys.argv and pidfile.exists():
    old = int(pidfile.read_text())
    os.kill(old, signal.SIGTERM)
    while Path(f"/proc/{old}").exists() and "Z" not in Path(
            f"/proc/{old}/stat").read_text().rpartition(")")[2].split()[:1]:
        time.sleep(0.02)
    print("took over from", old, flush=True)
pidfile.write_text(f"{os.getpid()}\\n")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(0.1)
"""


# The kernel backend's take-over: the running gateway is asked to retire (SIGUSR2); it gives
# up coordinator.pid and runs on (its relays carry their connections) until <run_dir>/drained
# exists, then exits 0.
RETIRING_GATEWAY = """\
import os, signal, sys, time
from pathlib import Path
if "--help" in sys.argv:
    print("usage: sixgate run [--take-over] --config FILE")
    sys.exit(0)
config = Path(sys.argv[sys.argv.index("--config") + 1])
run_dir = Path(config.read_text().splitlines()[0])
run_dir.mkdir(parents=True, exist_ok=True)
pidfile = run_dir / "coordinator.pid"
if "--take-over" in sys.argv and pidfile.exists():
    old = int(pidfile.read_text())
    os.kill(old, signal.SIGUSR2)
    while pidfile.exists() and pidfile.read_text().strip() == str(old):
        time.sleep(0.02)
    print("took over from", old, flush=True)
pidfile.write_text(f"{os.getpid()}\\n")
retiring = []
signal.signal(signal.SIGUSR2, lambda *_: (retiring.append(1), pidfile.unlink()))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while not (retiring and (run_dir / "drained").exists()):
    time.sleep(0.05)
"""


class Host:
    """A fake install root and the helper's command line for it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "opt" / "sixgate"
        self.etc = root / "etc" / "sixgate"
        self.run_dir = root / "run" / "sixgate"
        self.pidfile = root / "run" / "sixgate-supervisor.pid"
        self.log = root / "var" / "log" / "sixgate" / "gateway.log"
        self.etc.mkdir(parents=True)

    def release(self, version: str, gateway: str = FAKE_GATEWAY) -> str:
        directory = self.home / "releases" / version
        (directory / "bin").mkdir(parents=True)
        script = directory / "bin" / "sixgate"
        script.write_text(f"#!{sys.executable}\n{gateway}")
        script.chmod(0o755)
        return str(directory)

    def candidate(self, text: str) -> None:
        (self.etc / "gateway.toml.candidate").write_text(f"{self.run_dir}\n{text}\n")

    def config(self, suffix: str = "") -> str:
        return (self.etc / f"gateway.toml{suffix}").read_text().splitlines()[1]

    def link(self, name: str) -> str | None:
        path = self.home / name
        return Path(os.readlink(path)).name if path.is_symlink() else None

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, str(HELPER), f"--home={self.home}",
                f"--config={self.etc / 'gateway.toml'}", f"--run-dir={self.run_dir}",
                f"--pidfile={self.pidfile}", f"--log={self.log}", *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    def status(self) -> dict[str, object]:
        return dict(json.loads(self.run("status").stdout))


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    the_host = Host(tmp_path)
    yield the_host
    # Whatever a test left running is stopped, by PID (the helper checks /proc first).
    with contextlib.suppress(AssertionError):
        the_host.run("stop")
    for path in (the_host.pidfile, the_host.run_dir / "coordinator.pid"):
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):
            os.kill(int(path.read_text()), signal.SIGKILL)


def test_switch_keeps_the_previous_release_and_config(host: Host) -> None:
    first, second = host.release("1.0"), host.release("1.1")
    host.candidate("one")
    assert host.run(f"--release={first}", "switch").stdout.startswith("switched to release 1.0")
    assert (host.link("current"), host.link("previous")) == ("1.0", None)
    assert host.run(f"--release={first}", "switch").stdout.strip() == "unchanged"
    host.candidate("two")
    assert host.run(f"--release={second}", "switch").stdout.startswith("switched to release 1.1")
    assert (host.link("current"), host.link("previous")) == ("1.1", "1.0")
    assert (host.config(), host.config(".previous")) == ("two", "one")
    host.candidate("three")
    done = host.run(f"--release={second}", "switch")
    assert done.stdout.startswith("switched to the new config (release 1.1 unchanged)")
    assert (host.link("current"), host.link("previous")) == ("1.1", "1.1")
    assert (host.config(), host.config(".previous")) == ("three", "two")


def test_rollback_swaps_so_a_second_rollback_goes_forward(host: Host) -> None:
    first, second = host.release("1.0"), host.release("1.1")
    host.candidate("one")
    host.run(f"--release={first}", "switch")
    host.candidate("two")
    host.run(f"--release={second}", "switch")
    assert host.run("rollback").stdout.startswith("rolled back to release 1.0")
    assert (host.link("current"), host.link("previous")) == ("1.0", "1.1")
    assert (host.config(), host.config(".previous")) == ("one", "two")
    host.run("rollback")
    assert (host.link("current"), host.link("previous")) == ("1.1", "1.0")
    assert (host.config(), host.config(".previous")) == ("two", "one")


def test_rollback_of_a_first_install_removes_it(host: Host) -> None:
    host.candidate("one")
    host.run(f"--release={host.release('1.0')}", "switch")
    assert host.run("rollback").stdout.startswith("nothing to roll back to")
    assert host.link("current") is None and not (host.etc / "gateway.toml").exists()


def test_switch_refuses_a_release_that_is_not_installed(host: Host) -> None:
    host.candidate("one")
    argv = [sys.executable, str(HELPER), f"--home={host.home}",
            f"--config={host.etc / 'gateway.toml'}", f"--run-dir={host.run_dir}",
            f"--pidfile={host.pidfile}", f"--log={host.log}",
            f"--release={host.home / 'releases' / 'nope'}", "switch"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1 and "no installed release" in done.stderr
    assert host.link("current") is None


def wait_for(predicate: object, timeout: float = 10) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()  # type: ignore[operator]
        if value:
            return value
        time.sleep(0.05)
    return None


def test_supervisor_starts_restarts_and_stops_the_gateway(host: Host) -> None:
    host.candidate("one")
    host.run(f"--release={host.release('1.0')}", "switch")
    assert host.run("start").stdout.startswith("started: supervisor pid")
    status = wait_for(lambda: (s := host.status())["gateway_pid"] and s)
    assert isinstance(status, dict), host.log.read_text()
    assert status["gateway_release"] == "1.0" and status["supervisor_pid"]
    assert host.run("start").stdout.startswith("already running")
    # A crashed gateway is started again by its supervisor.
    os.kill(int(str(status["gateway_pid"])), signal.SIGKILL)
    again = wait_for(lambda: (s := host.status())["gateway_pid"] not in (None,
                                                                          status["gateway_pid"])
                     and s)
    assert isinstance(again, dict) and again["supervisor_pid"] == status["supervisor_pid"]
    assert host.run("stop").stdout.strip() == "stopped"
    final = host.status()
    assert final["supervisor_pid"] is None and final["gateway_pid"] is None
    assert not host.pidfile.exists()
    assert "sixgate run exited -9" in host.log.read_text()


def test_a_restart_is_a_take_over_where_the_release_knows_it(host: Host) -> None:
    """restart with a release that knows --take-over: a new supervisor's gateway takes over
    from the running one, which exits 0 and so ends the old supervisor; restart returns once
    the old gateway is gone. A release without it is stopped and started."""
    host.candidate("one")
    host.run(f"--release={host.release('1.0', TAKE_OVER_GATEWAY)}", "switch")
    host.run("start")
    first = wait_for(lambda: (s := host.status())["gateway_pid"] and s)
    assert isinstance(first, dict), host.log.read_text()
    done = host.run("restart")
    assert "restarted by take-over" in done.stdout, done.stdout
    after = host.status()
    assert after["gateway_pid"] and after["gateway_pid"] != first["gateway_pid"]
    assert after["supervisor_pid"] and after["supervisor_pid"] != first["supervisor_pid"]
    text = host.log.read_text()
    assert f"took over from {first['gateway_pid']}" in text and "run --take-over" in text
    assert wait_for(lambda: not Path(f"/proc/{first['supervisor_pid']}").exists()
                    or "Z" in Path(f"/proc/{first['supervisor_pid']}/stat").read_text()
                    .rpartition(")")[2].split()[:1]), text
    # The next restart again; a stop ends everything.
    assert "restarted by take-over" in host.run("restart").stdout
    assert host.run("stop").stdout.strip() == "stopped"
    assert host.status()["gateway_pid"] is None
    # A release without --take-over (FAKE_GATEWAY): stop and start as before.
    host.candidate("two")
    host.run(f"--release={host.release('2.0')}", "switch")
    host.run("start")
    assert wait_for(lambda: host.status()["gateway_pid"]), host.log.read_text()
    plain = host.run("restart").stdout
    assert "stopped" in plain and "take-over" not in plain, plain


def test_a_take_over_returns_while_the_old_gateway_retires(host: Host) -> None:
    """The kernel backend's take-over: the old gateway gives up the run directory and runs on
    while its relays carry their connections; restart returns as soon as the new gateway
    holds it (not when the old one exits), and the old supervisor ends with its gateway."""
    host.candidate("one")
    host.run(f"--release={host.release('1.0', RETIRING_GATEWAY)}", "switch")
    host.run("start")
    first = wait_for(lambda: (s := host.status())["gateway_pid"] and s)
    assert isinstance(first, dict), host.log.read_text()
    done = host.run("restart")
    assert "restarted by take-over" in done.stdout, done.stdout + done.stderr
    after = host.status()
    assert after["gateway_pid"] and after["gateway_pid"] != first["gateway_pid"]
    assert Path(f"/proc/{first['gateway_pid']}").exists(), "the old gateway did not retire"
    (host.run_dir / "drained").touch()
    assert wait_for(lambda: not Path(f"/proc/{first['supervisor_pid']}").exists()
                    or "Z" in Path(f"/proc/{first['supervisor_pid']}/stat").read_text()
                    .rpartition(")")[2].split()[:1]), host.log.read_text()
    assert host.status()["gateway_pid"] == after["gateway_pid"]
    assert host.run("stop").stdout.strip() == "stopped"


def test_supervision_ends_on_a_bad_config_exit(host: Host) -> None:
    release = host.release("1.0")
    (Path(release) / "exit-code").write_text("2")
    host.candidate("one")
    host.run(f"--release={release}", "switch")
    argv = [sys.executable, str(HELPER), f"--home={host.home}",
            f"--config={host.etc / 'gateway.toml'}", f"--run-dir={host.run_dir}",
            f"--pidfile={host.pidfile}", f"--log={host.log}", "start"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    # Depending on who is faster, start sees the supervisor up or already gone again.
    assert done.returncode == 0 or "ended at once" in done.stderr, done.stderr
    assert wait_for(lambda: not host.pidfile.exists()), host.log.read_text()
    assert "sixgate run exited 2" in host.log.read_text()
    assert host.log.read_text().count("starting ") == 1
    assert host.status()["supervisor_pid"] is None
