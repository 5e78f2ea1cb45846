"""The demo pipeline under the real supervisord.conf with the CPU policy at different torch thread counts.

    .venv/bin/python -m bench.demo_threads [--task lift] [--threads 2 1] [--seconds 90] [--busy N]
                                           [--markdown FILE]

For each ``policy.cpu_threads`` value, one after the other in the same run (so the comparison is a ratio
on the same machine): start the demo role (servo emulator, dataset player, policy, actuator, recorder,
monitor), wait for the first executed action, then watch the actuator for ``--seconds``:

- share of ticks acting (executed, not held) and the hold reasons of the rest;
- policy round trip (actuator's request to reply) and the policy's own time per chunk, p50 / p90;
- chunks whose rows were all in the past on arrival (``dropped whole``).

``--busy N`` runs N extra processes that only spin (at normal priority) for the whole measurement: the
shared machine a CI job or a colleague's test suite makes, where the pipeline gets less than the 2 cores.
"""

from __future__ import annotations

import argparse
import collections
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.harness import ActuatorWatch, Supervised
from bench.supervisor_recovery import prepare

log = logging.getLogger("bench.demo_threads")


@dataclass
class DemoRun:
    threads: int
    first_action_s: float
    ticks: int
    acting: int
    holds: dict[str, int]
    round_trips_ms: list[float]
    policy_ms: list[float]
    chunks_all_stale: int

    @property
    def acting_share(self) -> float:
        return self.acting / self.ticks if self.ticks else 0.0


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run_once(task: str, threads: int, seconds: float, workdir: Path, busy: int = 0) -> DemoRun:
    config_path, supervisor_port = prepare(task, workdir, {"policy": {"cpu_threads": threads}})
    stack = Supervised("demo", task, config_path, workdir / "run", supervisor_port)
    watch = ActuatorWatch(stack.config.actuator.events_endpoint)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        stack.start()
        first_action = watch.wait_acting(since=0.0, count=1, timeout_s=600) - stack.started_at
        start = time.monotonic()
        time.sleep(seconds)
        ticks = [tick for tick in watch.ticks_since(start) if tick.episode_index >= 0]
        chunks = [event.meta for event in watch.events
                  if event.meta.get("event") == "chunk" and float(event.meta.get("arrival_t") or 0.0) >= start]
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
        watch.close()
        stack.shutdown()
    holds = collections.Counter(tick.hold_reason for tick in ticks if tick.hold)
    return DemoRun(
        threads=threads, first_action_s=first_action, ticks=len(ticks),
        acting=sum(not tick.hold for tick in ticks), holds=dict(holds.most_common()),
        round_trips_ms=[float(meta["round_trip_s"]) * 1000 for meta in chunks if meta.get("round_trip_s")],
        policy_ms=[float(meta["timings"]["total_s"]) * 1000 for meta in chunks
                   if isinstance(meta.get("timings"), dict) and meta["timings"].get("total_s") is not None],
        chunks_all_stale=sum(1 for meta in chunks if meta.get("accepted") == 0),
    )


def to_markdown(task: str, seconds: float, runs: list[DemoRun], busy: int) -> str:
    lines = [
        f"Demo role, task `{task}`, CPU policy (tiny diffusion, 48-row chunks), {seconds:.0f} s of a running "
        "episode per setting, one setting after the other in one run"
        + (f", with {busy} spinning processes beside the pipeline." if busy else ", nothing else running."),
        "",
        "| policy.cpu_threads | first action s | ticks | acting | round trip p50 / p90 ms | policy p50 / p90 ms "
        "| chunks / all rows stale | holds |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        holds = ", ".join(f"{reason} {count}" for reason, count in run.holds.items()) or "none"
        lines.append(
            f"| {run.threads} | {run.first_action_s:.1f} | {run.ticks} | {run.acting_share:.0%} | "
            f"{percentile(run.round_trips_ms, 0.5):.0f} / {percentile(run.round_trips_ms, 0.9):.0f} | "
            f"{percentile(run.policy_ms, 0.5):.0f} / {percentile(run.policy_ms, 0.9):.0f} | "
            f"{len(run.round_trips_ms)} / {run.chunks_all_stale} | {holds} |")
    if len(runs) >= 2:
        # Policy times exist only for chunks that came back: a setting whose requests time out looks fast
        # there, so the comparison is on what reached the robot.
        base = runs[0]
        for run in runs[1:]:
            lines.append("")
            lines.append(f"{run.threads} vs {base.threads} thread(s): chunks delivered {len(run.round_trips_ms)} vs "
                         f"{len(base.round_trips_ms)}, ticks acting {run.acting_share:.0%} vs {base.acting_share:.0%}, "
                         f"first action {run.first_action_s:.0f} s vs {base.first_action_s:.0f} s.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="lift", choices=["lift", "stack", "sort"])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--busy", type=int, default=0, help="extra spinning processes during the measurement")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    runs = []
    for threads in args.threads:
        with tempfile.TemporaryDirectory(prefix="armpipe-threads-") as tmp:
            runs.append(run_once(args.task, threads, args.seconds, Path(tmp), args.busy))
            log.info("cpu_threads=%d: %s", threads, runs[-1])
    table = to_markdown(args.task, args.seconds, runs, args.busy)
    log.info("\n%s", table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
