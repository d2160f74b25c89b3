"""`fractal-mlops <command> ...`: the console script; each command is also `python -m`."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "study": "run or resume a study over a template grid (the main job)",
    "space": "print the size and the variants of a template grid",
    "promote": "register the best trial's model and move the champion alias",
    "reproduce": "re-run a trial from its MLflow run ID and compare the metrics",
    "report": "write a study's report (leaderboard.csv, figures, report.html) and log it",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fractal-mlops {" + ",".join(COMMANDS) + "} ...\n")
        for name, text in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r} (expected one of {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    return importlib.import_module(f"fractal_mlops.{command}").main(rest)


if __name__ == "__main__":
    sys.exit(main())
