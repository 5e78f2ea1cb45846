"""Start-up and recovery times of the demo pipeline under the real supervisord.conf.

    .venv/bin/python -m bench.supervisor_recovery [--task lift] [--tries 3] [--nodes actuator,dataset_player]
                                                  [--markdown FILE]

Measures (on the monotonic clock of this machine):
- start to first executed action: from ``supervisord`` starting to the actuator's first non-hold tick;
- recovery after ``supervisorctl restart <node>`` and after ``kill -9`` of the node (supervisord's
  autorestart brings it back): from the command to the next 3 executed (non-hold) actions.
Each node is tried ``--tries`` times both ways; p50 and max are reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import ActuatorWatch, Supervised, deep_merge, free_port, write_config
from common.config import REPO_ROOT, load_config
from common.tools.checkpoint_maker import build_checkpoint
from common.tools.demo_data import DemoSpec, generate_demo_dataset
from common.tools.supervisor_programs import STANDBY_PROGRAM

log = logging.getLogger("bench.supervisor_recovery")


def prepare(task: str, workdir: Path, overrides: dict[str, Any] | None = None) -> tuple[Path, int]:
    """A deployment config on free ports with its own small demo dataset and tiny checkpoint; ``overrides``
    are deep-merged last."""
    base = load_config(REPO_ROOT / "configs" / f"{task}.yaml")
    dataset = generate_demo_dataset(base, workdir / f"{task}-demo", DemoSpec(episodes=2, frames=150),
                                    repo_id=f"armpipe/{task}-demo")
    checkpoint = build_checkpoint(base, workdir / "ckpt", policy_type="diffusion", size="tiny", dataset_root=dataset,
                                  chunk=48)
    supervisor_port = free_port()
    path = write_config(workdir, task, deep_merge({
        "player": {"dataset": str(dataset)},
        "policy": {"checkpoint": str(checkpoint), "timeout_s": 5.0},
        "monitor": {"supervisor_url": f"http://127.0.0.1:{supervisor_port}/RPC2"},
    }, overrides or {}))
    return path, supervisor_port


def time_to_resume(watch: ActuatorWatch, start: float, timeout_s: float = 300.0, quiet_s: float = 15.0) -> float:
    """Seconds from ``start`` to the 3rd executed action after the interruption the command caused.

    The interruption is the first hold or silence (> 0.25 s without a tick) after ``start``; ticks the
    old process still executed before it are not a recovery. 0.0 when ``quiet_s`` pass uninterrupted.
    """
    deadline = start + timeout_s
    while time.monotonic() < deadline:
        ticks = watch.ticks_since(start)
        interrupted_at, previous = None, start
        for tick in ticks:
            if tick.hold or tick.received - previous > 0.25:
                interrupted_at = tick.received if tick.hold else previous
                break
            previous = tick.received
        if interrupted_at is None and ticks and ticks[-1].received - start > quiet_s:
            return 0.0
        if interrupted_at is not None:
            acting = [tick for tick in ticks if tick.received > interrupted_at and not tick.hold]
            if len(acting) >= 3:
                return acting[2].received - start
        time.sleep(0.1)
    raise AssertionError(f"no recovery within {timeout_s}s")


def serving_policy(stack: Supervised, name: str) -> str:
    """With ``policy.standby`` the program that serves now (``policy`` or ``policy-standby``): a restart of
    "the policy" is a restart of that one; the other program is left to be tried on its own."""
    if name != "policy" or not stack.config.policy.standby:
        return name
    ready = stack.config.resolve(stack.config.run_dir) / "ready"
    for program in ("policy", STANDBY_PROGRAM):
        try:
            detail = json.loads((ready / f"{program}.json").read_text())
        except (OSError, ValueError):
            continue
        if detail.get("serving") and detail.get("pid") == stack.process(program).pid:
            return program
    return name


def measure(task: str, tries: int, nodes: list[str] | None = None,
            standby: bool = False) -> tuple[float, dict[str, dict[str, list[float]]]]:
    """Start-up time and per-node recovery; ``nodes`` limits the recovery tries to those programs;
    ``standby``: with ``policy.standby`` (the "policy" tries then stop whichever policy process serves)."""
    with tempfile.TemporaryDirectory(prefix="armpipe-recovery-") as tmp:
        workdir = Path(tmp)
        config_path, supervisor_port = prepare(task, workdir, {"policy": {"standby": True}} if standby else None)
        stack = Supervised("demo", task, config_path, workdir / "run", supervisor_port)
        watch = ActuatorWatch(stack.config.actuator.events_endpoint)
        try:
            stack.start()
            first_action = watch.wait_acting(since=0.0, count=1, timeout_s=600) - stack.started_at
            stack.wait_all_ready(timeout_s=300)
            results: dict[str, dict[str, list[float]]] = {}
            programs = [proc.name for proc in stack.processes()]
            unknown = sorted(set(nodes or []) - set(programs))
            if unknown:
                raise SystemExit(f"--nodes: no program {unknown} in this role (programs: {programs})")
            for name in programs:
                if nodes and name not in nodes:
                    continue
                results[name] = {"restart": [], "kill -9": []}
                for attempt in range(tries):
                    stack.wait_all_ready(timeout_s=300)  # a standby restarted by the try before, too
                    watch.wait_acting(since=time.monotonic(), count=3, timeout_s=300)
                    target = serving_policy(stack, name)
                    old = stack.process(target).pid
                    start = time.monotonic()
                    stack.ctl("restart", stack.full_name(target), check=True)
                    results[name]["restart"].append(time_to_resume(watch, start))
                    stack.wait_ready(target, other_pid=old)
                    stack.wait_all_ready(timeout_s=300)
                    watch.wait_acting(since=time.monotonic(), count=3, timeout_s=300)
                    target = serving_policy(stack, name)
                    start = time.monotonic()
                    killed = stack.kill9(target)
                    stack.wait_ready(target, other_pid=killed)
                    results[name]["kill -9"].append(time_to_resume(watch, start))
                    log.info("%s try %d: restart %.1fs, kill -9 %.1fs", name, attempt + 1,
                             results[name]["restart"][-1], results[name]["kill -9"][-1])
            return first_action, results
        finally:
            watch.close()
            stack.shutdown()


def to_markdown(task: str, tries: int, first_action: float, results: dict[str, dict[str, list[float]]],
                standby: bool = False) -> str:
    lines = [
        f"Demo role, task `{task}`, CPU policy (tiny diffusion){', policy.standby: true' if standby else ''}, "
        f"{tries} tries per node and way.",
        "",
        f"- start (`supervisord` launched) to first executed action: **{first_action:.1f} s**",
        "",
        "| node | restart p50 s | restart max s | kill -9 p50 s | kill -9 max s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, ways in results.items():
        restart, kill = ways["restart"], ways["kill -9"]
        lines.append(f"| {name} | {statistics.median(restart):.1f} | {max(restart):.1f} | "
                     f"{statistics.median(kill):.1f} | {max(kill):.1f} |")
    lines.append("")
    lines.append("Recovery = from the command to the third executed (non-hold) action after the interruption it "
                 "caused (0.0: the pipeline never stopped acting); the actuator holds position throughout the gap.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="lift", choices=["lift", "stack", "sort"])
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--nodes", default="", help="comma-separated programs to restart (default: every program)")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--standby", action="store_true", help="policy.standby: true (a second, loaded policy)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    nodes = [name.strip() for name in args.nodes.split(",") if name.strip()]
    first_action, results = measure(args.task, args.tries, nodes, args.standby)
    table = to_markdown(args.task, args.tries, first_action, results, args.standby)
    log.info("\n%s", table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
