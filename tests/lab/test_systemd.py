"""Issue 17 under systemd: the unit ``sixgate deploy`` writes (deploy/ansible/roles/sixgate/
templates/sixgate.service.j2, rendered as the role renders it) in a host whose service manager
is Debian's real systemd (systemd_host.py), in the lab's gateway namespace. Two installations
of sixgate stand in for two releases (``releases/a`` and ``releases/b``, each its own Python
environment, ``current`` a symlink as deploy makes it). ``systemctl reload`` after ``current``
moved to the other release is an upgrade: that release takes over (``sixgate reload
--or-take-over``, the unit's ExecReload) and becomes the unit's main process (MAINPID=) while a
real ``curl -6`` download goes on and completes byte-identical on the same session. Then a
config change reloads in place (same main process), a change that needs a restart is a
take-over, a bad file is refused with the unit running on, and ``systemctl stop`` leaves
nothing behind.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import as_service_user
import netlab
import pytest
import systemd_host
from netlab import Lab
from systemd_host import SystemdHost

from sixgate.deploy.render import template_environment

pytestmark = pytest.mark.lab

UNIT = "sixgate.service"
RATE = "10M"  # bytes/s: the 100 MB download lasts 10 s, the events happen during it


def make_release(path: Path) -> None:
    """An installation of sixgate at ``path``: a Python environment of its own (so another
    ``sys.prefix``) importing this checkout's packages, with a ``bin/sixgate`` as pip makes."""
    # --copies: systemd looks the interpreter up as the unit's user before its capabilities
    # apply, and this machine's Python may live under /root (the copy reads it after).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--copies", str(path)],
                   check=True, timeout=60)
    site = Path(sysconfig.get_path("purelib"))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (path / "lib" / version / "site-packages" / "checkout.pth").write_text(
        f"import site; site.addsitedir({str(site)!r})\n")
    script = path / "bin" / "sixgate"
    script.write_text(f"#!{path}/bin/python\nimport sys\n"
                      "from sixgate.coordinator.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)


def switch(home: Path, release: str) -> None:
    """``current`` -> releases/``release``, atomically (as deploy's switch does)."""
    temporary = home / "current.new"
    temporary.symlink_to(home / "releases" / release)
    os.replace(temporary, home / "current")


def drop_in(log: Path) -> str:
    """What this lab machine needs beside the unit (not what a host needs): Debian's nobody's
    group is nogroup; the lab's files are under /tmp (PrivateTmp would hide them); the Python
    may live under /root (ProtectHome would hide it); nobody may be unable to open
    /dev/net/tun or read the Python here (the capability sixgate's own warning names)."""
    extra = [f"CAP_{c.upper()}" for c in as_service_user.capabilities()
             if c not in as_service_user.CAPS]
    lines = ["[Service]", "Group=nogroup", "PrivateTmp=no", f"StandardOutput=append:{log}",
             f"StandardError=append:{log}"]
    if sys.base_prefix.startswith(("/root", "/home")):
        lines.append("ProtectHome=no")
    if extra:
        lines += [f"AmbientCapabilities={' '.join(extra)}",
                  f"CapabilityBoundingSet={' '.join(extra)}"]
    return "\n".join(lines) + "\n"


class SystemdLab:
    def __init__(self, lab: Lab, host: SystemdHost, home: Path, etc: Path) -> None:
        self.lab, self.host, self.home, self.etc = lab, host, home, etc
        self.log = lab.tmp / "gateway.log"

    def main_pid(self) -> int:
        return int(self.host.show(UNIT, "MainPID") or 0)

    def state(self) -> str:
        return f"{self.host.show(UNIT, 'ActiveState')}/{self.host.show(UNIT, 'SubState')}"

    def coordinator_pid(self) -> int:
        try:
            return int((self.lab.tmp / "run" / "coordinator.pid").read_text())
        except (OSError, ValueError):
            return 0

    def release_of(self, pid: int) -> str:
        """The command line of the host's ``pid`` (pids here are the systemd host's)."""
        return " ".join(netlab.process_cmdline(self.host.host_pid(pid)))

    def gone(self, pid: int) -> bool:
        return self.host.host_pid(pid) == 0

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = self.host.systemctl(*args)
        print(f"systemctl {' '.join(args)}: exit {done.returncode} {done.stdout}{done.stderr}")
        return done

    def report(self) -> str:
        return (f"unit {self.state()}, main pid {self.main_pid()}\n"
                f"{self.host.systemctl('status', UNIT).stdout}\n{netlab.tail(self.log)}")

    def tcp_session(self) -> dict[str, Any] | None:
        for binding in self.lab.flows()["bindings"]:
            if binding["proto"] == "tcp" and binding["client"].startswith(
                    f"[{self.lab.plan.peer_address}]"):
                return {k: binding[k] for k in ("client", "pool", "target")}
        return None


@pytest.fixture
def systemd_lab(served_files: netlab.ServedFiles) -> Iterator[SystemdLab]:
    lacks = systemd_host.missing()
    if lacks:
        reason = f"SYSTEMD LAB CANNOT RUN: {', '.join(lacks)} missing"
        if os.environ.get("SIXGATE_LAB_REQUIRED") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    with Lab("6to4", 2, served_files, fanout="kernel", with_gateway=False) as lab:
        home, etc = lab.tmp / "opt", lab.tmp / "etc"
        for release in ("a", "b"):
            make_release(home / "releases" / release)
        switch(home, "a")
        etc.mkdir()
        (etc / "gateway.toml").write_text(lab.config_text())
        run_dir = lab.tmp / "run"
        run_dir.mkdir(mode=0o700)
        nobody = pwd.getpwnam(as_service_user.USER)
        os.chown(run_dir, nobody.pw_uid, nobody.pw_gid)
        with SystemdHost(lab.gw_ns, lab.tmp / "systemd") as host:
            (host.units / UNIT).write_text(template_environment().get_template(
                "sixgate.service.j2").render(
                inventory_hostname="lab", sixgate_home=str(home), sixgate_etc=str(etc),
                sixgate_user=as_service_user.USER, sixgate_run_dir=str(run_dir)))
            (host.units / f"{UNIT}.d").mkdir()
            systemd = SystemdLab(lab, host, home, etc)
            (host.units / f"{UNIT}.d" / "lab.conf").write_text(drop_in(systemd.log))
            assert host.systemctl("daemon-reload").returncode == 0
            try:
                yield systemd
            finally:
                systemd.systemctl("stop", UNIT)


def test_systemctl_reload_upgrades_without_dropping_the_download(
        systemd_lab: SystemdLab, served_files: netlab.ServedFiles) -> None:
    lab, home = systemd_lab.lab, systemd_lab.home
    started = systemd_lab.systemctl("start", UNIT)
    assert started.returncode == 0, systemd_lab.report()
    first = systemd_lab.main_pid()
    assert systemd_lab.state() == "active/running", systemd_lab.report()
    # Type=notify: `start` returned once sixgate said READY=1, so it serves already.
    assert first == systemd_lab.coordinator_pid(), systemd_lab.report()
    assert f"{home}/releases/a/bin/" in systemd_lab.release_of(first)
    big = served_files.big
    curl = subprocess.Popen(netlab.in_ns(lab.peer_ns, [
        "bash", "-c", "set -o pipefail; curl -6 -g -sS --fail --max-time 120 --limit-rate "
        f"{RATE} {netlab.http_url(lab, big.name)} | sha256sum"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        netlab.wait_until(lambda: systemd_lab.tcp_session() is not None, timeout=10,
                          what="the download's session")
        session = systemd_lab.tcp_session()

        # The upgrade: current -> b, `systemctl reload`.
        switch(home, "b")
        reloaded = systemd_lab.systemctl("reload", UNIT)
        assert reloaded.returncode == 0, systemd_lab.report()
        second = systemd_lab.main_pid()
        assert second not in (0, first), systemd_lab.report()
        assert second == systemd_lab.coordinator_pid(), systemd_lab.report()
        assert f"{home}/releases/b/bin/" in systemd_lab.release_of(second)
        assert systemd_lab.state() == "active/running", systemd_lab.report()
        netlab.wait_until(lambda: systemd_lab.gone(first), timeout=10,
                          what="the old release's gateway gone")
        assert "taking over (the running gateway is" in systemd_lab.log.read_text()
        assert systemd_lab.tcp_session() == session, systemd_lab.report()

        # A change that can be made live: reloaded in place, the same main process.
        config = systemd_lab.etc / "gateway.toml"
        config.write_text(config.read_text() + '\n[[forward]]\nproto = "tcp"\nport = 8081\n'
                          f'to = "127.0.0.1:{netlab.HTTP_PORT}"\n')
        assert systemd_lab.systemctl("reload", UNIT).returncode == 0, systemd_lab.report()
        assert systemd_lab.main_pid() == second, systemd_lab.report()
        assert "tcp/8081" in systemd_lab.log.read_text() or "forwards changed" in \
            systemd_lab.log.read_text(), systemd_lab.report()
        # A bad file: refused, the unit runs on with its config.
        good = config.read_text()
        config.write_text(good.replace("workers = 2", "workers = -2"))
        assert systemd_lab.systemctl("reload", UNIT).returncode != 0, systemd_lab.report()
        assert systemd_lab.main_pid() == second and systemd_lab.state() == "active/running"
        # A change that needs a restart (the fan-out): the same release takes over.
        config.write_text(good.replace('fanout = "kernel"', 'fanout = "coordinator"'))
        assert systemd_lab.systemctl("reload", UNIT).returncode == 0, systemd_lab.report()
        third = systemd_lab.main_pid()
        assert third not in (0, second) and third == systemd_lab.coordinator_pid(), \
            systemd_lab.report()
        assert systemd_lab.state() == "active/running", systemd_lab.report()

        stdout, stderr = curl.communicate(timeout=120)
    finally:
        if curl.poll() is None:
            netlab.stop_process(curl, 5)
    assert curl.returncode == 0, stderr + systemd_lab.report()
    assert stdout.split()[0] == big.sha256, "the download arrived damaged"

    assert systemd_lab.systemctl("stop", UNIT).returncode == 0
    assert systemd_lab.state() == "inactive/dead", systemd_lab.report()
    assert systemd_lab.gone(third)
    # Nothing of the gateway is left in the namespace: its TUN devices went with it.
    leftovers = [link["ifname"] for link in lab.links(lab.gw_ns)
                 if link["ifname"] not in ("lo", "veth0")]
    assert not leftovers, leftovers
