"""How soon a recorder restarted mid-episode records again, under the demo's supervisord.

    .venv/bin/python -m bench.recorder_restart [--task lift] [--tries 3] [--markdown FILE]

While the auto-started episode runs, the recorder is interrupted ``--tries`` times each way, alternating:
``kill -9`` (supervisord's autorestart brings it back) and ``supervisorctl restart robot:recorder``. Then
the episode is stopped and its one recording read back. Per interruption (robot monotonic clock):
- ready: from the kill (or running ``supervisorctl restart``) to the new process's readiness file;
- first new frame: from then to the scheduled time of the new process's first frame;
- downtime: from the last frame the old process kept to the new one's first (the frames a killed process's
  encoders still held are lost: their ticks are among those filled in from the actuator's backlog), and the
  ticks filled in.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from bench.harness import Supervised
from bench.supervisor_recovery import prepare
from common.wire.actuator_client import ActuatorClient
from common.wire.transport import SocketFactory

log = logging.getLogger("bench.recorder_restart")


def ready_pid(stack: Supervised) -> int:
    path = Path(stack.config.resolve(stack.config.run_dir)) / "ready" / "recorder.json"
    try:
        return int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return 0


def wait(predicate, timeout_s: float, what: str, interval_s: float = 0.01) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(what)


def measure(task: str, tries: int) -> list[dict[str, float | str]]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-recorder-restart-"))
    config_path, port = prepare(task, workdir, {"player": {"loop": True}})
    stack = Supervised("demo", task, config_path, workdir / "run", port)
    output_dir = Path(stack.config.recorder.output_dir)
    journal = output_dir / ".work" / "episode_000000" / "journal.jsonl"
    stack.start()
    interruptions: list[tuple[str, float, float]] = []  # (how, when, ready after)
    try:
        wait(lambda: journal.exists() and journal.read_text().count('"type":"tick"') >= 90, 600,
             "the auto-started episode was never recorded for 3 s", 0.5)
        for attempt in range(2 * tries):
            how = "kill -9" if attempt % 2 == 0 else "supervisorctl restart"
            old = stack.running_pid("recorder")
            when = time.monotonic()
            if how == "kill -9":
                os.kill(old, signal.SIGKILL)
            else:
                stack.ctl("restart", "robot:recorder", check=True)
            wait(lambda old=old: ready_pid(stack) not in (0, old), 60, "the recorder never came back")
            interruptions.append((how, when, time.monotonic() - when))
            time.sleep(6.0)  # recording again, long enough for a clear part between interruptions
        control = ActuatorClient(SocketFactory(), stack.config.actuator.control_endpoint, client="bench")
        try:
            control.send("stop", label="success")
        finally:
            control.close()
        wait(lambda: (output_dir / "metrics.jsonl").exists(), 300, "the recording was never saved", 0.5)
    finally:
        stack.shutdown(timeout_s=90)
    import pandas as pd

    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()][-1]
    root = Path(metrics["dataset"])
    ticks = pd.read_parquet(root / "armpipe" / "ticks.parquet")
    scheduled = sorted((ticks["t"] - ticks["lateness_s"].fillna(0.0)).tolist())
    parts = json.loads((root / "meta" / "info.json").read_text())["armpipe_parts"]
    # Each interruption began a new video segment: its gap is the part where the segment changes, in order.
    restarts = [part for previous, part in itertools.pairwise(parts) if part["segment"] != previous["segment"]]
    results: list[dict[str, float | str]] = []
    for (how, when, ready_s), gap in zip(interruptions, restarts, strict=True):
        # The first frame of the new process: where its part starts in true time.
        first = scheduled[0] + gap["start_s"]
        results.append({"how": how, "ready_s": ready_s, "recording_s": first - when,
                        "downtime_s": gap["gap_s"] + 1.0 / stack.config.fps, "gap_ticks": gap["gap_ticks"]})
    log.info("one recording: %d frames, %d parts, %d ticks filled from the backlog, resumed %d times",
             metrics["frames"], metrics["parts"], metrics["gap_ticks_filled"], metrics["resumed"])
    return results


def to_markdown(task: str, results: list[dict[str, float | str]]) -> str:
    lines = [f"Task {task}; seconds (robot monotonic clock). ready / first frame: from the kill or from running "
             "`supervisorctl restart` (its own start and supervisord's stop-then-start included); downtime: from the "
             "last frame the old process kept to the first of the new one (the ticks between are filled in from the "
             "actuator's backlog).", "",
             "| interruption | ready p50 | ready max | first new frame p50 | first new frame max | downtime p50 | "
             "downtime max | ticks filled p50 |",
             "|---|---|---|---|---|---|---|---|"]
    for how in ("kill -9", "supervisorctl restart"):
        rows = [row for row in results if row["how"] == how]
        if not rows:
            continue

        def stat(key: str, rows: list[dict[str, float | str]] = rows) -> tuple[float, float]:
            values = [float(row[key]) for row in rows]
            return statistics.median(values), max(values)

        ready, first, down, ticks = stat("ready_s"), stat("recording_s"), stat("downtime_s"), stat("gap_ticks")
        lines.append(f"| {how} (x{len(rows)}) | {ready[0]:.2f} | {ready[1]:.2f} | {first[0]:.2f} | {first[1]:.2f} | "
                     f"{down[0]:.2f} | {down[1]:.2f} | {ticks[0]:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="lift", choices=["lift", "stack", "sort"])
    parser.add_argument("--tries", type=int, default=3, help="interruptions of each kind")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = measure(args.task, args.tries)
    table = to_markdown(args.task, results)
    log.info("\n%s", table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
