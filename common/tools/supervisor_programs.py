"""``python -m common.tools.supervisor_programs --role demo --config configs/lift.yaml --output run/...conf``:
the supervisord programs of one role, generated from the deployment YAML.

``.ci/supervise`` (and the test harness) write them to ``$ARMPIPE_RUN/supervisor-programs.conf`` just
before supervisord starts; ``supervisord.conf`` includes that file. Which programs a role runs comes from
the config (one servo emulator and state-reader per arm, one camera per camera); how each program is
supervised (priority, start and stop behaviour) is ``NODE_OPTIONS`` below, one entry per node, so a change
of supervision policy is one edit here.

Roles: ``demo`` (everything on one machine without hardware: servo emulators, dataset player, actuator
with auto start, recorder, monitor, and the policy), ``robot`` (cameras, state-readers, actuator,
recorder, monitor), ``robot-sim`` (the robot's programs with synthetic cameras and emulated servo buses)
and ``server`` (the policy, and with ``policy.standby`` a second one waiting to take over; with
``openpi.gateway.enabled`` the openpi gateway in front of it, also in ``demo``). Groups:
``robot:`` and ``server:`` (``supervisorctl restart robot:actuator``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.config import REPO_ROOT, ConfigError, DeploymentConfig, load_config

log = logging.getLogger("armpipe.supervisor_programs")

ROLES = ("demo", "robot", "robot-sim", "server")
PROGRAMS_FILE = "supervisor-programs.conf"  # under $ARMPIPE_RUN; supervisord.conf includes it
ROBOT_GROUP = "robot"
SERVER_GROUP = "server"
OPENPI_GATEWAY_PROGRAM = "openpi_gateway"  # openpi.gateway.enabled: openpi clients reach the policy through it
STANDBY_PROGRAM = "policy-standby"  # policy.standby: true; supervisord names the process (SUPERVISOR_PROCESS_NAME)


class RoleError(ValueError):
    """An unknown role (the message names the roles there are)."""


@dataclass(frozen=True)
class ProgramOptions:
    """How supervisord runs one node. Exit code 2 is a configuration, checkpoint or dataset error that a
    restart cannot fix, so it counts as expected and the program stays EXITED with its reason logged.
    That holds only for a process that outlived ``startsecs`` (an earlier exit is a failed start, retried
    with back-off whatever its code): a refusing node asks supervisord for its ``startsecs`` and lives
    that long first (``common.refusal``), so any value here works for both refusals and crashes."""

    priority: int  # start order (low first); stop order is the reverse
    nice: int = 0  # run under ``nice -n`` (work that must never take CPU from the control loop)
    autostart: bool = True
    autorestart: str = "unexpected"
    exitcodes: str = "0,2"
    startsecs: int = 2
    startretries: int = 1000
    stopsignal: str = "TERM"
    stopwaitsecs: int = 10
    stopasgroup: bool = True
    killasgroup: bool = True
    environment: dict[str, str] = field(default_factory=lambda: {
        "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


# The one place that says how each node is supervised.
NODE_OPTIONS: dict[str, ProgramOptions] = {
    "servo_emulator": ProgramOptions(priority=10),
    "policy": ProgramOptions(priority=20),
    "openpi_gateway": ProgramOptions(priority=25),  # waits for the policy's contract itself
    "camera": ProgramOptions(priority=30),
    "state_reader": ProgramOptions(priority=30),
    "dataset_player": ProgramOptions(priority=30),
    "actuator": ProgramOptions(priority=40),
    "recorder": ProgramOptions(priority=50, nice=10, stopwaitsecs=30),  # finishing an episode takes a while
    "monitor": ProgramOptions(priority=60, nice=10),
}

ROLE_DESCRIPTIONS = {
    "demo": "Everything on one machine without hardware: the dataset player replaces cameras and state-readers, "
            "the actuator drives emulated servos, the policy runs on the CPU.",
    "robot": "The robot computer: cameras, state-readers, actuator, monitor, recorder. The policy runs on the GPU "
             "server (role server); set policy.endpoint in the config to reach it.",
    "robot-sim": "The robot computer's programs with simulated hardware (synthetic cameras, emulated servo buses) "
                 "for trying the two-machine set-up without an arm.",
    "server": "The GPU server: the policy node only.",
}


# supervisord's XML-RPC as the programs it starts reach it (supervisord.conf listens on this port).
SUPERVISOR_URL = "http://127.0.0.1:%(ENV_ARMPIPE_SUPERVISOR_PORT)s/RPC2"


@dataclass(frozen=True)
class Program:
    name: str  # supervisord's program name (``camera-front``); the readiness file has the same name
    node: str  # the module under nodes/
    group: str
    args: tuple[str, ...] = ()

    @property
    def options(self) -> ProgramOptions:
        return NODE_OPTIONS[self.node]


def programs(role: str, config: DeploymentConfig) -> list[Program]:
    """The programs of ``role`` for ``config``, in the order supervisord lists them."""
    if role not in ROLES:
        raise RoleError(f"role: expected one of {list(ROLES)}, got {role!r}")
    robot: list[Program] = []
    if role in ("demo", "robot-sim"):
        robot += [Program(f"servo_emulator-{arm}", "servo_emulator", ROBOT_GROUP, ("--name", arm))
                  for arm in config.arms]
    if role == "demo":
        robot.append(Program("dataset_player", "dataset_player", ROBOT_GROUP))
    if role in ("robot", "robot-sim"):
        synthetic = role == "robot-sim"
        robot += [Program(f"camera-{cam}", "camera", ROBOT_GROUP,
                          ("--name", cam, *((f"--cameras.{cam}.backend=synthetic",) if synthetic else ())))
                  for cam in config.cameras]
        robot += [Program(f"state_reader-{arm}", "state_reader", ROBOT_GROUP, ("--name", arm)) for arm in config.arms]
    if role != "server":
        robot.append(Program("actuator", "actuator", ROBOT_GROUP,
                             ("--actuator.auto_start=true",) if role == "demo" else ()))
        # The panel asks the supervisord that runs it, on the port .ci/supervise gave it (not the config's 9001).
        robot += [Program("recorder", "recorder", ROBOT_GROUP),
                  Program("monitor", "monitor", ROBOT_GROUP, (f"--monitor.supervisor_url={SUPERVISOR_URL}",))]
    server = server_programs(config.policy.standby) if role in ("demo", "server") else []
    if role in ("demo", "server") and config.openpi.gateway.enabled:
        server.append(Program(OPENPI_GATEWAY_PROGRAM, "openpi_gateway", SERVER_GROUP))
    return robot + server


def server_programs(standby: bool) -> list[Program]:
    """The policy program, and with ``standby`` the same node a second time (whichever holds the serving
    lock serves); also what the image's ``STANDBY=1`` runs (docker/standby.py)."""
    server = [Program("policy", "policy", SERVER_GROUP)]
    if standby:
        server.append(Program(STANDBY_PROGRAM, "policy", SERVER_GROUP))
    return server


def _flag(value: bool) -> str:
    return "true" if value else "false"


def render_program(program: Program, directory: Path, *, command: str | None = None,
                   log_to_stdout: bool = False) -> str:
    """One ``[program:...]`` block with the node's ``NODE_OPTIONS``. ``command`` replaces the usual one
    (already in supervisord's syntax: ``%`` doubled); ``log_to_stdout`` sends its output to supervisord's
    own stdout instead of a rotated file (in a container, where ``docker logs`` reads stdout)."""
    opts = program.options
    if command is None:
        command = " ".join(["%(ENV_ARMPIPE_PYTHON)s", "-m", f"nodes.{program.node}", "--config",
                            "%(ENV_ARMPIPE_CONFIG)s", *program.args])
    if opts.nice:
        command = f"nice -n {opts.nice} {command}"
    environment = ",".join(f'{key}="{value}"' for key, value in opts.environment.items())
    return "\n".join([
        f"[program:{program.name}]",
        f"command={command}",
        f"priority={opts.priority}",
        f"directory={directory}",
        f"autostart={_flag(opts.autostart)}",
        f"autorestart={opts.autorestart}",
        f"exitcodes={opts.exitcodes}",
        f"startsecs={opts.startsecs}",
        f"startretries={opts.startretries}",
        f"stopsignal={opts.stopsignal}",
        f"stopwaitsecs={opts.stopwaitsecs}",
        f"stopasgroup={_flag(opts.stopasgroup)}",
        f"killasgroup={_flag(opts.killasgroup)}",
        "redirect_stderr=true",
        # /dev/stdout cannot be rotated: supervisord needs maxbytes 0 for it.
        *(["stdout_logfile=/dev/stdout", "stdout_logfile_maxbytes=0"] if log_to_stdout else
          ["stdout_logfile=%(ENV_ARMPIPE_RUN)s/logs/%(program_name)s.log", "stdout_logfile_maxbytes=10MB",
           "stdout_logfile_backups=5"]),
        f"environment={environment}",
    ])


def render(role: str, config: DeploymentConfig, source: str = "", directory: Path = REPO_ROOT) -> str:
    """The include file for ``role``: a header, one block per program, then the groups."""
    listed = programs(role, config)
    header = [f"; armpipe supervisord programs: role {role}, task {config.task}. Generated by",
              f"; common.tools.supervisor_programs from {source or 'the deployment config'} (do not edit: edit the",
              "; config or NODE_OPTIONS there). " + ROLE_DESCRIPTIONS[role]]
    blocks = [render_program(program, directory) for program in listed] + render_groups(listed)
    return "\n".join(header) + "\n\n" + "\n\n".join(blocks) + "\n"


def render_groups(listed: list[Program]) -> list[str]:
    """One ``[group:...]`` block per group that has programs (``supervisorctl restart server:policy``)."""
    blocks = []
    for group in (ROBOT_GROUP, SERVER_GROUP):
        members = [program.name for program in listed if program.group == group]
        if members:
            blocks.append(f"[group:{group}]\nprograms={','.join(members)}")
    return blocks


def write_programs(role: str, config_path: str | Path, output: str | Path) -> Path:
    """Generate the programs of ``role`` from the config at ``config_path`` into ``output``."""
    config = load_config(config_path)
    text = render(role, config, source=str(config_path))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", required=True, help=" | ".join(ROLES))
    parser.add_argument("--config", required=True, help="the deployment YAML")
    parser.add_argument("--output", required=True, help=f"the include file (normally $ARMPIPE_RUN/{PROGRAMS_FILE})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        path = write_programs(args.role, args.config, args.output)
    except (ConfigError, RoleError) as exc:
        log.error("%s", exc)
        return 2
    log.info("[armpipe] supervisord programs for role %s: %s", args.role, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
