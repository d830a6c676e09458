"""workers/privileges.py: which capabilities the coordinator keeps per backend, and what a
real child process holds after ``become_supervisor`` and ``drop_privileges`` (needs root)."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys

import pytest
from support.helpers import make_settings

from sixgate.workers import privileges
from sixgate.workers.engine.settings import Settings

NET_ADMIN, NET_RAW, NET_BIND_SERVICE = 12, 13, 10  # capability.h


def test_userspace_supervisor_keeps_tun_route_and_raw_socket_capabilities() -> None:
    settings: Settings = make_settings(backend="userspace")
    assert set(privileges.supervisor_capabilities(settings)) == {NET_ADMIN, NET_RAW}


def test_kernel_backend_supervisor_keeps_link_and_low_port_capabilities() -> None:
    settings: Settings = make_settings(backend="kernel")
    assert set(privileges.supervisor_capabilities(settings)) == {NET_ADMIN, NET_BIND_SERVICE}


def test_names_and_mask() -> None:
    caps = (NET_ADMIN, NET_RAW)
    assert privileges.mask_of(caps) == 0x3000
    assert privileges.names_of(caps) == "CAP_NET_ADMIN CAP_NET_RAW"
    assert privileges.names_of(()) == "none"


CHILD = """
import sys
from sixgate.workers import privileges
def sets():
    fields = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
    return ",".join(f"{k}={int(fields[k], 16):x}" for k in
                    ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd")) + \\
        f",uid={fields['Uid'].split()[0]},nnp={fields['NoNewPrivs'].strip()}"
print(privileges.become_supervisor("nobody", (12, 13)))
print(sets())
print(privileges.drop_privileges("nobody", 15))
print(sets())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="SKIPPED LOUDLY: needs root to change users")
def test_supervisor_then_worker_in_a_real_process() -> None:
    """Root -> nobody with exactly NET_ADMIN + NET_RAW (effective, permitted, inheritable,
    ambient and bounding), then -> nothing at all, no_new_privs throughout."""
    uid = pwd.getpwnam("nobody").pw_uid
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "with only CAP_NET_ADMIN CAP_NET_RAW" in lines[0], lines
    assert lines[1] == f"CapEff=3000,CapPrm=3000,CapInh=3000,CapAmb=3000,CapBnd=3000,uid={uid}," \
                       "nnp=1", lines
    assert "no capabilities" in lines[2], lines
    assert lines[3] == f"CapEff=0,CapPrm=0,CapInh=0,CapAmb=0,CapBnd=3000,uid={uid},nnp=1", lines
