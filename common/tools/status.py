"""``python -m common.tools.status --config configs/lift.yaml``: every node's supervisord state and readiness.

A node is READY once its readiness file exists (sockets up, model/dataset/device loaded); supervisord
alone only knows whether the process is running. ``--wait S`` blocks until every program is running
and ready (exit 0) or S seconds pass (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from common.config import load_config
from common.supervisor_client import ProcessStatus, SupervisorClient, SupervisorUnavailable

log = logging.getLogger("armpipe.status")


def all_ready(processes: list[ProcessStatus]) -> bool:
    return bool(processes) and all(p.state == "RUNNING" and p.ready for p in processes)


def format_table(processes: list[ProcessStatus]) -> str:
    lines = [f"{'program':32} {'state':10} {'ready':6} {'pid':>8}  detail"]
    for proc in processes:
        ready = {True: "yes", False: "no", None: "-"}[proc.ready]
        lines.append(f"{proc.full_name:32} {proc.state:10} {ready:6} {proc.pid:>8}  {proc.description}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--supervisor-url", default="", help="default: monitor.supervisor_url from the config")
    parser.add_argument("--wait", type=float, default=0.0, help="wait up to this many seconds for all ready")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    config = load_config(args.config)
    client = SupervisorClient(args.supervisor_url or config.monitor.supervisor_url,
                              ready_dir=config.resolve(config.run_dir) / "ready")
    deadline = time.monotonic() + args.wait
    while True:
        try:
            processes = client.processes()
        except SupervisorUnavailable as exc:
            processes = []
            error = str(exc)
        else:
            error = ""
        if all_ready(processes) or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if error:
        log.error("%s", error)
        return 1
    log.info("%s", format_table(processes))
    return 0 if all_ready(processes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
