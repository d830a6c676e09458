"""Run a command the way systemd runs the deploy unit's ``sixgate run``: ``User=nobody``,
``AmbientCapabilities=`` (and the same ``CapabilityBoundingSet=``), ``NoNewPrivileges=yes``
and ``RuntimeDirectory=`` (the run directory made beforehand, owned by the user, mode 0700).

Usage: ``as_service_user.py sixgate run --config DIR/sixgate.toml`` (the lab's run_dir is
DIR/run). The capabilities are those the unit grants, CAP_NET_ADMIN and CAP_NET_RAW, plus what
sixgate's own warning asks for on a machine where nobody cannot open /dev/net/tun
(CAP_DAC_OVERRIDE) or read the Python installation (CAP_DAC_READ_SEARCH), found by trying.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

USER = "nobody"
GROUP = "nogroup"
CAPS = ["net_admin", "net_raw"]
CAPABILITY_BITS = {"dac_override": 1, "dac_read_search": 2, "net_admin": 12, "net_raw": 13}
AS_USER = ["setpriv", f"--reuid={USER}", f"--regid={GROUP}", "--clear-groups"]


def user_can(argv: list[str]) -> bool:
    """True when ``argv`` succeeds run as USER with no capabilities."""
    done = subprocess.run([*AS_USER, "--inh-caps=-all", *argv], capture_output=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])
    return done.returncode == 0


def capabilities() -> list[str]:
    """What the gateway needs to keep after setup here: CAPS, plus CAP_DAC_OVERRIDE where USER
    cannot open /dev/net/tun or CAP_DAC_READ_SEARCH where it cannot import sixgate (this
    machine's Python may live under /root), as sixgate's own warning says."""
    caps = list(CAPS)
    if not user_can(["sh", "-c", "test -r /dev/net/tun -a -w /dev/net/tun"]):
        caps.append("dac_override")
    elif not user_can([sys.executable, "-c", "import sixgate.workers.main"]):
        caps.append("dac_read_search")
    return caps


def capability_mask() -> int:
    """``capabilities()`` as the bit mask /proc/PID/status shows (capability.h numbers)."""
    return sum(1 << CAPABILITY_BITS[cap] for cap in capabilities())


def main() -> None:
    argv = sys.argv[1:]
    config = Path(argv[argv.index("--config") + 1])
    run_dir = config.parent / "run"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    entry = pwd.getpwnam(USER)
    os.chown(run_dir, entry.pw_uid, entry.pw_gid)
    spec = ",".join(f"+{cap}" for cap in capabilities())
    os.execvp("setpriv", [*AS_USER, "--no-new-privs", f"--inh-caps={spec}",
                          f"--ambient-caps={spec}", f"--bounding-set=-all,{spec}", *argv])


if __name__ == "__main__":
    main()
