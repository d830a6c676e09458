"""What sixgate tells a service manager: systemd's readiness protocol (sd_notify(3)), spoken
without libsystemd, and which installation of sixgate a process runs.

Under a ``Type=notify`` unit systemd names a datagram socket in ``$NOTIFY_SOCKET``; a message
is newline-separated ``KEY=value`` fields. sixgate sends ``READY=1`` once it serves,
``STOPPING=1`` when it stops and, in a take-over (``sixgate run --take-over``, which the unit's
``ExecReload`` starts), ``MAINPID=`` with its own pid *before* the old run exits, so systemd
follows the new process instead of seeing its main process end and stopping the unit
(``NotifyAccess=all`` lets a process other than the main one say so). Without the variable
(run by hand, by the pidfile supervisor) nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

log = logging.getLogger("sixgate")


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``f"MAINPID={pid}"``) to the service manager; False when
    there is none or it cannot be reached (logged: the unit would then time out or stop)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket (sd_notify(3))
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        log.warning("cannot tell the service manager %s on NOTIFY_SOCKET %s: %s",
                    ", ".join(fields), os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def installation() -> str:
    """The installation of sixgate this process runs: its Python environment, resolved (a
    deploy release's venv under releases/VERSION, whatever ``current`` pointed at when it
    started). A reload by the unit compares it with the running gateway's: another one is an
    upgrade, which takes over."""
    return os.path.realpath(sys.prefix)
