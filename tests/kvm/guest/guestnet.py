"""Small helpers of the guest tests: ``ip`` with readable failures, namespaces by purpose.

Only documentation addresses are used (192.0.2.0/24, 198.51.100.0/24, 2001:db8::/32), and the
guest has no network device at all: everything stays in namespaces of the throw-away kernel.
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Sequence

_serial = itertools.count()


def run(command: Sequence[str], netns: str | None = None, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (inside ``netns`` if given); on failure an AssertionError with output."""
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]
    result = subprocess.run(list(command), capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"`{' '.join(command)}` exited {result.returncode}:\n"
                             f"{result.stdout}{result.stderr}")
    return result


def ip(*args: str, netns: str | None = None) -> str:
    """``ip [-n NETNS] ARGS...``'s stdout; AssertionError with its stderr when it fails."""
    prefix = ["ip"] if netns is None else ["ip", "-n", netns]
    return run([*prefix, *args]).stdout


def add_namespace(purpose: str) -> str:
    name = f"sgk{next(_serial)}-{purpose}"
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", netns=name)
    return name


def delete_namespace(name: str) -> None:
    ip("netns", "delete", name)
