"""`surogate` command line: one sub-command per module, dispatched lazily.

Each command's engine lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`.
A command whose module is not there yet says so and exits 3; it never pretends. User errors
(`UserError`) print a clear message and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from types import ModuleType

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("surogate.commands.validate", "check configs against the schema and the cross-field rules"),
    "schema": ("surogate.commands.schema", "print the config JSON Schema (for editor completion) or its docs"),
    "plan": ("surogate.compiler.cli", "compile a config: memory plan per device and host, optional plan.bin"),
    "run": ("surogate.runtime.cli_run", "execute a compiled plan.bin"),
    "sft": ("surogate.runtime.cli_sft", "supervised fine-tuning: plan + run in one step"),
    "pt": ("surogate.runtime.cli_pt", "pre-training: plan + run in one step"),
    "tokenize": ("surogate.runtime.data.cli", "tokenize and pack the datasets of a config into the cache; print statistics"),
    "plot": ("surogate.runtime.observe.cli", "draw the loss / learning-rate plot from a JSONL training log"),
}


def _exists(module_name: str) -> bool:
    """Whether a command module is present, without importing it (keeps `surogate --help` fast)."""
    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:
        return False


def _load(module_name: str) -> ModuleType | None:
    """Import a command module; None when that module (not one of its dependencies) does not exist."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            return None
        raise


def build_parser(chosen: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, ModuleType | None]]:
    """The full parser; only the `chosen` command's module is imported (engines import torch)."""
    from surogate import __version__

    parser = argparse.ArgumentParser(
        prog="surogate",
        description="Train causal language models from one YAML file: validate, plan memory, run.",
    )
    parser.add_argument("--version", action="version", version=f"surogate {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, ModuleType | None] = {}
    for name, (module_name, help_text) in COMMANDS.items():
        present = _exists(module_name)
        shown = help_text if present else f"{help_text} (not available yet)"
        sub = subparsers.add_parser(name, help=shown, description=shown)
        module = _load(module_name) if present and name == chosen else None
        modules[name] = module
        if module is not None:
            module.add_arguments(sub)
        else:
            sub.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    from surogate.errors import UserError

    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser, modules = build_parser(chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = modules[args.command]
    if module is None:
        print(
            f"surogate {args.command}: not available yet in this version "
            f"(its engine, {COMMANDS[args.command][0]}, has not landed).",
            file=sys.stderr,
        )
        return 3
    from surogate.closed_stdout import EXIT_CODE, detach_stdout, is_closed_pipe

    try:
        return int(module.run(args) or 0)
    except OSError as exc:  # `surogate plan x.yaml | head`: the reader left; stop quietly, no traceback
        if not is_closed_pipe(exc):
            raise
        detach_stdout()
        return EXIT_CODE
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # stop_signals.Interrupted carries SIGTERM's number too
        import signal

        from surogate.runtime.stop_signals import exit_code, signal_of

        signum = signal_of(exc)
        try:
            print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        except OSError:  # the terminal hung up (SIGHUP): the exit code still says what happened
            pass
        return exit_code(signum)


if __name__ == "__main__":
    sys.exit(main())
