"""Shared command-line plumbing for `scripts/`: config arguments and one-line user errors."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from llmkd.infra.artifacts import LlmkdError
from llmkd.infra.config import Config, load_config
from llmkd.infra.locks import WAIT_ENV
from llmkd.infra.paths import folder_or_nothing


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with --config and repeatable --set KEY=VALUE."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="YAML config (configs/*.yaml); defaults when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set distill.alpha=0 (repeatable)")
    p.add_argument("--recipe", default=None, metavar="YAML",
                   help="a distillation recipe (scripts/tune.py writes <out_dir>/tune/recipe.yaml), laid over --config")
    p.add_argument("--wait-lock", nargs="?", const="inf", default=None, metavar="SECONDS",
                   help="when another run is writing an artifact this run writes, wait for it (for SECONDS, or "
                        "as long as it takes) instead of stopping at once; sets LLMKD_WAIT_LOCK")
    return p


def config_from(args: argparse.Namespace) -> Config:
    """The config the arguments describe; `--wait-lock` goes to the environment, where every process of
    the run (workers, `accelerate launch` ranks) reads it (`llmkd.infra.locks`)."""
    if getattr(args, "wait_lock", None) is not None:
        os.environ[WAIT_ENV] = args.wait_lock
    cfg = load_config(args.config, args.overrides, args.recipe)
    folder_or_nothing(cfg.out_dir, "out_dir")  # a file there would fail deep in mkdir
    return cfg


def run(main: Callable[[], object]) -> None:
    """Run `main`; a user error (LlmkdError) prints one line to stderr and exits 2, no traceback."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main()
    except LlmkdError as e:
        report_error(f"error: {e}")
        sys.exit(2)


ERROR_FILE_ENV = "LLMKD_ERROR_FILE"
"""Set by the `llmkd` launcher (`llmkd.commands`): each process appends its error line to this file and the
launcher prints each distinct line once, so N ranks meeting the same bad config give one line, not N."""


def report_error(line: str) -> None:
    """Print a user error to stderr, or hand it to the `llmkd` launcher when one started this process."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    else:
        print(line, file=sys.stderr)
