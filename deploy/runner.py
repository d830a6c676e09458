"""Run the generated playbooks with ansible-playbook and read back what each host runs.

Ansible does the work (SSH, idempotence, serial batches, handlers); this module only starts
``ansible-playbook`` in the generated directory, with Ansible's own state (local temp files, SSH
control sockets) kept inside it, and closes the SSH master connections afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class AnsibleMissing(RuntimeError):
    """ansible-playbook is not installed."""


def ansible_playbook() -> str:
    """ansible-playbook beside this interpreter (the deploy extra), else on PATH."""
    beside = Path(sys.executable).parent / "ansible-playbook"
    if beside.exists():
        return str(beside)
    found = shutil.which("ansible-playbook")
    if found is None:
        raise AnsibleMissing("ansible-playbook is not installed; pip install 'sixgate[deploy]' "
                             "(ansible-core) on this controller")
    return found


@dataclass
class Workspace:
    """A generated Ansible directory and the environment ansible-playbook runs with there."""

    directory: Path

    @property
    def control_dir(self) -> Path:
        return self.directory / ".ansible" / "cp"

    def environment(self, batches: int | None, report: Path | None,
                    check: bool = False) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "ANSIBLE_CONFIG": str(self.directory / "ansible.cfg"),
            "ANSIBLE_HOME": str(self.directory / ".ansible"),
            "ANSIBLE_LOCAL_TEMP": str(self.directory / ".ansible" / "tmp"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.control_dir),
            "ANSIBLE_NOCOLOR": env.get("ANSIBLE_NOCOLOR", "" if sys.stdout.isatty() else "1"),
            "PYTHONUNBUFFERED": "1",
        })
        for name in ("SIXGATE_DEPLOY_BATCHES", "SIXGATE_DEPLOY_REPORT", "SIXGATE_DEPLOY_CHECK"):
            env.pop(name, None)
        if batches:
            env["SIXGATE_DEPLOY_BATCHES"] = str(batches)
        if report is not None:
            env["SIXGATE_DEPLOY_REPORT"] = str(report)
        if check:
            env["SIXGATE_DEPLOY_CHECK"] = "1"
        return env

    def run(self, playbook: str, *, limit: str | None = None, check: bool = False,
            batches: int | None = None, report: Path | None = None,
            extra: tuple[str, ...] = (), quiet: bool = False) -> int:
        """ansible-playbook ``playbook``; its exit code. Output goes to our stdout (``quiet``:
        only when it fails)."""
        argv = [ansible_playbook(), playbook, *extra]
        if limit:
            argv += ["--limit", limit]
        if check:
            argv.append("--check")
        sys.stdout.flush()
        done = subprocess.run(argv, cwd=self.directory, check=False, capture_output=quiet,
                              env=self.environment(batches, report, check), text=True)
        if quiet and done.returncode != 0:
            print(done.stdout + done.stderr, end="")
        return done.returncode

    def report(self, limit: str | None) -> dict[str, dict[str, Any]]:
        """Run report.yml; what each host runs, by host name."""
        path = self.directory / "report.json"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.run("report.yml", limit=limit, report=path)
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return {}

    def close_connections(self) -> None:
        """End the SSH master connections Ansible left for reuse (ControlPersist)."""
        if not self.control_dir.is_dir():
            return
        for socket in self.control_dir.iterdir():
            subprocess.run(["ssh", "-o", f"ControlPath={socket}", "-O", "exit", "sixgate"],
                           capture_output=True, check=False, timeout=10)


def release_name(path: str | None) -> str | None:
    """``/opt/sixgate/releases/0.1.0`` -> ``0.1.0``."""
    return Path(path).name if path else None


def format_report(report: dict[str, dict[str, Any]], hosts: list[str], version: str | None
                  ) -> list[str]:
    """The report table: release, previous release, gateway process, /readyz per host."""
    rows = [("host", "release", "previous", "gateway", "/readyz")]
    for host in hosts:
        entry = report.get(host)
        if entry is None:
            rows.append((host, "?", "?", "not reached", "?"))
            continue
        if "unreachable" in entry:
            rows.append((host, "?", "?", "UNREACHABLE", "?"))
            continue
        pid = entry.get("gateway_pid")
        gateway = f"running {entry.get('gateway_release')} (pid {pid})" if pid else "NOT RUNNING"
        release = release_name(entry.get("current")) or "(none)"
        if version and release != version:
            release += "  (not the rollout's)"
        rows.append((host, release, release_name(entry.get("previous")) or "-", gateway,
                     str(entry.get("readyz", "?"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]
