"""The study report (`fractal-mlops report`, and the study's own refresh at its end), on a real
study's SQLite MLflow store: files, artifacts on the study run, the CSV, the HTML, bad input."""

from __future__ import annotations

import base64
import csv
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import StudyDir, assert_refused, write_config

from fractal_mlops.config.experiment import DIMENSIONS

EXPERIMENT = "report-tiny"
# 4 variants, 2 epochs: the sigmoid net without a norm stays at chance and is PRUNED.
SPACE = {"blocks": [2], "columns": [2], "width": [16], "unit": ["conv-norm-act", "conv-act"],
         "norm": ["batch"], "activation": ["relu", "sigmoid"], "drop_path": ["local+global"]}
TRAINING = {"epochs": 2, "batch_size": 32, "lr": 0.1, "seed": 0}
FIGURES = {"accuracy_vs_params.png", "blocks_columns_heatmap.png", "dimension_effects.png",
           "top_curves.png", "anytime_columns.png", "state_counts.png", "accuracy_vs_flops.png",
           "accuracy_vs_latency.png", "parameter_importance.png"}


def report(study: StudyDir, *args: str, via_cli: bool = False) -> subprocess.CompletedProcess:
    argv = ["-m", "fractal_mlops.cli", "report"] if via_cli else ["-m", "fractal_mlops.report"]
    return subprocess.run([sys.executable, *argv, *args], cwd=study.root, env=study.env(),
                          capture_output=True, text=True, timeout=600)


def report_artifacts(study: StudyDir, run_id: str) -> dict[str, int]:
    """name -> size of the files under report/ on a run."""
    return {Path(a.path).name: a.file_size for a in study.client().list_artifacts(run_id, "report")}


def expected_figures(study: StudyDir, trials) -> set[str]:
    """The figures and importance.csv (3 COMPLETE trials, 2 varying dimensions); the halting
    curve comes with trials that log anytime.csv (when training does)."""
    client = study.client()
    has_curve = any("anytime.csv" in {a.path for a in client.list_artifacts(t.info.run_id)}
                    for t in trials if t.data.tags["fractal.state"] == "COMPLETE")
    return FIGURES | {"importance.csv"} | ({"halting_curves.png"} if has_curve else set())


def best_trial(trials):
    complete = [t for t in trials if t.data.tags["fractal.state"] == "COMPLETE"]
    return max(complete, key=lambda t: (t.data.metrics["final_val_acc"],
                                        -t.data.metrics["param_count"]))


@pytest.fixture(scope="module")
def studied(tmp_path_factory):
    """A real study, run once; the study refreshes its report at its end."""
    root = tmp_path_factory.mktemp("report-study")
    study = StudyDir(root)
    config = write_config(root / "study.yaml", study_name=EXPERIMENT, space=SPACE,
                          training=TRAINING)
    done = study.run("--config", str(config), *study.args(), "--device", "cpu")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    trials = study.runs(EXPERIMENT)
    states = sorted(t.data.tags["fractal.state"] for t in trials)
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"], states
    [parent] = study.runs(EXPERIMENT, role="study")
    return study, done, trials, parent


@pytest.fixture(scope="module")
def reported(studied):
    """`fractal-mlops report --out DIR --top 2` on that store, after a promotion."""
    study, _, trials, parent = studied
    promoted = subprocess.run([sys.executable, "-m", "fractal_mlops.promote", "--experiment",
                               EXPERIMENT, "--tracking-uri", study.tracking_uri],
                              cwd=study.root, env=study.env(), capture_output=True, text=True,
                              timeout=600)
    assert promoted.returncode == 0, promoted.stderr
    out = study.root / "out"
    done = report(study, "--experiment", EXPERIMENT, "--tracking-uri", study.tracking_uri,
                  "--out", str(out), "--top", "2", via_cli=True)
    assert done.returncode == 0, done.stderr
    return study, out, done, trials, parent


@pytest.mark.slow
def test_the_study_logs_its_report_on_its_run_at_its_end(studied):
    study, done, trials, parent = studied
    expected = {"report.html", "leaderboard.csv"} | expected_figures(study, trials)

    logged = report_artifacts(study, parent.info.run_id)
    assert set(logged) == expected
    assert all(size > 0 for size in logged.values())
    local = study.root / "mlruns" / "reports" / EXPERIMENT  # the default folder, in its cwd
    assert {p.name for p in local.iterdir()} == expected
    assert "report:" in done.stdout and "report/report.html" in done.stdout


@pytest.mark.slow
def test_report_writes_its_files_and_logs_the_same_on_the_study_run(reported):
    study, out, done, trials, parent = reported
    files = {p.name for p in out.iterdir()}

    assert files == {"report.html", "leaderboard.csv"} | expected_figures(study, trials)
    assert set(report_artifacts(study, parent.info.run_id)) == files
    logged_html = Path(study.client().download_artifacts(
        parent.info.run_id, "report/report.html", str(study.root / "downloaded")))
    assert logged_html.read_text() == (out / "report.html").read_text()
    assert "top 2 of 3" in logged_html.read_text()  # this run's --top, not the study's
    assert str(out) in done.stdout


@pytest.mark.slow
def test_leaderboard_csv_has_one_row_per_trial_with_its_state(reported):
    study, out, _, trials, _ = reported
    with open(out / "leaderboard.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        header, rows = reader.fieldnames, list(reader)

    dims = [d for d in DIMENSIONS if d in trials[0].data.params]
    assert header == ["variant", *dims, "state", "reason", "final_val_acc", "best_val_acc",
                      "val_acc_column_1", "val_acc_column_2", "param_count", "train_seconds",
                      "run_id"]
    by_run = {t.info.run_id: t for t in trials}
    assert sorted(r["run_id"] for r in rows) == sorted(by_run)
    for row in rows:
        run = by_run[row["run_id"]]
        assert row["state"] == run.data.tags["fractal.state"]
        assert row["variant"] == run.data.params["variant"]
        assert all(row[d] == run.data.params[d] for d in dims)
        if row["state"] == "COMPLETE":
            assert float(row["final_val_acc"]) == run.data.metrics["final_val_acc"]
            assert float(row["val_acc_column_2"]) == run.data.metrics["val_acc_column_2"]
            assert row["reason"] == ""
        else:
            assert row["reason"] == run.data.tags["fractal.reason"] != ""
            assert row["final_val_acc"] == ""
    assert rows[0]["run_id"] == best_trial(trials).info.run_id


@pytest.mark.slow
def test_report_html_embeds_every_figure_and_names_the_best_variant_and_champion(reported):
    _, out, _, trials, _ = reported
    html = (out / "report.html").read_text()
    pngs = sorted(out.glob("*.png"))

    assert html.count("data:image/png;base64,") == len(pngs) >= len(FIGURES)
    for png in pngs:
        assert base64.b64encode(png.read_bytes()).decode() in html, png.name
    assert 'src="http' not in html and "<script" not in html  # nothing from the network
    best = best_trial(trials)
    assert f"Best trial: <b>{best.data.params['variant']}</b>" in html
    assert best.info.run_id in html
    assert (f"<code>FractalNet@champion</code> = version 1: <b>{best.data.params['variant']}</b>"
            in html)
    assert "3 COMPLETE" in html and "1 PRUNED" in html and "diverged" in html


@pytest.mark.slow
def test_an_unknown_experiment_is_refused_and_writes_nothing(studied):
    study, _, _, parent = studied
    out = study.root / "refused-unknown"
    before = report_artifacts(study, parent.info.run_id)

    done = report(study, "--experiment", "no-such-study", "--tracking-uri", study.tracking_uri,
                  "--out", str(out))

    assert_refused(done, "no-such-study")
    assert not out.exists()
    assert report_artifacts(study, parent.info.run_id) == before


def test_a_missing_store_is_refused_and_not_created(tmp_path):
    study = StudyDir(tmp_path)
    db = tmp_path / "typo" / "mlflow.db"
    out = tmp_path / "out"

    done = report(study, "--experiment", EXPERIMENT, "--tracking-uri", f"sqlite:///{db}",
                  "--out", str(out))

    assert_refused(done, str(db))
    assert not db.exists() and not db.parent.exists() and not out.exists()


def test_an_experiment_without_trials_is_refused_and_nothing_is_logged(tmp_path):
    study = StudyDir(tmp_path)
    client = study.client()
    experiment_id = client.create_experiment("empty-study",
                                             artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment_id, tags={"fractal.role": "study"})
    out = tmp_path / "out"

    done = report(study, "--experiment", "empty-study", "--tracking-uri", study.tracking_uri,
                  "--out", str(out))

    assert_refused(done, "empty-study", "no trial")
    assert not out.exists()
    assert client.list_artifacts(parent.info.run_id) == []


def test_a_bad_top_is_refused(tmp_path):
    done = report(StudyDir(tmp_path), "--top", "0", "--out", str(tmp_path / "out"))
    assert_refused(done, "--top")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_no_report_turns_the_refresh_off_and_a_failing_report_never_fails_the_study(tmp_path):
    study = StudyDir(tmp_path)
    config = write_config(tmp_path / "one.yaml", study_name="report-off",
                          space={**SPACE, "unit": ["conv-norm-act"], "activation": ["relu"]},
                          training={**TRAINING, "epochs": 1})

    off = study.run("--config", str(config), *study.args(), "--device", "cpu", "--no-report")

    assert off.returncode == 0, off.stderr[-2000:]
    [parent] = study.runs("report-off", role="study")
    assert report_artifacts(study, parent.info.run_id) == {}
    assert not (tmp_path / "mlruns" / "reports").exists()
    assert "report:" not in off.stdout

    # The grid is done; run again with the report's folder blocked by a file of that name.
    (tmp_path / "mlruns" / "reports").mkdir(parents=True)
    (tmp_path / "mlruns" / "reports" / "report-off").write_text("in the way")
    again = study.run("--config", str(config), *study.args(), "--device", "cpu")

    assert again.returncode == 0, again.stderr[-2000:]
    assert "warning: the study report was not built" in again.stderr
    assert report_artifacts(study, parent.info.run_id) == {}


def test_dimension_effects_compare_each_value_with_its_own_counterparts():
    """The grid ties some values to others (recursive sharing only with 3+ columns; drop-path
    "none" only with one column): each dimension's panel keeps only the variants whose other
    settings occur with another value of it, and leaves out a dimension with no such pairs."""
    from fractal_mlops.reporting.data import TrialRecord, matched

    def trial(columns: int, sharing: str, unit: str) -> TrialRecord:
        dims = {"columns": str(columns), "weight_sharing": sharing, "unit": unit,
                "drop_path": "none" if columns == 1 else "local+global"}
        name = f"c{columns}-{sharing}-{unit}"
        return TrialRecord(name, name, "COMPLETE", "", dims, {"final_val_acc": 0.5}, 0, None)

    trials = [trial(c, "none", u) for c in (1, 2, 3) for u in ("a", "b")]
    trials += [trial(3, "recursive", u) for u in ("a", "b")]
    dims = ["columns", "unit", "drop_path", "weight_sharing"]

    def names(dim: str) -> set[str]:
        return {t.variant for t in matched(trials, dim, dims)}

    assert names("weight_sharing") == {"c3-none-a", "c3-none-b", "c3-recursive-a", "c3-recursive-b"}
    assert names("drop_path") == set()  # only ever changes with the number of columns
    assert names("columns") == {f"c{c}-none-{u}" for c in (1, 2, 3) for u in "ab"}
    assert names("unit") == {t.variant for t in trials}


@pytest.mark.slow
def test_importance_csv_and_the_pareto_table_come_from_the_trials(reported):
    from fractal_mlops.config.objectives import pareto_front

    study, out, _, trials, _ = reported
    with open(out / "importance.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    complete = [t for t in trials if t.data.tags["fractal.state"] == "COMPLETE"]
    varied = {d for d in DIMENSIONS if len({t.data.params.get(d) for t in complete}) > 1}
    assert {r["dimension"] for r in rows} == varied
    for evaluator in ("fanova", "ped_anova"):
        assert sum(float(r[evaluator]) for r in rows) == pytest.approx(1.0, abs=1e-5)
    # the front table: brute force over the runs' accuracy and cost metrics
    costs = ("param_count", "flops", "latency_ms")
    points = [[t.data.metrics["final_val_acc"], *(t.data.metrics[m] for m in costs)]
              for t in complete]
    front = pareto_front(points, ["maximize", "minimize", "minimize", "minimize"])
    html = (out / "report.html").read_text()
    table = html.split("<h2>Pareto front")[1].split("</table>")[0]
    assert {t.info.run_id for t in complete if t.info.run_id in table} == \
        {complete[i].info.run_id for i in front}


@pytest.mark.slow
def test_complete_trials_record_cost_metrics_and_optuna_params_per_dimension(studied):
    from helpers import load_optuna_study

    study, _, trials, _ = studied
    for t in trials:
        costs = {m: t.data.metrics.get(m) for m in ("flops", "latency_ms", "throughput_img_s")}
        if t.data.tags["fractal.state"] == "COMPLETE":
            assert all(v is not None and v > 0 for v in costs.values()), costs
        else:
            assert set(costs.values()) == {None}
    optuna_study = load_optuna_study(study.storage, EXPERIMENT)
    for trial in optuna_study.trials:
        assert set(trial.params) == {"variant", *DIMENSIONS}
        assert trial.distributions["activation"].choices == ("relu", "sigmoid")
        assert trial.params["variant"] == trial.user_attrs["variant"]
    # Optuna's own importance (what optuna-dashboard shows) sees the dimensions
    import optuna

    scores = optuna.importance.get_param_importances(
        optuna_study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
        params=list(DIMENSIONS))
    assert set(scores) == set(DIMENSIONS)
    varied = {d for d in DIMENSIONS if len(optuna_study.trials[0].distributions[d].choices) > 1}
    assert varied == {"unit", "norm", "activation"}  # norm: "none" where the unit has none
    assert sum(scores[d] for d in varied) == pytest.approx(1.0)  # the others cannot matter


@pytest.mark.slow
def test_optuna_dashboard_shows_the_importance_panel_and_the_objective_names(studied):
    """What a user sees on the study's page in a real optuna-dashboard server: the note with
    the report's importance table (the same numbers as importance.csv, in its order) and the
    objective named after its metric."""
    import json
    import time
    import urllib.request

    from dashboard_screenshots import free_port

    study, _, _, parent = studied
    with open(study.root / "mlruns" / "reports" / EXPERIMENT / "importance.csv") as handle:
        rows = list(csv.DictReader(handle))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys; from optuna_dashboard._cli import main; sys.exit(main())",
         study.storage.removeprefix("journal:"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/api/studies"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                studies = json.load(urllib.request.urlopen(base, timeout=5))["study_summaries"]
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "no dashboard"
                time.sleep(0.5)
        [summary] = [s for s in studies if s["study_name"] == EXPERIMENT]
        detail = json.load(urllib.request.urlopen(f"{base}/{summary['study_id']}", timeout=30))
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert detail["objective_names"] == ["final_val_acc"]
    body = detail["note"]["body"]
    assert "## Which template dimension mattered" in body and parent.info.run_id in body
    table = [line.strip("|").split("|") for line in body.splitlines()
             if line.startswith("| ") and not line.startswith("| dimension")]
    assert [cells[0].strip() for cells in table] == [row["dimension"] for row in rows]
    for cells, row in zip(table, rows, strict=True):
        assert float(cells[1]) == pytest.approx(float(row["fanova"]), abs=0.005)
        assert float(cells[2]) == pytest.approx(float(row["ped_anova"]), abs=0.005)
