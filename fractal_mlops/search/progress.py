"""What the study shows a person: rich progress while it runs, a leaderboard when it ends."""

from __future__ import annotations

import os
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from fractal_mlops.config.objectives import directions, pareto_front
from fractal_mlops.tracking.states import RETRYABLE, TrialState


class StudyProgress:
    """Grid position, variant, epoch, val acc and time left, on one live display.

    With `live=False` (a worker among several, or output that is not a terminal: a log file,
    `kubectl logs`) it prints a line per finished epoch and per finished trial instead.
    """

    def __init__(self, console: Console, grid_size: int, done: int, epochs: int,
                 live: bool | None = None, prefix: str = "") -> None:
        self.console = console
        self.epochs = epochs
        self.prefix = prefix
        self.live = console.is_terminal if live is None else live
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
            TextColumn("left"), TimeRemainingColumn(), console=console,
            disable=not self.live, transient=False,
        )
        self.grid_task = self.progress.add_task("grid", total=grid_size, completed=done,
                                                detail="")
        self.trial_task = self.progress.add_task("trial", total=epochs, detail="", visible=False)
        self.trial_number = -1

    def __enter__(self) -> StudyProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def trial_started(self, position: int, grid_size: int, trial_number: int, variant: str) -> None:
        self.trial_number = trial_number
        self.progress.reset(self.trial_task, total=self.epochs, visible=True,
                            description=f"[{position}/{grid_size}] trial {trial_number}",
                            detail=variant)

    def epoch_done(self, epoch: int, val_acc: float, variant: str) -> None:
        detail = f"{variant}  epoch {epoch}/{self.epochs}  val_acc {val_acc:.3f}"
        self.progress.update(self.trial_task, completed=epoch, detail=detail)
        if not self.live:  # hours between trial lines at the paper's width
            self.console.print(f"{self.prefix}trial {self.trial_number:>4} {'':<8} {escape(detail)}",
                               highlight=False)

    def trial_done(self, done: int, trial_number: int, variant: str, state: str,
                   value: float | None, reason: str | None) -> None:
        self.progress.update(self.grid_task, completed=done)
        self.progress.update(self.trial_task, visible=False)
        style = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red"}.get(state, "cyan")
        shown = f"val_acc {value:.3f}" if value is not None else ""
        why = f"  ({escape(reason)})" if reason and state != "COMPLETE" else ""
        self.console.print(f"{self.prefix}trial {trial_number:>4} [{style}]{state:<8}[/] "
                           f"{escape(variant)}  {shown}{why}")


@dataclass
class TrialRow:
    number: int
    variant: str
    state: str
    value: float | None
    params: int | None
    seconds: float | None
    reason: str | None
    values: tuple[float, ...] | None = None  # the objectives' values (COMPLETE)
    run_id: str | None = None


def front_rows(rows: list[TrialRow], objectives: list[str]) -> list[TrialRow]:
    """The COMPLETE rows on the Pareto front of `objectives`, best first objective first."""
    complete = [r for r in rows if r.state == "COMPLETE" and r.values]
    front = pareto_front([r.values for r in complete], directions(objectives))
    return sorted((complete[i] for i in front), key=lambda r: (-r.values[0], r.number))


def one_per_point(rows: list[TrialRow]) -> list[TrialRow]:
    """A grid point trained more than once (interrupted, its worker lost, then trained again)
    counts once: as its COMPLETE trial, else its latest. In trial-number order."""
    kept: dict[str, TrialRow] = {}
    for row in sorted(rows, key=lambda r: r.number):
        held = kept.get(row.variant)
        if held is None or row.state == "COMPLETE" or held.state != "COMPLETE":
            kept[row.variant] = row
    return sorted(kept.values(), key=lambda r: r.number)


def leaderboard(console: Console, study_name: str, rows: list[TrialRow], grid_size: int,
                wall_seconds: float, ui_command: str, top: int = 10,
                objectives: list[str] | None = None) -> None:
    complete = sorted((r for r in rows if r.state == "COMPLETE"),
                      key=lambda r: (-(r.value or 0.0), r.params or 0))
    costs = list(objectives or [])[1:]
    front = {r.number for r in front_rows(rows, objectives)} if costs else set()
    table = Table(title=f"{study_name}: top {min(top, len(complete))} of {len(complete)} "
                        "complete variants", title_justify="left")
    for name, justify in [("#", "right"), ("trial", "right"), ("variant", "left"),
                          ("val_acc", "right"), ("params", "right"), ("seconds", "right"),
                          *((cost, "right") for cost in costs if cost != "param_count"),
                          *([("front", "center")] if costs else [])]:
        table.add_column(name, justify=justify)
    for rank, row in enumerate(complete[:top], 1):
        extra = [f"{value:,.4g}" for cost, value in zip(costs, (row.values or ())[1:], strict=False)
                 if cost != "param_count"]
        table.add_row(str(rank), str(row.number), row.variant, f"{row.value:.4f}",
                      f"{row.params:,}" if row.params else "-",
                      f"{row.seconds:.1f}" if row.seconds else "-",
                      *extra, *(["*" if row.number in front else ""] if costs else []))
    console.print(table)
    if costs:
        on_front = front_rows(rows, objectives)
        console.print(f"Pareto front of {' vs '.join(objectives)}: {len(on_front)} trial(s): "
                      + ", ".join(f"{escape(r.variant)} ({_values(r.values)})" for r in on_front))
    counts = {state: sum(r.state == state for r in rows) for state in TrialState}
    finished_points = len({r.variant for r in rows if r.state in counts and r.reason not in
                           RETRYABLE})
    trial_seconds = sum(r.seconds or 0.0 for r in rows)
    console.print(
        f"grid {finished_points}/{grid_size} done: [green]{counts['COMPLETE']} COMPLETE[/], "
        f"[yellow]{counts['PRUNED']} PRUNED[/], [red]{counts['FAIL']} FAIL[/]; "
        f"{trial_seconds:.0f} s in trials, {wall_seconds:.0f} s this run"
    )
    pruned = [r for r in rows if r.state == "PRUNED"][:5]
    for row in pruned:
        console.print(f"  pruned: trial {row.number} {escape(row.variant)}: "
                      f"{escape(row.reason or '')}")
    console.print(f"Compare the trials in the MLflow UI (start it, then open the URL):\n  {ui_command}")


def _values(values: tuple[float, ...] | None) -> str:
    return " / ".join(f"{v:,.4g}" for v in values or ())


def worker_prefix() -> str:
    """Rich markup (escaped) that tells the lines of several workers apart."""
    index = os.environ.get("FRACTAL_WORKER_INDEX")
    return escape(f"[worker {index}] ") if index else ""
