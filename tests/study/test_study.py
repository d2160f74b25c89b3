"""The main job end to end: real CLI processes, real SQLite MLflow store, real Optuna journal."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import time

import pytest
from helpers import LONG_TRIAL, StudyDir, write_config

QUICKSTART = "fractalnet-quickstart"
TRAINING_PARAMS = ("epochs", "batch_size", "lr", "momentum", "optimizer", "seed", "amp",
                   "grad_checkpointing", "dataset")
DIMENSIONS = ("blocks", "columns", "unit", "norm", "activation", "dropout", "drop_path", "width")
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_seconds",
                 "images_per_second", "host_mem_peak_mb")


def test_help_imports_no_heavy_packages(tmp_path):
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "fractal_mlops.study",
                          "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0
    assert "--tracking-uri" in out.stdout and "--n-trials" in out.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines()}
    assert not imported & {"torch", "timm", "mlflow", "optuna"}
    assert not (tmp_path / "mlruns").exists()


# -- the default study, run once for several tests --------------------------------------------

@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """`python -m fractal_mlops.study` with no arguments, in an empty directory."""
    root = tmp_path_factory.mktemp("quickstart")
    study = StudyDir(root)
    proc = subprocess.run([sys.executable, "-m", "fractal_mlops.study"], cwd=root,
                          env=study.env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    study.tracking_uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    study.storage = f"journal:{root / 'mlruns' / 'optuna.journal'}"
    return study, proc


@pytest.mark.slow
def test_default_study_runs_the_whole_grid_and_shows_a_leaderboard(quickstart):
    study, proc = quickstart
    assert (study.root / "mlruns" / "mlflow.db").exists()
    assert (study.root / "mlruns" / "artifacts").is_dir()
    trials = study.runs(QUICKSTART)
    assert len(trials) == 12  # the quickstart grid
    states = collections.Counter(r.data.tags["fractal.state"] for r in trials)
    # seeded and deterministic on the CPU: without a norm, both sigmoid variants stay at chance
    # and the 3-column ReLU one diverges
    assert states == {"COMPLETE": 9, "PRUNED": 3}, states
    pruned = {r.data.params["variant"] for r in trials if r.data.tags["fractal.state"] == "PRUNED"}
    assert pruned == {"b2-c2-w32-conv.sigmoid-dpLG", "b2-c3-w32-conv.sigmoid-dpLG",
                      "b2-c3-w32-conv.relu-dpLG"}
    assert "9 COMPLETE" in proc.stdout and "3 PRUNED" in proc.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    best = max((r for r in trials if r.data.tags["fractal.state"] == "COMPLETE"),
               key=lambda r: r.data.metrics["final_val_acc"])
    assert best.data.params["variant"] in proc.stdout
    assert best.data.metrics["final_val_acc"] >= 0.9  # digits is easy for a good variant
    # output that is not a terminal (a log file, kubectl logs) has a line per epoch
    history = study.client().get_metric_history(best.info.run_id, "val_acc")
    for point in history:
        assert (f"{best.data.params['variant']}  epoch {point.step}/{len(history)}  "
                f"val_acc {point.value:.3f}") in proc.stdout


@pytest.mark.slow
def test_diverging_variants_are_pruned_with_their_reason(quickstart):
    study, _ = quickstart
    pruned = [r for r in study.runs(QUICKSTART) if r.data.tags["fractal.state"] == "PRUNED"]
    assert pruned
    for run in pruned:
        assert run.info.status == "FINISHED"
        assert "chance" in run.data.tags["fractal.reason"] or "non-finite" in \
            run.data.tags["fractal.reason"]
        history = study.client().get_metric_history(run.info.run_id, "val_acc")
        assert len(history) < int(run.data.params["epochs"])  # stopped early
    by_trial = {t.number: t for t in study.optuna_trials(QUICKSTART)}
    for run in pruned:
        trial = by_trial[int(run.data.tags["optuna.trial_number"])]
        assert trial.state.name == "PRUNED"
        assert trial.user_attrs["reason"] == run.data.tags["fractal.reason"]


@pytest.mark.slow
def test_mlflow_records_follow_the_contract(quickstart):
    import mlflow
    import numpy as np

    study, _ = quickstart
    client = study.client()
    parents = study.runs(QUICKSTART, role="study")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = study.runs(QUICKSTART)
    optuna_trials = {t.number: t for t in study.optuna_trials(QUICKSTART)}
    for run in trials:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert tags["optuna.study_name"] == QUICKSTART
        assert tags["fractal.variant"] == params["variant"]
        assert len(tags["fractal.config_sha256"]) == 64
        for name in (*DIMENSIONS, *TRAINING_PARAMS, "variant"):
            assert name in params, name
        assert params["dataset"] == "digits"
        trial = optuna_trials[int(tags["optuna.trial_number"])]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert trial.user_attrs["variant"] == params["variant"]
        epochs = len(client.get_metric_history(run.info.run_id, "val_acc"))
        for name in EPOCH_METRICS:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
            assert sorted(steps) == list(range(1, epochs + 1)), name
        assert "gpu_mem_peak_mb" not in metrics  # CPU run
        assert metrics["host_mem_peak_mb"] > 50
        assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]
        assert run.inputs.dataset_inputs[0].dataset.name == "digits"
        if tags["fractal.state"] != "COMPLETE":
            continue
        assert run.info.status == "FINISHED"
        assert metrics["final_val_acc"] == metrics["val_acc"] == trial.value
        assert metrics["best_val_acc"] >= metrics["final_val_acc"]
        assert metrics["param_count"] > 0 and metrics["train_seconds"] > 0
        columns = int(params["columns"])
        assert {f"val_acc_column_{k}" for k in range(1, columns + 1)} <= set(metrics)
        assert f"val_acc_column_{columns + 1}" not in metrics
    complete = next(r for r in trials if r.data.tags["fractal.state"] == "COMPLETE")
    mlflow.set_tracking_uri(study.tracking_uri)
    model = mlflow.pyfunc.load_model(complete.data.tags["fractal.model_uri"])
    scores = model.predict(np.random.default_rng(0).normal(size=(5, 1, 8, 8)).astype(np.float32))
    assert scores.shape == (5, 10)
    config = client.download_artifacts(complete.info.run_id, "config.yaml", str(study.root))
    assert complete.data.params["variant"] in open(config).read()


@pytest.mark.slow
def test_rerunning_a_finished_grid_trains_nothing(quickstart):
    study, _ = quickstart
    before = len(study.runs(QUICKSTART))
    proc = subprocess.run([sys.executable, "-m", "fractal_mlops.study"], cwd=study.root,
                          env=study.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(study.runs(QUICKSTART)) == before
    assert len(study.optuna_trials(QUICKSTART)) == before
    assert "12 done" in proc.stdout


# -- resuming, workers, failures ---------------------------------------------------------------

def _points(trials) -> collections.Counter:
    return collections.Counter(t.params["variant"] for t in trials if t.state.is_finished()
                               and t.user_attrs.get("reason") not in ("worker lost", "interrupted"))


@pytest.mark.slow
def test_a_resumed_study_repeats_nothing(study_dir: StudyDir):
    config = write_config(study_dir.root / "tiny.yaml")
    first = study_dir.run("--config", str(config), *study_dir.args("--n-trials", "2"))
    assert first.returncode == 0, first.stderr
    assert len(study_dir.optuna_trials("tiny")) == 2
    second = study_dir.run("--config", str(config), *study_dir.args())
    assert second.returncode == 0, second.stderr
    trials = study_dir.optuna_trials("tiny")
    assert len(trials) == 4 and set(_points(trials).values()) == {1}
    assert len(study_dir.runs("tiny")) == 4


@pytest.mark.slow
def test_two_workers_split_n_trials_and_never_complete_a_point_twice(study_dir: StudyDir):
    config = write_config(study_dir.root / "tiny.yaml",
                          space={"blocks": [1], "columns": [1, 2], "width": [8],
                                 "unit": ["conv-norm-act", "conv-act-norm", "norm-act-conv"]},
                          training={"epochs": 1})
    # --n-trials 5 over 2 workers: 3 + 2, whatever the scheduling; a second run does the rest
    proc = study_dir.run("--config", str(config), *study_dir.args("--workers", "2",
                                                                   "--n-trials", "5"))
    assert proc.returncode == 0, proc.stderr
    assert "[worker 1]" in proc.stdout and "[worker 2]" in proc.stdout
    trials = study_dir.optuna_trials("tiny")
    assert len(trials) == 5 and set(_points(trials).values()) == {1}
    per_worker = collections.Counter(t.user_attrs["worker"].split(":")[1] for t in trials)
    assert sorted(per_worker.values()) == [2, 3], per_worker
    rest = study_dir.run("--config", str(config), *study_dir.args("--workers", "2"))
    assert rest.returncode == 0, rest.stderr
    trials = study_dir.optuna_trials("tiny")
    assert len(trials) == 6 and set(_points(trials).values()) == {1}
    runs = study_dir.runs("tiny")
    assert len(runs) == 6 and {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.slow
def test_a_trial_that_raises_fails_and_the_study_goes_on(study_dir: StudyDir):
    # A variant far too wide for the worker's memory: a real allocation error, like CUDA OOM.
    # The worker's address space is capped, so the allocation fails on any host instead of
    # being granted by a large one (and later OOM-killed).
    config = write_config(study_dir.root / "tiny.yaml",
                          space={"blocks": [1], "columns": [1], "width": [3_000_000_000, 8],
                                 "unit": ["conv-act"]})
    proc = study_dir.run("--config", str(config), *study_dir.args("--device", "cpu"),
                         preexec_fn=_cap_address_space)
    assert proc.returncode == 0, proc.stderr
    runs = {r.data.params["width"]: r for r in study_dir.runs("tiny")}
    failed, fine = runs["3000000000"], runs["8"]
    assert failed.info.status == "FAILED" and failed.data.tags["fractal.state"] == "FAIL"
    assert "memory" in failed.data.tags["fractal.reason"].lower() or \
        "alloc" in failed.data.tags["fractal.reason"].lower()
    assert fine.info.status == "FINISHED" and fine.data.tags["fractal.state"] == "COMPLETE"
    trials = {t.params["variant"]: t for t in study_dir.optuna_trials("tiny")}
    failed_trial = trials[failed.data.params["variant"]]
    assert failed_trial.state.name == "FAIL"
    assert failed_trial.user_attrs["reason"] == failed.data.tags["fractal.reason"]
    assert "1 FAIL" in proc.stdout
    # a FAIL point is final: resuming does not train it again
    again = study_dir.run("--config", str(config), *study_dir.args("--device", "cpu"),
                          preexec_fn=_cap_address_space)
    assert again.returncode == 0 and len(study_dir.optuna_trials("tiny")) == 2


def _cap_address_space() -> None:
    import resource

    limit = 24 * 2**30  # far above what a worker needs, far below the 108 GB that width asks
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.mark.slow
def test_ctrl_c_closes_the_run_and_resuming_continues_it_where_it_stopped(study_dir: StudyDir):
    config = write_config(study_dir.root / "tiny.yaml", **LONG_TRIAL)
    proc = study_dir.popen("--config", str(config), *study_dir.args())
    run_id = study_dir.wait_for_running_trial(proc, epochs=1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume" in err
    run = study_dir.client().get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["fractal.reason"] == "interrupted"
    [trial] = study_dir.optuna_trials("tiny")
    assert trial.state.name == "FAIL" and trial.user_attrs["reason"] == "interrupted"
    assert trial.user_attrs["mlflow_run_id"] == run_id
    assert not study_dir.running_trial_runs()
    resumed = study_dir.run("--config", str(config), *study_dir.args())
    assert resumed.returncode == 0, resumed.stderr
    trials = study_dir.optuna_trials("tiny")
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].params["variant"] == trial.params["variant"]  # the point is trained again,
    assert trials[1].user_attrs["mlflow_run_id"] == run_id  # in the run it started in
    assert sorted(r.info.status for r in study_dir.runs("tiny")) == ["FINISHED"] * 2
    run = study_dir.client().get_run(run_id)
    assert run.data.tags["fractal.state"] == "COMPLETE" and "fractal.reason" not in run.data.tags
    assert run.info.run_name == trial.params["variant"]
    steps = [m.step for m in study_dir.client().get_metric_history(run_id, "val_acc")]
    assert sorted(steps) == list(range(1, 41))  # every epoch once: none trained twice
    assert [r.info.status for r in study_dir.runs("tiny", role="study")] == ["FINISHED"]


@pytest.mark.slow
def test_ctrl_c_with_two_workers_stops_both_and_closes_their_trials(study_dir: StudyDir):
    import os

    config = write_config(study_dir.root / "tiny.yaml", **LONG_TRIAL)
    # a terminal's Ctrl-C reaches the whole foreground process group: launcher and workers
    proc = study_dir.popen("--config", str(config), *study_dir.args("--workers", "2"),
                           start_new_session=True)
    deadline = time.monotonic() + 300
    while len([n for n in _epochs_or_none(study_dir).values() if n >= 1]) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.1)
    running = study_dir.running_trial_runs()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    for run_id in running:
        run = study_dir.client().get_run(run_id)
        assert run.info.status == "KILLED" and run.data.tags["fractal.reason"] == "interrupted"
    trials = study_dir.optuna_trials("tiny")
    assert sorted(t.user_attrs.get("reason") for t in trials if t.state.name == "FAIL") == \
        ["interrupted", "interrupted"]
    assert not [t for t in trials if t.state.name == "RUNNING"]
    assert not study_dir.running_trial_runs()
    resumed = study_dir.run("--config", str(config), *study_dir.args("--workers", "2"))
    assert resumed.returncode == 0, resumed.stderr
    assert set(_points(study_dir.optuna_trials("tiny")).values()) == {1}
    assert len(_points(study_dir.optuna_trials("tiny"))) == 2


def _epochs_or_none(study: StudyDir) -> dict[str, int]:
    import sqlite3

    try:
        return study.running_trial_epochs()
    except (AssertionError, sqlite3.OperationalError):  # the store is not created yet, or busy
        return {}


# -- bad input ---------------------------------------------------------------------------------

BAD_INPUTS = {
    "unknown op": (["--config", "{bad_config}"], "unknown op"),
    "tracking scheme": (["--tracking-uri", "foo://nowhere"], "scheme"),
    "unreachable tracking server": (["--tracking-uri", "http://127.0.0.1:9"], "reach"),
    "unreachable tracking server with credentials": (
        ["--tracking-uri", "http://fractal:hunter2@127.0.0.1:9"], "reach"),
    "file tracking store": (["--tracking-uri", "file:///tmp/x"], "file store"),
    "storage scheme": (["--storage", "redis-ish://x"], "storage"),
    "unreachable postgres": (["--storage", "postgresql://fractal:hunter2@127.0.0.1:9/optuna"],
                             "cannot connect"),
    "bad device": (["--device", "gpu"], "device"),
    "cuda without cuda": (["--device", "cuda"], "cuda"),
    "cuda without cuda, two workers": (["--device", "cuda", "--workers", "2"], "cuda"),
    "zero workers": (["--workers", "0"], "workers"),
    "zero trials": (["--n-trials", "0"], "n_trials"),
    "missing config": (["--config", "nope.yaml"], "not found"),
    "empty study name": (["--study-name", " "], "study_name"),
}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_creates_nothing(tmp_path, case):
    if case.startswith("cuda without cuda") and _has_cuda():
        pytest.skip("this host has a CUDA device: --device cuda is good input here")
    argv, expected = BAD_INPUTS[case]
    bad = write_config(tmp_path / "bad.yaml", space={"unit": ["conv-foo"]})
    argv = [a.replace("{bad_config}", str(bad)) for a in argv]
    study = StudyDir(tmp_path)
    proc = study.run(*argv, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert expected.lower() in lines[0].lower()
    assert "Traceback" not in proc.stderr and "hunter2" not in proc.stderr + proc.stdout
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_a_changed_config_on_resume_is_refused_before_a_new_tracking_store_is_made(
        study_dir: StudyDir):
    config = write_config(study_dir.root / "tiny.yaml", training={"epochs": 1})
    first = study_dir.run("--config", str(config), *study_dir.args("--n-trials", "1"))
    assert first.returncode == 0, first.stderr
    changed = write_config(study_dir.root / "changed.yaml", training={"epochs": 2})
    elsewhere = study_dir.root / "elsewhere" / "mlflow.db"
    (study_dir.root / "elsewhere").mkdir()
    proc = study_dir.run("--config", str(changed), "--tracking-uri", f"sqlite:///{elsewhere}",
                         "--storage", study_dir.storage)
    assert proc.returncode == 2, proc.stderr
    assert "different config" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not elsewhere.exists()  # nothing written: not even an empty store
    assert len(study_dir.optuna_trials("tiny")) == 1


@pytest.mark.slow
@pytest.mark.parametrize("pruner", ["median", "successive_halving"])
def test_optuna_pruners_stop_trials_behind_the_others(study_dir: StudyDir, pruner: str):
    # three good variants first, then three much narrower ones that learn slower
    config = write_config(study_dir.root / "tiny.yaml",
                          space={"blocks": [1], "columns": [2], "width": [16, 1],
                                 "unit": ["conv-norm-act", "conv-act-norm", "norm-act-conv"]},
                          training={"epochs": 4}, pruning={"pruner": pruner, "warmup_epochs": 1,
                                                           "chance_margin": 0.0})
    proc = study_dir.run("--config", str(config), *study_dir.args())
    assert proc.returncode == 0, proc.stderr
    runs = study_dir.runs("tiny")
    assert len(runs) == 6
    pruned = [r for r in runs if r.data.tags["fractal.state"] == "PRUNED"]
    assert pruned, [(r.data.params["variant"], r.data.metrics.get("val_acc")) for r in runs]
    for run in pruned:
        assert run.data.tags["fractal.reason"].startswith(f"{pruner} pruner:")
        assert len(study_dir.client().get_metric_history(run.info.run_id, "val_acc")) < 4
    trials = {t.number: t for t in study_dir.optuna_trials("tiny")}
    assert {trials[int(r.data.tags["optuna.trial_number"])].state.name for r in pruned} == \
        {"PRUNED"}
