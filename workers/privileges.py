"""Least privilege: the coordinator keeps only the capabilities supervision needs, each worker
none once its sockets and devices are open.

Two steps, both after setup:

- ``become_supervisor`` (the coordinator, once the tunnel, routes, tables and its own sockets
  exist): the unprivileged ``[gateway] user`` with only the capabilities that starting a worker
  again after a crash and undoing the setup at stop still need (``supervisor_capabilities``),
  held as *ambient* capabilities so that a worker it starts inherits them across exec
  (capabilities(7) "Ambient capability set"); the bounding set shrinks to the same, and
  ``no_new_privs`` is set, so nothing it runs can ever gain more.
- ``drop_privileges`` (each worker, once ``Worker.open`` or the relays are done): no
  capabilities at all, no ambient set, the user's uid when it started as root, ``no_new_privs``.

Both mark the process not dumpable (prctl(2) PR_SET_DUMPABLE), so another process of the same
unprivileged user cannot ptrace it or open its /proc files to take over the raw socket or the
TUN device it holds. Under systemd (``User=`` with ``AmbientCapabilities=``) sixgate starts
unprivileged already and only narrows what it was given.

I/O shell: setgroups/setresgid/setresuid, prctl and capget/capset through libc.
"""

from __future__ import annotations

import ctypes
import os
import pwd
from pathlib import Path

from sixgate.workers.engine.settings import Settings

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# capability.h numbers of the capabilities sixgate may keep.
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_NAMES = {CAP_DAC_OVERRIDE: "CAP_DAC_OVERRIDE", CAP_DAC_READ_SEARCH: "CAP_DAC_READ_SEARCH",
             CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE", CAP_NET_ADMIN: "CAP_NET_ADMIN",
             CAP_NET_RAW: "CAP_NET_RAW"}


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(libc: ctypes.CDLL, option: int, arg: int = 0, arg3: int = 0) -> None:
    if libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(arg3), ctypes.c_ulong(0),
                  ctypes.c_ulong(0)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}, {arg}) failed: {os.strerror(errno)}")


def _capget(libc: ctypes.CDLL) -> int:
    """This thread's permitted capabilities as one 64-bit mask."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    return int(data[0].permitted) | int(data[1].permitted) << 32


def _capset(libc: ctypes.CDLL, mask: int) -> None:
    """Effective, permitted and inheritable set to ``mask`` (inheritable is what ambient
    capabilities must also be in)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in (0, 1):
        word = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = data[i].inheritable = word
    if libc.capset(ctypes.byref(header), data) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"capset failed: {os.strerror(errno)}")


def mask_of(caps: tuple[int, ...]) -> int:
    mask = 0
    for cap in caps:
        mask |= 1 << cap
    return mask


def names_of(caps: tuple[int, ...]) -> str:
    return " ".join(CAP_NAMES[cap] for cap in caps) or "none"


def supervisor_capabilities(settings: Settings) -> tuple[int, ...]:
    """What the coordinator still needs after setup, and why.

    Userspace backend: a worker started again opens a TUN device and its routes (NET_ADMIN)
    and a raw protocol-41 socket (NET_RAW); at stop the forwarding table and sysctls are undone
    (NET_ADMIN: net sysctls are writable with it, sysctl_net.c). Kernel backend: the sit link,
    routes and nftables are undone at stop (NET_ADMIN) and a relay started again listens on the
    forwarded ports, which may be below 1024 (NET_BIND_SERVICE)."""
    if settings.backend == "kernel":
        return (CAP_NET_BIND_SERVICE, CAP_NET_ADMIN)
    return (CAP_NET_ADMIN, CAP_NET_RAW)


def user_id(user: str) -> int:
    """The uid a worker becomes (``[gateway] user``), -1 when it stays root."""
    return _user_entry(user).pw_uid if user else -1


def _user_entry(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise OSError(f"[gateway] user {user!r} does not exist on this host; create it "
                      "(useradd --system sixgate) or name another") from None


def unreachable_as(user: str, checks: list[tuple[Path, int]]) -> list[Path]:
    """The paths of ``checks`` (path, ``os.access`` mode) that ``user`` could not use, asked as
    it would ask (its uid and gid, no other groups), so each parent directory must be
    searchable by it too. Under root the credentials are root's again on return; a process
    that is not root asks for itself (access(2) then ignores its capabilities)."""
    if os.geteuid() != 0:
        return [path for path, mode in checks if not os.access(path, mode)]
    entry = _user_entry(user)
    groups = os.getgroups()
    os.setgroups([])
    os.setegid(entry.pw_gid)
    os.seteuid(entry.pw_uid)
    try:
        return [path for path, mode in checks if not os.access(path, mode, effective_ids=True)]
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


def _switch_user(entry: pwd.struct_passwd) -> None:
    """All of this process's user and group ids to ``entry``'s, no supplementary groups."""
    os.setgroups([])
    os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
    os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)


def who_am_i() -> str:
    """This process's user for a log line: its name (uid), or the uid alone where there is no
    passwd entry (systemd DynamicUser=)."""
    try:
        return f"{pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"
    except KeyError:
        return f"uid {os.geteuid()}"


def _last_capability() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 40


def become_supervisor(user: str, caps: tuple[int, ...]) -> str:
    """The coordinator after setup: ``user`` holding only ``caps`` (ambient, so workers it
    starts inherit them), the bounding set narrowed to them, no_new_privs, not dumpable.
    Returns what was done, for the log. ``user = ""`` keeps root (said in the text)."""
    libc = _libc()
    if not user and os.geteuid() == 0:
        _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
        return "coordinator keeps root ([gateway] user = \"\")"
    keep = mask_of(caps)
    if os.geteuid() == 0:
        entry = _user_entry(user)
        for cap in range(_last_capability() + 1):
            if not keep >> cap & 1:
                _prctl(libc, PR_CAPBSET_DROP, cap)
        # Keep the permitted set across the uid change (it would be cleared), then narrow it.
        _prctl(libc, PR_SET_KEEPCAPS, 1)
        _switch_user(entry)
        _prctl(libc, PR_SET_KEEPCAPS, 0)
        who = f"{user} (uid {entry.pw_uid})"
    else:
        # Started unprivileged (systemd User= with AmbientCapabilities=): narrow what we got.
        missing = keep & ~_capget(libc)
        if missing:
            lacking = tuple(cap for cap in caps if missing >> cap & 1)
            raise OSError(f"sixgate runs as uid {os.geteuid()} without {names_of(lacking)}; "
                          "run it as root or give it these capabilities (systemd: "
                          "AmbientCapabilities=)")
        who = who_am_i()
    _capset(libc, keep)
    _prctl(libc, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in caps:
        _prctl(libc, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)
    _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
    _prctl(libc, PR_SET_DUMPABLE, 0)
    return f"coordinator running as {who} with only {names_of(caps)}, no_new_privs"


def drop_privileges(user: str, parent_death_signal: int) -> str:
    """Become ``user`` with no capabilities, no ambient set and ``no_new_privs``; returns what
    was done.

    Started as root: the uid change clears every capability. Started as the user with the
    coordinator's ambient capabilities: they are cleared here. ``user = ""`` under root keeps
    root (said in the returned text). Changing the credentials clears the parent-death signal
    (prctl(2)), so it is set again."""
    libc = _libc()
    _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
    if os.geteuid() == 0:
        if not user:
            return "privileges kept ([gateway] user = \"\")"
        entry = _user_entry(user)
        _switch_user(entry)
        who = f"{user} (uid {entry.pw_uid})"
    else:
        who = who_am_i()
    _prctl(libc, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    _capset(libc, 0)
    _prctl(libc, PR_SET_DUMPABLE, 0)
    _prctl(libc, PR_SET_PDEATHSIG, parent_death_signal)
    return f"running as {who}, no capabilities, no_new_privs"
