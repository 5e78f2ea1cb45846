"""``STANDBY=1`` in the policy server image: the policy node twice under supervisord, one serving and one
loaded and waiting to take over (``policy.standby``; docs/operations.md, "Standby" and "Docker").

Without it the image runs one node as its main process: when the node ends, so does the container, and
Docker's restart policy starts a fresh one that imports torch and LeRobot and loads the checkpoint again
(about 20 s warm on an H200). With it the entrypoint runs this script with the node's command line. The
script writes a supervisord config under ``/app/run`` holding the programs ``policy`` and
``policy-standby`` (the project's own program blocks, ``common.tools.supervisor_programs``, with their
output on the container's stdout) and runs supervisord in the foreground. Whichever node takes the
serving lock first serves; when it ends, the standby binds within 50 ms and supervisord restarts the
ended one, which becomes the next standby.

A refusal (exit 2: a config field, a checkpoint that does not fit, a missing key) cannot be fixed by a
restart, and the container must say so by ending with exit code 2, as without a standby. supervisord
leaves a refused program EXITED, so an event listener (this script with ``--listen``) watches for an
expected exit and stops supervisord; the script then exits 2 when a node recorded a refusal in
``run/refused/``. ``docker stop``'s SIGTERM is passed on to supervisord, which stops both nodes.

This script is the container's first process, so it also reaps orphans (a killed node's worker
processes are re-parented to it).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from common.config import REPO_ROOT
from common.refusal import EXIT_REFUSED, REFUSED_DIR, read_refusals
from common.tools.supervisor_programs import render_groups, render_program, server_programs

log = logging.getLogger("standby")

RUN_DIR = Path(os.environ.get("ARMPIPE_RUN") or REPO_ROOT / "run")  # /app/run in the image; a test sets its own
CONFIG_NAME = "supervisord-standby.conf"
PROGRAMS = server_programs(standby=True)  # policy and policy-standby, as role server with policy.standby


def supervisord_arg(arg: str) -> str:
    """One argument for a supervisord ``command=`` line: shell-quoted (supervisord splits it with shlex)
    and with ``%`` doubled (supervisord expands ``%(name)s`` first)."""
    return shlex.quote(arg).replace("%", "%%")


def render_config(node_args: list[str], run_dir: Path) -> str:
    """supervisord's whole config: itself in the foreground, its control socket for ``supervisorctl`` in
    the container, the two policy programs, and the refusal listener."""
    python = supervisord_arg(sys.executable)
    command = " ".join([python, "-m", "nodes.policy", *map(supervisord_arg, node_args)])
    run = supervisord_arg(str(run_dir))
    sections = [
        # In the foreground supervisord echoes its log to stdout already; a log file would say it twice.
        "\n".join(["[supervisord]", "nodaemon=true", "logfile=/dev/null", "logfile_maxbytes=0",
                   f"pidfile={run}/supervisord.pid", f"directory={REPO_ROOT}", "identifier=armpipe-docker"]),
        "\n".join(["[unix_http_server]", f"file={run}/supervisor.sock", "chmod=0700"]),
        "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        f"[supervisorctl]\nserverurl=unix://{run}/supervisor.sock",
        *(render_program(program, REPO_ROOT, command=command, log_to_stdout=True) for program in PROGRAMS),
        *render_groups(PROGRAMS),
        # The listener's stdout is supervisord's event protocol; what it says goes to stderr.
        "\n".join(["[eventlistener:refusals]", f"command={python} {supervisord_arg(__file__)} --listen",
                   "events=PROCESS_STATE_EXITED,PROCESS_STATE_FATAL", "stderr_logfile=/dev/stderr",
                   "stderr_logfile_maxbytes=0"]),
    ]
    return "; armpipe policy server with a standby (docker/standby.py writes this at every start)\n\n" + \
        "\n\n".join(sections) + "\n"


def listen() -> int:
    """supervisord event listener: an expected exit (code 0 or 2) or a FATAL start of a policy program
    ends the container instead of leaving it up with nothing serving."""
    from supervisor import childutils

    names = {program.name for program in PROGRAMS}
    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        fields, _ = childutils.eventdata(payload + "\n")
        final = headers["eventname"] == "PROCESS_STATE_FATAL" or fields.get("expected") == "1"
        if final and fields.get("processname") in names:
            log.error("%s ended for good (%s); stopping supervisord, the container exits",
                      fields.get("processname"), headers["eventname"])
            os.kill(os.getppid(), signal.SIGTERM)
        childutils.listener.ok(sys.stdout)


def copy_to_stdout(read_end: int) -> None:
    """Copy supervisord's output (and through it every program's) to this process's stdout until EOF."""
    while data := os.read(read_end, 65536):
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]
    os.close(read_end)


def supervise(node_args: list[str], run_dir: Path = RUN_DIR) -> int:
    """Write the config, run supervisord until it ends, and return the container's exit code."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # `docker restart` keeps the container's files: an earlier run's refusals must not count for this one.
    shutil.rmtree(run_dir / REFUSED_DIR, ignore_errors=True)
    config = run_dir / CONFIG_NAME
    config.write_text(render_config(node_args, run_dir), encoding="utf-8")
    os.environ["ARMPIPE_RUN"] = str(run_dir)  # where a refusing node records its reason (common.refusal)
    # supervisord reopens /dev/stdout for each program's output. The container's stdout belongs to root
    # (Docker's pipe, mode 0600), and the image's user may not reopen it (EACCES). So supervisord's stdout
    # and stderr are a pipe made here, by the image's user, and a thread copies it to the real stdout.
    read_end, write_end = os.pipe()
    relay = threading.Thread(target=copy_to_stdout, args=(read_end,), name="stdout-relay", daemon=True)
    relay.start()
    # supervisord of this very interpreter's environment (the image's /opt/venv), whatever PATH says.
    pid = os.posix_spawn(sys.executable, [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(config)],
                         os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, write_end, 1),
                                                   (os.POSIX_SPAWN_DUP2, write_end, 2),
                                                   (os.POSIX_SPAWN_CLOSE, read_end)])
    os.close(write_end)

    def forward(signum: int, _frame: FrameType | None) -> None:
        os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:  # reap every child (orphans too) until supervisord itself has ended
        child, status = os.wait()
        if child == pid:
            break
    code = os.waitstatus_to_exitcode(status)
    relay.join(timeout=2.0)  # the rest of what supervisord wrote
    refusals = read_refusals(run_dir / REFUSED_DIR)
    for program, entry in refusals.items():
        log.error("%s refused: %s", program, entry["reason"])
    return EXIT_REFUSED if refusals else max(code, 0)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="standby: %(message)s", stream=sys.stderr)
    if argv[:1] == ["--listen"]:
        return listen()
    return supervise(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
