"""The supervisord programs generated from the deployment YAML (common.tools.supervisor_programs): every
role and task loads in supervisor's own config parser through the real supervisord.conf, with the
program names, groups, priorities and options the pipeline has always run; a camera added to the config
gets its program; an unknown role is refused with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, free_endpoint, write_config
from supervisor.options import ServerOptions

from common.tools.supervisor_programs import PROGRAMS_FILE, ROLES, write_programs

TASKS = ("lift", "stack", "sort")


def load_in_supervisor(role: str, config_path: Path, run_dir: Path,
                       monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """Generate the role's programs as ``.ci/supervise`` does and let supervisor parse supervisord.conf."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    write_programs(role, config_path, run_dir / PROGRAMS_FILE)
    for key, value in {"ARMPIPE_ROLE": role, "ARMPIPE_TASK": "x", "ARMPIPE_CONFIG": str(config_path),
                       "ARMPIPE_RUN": str(run_dir), "ARMPIPE_SUPERVISOR_PORT": "9",
                       "ARMPIPE_PYTHON": sys.executable}.items():
        monkeypatch.setenv(key, value)
    options = ServerOptions()
    options.realize(args=["-c", str(REPO_ROOT / "supervisord.conf")])
    return {group.name: group.process_configs for group in options.process_group_configs}


def summary(groups: dict[str, list[Any]]) -> list[tuple[str, str, int]]:
    return [(group, proc.name, proc.priority) for group, procs in groups.items() for proc in procs]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("role", ROLES)
def test_every_role_and_task_loads_in_supervisord(role: str, task: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    config_path = REPO_ROOT / "configs" / f"{task}.yaml"
    groups = load_in_supervisor(role, config_path, tmp_path / "run", monkeypatch)
    assert set(groups) <= {"robot", "server"} and groups
    for procs in groups.values():
        for proc in procs:
            node = REPO_ROOT / "nodes" / proc.command.split(" -m nodes.")[1].split()[0]
            assert (node / "__main__.py").exists() or node.with_suffix(".py").exists()
            assert f"--config {config_path}" in proc.command
            assert proc.directory == str(REPO_ROOT)
            assert proc.autorestart is not True and proc.exitcodes == [0, 2]  # exit 2: config error, stays EXITED
            assert proc.startsecs == 2 and proc.startretries == 1000
            assert proc.stopasgroup and proc.killasgroup
            assert proc.stdout_logfile == str(tmp_path / "run" / "logs" / f"{proc.name}.log")
            assert proc.environment == {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if role in ("demo", "server"):
        assert [proc.name for proc in groups["server"]] == ["policy"]
    else:
        assert "server" not in groups


def test_demo_and_robot_sim_programs_are_the_ones_the_pipeline_runs(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    demo = load_in_supervisor("demo", REPO_ROOT / "configs" / "lift.yaml", tmp_path / "demo", monkeypatch)
    assert summary(demo) == [("robot", "servo_emulator-main", 10), ("robot", "dataset_player", 30),
                             ("robot", "actuator", 40), ("robot", "recorder", 50), ("robot", "monitor", 60),
                             ("server", "policy", 20)]
    commands = {proc.name: proc for proc in demo["robot"]}
    assert commands["actuator"].command.endswith("--actuator.auto_start=true")
    assert commands["servo_emulator-main"].command.endswith("--name main")
    assert commands["recorder"].command.startswith("nice -n 10 ") and commands["recorder"].stopwaitsecs == 30
    assert commands["monitor"].command.startswith("nice -n 10 ") and commands["monitor"].stopwaitsecs == 10

    sim = load_in_supervisor("robot-sim", REPO_ROOT / "configs" / "sort.yaml", tmp_path / "sim", monkeypatch)
    assert summary(sim) == [("robot", "servo_emulator-left", 10), ("robot", "servo_emulator-right", 10),
                            ("robot", "camera-front", 30), ("robot", "camera-left_wrist", 30),
                            ("robot", "camera-right_wrist", 30), ("robot", "state_reader-left", 30),
                            ("robot", "state_reader-right", 30), ("robot", "actuator", 40),
                            ("robot", "recorder", 50), ("robot", "monitor", 60)]
    camera = next(proc for proc in sim["robot"] if proc.name == "camera-left_wrist")
    assert camera.command.endswith("--name left_wrist --cameras.left_wrist.backend=synthetic")
    robot = load_in_supervisor("robot", REPO_ROOT / "configs" / "sort.yaml", tmp_path / "robot", monkeypatch)
    assert "synthetic" not in " ".join(proc.command for proc in robot["robot"])
    assert not any(proc.name.startswith("servo_emulator") for proc in robot["robot"])


def test_a_camera_added_to_the_config_gets_its_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_path = write_config(tmp_path, "lift", {"cameras": {"top": {
        "endpoint": free_endpoint(), "backend": "synthetic", "width": 64, "height": 48, "fps": 30}}})
    groups = load_in_supervisor("robot", config_path, tmp_path / "run", monkeypatch)
    assert [proc.name for proc in groups["robot"]] == ["camera-front", "camera-wrist", "camera-top",
                                                        "state_reader-main", "actuator", "recorder", "monitor"]


def test_an_unknown_role_is_refused_with_exit_code_2(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "common.tools.supervisor_programs", "--role", "robots",
                             "--config", str(REPO_ROOT / "configs" / "lift.yaml"), "--output",
                             str(tmp_path / PROGRAMS_FILE)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "role" in result.stderr and "'robots'" in result.stderr and "robot-sim" in result.stderr
    assert not (tmp_path / PROGRAMS_FILE).exists()
