"""coordinator/broker.py: the broker's replies classified, when to ask again, the key file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sixgate.coordinator.broker import (
    FINAL,
    RESULTS,
    KeyFileError,
    classify,
    read_key,
    retry_after,
)


@pytest.mark.parametrize(("status", "body", "result"), [
    (200, "good 192.0.2.10", "good"),
    (200, "nochg 192.0.2.10", "nochg"),
    (200, "badauth", "badauth"),
    (401, "", "badauth"),  # HTTP basic auth refused
    (200, "nohost", "nohost"),
    (200, "notfqdn", "nohost"),
    (200, "abuse", "abuse"),
    (200, "badagent", "refused"),
    (200, "something new", "refused"),
    (200, "911", "error"),
    (503, "good", "error"),  # a server error is never taken for success
    (200, "", "error"),
])
def test_replies_are_classified_into_the_bounded_results(status: int, body: str,
                                                         result: str) -> None:
    assert classify(status, body) == result
    assert result in RESULTS


def test_a_refusal_is_never_retried_an_error_later_and_later() -> None:
    for result in FINAL:
        assert retry_after(result, 1, 300) is None, result
    delays = [retry_after("error", n, 60) for n in range(1, 9)]
    assert delays[:4] == [60.0, 120.0, 240.0, 480.0]
    assert delays[-1] == 3600.0  # capped
    # Never sooner than the broker's minimum interval.
    assert retry_after("unreachable", 1, 900) == 900.0


def test_the_key_file_must_be_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("s3cret\n")
    path.chmod(0o600)
    assert read_key(str(path)) == "s3cret"
    for mode in (0o640, 0o604, 0o644):
        path.chmod(mode)
        with pytest.raises(KeyFileError, match=f"run chmod 600 {path}"):
            read_key(str(path))
    path.chmod(0o600)
    link = tmp_path / "link"
    os.symlink(path, link)
    with pytest.raises(KeyFileError):
        read_key(str(link))  # O_NOFOLLOW: the file itself, not where a link points
    with pytest.raises(KeyFileError, match="No such file"):
        read_key(str(tmp_path / "missing"))
    path.write_text("")
    with pytest.raises(KeyFileError, match="one line"):
        read_key(str(path))


SIX_IN_FOUR = ('[tunnel]\nmode = "6in4"\nlocal_ipv4 = "192.0.2.10"\nremote_ipv4 = '
               '"198.51.100.1"\nprefix = "2001:db8:1::/64"\n[gateway]\npool = "100.64.0.0/16"\n')


@pytest.mark.parametrize(("text", "problem"), [
    (SIX_IN_FOUR + '[broker]\ntunnel_id = "1"\nusername = "a"\n', "key_file is missing"),
    (SIX_IN_FOUR + '[broker]\ntunnel_id = "1"\nusername = "a"\nkey_file = "k"\n',
     "absolute path"),
    (SIX_IN_FOUR + '[broker]\nurl = "ftp://x"\ntunnel_id = "1"\nusername = "a"\n'
     'key_file = "/k"\n', "https:// URL"),
    (SIX_IN_FOUR.replace('"6in4"', '"6to4"').replace('remote_ipv4 = "198.51.100.1"\n'
                                                     'prefix = "2001:db8:1::/64"',
                                                     'relay_ipv4 = "198.51.100.1"')
     + '[broker]\ntunnel_id = "1"\nusername = "a"\nkey_file = "/k"\n', "serves 6in4"),
])
def test_bad_broker_tables_are_refused(text: str, problem: str) -> None:
    from sixgate.coordinator.config import ConfigError, parse_config
    with pytest.raises(ConfigError, match=problem):
        parse_config(text)


def test_a_broker_table_is_parsed_with_he_as_the_default() -> None:
    from sixgate.coordinator.config import parse_config
    settings = parse_config(SIX_IN_FOUR + '[broker]\ntunnel_id = "1"\nusername = "a"\n'
                            'key_file = "/etc/sixgate/broker.key"\n')
    assert (settings.broker_url, settings.broker_tunnel_id, settings.broker_key_file,
            settings.broker_min_interval_s) == (
        "https://ipv4.tunnelbroker.net/nic/update", "1", "/etc/sixgate/broker.key", 300.0)
