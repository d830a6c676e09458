"""A TOML file of ``sixgate deploy`` with the line of every key, for errors that point at it.

Every mistake in an inventory or rollout file becomes a ``ConfigError(file, key path, line,
what to do)``, the same error the gateway's own config raises, before any host is touched.
tomli gives no positions, so the lines come from a small scan of the text: table headers and
``key =`` lines (dotted and quoted keys included); a key inside an inline table or a multi-line
array is reported at the line of the nearest enclosing key that has one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli

from sixgate.coordinator.config import ConfigError

KeyPath = tuple[str | int, ...]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_HEADER = re.compile(r"^\s*\[(\[)?(.*?)\]\]?\s*(#.*)?$")
_ASSIGNMENT = re.compile(r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')"
                         r"(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=")


def split_key(text: str) -> list[str]:
    """``a."b.c".d`` -> ["a", "b.c", "d"] (TOML dotted keys, quotes removed)."""
    parts: list[str] = []
    for match in re.finditer(r"\"([^\"]*)\"|'([^']*)'|([A-Za-z0-9_-]+)", text):
        parts.append(next(group for group in match.groups() if group is not None))
    return parts


def format_path(path: KeyPath) -> str:
    """("hosts", "edge1", "forward", 0, "to") -> ``hosts.edge1.forward[0].to``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if _BARE_KEY.fullmatch(part) else f'"{part}"'
            text += f".{name}" if text else name
    return text


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """First line (1-based) of every table header and ``key =`` line, by full key path.

    Arrays of tables (``[[name]]``) are numbered: the second ``[[forward]]`` is ("forward", 1).
    """
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    array_counts: dict[tuple[str, ...], int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header and not _ASSIGNMENT.match(line):
            table = tuple(split_key(header.group(2)))
            if header.group(1):
                index = array_counts.get(table, -1) + 1
                array_counts[table] = index
                lines.setdefault(table, number)
                table = (*table, str(index))
            lines.setdefault(table, number)
            continue
        assignment = _ASSIGNMENT.match(line)
        if assignment:
            lines.setdefault((*table, *split_key(assignment.group(1))), number)
    return lines


@dataclass
class TomlSource:
    """One parsed TOML file: its path (as the user named it), text, document and key lines."""

    file: str
    text: str
    doc: dict[str, Any]
    directory: Path
    lines: dict[tuple[str, ...], int] = field(default_factory=dict)

    def line_of(self, path: KeyPath) -> int | None:
        """The line of ``path``, else of its nearest parent that has a line of its own."""
        parts = tuple(str(part) for part in path)
        while parts:
            if parts in self.lines:
                return self.lines[parts]
            parts = parts[:-1]
        return None

    def error(self, path: KeyPath, message: str) -> ConfigError:
        """A ConfigError naming this file, the key path and its line."""
        return ConfigError(self.file, format_path(path), self.line_of(path), message)

    def resolve(self, value: str) -> Path:
        """A path written in this file: ``~`` expanded, relative to the file's directory."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.directory / path


def load_toml(path: str | Path, what: str) -> TomlSource:
    """Read and parse a TOML file; unreadable or invalid files are a ConfigError too."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, "", None, f"cannot read the {what} ({exc.strerror}); check "
                          "the path") from None
    try:
        doc = tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        line: int | None = getattr(exc, "lineno", None)  # tomli >= 2.1
        raise ConfigError(file, "", line, f"not valid TOML ({exc}); fix the syntax") from None
    return TomlSource(file, text, doc, Path(path).resolve().parent, key_lines(text))


def reject_unknown(source: TomlSource, table: dict[str, Any], path: KeyPath,
                   allowed: set[str] | frozenset[str]) -> None:
    """ConfigError for the first key of ``table`` that is not in ``allowed``."""
    for key in table:
        if key not in allowed:
            raise source.error((*path, key), "unknown key; allowed here: "
                               f"{', '.join(sorted(allowed))}")


def table_at(source: TomlSource, doc: dict[str, Any], key: str,
             path: KeyPath = ()) -> dict[str, Any]:
    """``doc[key]`` when it is a table (empty when absent); ConfigError when it is not."""
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise source.error((*path, key), f"must be a table ([{format_path((*path, key))}])")
    return value
