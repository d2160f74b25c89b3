"""The study tests' fixtures (the study command end to end, on real stores and servers).

The servers' fixtures (`postgres`, `mlflow_server_on_postgres`) come from tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import StudyDir


@pytest.fixture
def study_dir(tmp_path: Path) -> StudyDir:
    """A working directory with its own stores, in tmp_path."""
    return StudyDir(tmp_path)
