"""The one command-line layer: every command reachable three ways, one exit-code table, and the
same one-line refusal (credentials hidden) from every command."""

from __future__ import annotations

import pytest
from helpers import assert_refused, run_module

SECRET = "s3cr3t-pw"
UNREACHABLE = f"postgresql://user:{SECRET}@127.0.0.1:9/db"


def test_python_dash_m_fractal_mlops_runs_a_command():
    done = run_module("fractal_mlops", "space")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("fractalnet-quickstart: 12 distinct variants")


def test_python_dash_m_fractal_mlops_refuses_an_unknown_command():
    assert_refused(run_module("fractal_mlops", "trian"), "unknown command", "'trian'", "study")


@pytest.mark.parametrize("command", ["promote", "report", "reproduce"])
def test_every_command_refuses_an_unreachable_store_in_one_line_without_its_password(command):
    args = ["RUN"] if command == "reproduce" else []
    done = run_module("fractal_mlops", command, *args, "--tracking-uri", UNREACHABLE, timeout=60)
    line = assert_refused(done)
    assert SECRET not in done.stderr + done.stdout
    assert "***" in line


@pytest.mark.parametrize("command", ["study", "space", "promote", "report", "reproduce"])
def test_every_command_answers_a_bad_flag_in_one_line(command):
    args = ["RUN"] if command == "reproduce" else []
    assert_refused(run_module("fractal_mlops", command, *args, "--no-such-flag"), "--no-such-flag")
