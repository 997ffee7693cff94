"""Field paths as users write them: `datasets[1].instruction_field`, `distributed.num_nodes`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def format_path(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
