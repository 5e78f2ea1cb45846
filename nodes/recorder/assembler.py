"""The recorder's receiver side: pairs each executed tick with the frames and states it used (by the
sequence numbers in its ``inputs``), matches the player's ground truth, decides episode boundaries and
queues work items for the writer thread."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.config import DeploymentConfig
from common.wire.images import JpegImage
from common.wire.protocol import KIND_ACTION, KIND_EVENT, KIND_FRAME, KIND_STATE, SOURCE_DATASET, Message
from nodes.recorder.journal import JournalState
from nodes.recorder.records import (
    DROP_BEFORE_RECORDER,
    DROP_LOST,
    DROP_RECORDER_RESTARTED,
    DROP_WRITER_BEHIND,
    ChunkRecord,
    EpisodeInfo,
    LatencyRecord,
    TickRecord,
)
from nodes.recorder.recovery import next_recorder_index

log = logging.getLogger("recorder")

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
    dropped: dict[str, int]  # ticks of the episode not recorded, by why (writer.DROP_*)
    backlog_max_ticks: int = 0  # the most ticks that waited for the writer during the episode


@dataclass
class LabelItem:
    actuator_episode: int
    label: str
    episode_id: str = ""


@dataclass
class RejectItem:
    field: str


@dataclass
class HoldItem:
    reason: str


@dataclass
class SuspendItem:
    """The recorder alone is stopping while the episode runs on: its work directory stays, to be resumed."""


@dataclass
class ResumeItem:
    """The recorder restarted while this episode ran: the writer goes on with its work directory."""

    state: JournalState


@dataclass
class BackfillItem:
    """Ask the actuator's backlog for the ticks (and small events) of ``episode_id`` the recorder missed:
    after ``after_tick`` / ``after_t`` up to, not including, ``until_tick`` / ``until_t`` (None / inf: all)."""

    episode_id: str
    after_tick: int
    after_t: float
    until_tick: int | None
    until_t: float


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
    key: str  # the actuator's episode_id (a uuid), or its index from an actuator without ids
    dropped: dict[str, int] = field(default_factory=dict)
    idle_since: float | None = None  # first idle tick (episode_index -1) seen while this episode is open
    last_episode_tick: int = -1  # the actuator's episode_tick of the last tick seen
    backlog_max_ticks: int = 0
    shedding: bool = False  # the writer fell behind: ticks are dropped until its queue is half empty
    resumed: bool = False  # reopened after a recorder restart: the downtime's ticks are still to be filled in
    resumed_after_t: float = math.nan  # the last tick kept before the restart (robot clock)
    first_live_t: float = math.inf  # the first actuator message received after the restart

    def drop(self, reason: str, count: int = 1) -> int:
        self.dropped[reason] = self.dropped.get(reason, 0) + count
        return self.dropped[reason]


def episode_key(meta: dict[str, Any]) -> str:
    """Which actuator episode a message belongs to: its ``episode_id`` (a uuid that survives actuator
    restarts, where the index starts again at 0), else its index (an actuator without ids); "" when idle."""
    episode_id, index = meta.get("episode_id"), meta.get("episode_index")
    if isinstance(episode_id, str) and episode_id:
        return episode_id
    return f"index-{index}" if isinstance(index, int) and not isinstance(index, bool) and index >= 0 else ""


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
        self.closed: deque[str] = deque(maxlen=64)  # episode keys already closed (never reopened implicitly)
        self.next_index = next_recorder_index(output_dir)
        self.ticks_waiting = 0  # ticks queued for the writer (shared with it; guarded by the GIL's atomic +=)
        self.lock = threading.Lock()
        self.counters = {"ticks": 0, "dropped": 0, "unmatched": 0}
        self.last_tick_t = 0.0  # the actuator's time of the last tick of the open episode

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
                                                                     "chunk", "hold", "latency")):
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
            if self.episode is not None and self.episode.resumed:
                self.episode.first_live_t = min(self.episode.first_live_t, head.msg.t)
            if head.msg.kind == KIND_ACTION:
                force = now - head.received >= self.input_wait_s
                if not self._on_tick(head.msg, force, now):
                    break  # still waiting for its frames/states
            else:
                self._on_event(head.msg, now)
            self.pending.popleft()

    def _put(self, item: Any) -> None:
        self.work.put(item)

    def _start(self, actuator_episode: int, key: str, t: float, *, implicit: bool, task: str = "") -> None:
        if self.episode is not None:
            self._stop("", "superseded", t)
        info = EpisodeInfo(name=f"episode_{self.next_index:06d}", recorder_index=self.next_index,
                           actuator_episode=actuator_episode, started_wall=time.time(), started_t=t,
                           implicit_start=implicit, episode_id=key if not key.startswith("index-") else "",
                           task=task)
        self.next_index += 1
        self.episode = _OpenEpisode(info, key)
        log.info("episode %d (%s) started -> %s%s", actuator_episode, key, info.name,
                 " (start event missed)" if implicit else "")
        self._put(StartItem(info))

    def _stop(self, label: str, reason: str, t: float) -> None:
        assert self.episode is not None
        episode = self.episode
        self._backfill(episode, None)  # resumed, and it ended before a tick came: the backlog has its tail
        self._put(StopItem(label=label, reason=reason, ended_t=t, dropped=dict(episode.dropped),
                           backlog_max_ticks=episode.backlog_max_ticks))
        log.info("episode %d stopped (%s, label %r) -> %s%s", episode.info.actuator_episode, reason, label,
                 episode.info.name, f"; ticks not recorded: {episode.dropped}" if episode.dropped else "")
        self.closed.append(episode.key)
        self.episode = None

    def resume(self, state: JournalState) -> None:
        """Reopen the episode a restarted recorder was recording (its work directory goes on, ``ResumeItem``)."""
        info = state.info
        rows = [*state.tick_rows, *state.gap_rows]
        last = max(rows, key=lambda row: int(row.get("episode_tick", -1)), default=None)
        self.episode = _OpenEpisode(info, info.episode_id, resumed=True,
                                    last_episode_tick=int(last["episode_tick"]) if last else -1,
                                    resumed_after_t=float(last["t"]) if last else math.nan)
        if last is not None:
            self.last_tick_t = float(last["t"])
        self._put(ResumeItem(state))
        log.warning("resuming %s (actuator episode %d, %s) after a recorder restart: %d frames kept, its last "
                    "episode_tick %s", info.name, info.actuator_episode, info.episode_id, state.frames,
                    last["episode_tick"] if last else "none")

    def _backfill(self, episode: _OpenEpisode, until_tick: int | None) -> None:
        """Once per resumed episode: the writer asks the actuator's backlog for the downtime's small streams."""
        if not episode.resumed:
            return
        episode.resumed = False
        self._put(BackfillItem(episode.key, episode.last_episode_tick, episode.resumed_after_t, until_tick,
                               episode.first_live_t))

    def suspend(self) -> None:
        """Only the recorder is being restarted (supervisord itself keeps running): leave the open episode's work
        directory complete for the next process to resume, instead of ending the recording here."""
        if self.episode is not None:
            log.info("%s suspended: the next recorder resumes it if the actuator still runs episode %d",
                     self.episode.info.name, self.episode.info.actuator_episode)
            self._put(SuspendItem())
            self.episode = None

    def shutdown(self) -> None:
        """The recorder is stopping: end the open episode here, so it is saved complete (not left for recovery)."""
        if self.episode is not None:
            self._stop("", "recorder_stopped", self.last_tick_t)

    def _on_event(self, msg: Message, now: float) -> None:
        event = msg.meta.get("event")
        index = msg.meta.get("episode_index")
        key = episode_key(msg.meta)
        if event == "episode_start" and isinstance(index, int) and key:
            if self.episode is not None and self.episode.key == key:
                return  # a repeated start of the episode already open
            instruction = msg.meta.get("instruction")  # a language policy's task for this episode
            self._start(index, key, msg.t, implicit=False,
                        task=instruction.strip() if isinstance(instruction, str) else "")
        elif event == "episode_stop":
            if self.episode is None or (key and key != self.episode.key):
                log.info("episode_stop for episode %s (%s), which is not being recorded", index, key)
                return
            self._stop(str(msg.meta.get("label") or ""), str(msg.meta.get("reason") or "stop"), msg.t)
        elif event == "episode_label" and isinstance(index, int):
            episode_id = msg.meta.get("episode_id")
            self._put(LabelItem(index, str(msg.meta.get("label") or ""),
                                episode_id if isinstance(episode_id, str) else ""))
        elif event == "chunk" and self.episode is not None:
            self._put(chunk_record(msg.meta, msg.t, msg.arrays.get("chunk")))
        elif event == "latency" and self.episode is not None:
            self._put(latency_record(msg.meta, msg.t))
        elif event == "hold" and self.episode is not None:
            self._put(HoldItem(str(msg.meta.get("reason", ""))))

    def _on_tick(self, msg: Message, force: bool, now: float) -> bool:
        """False while the tick should wait for inputs it names that have not arrived yet."""
        index = msg.meta.get("episode_index")
        index = index if isinstance(index, int) else -1
        key = episode_key(msg.meta)
        if self.episode is not None and key != self.episode.key:
            if not key:
                # An idle actuator with this episode still open here: its stop event was lost.
                if self.episode.idle_since is None:
                    self.episode.idle_since = now
                elif now - self.episode.idle_since > IDLE_CLOSE_S:
                    self._stop("", "stop_event_missed", msg.t)
                return True
            self._stop("", "superseded", msg.t)
        if self.episode is None:
            if not key or key in self.closed:
                return True
            self._start(index, key, msg.t, implicit=True)
        assert self.episode is not None
        tick = self._assemble(msg, force)
        if tick is None:
            return False
        episode = self.episode
        episode.idle_since = None
        self.last_tick_t = msg.t
        self.counters["ticks"] += 1
        # The actuator numbers an episode's ticks from 0: ticks before the first one seen ran before the
        # recorder saw the episode, gaps are messages it never got. Both are counted, never silent.
        episode_tick = _int(msg.meta.get("episode_tick"), -1)
        if episode_tick >= 0:
            missed = episode_tick - episode.last_episode_tick - 1
            restarted = episode.resumed
            self._backfill(episode, episode_tick)  # before this tick: the writer fills the gap first
            if missed > 0:
                reason = (DROP_RECORDER_RESTARTED if restarted else DROP_BEFORE_RECORDER
                          if episode.last_episode_tick < 0 else DROP_LOST)
                episode.drop(reason, missed)
                self.counters["dropped"] += missed
                log.warning("%s: %d tick(s) of episode %d not received (%s)", episode.info.name, missed,
                            episode.info.actuator_episode, reason)
            episode.last_episode_tick = max(episode.last_episode_tick, episode_tick)
        if isinstance(tick, RejectItem):
            self._put(tick)
            return True
        if not tick.inputs_matched:
            self.counters["unmatched"] += 1
        limit = self.config.recorder.queue_ticks
        with self.lock:
            # Once full, ticks are dropped until the writer has worked off half its queue: one longer gap
            # rather than every other tick, so the recording is cut into few parts (nodes.recorder.parts).
            if episode.shedding and self.ticks_waiting <= limit // 2:
                episode.shedding = False
            full = episode.shedding or self.ticks_waiting >= limit
            episode.shedding = full
            if not full:
                self.ticks_waiting += 1
        if full:
            dropped = episode.drop(DROP_WRITER_BEHIND)
            self.counters["dropped"] += 1
            if dropped == 1 or dropped % 100 == 0:
                log.warning("writer is behind: %d tick(s) of %s dropped (recorder.queue_ticks=%d)",
                            dropped, episode.info.name, self.config.recorder.queue_ticks)
            return True
        episode.backlog_max_ticks = max(episode.backlog_max_ticks, self.ticks_waiting)
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
        images: dict[str, np.ndarray | JpegImage] = {}
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
            # A JPEG camera's frame stays the bytes it came in: its encoder thread decodes it once.
            images[camera] = JpegImage.of_message(frame) if "image" in frame.jpeg else image
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
            np.zeros(0, np.float32), images=images, ground_truth=ground_truth,
            inputs={str(k): v for k, v in inputs.items() if isinstance(v, int)}, inputs_matched=matched,
            episode_tick=_int(msg.meta.get("episode_tick"), -1))


def chunk_record(meta: dict[str, Any], t: float, chunk: np.ndarray | None) -> ChunkRecord:
    """A ``chunk`` event as the writer keeps it (``chunk``: its rows, None when not at hand)."""
    timings = meta.get("timings") if isinstance(meta.get("timings"), dict) else {}
    return ChunkRecord(
        t=t, obs_t=_float(meta.get("obs_t")), rows=_int(meta.get("rows")),
        dropped_stale=_int(meta.get("dropped_stale")), round_trip_s=_float(meta.get("round_trip_s")),
        queue_depth=_int(meta.get("queue_depth")),
        timings={str(k): _float(v) for k, v in timings.items() if isinstance(v, (int, float))},
        chunk=None if chunk is None else np.array(chunk, dtype=np.float32))


def latency_record(meta: dict[str, Any], t: float) -> LatencyRecord:
    """A ``latency`` event as the writer keeps it."""
    stages = meta.get("stages") if isinstance(meta.get("stages"), dict) else {}
    return LatencyRecord(
        t=t, tick=_int(meta.get("tick")), row=_int(meta.get("row")), first_row=bool(meta.get("first_row")),
        end_to_end_s=_float(meta.get("end_to_end_s")),
        stages={str(k): _float(v) for k, v in stages.items() if isinstance(v, (int, float))})


def _float(value: Any, default: float = math.nan) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _int(value: Any, default: int = 0) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else default
