"""``deploy/rollout.toml``: what to roll out, in which batches, how to judge a host, what to do
when one fails.

Batches follow Ansible's ``serial`` exactly (``batches`` below is its algorithm, so ``sixgate
deploy plan`` shows what ``ansible-playbook`` will do): each entry is a host count or a
percentage of the hosts in the play, the last entry repeats until every host had its turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sixgate.deploy.source import KeyPath, TomlSource, load_toml, reject_unknown, table_at

# PEP 427: {distribution}-{version}(-{build})?-{python}-{abi}-{platform}.whl
WHEEL_NAME = re.compile(r"(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl")
VERSION = re.compile(r"[0-9][A-Za-z0-9.+!_-]*")
ON_FAILURE = ("batch", "host", "none")
T = TypeVar("T")


@dataclass(frozen=True)
class Rollout:
    """A validated rollout plan."""

    source: TomlSource
    version: str
    wheel: Path | None  # the release's wheel (None only for a rollback, which installs nothing)
    wheelhouse: Path
    serial: tuple[int | str, ...]
    max_fail_percentage: int
    timeout_s: int
    readyz: bool
    ping: bool
    ping_count: int
    on_failure: str

    @property
    def file(self) -> str:
        return self.source.file


def pct_to_int(value: int | str, total: int) -> int:
    """Ansible's ``pct_to_int``: "25%" of ``total`` rounded down but at least 1; ints as is."""
    if isinstance(value, str) and value.endswith("%"):
        return int(int(value[:-1]) / 100.0 * total) or 1
    return int(value)


def batches(hosts: list[str], serial: tuple[int | str, ...]) -> list[list[str]]:
    """The batches ``ansible-playbook`` runs for ``serial`` (its ``_get_serialized_batches``)."""
    remaining = list(hosts)
    plan: list[list[str]] = []
    item = 0
    while remaining:
        size = pct_to_int(serial[item] if serial else -1, len(hosts))
        if size <= 0:
            plan.append(remaining)
            break
        plan.append(remaining[:size])
        remaining = remaining[size:]
        item = min(item + 1, len(serial) - 1)
    return plan


def _typed(source: TomlSource, table: dict[str, Any], path: KeyPath, key: str, kind: type[T],
           default: T, what: str) -> T:
    value = table.get(key, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise source.error((*path, key), f"{value!r} must be {what}")
    return value


def _serial(source: TomlSource, value: Any) -> tuple[int | str, ...]:
    path: KeyPath = ("batches", "serial")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise source.error(path, "must list at least one batch size, like [1, \"25%\", \"100%\"]")
    serial: list[int | str] = []
    for index, item in enumerate(items):
        where = (*path, index) if isinstance(value, list) else path
        if isinstance(item, int) and not isinstance(item, bool) and item >= 1:
            serial.append(item)
        elif isinstance(item, str) and re.fullmatch(r"\d+%", item) and 0 < int(item[:-1]) <= 100:
            serial.append(item)
        else:
            raise source.error(where, f"{item!r} must be a host count (1 or more) or a whole "
                               "percentage of the hosts like \"25%\"")
    return tuple(serial)


def load_rollout(path: str, need_release: bool = True) -> Rollout:
    """Read and validate a rollout file; ConfigError naming file, line and key.

    ``need_release=False`` (``sixgate deploy rollback``) skips [release]: a rollback needs only
    the batches and the health gate, and must work when the release's wheel is gone.
    """
    source = load_toml(path, "rollout")
    doc = source.doc
    reject_unknown(source, doc, (), {"release", "batches", "health", "on_failure"})
    release = table_at(source, doc, "release")
    reject_unknown(source, release, ("release",), {"version", "wheel", "wheelhouse"})
    version, wheel, wheelhouse = ("", None, source.directory)
    if need_release:
        version, wheel, wheelhouse = _release_files(source, release)
    batches_table = table_at(source, doc, "batches")
    reject_unknown(source, batches_table, ("batches",), {"serial", "max_fail_percentage"})
    max_fail = _typed(source, batches_table, ("batches",), "max_fail_percentage", int, 0,
                      "a whole number from 0 to 100")
    if not 0 <= max_fail <= 100:
        raise source.error(("batches", "max_fail_percentage"), f"{max_fail} must be from 0 "
                           "(any failed host stops the rollout) to 100")
    health = table_at(source, doc, "health")
    reject_unknown(source, health, ("health",), {"timeout_s", "readyz", "ping", "ping_count"})
    timeout_s = _typed(source, health, ("health",), "timeout_s", int, 60,
                       "whole seconds from 5 to 3600")
    if not 5 <= timeout_s <= 3600:
        raise source.error(("health", "timeout_s"), f"{timeout_s} must be from 5 to 3600 "
                           "seconds")
    ping_count = _typed(source, health, ("health",), "ping_count", int, 3, "from 1 to 100")
    if not 1 <= ping_count <= 100:
        raise source.error(("health", "ping_count"), f"{ping_count} must be from 1 to 100")
    on_failure = table_at(source, doc, "on_failure")
    reject_unknown(source, on_failure, ("on_failure",), {"rollback"})
    rollback = on_failure.get("rollback", "batch")
    if rollback not in ON_FAILURE:
        raise source.error(("on_failure", "rollback"), f"{rollback!r} must be \"batch\" (the "
                           "failed host's whole batch goes back), \"host\" or \"none\"")
    return Rollout(
        source=source, version=version, wheel=wheel, wheelhouse=wheelhouse,
        serial=_serial(source, batches_table.get("serial", ["100%"])),
        max_fail_percentage=max_fail, timeout_s=timeout_s,
        readyz=_typed(source, health, ("health",), "readyz", bool, True, "true or false"),
        ping=_typed(source, health, ("health",), "ping", bool, True, "true or false"),
        ping_count=ping_count, on_failure=rollback)


def _release_files(source: TomlSource, release: dict[str, Any]) -> tuple[str, Path | None, Path]:
    """(version, wheel or None, wheelhouse) from [release], each checked on this controller."""
    version, wheel = _release(source, release)
    wheelhouse_text = _typed(source, release, ("release",), "wheelhouse", str, "",
                             "the directory of wheels (sixgate's dependencies, and releases)")
    if not wheelhouse_text:
        raise source.error(("release", "wheelhouse"), "missing; build one with `sixgate deploy "
                           "build --out DIR` and name DIR here")
    wheelhouse = source.resolve(wheelhouse_text)
    if not wheelhouse.is_dir():
        raise source.error(("release", "wheelhouse"), f"{str(wheelhouse)!r} is not a directory "
                           "on this controller; build it with `sixgate deploy build --out DIR`")
    if wheel is None:
        # Exactly this version: sixgate-0.1.0-*.whl is not sixgate-0.1.0+hotfix-*.whl (hosts
        # install the wheel file itself, since pip's "==0.1.0" would also take 0.1.0+hotfix).
        found = sorted(wheelhouse.glob(f"sixgate-{version}-*.whl"))
        if not found:
            raise source.error(("release", "version"), f"no sixgate-{version}-*.whl in "
                               f"{str(wheelhouse)!r}; build it, or name the wheel with "
                               "release.wheel")
        wheel = found[-1]
    return version, wheel, wheelhouse


def _release(source: TomlSource, release: dict[str, Any]) -> tuple[str, Path | None]:
    """(version, wheel file or None) from [release]: exactly one of ``wheel``/``version``."""
    if ("wheel" in release) == ("version" in release):
        raise source.error(("release",), "name exactly one of wheel = \"dist/sixgate-...whl\" "
                           "(a wheel built from this checkout) or version = \"0.1.0\" (found "
                           "in the wheelhouse)")
    if "version" in release:
        version = release["version"]
        if not isinstance(version, str) or not VERSION.fullmatch(version):
            raise source.error(("release", "version"), f"{version!r} must be a version string "
                               "like \"0.1.0\"")
        return version, None
    text = release["wheel"]
    if not isinstance(text, str):
        raise source.error(("release", "wheel"), "must be the path of a .whl file")
    wheel = source.resolve(text)
    match = WHEEL_NAME.fullmatch(wheel.name)
    if not match or match.group("name") != "sixgate":
        raise source.error(("release", "wheel"), f"{wheel.name!r} is not a sixgate wheel "
                           "(sixgate-VERSION-TAGS.whl, as `sixgate deploy build` "
                           "writes it)")
    if not wheel.is_file():
        raise source.error(("release", "wheel"), f"{str(wheel)!r} does not exist on this "
                           "controller; build it with `sixgate deploy build`")
    return match.group("version"), wheel
