"""``python -m common.tools.status --config configs/lift.yaml``: every node's supervisord state and readiness.

A node is READY once its readiness file exists (sockets up, model/dataset/device loaded); supervisord
alone only knows whether the process is running. A node that is down says why in the last column: its
refusal (exit 2: a configuration, checkpoint or dataset error; it stays EXITED until fixed) or, after a
crash, the last error line of its log. A node that runs but refuses its work (the actuator when the
policy's contract does not match the config: it will not move) shows ``REFUSES`` in the ready column and
``REFUSING:`` with its reason, and counts as not up (exit 1). ``--wait S`` blocks until every program is
running and ready (exit 0), or S seconds pass, or every program that is not ready has refused (exit 1). A deployment
config that does not load is reported, and the table is still shown.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from common.config import ConfigError, MonitorConfig, load_config, raw_run_dir, resolve_repo_path
from common.supervisor_client import ProcessStatus, SupervisorClient, SupervisorUnavailable

log = logging.getLogger("armpipe.status")


def all_ready(processes: list[ProcessStatus]) -> bool:
    """Every program runs, is ready, and none refuses its work (an actuator that refuses to move is not up)."""
    return bool(processes) and all(p.state == "RUNNING" and p.ready and not p.refusing for p in processes)


def settled(processes: list[ProcessStatus]) -> bool:
    """Nothing left to wait for: every program is ready, or has refused and stays down until fixed."""
    return bool(processes) and all((p.state == "RUNNING" and p.ready) or (p.refused and p.state in ("EXITED", "FATAL"))
                                   for p in processes)


def detail(proc: ProcessStatus) -> str:
    """supervisord's description, and why a program is down (refusal or crash) where that is known."""
    if proc.refusing:
        return f"REFUSING: {proc.refusing}"
    if not proc.reason:
        text = f"{proc.role}; {proc.description}" if proc.role else proc.description
        return f"{text}; {proc.capacity}" if proc.capacity else text
    why = "refused" if proc.refused else "last error in its log"
    code = f"exit {proc.exit_status}; " if proc.state == "EXITED" else ""
    return f"{code}{why}: {proc.reason}"


def format_table(processes: list[ProcessStatus]) -> str:
    lines = [f"{'program':32} {'state':10} {'ready':6} {'pid':>8}  detail"]
    for proc in processes:
        ready = "REFUSES" if proc.refusing else {True: "yes", False: "no", None: "-"}[proc.ready]
        lines.append(f"{proc.full_name:32} {proc.state:10} {ready:6} {proc.pid:>8}  {detail(proc)}")
    return "\n".join(lines)


def client_for(config_path: str, supervisor_url: str) -> SupervisorClient:
    """The supervisord client for a deployment; a config that does not load is logged, and its raw
    ``run_dir`` (where its nodes recorded their refusals) and the default supervisor URL are used."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        log.error("the deployment config does not load, so every node refuses it: %s", exc)
        run_dir = raw_run_dir(config_path) or resolve_repo_path("run")
        url = supervisor_url or MonitorConfig.supervisor_url
    else:
        run_dir = config.resolve(config.run_dir)
        url = supervisor_url or config.monitor.supervisor_url
    return SupervisorClient(url, ready_dir=Path(run_dir) / "ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--supervisor-url", default="", help="default: monitor.supervisor_url from the config")
    parser.add_argument("--wait", type=float, default=0.0, help="wait up to this many seconds for all ready")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    client = client_for(args.config, args.supervisor_url)
    deadline = time.monotonic() + args.wait
    while True:
        try:
            processes = client.processes()
        except SupervisorUnavailable as exc:
            processes = []
            error = str(exc)
        else:
            error = ""
        if settled(processes) or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if error:
        log.error("%s", error)
        return 1
    log.info("%s", format_table(processes))
    return 0 if all_ready(processes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
