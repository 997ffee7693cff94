"""`surogate tokenize CONFIG`: tokenize and pack the config's datasets into the cache, print statistics."""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="training config (YAML)")
    parser.add_argument("--rank", type=int, default=0,
                        help="node rank: selects distributed.worker_output_dir/node-{rank} (default 0)")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="count and report malformed rows instead of stopping at the first one")
    parser.add_argument("--no-cache", action="store_true", help="tokenize even if a cached copy exists")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from surogate.schema import load_config

    from .pipeline import prepare_datasets
    from .stats import render_stats
    from .tokenizer import load_tokenizer

    console = Console()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config, warn=True)
    tokenizer = load_tokenizer(cfg)
    data = prepare_datasets(cfg, tokenizer, rank=args.rank, on_bad_row="skip" if args.skip_bad_rows else "error",
                            use_cache=not args.no_cache)
    render_stats(data.stats, console)
    return 0
