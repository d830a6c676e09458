"""Tell the tunnel broker where our end is: Hurricane Electric's update API (dyndns style).

A 6in4 broker sends the tunnel's packets to the IPv4 address it has for us; when that address
changes, the broker must be told (HE: ``https://ipv4.tunnelbroker.net/nic/update``, an HTTPS
GET with basic auth, ``hostname`` = the tunnel id, ``myip`` = the new address; the reply's
first word says how it went, as dyndns2 replies do). The key is read once from a file that
only its owner may read (0600: refused otherwise), before the coordinator drops root.

Replies are classified into a bounded set of results (``RESULTS``, the label of
``sixgate_tunnel_endpoint_updates_total``); ``retry_after`` says when to try again: never after
a refusal that only the operator can fix (a wrong key does not become right by asking again,
and a broker that says ``abuse`` wants fewer requests), with a growing delay after an error.
"""

from __future__ import annotations

import base64
import os
import ssl
import stat
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from sixgate.workers.engine.settings import Settings

HE_UPDATE_URL = "https://ipv4.tunnelbroker.net/nic/update"
TIMEOUT_S = 15.0
MAX_RETRY_S = 3600.0

# result -> what the operator must do (None: nothing, it worked)
RESULTS: dict[str, str | None] = {
    "good": None,
    "nochg": None,  # the broker already had this address
    "badauth": "the broker refused the username or key: check [broker] username and key_file",
    "nohost": "the broker knows no such tunnel: check [broker] tunnel_id",
    "abuse": "the broker blocked updates for asking too often: wait, then check its account "
             "page before updating again",
    "refused": "the broker refused the update (its reply is in the log)",
    "error": "the broker answered with an error; sixgate tries again later",
    "unreachable": "the broker could not be reached; sixgate tries again later",
}
# A refusal only the operator can fix: no automatic retry.
FINAL = frozenset({"good", "nochg", "badauth", "nohost", "abuse", "refused"})
_REFUSALS = {"badauth": "badauth", "nohost": "nohost", "notfqdn": "nohost", "abuse": "abuse",
             "!yours": "nohost", "badagent": "refused", "nochg": "nochg", "good": "good",
             "911": "error", "dnserr": "error"}


class KeyFileError(ValueError):
    """The broker's key file (or CA file) cannot be used (the message names the fix)."""


@dataclass(frozen=True)
class Broker:
    url: str
    tunnel_id: str
    username: str
    key: str
    # Made at the start, from ``ca_file`` or the system's CAs: nothing is read after root
    # is dropped.
    context: ssl.SSLContext


@dataclass(frozen=True)
class UpdateResult:
    result: str  # one of RESULTS
    detail: str  # the broker's reply, or why it was not reached


def broker_of(settings: Settings) -> Broker:
    """The [broker] of ``settings``, its key read from the key file (KeyFileError)."""
    try:
        context = ssl.create_default_context(cafile=settings.broker_ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise KeyFileError(f"broker.ca_file {settings.broker_ca_file}: {exc}; name a file of "
                           "PEM CA certificates") from None
    return Broker(settings.broker_url, settings.broker_tunnel_id, settings.broker_username,
                  read_key(settings.broker_key_file), context)


def read_key(path: str) -> str:
    """The update key from ``path``, which must be a regular file only its owner can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise KeyFileError(f"broker.key_file {path}: {exc.strerror}; write the broker's "
                           "update key into it (mode 0600)") from None
    with os.fdopen(fd, encoding="utf-8") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"broker.key_file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise KeyFileError(f"broker.key_file {path} is mode "
                               f"{stat.S_IMODE(info.st_mode):04o}: others may read the broker "
                               f"key; run chmod 600 {path}")
        key = file.read().strip()
    if not key or "\n" in key:
        raise KeyFileError(f"broker.key_file {path} must hold the update key on one line")
    return key


def classify(status: int, body: str) -> str:
    """The result of a reply: its first word as dyndns2 brokers answer (HE: "good 192.0.2.1",
    "nochg ...", "badauth", "abuse", ...); an HTTP 401 is ``badauth`` too."""
    if status == 401:
        return "badauth"
    words = body.split()
    first = words[0].lower() if words else ""
    if status >= 500:
        return "error"
    if first in _REFUSALS:
        return _REFUSALS[first]
    return "refused" if 200 <= status < 300 and first else "error"


def retry_after(result: str, failures: int, min_interval_s: float) -> float | None:
    """Seconds until the next try after ``failures`` failed ones in a row, None: do not try
    again by itself (success, or a refusal the operator must fix). Never sooner than the
    broker's ``min_interval_s``."""
    if result in FINAL:
        return None
    return float(min(MAX_RETRY_S, max(min_interval_s, 60.0 * 2.0 ** max(0, failures - 1))))


def update(broker: Broker, myip: str, timeout_s: float = TIMEOUT_S) -> UpdateResult:
    """One update: our end is now ``myip``."""
    from sixgate.coordinator.metrics import sixgate_version  # config imports this module
    query = urllib.parse.urlencode({"hostname": broker.tunnel_id, "myip": myip})
    request = urllib.request.Request(f"{broker.url}?{query}", headers={
        "Authorization": "Basic " + base64.b64encode(
            f"{broker.username}:{broker.key}".encode()).decode(),
        "User-Agent": f"sixgate/{sixgate_version()}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s,
                                    context=broker.context) as reply:
            body = reply.read(4096).decode("utf-8", "replace").strip()
            return UpdateResult(classify(reply.status, body), body)
    except urllib.error.HTTPError as exc:
        body = exc.read(4096).decode("utf-8", "replace").strip()
        return UpdateResult(classify(exc.code, body), f"HTTP {exc.code} {body}".strip())
    except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
        return UpdateResult("unreachable", str(getattr(exc, "reason", exc)))

