"""A host whose service manager is systemd, inside a lab's network namespace: Debian's own
``/lib/systemd/systemd``, unmodified, as PID 1 of new PID, mount, cgroup and UTS namespaces
(``unshare``), so a unit can be started, reloaded and stopped with the real ``systemctl``.

Safety: systemd sees only the units of the lab's unit directory (``SYSTEMD_UNIT_PATH``); the
targets a unit's default dependencies name (sysinit.target, basic.target, ...) are empty ones
there, so none of the machine's own units runs (systemd-tmpfiles would empty /tmp,
systemd-sysctl would change the machine's sysctls). It gets a tmpfs of its own on /run, and its
cgroups live under one directory per host in the machine's hierarchies (the cgroup namespace
makes that directory its root), removed at ``close`` with every process in them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import netlab

SYSTEMD = "/lib/systemd/systemd"
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Empty stand-ins for what a unit's default dependencies and [Install] name.
TARGETS = ("sixgate-lab", "sysinit", "basic", "shutdown", "network", "network-online",
           "multi-user")

BOOT = """#!/bin/sh
# In the new namespaces: /run and the cgroup hierarchies of this host alone, then systemd.
set -e
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs /run
if [ "$2" = unified ]; then
    mount -t cgroup2 cgroup2 /sys/fs/cgroup
else
    mount -t tmpfs -o mode=0755 tmpfs /sys/fs/cgroup
    mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
    mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
    mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
fi
export SYSTEMD_UNIT_PATH="$1"
exec %(systemd)s --system --unit=sixgate-lab.target
"""


def missing() -> list[str]:
    """What this machine lacks to run a systemd host (empty: nothing)."""
    lacks = [f"{SYSTEMD} (Debian systemd)"] if not Path(SYSTEMD).exists() else []
    lacks += [f"program {p!r} (util-linux)" for p in ("unshare", "nsenter")
              if shutil.which(p) is None]
    if not hierarchies():
        lacks.append(f"a cgroup2 or name=systemd hierarchy under {CGROUP_ROOT}")
    return lacks


def hierarchies() -> list[Path]:
    """The machine's hierarchies systemd uses: cgroup2 alone (unified), or the name=systemd
    v1 one and cgroup2 beside it (hybrid)."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    hybrid = [CGROUP_ROOT / "systemd", CGROUP_ROOT / "unified"]
    return hybrid if all((h / "cgroup.procs").exists() for h in hybrid) else []


class SystemdHost:
    """systemd in ``namespace``, its units in ``directory``/units. Use as a context manager."""

    def __init__(self, namespace: str, directory: Path) -> None:
        self.namespace = namespace
        self.directory = directory
        self.units = directory / "units"
        self.cgroups = [h / f"sixgate-lab-{namespace}" for h in hierarchies()]
        self.launcher: subprocess.Popen[bytes] | None = None
        self.pid = 0  # systemd's, as this machine sees it

    def __enter__(self) -> SystemdHost:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        self.units.mkdir(parents=True, exist_ok=True)
        for target in TARGETS:
            (self.units / f"{target}.target").write_text(f"[Unit]\nDescription=lab {target}\n")
        boot = self.directory / "boot.sh"
        boot.write_text(BOOT % {"systemd": SYSTEMD})
        boot.chmod(0o755)
        sweep_leftovers()
        for cgroup in self.cgroups:
            cgroup.mkdir()
        # The launcher enters this host's cgroups first: unshare --cgroup makes them the root.
        enter = "; ".join(f"echo $$ > {c}/cgroup.procs" for c in self.cgroups)
        layout = "unified" if self.cgroups[0].parent == CGROUP_ROOT else "hybrid"
        self.launcher = subprocess.Popen(
            ["sh", "-c", f'{enter}; exec "$@"', "sh", "ip", "netns", "exec", self.namespace,
             "unshare", "--kill-child", "--cgroup", "--uts", "--pid", "--fork", "--mount",
             "--mount-proc",
             str(boot), str(self.units), layout],
            stdout=(self.directory / "systemd.log").open("wb"), stderr=subprocess.STDOUT)

        def booted() -> bool:
            assert self.launcher is not None
            if self.launcher.poll() is not None:
                raise netlab.LabError(f"systemd exited {self.launcher.returncode}:\n"
                                      f"{netlab.tail(self.directory / 'systemd.log')}")
            children = Path(f"/proc/{self.launcher.pid}/task/{self.launcher.pid}/children")
            pids = children.read_text().split()
            if not pids or Path(f"/proc/{pids[0]}/comm").read_text().strip() != "systemd":
                return False
            self.pid = int(pids[0])
            state = self.systemctl("is-system-running").stdout.strip()
            return state in ("running", "degraded")

        netlab.wait_until(booted, timeout=30, what="systemd up in the lab host", interval=0.1)

    def systemctl(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """``systemctl ARGS`` on this host (not checked)."""
        return subprocess.run(["nsenter", f"--target={self.pid}", "--mount", "--pid",
                               "--cgroup", "--uts", "--net", "systemctl", "--no-pager", *args],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def host_pid(self, pid: int) -> int:
        """The pid this machine sees for ``pid`` of this host's PID namespace (0: none)."""
        namespace = os.readlink(f"/proc/{self.pid}/ns/pid")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns" / "pid") != namespace:
                    continue
                status = (entry / "status").read_text()
            except OSError:
                continue
            nspids = next(line.split()[1:] for line in status.splitlines()
                          if line.startswith("NSpid:"))
            if nspids[-1] == str(pid):
                return int(entry.name)
        return 0

    def show(self, unit: str, prop: str) -> str:
        """One property of ``unit`` (``systemctl show -p``)."""
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def close(self) -> None:
        """systemd and everything under it killed; its cgroups removed."""
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)  # PID 1 of its namespace: all of it ends
            except ProcessLookupError:
                pass
        if self.launcher is not None:
            try:
                self.launcher.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.launcher.kill()
                self.launcher.wait()
        for cgroup in self.cgroups:
            remove_cgroup(cgroup)


def remove_cgroup(cgroup: Path, timeout: float = 10) -> None:
    """``cgroup`` and the ones under it, deepest first, once their processes have left."""
    deadline = time.monotonic() + timeout
    while cgroup.exists():
        for directory in sorted((p for p in cgroup.rglob("*") if p.is_dir()),
                                key=lambda p: len(p.parts), reverse=True) + [cgroup]:
            try:
                directory.rmdir()
            except OSError:
                pass  # processes still leaving it
        if cgroup.exists():
            if time.monotonic() > deadline:
                raise netlab.LabError(f"cannot remove {cgroup}: processes "
                                      f"{(cgroup / 'cgroup.procs').read_text()!r}")
            time.sleep(0.05)


def sweep_leftovers() -> None:
    """The cgroups of a lab host whose test run was killed (its namespace is gone)."""
    live = set(netlab.list_namespaces())
    for hierarchy in hierarchies():
        for cgroup in hierarchy.glob("sixgate-lab-*"):
            if cgroup.name.removeprefix("sixgate-lab-") not in live:
                with contextlib.suppress(netlab.LabError):
                    remove_cgroup(cgroup, timeout=1)
