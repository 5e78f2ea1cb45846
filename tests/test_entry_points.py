"""The ``[project.scripts]`` commands in pyproject.toml: each names a module and function that exist and
answers ``--help`` as a console script would call it (``sys.exit(main())``)."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from conftest import REPO_ROOT

SCRIPTS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_commands_people_type_are_declared() -> None:
    assert {"armpipe-status", "armpipe-eval", "armpipe-keys"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_entry_point_runs_and_answers_help(name: str) -> None:
    module, function = SCRIPTS[name].split(":")
    code = f"import sys; from {module} import {function}; sys.argv = [{name!r}, '--help']; sys.exit({function}())"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {name}")


@pytest.mark.parametrize("module", ["nodes.camera", "nodes.state_reader"])  # a node room and a node module
def test_a_node_run_as_a_module_names_the_module_in_its_usage(module: str) -> None:
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {module} "), result.stdout.splitlines()[:1]


def test_offline_eval_run_as_a_module_names_the_command() -> None:
    result = subprocess.run([sys.executable, "-m", "common.tools.offline_eval", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m common.tools.offline_eval "), result.stdout.splitlines()[:1]


def test_a_nodes_help_gives_its_summary_and_how_to_override_a_field() -> None:
    """The openpi gateway hands its whole docstring to the shared start: --help shows its first paragraph only
    (not the usage example and the prose folded into one run-on paragraph) and says how to override a field."""
    result = subprocess.run([sys.executable, "-m", "nodes.openpi_gateway", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    description = " ".join(result.stdout.split("\n\n")[1].split())
    assert description == ("openpi gateway: openpi clients get action chunks from armpipe's policy node. Any config "
                           "field can be overridden: --<field>.<sub>=<value>, e.g. --actuator.dry_run=true.")
