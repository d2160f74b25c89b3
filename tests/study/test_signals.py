"""SIGTERM / SIGINT / SIGHUP to the `--workers N` launcher stop every worker: each marks its
running trial FAIL (interrupted), the launcher exits 128 + signal with one line, nothing is
left running, and the next run resumes. Real CLI processes on real stores."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import pytest
from helpers import StudyDir, write_config


def processes_running(marker: str) -> list[int]:
    """PIDs whose command line mentions `marker` (the test's own config path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = next(line for line in (entry / "status").read_text().splitlines()
                         if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if marker in cmdline and "zombie" not in state:
            found.append(int(entry.name))
    return found


def wait_for_training_trials(study: StudyDir, proc, name: str, count: int,
                             timeout: float = 300) -> None:
    """Until `count` trials have reported an epoch: they are inside training. (A signal in the
    instant between a trial's claim and its training is run_trial's own concern.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            epochs = study.running_trial_epochs()
        except (AssertionError, sqlite3.OperationalError):  # no store yet, or busy
            epochs = {}
        if sum(n >= 1 for n in epochs.values()) >= count:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    raise AssertionError(f"{count} trials did not start in time")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_to_the_launcher_stops_every_worker(tmp_path, signum):
    study = StudyDir(tmp_path)
    config = write_config(tmp_path / f"sig-{signum.name}.yaml", study_name="sig",
                          space={"blocks": [2], "columns": [3], "width": [16],
                                 "unit": ["conv-norm-act", "conv-act-norm"]},
                          training={"epochs": 20})
    proc = study.popen("--config", str(config), *study.args("--workers", "2"))
    wait_for_training_trials(study, proc, "sig", 2)
    assert len(processes_running(str(config))) == 3  # the launcher and its two workers

    proc.send_signal(signum)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signum, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and signum.name in errors[0] and "resume" in errors[0], err
    assert "Traceback" not in err
    assert processes_running(str(config)) == []

    trials = study.optuna_trials("sig")
    assert len(trials) == 2
    assert {(t.state.name, t.user_attrs.get("reason")) for t in trials} == {("FAIL", "interrupted")}, err
    runs = study.runs("sig")
    assert {r.info.status for r in runs} == {"KILLED"}
    assert study.running_trial_runs() == []


@pytest.mark.slow
def test_a_launcher_killed_by_sigkill_still_stops_its_workers(tmp_path):
    """SIGKILL cannot be caught: the workers learn it from the kernel (parent-death signal)."""
    study = StudyDir(tmp_path)
    config = write_config(tmp_path / "sigkill.yaml", study_name="sigkill",
                          space={"blocks": [2], "columns": [3], "width": [16],
                                 "unit": ["conv-norm-act", "conv-act-norm"]},
                          training={"epochs": 20})
    proc = study.popen("--config", str(config), *study.args("--workers", "2"))
    wait_for_training_trials(study, proc, "sigkill", 2)
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 180
    while processes_running(str(config)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_running(str(config)) == []  # no orphan trains on

    trials = study.optuna_trials("sigkill")
    assert {(t.state.name, t.user_attrs.get("reason")) for t in trials} == {("FAIL", "interrupted")}
    assert study.running_trial_runs() == []


@pytest.mark.slow
def test_a_stop_signal_to_one_worker_names_the_signal(tmp_path):
    study = StudyDir(tmp_path)
    config = write_config(tmp_path / "one.yaml", study_name="one",
                          space={"blocks": [2], "columns": [3], "width": [16],
                                 "unit": ["conv-norm-act"]}, training={"epochs": 20})
    proc = study.popen("--config", str(config), *study.args())
    wait_for_training_trials(study, proc, "one", 1)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 129, err
    assert "SIGHUP" in err and "Traceback" not in err
    assert [t.user_attrs.get("reason") for t in study.optuna_trials("one")] == ["interrupted"]


# -- a stop signal never cuts a SQLite write in half ------------------------------------------

def test_a_ctrl_c_during_a_sqlite_write_lands_once_the_write_is_done(tmp_path):
    """A KeyboardInterrupt inside a SQLite write would leave its connection holding the write
    lock, and the process's next write (closing the run KILLED) would find the database
    locked. Inside sqlite_lock the signal waits for the write, then interrupts as before."""
    from fractal_mlops.stores.locations import sqlite_lock

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    written = []
    # Python's own Ctrl-C handler, as in a terminal (a background shell may ignore SIGINT)
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with sqlite_lock(uri):
                db = sqlite3.connect(tmp_path / "mlflow.db")
                db.execute("CREATE TABLE t (x)")
                signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of the write
                db.execute("INSERT INTO t VALUES (1)")
                db.commit()
                written.append(True)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, saved)
    db.close()
    assert written == [True]
    assert sqlite3.connect(tmp_path / "mlflow.db").execute("SELECT x FROM t").fetchall() == [(1,)]


def test_a_stop_signal_during_a_sqlite_write_still_reaches_the_studys_guard(tmp_path):
    from fractal_mlops.signals import STOP_SIGNALS, InterruptGuard, Stopped
    from fractal_mlops.stores.locations import sqlite_lock

    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        guard = InterruptGuard().install()
        with guard.deferred():  # a run being closed: the guard holds signals itself
            with sqlite_lock(f"sqlite:///{tmp_path / 'mlflow.db'}"):
                signal.raise_signal(signal.SIGTERM)
        with pytest.raises(Stopped) as stopped:
            guard.raise_pending()
        assert stopped.value.signum == signal.SIGTERM
        with pytest.raises(Stopped):  # and outside any hold it interrupts after the write
            with sqlite_lock(f"sqlite:///{tmp_path / 'mlflow.db'}"):
                signal.raise_signal(signal.SIGINT)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
