"""What a study shows in the MLflow UI, read back through MLflow's API from a real small study:
run names, descriptions, the study run's summary and duration, logged models and their links."""

from __future__ import annotations

import re

import pytest
from helpers import StudyDir, write_config

from fractal_mlops.tracking.ui import model_name, trial_description, ui_lines

STUDY = "ui-study"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 4-point digits grid: the sigmoid variants stay near chance and are PRUNED."""
    root = tmp_path_factory.mktemp("ui")
    config = write_config(root / "ui.yaml", study_name=STUDY,
                          space={"unit": ["conv-norm-act"], "activation": ["relu", "sigmoid"]},
                          training={"epochs": 3})
    study = StudyDir(root)
    proc = study.run("--config", str(config), *study.args())
    assert proc.returncode == 0, proc.stderr
    client = study.client()
    experiment = client.get_experiment_by_name(STUDY)
    trials = study.runs(STUDY)
    parent = study.runs(STUDY, role="study")[0]
    return study, proc, client, experiment, trials, parent


def _complete(trials):
    return [r for r in trials if r.data.tags["fractal.state"] == "COMPLETE"]


def test_the_study_prints_the_ui_command_then_the_url_of_its_trials(finished):
    study, proc, _, experiment, _, _ = finished
    lines = proc.stdout.splitlines()
    command = next(i for i, line in enumerate(lines) if "mlflow ui --backend-store-uri" in line)
    assert f"sqlite:///{study.root / 'mlflow.db'}" in lines[command]
    url = lines[command + 1].strip()
    assert url.startswith(f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
                          "?workflowType=machine_learning"), url
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_trial_runs_are_named_by_variant_and_say_how_they_ended(finished):
    _, _, _, _, trials, _ = finished
    assert len(trials) == 4
    states = {r.data.tags["fractal.state"] for r in trials}
    assert states == {"COMPLETE", "PRUNED"}, states
    for run in trials:
        variant, state = run.data.tags["fractal.variant"], run.data.tags["fractal.state"]
        assert run.info.run_name.startswith(variant)
        assert run.data.tags["optuna.trial_number"].isdigit()
        note = run.data.tags["mlflow.note.content"]
        assert note.startswith(f"**{state}**")
        if state == "COMPLETE":
            assert run.info.run_name == variant
            assert f"{run.data.metrics['final_val_acc']:.4f}" in note
        else:  # a PRUNED run stays FINISHED, so its name and description say it was no success
            assert run.info.status == "FINISHED"
            assert run.info.run_name == f"{variant} [PRUNED]"
            assert run.data.tags["fractal.reason"] in note
            assert "not a success" in note


def test_the_study_run_leads_to_the_best_trial_and_summarises_the_grid(finished):
    _, _, _, _, trials, parent = finished
    complete = _complete(trials)
    best = max(complete, key=lambda r: (r.data.metrics["final_val_acc"],
                                        -r.data.metrics["param_count"]))
    tags, metrics = parent.data.tags, parent.data.metrics
    assert tags["fractal.best_run_id"] == best.info.run_id
    assert tags["fractal.best_variant"] == best.data.tags["fractal.variant"]
    assert metrics["best_final_val_acc"] == best.data.metrics["final_val_acc"]
    assert "best_val_acc" not in metrics  # a trial metric's name with another meaning
    pruned = len(trials) - len(complete)
    assert (metrics["n_complete"], metrics["n_pruned"], metrics["n_fail"]) == \
        (len(complete), pruned, 0)
    assert (metrics["grid_size"], metrics["grid_done"]) == (4, 4)
    note = tags["mlflow.note.content"]
    assert "| # | variant |" in note  # the top trials as a markdown table
    ranked = sorted(complete, key=lambda r: -r.data.metrics["final_val_acc"])
    rows = [line for line in note.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row.split("|")[2].strip() for row in rows] == \
        [r.data.tags["fractal.variant"] for r in ranked]
    assert f"python -m fractal_mlops.promote --experiment {STUDY}" in note


def test_the_study_runs_duration_spans_its_trials_and_nothing_is_left_running(finished):
    study, _, client, experiment, trials, parent = finished
    assert parent.info.status == "FINISHED"
    assert parent.info.start_time <= min(r.info.start_time for r in trials)
    assert parent.info.end_time >= max(r.info.end_time for r in trials)
    running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    assert running == []
    # running the finished grid again trains nothing, and leaves the duration as it was
    proc = study.run("--config", str(study.root / "ui.yaml"), *study.args())
    assert proc.returncode == 0, proc.stderr
    again = client.get_run(parent.info.run_id)
    assert (again.info.start_time, again.info.end_time) == \
        (parent.info.start_time, parent.info.end_time)


def test_logged_models_are_named_after_their_variant_with_metrics_and_dataset(finished):
    import mlflow
    import numpy as np

    study, _, client, experiment, trials, _ = finished
    models = client.search_logged_models(
        [experiment.experiment_id],
        order_by=[{"field_name": "metrics.final_val_acc", "ascending": False}])
    complete = _complete(trials)
    assert len(models) == len(complete)
    by_run = {r.info.run_id: r for r in complete}
    assert [m.source_run_id for m in models] == \
        [r.info.run_id for r in sorted(complete, key=lambda r: -r.data.metrics["final_val_acc"])]
    for model in models:
        run = by_run[model.source_run_id]
        variant = run.data.tags["fractal.variant"]
        assert model.name == model_name(variant)
        assert model.tags["fractal.variant"] == variant
        assert model.params["variant"] == variant
        linked = {m.key: m for m in model.metrics}
        assert linked["final_val_acc"].value == run.data.metrics["final_val_acc"]
        assert {"best_val_acc", "param_count", "val_acc_column_1"} <= set(linked)
        dataset = run.inputs.dataset_inputs[0].dataset
        assert (linked["final_val_acc"].dataset_name, linked["final_val_acc"].dataset_digest) \
            == (dataset.name, dataset.digest)
        assert run.data.tags["fractal.model_uri"] == f"models:/{model.model_id}"
    mlflow.set_tracking_uri(study.tracking_uri)
    loaded = mlflow.pyfunc.load_model(complete[0].data.tags["fractal.model_uri"])
    scores = loaded.predict(np.zeros((2, 1, 8, 8), dtype=np.float32))
    assert np.asarray(scores).shape == (2, 10)


# -- the pure parts -------------------------------------------------------------------------

def test_a_tracking_servers_url_is_shown_without_credentials():
    lines = ui_lines("https://alice:s3cret@mlflow.example.org:8443/", "7")
    assert lines == ["https://mlflow.example.org:8443/#/experiments/7/runs?workflowType="
                     "machine_learning&orderByKey=metrics.%60final_val_acc%60&orderByAsc=false"]
    command, url = ui_lines("postgresql://bob:pw@db:5432/mlflow", "3")
    assert command == "mlflow ui --backend-store-uri postgresql://bob:***@db:5432/mlflow"
    assert url.startswith("http://127.0.0.1:5000/#/experiments/3/runs?workflowType=")


def test_model_names_keep_the_variant_within_mlflows_rules():
    assert model_name("b3-c3-w64-conv.batch.relu.drop0.1-dpLG") == \
        "b3-c3-w64-conv_batch_relu_drop0_1-dpLG"


def test_a_failed_trial_says_whether_its_point_is_trained_again():
    lost = trial_description("FAIL", "worker lost", {}, retryable=("worker lost",))
    assert lost.startswith("**FAIL**: worker lost.") and "trained again" in lost
    broken = trial_description("FAIL", "RuntimeError: shapes", {"param_count": 10},
                               retryable=("worker lost",))
    assert "not trained again" in broken and "10 parameters" in broken
