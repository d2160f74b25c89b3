"""The README's two set-up commands are the ones CI and newcomers run."""

from __future__ import annotations

import re

from helpers import REPO


def setup_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines()
            if line.startswith("    python3 -m venv")]


def test_readme_has_exactly_two_setup_commands_main_job_and_tests():
    commands = setup_commands()
    assert len(commands) == 2
    assert commands[0].endswith("python -m fractal_mlops.study")
    assert commands[1].endswith("python -m pytest")


def test_ci_runs_the_readmes_test_command_verbatim():
    ci = (REPO / ".ci" / "run").read_text()
    assert setup_commands()[1] in ci.splitlines()
    assert re.search(r"^set -euo pipefail$", ci, re.M)  # pytest's exit 5 (no tests) fails CI


def test_the_default_config_is_shipped_inside_the_package():
    from fractal_mlops.config.experiment import default_config_path

    shipped = default_config_path()
    assert shipped.read_text() == (REPO / "experiments" / "quickstart.yaml").read_text()
