"""Where a study's report goes by default, and its size: light, for the report command's checks."""

from __future__ import annotations

from pathlib import Path

from fractal_mlops.config.experiment import study_folder

DEFAULT_TOP = 10


def default_out_dir(experiment: str) -> Path:
    return Path("mlruns") / "reports" / study_folder(experiment)
