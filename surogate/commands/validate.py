"""`surogate validate CONFIG...`: exit 0 when every config is valid, else exit 2 listing every error."""

from __future__ import annotations

import argparse
import json
import sys

from surogate.errors import ConfigIssue, UserError
from surogate.schema import ValidationResult, validate_file
from surogate.schema.rules import Notice


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML config file(s)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (for CI systems)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print errors only")


NO_DATASETS = ("none given: `surogate plan` works without data; `surogate sft` / `pt` refuse to train (they need "
               "at least one dataset)")


def _validate(path: str) -> ValidationResult:
    try:
        result = validate_file(path)
    except UserError as exc:  # missing / unreadable file: report it like any other error
        return ValidationResult(source=path, errors=[ConfigIssue("", str(exc).removeprefix(f"{path}: "), source=path)])
    # said here, not by a rule: `plan` shares the rules and needs no data, a CI check of a training config does
    if result.config is not None and not result.config.datasets:
        result.notices.append(Notice("warning", "datasets", NO_DATASETS))
    return result


def run(args: argparse.Namespace) -> int:
    results = [_validate(p) for p in args.configs]
    if args.json:
        print(
            json.dumps(
                {
                    "valid": all(r.ok for r in results),
                    "files": [
                        {
                            "file": r.source,
                            "valid": r.ok,
                            "errors": [e.to_json() for e in r.errors],
                            "warnings": [{"path": n.path, "message": n.message} for n in r.notices if n.kind == "warning"],
                            "requirements": [n.message for n in r.notices if n.kind == "requirement"],
                        }
                        for r in results
                    ],
                },
                indent=2,
            )
        )
    else:
        for r in results:
            _print_human(r, quiet=args.quiet)
    return 0 if all(r.ok for r in results) else 2


def _print_human(r: ValidationResult, quiet: bool) -> None:
    if r.ok:
        if not quiet:
            print(f"{r.source}: valid")
    else:
        print(f"{r.source}: {len(r.errors)} error(s)", file=sys.stderr)
        for e in r.errors:
            print(f"  {e}", file=sys.stderr)
    if quiet:
        return
    for n in r.notices:
        print(f"  warning: {n}" if n.kind == "warning" else f"  requires: {n.message}")
