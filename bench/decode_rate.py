"""Can the dataset player decode 3 cameras of 480x640 video at 30 fps on this machine?

    .venv/bin/python -m bench.decode_rate [--dataset data/sort-demo] [--codec av1|h264] [--frames 150]

Without ``--dataset`` it writes a sort-layout dataset (3 cameras, 480x640, 30 fps) with LeRobot's
writer, once plain (the demo drawing, cheap to code) and once with camera-like texture and grain
(``DemoSpec.texture``), because synthetic drawings decode much faster than camera footage.

Measured per dataset, each over whole episodes (all 3 cameras):
- ``player``: the player's reader (``common.dataset_source.EpisodeReader``): one PyAV stream decode per
  camera and episode, a decoder thread per camera, frames as uint8 HxWx3 RGB — what the node does.
- ``lerobot-batched``: LeRobot's ``decode_video_frames`` on batches of 30 timestamps (the player's path for
  ``video_backend`` values other than pyav).
- ``lerobot-getitem``: ``LeRobotDataset[i]``, one row at a time (re-opens and seeks each video per row).

Rows/s is the rate of complete 3-camera rows; the player keeps up when it is at least the dataset's fps.
CPU ms/row is process CPU time per row (user + system, all threads): the share of the 2 cores the
player would take from the rest of the pipeline at 30 rows/s is ``30 * cpu_ms / 1000`` cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.harness import cpu_model
from common.config import REPO_ROOT, DeploymentConfig, load_config
from common.dataset_source import DatasetSource, EpisodeReader
from common.tools.demo_data import DemoSpec, generate_demo_dataset
from common.wire.contract import image_key

log = logging.getLogger("bench.decode_rate")


def machine_description() -> str:
    return f"{cpu_model()}, {len(os.sched_getaffinity(0))} CPUs available, load average {os.getloadavg()[0]:.1f}"


def measure(name: str, rows: int, run: Callable[[], int], fps: int) -> dict[str, float | str | int]:
    wall, cpu = time.perf_counter(), time.process_time()
    done = run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert done == rows, f"{name}: decoded {done} of {rows} rows"
    result = {"path": name, "rows": rows, "rows_per_s": round(rows / wall, 1),
              "cpu_ms_per_row": round(cpu / rows * 1000, 2), "cores_at_fps": round(fps * cpu / rows, 2),
              "keeps_up": rows / wall >= fps}
    log.info("%-16s %7.1f rows/s  %6.2f ms CPU/row  (%.2f cores at %d fps)", name, result["rows_per_s"],
             result["cpu_ms_per_row"], result["cores_at_fps"], fps)
    return result


def bench_dataset(config: DeploymentConfig, dataset: Path, episode_count: int, getitem_rows: int) -> list[dict]:
    source = DatasetSource(config, dataset=dataset, episodes=[], video_backend="pyav")  # [] selects all
    episodes = source.episodes[:episode_count]
    total = sum(source.episode(episode).length for episode in episodes)
    log.info("   episodes %s, %d rows of %d cameras", episodes, total, len(source.cameras))

    def player() -> int:
        count = 0
        for episode in episodes:
            reader = EpisodeReader(source, episode, config.player.prefetch_frames)
            try:
                while reader.next() is not None:
                    count += 1
            finally:
                reader.close()
        return count

    def lerobot_batched() -> int:
        count = 0
        for episode in episodes:
            # The same LeRobot call the player makes for other backends, here with LeRobot's pyav decoder.
            for frames in zip(*(source._lerobot_frames(episode, camera) for camera in source.cameras), strict=True):
                assert all(frame.shape == (480, 640, 3) for frame in frames)
                count += 1
        return count

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    # LeRobot's own reader over the same episodes, pyav backend (the player reads the files directly).
    dataset_rows = LeRobotDataset(source.repo_id, root=source.root, episodes=episodes, video_backend="pyav")
    keys = [image_key(camera) for camera in source.cameras]

    def lerobot_getitem() -> int:
        for index in range(getitem_rows):
            item = dataset_rows[index]
            assert all(tuple(item[key].shape) == (3, 480, 640) for key in keys)
        return getitem_rows

    # Decoding the same (small) files first puts them in the page cache for every path alike.
    player()
    results = [measure("player", total, player, source.fps)]
    results.append(measure("lerobot-batched", total, lerobot_batched, source.fps))
    results.append(measure("lerobot-getitem", getitem_rows, lerobot_getitem, source.fps))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="", help="a 3-camera 480x640 sort-layout dataset (default: generate)")
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "sort.yaml"))
    parser.add_argument("--codec", default="av1", choices=["av1", "h264"], help="codec of generated datasets")
    parser.add_argument("--episodes", type=int, default=2, help="episodes to generate and decode")
    parser.add_argument("--frames", type=int, default=150, help="frames per generated episode")
    parser.add_argument("--getitem-rows", type=int, default=60, help="rows for the slow LeRobotDataset[i] path")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("lerobot", "datasets", "libav"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    config = load_config(args.config)
    report: dict = {"machine": machine_description(), "config": args.config, "results": {}}
    log.info("machine: %s", report["machine"])
    with tempfile.TemporaryDirectory(prefix="decode-rate-") as scratch:
        if args.dataset:
            datasets = {"given": Path(args.dataset)}
        else:
            datasets = {}
            for label, texture in (("drawing", False), ("textured", True)):
                spec = DemoSpec(episodes=args.episodes, frames=args.frames, codec=args.codec, texture=texture)
                datasets[f"{label}-{args.codec}"] = generate_demo_dataset(config, Path(scratch) / label, spec)
        for label, dataset in datasets.items():
            log.info("== %s (%s)", label, dataset)
            report["results"][label] = bench_dataset(config, dataset, args.episodes, args.getitem_rows)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    sys.stdout.write(json.dumps(report) + "\n")  # the machine-readable result
    return 0 if all(result["keeps_up"] for results in report["results"].values() for result in results
                    if result["path"] == "player") else 1


if __name__ == "__main__":
    raise SystemExit(main())
