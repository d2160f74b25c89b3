"""Stop signals, for one worker and for the launcher of several.

SIGINT (Ctrl-C), SIGTERM and SIGHUP all raise `Stopped` in the main thread: a worker then
marks its running trial FAIL ("interrupted") and exits 128 + the signal's number (130, 143,
129). The launcher starts its workers in their own sessions, so a terminal's Ctrl-C or hang-up
reaches only the launcher; it passes exactly one SIGTERM to each worker, waits for them to close
their trials, and kills any that do not within the grace period (their trials are then found
"worker lost" by the next run). A second signal to the launcher kills the workers at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape

from fractal_mlops.config.space import grid
from fractal_mlops.engine.data import load_dataset
from fractal_mlops.engine.device import resolve_device
from fractal_mlops.engine.gpus import placements, visible_gpus
from fractal_mlops.errors import EXIT_BAD_INPUT
from fractal_mlops.search.preflight import check_feasible, check_workers
from fractal_mlops.search.settings import StudySettings
from fractal_mlops.search.worker import _summary, open_stores, report_elsewhere, show_leaderboard
from fractal_mlops.signals import STOP_SIGNALS
from fractal_mlops.stores.optuna_storage import StorageSpec
from fractal_mlops.tracking.names import GRID_SIZE_ATTR

GRACE_SECONDS = 120.0


def _stop_with_parent() -> None:
    """In the child: SIGTERM when the launcher dies, even by SIGKILL (Linux only)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class WorkerGroup:
    """Worker processes started together and stopped together."""

    def __init__(self, grace: float = GRACE_SECONDS) -> None:
        self.procs: list[subprocess.Popen] = []
        self.grace = grace
        self._hurry = False

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None:
            self.stop()

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        self.procs.append(subprocess.Popen(argv, env=env, start_new_session=True,
                                           preexec_fn=_stop_with_parent))

    def wait(self) -> list[int]:
        return [proc.wait() for proc in self.procs]

    def stop(self) -> None:
        """One SIGTERM to each running worker; wait for all (a second signal: kill them)."""
        previous = {s: signal.signal(s, self._kill_now) for s in STOP_SIGNALS}
        try:
            for proc in self.procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.grace
            while any(p.poll() is None for p in self.procs):
                if self._hurry or time.monotonic() > deadline:
                    self._kill_all()
                time.sleep(0.1)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _kill_now(self, signum: int, frame) -> None:
        self._hurry = True

    def _kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait()


def launch_workers(settings: StudySettings, console: Console,
                   before_summary: Callable[[], None] = lambda: None) -> int:
    """Start N worker processes against the same stores; credentials travel in the
    environment, never on a command line."""
    started_at = time.monotonic()
    device = resolve_device(settings.device)  # bad input fails here, before any store is touched
    data = load_dataset(settings.config.data)  # also decodes an image folder once, for all workers
    check_workers(settings.workers, data.train_x.nbytes + data.val_x.nbytes)
    variants = grid(settings.config)
    check_feasible(settings.config, device, data, variants)
    study, tracker, _ = open_stores(settings, variants)  # once, before the workers race
    workers = settings.workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "FRACTAL_STORAGE": _storage_url(settings.storage),
           "MLFLOW_TRACKING_URI": settings.tracking_uri, "FRACTAL_THREADS": str(threads)}
    base = [sys.executable, "-m", "fractal_mlops.study", "--workers", "1",
            "--study-name", settings.study_name, "--device", settings.device]
    if settings.config.source:
        base += ["--config", settings.config.source]
    envs = worker_environments(workers, env, device.type)
    by_gpu: dict[str, list[str]] = {}
    for worker_env in envs:
        if "CUDA_VISIBLE_DEVICES" in worker_env:
            by_gpu.setdefault(worker_env["CUDA_VISIBLE_DEVICES"], []).append(
                worker_env["FRACTAL_WORKER_INDEX"])
    on_gpus = "".join(f"; GPU {escape(gpu)}: worker {', '.join(ids)}" for gpu, ids in by_gpu.items())
    console.print(f"starting {workers} workers ({threads} thread(s) each) on study "
                  f"[bold]{settings.study_name}[/]{on_gpus}")
    with WorkerGroup() as group:  # a stop signal reaches every worker, once
        for index in range(workers):
            argv = list(base)
            if settings.n_trials is not None:
                share = settings.n_trials // workers + (index < settings.n_trials % workers)
                if share == 0:
                    continue
                argv += ["--n-trials", str(share)]
            group.start(argv, envs[index])
        codes = group.wait()
    if any(code == EXIT_BAD_INPUT for code in codes):
        return EXIT_BAD_INPUT
    rows = _summary(study, None, None, 0, settings.config.search.objectives)
    reporter = report_elsewhere(settings, study) if all(c == 0 for c in codes) \
        and settings.n_trials is None else None
    if reporter is None:
        before_summary()
    else:
        console.print(f"the grid is done; worker {escape(reporter)} writes the study report")
    show_leaderboard(console, settings, rows, study.user_attrs.get(GRID_SIZE_ATTR, len(rows)),
                     time.monotonic() - started_at, tracker.experiment_id)
    failed = [c for c in codes if c != 0]
    return failed[0] if failed else 0


def worker_environments(workers: int, env: dict[str, str], device_type: str) -> list[dict[str, str]]:
    """Each worker's environment: `env`, its number (FRACTAL_WORKER_INDEX, from 1) and, on a
    host with G GPUs (engine/gpus.py), GPU i mod G for worker i as its only CUDA device."""
    placed = placements(workers, visible_gpus(device_type))
    return [{**env, **placed[index], "FRACTAL_WORKER_INDEX": str(index + 1)}
            for index in range(workers)]


def _storage_url(spec: StorageSpec) -> str:
    return f"journal:{spec.location}" if spec.kind == "journal" else spec.location
