"""Settings that cannot work here, names the stores refuse, files that are not images, YAML's
own forms: one line, exit 2, nothing written; and a config fixed after a failed first attempt
runs under the same study name."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml
from helpers import StudyDir, assert_refused, image_folder, write_config

from fractal_mlops.config.experiment import load_config
from fractal_mlops.errors import ConfigError
from fractal_mlops.search.preflight import check_workers, usable_cores


def written(root: Path) -> list[str]:
    """Store files a command left in `root` (anything but the configs and the data)."""
    return sorted(p.name for p in root.iterdir()
                  if p.suffix not in (".yaml",) and p.name not in ("images", "cache"))


# -- YAML's own forms ---------------------------------------------------------------------------

def test_yaml_1_1_forms_mean_what_the_user_wrote(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  lr: 1e-3\n  amp: off\n  epochs: 2.0\n  weight_decay: 5E-4\n"
                    "pruning:\n  pruner: off\nspace:\n  dropout: [0, 1e-1]\nstudy_name: 2024\n")
    config = load_config(str(path))
    assert config.training.lr == pytest.approx(0.001)
    assert config.training.amp == "off"
    assert config.training.epochs == 2 and isinstance(config.training.epochs, int)
    assert config.training.weight_decay == pytest.approx(5e-4)
    assert config.pruning.pruner == "none"
    assert config.space["dropout"] == [0.0, 0.1]
    assert config.study_name == "2024"


@pytest.mark.parametrize("text, words", [
    ("training:\n  amp: on\n", ["training.amp", "quote"]),
    ("training:\n  optimizer: yes\n", ["training.optimizer", "quote"]),
    ("training:\n  epochs: 2.5\n", ["training.epochs", "int"]),
    ("training:\n  lr: 1e-3x\n", ["training.lr", "float"]),
])
def test_yaml_forms_that_stay_ambiguous_say_how_to_write_them(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    for word in words:
        assert word in str(info.value)


# -- settings that cannot work for config + device -----------------------------------------------

CANNOT_WORK = {
    "fp16 on the CPU": ({"training": {"amp": "fp16"}}, ["fp16", "cpu"]),
    "batch larger than the data": ({"training": {"batch_size": 100000}}, ["batch_size", "1437"]),
    "deeper than the images": ({"space": {"blocks": [1, 4]}}, ["blocks 4", "8x8"]),
}


@pytest.mark.parametrize("case", sorted(CANNOT_WORK))
@pytest.mark.parametrize("workers", ["1", "2"])
def test_settings_that_cannot_work_stop_before_anything_is_written(tmp_path, case, workers):
    sections, words = CANNOT_WORK[case]
    config = write_config(tmp_path / "c.yaml", **sections)
    study = StudyDir(tmp_path)
    proc = study.run("--config", str(config), "--device", "cpu",
                     *study.args("--workers", workers), timeout=300)
    assert_refused(proc, *words)
    assert written(tmp_path) == []


def test_more_workers_than_the_machine_holds_is_refused(tmp_path):
    study = StudyDir(tmp_path)
    config = write_config(tmp_path / "c.yaml")
    proc = study.run("--config", str(config), *study.args("--workers", "1000"), timeout=300)
    assert_refused(proc, "--workers 1000", f"at most {usable_cores()}")
    assert written(tmp_path) == []
    with pytest.raises(ConfigError, match="GiB of memory"):
        check_workers(usable_cores(), data_bytes=2**50)  # a dataset no machine here holds
    check_workers(usable_cores())


@pytest.mark.slow
def test_a_fixed_config_reruns_under_the_same_name_when_nothing_was_trained(tmp_path):
    """The first attempt is stopped before its first epoch ends: nothing trained. The config
    is then changed; the same study name takes it and trains."""
    study = StudyDir(tmp_path)
    slow = write_config(tmp_path / "slow.yaml", study_name="again",
                        space={"columns": [3], "width": [256], "unit": ["conv-norm-act"]},
                        training={"epochs": 1}, data={"name": "digits"})
    proc = study.popen("--config", str(slow), *study.args("--n-trials", "1"))
    study.wait_for_running_trial(proc, epochs=0)  # before its first epoch ends
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    first = study.optuna_trials("again")
    assert [t.state.name for t in first] == ["FAIL"] and not first[0].intermediate_values

    fixed = write_config(tmp_path / "fixed.yaml", study_name="again")
    done = study.run("--config", str(fixed), *study.args("--n-trials", "1"))
    assert done.returncode == 0, done.stderr
    assert "starting it afresh" in done.stderr
    assert [t.state.name for t in study.optuna_trials("again")] in (["COMPLETE"], ["PRUNED"])

    # once something trained, a changed config is refused as before
    changed = write_config(tmp_path / "changed.yaml", study_name="again", training={"lr": 0.2})
    assert_refused(study.run("--config", str(changed), *study.args()), "different config")


# -- names and files the OS or the stores refuse --------------------------------------------------

@pytest.mark.parametrize("name, words", [
    ("x" * 300, ["300 bytes", "at most 200"]),
    ("é" * 150, ["300 bytes"]),
    ("tab\there", ["control characters"]),
    ("back\\slash", ["backslashes"]),
])
def test_names_the_stores_refuse_create_nothing(tmp_path, name, words):
    study = StudyDir(tmp_path)
    config = write_config(tmp_path / "c.yaml")
    proc = study.run("--config", str(config), *study.args("--study-name", name), timeout=120)
    assert_refused(proc, *words)
    assert written(tmp_path) == []


@pytest.mark.parametrize("kind", ["not an image", "another size"])
def test_image_folder_with_a_bad_file_is_refused_naming_it(tmp_path, kind):
    from PIL import Image

    root = image_folder(tmp_path / "images")
    if kind == "not an image":
        bad = root / "train" / "dog" / "0007.jpg"
        bad.write_bytes(b"<html>a download that failed</html>")
        words = ["0007.jpg", "not a readable image", "1 such file"]
    else:
        bad = root / "test" / "cat" / "0009.png"
        Image.new("RGB", (48, 40)).save(bad)
        words = ["0009.png", "48x40", "32x32"]
    config = write_config(tmp_path / "c.yaml", data={"name": "cifar10", "root": str(root)},
                          space={"blocks": [1]})
    study = StudyDir(tmp_path)
    proc = study.run("--config", str(config), *study.args(), timeout=300)
    assert_refused(proc, *words)
    assert written(tmp_path) == []


def test_written_helper_sees_store_files(tmp_path):
    (tmp_path / "optuna.journal").write_text("")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({}))
    assert written(tmp_path) == ["optuna.journal"]
