"""``python -m tools.tiny_models DIR_ROOT``: build every family (or ``--only`` some) under it."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tools.tiny_models import EXTRA_FAMILIES, FAMILIES, build


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.tiny_models",
        description="Build tiny random-weight vision-language models, one per family.",
    )
    parser.add_argument("root", type=Path, help="directory to build tiny-<name> folders in")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=FAMILIES + EXTRA_FAMILIES,
        metavar="NAME",
        help=f"families to build (default: {' '.join(FAMILIES)}; also: {' '.join(EXTRA_FAMILIES)})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    parser.add_argument("--force", action="store_true", help="rebuild existing models")
    args = parser.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-shard progress bar is only noise in build logs

    status = 0
    for name in args.only or FAMILIES:
        start = time.monotonic()
        try:
            path = build(name, args.root / f"tiny-{name}", force=args.force, seed=args.seed)
        except FileExistsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"{name}: {path} ({time.monotonic() - start:.1f} s)", file=sys.stderr)
        print(path)
    return status


if __name__ == "__main__":
    sys.exit(main())
