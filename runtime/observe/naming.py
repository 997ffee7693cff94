"""Run naming and config serialisation shared by the console, the log file and the trackers."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import os
from collections.abc import Mapping


def model_basename(model: str) -> str:
    """'Qwen/Qwen3-0.6B' -> 'Qwen3-0.6B'; '/ckpt/my-model/' -> 'my-model'."""
    name = os.path.basename(str(model).rstrip("/\\")) or "model"
    return name.replace(" ", "_")


def resolve_run_name(cfg: object, now: _dt.datetime | None = None) -> str:
    """`cfg.run_name`, or `<model-basename>-<YYYYmmdd-HHMMSS>` when it is unset (the config's "auto")."""
    name = getattr(cfg, "run_name", None)
    if name:
        return str(name)
    now = now or _dt.datetime.now()
    return f"{model_basename(getattr(cfg, 'model', 'model'))}-{now:%Y%m%d-%H%M%S}"


def jsonable(value: object) -> object:
    """Convert config values (dataclasses, tuples, enums, paths) to JSON-compatible data."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if hasattr(value, "__dict__"):
        return {k: jsonable(v) for k, v in vars(value).items() if not k.startswith("_")}
    return str(value)


def config_dict(cfg: object) -> dict:
    """The whole config as a JSON-compatible dict (what trackers record as hyper-parameters)."""
    data = jsonable(cfg)
    return data if isinstance(data, dict) else {"config": data}


def report_targets(cfg: object) -> tuple[str, ...]:
    """`report_to` normalised to a tuple: None -> (), 'wandb' -> ('wandb',)."""
    value = getattr(cfg, "report_to", None)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)
