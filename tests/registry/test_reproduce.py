"""`fractal-mlops reproduce RUN_ID` on real MLflow stores made by real studies."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    REPO,
    TINY,
    Store,
    clean_env,
    mlflow_client,
    run_module,
    trial_runs,
)

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")


def reproduce(store: Store, run_id: str, *args: str, via_cli: bool = False):
    argv = ["reproduce"] if via_cli else []
    module = "fractal_mlops.cli" if via_cli else "fractal_mlops.reproduce"
    return run_module(module, *argv, run_id, "--tracking-uri", store.uri, *args, timeout=600)


def history(client, run_id: str) -> dict[tuple[str, int], float]:
    return {(key, m.step): m.value for key in EPOCH_METRICS
            for m in client.get_metric_history(run_id, key)}


def reproduction_of(client, experiment: str, run_id: str):
    runs = [r for r in trial_runs(client, experiment, role="reproduction")
            if r.data.tags.get("fractal.reproduces") == run_id]
    assert len(runs) == 1, f"expected one reproduction of {run_id}, found {len(runs)}"
    return runs[0]


@pytest.mark.slow
def test_reproducing_a_quickstart_trial_gives_identical_per_epoch_metrics(tmp_path: Path):
    store = Store(tmp_path)
    # the shipped quickstart, first two grid points; the second trains after the first in the
    # same process, the harder case for determinism
    study = run_module("fractal_mlops.study", "--tracking-uri", store.uri, "--storage",
                       f"journal:{tmp_path}/optuna.journal", "--n-trials", "2", cwd=tmp_path,
                       timeout=600)
    assert study.returncode == 0, study.stderr[-2000:]
    client = mlflow_client(store.uri)
    runs = trial_runs(client, "fractalnet-quickstart")
    original = next(r for r in runs if r.data.tags["optuna.trial_number"] == "1")
    assert original.data.tags["fractal.state"] == "COMPLETE"

    done = reproduce(store, original.info.run_id, via_cli=True)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "MATCH: the metrics are identical" in done.stdout
    copy = reproduction_of(client, "fractalnet-quickstart", original.info.run_id)
    assert copy.info.experiment_id == original.info.experiment_id
    assert copy.info.status == "FINISHED" and copy.data.tags["fractal.state"] == "COMPLETE"
    assert copy.data.tags["fractal.variant"] == original.data.tags["fractal.variant"]
    before, after = history(client, original.info.run_id), history(client, copy.info.run_id)
    assert len(before) == 4 * len(EPOCH_METRICS)  # quickstart: 4 epochs
    assert after == before  # identical, not close
    for key in ("final_val_acc", "best_val_acc", "param_count", "val_acc_column_1"):
        assert copy.data.metrics[key] == original.data.metrics[key], key
    assert copy.data.tags["fractal.model_uri"] != original.data.tags["fractal.model_uri"]
    for epoch in range(1, 5):
        assert any(line.split()[:1] == [str(epoch)] and line.endswith("same")
                   for line in done.stdout.splitlines()), done.stdout
    # a reproduction is not a trial of the study: the study's trial runs are unchanged
    assert len(trial_runs(client, "fractalnet-quickstart")) == 2


@pytest.mark.slow
def test_reproducing_a_pruned_trial_stops_at_the_same_epoch(store):
    client = mlflow_client(store.uri)
    pruned = next(r for r in trial_runs(client, TINY)
                  if r.data.tags["fractal.state"] == "PRUNED")

    done = reproduce(store, pruned.info.run_id)

    assert done.returncode == 0, done.stdout + done.stderr
    copy = reproduction_of(client, TINY, pruned.info.run_id)
    assert copy.data.tags["fractal.state"] == "PRUNED"
    assert copy.data.tags["fractal.reason"] == pruned.data.tags["fractal.reason"]
    assert history(client, copy.info.run_id) == history(client, pruned.info.run_id)
    assert "fractal.model_uri" not in copy.data.tags


def forged_copy(client, source, workdir: Path, *, tags: dict | None = None,
                training: dict | None = None, shifted: dict | None = None,
                dataset_digest: str | None = None, params: dict | None = None) -> str:
    """A new trial run that records what `source` recorded (tags, params, config.yaml, per-epoch
    metrics) with some changes, as a run made by other code, data or settings would:
    `tags` replaced, `training` settings changed in its config.yaml, per-epoch metrics
    `shifted` by {(key, step): delta}, a dataset input with another digest, `params` replaced."""
    import yaml
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

    forged = client.create_run(source.info.experiment_id, run_name="forged").info.run_id
    recorded_tags = {**source.data.tags, **(tags or {})}
    recorded_tags.pop("mlflow.runName", None)
    client.log_batch(forged, tags=[RunTag(k, v) for k, v in recorded_tags.items()],
                     params=[Param(k, v) for k, v in {**source.data.params,
                                                      **(params or {})}.items()])
    config = yaml.safe_load(Path(client.download_artifacts(
        source.info.run_id, "config.yaml", str(workdir))).read_text())
    config["training"].update(training or {})
    client.log_text(forged, yaml.safe_dump(config, sort_keys=False), "config.yaml")
    shifted = shifted or {}
    client.log_batch(forged, metrics=[Metric(key, value + shifted.get((key, step), 0.0), 0, step)
                                      for (key, step), value in history(
                                          client, source.info.run_id).items()])
    if dataset_digest:
        dataset = MetaDataset(CodeDatasetSource(tags={"source": "elsewhere"}),
                              name=source.data.params["dataset"], digest=dataset_digest)
        client.log_inputs(forged, datasets=[DatasetInput(
            dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "train")])])
    client.set_terminated(forged, "FINISHED")
    return forged


def complete_trial(client):
    return next(r for r in trial_runs(client, TINY) if r.data.tags["fractal.state"] == "COMPLETE")


@pytest.mark.slow
def test_a_record_that_differs_slightly_exits_1_unless_within_atol_and_changes_are_warned(store):
    """A run whose record says epoch 2 reached a slightly other val_acc than its config trains
    to, made by other code (git commit) on other data (dataset digest)."""
    client = mlflow_client(store.uri)
    source = complete_trial(client)
    forged = forged_copy(client, source, store.root,
                         tags={"mlflow.source.git.commit": "0" * 40},
                         shifted={("val_acc", 2): 1e-6}, dataset_digest="0123456789abcdef",
                         params={"device_name": "Forged CPU 9000", "amp_dtype": "float16"})

    done = reproduce(store, forged)

    assert done.returncode == 1, done.stdout + done.stderr
    rows = epoch_rows(done.stdout)
    assert rows["1"].endswith("same") and "DIFFERS" in rows["2"], done.stdout
    assert "DIFFERENT" in done.stdout
    assert "git commit 000000000000" in done.stderr
    assert "warning: the dataset here (digest " in done.stderr
    assert "differs from the one the run used (0123456789abcdef)" in done.stderr
    here = source.data.params
    assert (f"trained with device_name Forged CPU 9000, this one with {here['device_name']}"
            in done.stderr), done.stderr
    assert f"trained with amp_dtype float16, this one with {here['amp_dtype']}" in done.stderr

    loose = reproduce(store, forged, "--atol", "1e-5")

    assert loose.returncode == 0, loose.stdout + loose.stderr
    rows = epoch_rows(loose.stdout)
    assert rows["1"].endswith("same") and rows["2"].endswith("same"), loose.stdout
    assert "MATCH: the metrics are equal within atol 1e-05" in loose.stdout


def epoch_rows(stdout: str) -> dict[str, str]:
    return {line.split()[0]: line for line in stdout.splitlines()
            if line.split()[:1] in (["1"], ["2"])}


@pytest.mark.slow
def test_the_recorded_thread_count_is_used_whatever_this_process_would_default_to(store):
    client = mlflow_client(store.uri)
    source = complete_trial(client)
    recorded = int(source.data.params["threads"])
    # OMP_NUM_THREADS sets torch's default thread count in the reproducing process; make it
    # differ from the recorded one (torch caps the default at the core count, so go down)
    default = 1 if recorded > 1 else 2
    done = run_module("fractal_mlops.reproduce", source.info.run_id, "--tracking-uri",
                      store.uri, env=clean_env(OMP_NUM_THREADS=str(default)), timeout=600)

    assert done.returncode == 0, done.stdout + done.stderr
    header = done.stdout.splitlines()[0]
    assert header.startswith(f"reproducing run {source.info.run_id}")
    assert header.endswith(f"cpu with {recorded} threads"), header
    copy = reproduction_of(client, TINY, source.info.run_id)
    assert copy.data.params["threads"] == str(recorded)
    assert "MATCH: the metrics are identical" in done.stdout
    assert "dataset" not in done.stderr  # the same data: no digest warning


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_exits_128_plus_n_and_closes_the_new_run_fail_interrupted(store, signum):
    client = mlflow_client(store.uri)
    source = complete_trial(client)
    # the same trial, recorded with far more epochs than the test lets it train
    long = forged_copy(client, source, store.root, training={"epochs": 2000})
    proc = subprocess.Popen(
        [sys.executable, "-m", "fractal_mlops.reproduce", long, "--tracking-uri", store.uri],
        cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background shell
    try:                                                                  # may ignore SIGINT
        run_id = wait_for_training_run(client, long, proc)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode == 128 + signum, out[-2000:] + err[-2000:]
    assert f"interrupted ({signal.Signals(signum).name})" in err.strip().splitlines()[-1], err
    assert "Traceback" not in err
    copy = client.get_run(run_id)
    assert copy.info.status == "KILLED"
    assert copy.data.tags["fractal.state"] == "FAIL"
    assert copy.data.tags["fractal.reason"] == "interrupted"
    assert 1 <= len(client.get_metric_history(run_id, "val_acc")) < 2000


def wait_for_training_run(client, original_id: str, proc: subprocess.Popen,
                          timeout: float = 300) -> str:
    """The reproduction run of `original_id`, once it is RUNNING with an epoch recorded."""
    experiment = client.get_run(original_id).info.experiment_id
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in client.search_runs([experiment], f"tags.`fractal.reproduces` = '{original_id}'"):
            if run.info.status == "RUNNING" and client.get_metric_history(run.info.run_id,
                                                                          "val_acc"):
                return run.info.run_id
        if proc.poll() is not None:
            raise AssertionError(f"reproduce ended ({proc.returncode}) before an epoch was "
                                 f"recorded: {proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no epoch of a reproduction of {original_id} within {timeout} s")


@pytest.mark.slow
def test_trial_runs_record_normalization_device_threads_and_the_git_commit(studied_store):
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True)
        commit = done.stdout.strip() if done.returncode == 0 else None
    except OSError:  # no git: the study cannot tell its commit either
        commit = None
    client = mlflow_client(studied_store.uri)
    runs = trial_runs(client, TINY)
    assert len(runs) == 4
    for run in runs:
        params = run.data.params
        # README: the digits' training split normalizes with mean 0.305434, std 0.375959
        assert (params["data_mean"], params["data_std"]) == ("0.305434", "0.375959")
        assert params["device"] == "cpu"
        assert int(params["threads"]) >= 1
        # the runtime a reproduction is compared with: no CUDA versions on a CPU run
        assert params["amp_dtype"] in ("float32", "bfloat16") and params["device_name"]
        assert params["torch_version"] and "cuda_version" not in params
        # the commit of the checkout whose code ran (the study ran outside it, in a tmp dir)
        assert run.data.tags.get("mlflow.source.git.commit") == commit


@pytest.mark.slow
def test_unknown_run_or_a_run_that_is_not_a_trial_exits_2_and_writes_nothing(store):
    client = mlflow_client(store.uri)
    experiment = client.get_experiment_by_name(TINY).experiment_id
    before = len(client.search_runs([experiment]))
    study_run = client.search_runs([experiment], "tags.`fractal.role` = 'study'")[0]

    for run_id, words in [("0123456789abcdef0123456789abcdef", "not found"),
                          ("not-a-run", "not found"),
                          (study_run.info.run_id, "not a trial run")]:
        done = reproduce(store, run_id)
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.count("\n") == 1 and words in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
    assert len(client.search_runs([experiment])) == before


def test_unreachable_or_missing_store_exits_2_and_creates_nothing(tmp_path):
    run_id = "0123456789abcdef0123456789abcdef"
    missing = run_module("fractal_mlops.reproduce", run_id, "--tracking-uri",
                         f"sqlite:///{tmp_path}/nowhere/mlflow.db", cwd=tmp_path, timeout=120)
    assert missing.returncode == 2 and "no MLflow store" in missing.stderr
    unreachable = run_module("fractal_mlops.reproduce", run_id, cwd=tmp_path, timeout=120,
                             env=clean_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9"))
    assert unreachable.returncode == 2
    assert "cannot reach" in unreachable.stderr and unreachable.stderr.count("\n") == 1
    no_run = run_module("fractal_mlops.reproduce", cwd=tmp_path, timeout=120)
    assert no_run.returncode == 2 and no_run.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
