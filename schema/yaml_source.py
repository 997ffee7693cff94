"""Read a YAML config into plain data plus the line/column of every key, for error messages.

PyYAML is strict YAML 1.1, which reads `2e-4` as a *string* and silently keeps the last of two equal
keys. Users write `learning_rate: 2e-4` and copy-paste blocks, so this loader reads exponent floats
as floats and rejects duplicate keys. It also refuses what no config needs and would only exhaust the
reader: files that are not regular files or exceed MAX_CONFIG_BYTES, nesting deeper than MAX_DEPTH,
recursive aliases (`a: &x [*x]`) and aliases that expand to more than MAX_NODES values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from surogate.errors import ConfigError, ConfigIssue, UserError
from surogate.schema.paths import format_path

MAX_CONFIG_BYTES = 16 * 1024 * 1024  # a config is a few kB; this is a runaway file, not a config
MAX_DEPTH = 64  # options nest a few levels (datasets[i].x, rope_scaling.x); deeper is not a config
MAX_NODES = 1_000_000  # values after alias expansion ("billion laughs" stays bounded)

Position = tuple[int, int]  # 1-based line, column
PathKey = tuple[Any, ...]  # e.g. ("datasets", 1, "instruction_field")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4`-style floats (YAML 1.2 behaviour)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class YamlDocument:
    """A parsed config: its data, where it came from, and the position of every key."""

    data: Any
    source: str
    positions: dict[PathKey, Position]

    def position(self, path: PathKey) -> Position | None:
        """Position of `path`, or of its nearest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.positions:
                return self.positions[path]
            path = path[:-1]
        return self.positions.get(())


class _Walk:
    """What `_construct` tracks across the whole document: nodes built so far, nodes on the current path."""

    def __init__(self) -> None:
        self.count = 0
        self.open: set[int] = set()


def _construct(node: yaml.Node, loader: _Loader, path: PathKey, positions: dict, source: str, walk: _Walk) -> Any:
    positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    walk.count += 1
    if walk.count > MAX_NODES:
        raise _issue(source, node, format_path(path), f"more than {MAX_NODES} values (aliases expanding too far?)")
    if not isinstance(node, yaml.CollectionNode):
        return loader.construct_object(node, deep=True)
    if id(node) in walk.open:
        raise _issue(source, node, format_path(path), "recursive alias: the value contains itself")
    if len(path) >= MAX_DEPTH:
        raise _issue(source, node, format_path(path), f"nested more than {MAX_DEPTH} levels deep")
    walk.open.add(id(node))
    try:
        if isinstance(node, yaml.SequenceNode):
            return [
                _construct(item, loader, path + (i,), positions, source, walk) for i, item in enumerate(node.value)
            ]
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.CollectionNode):
                raise _issue(source, key_node, format_path(path), "keys must be plain names, got a list or mapping")
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                raise _issue(source, key_node, format_path(path), f"keys must be plain names, got {key!r}")
            if key in out:
                first = positions[path + (key,)]
                raise _issue(
                    source, key_node, format_path(path + (key,)), f"duplicate key (first given at line {first[0]})"
                )
            positions[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = _construct(value_node, loader, path + (key,), positions, source, walk)
            # The key's own position is more useful than the value's for error messages.
            positions[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        return out
    finally:
        walk.open.discard(id(node))


def _issue(source: str, node: yaml.Node, field: str, message: str) -> ConfigError:
    mark = node.start_mark
    return ConfigError(
        [ConfigIssue(field, message, line=mark.line + 1, column=mark.column + 1, source=source)]
    )


def parse_yaml(text: str, source: str = "<string>") -> YamlDocument:
    """Parse YAML text; syntax errors become a ConfigError naming file, line and column."""
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:  # PyYAML composes nodes recursively
            mark = loader.get_mark()
            message = f"nested more than {MAX_DEPTH} levels deep; not a config"
            raise ConfigError(
                [ConfigIssue("", message, line=mark.line + 1, column=mark.column + 1, source=source)]
            ) from None
        if node is None:
            raise ConfigError([ConfigIssue("", "the file is empty; expected a mapping of options", source=source)])
        positions: dict[PathKey, Position] = {}
        data = _construct(node, loader, (), positions, source, _Walk())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = " ".join(str(x) for x in (exc.context, exc.problem) if x)
        issue = ConfigIssue(
            "",
            f"YAML syntax error: {what}",
            line=mark.line + 1 if mark else None,
            column=mark.column + 1 if mark else None,
            source=source,
        )
        raise ConfigError([issue]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue("", f"YAML error: {exc}", source=source)]) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        kind = type(data).__name__ if data is not None else "null"
        raise ConfigError(
            [ConfigIssue("", f"the top level must be a mapping of options, got a {kind}", line=1, column=1, source=source)]
        )
    return YamlDocument(data=data, source=source, positions=positions)


def read_yaml(path: str | Path) -> YamlDocument:
    """Read and parse a config file; a missing or unreadable file is a UserError naming it."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such config file")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, expected a YAML config file")
    if not p.is_file():  # /dev/zero, a FIFO, a terminal: reading would never end or block
        raise UserError(f"{p}: not a regular file, expected a YAML config file")
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise UserError(f"{p}: larger than {MAX_CONFIG_BYTES} bytes; not a YAML config file")
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{p}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{p}: cannot read ({exc.strerror})") from None
    return parse_yaml(text, source=str(p))
