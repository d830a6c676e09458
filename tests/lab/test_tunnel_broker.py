"""Issue 19: telling the 6in4 broker our address (HE's update API, dyndns style).

A stand-in broker (tests/lab/broker_server.py: http.server + ssl, a certificate from a test CA
made here with ``cryptography``) listens on the peer's 198.51.100.1:8443. The real ``sixgate
run`` tells it our address once at the start (``good``, counted in
``sixgate_tunnel_endpoint_updates_total``); ``sixgate tunnel update`` does it by hand
(``nochg``); a wrong key is ``badauth``: exit 1 by hand, and at the start one request, counted,
never repeated (no retry storm); a key file others may read is refused with the fix. With
``[tunnel] uplink``, a new address of the gateway's interface mid-download moves the tunnel
(workers started again with their sessions) and the broker is told it; the stand-in's "broker"
then re-points its end (tunnel_peer.py, SIGUSR1) and the download arrives whole.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import netlab
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from netlab import GATEWAY_IPV4, LAB_DIR, PEER_IPV4, Lab

pytestmark = [pytest.mark.lab]

TUNNEL_ID, USER, KEY = "123456", "alice", "s3cret-update-key"


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 198.51.100.1 signed by it: (CA, cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sixgate lab test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PEER_IPV4)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address(PEER_IPV4))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = (directory / "ca.pem", directory / "broker.pem", directory / "broker.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class BrokerLab(Lab):
    """The 6in4 lab with a broker update API on the peer and a [broker] table."""

    def start(self) -> None:
        self.create_namespaces()
        self.start_tunnel_peer()
        self.start_services()
        self.ca, cert, cert_key = make_certificates(self.tmp)
        self.requests = self.tmp / "broker-requests.jsonl"
        self.requests.touch()
        ready = self.tmp / "broker.ready"
        self.spawn("broker", self.peer_ns, [
            sys.executable, str(LAB_DIR / "broker_server.py"), "--address", PEER_IPV4,
            "--cert", str(cert), "--cert-key", str(cert_key), "--user", USER, "--key", KEY,
            "--tunnel-id", TUNNEL_ID, "--log", str(self.requests), "--ready-file", str(ready)])
        netlab.wait_until(lambda: ready.exists(), timeout=15, what="broker_server.py ready")
        self.key_file = self.write_key("broker.key-file", KEY)
        self.write_config()
        self.start_gateway()

    def write_key(self, name: str, key: str, mode: int = 0o600) -> Path:
        path = self.tmp / name
        path.write_text(key + "\n")
        path.chmod(mode)
        return path

    def broker_toml(self, key_file: Path) -> str:
        return ("\n[broker]\n"
                f'url = "https://{PEER_IPV4}:8443/nic/update"\n'
                f'tunnel_id = "{TUNNEL_ID}"\nusername = "{USER}"\n'
                f'key_file = "{key_file}"\nca_file = "{self.ca}"\n')

    def config_text(self) -> str:
        # The tunnel follows veth0's address (the lab's uplink).
        return super().config_text().replace(
            f'local_ipv4 = "{GATEWAY_IPV4}"\n',
            f'local_ipv4 = "{GATEWAY_IPV4}"\nuplink = "veth0"\n', 1) + self.broker_toml(
            self.key_file)

    def other_config(self, name: str, key_file: Path) -> Path:
        path = self.tmp / name
        path.write_text(super().config_text() + self.broker_toml(key_file))
        return path

    def logged(self) -> list[dict[str, str]]:
        return [json.loads(line) for line in self.requests.read_text().splitlines()]


@pytest.fixture(scope="module")
def broker_lab(served_files: netlab.ServedFiles) -> Iterator[BrokerLab]:
    with BrokerLab("6in4", 1, served_files, fanout="kernel") as lab:
        yield lab


def updates(lab: Lab) -> dict[str, float]:
    body = lab.gw(["curl", "-sf", "http://127.0.0.1:9641/metrics"]).stdout
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^sixgate_tunnel_endpoint_updates_total{result="(\w+)"} (\S+)$', body, re.MULTILINE)}


def test_the_gateway_tells_the_broker_at_the_start(broker_lab: BrokerLab) -> None:
    netlab.wait_until(lambda: bool(broker_lab.logged()), timeout=15, what="an update")
    [first] = broker_lab.logged()
    assert (first["user"], first["hostname"], first["myip"], first["answer"]) == (
        USER, TUNNEL_ID, GATEWAY_IPV4, f"good {GATEWAY_IPV4}"), first
    netlab.wait_until(lambda: updates(broker_lab) == {"good": 1.0}, timeout=10,
                      what="sixgate_tunnel_endpoint_updates_total{result=\"good\"} 1")


def test_check_names_the_broker_and_refuses_a_loose_key_file(broker_lab: BrokerLab) -> None:
    done = broker_lab.sixgate("check")
    assert done.returncode == 0, done.stderr
    assert (f"broker        https://{PEER_IPV4}:8443/nic/update: tunnel {TUNNEL_ID} as {USER} "
            f"is told {GATEWAY_IPV4} at each start") in done.stdout, done.stdout
    loose = broker_lab.write_key("loose-check.key", KEY, 0o640)
    config = broker_lab.other_config("loose-check.toml", loose)
    done = broker_lab.gw([*netlab.sixgate_command(), "check", "--config", str(config)])
    assert done.returncode == 2 and f"run chmod 600 {loose}" in done.stderr, done.stderr


def test_sixgate_tunnel_update_by_hand(broker_lab: BrokerLab) -> None:
    done = broker_lab.sixgate("tunnel", "update")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"nochg: nochg {GATEWAY_IPV4}", done.stdout


def counter(lab: Lab, name: str) -> float:
    body = lab.gw(["curl", "-sf", "http://127.0.0.1:9641/metrics"]).stdout
    found = re.search(rf"^{name} (\S+)$", body, re.MULTILINE)
    assert found, f"{name} is not exported"
    return float(found.group(1))


def move_uplink(lab: BrokerLab, old: str, new: str) -> None:
    """The gateway's uplink gets ``new`` and loses ``old`` (a new lease); once the broker was
    told ``new``, the broker's end of the tunnel is re-pointed to it."""
    before = len(lab.logged())
    # The new address is added first and the old one's removal promotes it (else Linux
    # removes the secondaries of a removed primary, and with the last address every route
    # through veth0: the lab's routes to the peer).
    lab.exec_in(lab.gw_ns, ["sysctl", "-qw", "net.ipv4.conf.veth0.promote_secondaries=1"])
    lab.ip(lab.gw_ns, "addr", "add", f"{new}/24", "dev", "veth0")
    lab.ip(lab.gw_ns, "addr", "del", f"{old}/24", "dev", "veth0")
    netlab.wait_until(lambda: any(entry["myip"] == new for entry in lab.logged()[before:]),
                      timeout=20, what=lambda: f"the broker to be told {new}; gateway log:\n"
                                                f"{lab.gateway_stderr()}")
    (lab.tmp / "remote").write_text(new + "\n")
    os.kill(lab.processes["tunnel_peer"].pid, signal.SIGUSR1)


def test_an_address_change_mid_download_is_followed_and_told(
        broker_lab: BrokerLab, served_files: netlab.ServedFiles) -> None:
    lab = broker_lab
    moved = "192.0.2.11"
    big = served_files.big
    changes = counter(lab, "sixgate_tunnel_endpoint_changes_total")
    good = updates(lab).get("good", 0.0)
    curl = subprocess.Popen(netlab.in_ns(lab.peer_ns, [
        "bash", "-c", "set -o pipefail; curl -6 -g -sS --fail --max-time 60 --limit-rate 20M "
        f"{netlab.http_url(lab, big.name)} | sha256sum"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # under way
        move_uplink(lab, GATEWAY_IPV4, moved)
        stdout, stderr = curl.communicate(timeout=90)
        assert curl.returncode == 0, stderr + lab.gateway_stderr()
        assert stdout.split()[0] == big.sha256, "the download arrived damaged"
        assert "the tunnel moves there" in lab.gateway_stderr()
        assert counter(lab, "sixgate_tunnel_endpoint_changes_total") == changes + 1
        assert updates(lab).get("good", 0.0) == good + 1
        assert netlab.events(lab).get("flows_resumed", 0) >= 1
        ping = lab.exec_in(lab.peer_ns, ["ping", "-6", "-c", "2", "-i", "0.2", "-W", "2",
                                         lab.plan.gateway_address])
        assert ping.returncode == 0, ping.stdout + ping.stderr
    finally:
        if curl.poll() is None:
            netlab.stop_process(curl, 5)
        # Back where the other tests expect it (the gateway follows again).
        move_uplink(lab, moved, GATEWAY_IPV4)
    assert counter(lab, "sixgate_tunnel_endpoint_changes_total") == changes + 2


def test_a_key_file_others_may_read_is_refused(broker_lab: BrokerLab) -> None:
    loose = broker_lab.write_key("loose.key", KEY, 0o644)
    config = broker_lab.other_config("loose.toml", loose)
    before = len(broker_lab.logged())
    done = broker_lab.gw([*netlab.sixgate_command(), "tunnel", "update", "--config",
                          str(config)])
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"run chmod 600 {loose}" in done.stderr, done.stderr
    assert len(broker_lab.logged()) == before  # nothing was sent


def test_a_wrong_key_is_badauth_and_never_retried(broker_lab: BrokerLab) -> None:
    """By hand: exit 1 and what to check. At the start: one request, counted, and no other
    (the stand-in would answer a storm of them; none comes)."""
    lab = broker_lab
    wrong = lab.write_key("wrong.key", "not-the-key")
    config = lab.other_config("wrong.toml", wrong)
    done = lab.gw([*netlab.sixgate_command(), "tunnel", "update", "--config", str(config)])
    assert done.returncode == 1 and done.stdout.startswith("badauth"), done.stdout
    assert "check [broker] username and key_file" in done.stderr, done.stderr
    lab.stop_gateway()
    before = len(lab.logged())
    lab.config_path.write_text(config.read_text())
    lab.start_gateway(key="sixgate-wrong-key")
    netlab.wait_until(lambda: len(lab.logged()) > before, timeout=15, what="the update")
    time.sleep(3)  # a retry would come within 60 s at the soonest; a storm at once
    new = lab.logged()[before:]
    assert [entry["answer"] for entry in new] == ["badauth"], new
    assert updates(lab) == {"badauth": 1.0}
