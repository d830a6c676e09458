"""Config validation: every mistake names the file, line, key and what to do; exit code 2.

Runs the real ``sixgate check`` command for the CLI contract, and ``parse_config`` for the
table of mistakes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sixgate.coordinator.config import ConfigError, parse_config, parse_listen

GOOD_6TO4 = """\
[tunnel]
mode = "6to4"
local_ipv4 = "192.0.2.10"
relay_ipv4 = "192.88.99.1"
addresses = ["2002:c000:20a::1"]
mtu = 1480

[gateway]
workers = 2
pool = "100.64.0.0/16"

[[forward]]
proto = "tcp"
port = 80
to = "127.0.0.1:8080"

[[forward]]
proto = "udp"
port = 53
to = "127.0.0.1:5353"
"""

GOOD_6IN4 = """\
[tunnel]
mode = "6in4"
local_ipv4 = "192.0.2.10"
remote_ipv4 = "198.51.100.1"
prefix = "2001:db8:1::/64"

[[forward]]
proto = "tcp"
port = "8000-8099"
to = "127.0.0.1:9000"
"""


def sixgate(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "sixgate"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "sixgate.coordinator.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, check=False,
                          timeout=60)


def test_6to4_prefix_derived_from_local_ipv4() -> None:
    settings = parse_config(GOOD_6TO4, "gw.toml")
    assert settings.prefix == "2002:c000:20a::/48"
    assert settings.addresses == ("2002:c000:20a::1",)
    assert settings.max_mss == 1420
    assert [r.label for r in settings.forwards] == ["tcp/80 -> 127.0.0.1:8080",
                                                    "udp/53 -> 127.0.0.1:5353"]


def test_behind_a_1to1_nat_the_6to4_prefix_embeds_the_public_address() -> None:
    """Issue 19: ``public_ipv4`` is what the tunnel is known by (RFC 3056 §2), ``local_ipv4``
    what it binds; 6to4 behind a NAT runs in userspace (Linux sit cannot), 6in4 may not."""
    text = GOOD_6TO4.replace('local_ipv4 = "192.0.2.10"\n',
                             'local_ipv4 = "10.0.0.10"\npublic_ipv4 = "192.0.2.10"\n')
    settings = parse_config(text.replace('addresses = ["2002:c000:20a::1"]\n', ""), "gw.toml")
    assert (settings.local_ipv4, settings.public_ipv4, settings.prefix, settings.addresses) == (
        "10.0.0.10", "192.0.2.10", "2002:c000:20a::/48", ("2002:c000:20a::1",))
    assert settings.backend == "userspace"
    with pytest.raises(ConfigError) as err:
        parse_config(text.replace("workers = 2\n", 'workers = 2\nbackend = "kernel"\n'),
                     "gw.toml")
    assert "tunnel.public_ipv4" in str(err.value) and "userspace" in str(err.value)
    assert parse_config(GOOD_6TO4, "gw.toml").public_ipv4 == "192.0.2.10"  # defaults to local
    in4 = parse_config(GOOD_6IN4.replace('local_ipv4 = "192.0.2.10"\n',
                                         'local_ipv4 = "10.0.0.10"\npublic_ipv4 = '
                                         '"192.0.2.10"\n'), "gw.toml")
    assert (in4.local_ipv4, in4.public_ipv4, in4.backend) == ("10.0.0.10", "192.0.2.10", "auto")


def test_6in4_default_address_is_prefix_1_and_range_shifts() -> None:
    settings = parse_config(GOOD_6IN4, "gw.toml")
    assert settings.addresses == ("2001:db8:1::1",)
    rule = settings.forwards[0]
    assert (rule.port_lo, rule.port_hi) == (8000, 8099)
    assert rule.target_for(8000) == 9000 and rule.target_for(8099) == 9099


@pytest.mark.parametrize(
    ("old", "new", "key", "line", "advice"),
    [
        ('mode = "6to4"', 'mode = "sit"', "tunnel.mode", 2, "6to4"),
        ('local_ipv4 = "192.0.2.10"', 'local_ipv4 = "192.0.2.300"', "tunnel.local_ipv4", 3,
         "IPv4 address"),
        ('relay_ipv4 = "192.88.99.1"\n', "", "tunnel", 1, "RFC 7526"),
        ("mtu = 1480", "mtu = 1500", "tunnel.mtu", 6, "1280 to 1480"),
        ('addresses = ["2002:c000:20a::1"]', 'addresses = ["2001:db8::1"]',
         "tunnel.addresses", 5, "outside the tunnel prefix"),
        ("workers = 2", "workers = 0", "gateway.workers", 9, "1 to 64"),
        ('pool = "100.64.0.0/16"', 'pool = "100.64.0.0/33"', "gateway.pool", 10,
         "IPv4 prefix"),
        ('port = 80', 'port = "80-70"', "forward[0].port", 14, "low first"),
        ('to = "127.0.0.1:8080"', 'to = "localhost:8080"', "forward[0].to", 15,
         "not an IPv4 address"),
        ('port = 53', 'port = 53\ncolour = "blue"', "forward[1].colour", 20, "unknown key"),
        ("workers = 2", "wrokers = 2", "gateway.wrokers", 9, "unknown key"),
        ('port = 53', 'port = 80\n', "forward[1].port", None, None),
    ],
)
def test_bad_config_names_file_line_key(old: str, new: str, key: str, line: int | None,
                                        advice: str | None) -> None:
    text = GOOD_6TO4.replace(old, new, 1)
    if key == "forward[1].port":
        text = text.replace('proto = "udp"', 'proto = "tcp"')
        advice = "already forwarded"
        line = 19
    with pytest.raises(ConfigError) as info:
        parse_config(text, "gw.toml")
    err = info.value
    assert err.file == "gw.toml"
    assert err.key == key, str(err)
    assert err.line == line, str(err)
    assert advice is not None and advice in err.message, str(err)
    assert str(err).startswith(f"gw.toml:{line}: {key}: ")


def test_toml_syntax_error_has_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(GOOD_6TO4.replace("mtu = 1480", "mtu = = 1480"), "gw.toml")
    assert info.value.line == 6
    assert "not valid TOML" in info.value.message


def test_6in4_needs_remote_and_prefix() -> None:
    with pytest.raises(ConfigError, match="remote_ipv4 is missing"):
        parse_config(GOOD_6IN4.replace('remote_ipv4 = "198.51.100.1"\n', ""), "gw.toml")
    with pytest.raises(ConfigError, match="prefix is missing"):
        parse_config(GOOD_6IN4.replace('prefix = "2001:db8:1::/64"\n', ""), "gw.toml")


def test_pool_must_not_hold_tunnel_endpoint() -> None:
    text = GOOD_6TO4.replace('pool = "100.64.0.0/16"', 'pool = "192.0.2.0/24"')
    with pytest.raises(ConfigError, match="contains tunnel.local_ipv4"):
        parse_config(text, "gw.toml")


def test_shards_let_the_worker_count_change_within_them() -> None:
    """[gateway] shards: at least the workers, an address of the pool for each, two ports of
    every pool4 range for each beside a NAT64; 0, the default, is one per worker."""
    assert parse_config(GOOD_6TO4, "gw.toml").shard_count == 2
    text = GOOD_6TO4.replace("workers = 2\n", "workers = 2\nshards = 12\n")
    assert parse_config(text, "gw.toml").shard_count == 12
    for shards, pool, why in ((1, "100.64.0.0/16", "fewer than workers (2)"),
                              (12, "100.64.0.0/28", "cannot give each of 12 shards")):
        bad = GOOD_6TO4.replace("workers = 2\n", f"workers = 2\nshards = {shards}\n")
        with pytest.raises(ConfigError, match=re.escape(why)) as info:
            parse_config(bad.replace("100.64.0.0/16", pool), "gw.toml")
        assert info.value.key == "gateway.shards"
    nat64 = text + '\n[nat64]\nclients = ["2001:db8:100::/56"]\n[[nat64.pool4]]\n' \
        'address = "203.0.113.5"\nudp = "61001-61030"\n'
    assert parse_config(nat64, "gw.toml").shard_count == 12  # 30 ports: 2 for each of 12
    with pytest.raises(ConfigError, match="too small to give each of 12 shards two ports"):
        parse_config(nat64.replace("61030", "61020"), "gw.toml")


def test_udp_timeout_floor_rfc4787_req5() -> None:
    text = GOOD_6TO4 + "\n[timeouts]\nudp_s = 30\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "gw.toml")
    assert info.value.key == "timeouts.udp_s"
    assert info.value.line == GOOD_6TO4.count("\n") + 3


def test_cli_check_prints_effective_settings(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(GOOD_6TO4)
    result = sixgate("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "2002:c000:20a::/48" in result.stdout
    assert "worker 1: TUN sixgate1, pool slice 100.64.128.0/17" in result.stdout
    assert "tcp/80 -> 127.0.0.1:8080" in result.stdout
    assert "delivery" in result.stdout


def test_cli_check_bad_config_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(GOOD_6TO4.replace("mtu = 1480", "mtu = 9000"))
    result = sixgate("check", "--config", str(path))
    assert result.returncode == 2
    assert f"{path}:6: tunnel.mtu:" in result.stderr


def test_cli_missing_file_exit_2(tmp_path: Path) -> None:
    result = sixgate("check", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "cannot read the file" in result.stderr


def test_rfc3964_martian_table_configurable_and_empty_means_off() -> None:
    custom = parse_config(GOOD_6TO4.replace('mtu = 1480', 'mtu = 1480\nmartian_ipv4 = '
                                            '["10.0.0.0/8"]'), "gw.toml")
    assert [cidr for cidr, _ in custom.martian_ipv4] == ["10.0.0.0/8"]
    off = parse_config(GOOD_6TO4.replace('mtu = 1480', 'mtu = 1480\nmartian_ipv4 = []'),
                       "gw.toml")
    assert off.martian_ipv4 == ()
    default = parse_config(GOOD_6TO4, "gw.toml")
    assert "192.168.0.0/16" in [cidr for cidr, _ in default.martian_ipv4]


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9641", ("127.0.0.1", 9641)),
    ("[::1]:9641", ("::1", 9641)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
])
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("bad", ['"localhost:9641"', '"127.0.0.1"', '"127.0.0.1:0"',
                                 '"::1:9641"', "9641", '"127.0.0.1:99999"'])
def test_bad_metrics_listen_names_key_line_and_example(bad: str) -> None:
    text = GOOD_6TO4 + f"\n[metrics]\nlisten = {bad}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "gw.toml")
    line = text.splitlines().index(f"listen = {bad}") + 1
    assert str(info.value).startswith(f"gw.toml:{line}: metrics.listen:"), str(info.value)
    assert "127.0.0.1:9641" in str(info.value)


def test_metrics_listen_default_and_off() -> None:
    assert parse_config(GOOD_6TO4, "gw.toml").metrics_listen == "127.0.0.1:9641"
    off = parse_config(GOOD_6TO4 + '\n[metrics]\nlisten = ""\n', "gw.toml")
    assert off.metrics_listen == ""


@pytest.mark.parametrize(("key", "default", "other", "bad"), [
    ("fanout", "kernel", "coordinator", "zmq"),
    ("tun_writes", "io_uring", "write", "uring"),
])
def test_gateway_choice_default_other_and_error(key: str, default: str, other: str,
                                                 bad: str) -> None:
    assert getattr(parse_config(GOOD_6TO4, "gw.toml"), key) == default
    chosen = parse_config(GOOD_6TO4.replace("workers = 2", f'workers = 2\n{key} = "{other}"'),
                          "gw.toml")
    assert getattr(chosen, key) == other
    text = GOOD_6TO4.replace("workers = 2", f'workers = 2\n{key} = "{bad}"')
    with pytest.raises(ConfigError) as info:
        parse_config(text, "gw.toml")
    line = text.splitlines().index(f'{key} = "{bad}"') + 1
    assert str(info.value).startswith(f"gw.toml:{line}: gateway.{key}: '{bad}' is not one of")



# --- refused, never crashed (hostile-input issue, finding 8) ---------------------------------

@pytest.mark.parametrize(("table", "key", "value"), [
    ("timeouts", "udp_s", "nan"), ("timeouts", "udp_s", "inf"),
    ("timeouts", "tcp_established_s", "nan"), ("timeouts", "unassured_s", "-inf"),
    ("timeouts", "unassured_s", "0"), ("gateway", "icmp_errors_per_s", "nan"),
])
def test_non_finite_or_out_of_range_numbers_refused(table: str, key: str, value: str) -> None:
    """A nan timeout would stop expiry for good: every number must be finite and in range."""
    section = f"[{table}]\n" if table == "timeouts" else ""
    text = (GOOD_6TO4 + f"\n{section}{key} = {value}\n" if table == "timeouts"
            else GOOD_6TO4.replace("workers = 2", f"workers = 2\n{key} = {value}"))
    with pytest.raises(ConfigError) as info:
        parse_config(text, "gw.toml")
    line = text.splitlines().index(f"{key} = {value}") + 1
    assert str(info.value).startswith(f"gw.toml:{line}: {table}.{key}: "), str(info.value)


@pytest.mark.parametrize(("target", "advice"), [
    ("0.0.0.0:80", "this network"), ("255.255.255.255:80", "broadcast"),
    ("224.0.0.1:80", "multicast"), ("240.0.0.1:80", "reserved"),
    ("192.0.2.10:22", "127.0.0.1:PORT"),  # tunnel.local_ipv4
])
def test_forward_to_a_non_service_address_refused(target: str, advice: str) -> None:
    text = GOOD_6TO4.replace('to = "127.0.0.1:8080"', f'to = "{target}"')
    with pytest.raises(ConfigError) as info:
        parse_config(text, "gw.toml")
    assert str(info.value).startswith("gw.toml:15: forward[0].to: "), str(info.value)
    assert advice in info.value.message


@pytest.mark.parametrize(("old", "new", "key"), [
    ('mtu = 1480', 'mtu = 1480\nprefix = "not a prefix"', "tunnel.prefix"),
    ('mtu = 1480', 'mtu = 1480\nprefix = 7', "tunnel.prefix"),
])
def test_bad_6to4_prefix_refused_not_a_traceback(old: str, new: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(GOOD_6TO4.replace(old, new), "gw.toml")
    assert info.value.key == key and info.value.line == 7


def test_forward_that_is_not_a_table_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("forward = [1]\n" + GOOD_6TO4.split("[[forward]]")[0], "gw.toml")
    assert info.value.key == "forward[0]"
    assert "[[forward]] table" in info.value.message


def _with_key(text: str, table: str, key: str, value: str) -> str:
    """``text`` with ``key = value`` as the only ``key`` of the first ``[table]``."""
    lines = text.splitlines()
    headers = {f"[{table}]", f"[[{table}]]"}
    if not any(line in headers for line in lines):
        return text + f"\n[{table}]\n{key} = {value}\n"
    out: list[str] = []
    inside = done = False
    for line in lines:
        if line.startswith("["):
            inside = not done and line in headers
            out.append(line)
            if inside:
                out.append(f"{key} = {value}")
                done = True
            continue
        if not (inside and line.startswith(f"{key} =")):
            out.append(line)
    return "\n".join(out) + "\n"


# Values of every kind TOML has, and the awkward ones of each.
_WEIRD = ["nan", "inf", "-1", "0", "1e308", "99999999999999999", '""', '"x"', "[]", "[1]",
          "{}", "true", '["::1", 2]', '"2001:db8::/129"', '"999.1.1.1"']


@pytest.mark.parametrize("value", _WEIRD)
def test_every_key_with_any_value_is_a_config_error_or_accepted(value: str) -> None:
    """Whatever a key holds, parse_config answers with Settings or a ConfigError naming the
    key: never another exception (a traceback is a crash of ``sixgate run``)."""
    from sixgate.coordinator.config import ALLOWED

    for table, keys in ALLOWED.items():
        for key in sorted(keys):
            text = _with_key(GOOD_6TO4, table, key, value)
            try:
                parse_config(text, "gw.toml")
            except ConfigError as exc:
                assert exc.key, (table, key, value, str(exc))


def test_forward_from_list_parsed_and_checked() -> None:
    text = GOOD_6TO4.replace('to = "127.0.0.1:8080"',
                             'to = "127.0.0.1:8080"\nfrom = ["2001:db8:42::/48", "2002::/16"]')
    assert parse_config(text, "gw.toml").forwards[0].sources == ("2001:db8:42::/48", "2002::/16")
    assert parse_config(GOOD_6TO4, "gw.toml").forwards[0].sources == ()
    for bad in ('["2001:db8:42::1/48"]', "[]", '"2001:db8::/32"', '["10.0.0.0/8"]'):
        with pytest.raises(ConfigError) as info:
            parse_config(GOOD_6TO4.replace('to = "127.0.0.1:8080"',
                                           f'to = "127.0.0.1:8080"\nfrom = {bad}'), "gw.toml")
        assert str(info.value).startswith("gw.toml:16: forward[0].from: "), str(info.value)


@pytest.mark.parametrize("run_dir", ["/tmp", "/run", "/", "/var/run/", "/etc"])
def test_run_dir_may_not_be_a_system_directory(run_dir: str) -> None:
    """sixgate makes its run_dir mode 0700 and cleans it: never /tmp or /run itself."""
    text = GOOD_6TO4.replace("workers = 2", f'workers = 2\nrun_dir = "{run_dir}"')
    with pytest.raises(ConfigError) as info:
        parse_config(text, "gw.toml")
    assert str(info.value).startswith("gw.toml:10: gateway.run_dir: "), str(info.value)
    assert "system directory" in info.value.message


def test_run_dir_of_another_user_or_a_symlink_is_refused(tmp_path: Path) -> None:
    import dataclasses
    import os

    from sixgate.coordinator.gateway import prepare_run_dir

    base = parse_config(GOOD_6TO4, "gw.toml")
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(RuntimeError, match="a symlink"):
        prepare_run_dir(dataclasses.replace(base, run_dir=str(link)))
    if os.geteuid() == 0:
        other = tmp_path / "other"
        other.mkdir()
        os.chown(other, 4242, 4242)  # neither root nor [gateway] user (nobody)
        with pytest.raises(RuntimeError, match="owned by uid 4242"):
            prepare_run_dir(dataclasses.replace(base, run_dir=str(other)))
        # The gateway user's own, left by the last run's unprivileged coordinator: root
        # takes it back (mode 0700) before it cleans anything in it.
        previous = tmp_path / "previous"
        previous.mkdir()
        os.chown(previous, 65534, 65534)
        assert prepare_run_dir(dataclasses.replace(base, run_dir=str(previous))) == previous
        assert (previous.stat().st_uid, previous.stat().st_mode & 0o777) == (0, 0o700)
    assert prepare_run_dir(dataclasses.replace(base, run_dir=str(target))) == target
    (target / "coordinator.pid").unlink()


# --- the schema (coordinator/config.py SCHEMA) --------------------------------------------------

def test_readme_key_reference_is_the_schemas() -> None:
    """README.md "Every key" is generated from SCHEMA; a key added, renamed or re-documented
    without the README fails here (regenerate: .venv/bin/python -m sixgate.coordinator.config)."""
    from sixgate.coordinator.config import reference_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    begin, end = "<!-- config-reference: begin -->\n", "<!-- config-reference: end -->"
    assert begin in readme and end in readme
    assert readme.split(begin, 1)[1].split(end, 1)[0] == reference_markdown()


def test_every_schema_default_passes_its_own_check() -> None:
    from sixgate.coordinator.config import SCHEMA, _Ctx

    ctx = _Ctx("defaults", "")
    for key in SCHEMA:
        if key.check is not None:
            value = key.default_factory() if key.default_factory else key.default
            assert key.check(ctx, key.table, key.name, value) == value, key.name


def test_every_settings_field_a_file_can_set_is_a_schema_key() -> None:
    """No hidden knobs: every Settings field but what the coordinator derives is a key."""
    from dataclasses import fields

    from sixgate.coordinator.config import SCHEMA
    from sixgate.workers.engine.settings import Settings

    keys = ({key.name for key in SCHEMA} | {"timeouts", "forwards", "metrics_listen"}
            | {f"nat64_{key.name}" for key in SCHEMA if key.table == "nat64"}
            | {f"clat_{key.name}" for key in SCHEMA if key.table == "clat"}
            | {f"broker_{key.name}" for key in SCHEMA if key.table == "broker"}
            | {f"lan_{key.name}" for key in SCHEMA if key.table == "lan"}
            | {f"tunnel_{key.name}" for key in SCHEMA if key.table == "tunnel"}
            | {f"cluster_{key.name}" for key in SCHEMA if key.table == "cluster"})
    # 6rd: [tunnel] prefix (settings.prefix: delegated); tunnels: the further [[tunnel]]s
    derived = {"source_file", "sixrd_prefix", "tunnels"}
    assert {f.name for f in fields(Settings)} - derived <= keys


# --- NAT64 (issue 16) ----------------------------------------------------------------------------

NAT64 = """\
[nat64]
prefix = "64:ff9b::/96"
clients = ["2001:db8:100::/56"]
[[nat64.pool4]]
address = "203.0.113.5"
tcp = "61001-65535"
udp = "61001-65535"
icmp = "0-65535"
"""


def test_nat64_config_gives_a_nat64_gateway() -> None:
    settings = parse_config(NAT64, "n.toml")
    assert settings.mode == "nat64"
    assert settings.backend == "userspace" and settings.mtu == 1500
    assert settings.nat64_prefix == "64:ff9b::/96"
    assert settings.nat64_clients == ("2001:db8:100::/56",)
    assert settings.nat64_pool4 == (("203.0.113.5", "tcp", 61001, 65535),
                                    ("203.0.113.5", "udp", 61001, 65535),
                                    ("203.0.113.5", "icmp", 0, 65535))
    assert not settings.nat64_allow_non_global


@pytest.mark.parametrize(("old", "new", "where", "says"), [
    ('prefix = "64:ff9b::/96"', 'prefix = "2001:db8::/33"', "n.toml:2: nat64.prefix",
     "RFC 6052 §2.2"),
    ('prefix = "64:ff9b::/96"', 'prefix = "2001:db8:0:0:ff00::/96"', "n.toml:2: nat64.prefix",
     "bits 64 to 71 must be zero"),
    ('clients = ["2001:db8:100::/56"]\n', "", "nat64.clients", "everyone else is refused"),
    ('clients = ["2001:db8:100::/56"]', 'clients = ["2001:db8:100::1/56"]',
     "n.toml:3: nat64.clients", "host bits zero"),
    ('icmp = "0-65535"', 'icmp = "0-65535"\n[[nat64.pool4]]\naddress = "203.0.113.5"\n'
     'tcp = "65000-65100"', "n.toml:11: nat64.pool4[1].tcp", "overlaps entry 0"),
    ('tcp = "61001-65535"', 'tcp = "65535-61001"', "n.toml:6: nat64.pool4[0].tcp",
     "low first"),
    ('address = "203.0.113.5"', 'address = "224.0.0.1"', "n.toml:5: nat64.pool4[0].address",
     "multicast"),
    ('address = "203.0.113.5"', 'address = "203.0.113.5"\nsctp = "1-2"',
     "n.toml:6: nat64.pool4[0].sctp", "unknown key"),
    ('icmp = "0-65535"', 'icmp = "0-6"\n[gateway]\nworkers = 4', "nat64.pool4",
     "icmp 0-6 is too small to give each of 4 workers two ports"),
    ('prefix = "64:ff9b::/96"', 'prefix = "64:ff9b::/96"\ninput = "tunnel"',
     "n.toml:3: nat64.input", "needs a [tunnel] table"),
    ('[nat64]', '[[forward]]\nproto = "tcp"\nport = 80\nto = "127.0.0.1"\n[nat64]', "forward",
     "need a [tunnel]"),
])
def test_nat64_config_mistakes_name_the_place_and_the_fix(old: str, new: str, where: str,
                                                          says: str) -> None:
    assert old in NAT64
    with pytest.raises(ConfigError) as caught:
        parse_config(NAT64.replace(old, new, 1), "n.toml")
    assert where in str(caught.value) and says in str(caught.value)


GOOD_CLAT = """\
[clat]
plat_prefix = "64:ff9b::/96"
ipv6_address = "2001:db8:100::c1a7"
"""


def test_clat_defaults_one_worker_rfc7335_address_and_1260() -> None:
    settings = parse_config(GOOD_CLAT, "clat.toml")
    assert (settings.mode, settings.workers, settings.backend) == ("clat", 1, "userspace")
    assert (settings.clat_plat_prefix, settings.clat_ipv6_address, settings.clat_ipv4_address,
            settings.clat_mtu) == ("64:ff9b::/96", "2001:db8:100::c1a7", "192.0.0.1", 1260)
    auto = parse_config(GOOD_CLAT.replace('"64:ff9b::/96"', '"auto"').replace(
        'ipv6_address = "2001:db8:100::c1a7"\n', ""), "clat.toml")
    assert (auto.clat_plat_prefix, auto.clat_ipv6_address) == ("auto", "auto")


@pytest.mark.parametrize(("text", "key", "line", "advice"), [
    (GOOD_CLAT.replace('"2001:db8:100::c1a7"', '"c1a7"'), "clat.ipv6_address", 3,
     "or \"auto\""),
    (GOOD_CLAT.replace("2001:db8:100::c1a7", "fe80::1"), "clat.ipv6_address", 3, "unicast"),
    (GOOD_CLAT.replace("64:ff9b::/96", "64:ff9b::/80"), "clat.plat_prefix", 2, "RFC 6052"),
    (GOOD_CLAT + "[gateway]\nworkers = 2\n", "gateway.workers", 5, "one worker"),
    (GOOD_CLAT + "mtu = 9\n", "clat.mtu", 4, "576"),
    (GOOD_CLAT + '[tunnel]\nmode = "6to4"\n', "tunnel", 4, "second sixgate"),
])
def test_clat_mistakes_name_the_key(text: str, key: str, line: int | None, advice: str
                                    ) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "clat.toml")
    assert (info.value.key, info.value.line) == (key, line), str(info.value)
    assert advice in info.value.message, str(info.value)


def test_clat_beside_nat64_is_a_464xlat_box_whose_auto_prefix_is_its_own() -> None:
    box = parse_config(NAT64.replace("[[nat64.pool4]]", "egress_table = 100\n[[nat64.pool4]]")
                       + GOOD_CLAT.replace(
        '"64:ff9b::/96"', '"auto"'), "box.toml")
    assert (box.mode, box.clat_enabled, box.clat_plat_prefix, box.nat64_egress_table) == (
        "nat64", True, "64:ff9b::/96", 100)
    assert box.prefix == "64:ff9b::/96" and box.clat_ipv6_address == "2001:db8:100::c1a7"
    alone = parse_config(NAT64, "n.toml")
    assert (alone.clat_enabled, alone.nat64_egress_table) == (False, 0)
    assert parse_config(GOOD_CLAT, "clat.toml").clat_enabled


@pytest.mark.parametrize(("text", "key", "advice"), [
    (NAT64 + GOOD_CLAT + '[tunnel]\nmode = "6to4"\nlocal_ipv4 = "192.0.2.1"\n', "clat",
     "nothing to do"),
    (NAT64.replace("[[nat64.pool4]]", "egress_table = -1\n[[nat64.pool4]]") + GOOD_CLAT,
     "nat64.egress_table", "0"),
])
def test_464xlat_box_mistakes_name_the_key(text: str, key: str, advice: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "box.toml")
    assert info.value.key == key, str(info.value)
    assert advice in info.value.message, str(info.value)


# --- several tunnels (issue 19) ------------------------------------------------------------------

SEVERAL = """\
[[tunnel]]
name = "broker-a"
mode = "6in4"
local_ipv4 = "192.0.2.10"
remote_ipv4 = "198.51.100.1"
prefix = "2001:db8:1::/64"

[[tunnel]]
name = "broker-b"
mode = "6in4"
local_ipv4 = "192.0.2.10"
remote_ipv4 = "198.51.100.3"
prefix = "2001:db8:2::/64"
mtu = 1400

[[tunnel]]
mode = "6to4"
local_ipv4 = "192.0.2.10"
relay_ipv4 = "192.88.99.1"

[[forward]]
proto = "tcp"
port = 80
to = "127.0.0.1:8080"
"""


def test_several_tunnels_the_first_is_settings_own_the_rest_are_tunnels() -> None:
    settings = parse_config(SEVERAL, "gw.toml")
    assert (settings.tunnel_name, settings.mode, settings.remote_ipv4) == (
        "broker-a", "6in4", "198.51.100.1")
    assert [(t.name, t.mode, t.prefix, t.addresses) for t in settings.tunnels] == [
        ("broker-b", "6in4", "2001:db8:2::/64", ("2001:db8:2::1",)),
        ("6to4", "6to4", "2002:c000:20a::/48", ("2002:c000:20a::1",))]
    assert settings.backend == "userspace" and settings.engine_mtu == 1400
    assert parse_config(GOOD_6IN4, "gw.toml").tunnel_name == "6in4"  # the mode by default


@pytest.mark.parametrize(
    ("old", "new", "key", "line", "advice"),
    [
        ('name = "broker-b"', 'name = "broker-a"', "tunnel[1].name", 9, "its own name"),
        ('name = "broker-b"', 'name = "broker b"', "tunnel[1].name", 9, "letters, digits"),
        ('remote_ipv4 = "198.51.100.3"', 'remote_ipv4 = "198.51.100.1"',
         "tunnel[1].remote_ipv4", 12, "one tunnel per broker"),
        ('local_ipv4 = "192.0.2.10"\nrelay', 'local_ipv4 = "192.0.2.11"\nrelay',
         "tunnel[2].local_ipv4", 18, "shares the first one's local_ipv4"),
        ('prefix = "2001:db8:2::/64"', 'prefix = "2001:db8:1::/48"', "tunnel[1].prefix", 13,
         "overlaps tunnel 0"),
        ('relay_ipv4 = "192.88.99.1"', 'relay_ipv4 = "198.51.100.3"',
         "tunnel[1].remote_ipv4", 12, "relay too"),
        ("mtu = 1400", 'mtu = 1400\nuplink = "lo"', "tunnel[1].uplink", 15,
         "only the first tunnel"),
        ('mode = "6to4"\nlocal_ipv4 = "192.0.2.10"\nrelay_ipv4 = "192.88.99.1"\n',
         'mode = "6rd"\nlocal_ipv4 = "192.0.2.10"\nprefix = "2001:db8:8000::/33"\n'
         'border_relay_ipv4 = "203.0.113.1"\nipv4_mask_len = 5\n', "tunnel[2].mode", 16,
         "keep one"),
        ('[[forward]]', '[gateway]\nbackend = "kernel"\n\n[[forward]]', "gateway.backend",
         22, "userspace backend for now"),
        ('name = "broker-a"', 'name = "broker-a"\ncolour = "blue"', "tunnel[0].colour", 3,
         "unknown key"),
        ('name = "broker-a"', 'name = "broker-a"\nuplink = "lo"', "tunnel[0].uplink", 3,
         "a new address would be a new prefix"),
    ],
)
def test_several_tunnels_mistakes_name_the_table_and_the_fix(old: str, new: str, key: str,
                                                             line: int, advice: str) -> None:
    text = SEVERAL.replace(old, new, 1)
    if "6rd" in new:  # a second tunnel taking any source: the first is 6to4 then
        text = text.replace('mode = "6in4"', 'mode = "6to4"\nrelay_ipv4 = "192.88.99.1"', 1)
        text = text.replace('remote_ipv4 = "198.51.100.1"\nprefix = "2001:db8:1::/64"\n', "")
    with pytest.raises(ConfigError) as info:
        parse_config(text, "gw.toml")
    err = info.value
    assert (err.key, err.line) == (key, line), str(err)
    assert advice in err.message, str(err)


# --- a fleet behind ECMP (issue 20) ----------------------------------------------------------

CLUSTER = """
[cluster]
announce = ["192.0.2.10/32"]
local_as = 65001
peer_as = 65000
neighbors = ["198.51.100.1"]
router_id = "198.51.100.2"
"""


def test_cluster_table_parsed_with_defaults() -> None:
    settings = parse_config(GOOD_6TO4 + CLUSTER, "gw.toml")
    assert (settings.cluster_announce, settings.cluster_local_as, settings.cluster_peer_as,
            settings.cluster_neighbors, settings.cluster_router_id) == (
        ("192.0.2.10/32",), 65001, 65000, ("198.51.100.1",), "198.51.100.2")
    assert (settings.cluster_hold_time_s, settings.cluster_withdraw_after_s) == (30, 3.0)
    # A NAT64 fleet's prefix beside it, for the routers' IPv6 sessions.
    both = parse_config(GOOD_6TO4 + CLUSTER.replace('"192.0.2.10/32"', '"192.0.2.10/32", '
                                                    '"64:ff9b::/96"').replace(
        '["198.51.100.1"]', '["198.51.100.1", "2001:db8:ff::1"]'), "gw.toml")
    assert both.cluster_announce == ("192.0.2.10/32", "64:ff9b::/96")
    assert both.cluster_neighbors == ("198.51.100.1", "2001:db8:ff::1")


@pytest.mark.parametrize(
    ("old", "new", "key", "advice"),
    [
        ('announce = ["192.0.2.10/32"]', 'announce = ["192.0.2.10/24"]', "cluster.announce",
         "host bits zero"),
        ('announce = ["192.0.2.10/32"]', "announce = []", "cluster.announce", "non-empty"),
        ("local_as = 65001", "local_as = 0", "cluster.local_as", "1 to 4294967294"),
        ('router_id = "198.51.100.2"', 'router_id = "me"', "cluster.router_id",
         "IPv4 address"),
        ('neighbors = ["198.51.100.1"]\n', "", "cluster", "neighbors is missing"),
        ("peer_as = 65000", "peer_as = 65000\nhold_time_s = 1", "cluster.hold_time_s",
         "3 to 65535"),
        ('announce = ["192.0.2.10/32"]', 'announce = ["192.0.2.10/32", "64:ff9b::/96"]',
         "cluster.announce", "no neighbor has an IPv6 address"),
        ('neighbors = ["198.51.100.1"]', 'neighbors = ["2001:db8:ff::1"]', "cluster.announce",
         "no neighbor has an IPv4 address"),
        ('neighbors = ["198.51.100.1"]', 'neighbors = ["router1"]', "cluster.neighbors",
         "not an IPv4 or IPv6 address"),
    ],
)
def test_cluster_mistakes_name_the_key(old: str, new: str, key: str, advice: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(GOOD_6TO4 + CLUSTER.replace(old, new), "gw.toml")
    assert info.value.key == key and advice in info.value.message, str(info.value)
    assert info.value.line is not None


def test_cluster_announce_pool_adds_the_nodes_pool_and_pool4() -> None:
    """announce_pool: the node's share of the addresses services answer to (its pool, its
    pool4 addresses) is announced after what announce names, each once."""
    settings = parse_config(GOOD_6TO4.replace('"100.64.0.0/16"', '"100.64.1.0/24"') + CLUSTER
                            .replace("router_id", "announce_pool = true\nrouter_id"), "gw.toml")
    assert settings.cluster_announce == ("192.0.2.10/32", "100.64.1.0/24")
    assert settings.cluster_announce_pool
    import ipaddress

    from sixgate.coordinator.config import _pool_announced
    pool4 = (("203.0.113.5", "tcp", 61001, 65535), ("203.0.113.5", "udp", 61001, 65535))
    assert _pool_announced(("64:ff9b::/96",), "nat64", ipaddress.IPv4Network("100.64.0.0/16"),
                           pool4) == ("64:ff9b::/96", "203.0.113.5/32")
