"""`space`: the size of a template grid and its variants (config/space.py builds them).

    python -m fractal_mlops.space [--config PATH] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fractal_mlops.cli import add_config_flag, parser, run_command
from fractal_mlops.config.experiment import DIMENSIONS, ExperimentConfig, load_config
from fractal_mlops.config.space import Variant, grid
from fractal_mlops.errors import EXIT_OK


def main(argv: list[str] | None = None) -> int:
    p = parser("space", "Print the size and the variants of a template grid.")
    add_config_flag(p)
    p.add_argument("--json", action="store_true", help="print the variants as a JSON list")
    args = p.parse_args(argv)
    return run_command(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    variants = grid(config)
    try:
        print_variants(config, variants, as_json=args.json)
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def print_variants(config: ExperimentConfig, variants: list[Variant], as_json: bool) -> None:
    if as_json:
        json.dump([v.to_dict() for v in variants], sys.stdout, indent=1)
        print(flush=True)
        return
    dims = ", ".join(f"{d}={len(config.space[d])}" for d in DIMENSIONS if len(config.space[d]) > 1)
    print(f"{config.study_name}: {len(variants)} distinct variants ({dims or 'one point'})")
    for index, variant in enumerate(variants, 1):
        print(f"{index:5d}  {variant.name}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
