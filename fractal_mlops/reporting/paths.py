"""Where a study's report goes by default, and its size: light, for the report command's checks."""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_TOP = 10


def default_out_dir(experiment: str) -> Path:
    return Path("mlruns") / "reports" / re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)
