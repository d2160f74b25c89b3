"""What a hostile-but-fair user can do to a store, a file or a name (issue 26): each case gives one
line and its exit code, writes nothing into a store that is not the project's own, leaves no
run RUNNING, and the study carries on afterwards.

The disk-full cases run on a small tmpfs mounted for the test (root only: skipped elsewhere,
a failure under CI, see servers.missing_tool).
"""

from __future__ import annotations

import contextlib
import csv
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    StudyDir,
    assert_refused,
    image_folder,
    run_module,
    write_config,
)
from servers import missing_tool

from fractal_mlops.config.experiment import MAX_GRID_POINTS, study_folder
from fractal_mlops.reporting.paths import default_out_dir

ONE_POINT = {"space": {"blocks": [1], "columns": [1], "width": [8], "unit": ["conv-norm-act"]},
             "training": {"epochs": 1}}


def tables(db: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A small file system of its own at `path`, for a disk that fills up or cannot be written."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        missing_tool(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Take every free byte of the file system `folder` is on."""
    import os

    stats = os.statvfs(folder)
    filler = folder / "filler"
    subprocess.run(["fallocate", "-l", str(stats.f_bavail * stats.f_frsize), str(filler)],
                   check=True)
    return filler


def stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


# -- 1. two studies created at once on a new store --------------------------------------------

def test_studies_started_at_the_same_moment_on_a_new_store_all_run(tmp_path):
    config = write_config(tmp_path / "one.yaml", **ONE_POINT)
    study = StudyDir(tmp_path / "stores")
    study.root.mkdir()
    procs = [study.popen("--config", str(config), "--study-name", f"at-once-{i}", "--no-report",
                         *study.args()) for i in range(3)]
    outcomes = [proc.communicate(timeout=600) + (proc.returncode,) for proc in procs]
    for _out, err, code in outcomes:
        assert code == 0, err[-3000:]
        assert "Traceback" not in err and "error:" not in err, err[-3000:]
    client = study.client()
    for i in range(3):
        [run] = study.runs(f"at-once-{i}")
        assert run.info.status == "FINISHED" and run.data.tags["fractal.state"] == "COMPLETE"
    assert len(client.search_experiments()) == 4  # the three and MLflow's Default


# -- 2. a full disk ---------------------------------------------------------------------------

@pytest.mark.parametrize("full", ["tracking store", "journal"])
def test_a_full_disk_stops_the_study_with_one_line_and_the_rerun_finishes_the_grid(tmp_path, full):
    epochs = 20 if full == "journal" else 2  # journal records enough to need a new page
    config = write_config(tmp_path / "two.yaml", space={"columns": [1]},  # two grid points
                          training={"epochs": epochs})
    with tmpfs(tmp_path / "disk", "20m" if full == "tracking store" else "1m") as disk:
        other = tmp_path / "other"
        other.mkdir()
        tracking, journal = (disk, other) if full == "tracking store" else (other, disk)
        study = StudyDir(tmp_path, tracking_uri=f"sqlite:///{tracking / 'mlflow.db'}",
                         storage=f"journal:{journal / 'optuna.journal'}")
        first = study.run("--config", str(config), "--n-trials", "1", "--no-report", *study.args())
        assert first.returncode == 0, first.stderr[-3000:]

        filler = fill(disk)
        stopped = study.run("--config", str(config), "--no-report", *study.args())
        lines = stderr_lines(stopped)
        assert stopped.returncode == 1, stopped.stderr[-3000:]
        assert "Traceback" not in stopped.stderr
        assert len(lines) == 1 and lines[0].startswith("error: the disk is full"), lines

        filler.unlink()
        resumed = study.run("--config", str(config), *study.args())
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "Traceback" not in resumed.stderr
        trials = study.optuna_trials("tiny")
        complete = [t.params["variant"] for t in trials if t.state.name == "COMPLETE"]
        assert len(complete) == len(set(complete)) == 2  # every point, once
        assert not study.running_trial_runs()


# -- 3. and 4. what a config may expand to ----------------------------------------------------

def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    # training.lr holds 9^9 strings through nine nested aliases: a few hundred bytes of YAML
    levels = ['&a [' + ", ".join(['"lol"'] * 9) + "]"]
    for name, previous in zip("bcdefghi", "abcdefgh", strict=True):
        levels.append(f"&{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("study_name: bomb\ntraining:\n  lr: [" + ", ".join(levels) + "]\n")
    for command in ("fractal_mlops.space", "fractal_mlops.study"):
        refused = run_module(command, "--config", str(bomb), cwd=tmp_path, timeout=60)
        assert_refused(refused, "expands to more than")
    assert not (tmp_path / "mlruns").exists()


def test_a_grid_too_large_to_walk_is_refused_with_its_size_at_once(tmp_path):
    huge = {"blocks": [1, 2, 3], "columns": list(range(1, 9)), "width": list(range(1, 501)),
            "dropout": [round(i / 100, 2) for i in range(100)], "norm": ["batch", "group"],
            "activation": ["relu", "gelu", "silu", "tanh", "elu", "selu", "mish", "sigmoid",
                           "relu6", "celu", "hard_swish", "hard_sigmoid", "leaky_relu", "swish",
                           "hard_mish", "gelu_tanh", "prelu", "none"],
            "unit": ["conv-norm-act-drop"], "drop_path": ["none", "local", "local+global"]}
    config = write_config(tmp_path / "huge.yaml", space=huge)
    combinations = 3 * 8 * 500 * 100 * 2 * 18 * 3
    assert combinations > MAX_GRID_POINTS
    for command in ("fractal_mlops.space", "fractal_mlops.study"):
        refused = run_module(command, "--config", str(config), cwd=tmp_path, timeout=60)
        assert_refused(refused, f"{combinations:,} combinations", f"at most {MAX_GRID_POINTS:,}")
    assert not (tmp_path / "mlruns").exists()


# -- 5. study names that would escape or collide ------------------------------------------------

def test_a_study_named_dot_dot_keeps_its_files_inside_the_artifact_root(tmp_path):
    config = write_config(tmp_path / "one.yaml", **ONE_POINT)
    study = StudyDir(tmp_path / "stores")
    study.root.mkdir()
    done = study.run("--config", str(config), "--study-name", "..", *study.args())
    assert done.returncode == 0, done.stderr[-3000:]
    beside_db = {p.name for p in study.root.iterdir()}
    assert beside_db <= {"mlflow.db", "mlflow.db.lock", "optuna.journal", "artifacts", "cache",
                         "mlruns"} | {p.name for p in study.root.glob("optuna.journal.*")}, beside_db
    [folder] = (study.root / "artifacts").iterdir()
    assert folder.name == study_folder("..") and folder.name not in (".", "..")
    [run] = study.runs("..")
    assert Path(run.info.artifact_uri.removeprefix("file://")).resolve().is_relative_to(folder)
    reports = study.root / "mlruns" / "reports"
    assert [p.name for p in reports.iterdir()] == [study_folder("..")]


def test_names_that_differ_only_outside_ascii_get_folders_of_their_own():
    names = ["研究", "実験", "..", ".", "../x", "a/b", "a b", "a_b", "fractalnet-quickstart"]
    folders = [study_folder(name) for name in names]
    assert len(set(folders)) == len(names), folders
    for folder in folders:
        assert "/" not in folder and not folder.startswith(".")
        assert default_out_dir(folder).parent == Path("mlruns") / "reports"
    assert default_out_dir("研究") != default_out_dir("実験")
    assert study_folder("fractalnet-quickstart") == "fractalnet-quickstart"  # plain names unchanged


# -- 6. report --out where nothing can be written ------------------------------------------------

def test_report_out_that_cannot_be_written_is_refused_in_one_line(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    refused = run_module("fractal_mlops.report", "--experiment", "x", "--out",
                         str(a_file / "report"), cwd=tmp_path)
    assert_refused(refused, "cannot be created")
    with tmpfs(tmp_path / "read-only", "1m", read_only=True) as read_only:
        refused = run_module("fractal_mlops.report", "--experiment", "x", "--out",
                             str(read_only / "report"), cwd=tmp_path)
        assert_refused(refused, str(read_only))
    assert not (tmp_path / "mlruns").exists()


# -- 9. a SQLite file that is not the store it is given as ----------------------------------------

def test_sqlite_files_of_another_kind_are_refused_before_anything_is_written(tmp_path):
    import optuna
    from mlflow import MlflowClient

    config = write_config(tmp_path / "one.yaml", **ONE_POINT)
    same = tmp_path / "both.db"
    refused = run_module("fractal_mlops.study", "--config", str(config), "--tracking-uri",
                         f"sqlite:///{same}", "--storage", f"sqlite:///{same}", cwd=tmp_path)
    assert_refused(refused, "same database")
    assert not same.exists()

    mlflow_db = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{mlflow_db}").search_experiments()  # a real MLflow store
    optuna_db = tmp_path / "optuna.db"
    optuna.create_study(storage=f"sqlite:///{optuna_db}", study_name="other")
    app_db = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(app_db)) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.commit()
    before = {db: tables(db) for db in (mlflow_db, optuna_db, app_db)}

    cases = [
        ("fractal_mlops.study", ["--config", str(config), "--tracking-uri",
                                 f"sqlite:///{tmp_path / 'new.db'}", "--storage",
                                 f"sqlite:///{mlflow_db}"], "MLflow tracking store"),
        ("fractal_mlops.study", ["--config", str(config), "--tracking-uri", f"sqlite:///{optuna_db}",
                                 "--storage", f"journal:{tmp_path / 'j.journal'}"], "Optuna storage"),
        ("fractal_mlops.study", ["--config", str(config), "--tracking-uri", f"sqlite:///{app_db}",
                                 "--storage", f"journal:{tmp_path / 'j.journal'}"], "another application"),
        ("fractal_mlops.study", ["--config", str(config), "--tracking-uri", f"sqlite:///{mlflow_db}",
                                 "--storage", f"sqlite:///{app_db}"], "another application"),
        ("fractal_mlops.report", ["--experiment", "x", "--tracking-uri", f"sqlite:///{app_db}"],
         "another application"),
        ("fractal_mlops.report", ["--experiment", "x", "--tracking-uri", f"sqlite:///{optuna_db}"],
         "Optuna storage"),
        ("fractal_mlops.promote", ["--experiment", "x", "--tracking-uri", f"sqlite:///{optuna_db}"],
         "Optuna storage"),
    ]
    for module, args, words in cases:
        assert_refused(run_module(module, *args, cwd=tmp_path), words)
    assert {db: tables(db) for db in before} == before
    assert not (tmp_path / "new.db").exists() and not (tmp_path / "j.journal").exists()


# -- 10. image folders a classifier cannot learn from ---------------------------------------------

@pytest.mark.parametrize("damage", ["one class", "an empty class"])
def test_an_image_folder_with_one_class_or_an_empty_class_is_refused_with_its_path(tmp_path, damage):
    root = image_folder(tmp_path / "images", per_class=1)
    for split in ("train", "test"):
        for name in (("dog", "ship") if damage == "one class" else ("ship",)):
            for image in (root / split / name).iterdir():
                image.unlink()
            if damage == "one class":
                (root / split / name).rmdir()
    config = write_config(tmp_path / "images.yaml",
                          data={"name": "cifar10", "root": str(root), "cache_dir": str(tmp_path / "c")},
                          **ONE_POINT)
    study = StudyDir(tmp_path / "stores")
    study.root.mkdir()
    line = assert_refused(study.run("--config", str(config), *study.args(), timeout=120))
    if damage == "one class":
        assert "one class folder" in line and str(root / "train") in line, line
    else:
        assert "holds no images" in line and str(root / "train" / "ship") in line, line
    assert not (study.root / "mlflow.db").exists() and not (study.root / "optuna.journal").exists()


# -- 11. a journal whose last record, the trial's COMPLETE, was cut ---------------------------------

def test_a_complete_cut_from_the_journal_is_taken_from_the_run_and_counted_once(tmp_path):
    config = write_config(tmp_path / "one.yaml", **ONE_POINT)
    study = StudyDir(tmp_path)
    done = study.run("--config", str(config), *study.args())
    assert done.returncode == 0, done.stderr[-3000:]
    journal = Path(study.storage.removeprefix("journal:"))
    records = journal.read_bytes().splitlines(keepends=True)
    # the trial's COMPLETE (the study's heartbeat attr may follow it): the worker died writing it
    [complete] = [i for i, r in enumerate(records) if b'"state":1' in r.replace(b" ", b"")]
    cut = records[complete]
    journal.write_bytes(b"".join(records[:complete]) + cut[: len(cut) // 2])

    again = study.run("--config", str(config), *study.args())
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    trials = study.optuna_trials("tiny")
    assert [t.state.name for t in trials] == ["COMPLETE"]  # not failed, not trained again
    [run] = study.runs("tiny")
    assert trials[0].value == run.data.metrics["final_val_acc"]
    [parent] = study.runs("tiny", role="study")
    assert parent.data.metrics["n_fail"] == 0 and parent.data.metrics["n_complete"] == 1
    with open(study.root / "mlruns" / "reports" / "tiny" / "leaderboard.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 1


def test_a_retried_point_counts_once_in_the_summary():
    from fractal_mlops.search.progress import TrialRow, one_per_point

    rows = [TrialRow(0, "a", "FAIL", None, None, None, "worker lost"),
            TrialRow(1, "b", "COMPLETE", 0.9, 10, 1.0, None),
            TrialRow(2, "a", "COMPLETE", 0.8, 10, 1.0, None),
            TrialRow(3, "c", "FAIL", None, None, None, "interrupted"),
            TrialRow(4, "c", "PRUNED", 0.1, 10, 1.0, "diverged")]
    assert [(r.number, r.state) for r in one_per_point(rows)] == [
        (1, "COMPLETE"), (2, "COMPLETE"), (4, "PRUNED")]
