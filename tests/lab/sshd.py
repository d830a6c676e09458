"""Real OpenSSH servers in lab namespaces, for ``sixgate deploy`` rollouts (the deploy lab's
fleet, tests/deploy/fleet.py, and the cluster lab's nodes).

Each host runs Debian's sshd (``/usr/sbin/sshd -D``) on one documentation address, with a host
key made for the run, root login by a throwaway ed25519 key only, and a private ``/run`` (a
tmpfs mounted in the mount namespace ``ip netns exec`` gives sshd, so the privilege separation
directory /run/sshd never touches the machine's own /run). The controller trusts exactly those
host keys through a generated known_hosts.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def _keygen(path: Path, comment: str = "") -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                    str(path)], check=True, capture_output=True)


def client_key(directory: Path) -> Path:
    """The controller's key (``directory``/id_ed25519, its .pub beside it)."""
    key = directory / "id_ed25519"
    _keygen(key, "sixgate-deploy-test")
    return key


def server_files(directory: Path, address: str, key: Path) -> tuple[Path, str]:
    """Host key, authorized_keys (``key``'s public half) and sshd_config of an sshd on
    ``address``:22, in ``directory``; returns (sshd_config, the known_hosts line)."""
    host_key = directory / "ssh_host_ed25519_key"
    _keygen(host_key)
    public = host_key.with_suffix(".pub").read_text().split()
    shutil.copy(key.with_suffix(".pub"), directory / "authorized_keys")
    config = directory / "sshd_config"
    config.write_text(
        f"ListenAddress {address}:22\n"
        f"HostKey {host_key}\n"
        f"PidFile {directory / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {directory / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        # The temp dir is root's but world-readable parents may be group-writable.
        "StrictModes no\n"
        "MaxStartups 100\n"
        "MaxSessions 100\n"
        "Subsystem sftp internal-sftp\n")
    return config, f"{address} {public[0]} {public[1]}\n"


def sshd_argv(config: Path) -> list[str]:
    """The command that runs sshd of ``config`` in the foreground with a private /run (for
    ``ip netns exec``)."""
    script = ("mount -t tmpfs -o mode=0755,size=16m sixgate-deploy-run /run"
              " && mkdir -m 0755 /run/sshd && \"$0\" -t -f \"$1\""
              " && exec \"$0\" -D -e -f \"$1\"")
    return ["sh", "-c", script, SSHD, str(config)]
