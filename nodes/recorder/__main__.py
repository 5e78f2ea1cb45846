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
"""

from __future__ import annotations

import json
import logging
import math
import queue
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.config import DeploymentConfig, parse_node_args
from common.node import Readiness, setup_logging
from common.wire.protocol import KIND_ACTION, KIND_EVENT, KIND_FRAME, KIND_STATE, SOURCE_DATASET, Message
from common.wire.transport import LatestSubscriber, SocketFactory, stop_event_on_signals
from nodes.recorder.writer import (
    EPISODE_METRICS,
    OUTCOME_FILE,
    WORK_DIR,
    ChunkRecord,
    EpisodeInfo,
    EpisodeOutcome,
    EpisodeWriter,
    TickRecord,
    TickRejected,
    finished_without_metrics,
    load_outcome,
    next_recorder_index,
    pending_work,
    recover_episode,
)

log = logging.getLogger("recorder")

PROGRAM = "recorder"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# An episode whose ``episode_stop`` was missed is closed after the actuator has ticked idle this long.
# (Silence alone never closes it: a lockstep actuator may wait a minute for a CPU diffusion chunk.)
IDLE_CLOSE_S = 2.0
PLAYER_SRC = "dataset_player"  # the player's ``src``: its episode events share names with the actuator's
GROUND_TRUTH_KEEP = 20000  # ground-truth rows kept for matching (about 11 minutes at 30 fps)


# --------------------------------------------------------------------------------------------------
# Work items: receiver -> writer
# --------------------------------------------------------------------------------------------------


@dataclass
class StartItem:
    info: EpisodeInfo


@dataclass
class StopItem:
    label: str
    reason: str
    ended_t: float
    dropped_ticks: int


@dataclass
class LabelItem:
    actuator_episode: int
    label: str


@dataclass
class RejectItem:
    field: str


@dataclass
class HoldItem:
    reason: str


# --------------------------------------------------------------------------------------------------
# Receiver: pairing ticks with their inputs and deciding episode boundaries
# --------------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    msg: Message
    received: float


@dataclass
class _OpenEpisode:
    info: EpisodeInfo
    dropped: int = 0
    idle_since: float | None = None  # first idle tick (episode_index -1) seen while this episode is open


class TickAssembler:
    """Turns the raw streams into ordered writer items. Single-threaded (the receiver thread)."""

    def __init__(self, config: DeploymentConfig, output_dir: Path, work: queue.Queue[Any]) -> None:
        self.config = config
        self.output_dir = output_dir
        self.work = work
        self.frame_buffer = max(2, config.recorder.frame_buffer)
        self.input_wait_s = config.recorder.input_wait_s
        self.frames: dict[str, OrderedDict[int, Message]] = {name: OrderedDict() for name in config.cameras}
        self.states: dict[str, OrderedDict[int, Message]] = {name: OrderedDict() for name in config.arms}
        self.ground_truth: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.pending: deque[_Pending] = deque()
        self.episode: _OpenEpisode | None = None
        self.closed: deque[int] = deque(maxlen=32)  # actuator indices already closed (no implicit reopen)
        self.next_index = next_recorder_index(output_dir)
        self.ticks_waiting = 0  # ticks queued for the writer (shared with it; guarded by the GIL's atomic +=)
        self.lock = threading.Lock()
        self.counters = {"ticks": 0, "dropped": 0, "unmatched": 0}

    # ------------------------------------------------------------------ input
    def on_message(self, msg: Message, now: float) -> None:
        if msg.kind == KIND_FRAME:
            self._remember(self.frames.get(str(msg.meta.get("camera"))), msg)
        elif msg.kind == KIND_STATE:
            self._remember(self.states.get(str(msg.meta.get("arm"))), msg)
        elif msg.kind == KIND_ACTION and msg.meta.get("role") == "ground_truth":
            self._remember_ground_truth(msg)
        elif msg.kind == KIND_EVENT and msg.src.startswith(PLAYER_SRC):
            # The player's own episode_start/episode_end (its dataset's episodes): not the actuator's episodes.
            if msg.meta.get("event") == "episode_start":
                log.debug("player started dataset episode %s", msg.meta.get("episode_index"))
        elif (msg.kind == KIND_ACTION and msg.meta.get("role") == "executed") or (
                msg.kind == KIND_EVENT and msg.meta.get("event") in ("episode_start", "episode_stop", "episode_label",
                                                                     "chunk", "hold")):
            self.pending.append(_Pending(msg, now))
        elif msg.kind == KIND_EVENT and msg.meta.get("event") == "contract_mismatch":
            log.warning("actuator reports a contract mismatch: %s", msg.meta.get("differences"))
        self.process(now)

    def _remember(self, buffer: OrderedDict[int, Message] | None, msg: Message) -> None:
        if buffer is None:
            return
        if buffer and msg.seq <= next(reversed(buffer)):
            buffer.clear()  # the publisher restarted: its sequence numbers start again
        buffer[msg.seq] = msg
        while len(buffer) > self.frame_buffer:
            buffer.popitem(last=False)

    def _remember_ground_truth(self, msg: Message) -> None:
        action = msg.arrays.get("action")
        episode, frame_index = msg.meta.get("episode_index"), msg.meta.get("frame_index")
        if action is None or not isinstance(episode, int) or not isinstance(frame_index, int):
            return
        self.ground_truth[(episode, frame_index)] = np.array(action, dtype=np.float32)
        while len(self.ground_truth) > GROUND_TRUTH_KEEP:
            self.ground_truth.popitem(last=False)

    # ------------------------------------------------------------------ ordered processing
    def process(self, now: float) -> None:
        """Handle actuator messages in arrival order; a tick waits (bounded) for the inputs it names."""
        while self.pending:
            head = self.pending[0]
            if head.msg.kind == KIND_ACTION:
                force = now - head.received >= self.input_wait_s
                if not self._on_tick(head.msg, force, now):
                    break  # still waiting for its frames/states
            else:
                self._on_event(head.msg, now)
            self.pending.popleft()

    def _put(self, item: Any) -> None:
        self.work.put(item)

    def _start(self, actuator_episode: int, t: float, *, implicit: bool) -> None:
        if self.episode is not None:
            self._stop("", "superseded", t)
        info = EpisodeInfo(name=f"episode_{self.next_index:06d}", recorder_index=self.next_index,
                           actuator_episode=actuator_episode, started_wall=time.time(), started_t=t,
                           implicit_start=implicit)
        self.next_index += 1
        self.episode = _OpenEpisode(info)
        log.info("episode %d started -> %s%s", actuator_episode, info.name, " (start event missed)" if implicit else "")
        self._put(StartItem(info))

    def _stop(self, label: str, reason: str, t: float) -> None:
        assert self.episode is not None
        self._put(StopItem(label=label, reason=reason, ended_t=t, dropped_ticks=self.episode.dropped))
        log.info("episode %d stopped (%s, label %r) -> %s", self.episode.info.actuator_episode, reason, label,
                 self.episode.info.name)
        self.closed.append(self.episode.info.actuator_episode)
        self.episode = None

    def _on_event(self, msg: Message, now: float) -> None:
        event = msg.meta.get("event")
        index = msg.meta.get("episode_index")
        if event == "episode_start" and isinstance(index, int):
            if self.episode is not None and self.episode.info.actuator_episode == index:
                return  # a repeated start of the episode already open
            self._start(index, msg.t, implicit=False)
        elif event == "episode_stop":
            if self.episode is None or (isinstance(index, int) and index != self.episode.info.actuator_episode):
                log.info("episode_stop for episode %s, which is not being recorded", index)
                return
            self._stop(str(msg.meta.get("label") or ""), str(msg.meta.get("reason") or "stop"), msg.t)
        elif event == "episode_label" and isinstance(index, int):
            self._put(LabelItem(index, str(msg.meta.get("label") or "")))
        elif event == "chunk" and self.episode is not None:
            chunk = msg.arrays.get("chunk")
            timings = msg.meta.get("timings") if isinstance(msg.meta.get("timings"), dict) else {}
            self._put(ChunkRecord(
                t=msg.t, obs_t=_float(msg.meta.get("obs_t")), rows=_int(msg.meta.get("rows")),
                dropped_stale=_int(msg.meta.get("dropped_stale")), round_trip_s=_float(msg.meta.get("round_trip_s")),
                queue_depth=_int(msg.meta.get("queue_depth")),
                timings={str(k): _float(v) for k, v in timings.items() if isinstance(v, (int, float))},
                chunk=None if chunk is None else np.array(chunk, dtype=np.float32)))
        elif event == "hold" and self.episode is not None:
            self._put(HoldItem(str(msg.meta.get("reason", ""))))

    def _on_tick(self, msg: Message, force: bool, now: float) -> bool:
        """False while the tick should wait for inputs it names that have not arrived yet."""
        index = msg.meta.get("episode_index")
        index = index if isinstance(index, int) else -1
        if self.episode is not None and index != self.episode.info.actuator_episode:
            if index < 0:
                # An idle actuator with this episode still open here: its stop event was lost.
                if self.episode.idle_since is None:
                    self.episode.idle_since = now
                elif now - self.episode.idle_since > IDLE_CLOSE_S:
                    self._stop("", "stop_event_missed", msg.t)
                return True
            self._stop("", "superseded", msg.t)
        if self.episode is None:
            if index < 0 or index in self.closed:
                return True
            self._start(index, msg.t, implicit=True)
        assert self.episode is not None
        tick = self._assemble(msg, force)
        if tick is None:
            return False
        self.episode.idle_since = None
        self.counters["ticks"] += 1
        if isinstance(tick, RejectItem):
            self._put(tick)
            return True
        if not tick.inputs_matched:
            self.counters["unmatched"] += 1
        with self.lock:
            full = self.ticks_waiting >= self.config.recorder.queue_ticks
            if not full:
                self.ticks_waiting += 1
        if full:
            self.episode.dropped += 1
            self.counters["dropped"] += 1
            if self.episode.dropped == 1 or self.episode.dropped % 100 == 0:
                log.warning("writer is behind: %d tick(s) of %s dropped (recorder.queue_ticks=%d)",
                            self.episode.dropped, self.episode.info.name, self.config.recorder.queue_ticks)
            return True
        self._put(tick)
        return True

    def _pick(self, buffer: OrderedDict[int, Message], seq: Any, force: bool) -> tuple[Message | None, bool, bool]:
        """(message, matched, wait): the message with ``seq``, else the newest once waiting is pointless."""
        if isinstance(seq, int) and seq in buffer:
            return buffer[seq], True, False
        newest = next(reversed(buffer)) if buffer else None
        if not force and isinstance(seq, int) and (newest is None or seq > newest):
            return None, False, True  # named input not here yet
        return (buffer[newest] if newest is not None else None), not isinstance(seq, int), False

    def _assemble(self, msg: Message, force: bool) -> TickRecord | RejectItem | None:
        inputs = msg.meta.get("inputs") if isinstance(msg.meta.get("inputs"), dict) else {}
        matched = True
        images: dict[str, np.ndarray] = {}
        jpeg: set[str] = set()
        frame_used: Message | None = None
        for camera, buffer in self.frames.items():
            frame, ok, wait = self._pick(buffer, inputs.get(camera), force)
            if wait:
                return None
            if frame is None:
                return RejectItem(f"images.{camera}")
            matched &= ok
            image = frame.arrays.get("image")
            if image is None:
                return RejectItem(f"images.{camera}")
            images[camera] = image
            if "image" in frame.jpeg:
                jpeg.add(camera)
            frame_used = frame_used or frame
        parts = []
        for arm, buffer in self.states.items():
            state, ok, wait = self._pick(buffer, inputs.get(arm), force)
            if wait:
                return None
            if state is None or state.arrays.get("position") is None:
                return RejectItem(f"state.{arm}")
            matched &= ok
            parts.append(np.asarray(state.arrays["position"], dtype=np.float32).reshape(-1))
        frame_index = _int(msg.meta.get("frame_index"), -1)
        ground_truth = None
        if frame_used is not None and frame_index >= 0:
            player_episode = frame_used.meta.get("episode_index")
            ground_truth = self.ground_truth.get((player_episode, frame_index))
            if ground_truth is None and not force and frame_used.meta.get("source") == SOURCE_DATASET:
                # The player publishes every row's truth, on its own socket: it can arrive after the tick
                # (first row of an episode included), so wait for it (bounded by input_wait_s).
                return None
        action = msg.arrays.get("action")
        if action is None:
            return RejectItem("action")
        return TickRecord(
            tick=_int(msg.meta.get("tick")), t=msg.t, obs_t=_float(msg.meta.get("obs_t")),
            hold=bool(msg.meta.get("hold")), hold_reason=str(msg.meta.get("hold_reason") or ""),
            queue_depth=_int(msg.meta.get("queue_depth")), lateness_s=_float(msg.meta.get("lateness_s")),
            frame_index=frame_index, actuator_episode=self.episode.info.actuator_episode if self.episode else -1,
            action=np.array(action, dtype=np.float32).reshape(-1), state=np.concatenate(parts) if parts else
            np.zeros(0, np.float32), images=images, jpeg=jpeg, ground_truth=ground_truth,
            inputs={str(k): v for k, v in inputs.items() if isinstance(v, int)}, inputs_matched=matched)


def _float(value: Any, default: float = math.nan) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _int(value: Any, default: int = 0) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else default


# --------------------------------------------------------------------------------------------------
# Metrics, summary and plots
# --------------------------------------------------------------------------------------------------


def percentiles(values: Any) -> dict[str, float] | None:
    array = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if array.size == 0:
        return None
    return {"n": int(array.size), "mean": float(array.mean()), "p50": float(np.percentile(array, 50)),
            "p90": float(np.percentile(array, 90)), "p99": float(np.percentile(array, 99)),
            "max": float(array.max())}


def action_error(ticks: pd.DataFrame, names: list[str]) -> dict[str, Any] | None:
    """Executed action vs the replayed dataset's action on the same frame (ticks not holding)."""
    if ticks.empty or "ground_truth" not in ticks:
        return None
    rows = ticks[ticks["ground_truth"].notna() & ~ticks["hold"].astype(bool)]
    if rows.empty:
        return None
    executed = np.stack([np.asarray(v, dtype=np.float64) for v in rows["action"]])
    truth = np.stack([np.asarray(v, dtype=np.float64) for v in rows["ground_truth"]])
    if executed.shape != truth.shape:
        return None
    error = executed - truth
    per_joint = np.abs(error).mean(axis=0)
    return {"frames_compared": len(rows), "mae": float(np.abs(error).mean()),
            "rmse": float(np.sqrt((error ** 2).mean())), "max_abs": float(np.abs(error).max()),
            "per_joint_mae": {name: float(v) for name, v in zip(names, per_joint, strict=False)}}


def episode_metrics(outcome: EpisodeOutcome, names: list[str]) -> dict[str, Any]:
    ticks, chunks, info = outcome.ticks, outcome.chunks, outcome.info
    duration = outcome.ended_t - info.started_t
    if not math.isfinite(duration) or duration <= 0:
        duration = float(ticks["t"].max() - ticks["t"].min()) if len(ticks) > 1 else 0.0
    hold_ticks: dict[str, int] = {}
    if not ticks.empty:
        held = ticks[ticks["hold"].astype(bool)]
        hold_ticks = {str(k): int(v) for k, v in held["hold_reason"].value_counts().items()}
    latency: dict[str, Any] = {"round_trip_s": None}
    if not chunks.empty:
        latency["round_trip_s"] = percentiles(chunks["round_trip_s"])
        for column in chunks.columns:
            if column.startswith("policy_"):
                latency[column.removeprefix("policy_")] = percentiles(chunks[column])
    return {
        "episode": info.name,
        "dataset": str(outcome.path),
        "recorder_index": info.recorder_index,
        "actuator_episode": info.actuator_episode,
        "label": outcome.label,
        "stop_reason": outcome.stop_reason,
        "started_wall": info.started_wall,
        "ended_wall": outcome.ended_wall,
        "duration_s": duration,
        "frames": outcome.frames,
        "holds": {"ticks_by_reason": hold_ticks, "events_by_reason": dict(outcome.hold_events),
                  "ticks": int(sum(hold_ticks.values()))},
        "latency": latency,
        "lateness_s": percentiles(ticks["lateness_s"]) if not ticks.empty else None,
        "queue_depth": percentiles(ticks["queue_depth"]) if not ticks.empty else None,
        "chunks": len(chunks),
        "dropped_stale_rows": int(chunks["dropped_stale"].sum()) if not chunks.empty else 0,
        "action_error": action_error(ticks, names),
        "dropped_ticks": outcome.dropped_ticks,
        "rejected_ticks": dict(outcome.rejected_ticks),
        "inputs_matched_fraction": float(ticks["inputs_matched"].mean()) if not ticks.empty else None,
        "implicit_start": info.implicit_start,
        "recovered": outcome.recovered,
    }


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The latest metrics line of every episode (a later label line replaces the earlier one)."""
    latest: dict[str, dict[str, Any]] = {}
    path = output_dir / METRICS_FILE
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(entry, dict) and "episode" in entry:
                latest[entry["episode"]] = entry
    return sorted(latest.values(), key=lambda entry: entry.get("recorder_index", 0))


def summarize(output_dir: Path) -> dict[str, Any]:
    episodes = read_metrics(output_dir)
    labels = [entry.get("label", "") for entry in episodes]
    success, failure = labels.count("success"), labels.count("failure")
    holds: dict[str, int] = {}
    hold_events: dict[str, int] = {}
    for entry in episodes:
        for reason, count in entry.get("holds", {}).get("ticks_by_reason", {}).items():
            holds[reason] = holds.get(reason, 0) + count
        for reason, count in entry.get("holds", {}).get("events_by_reason", {}).items():
            hold_events[reason] = hold_events.get(reason, 0) + count
    round_trips: list[float] = []
    inference: list[float] = []
    lateness: list[float] = []
    errors: list[dict[str, Any]] = []
    for entry in episodes:
        side = Path(entry.get("dataset", "")) / "armpipe"
        try:
            chunks = pd.read_parquet(side / "chunks.parquet")
            ticks = pd.read_parquet(side / "ticks.parquet", columns=["lateness_s"])
        except (OSError, ValueError, KeyError):
            continue
        if "round_trip_s" in chunks:
            round_trips.extend(chunks["round_trip_s"].tolist())
        for column in ("policy_inference_s", "policy_total_s"):
            if column in chunks:
                inference.extend(chunks[column].tolist())
                break
        lateness.extend(ticks["lateness_s"].tolist())
        if entry.get("action_error"):
            errors.append(entry["action_error"])
    durations = [float(entry.get("duration_s", 0.0)) for entry in episodes]
    compared = sum(error["frames_compared"] for error in errors)
    return {
        "episodes": len(episodes),
        "labelled": success + failure,
        "success": success,
        "failure": failure,
        "unlabelled": len(episodes) - success - failure,
        "success_rate": success / (success + failure) if success + failure else None,
        "duration_s": {"total": float(sum(durations)), "mean": float(np.mean(durations)) if durations else None},
        "frames": int(sum(entry.get("frames", 0) for entry in episodes)),
        "holds_by_reason": holds,
        "hold_events_by_reason": hold_events,
        "latency": {"round_trip_s": percentiles(round_trips), "policy_inference_s": percentiles(inference)},
        "lateness_s": percentiles(lateness),
        "action_error": {
            "frames_compared": compared,
            "mae": sum(e["mae"] * e["frames_compared"] for e in errors) / compared,
            "rmse": math.sqrt(sum(e["rmse"] ** 2 * e["frames_compared"] for e in errors) / compared),
        } if compared else None,
        "dropped_ticks": int(sum(entry.get("dropped_ticks", 0) for entry in episodes)),
        "recovered_episodes": [entry["episode"] for entry in episodes if entry.get("recovered")],
        "per_episode": [{"episode": e["episode"], "label": e.get("label", ""), "duration_s": e.get("duration_s"),
                         "frames": e.get("frames"), "stop_reason": e.get("stop_reason")} for e in episodes],
        "updated_wall": time.time(),
    }


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    tmp.replace(path)


def _figure(rows: int, cols: int, size: tuple[float, float]) -> Any:
    # The object-oriented API (no pyplot): no global state, safe off the main thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=90, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, cols, squeeze=False)


def plot_episode(outcome: EpisodeOutcome, names: list[str], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    ticks, chunks = outcome.ticks, outcome.chunks
    written: list[Path] = []
    if not ticks.empty:
        t = ticks["t"].to_numpy() - outcome.info.started_t
        actions = np.stack([np.asarray(v) for v in ticks["action"]])
        states = np.stack([np.asarray(v) for v in ticks["state"]]) if len(ticks["state"].iloc[0]) else None
        has_gt = ticks["ground_truth"].notna().any()
        cols = 3
        rows = math.ceil(len(names) / cols)
        figure, axes = _figure(rows, cols, (4.2 * cols, 2.2 * rows))
        hold = ticks["hold"].astype(bool).to_numpy()
        for index, name in enumerate(names):
            axis = axes[index // cols][index % cols]
            if states is not None and index < states.shape[1]:
                axis.plot(t, states[:, index], label="state", color="tab:blue", linewidth=1)
            axis.plot(t, actions[:, index], label="executed", color="tab:orange", linewidth=1)
            if has_gt:
                gt = np.array([np.asarray(v)[index] if v is not None else np.nan for v in ticks["ground_truth"]])
                axis.plot(t, gt, label="ground truth", color="tab:green", linestyle="--", linewidth=1)
            if hold.any():
                axis.fill_between(t, 0, 1, where=hold, transform=axis.get_xaxis_transform(), color="tab:red",
                                  alpha=0.12, step="mid", label="hold")
            axis.set_title(name, fontsize=9)
            axis.tick_params(labelsize=7)
        for index in range(len(names), rows * cols):
            axes[index // cols][index % cols].set_visible(False)
        axes[0][0].legend(fontsize=7)
        figure.suptitle(f"{outcome.info.name}: label {outcome.label or '-'}, {outcome.frames} frames (time in s)")
        path = directory / "joints.png"
        figure.savefig(path)
        written.append(path)
    figure, axes = _figure(1, 3, (13, 3.2))
    if not chunks.empty:
        t_chunk = chunks["t"].to_numpy() - outcome.info.started_t
        axes[0][0].plot(t_chunk, chunks["round_trip_s"] * 1000, ".-", label="round trip")
        for column in ("policy_inference_s", "policy_total_s"):
            if column in chunks:
                axes[0][0].plot(t_chunk, chunks[column] * 1000, ".-", label=column.removeprefix("policy_"))
        axes[0][0].legend(fontsize=7)
    axes[0][0].set_title("policy latency (ms)", fontsize=9)
    if not ticks.empty:
        axes[0][1].step(ticks["t"] - outcome.info.started_t, ticks["queue_depth"], where="post")
        axes[0][2].hist(ticks["lateness_s"].dropna() * 1000, bins=40)
    axes[0][1].set_title("queue depth (rows)", fontsize=9)
    axes[0][2].set_title("tick lateness (ms)", fontsize=9)
    path = directory / "timing.png"
    figure.savefig(path)
    written.append(path)
    return written


def plot_summary(output_dir: Path, summary: dict[str, Any]) -> Path:
    episodes = read_metrics(output_dir)
    figure, axes = _figure(1, 3, (13, 3.4))
    colours = {"success": "tab:green", "failure": "tab:red"}
    axes[0][0].bar(range(len(episodes)), [e.get("duration_s", 0) for e in episodes],
                   color=[colours.get(e.get("label", ""), "tab:gray") for e in episodes])
    rate = summary["success_rate"]
    axes[0][0].set_title(f"episodes (green success, red failure); success rate "
                         f"{'-' if rate is None else f'{rate:.0%}'}", fontsize=9)
    axes[0][0].set_ylabel("duration (s)")
    p50 = [((e.get("latency") or {}).get("round_trip_s") or {}).get("p50", np.nan) for e in episodes]
    p99 = [((e.get("latency") or {}).get("round_trip_s") or {}).get("p99", np.nan) for e in episodes]
    axes[0][1].plot(range(len(episodes)), np.asarray(p50, dtype=float) * 1000, "o-", label="p50")
    axes[0][1].plot(range(len(episodes)), np.asarray(p99, dtype=float) * 1000, "o-", label="p99")
    axes[0][1].set_title("policy round trip per episode (ms)", fontsize=9)
    axes[0][1].legend(fontsize=7)
    for axis in (axes[0][0], axes[0][1]):
        axis.set_xticks(range(len(episodes)), [str(e.get("recorder_index", i)) for i, e in enumerate(episodes)])
        axis.set_xlabel("episode")
    holds = summary["holds_by_reason"]
    axes[0][2].bar(list(holds), list(holds.values()))
    if not holds:
        axes[0][2].text(0.5, 0.5, "no holds during episodes", ha="center", transform=axes[0][2].transAxes)
    axes[0][2].set_title("hold ticks by reason", fontsize=9)
    axes[0][2].tick_params(axis="x", labelrotation=30, labelsize=7)
    directory = output_dir / "plots"
    directory.mkdir(exist_ok=True)
    path = directory / "summary.png"
    figure.savefig(path)
    return path


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
        _write_json(outcome.path / "armpipe" / EPISODE_METRICS, metrics)
        self.finished += 1
        log.info("%s saved: %d frames, label %r, %s (metrics and plots in %.1f s)", outcome.info.name, outcome.frames,
                 outcome.label, outcome.path, time.monotonic() - started)

    def append_metrics(self, metrics: dict[str, Any]) -> None:
        with (self.output_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics, default=float) + "\n")
        summary = summarize(self.output_dir)
        _write_json(self.output_dir / SUMMARY_FILE, summary)
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
                    _write_json(side / EPISODE_METRICS, entry)
                    outcome_path = side / OUTCOME_FILE
                    if outcome_path.exists():
                        _write_json(outcome_path, {**json.loads(outcome_path.read_text()), "label": item.label})
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
