"""Evaluation recorder: every episode the actuator runs, saved as a LeRobot v3 dataset with metrics.

    python -m nodes.recorder --config configs/lift.yaml [--recorder.output_dir=recordings/run1]

Inputs (all subscribed, never requested, so the recorder cannot slow the control loop): every camera's
``frame`` stream, every arm's ``state`` stream, the player's ground truth, and the actuator's events
(executed ``action`` ticks, ``chunk``, ``hold`` and ``episode_*`` events). Each executed tick of a
running episode becomes one dataset frame: the images and states the actuator used for that tick (found
by the sequence numbers in its ``inputs``) and the action it commanded.

Threads, each with one job:
- receiver: drains the sockets, pairs ticks with their frames/states, decides episode boundaries and
  queues work. Ticks beyond ``recorder.queue_ticks`` waiting are dropped and counted, never buffered
  without bound;
- writer: hands each tick's frames to the camera encoders, writes the crash journal, and saves a stopped
  episode (the videos are already encoded: a flush and a copy);
- one encoder per camera (``video.CameraVideo``), encoding as the episode runs;
- finisher: metrics and plots of a saved episode (and rebuilds after a crash), while the writer already
  records the next one.

Outputs under ``recorder.output_dir``: one LeRobot dataset per episode (``episode_000000/`` ...; see
``nodes.recorder.writer``), ``metrics.jsonl`` (a line per episode, and a new line when an episode is
labelled later), ``summary.json`` and ``plots/summary.png``.

The room: ``assembler`` (the receiver's pairing and episode boundaries), ``writer`` (the episode writer,
crash journal and recovery), ``lerobot_v3`` (one episode's LeRobot v3 files), ``video`` (each camera's
encoder), ``metrics`` (metrics, summary and plots); this module holds the writer and finisher threads
and the node. It may import ``common`` and its own room.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common.config import DeploymentConfig
from common.node import Readiness, start_node
from common.streams import pipeline_endpoints
from common.supervisor_client import SupervisorClient
from common.wire.actuator_client import ActuatorClient
from common.wire.protocol import ProtocolError
from common.wire.transport import LatestSubscriber, PeerUnavailable, RemoteError, SocketFactory
from nodes.recorder.assembler import (
    BackfillItem,
    HoldItem,
    LabelItem,
    RejectItem,
    ResumeItem,
    StartItem,
    StopItem,
    SuspendItem,
    TickAssembler,
    chunk_record,
    latency_record,
)
from nodes.recorder.journal import JournalState, replay_journal
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
from nodes.recorder.records import (
    EPISODE_METRICS,
    OUTCOME_FILE,
    WORK_DIR,
    ChunkRecord,
    EpisodeOutcome,
    LatencyRecord,
    TickRecord,
    TickRejected,
)
from nodes.recorder.recovery import pending_work, recover_episode
from nodes.recorder.side_files import finished_without_metrics, load_outcome
from nodes.recorder.writer import EpisodeWriter

log = logging.getLogger("recorder")

PROGRAM = "recorder"
# Seconds a stopping recorder spends saving the open episode, then metrics: under the recorder program's
# stopwaitsecs (30, NODE_OPTIONS in common/tools/supervisor_programs.py), so supervisord never has to SIGKILL it.
SHUTDOWN_BUDGET_S = 25.0


# --------------------------------------------------------------------------------------------------
# Writer and finisher threads
# --------------------------------------------------------------------------------------------------


class Finisher(threading.Thread):
    """Metrics and plots of saved episodes, and rebuilds of crashed ones, one at a time, off the writer's thread."""

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
                if isinstance(job, EpisodeOutcome):
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
        outcome = recover_episode(self.config, self.output_dir, work_root, vcodec=self.config.recorder.vcodec)
        if outcome is not None:
            self.publish(outcome)

    def relabel(self, item: LabelItem) -> None:
        for entry in reversed(read_metrics(self.output_dir)):
            if (entry.get("episode_id") == item.episode_id if item.episode_id
                    else entry.get("actuator_episode") == item.actuator_episode):
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
    """Feeds the open episode's writer (camera encoders and journal); saves stopped episodes, then hands
    them to the finisher for metrics and plots."""

    def __init__(self, config: DeploymentConfig, output_dir: Path, work: queue.Queue[Any],
                 assembler: TickAssembler, finisher: Finisher) -> None:
        super().__init__(name="writer", daemon=True)
        self.config = config
        self.output_dir = output_dir
        self.work = work
        self.assembler = assembler
        self.finisher = finisher
        self.current: EpisodeWriter | None = None
        self.factory = SocketFactory()  # the actuator's control socket, for its backlog
        self.suspending = threading.Event()  # the recorder alone is restarting: leave quickly

    def run(self) -> None:
        import av  # noqa: F401  (PyAV, the camera encoders': here rather than before the node is ready)

        while True:
            item = self.work.get()
            if item is None:
                if self.current is not None:  # not expected: the receiver stops the open episode first
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
            if self.current is None or self.suspending.is_set():
                return  # suspending: ticks still queued are left to the next process (the actuator's backlog)
            try:
                # Blocks while a camera's encoder is a second behind: the bounded tick queue absorbs (or drops).
                self.current.add_tick(item)
            except TickRejected as exc:
                self.current.reject(exc.field)
                log.warning("%s: tick %d not recorded: %s", self.current.info.name, item.tick, exc)
        elif isinstance(item, StartItem):
            if self.current is not None:
                self.current.abandon()
            self.current = EpisodeWriter(self.config, self.output_dir, item.info, vcodec=self.config.recorder.vcodec,
                                         video_preset=self.config.recorder.video_preset)
        elif isinstance(item, ResumeItem):
            if self.current is not None:
                self.current.abandon()
            self.current = EpisodeWriter(self.config, self.output_dir, item.state.info,
                                         video_preset=self.config.recorder.video_preset, resume=item.state)
        elif isinstance(item, BackfillItem) and self.current is not None:
            self.backfill(item)
        elif isinstance(item, SuspendItem) and self.current is not None:
            episode, self.current = self.current, None
            episode.suspend()
            log.info("%s left in %s for the next recorder to resume", episode.info.name, episode.root)
        elif isinstance(item, ChunkRecord) and self.current is not None:
            self.current.add_chunk(item)
        elif isinstance(item, LatencyRecord) and self.current is not None:
            self.current.add_latency(item)
        elif isinstance(item, HoldItem) and self.current is not None:
            self.current.add_hold_event(item.reason)
        elif isinstance(item, RejectItem) and self.current is not None:
            self.current.reject(item.field)
        elif isinstance(item, StopItem) and self.current is not None:
            episode, self.current = self.current, None
            episode.stop(item.label, item.reason, item.ended_t, item.dropped, item.backlog_max_ticks)
            # Saved here, at once: the videos are already encoded, what is left is a flush and a copy (about a
            # second), so a stop (or the recorder's own SIGTERM) finds the dataset complete. Metrics and plots
            # (slower) follow in the finisher thread, beside the next episode's recording.
            try:
                outcome = episode.finish()
            except Exception:
                log.exception("saving %s failed; its work directory is left for recovery", episode.info.name)
                return
            if outcome is not None:
                self.finisher.jobs.put(outcome)
        elif isinstance(item, LabelItem):
            self.finisher.jobs.put(item)


    def backfill(self, item: BackfillItem) -> None:
        """The ticks and small events of the recorder's downtime, from the actuator's backlog (control op
        ``backlog``, a page at a time): ticks into gap_ticks.parquet (no frames), chunks, latencies and holds
        into their side files. An actuator that cannot say leaves the gap unfilled (logged)."""
        assert self.current is not None
        client = ActuatorClient(self.factory, self.config.actuator.control_endpoint, client="recorder",
                                timeout_s=1.0, retries=2)
        after_tick = item.after_tick
        after_t = item.after_t if math.isfinite(item.after_t) else -1e300
        rows: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        oldest = -1
        try:
            while True:
                reply = client.send("backlog", episode_id=item.episode_id, after_tick=after_tick, after_t=after_t)
                ticks = [row for row in reply.meta.get("ticks") or [] if isinstance(row, dict)]
                oldest = int(reply.meta.get("oldest_tick", -1)) if oldest < 0 else oldest
                wanted = [row for row in ticks if item.until_tick is None or int(row["episode_tick"]) < item.until_tick]
                rows += wanted
                page_events = [event for event in reply.meta.get("events") or [] if isinstance(event, dict)]
                events += [event for event in page_events if float(event.get("t", math.inf)) < item.until_t]
                if not reply.meta.get("more") or len(wanted) < len(ticks) or any(
                        float(event.get("t", math.inf)) >= item.until_t for event in page_events):
                    break
                after_tick, after_t = int(reply.meta["next_after_tick"]), float(reply.meta["next_after_t"])
        except (PeerUnavailable, RemoteError, ProtocolError, KeyError, TypeError, ValueError) as exc:
            log.warning("%s: the ticks of the recorder's downtime could not be filled from the actuator's backlog "
                        "(%s); the gap stays a marked gap", self.current.info.name, exc)
        finally:
            client.close()
        self.current.add_gap_ticks(rows)
        for event in events:
            kind, t = event.get("event"), float(event["t"])
            if kind == "chunk":
                self.current.add_chunk(chunk_record(event, t, None))
            elif kind == "latency":
                self.current.add_latency(latency_record(event, t))
            elif kind == "hold":
                self.current.add_hold_event(str(event.get("reason", "")))
        missing = "" if oldest <= item.after_tick + 1 else f"; the backlog began at episode_tick {oldest}"
        log.warning("%s: %d tick(s) and %d event(s) of the recorder's downtime filled in from the actuator's "
                    "backlog (after episode_tick %d)%s", self.current.info.name, len(rows), len(events),
                    item.after_tick, missing)


# --------------------------------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------------------------------


def restarting_alone() -> bool:
    """Whether only this program is stopping (``supervisorctl restart|stop recorder``, supervisord running on)
    rather than everything (``make stop``: supervisord in SHUTDOWN) or a recorder run by hand."""
    url = os.environ.get("SUPERVISOR_SERVER_URL", "")
    if not os.environ.get("SUPERVISOR_ENABLED") or not url:
        return False
    try:
        return SupervisorClient(url, timeout_s=2.0).state() == "RUNNING"
    except Exception as exc:  # cannot ask: end the recording here, as before (never leave it unsaved)
        log.info("cannot ask supervisord at %s whether it is shutting down (%s)", url, exc)
        return False


def running_episode(config: DeploymentConfig, factory: SocketFactory) -> str:
    """The id of the episode the actuator runs now ("" when idle or not answering), from its backlog op."""
    client = ActuatorClient(factory, config.actuator.control_endpoint, client="recorder", timeout_s=0.5, retries=2)
    try:
        active = client.send("backlog", max_ticks=0).meta.get("active_episode_id", "")
        return active if isinstance(active, str) else ""
    except (PeerUnavailable, RemoteError, ProtocolError) as exc:
        log.info("the actuator did not say which episode runs (%s): episodes left unfinished are rebuilt", exc)
        return ""
    finally:
        client.close()


def resumable(config: DeploymentConfig, pending: list[Path], active: str) -> JournalState | None:
    """The work directory of the episode the actuator still runs, left by this recorder's previous process."""
    if not active or not pending:
        return None
    state = replay_journal(config, pending[-1], config.recorder.vcodec)
    if state is None or state.info.episode_id != active or state.stop:
        return None
    return state


def run(config: DeploymentConfig, stop: threading.Event, readiness: Readiness) -> None:
    output_dir = config.resolve(config.recorder.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    finisher = Finisher(config, output_dir)
    factory = SocketFactory()
    # Subscribed first: what is published while this process looks for an episode to resume waits in the queue.
    # A deep receive queue: the recorder wants every tick, not only the newest (publishers still drop at
    # their own high-water mark rather than wait for us).
    subscriber = LatestSubscriber(factory, pipeline_endpoints(config), hwm=256)
    # The episode the actuator still runs, if a restart (kill -9, supervisorctl restart) interrupted its
    # recording: resumed as the same recording, its downtime a marked gap filled from the actuator's backlog.
    pending = pending_work(output_dir)
    resume = resumable(config, pending, running_episode(config, factory) if pending else "")
    # Other episodes a crashed recorder left in .work/ are rebuilt by the finisher while we already record: new
    # episodes get numbers after theirs (next_recorder_index counts the work directories).
    for work_root in pending:
        if resume is not None and work_root.name == resume.info.name:
            continue
        log.warning("%s was left unfinished by a previous recorder; rebuilding it", work_root.name)
        finisher.jobs.put(work_root)
    for finished in finished_without_metrics(output_dir):
        log.warning("%s was saved but its metrics were not; writing them", finished.name)
        finisher.jobs.put(finished)

    work: queue.Queue[Any] = queue.Queue()
    assembler = TickAssembler(config, output_dir, work)
    writer = Writer(config, output_dir, work, assembler, finisher)
    if resume is not None:
        assembler.resume(resume)
    finisher.start()
    writer.start()  # imports the video encoder first; ticks wait for it in the bounded queue meanwhile
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
        # supervisord waits stopwaitsecs (30 s for the recorder) before SIGKILL: the open episode is stopped
        # and saved first (seconds), metrics and plots follow while time is left; metrics a kill cut short
        # are written at the next start (finished_without_metrics).
        deadline = time.monotonic() + SHUTDOWN_BUDGET_S
        readiness.clear()
        subscriber.close()
        assembler.process(time.monotonic() + config.recorder.input_wait_s)  # ticks still waiting for inputs
        if assembler.episode is not None and restarting_alone():
            writer.suspending.set()
            assembler.suspend()  # supervisorctl restart recorder: the next process resumes the same recording
        else:
            assembler.shutdown()
        work.put(None)
        writer.join(timeout=max(1.0, deadline - time.monotonic()))
        if writer.is_alive():
            log.error("the open episode could not be saved within %.0f s; it is left for recovery at the next "
                      "start", SHUTDOWN_BUDGET_S)
        finisher.jobs.put(None)
        finisher.join(timeout=max(0.0, deadline - time.monotonic()))
        if finisher.is_alive():
            log.warning("metrics and plots not finished before stopping; they are written at the next start")


def main(argv: list[str] | None = None) -> int:
    started = start_node(PROGRAM, "armpipe recorder: episodes as LeRobot datasets, metrics and plots", argv)
    run(started.config, started.stop, started.readiness)
    return 0


if __name__ == "__main__":
    sys.exit(main())
