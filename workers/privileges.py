"""Least privilege for a worker once its sockets and devices are open.

A worker parses packets from anyone next to ctypes pointer code (recvmmsg, io_uring), so once
``Worker.open`` has made everything that needs root (the TUN device and its routes, the raw
socket, the io_uring ring, the control socket), it becomes an unprivileged user: no
capabilities (a uid change from 0 clears them, RFC-free: capabilities(7)), no supplementary
groups, and ``no_new_privs`` so nothing it could exec ever regains any. The descriptors it
holds keep working; nothing new can be opened with root's rights.

I/O shell: setgroups/setresgid/setresuid and prctl.
"""

from __future__ import annotations

import ctypes
import os
import pwd

PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1


def drop_privileges(user: str, parent_death_signal: int) -> str:
    """Become ``user`` with no capabilities and ``no_new_privs``; returns what was done.

    ``user = ""`` keeps the current credentials (said in the returned text). Changing the
    credentials clears the parent-death signal (prctl(2)), so it is set again."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if not user:
        return "privileges kept ([gateway] user = \"\")"
    if os.geteuid() != 0:
        return f"not root (uid {os.geteuid()}): privileges kept as they are"
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise OSError(f"[gateway] user {user!r} does not exist on this host; create it "
                      "(useradd --system sixgate) or name another") from None
    os.setgroups([])
    os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
    os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
    libc.prctl(PR_SET_PDEATHSIG, parent_death_signal)
    return f"running as {user} (uid {entry.pw_uid}), no capabilities, no_new_privs"
