"""Re-run a trial from its MLflow run ID and compare the new metrics with the recorded ones.

    python -m fractal_mlops.reproduce RUN_ID [--tracking-uri URI] [--atol X] [--device D]

Everything comes from what the run recorded: the resolved `config.yaml` artifact (with its
`variant` section), the seed inside it, the params `device` and `threads`. The trial is trained
again through the study's own loop (search/epochs.py) into a new run of the same
experiment, tagged `fractal.reproduces=RUN_ID` (and `fractal.role=reproduction`, so it never
counts as a trial of the study). Then a per-epoch table puts the original and the new metrics
side by side.

Training is deterministic for the same config, seed, thread count and device: on the CPU the
metrics must be identical (atol 0); on CUDA they must agree within --atol (default 1e-3).
A trial that stopped early (PRUNED, FAIL) is re-run up to the epoch where it stopped.

Exit codes: 0 the metrics match, 1 they differ, 2 bad input (unknown run ID, unreachable
store: one line on stderr, nothing written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import sys

from fractal_mlops.cli import add_tracking_uri_flag, parser, run_command
from fractal_mlops.errors import ConfigError
from fractal_mlops.search.reproduction import CUDA_ATOL, load_original, reproduce
from fractal_mlops.stores.locations import check_existing_store, resolve_tracking_uri


def build_parser() -> argparse.ArgumentParser:
    p = parser("reproduce", "Re-train a trial from what its MLflow run recorded (config.yaml, "
               "seed, threads, device) into a new run tagged fractal.reproduces=RUN_ID, and "
               "compare the per-epoch metrics. Exit 0 when they match, 1 when not.")
    p.add_argument("run_id", metavar="RUN_ID", help="MLflow run ID of a trial")
    add_tracking_uri_flag(p)
    p.add_argument("--atol", type=float, help="tolerance of the comparison (default: 0 = "
                   f"identical on the CPU, {CUDA_ATOL:g} when either run used CUDA)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="train on this device instead of the run's own")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args), "the reproduction run is marked FAIL (interrupted)")


def _run(args: argparse.Namespace) -> int:
    if args.atol is not None and not (math.isfinite(args.atol) and args.atol >= 0):
        raise ConfigError(f"--atol must be a number >= 0, got {args.atol}")
    uri = resolve_tracking_uri(args.tracking_uri, None)
    check_existing_store(uri)
    from fractal_mlops.tracking.tracker import configure, open_store

    configure(uri)
    client = open_store(uri)
    return reproduce(client, uri, load_original(client, args.run_id.strip(), uri), args.atol,
                     args.device)


if __name__ == "__main__":
    sys.exit(main())
