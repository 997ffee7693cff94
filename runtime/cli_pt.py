"""`surogate pt CONFIG`: pre-training (raw text, loss on every token), plan + run in one step."""

from __future__ import annotations

import argparse
from typing import Any

from surogate.errors import UserError
from surogate.runtime.cli_common import add_config_argument, load_with_overrides, print_result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)


def run(args: argparse.Namespace) -> int:
    from surogate.runtime.session import run_training

    cfg = load_with_overrides(args.config, args.max_steps)
    check_text_only(cfg)
    return print_result(run_training(cfg))


def check_text_only(cfg: Any) -> None:
    """Every training and validation dataset is raw text: pre-training trains on every token, and instruction or
    conversation data would be trained on their answers only (`type: auto` is resolved from the data: it trained
    conversation files with assistant-only masks)."""
    from surogate.runtime.data.pipeline import detected_type

    for section in ("datasets", "validation_datasets"):
        for i, ds in enumerate(getattr(cfg, section, None) or ()):
            if ds.type not in ("text", "auto"):
                raise UserError(f"{section}[{i}].type: pre-training reads raw text (`type: text`), got {ds.type!r}; "
                                "use `surogate sft` for instruction or conversation data")
            found = detected_type(ds, i, section) if ds.type == "auto" else "text"
            if found != "text":
                raise UserError(f"{section}[{i}].type: auto detects {found} data in {ds.path!r}; pre-training reads "
                                "raw text (`type: text`); use `surogate sft` for "
                                "instruction or conversation data")
