"""Read a YAML config into plain data plus the line/column of every key, for error messages.

PyYAML is strict YAML 1.1, which reads `2e-4` as a *string* and silently keeps the last of two equal
keys. Users write `learning_rate: 2e-4` and copy-paste blocks, so this loader reads exponent floats
as floats and rejects duplicate keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from surogate.errors import ConfigError, ConfigIssue, UserError
from surogate.schema.paths import format_path

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


def _construct(node: yaml.Node, loader: _Loader, path: PathKey, positions: dict, source: str) -> Any:
    positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                raise _issue(source, key_node, format_path(path), f"keys must be plain names, got {key!r}")
            if key in out:
                first = positions[path + (key,)]
                raise _issue(
                    source, key_node, format_path(path + (key,)), f"duplicate key (first given at line {first[0]})"
                )
            positions[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = _construct(value_node, loader, path + (key,), positions, source)
            # The key's own position is more useful than the value's for error messages.
            positions[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _construct(item, loader, path + (i,), positions, source) for i, item in enumerate(node.value)
        ]
    return loader.construct_object(node, deep=True)


def _issue(source: str, node: yaml.Node, field: str, message: str) -> ConfigError:
    mark = node.start_mark
    return ConfigError(
        [ConfigIssue(field, message, line=mark.line + 1, column=mark.column + 1, source=source)]
    )


def parse_yaml(text: str, source: str = "<string>") -> YamlDocument:
    """Parse YAML text; syntax errors become a ConfigError naming file, line and column."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError([ConfigIssue("", "the file is empty; expected a mapping of options", source=source)])
        positions: dict[PathKey, Position] = {}
        data = _construct(node, loader, (), positions, source)
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
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{p}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{p}: cannot read ({exc.strerror})") from None
    return parse_yaml(text, source=str(p))
