"""Evaluation recorder: every episode the actuator runs, saved as a LeRobot v3 dataset with metrics.

    python -m nodes.recorder --config configs/lift.yaml [--recorder.output_dir=recordings/run1]

Inputs (all subscribed, never requested, so the recorder cannot slow the control loop): every camera's
``frame`` stream, every arm's ``state`` stream, the player's ground truth, and the actuator's events
(executed ``action`` ticks, ``chunk``, ``hold`` and ``episode_*`` events). Each executed tick of a
running episode becomes one dataset frame: the images and states the actuator used for that tick (found
by the sequence numbers in its ``inputs``) and the action it commanded.

Three threads, each with one job:
- receiver: drains the sockets, pairs ticks with their frames/states, decides episode boundaries and
  queues work. Ticks beyond ``recorder.queue_ticks`` waiting are dropped and counted, never buffered
  without bound;
- writer: LeRobot ``add_frame`` (PNG staging on LeRobot's writer threads) and the crash journal;
- finisher: video encoding, ``finalize``, side files, metrics and plots of a stopped episode, while the
  writer already records the next one.

Outputs under ``recorder.output_dir``: one LeRobot dataset per episode (``episode_000000/`` ...; see
``nodes.recorder.writer``), ``metrics.jsonl`` (a line per episode, and a new line when an episode is
labelled later), ``summary.json`` and ``plots/summary.png``.

The room: ``assembler`` (the receiver's pairing and episode boundaries), ``writer`` (the LeRobot v3
episode writer and crash journal), ``metrics`` (metrics, summary and plots); this module holds the writer
and finisher threads and the node. It may import ``common`` and its own room.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common.config import DeploymentConfig, parse_node_args
from common.node import Readiness, setup_logging
from common.wire.transport import LatestSubscriber, SocketFactory, stop_event_on_signals
from nodes.recorder.assembler import HoldItem, LabelItem, RejectItem, StartItem, StopItem, TickAssembler
from nodes.recorder.metrics import (
    METRICS_FILE,
    SUMMARY_FILE,
    episode_metrics,
    plot_episode,
    plot_summary,
    read_metrics,
    summarize,
    write_json,
)
from nodes.recorder.writer import (
    EPISODE_METRICS,
    OUTCOME_FILE,
    WORK_DIR,
    ChunkRecord,
    EpisodeOutcome,
    EpisodeWriter,
    TickRecord,
    TickRejected,
    finished_without_metrics,
    load_outcome,
    pending_work,
    recover_episode,
)

log = logging.getLogger("recorder")

PROGRAM = "recorder"


# --------------------------------------------------------------------------------------------------
# Writer and finisher threads
# --------------------------------------------------------------------------------------------------


class Finisher(threading.Thread):
    """Encodes, finalises and measures stopped episodes one at a time, off the writer's thread."""

    def __init__(self, config: DeploymentConfig, output_dir: Path) -> None:
        super().__init__(name="finisher", daemon=True)
        self.config = config
        self.output_dir = output_dir
        self.jobs: queue.Queue[Any] = queue.Queue()
        self.finished = 0

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                if isinstance(job, EpisodeWriter):
                    outcome = job.finish()
                    if outcome is not None:
                        self.publish(outcome)
                elif isinstance(job, EpisodeOutcome):
                    self.publish(job)
                elif isinstance(job, LabelItem):
                    self.relabel(job)
                elif isinstance(job, Path) and job.parent.name == WORK_DIR:
                    self.recover(job)
                elif isinstance(job, Path):
                    self.publish(load_outcome(job))  # finished, but its metrics were never written
            except Exception:
                # One broken episode must not stop later ones from being saved; its work dir stays for recovery.
                log.exception("finishing %s failed", getattr(getattr(job, "info", None), "name", job))
            finally:
                self.jobs.task_done()

    def publish(self, outcome: EpisodeOutcome) -> None:
        names = self.config.action_names()
        metrics = episode_metrics(outcome, names)
        started = time.monotonic()
        try:
            plot_episode(outcome, names, outcome.path / "armpipe" / "plots")
        except Exception:
            log.exception("plotting %s failed", outcome.info.name)
        self.append_metrics(metrics)
        # Last: its presence marks the episode as fully processed (see finished_without_metrics).
        write_json(outcome.path / "armpipe" / EPISODE_METRICS, metrics)
        self.finished += 1
        log.info("%s saved: %d frames, label %r, %s (metrics and plots in %.1f s)", outcome.info.name, outcome.frames,
                 outcome.label, outcome.path, time.monotonic() - started)

    def append_metrics(self, metrics: dict[str, Any]) -> None:
        with (self.output_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics, default=float) + "\n")
        summary = summarize(self.output_dir)
        write_json(self.output_dir / SUMMARY_FILE, summary)
        try:
            plot_summary(self.output_dir, summary)
        except Exception:
            log.exception("summary plot failed")

    def recover(self, work_root: Path) -> None:
        """Rebuild an episode a previous recorder left unfinished (crash); see ``recover_episode``."""
        outcome = recover_episode(self.config, self.output_dir, work_root, vcodec=self.config.recorder.vcodec,
                                  image_writer_threads=self.config.recorder.image_writer_threads)
        if outcome is not None:
            self.publish(outcome)

    def relabel(self, item: LabelItem) -> None:
        for entry in reversed(read_metrics(self.output_dir)):
            if entry.get("actuator_episode") == item.actuator_episode:
                entry = {**entry, "label": item.label, "relabelled_wall": time.time()}
                side = Path(entry["dataset"]) / "armpipe"
                if side.is_dir():
                    write_json(side / EPISODE_METRICS, entry)
                    outcome_path = side / OUTCOME_FILE
                    if outcome_path.exists():
                        write_json(outcome_path, {**json.loads(outcome_path.read_text()), "label": item.label})
                self.append_metrics(entry)
                log.info("%s labelled %r", entry["episode"], item.label)
                return
        log.warning("label %r for actuator episode %d: no recorded episode has that index", item.label,
                    item.actuator_episode)


class Writer(threading.Thread):
    """Feeds the open episode's LeRobot writer; hands stopped episodes to the finisher."""

    def __init__(self, config: DeploymentConfig, output_dir: Path, work: queue.Queue[Any],
                 assembler: TickAssembler, finisher: Finisher) -> None:
        super().__init__(name="writer", daemon=True)
        self.config = config
        self.output_dir = output_dir
        self.work = work
        self.assembler = assembler
        self.finisher = finisher
        self.current: EpisodeWriter | None = None
        # Images waiting for LeRobot's PNG threads are held in memory: cap them at about one second.
        self.max_pending_images = max(8, config.fps * max(1, len(config.cameras)))

    def run(self) -> None:
        while True:
            item = self.work.get()
            if item is None:
                if self.current is not None:
                    # Leave the journal and PNGs: the next start rebuilds this episode (see recover_episode).
                    self.current.abandon()
                    log.warning("%s left for recovery at the next start", self.current.info.name)
                return
            try:
                self.handle(item)
            except Exception:
                log.exception("recording failed on %s", type(item).__name__)

    def handle(self, item: Any) -> None:
        if isinstance(item, TickRecord):
            with self.assembler.lock:
                self.assembler.ticks_waiting -= 1
            if self.current is None:
                return
            while self.current.pending_images() > self.max_pending_images:
                time.sleep(0.005)  # back-pressure: the bounded tick queue absorbs (or drops) meanwhile
            try:
                self.current.add_tick(item)
            except TickRejected as exc:
                self.current.reject(exc.field)
                log.warning("%s: tick %d not recorded: %s", self.current.info.name, item.tick, exc)
        elif isinstance(item, StartItem):
            if self.current is not None:
                self.current.abandon()
            self.current = EpisodeWriter(self.config, self.output_dir, item.info, vcodec=self.config.recorder.vcodec,
                                         image_writer_threads=self.config.recorder.image_writer_threads)
        elif isinstance(item, ChunkRecord) and self.current is not None:
            self.current.add_chunk(item)
        elif isinstance(item, HoldItem) and self.current is not None:
            self.current.add_hold_event(item.reason)
        elif isinstance(item, RejectItem) and self.current is not None:
            self.current.reject(item.field)
        elif isinstance(item, StopItem) and self.current is not None:
            self.current.stop(item.label, item.reason, item.ended_t, item.dropped_ticks)
            self.finisher.jobs.put(self.current)
            self.current = None
        elif isinstance(item, LabelItem):
            self.finisher.jobs.put(item)


# --------------------------------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------------------------------


def endpoints(config: DeploymentConfig) -> list[str]:
    return [*(cam.endpoint for cam in config.cameras.values()),
            *(arm.state_endpoint for arm in config.arms.values()),
            config.player.gt_endpoint, config.actuator.events_endpoint]


def run(config: DeploymentConfig, stop: threading.Event) -> None:
    output_dir = config.resolve(config.recorder.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    readiness = Readiness(config, PROGRAM)
    finisher = Finisher(config, output_dir)
    # Episodes a crashed recorder left in .work/ are rebuilt by the finisher while we already record: new
    # episodes get numbers after theirs (next_recorder_index counts the work directories).
    for work_root in pending_work(output_dir):
        log.warning("%s was left unfinished by a previous recorder; rebuilding it", work_root.name)
        finisher.jobs.put(work_root)
    for finished in finished_without_metrics(output_dir):
        log.warning("%s was saved but its metrics were not; writing them", finished.name)
        finisher.jobs.put(finished)
    # The video encoder and the PNG writer are imported before we report ready, so the first episode does not wait.
    import av  # noqa: F401
    import PIL.Image  # noqa: F401

    work: queue.Queue[Any] = queue.Queue()
    assembler = TickAssembler(config, output_dir, work)
    writer = Writer(config, output_dir, work, assembler, finisher)
    finisher.start()
    writer.start()
    factory = SocketFactory()
    # A deep receive queue: the recorder wants every tick, not only the newest (publishers still drop at
    # their own high-water mark rather than wait for us).
    subscriber = LatestSubscriber(factory, endpoints(config), hwm=256)
    readiness.ready(output_dir=str(output_dir), endpoints=subscriber.endpoints)
    log.info("recording into %s from %s", output_dir, subscriber.endpoints)
    last_report = time.monotonic()
    try:
        while not stop.is_set():
            messages = subscriber.poll(timeout_s=0.05)
            now = time.monotonic()
            for msg in messages:
                assembler.on_message(msg, now)
            assembler.process(now)
            if now - last_report > 30.0:
                last_report = now
                log.info("ticks %(ticks)d, dropped %(dropped)d, unmatched inputs %(unmatched)d", assembler.counters)
    finally:
        readiness.clear()
        subscriber.close()
        work.put(None)
        writer.join(timeout=30)
        finisher.jobs.put(None)
        finisher.join(timeout=120)  # finish what has stopped; anything open stays for recovery


def main(argv: list[str] | None = None) -> int:
    setup_logging(PROGRAM)
    args = parse_node_args("armpipe recorder: episodes as LeRobot datasets, metrics and plots", argv)
    run(args.config, stop_event_on_signals())
    return 0


if __name__ == "__main__":
    sys.exit(main())
