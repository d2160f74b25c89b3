"""A damaged store never gets worse: a cut-off or garbage journal end is set aside and the study
goes on with every whole record; a damaged or unwritable store file stops the command with one
line naming it (exit 2), writing nothing. Real journal, SQLite stores and CLI processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import StudyDir, assert_refused, write_config
from servers import missing_tool

from fractal_mlops.stores.repair import repair_journal, scan_journal


def one_trial(study: StudyDir, config: Path):
    return study.run("--config", str(config), *study.args("--n-trials", "1"))


def journal_of(study: StudyDir) -> Path:
    return Path(study.storage.split(":", 1)[1])


@pytest.fixture
def one_trial_done(tmp_path) -> tuple[StudyDir, Path]:
    study = StudyDir(tmp_path)
    config = write_config(tmp_path / "c.yaml", study_name="damaged")
    proc = one_trial(study, config)
    assert proc.returncode == 0, proc.stderr
    return study, config


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["cut-off record", "garbage appended"])
def test_damaged_journal_end_is_set_aside_and_the_study_goes_on(one_trial_done, damage):
    study, config = one_trial_done
    journal = journal_of(study)
    last = journal.read_bytes().splitlines(keepends=True)[-1]
    tail = last[: len(last) // 2] if damage == "cut-off record" else b"\x00\x00 not json\n{\"op"
    with open(journal, "ab") as handle:
        handle.write(tail)

    again = one_trial(study, config)
    assert again.returncode == 0, again.stderr
    assert "set aside" in again.stderr and "whole records are kept" in again.stderr
    aside = list(journal.parent.glob("optuna.journal.damaged-*"))
    assert len(aside) == 1
    assert all(piece in aside[0].read_bytes() for piece in tail.split(b"\n") if piece)
    # nothing recorded is lost, and the next run reads the journal cleanly
    third = one_trial(study, config)
    assert third.returncode == 0, third.stderr
    assert "set aside" not in third.stderr
    assert [t.state.name for t in study.optuna_trials("damaged")].count("FAIL") == 0
    assert len(study.optuna_trials("damaged")) == 3
    assert len(study.runs("damaged")) == 3


def test_a_journal_optuna_already_appended_to_after_a_cut_is_recovered(tmp_path):
    """Optuna appends right after a cut-off record; every read then fails. The repair keeps
    the record glued after the cut."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = tmp_path / "optuna.journal"

    def storage():
        return optuna.storages.JournalStorage(
            JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))

    study = optuna.create_study(study_name="s", storage=storage())
    study.set_user_attr("before", 1)
    with open(path, "ab") as handle:
        handle.write(b'{"op_code":8,"worker_id":"x","study_id":0,"user_a')  # killed mid-write
    optuna.load_study(study_name="s", storage=storage()).set_user_attr("after", 2)
    with pytest.raises(json.JSONDecodeError, match="delimiter"):  # from here on, unreadable
        optuna.load_study(study_name="s", storage=storage()).set_user_attr("later", 3)

    repair_journal(path)
    attrs = optuna.load_study(study_name="s", storage=storage()).user_attrs
    assert attrs["before"] == 1 and attrs["after"] == 2
    assert not scan_journal(path).damaged


def test_a_file_that_is_not_a_journal_is_refused_untouched(tmp_path):
    study = StudyDir(tmp_path)
    journal = journal_of(study)
    journal.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    before = journal.read_bytes()
    proc = one_trial(study, write_config(tmp_path / "c.yaml"))
    assert_refused(proc, str(journal), "not an Optuna journal")
    assert journal.read_bytes() == before
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "not a database"])
def test_damaged_mlflow_db_is_one_line_and_nothing_is_written(one_trial_done, damage):
    study, config = one_trial_done
    db = study.root / "mlflow.db"
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"hello " * 200)
    journal = journal_of(study).read_bytes()
    proc = one_trial(study, config)
    assert_refused(proc, str(db), "damaged", "backup")
    assert journal_of(study).read_bytes() == journal


def test_damaged_optuna_sqlite_storage_is_refused(tmp_path):
    db = tmp_path / "optuna.db"
    db.write_bytes(b"SQLite format 3\x00" + b"\x00" * 50)
    study = StudyDir(tmp_path, storage=f"sqlite:///{db}")
    proc = one_trial(study, write_config(tmp_path / "c.yaml"))
    assert_refused(proc, str(db), "damaged")
    assert not (tmp_path / "mlflow.db").exists()


def _immutable(path: Path, on: bool) -> bool:
    """chattr +i: even root cannot write the file (as on a read-only mount)."""
    if shutil.which("chattr") is None:
        return False
    flag = "+i" if on else "-i"
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


@pytest.mark.parametrize("store", ["mlflow.db", "optuna.journal"])
def test_a_store_file_that_cannot_be_written_is_refused(tmp_path, store):
    """The folder is writable, the store file is not."""
    study = StudyDir(tmp_path)
    config = write_config(tmp_path / "c.yaml")
    target = tmp_path / store
    target.touch()
    if not _immutable(target, True):
        missing_tool("chattr +i is not available here (e2fsprogs, on a file system that has it)")
    try:
        proc = one_trial(study, config)
    finally:
        _immutable(target, False)
    assert_refused(proc, str(target), "not writable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", store]
