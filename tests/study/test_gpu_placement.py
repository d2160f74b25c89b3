"""Several GPUs on one host: `--workers N` places worker i on GPU i mod G, each worker sees its
GPU alone (CUDA_VISIBLE_DEVICES), and its trials record where they ran. Checked on a CPU by
injecting the GPU count (FRACTAL_GPU_COUNT)."""

from __future__ import annotations

import re

import pytest
from helpers import StudyDir, assert_refused, run_module, write_config


@pytest.fixture
def no_gpu_settings(monkeypatch):
    for name in ("FRACTAL_GPU_COUNT", "FRACTAL_GPU_MEMORY_SHARE", "FRACTAL_WORKER_GPU",
                 "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_four_workers_on_two_gpus_take_turns(no_gpu_settings):
    from fractal_mlops.search.launcher import worker_environments

    no_gpu_settings.setenv("FRACTAL_GPU_COUNT", "2")
    envs = worker_environments(4, {"FRACTAL_THREADS": "4"}, "cpu")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0", "1"]
    assert [e["FRACTAL_WORKER_GPU"] for e in envs] == ["0/2", "1/2", "0/2", "1/2"]
    assert [e["FRACTAL_WORKER_INDEX"] for e in envs] == ["1", "2", "3", "4"]
    assert {e["FRACTAL_THREADS"] for e in envs} == {"4"}

    # the host's own CUDA_VISIBLE_DEVICES names the GPUs (indices, UUIDs or MIG devices)
    no_gpu_settings.setenv("CUDA_VISIBLE_DEVICES", "GPU-aa,GPU-bb,GPU-cc")
    envs = worker_environments(3, {}, "cpu")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["GPU-aa", "GPU-bb", "GPU-aa"]
    assert [e["FRACTAL_WORKER_GPU"] for e in envs] == ["GPU-aa/2", "GPU-bb/1", "GPU-aa/2"]
    no_gpu_settings.setenv("CUDA_VISIBLE_DEVICES", "3")  # never a GPU the host hides
    assert [e["CUDA_VISIBLE_DEVICES"] for e in worker_environments(2, {}, "cpu")] == ["3", "3"]


def test_without_gpus_workers_are_not_placed(no_gpu_settings):
    from fractal_mlops.search.launcher import worker_environments

    envs = worker_environments(2, {}, "cpu")
    assert all("CUDA_VISIBLE_DEVICES" not in e and "FRACTAL_WORKER_GPU" not in e for e in envs)


def test_the_placement_and_the_memory_share_are_trial_params(no_gpu_settings):
    from fractal_mlops.engine.gpus import memory_fraction, placement_params

    assert placement_params("cuda") == {}
    no_gpu_settings.setenv("FRACTAL_WORKER_GPU", "1/2")
    assert placement_params("cpu") == {"gpu": "1", "gpu_workers": 2}
    no_gpu_settings.setenv("FRACTAL_GPU_MEMORY_SHARE", "even")
    assert memory_fraction() == 0.5
    assert placement_params("cuda") == {"gpu": "1", "gpu_workers": 2, "gpu_memory_fraction": 0.5}
    no_gpu_settings.setenv("FRACTAL_GPU_MEMORY_SHARE", "0.3")
    assert memory_fraction() == 0.3


@pytest.mark.parametrize("name, value", [("FRACTAL_GPU_COUNT", "two"),
                                         ("FRACTAL_GPU_MEMORY_SHARE", "1.5"),
                                         ("FRACTAL_GPU_MEMORY_SHARE", "half")])
def test_a_bad_gpu_setting_is_bad_input(tmp_path, name, value):
    study = StudyDir(tmp_path)
    proc = run_module("fractal_mlops.study", *study.args(), cwd=tmp_path,
                      env={**study.env(), name: value})
    assert_refused(proc, name)
    assert list(tmp_path.iterdir()) == []  # nothing created


@pytest.mark.slow
def test_each_worker_records_the_gpu_it_was_placed_on(tmp_path):
    """Two workers on two injected GPUs: each trial run names its worker's GPU."""
    study = StudyDir(tmp_path)
    config = write_config(tmp_path / "gpus.yaml", study_name="gpus",
                          space={"blocks": [1], "columns": [1, 2], "width": [8],
                                 "unit": ["conv-norm-act"]}, training={"epochs": 1})
    env = {**study.env(), "FRACTAL_GPU_COUNT": "2"}
    proc = study.run("--config", str(config), *study.args("--workers", "2", "--device", "cpu",
                                                          "--no-report"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "GPU 0: worker 1" in proc.stdout and "GPU 1: worker 2" in proc.stdout
    # "[worker 2] trial    1 COMPLETE ...": which worker trained which trial
    trained_by = {int(number): int(index) for index, number in
                  re.findall(r"\[worker (\d)\] trial\s+(\d+)\s+(?:COMPLETE|PRUNED|FAIL)", proc.stdout)}
    runs = study.runs("gpus")
    assert len(runs) == 2 and len(trained_by) == 2, proc.stdout
    for run in runs:
        index = trained_by[int(run.data.tags["optuna.trial_number"])]
        assert run.data.params["gpu"] == str((index - 1) % 2), (index, run.data.params)
        assert run.data.params["gpu_workers"] == "1"
