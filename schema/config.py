"""The typed, immutable config object, generated from the schema's properties.

`TrainConfig`, `DatasetConfig` and `DistributedConfig` are frozen dataclasses whose fields (names,
types, defaults, docs) are read from `config.schema.json`; there is no second hand-written list.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Optional

from surogate.schema.source import dataset_properties, default_of, distributed_properties, properties

_PY_TYPES = {"string": str, "integer": int, "number": float, "boolean": bool, "array": tuple, "object": dict}


class FrozenDict(dict):
    """A read-only dict (for mapping options such as `message_property_mappings`)."""

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("config mappings are read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]

    def __reduce__(self):
        return (FrozenDict, (dict(self),))

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


def _annotation(prop: dict[str, Any]) -> Any:
    types = prop.get("type")
    if types is None and "anyOf" in prop:
        types = [b.get("type", "string") for b in prop["anyOf"]]
    if types is None and "$ref" in prop:
        return Any
    types = [types] if isinstance(types, str) else list(types or ["string"])
    py = [_PY_TYPES[t] for t in types if t != "null"]
    ann: Any = py[0] if len(py) == 1 else Any
    return Optional[ann] if "null" in types else ann  # noqa: UP045 - typing object built at run time


def _make_class(name: str, props: dict[str, Any], doc: str) -> type:
    fields = []
    for key, prop in props.items():
        default = _freeze(default_of(prop))
        fields.append((key, _annotation(prop), dataclasses.field(default=default)))
    cls = dataclasses.make_dataclass(name, fields, frozen=True, namespace={"to_dict": _to_dict, "__doc__": doc})
    cls.__module__ = __name__  # so instances pickle (datasets' worker processes receive configs)
    setattr(sys.modules[__name__], name, cls)
    return cls


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return FrozenDict({k: _freeze(v) for k, v in value.items()})
    return value


def _thaw(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    return value


def _to_dict(self) -> dict[str, Any]:
    """Plain JSON-able dict of every option (lists for tuples, dicts for nested configs)."""
    return {f.name: _thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}


DatasetConfig = _make_class("DatasetConfig", dataset_properties(), "One entry of `datasets` / `validation_datasets`.")
DistributedConfig = _make_class("DistributedConfig", distributed_properties(), "The `distributed` block (multi-node).")
TrainConfig = _make_class(
    "TrainConfig", properties(), "A validated training config; attribute names are the options of the reference."
)

_NESTED = {"distributed": DistributedConfig}
_LISTS_OF = {"datasets": DatasetConfig, "validation_datasets": DatasetConfig}


def _coerce(prop: dict[str, Any], value: Any) -> Any:
    """Make numbers match their declared type (YAML `2` for a float option, `2.0` for an int one)."""
    types = prop.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    if value is None or isinstance(value, bool):
        return value
    if "integer" in types and isinstance(value, float) and value.is_integer():
        return int(value)
    if "number" in types and "integer" not in types and isinstance(value, int):
        return float(value)
    return value


def build_config(resolved: dict[str, Any]) -> Any:
    """Turn a validated dict with defaults applied into a `TrainConfig`."""
    top = properties()
    kwargs: dict[str, Any] = {}
    for key, prop in top.items():
        value = resolved.get(key, default_of(prop))
        if key in _NESTED:
            sub = distributed_properties()
            value = _NESTED[key](**{k: _coerce(p, (value or {}).get(k, default_of(p))) for k, p in sub.items()})
        elif key in _LISTS_OF and value is not None:
            ds_props = dataset_properties()
            value = tuple(
                DatasetConfig(**{k: _freeze(_coerce(p, item.get(k, default_of(p)))) for k, p in ds_props.items()})
                for item in value
            )
        else:
            value = _freeze(_coerce(prop, value))
        kwargs[key] = value
    return TrainConfig(**kwargs)
