"""kill -9 of a worker in the middle of a trial: the next run marks it FAIL ("worker lost"),
continues its MLflow run from the last saved state and completes the grid with no duplicates."""

from __future__ import annotations

import collections
import signal

import pytest
from helpers import (
    LONG_TRIAL,
    StudyDir,
    finished_points,
    kill_mid_trial_then_resume,
    other_host_command,
    write_config,
)


@pytest.mark.slow
def test_kill_9_with_the_local_store(study_dir: StudyDir):
    config = write_config(study_dir.root / "tiny.yaml", **LONG_TRIAL)
    kill_mid_trial_then_resume(study_dir, config, *study_dir.args())


def test_workers_on_other_hosts_are_lost_when_their_heartbeat_stops(tmp_path):
    """Across hosts a pid means nothing: a trial whose heartbeat is older than the grace
    period is lost; a fresh heartbeat, or a live local process, keeps the trial running."""
    import time

    import optuna

    from fractal_mlops.search.claims import recover_lost_trials
    from fractal_mlops.stores.optuna_storage import (
        HEARTBEAT_GRACE,
        open_storage,
        resolve_storage,
        worker_identity,
    )
    from fractal_mlops.tracking.names import ROLE
    from fractal_mlops.tracking.tracker import Tracker, configure

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(resolve_storage(f"journal:{tmp_path / 'optuna.journal'}", None))
    study = optuna.create_study(storage=storage, study_name="hosts", direction="maximize")
    configure(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "hosts")
    now = time.time()
    workers = {
        "silent": ("gpu-box-7:4242:99", now - HEARTBEAT_GRACE - 30),
        "beating": ("gpu-box-8:4242:99", now - 5),
        "local-alive": (worker_identity(), now - HEARTBEAT_GRACE - 30),
    }
    runs = {}
    for name, (identity, heartbeat) in workers.items():
        trial = study.ask()
        tags = {ROLE: "trial", "optuna.study_name": "hosts", "optuna.trial_number": str(trial.number)}
        run_id = tracker.client.create_run(tracker.experiment_id, run_name=name,
                                           tags=tags).info.run_id
        trial.set_user_attr("worker", identity)
        trial.set_user_attr("heartbeat", heartbeat)
        trial.set_user_attr("mlflow_run_id", run_id)
        runs[name] = (trial.number, run_id)

    lost = recover_lost_trials(study, tracker)

    assert lost == [runs["silent"][0]]
    trials = {t.number: t for t in study.get_trials()}
    assert trials[runs["silent"][0]].state.name == "FAIL"
    assert trials[runs["silent"][0]].user_attrs["reason"] == "worker lost"
    assert tracker.client.get_run(runs["silent"][1]).info.status == "KILLED"
    for name in ("beating", "local-alive"):
        assert trials[runs[name][0]].state.name == "RUNNING"
        assert tracker.client.get_run(runs[name][1]).info.status == "RUNNING"


@pytest.mark.slow
def test_a_worker_taken_for_lost_drops_that_trial_and_carries_on(study_dir: StudyDir):
    """Another host's worker declares this one lost (its heartbeat looked stale) while it still
    trains: it stops that trial without a traceback, the point is trained again, and the run of
    the dropped trial is closed."""
    import optuna

    from fractal_mlops.stores import optuna_trials

    config = write_config(study_dir.root / "tiny.yaml", study_name="taken", **LONG_TRIAL)
    proc = study_dir.popen("--config", str(config), *study_dir.args())
    run_id = study_dir.wait_for_running_trial(proc, epochs=1)
    study = study_dir.optuna_study("taken")
    running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert len(running) == 1
    # what recover_lost_trials does on another host when this worker's heartbeat looks stale
    optuna_trials.set_attr(study, running[0], "reason", "worker lost")
    study.tell(running[0].number, state=optuna.trial.TrialState.FAIL)

    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    trials = study_dir.optuna_trials("taken")
    points = finished_points(trials)
    assert len(points) == 2 and set(points.values()) == {1}
    assert running[0].params["variant"] in points  # trained again
    # the dropped trial's run was closed, then carried on by the point's next trial
    dropped = study_dir.client().get_run(run_id)
    assert dropped.info.status == "FINISHED" and dropped.data.tags["fractal.state"] == "COMPLETE"
    retried = [t for t in trials if t.params["variant"] == running[0].params["variant"]
               and t.state.name == "COMPLETE"]
    assert [t.user_attrs["mlflow_run_id"] for t in retried] == [run_id]
    assert not study_dir.running_trial_runs()


@pytest.mark.slow
def test_a_tracking_server_that_goes_away_stops_the_worker_and_the_point_is_trained_later(
        tmp_path, monkeypatch):
    """The MLflow server dies mid-trial: the worker stops with one line (exit 1) instead of
    failing every remaining point against a dead store; the point stays pending, and the next
    run, with the server back, continues the orphaned run from its last saved state."""
    from servers import mlflow_server

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast, not after minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    backend, artifacts = f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts"
    # LONG_TRIAL's 40 epochs: the trial still trains while the server stops (a few seconds)
    config = write_config(tmp_path / "tiny.yaml", study_name="outage", **LONG_TRIAL)
    with mlflow_server(backend, artifacts) as uri:
        study = StudyDir(tmp_path, tracking_uri=uri)
        proc = study.popen("--config", str(config), *study.args())
        orphan = study.wait_for_running_trial(proc, epochs=1)
    out, err = proc.communicate(timeout=300)  # the server is gone now

    assert proc.returncode == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "tracking store is back" in err
    trials = study.optuna_trials("outage")
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 1 and failed[0].user_attrs["reason"] == "tracking store unavailable"

    with mlflow_server(backend, artifacts) as uri:
        study = StudyDir(tmp_path, tracking_uri=uri)
        assert study.client().get_run(orphan).info.status == "RUNNING"  # nobody could close it
        resumed = study.run("--config", str(config), *study.args())
        assert resumed.returncode == 0, resumed.stderr
        # the point's next trial carried the orphaned run on, from its last saved state
        continued = study.client().get_run(orphan)
        assert continued.info.status == "FINISHED", continued.data.tags
        assert continued.data.tags["fractal.state"] == "COMPLETE"
        assert "fractal.reason" not in continued.data.tags
        assert continued.data.tags["optuna.trial_number"] != str(failed[0].number)
        assert not study.running_trial_runs()
    trials = study.optuna_trials("outage")
    points = collections.Counter(t.params["variant"] for t in trials
                                 if t.user_attrs.get("reason") != "tracking store unavailable")
    assert len(points) == 2 and set(points.values()) == {1}  # the lost point was trained again
    assert failed[0].params["variant"] in points


def test_the_heartbeat_refreshes_while_the_trial_runs(tmp_path, monkeypatch):
    """A worker on another host is judged by its heartbeat alone: it must keep beating."""
    import time

    import optuna

    from fractal_mlops.search.claims import Heartbeat
    from fractal_mlops.stores.optuna_storage import open_storage, resolve_storage

    monkeypatch.setenv("FRACTAL_HEARTBEAT_SECONDS", "0.1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(resolve_storage(f"journal:{tmp_path / 'optuna.journal'}", None))
    study = optuna.create_study(storage=storage, study_name="beats", direction="maximize")
    trial = study.ask()
    trial.set_user_attr("heartbeat", 0.0)
    seen = set()
    heartbeat = Heartbeat(study, trial)
    with heartbeat:
        deadline = time.monotonic() + 30
        while len(seen - {0.0}) < 3 and time.monotonic() < deadline:
            seen.add(study.get_trials()[0].user_attrs["heartbeat"])
            time.sleep(0.05)
    assert len(seen - {0.0}) >= 3, seen  # beat after beat, not once
    # and it stops with the trial: the beating thread has ended, so no beat can follow
    assert not heartbeat._thread.is_alive()


@pytest.mark.slow
def test_a_live_worker_on_another_host_is_never_taken_for_lost(study_dir: StudyDir, monkeypatch):
    """A worker under another host name trains past the grace period; its heartbeat keeps its
    trial alive for the other workers, which must not train its point a second time."""
    import subprocess
    import sys
    import time

    from fractal_mlops.search.claims import recover_lost_trials
    from fractal_mlops.tracking.tracker import Tracker, configure

    config = write_config(study_dir.root / "far.yaml", study_name="far",
                          space={"blocks": [1], "columns": [2], "width": [8],
                                 "unit": ["conv-norm-act"]}, training={"epochs": 2000})
    env = {**study_dir.env(), "FRACTAL_HEARTBEAT_SECONDS": "0.5", "FRACTAL_HEARTBEAT_GRACE": "2"}
    far = subprocess.Popen(
        [*other_host_command("far-host"), sys.executable, "-m", "fractal_mlops.study", "--config",
         str(config), *study_dir.args()], cwd=study_dir.root, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        study_dir.wait_for_running_trial(far, epochs=1)
        [trial] = study_dir.optuna_trials("far")
        assert trial.user_attrs["worker"].startswith("far-host:")
        while time.time() - trial.datetime_start.timestamp() < 3 * 2:  # well past the grace
            assert far.poll() is None, far.communicate()[1]
            time.sleep(0.2)
        monkeypatch.setenv("FRACTAL_HEARTBEAT_SECONDS", "0.5")  # this host: the same settings
        monkeypatch.setenv("FRACTAL_HEARTBEAT_GRACE", "2")
        configure(study_dir.tracking_uri)
        lost = recover_lost_trials(study_dir.optuna_study("far"),
                                   Tracker(study_dir.tracking_uri, "far"))
        assert lost == []
        [trial] = study_dir.optuna_trials("far")
        assert trial.state.name == "RUNNING"
    finally:
        far.send_signal(signal.SIGINT)
        far.communicate(timeout=120)
    [trial] = study_dir.optuna_trials("far")
    assert trial.user_attrs["reason"] == "interrupted"  # ended by us, never taken for lost
