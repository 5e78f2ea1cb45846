"""Dataset player: replays a local LeRobot v3 dataset through the camera and state streams.

It stands in for every camera node and state-reader of the deployment: for each dataset row it
publishes one ``frame`` per config camera on ``cameras.<cam>.endpoint`` and one ``state`` per arm on
``arms.<arm>.state_endpoint``, exactly as those nodes do (``meta.source == "dataset"`` is the only
difference), plus the row's ground-truth ``action`` and episode boundary events on
``player.gt_endpoint``. Every message is stamped with ``time.monotonic()`` when published: the
player is the "capture".

Timing (``player.mode``):
- ``realtime``: rows go out at their recorded timestamps (episode start + parquet ``timestamp``).
- ``lockstep``: row k goes out, then the player waits for the actuator's ``executed`` tick that used
  it (``frame_index >= k`` and, when the tick names its inputs, input sequence numbers at least those
  of row k) before row k+1; an unacknowledged row is re-sent after ``player.lockstep_timeout_s``.

Episodes: ``player.episodes`` (empty: all) in order, again from the start when ``player.loop``. With
``player.follow_episodes`` an episode starts on the actuator's ``episode_start`` event and stops on
its ``episode_stop``; otherwise the player plays continuously.

    python -m nodes.dataset_player --config configs/lift.yaml [--player.mode=lockstep ...]
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.config import ConfigError, DeploymentConfig
from common.dataset_source import DatasetError, DatasetSource, EpisodeData, EpisodeReader
from common.node import start_node
from common.wire.protocol import KIND_ACTION, KIND_EVENT, KIND_FRAME, KIND_STATE, SOURCE_DATASET, Message
from common.wire.transport import LatestSubscriber, Publisher, SocketFactory

PROGRAM = "dataset_player"
FRAME_HWM = 8  # per subscriber; consumers drain to the newest frame anyway
GT_HWM = 1024  # ground truth and events are small and an evaluator wants every one
EVENTS_HWM = 1024
STATS_PERIOD_S = 1.0

log = logging.getLogger(PROGRAM)


@dataclass
class PlayerStats:
    published_rows: int = 0
    late_rows: int = 0  # realtime: rows published more than one frame period after their time
    resends: int = 0  # lockstep: rows re-sent because no tick acknowledged them in time
    decode_errors: int = 0
    episodes_played: int = 0
    rows_since_report: int = 0
    last_report: float = field(default_factory=time.monotonic)


class EpisodeInterrupted(Exception):
    """Playback of the current episode ends early: ``reason`` says why (shutdown, actuator stop)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class DatasetPlayer:
    def __init__(self, config: DeploymentConfig, source: DatasetSource, factory: SocketFactory, stop: Any) -> None:
        self.config = config
        self.player = config.player
        self.source = source
        self.stop = stop
        self.lockstep = self.player.mode == "lockstep"
        self.action_names = list(config.action_names())
        self.frames = {name: Publisher(factory, cam.endpoint, PROGRAM, hwm=FRAME_HWM)
                       for name, cam in config.cameras.items()}
        self.states = {name: Publisher(factory, arm.state_endpoint, PROGRAM, hwm=FRAME_HWM)
                       for name, arm in config.arms.items()}
        self.gt = Publisher(factory, self.player.gt_endpoint, PROGRAM, hwm=GT_HWM)
        # Each arm's slice of the dataset's state vector (config order: left before right).
        self.arm_slices: dict[str, slice] = {}
        offset = 0
        for name, arm in config.arms.items():
            width = len(arm.joint_names())
            self.arm_slices[name] = slice(offset, offset + width)
            offset += width
        self.events: LatestSubscriber | None = None
        if self.lockstep or self.player.follow_episodes:
            self.events = LatestSubscriber(factory, [config.actuator.events_endpoint], hwm=EVENTS_HWM)
        self.stats = PlayerStats()
        self.current_episode = -1
        self.current_frame = -1
        self.state = "idle"
        self._start_requested = False
        self._stop_requested = False
        self._acked_frame = -1
        self._pending_seqs: dict[str, int] = {}

    # ------------------------------------------------------------------ actuator events
    def _handle(self, msg: Message) -> None:
        if msg.kind == KIND_EVENT:
            event = msg.meta.get("event")
            if event == "episode_start":
                self._start_requested, self._stop_requested = True, False
                log.info("actuator started episode %s", msg.meta.get("episode_index"))
            elif event == "episode_stop":
                self._stop_requested, self._start_requested = True, False
                log.info("actuator stopped episode %s", msg.meta.get("episode_index"))
        elif msg.kind == KIND_ACTION and msg.meta.get("role") == "executed":
            frame_index = msg.meta.get("frame_index", -1)
            if isinstance(frame_index, int) and frame_index >= 0 and self._inputs_current(msg.meta.get("inputs")):
                self._acked_frame = max(self._acked_frame, frame_index)

    def _inputs_current(self, inputs: Any) -> bool:
        """A tick acknowledges the pending row only if it used that row's messages (or newer ones)."""
        if not isinstance(inputs, dict):
            return True
        for name, seq in self._pending_seqs.items():
            used = inputs.get(name)
            if isinstance(used, int) and used < seq:
                return False
        return True

    def _poll_events(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for actuator messages (or just sleep when not listening)."""
        if self.events is None:
            self.stop.wait(max(0.0, timeout_s))
            return
        for msg in self.events.poll(max(0.0, timeout_s)):
            self._handle(msg)

    def _check_interrupt(self) -> None:
        if self.stop.is_set():
            raise EpisodeInterrupted("shutdown")
        if self.player.follow_episodes and self._stop_requested:
            raise EpisodeInterrupted("actuator_stop")
        if self.player.follow_episodes and self._start_requested:
            raise EpisodeInterrupted("actuator_restart")  # a new episode began: play it from its start

    # ------------------------------------------------------------------ publishing
    def _publish_row(self, rows: EpisodeData, row: int, images: dict[str, np.ndarray]) -> None:
        t = time.monotonic()
        frame_index = int(rows.frame_indices[row])
        common = {"source": SOURCE_DATASET, "episode_index": rows.episode_index, "frame_index": frame_index}
        # Ground truth first, cameras last: by the time the observation is complete, its truth is out.
        self.gt.publish(Message(kind=KIND_ACTION, t=t, meta={
            "role": "ground_truth", "names": self.action_names, "episode_index": rows.episode_index,
            "frame_index": frame_index, "timestamp": float(rows.timestamps[row])},
            arrays={"action": np.ascontiguousarray(rows.actions[row], dtype=np.float32)}))
        for name, publisher in self.states.items():
            arm = self.config.arms[name]
            # meta.task: the episode's own task string (its first in meta/episodes), for an actuator whose
            # language policy replays the dataset's tasks (actuator.instruction_source: dataset).
            sent = publisher.publish(Message(kind=KIND_STATE, t=t, meta={
                "arm": name, "names": arm.joint_names(), **common, **({"task": rows.task} if rows.task else {})},
                arrays={"position": np.ascontiguousarray(rows.states[row, self.arm_slices[name]], dtype=np.float32)}))
            self._pending_seqs[name] = sent.seq
        for name, publisher in self.frames.items():
            cam = self.config.cameras[name]
            msg = Message(kind=KIND_FRAME, t=t, meta={"camera": name, "backend": SOURCE_DATASET, **common},
                          arrays={"image": images[name]}, jpeg={"image"} if cam.encoding == "jpeg" else set())
            sent = publisher.publish(msg, jpeg_quality=cam.jpeg_quality)
            self._pending_seqs[name] = sent.seq
        self.current_frame = frame_index
        self.stats.published_rows += 1
        self.stats.rows_since_report += 1

    def _publish_event(self, event: str, **meta: Any) -> None:
        self.gt.publish(Message(kind=KIND_EVENT, meta={"event": event, **meta}))

    def _report(self) -> None:
        now = time.monotonic()
        elapsed = now - self.stats.last_report
        if elapsed < STATS_PERIOD_S:
            return
        fps = self.stats.rows_since_report / elapsed
        for name, publisher in self.frames.items():
            publisher.publish(Message(kind=KIND_EVENT, meta={
                "event": "camera_stats", "camera": name, "source": SOURCE_DATASET, "fps": round(fps, 2),
                "dropped": self.stats.late_rows, "errors": self.stats.decode_errors}))
        self._publish_event("player_stats", state=self.state, mode=self.player.mode,
                            episode_index=self.current_episode, frame_index=self.current_frame,
                            fps=round(fps, 2), published_rows=self.stats.published_rows,
                            late_rows=self.stats.late_rows, resends=self.stats.resends,
                            decode_errors=self.stats.decode_errors, episodes_played=self.stats.episodes_played)
        self.stats.rows_since_report = 0
        self.stats.last_report = now

    # ------------------------------------------------------------------ playback
    def _wait_until(self, due: float) -> None:
        while (remaining := due - time.monotonic()) > 0:
            self._poll_events(min(remaining, 0.05))
            self._check_interrupt()

    def _ack_timeout(self) -> float:
        """How long to wait for the tick before re-sending the row.

        Re-sending covers a row the actuator never received (it connected late, or restarted). Once it
        has acknowledged a row of this episode, it is connected and a silence means it is waiting for a
        chunk: it waits up to policy.timeout_s x retries (+1 s) before ticking, and a re-sent row would
        give it a second observation of the same frame, so wait at least that long.
        """
        timeout = self.player.lockstep_timeout_s
        if self._acked_frame >= 0:
            policy = self.config.policy
            timeout = max(timeout, policy.timeout_s * max(1, policy.retries) + 2.0)
        return timeout

    def _wait_ack(self, rows: EpisodeData, row: int, images: dict[str, np.ndarray]) -> None:
        frame_index = int(rows.frame_indices[row])
        deadline = time.monotonic() + self._ack_timeout()
        while self._acked_frame < frame_index:
            self._poll_events(0.05)
            self._check_interrupt()
            self._report()
            if time.monotonic() > deadline:
                self.stats.resends += 1
                if self.stats.resends == 1 or self.stats.resends % 10 == 0:
                    log.info("lockstep: episode %d frame %d not consumed within %.1fs; re-sending (%d re-sends)",
                             rows.episode_index, frame_index, self._ack_timeout(), self.stats.resends)
                self._publish_row(rows, row, images)
                deadline = time.monotonic() + self._ack_timeout()

    def play_episode(self, episode: int) -> str:
        """Publish one episode; returns how it ended: complete, actuator_stop, shutdown or error."""
        rows = self.source.episode(episode)
        reader = EpisodeReader(self.source, episode, self.player.prefetch_frames)
        self.current_episode, self.current_frame, self.state = episode, -1, "playing"
        self._acked_frame = -1
        published = 0
        outcome = "complete"
        self._publish_event("episode_start", episode_index=episode, frames=rows.length, task=rows.task,
                            mode=self.player.mode, source=SOURCE_DATASET)
        log.info("episode %d: %d frames, %s", episode, rows.length, self.player.mode)
        period = 1.0 / self.source.fps
        anchor = 0.0
        try:
            for row in range(rows.length):
                images = reader.next()
                if images is None:
                    raise DatasetError("player.dataset", f"episode {episode}: video ended at row {row} "
                                       f"of {rows.length}")
                if not self.lockstep:
                    now = time.monotonic()
                    if row == 0:
                        anchor = now - float(rows.timestamps[0])
                    due = anchor + float(rows.timestamps[row])
                    if now - due > period:
                        # Decoding fell behind: count it and shift the clock rather than bursting.
                        self.stats.late_rows += 1
                        anchor += now - due
                    else:
                        self._wait_until(due)
                self._check_interrupt()
                self._publish_row(rows, row, images)
                published += 1
                if self.lockstep:
                    self._wait_ack(rows, row, images)
                else:
                    self._poll_events(0.0)
                self._report()
        except EpisodeInterrupted as interrupt:
            outcome = interrupt.reason
        except Exception as exc:  # a broken video must not take the node down: skip the episode
            self.stats.decode_errors += 1
            log.error("episode %d: %s", episode, exc)
            outcome = "error"
        finally:
            reader.close()
        self.stats.episodes_played += 1
        self._publish_event("episode_end", episode_index=episode, frames=published, complete=outcome == "complete",
                            reason=outcome, source=SOURCE_DATASET)
        self.state = "idle"
        log.info("episode %d ended (%s) after %d of %d frames", episode, outcome, published, rows.length)
        return outcome

    def _wait_for_start(self) -> bool:
        """follow_episodes: idle until the actuator starts an episode; False on shutdown."""
        self._stop_requested = False
        while not self._start_requested:
            if self.stop.is_set():
                return False
            self._poll_events(0.1)
            self._report()
        self._start_requested = False
        return True

    def run(self) -> None:
        order = self.source.episodes
        position = 0
        while not self.stop.is_set():
            if self.player.follow_episodes and not self._wait_for_start():
                break
            if position >= len(order) and not self.player.loop:
                if self.state != "finished":
                    log.info("all %d episode(s) played; idle (player.loop is false)", len(order))
                self.state = "finished"
                self._poll_events(0.1)
                self._report()
                continue
            outcome = self.play_episode(order[position % len(order)])
            position += 1
            if outcome == "shutdown":
                break

    def close(self) -> None:
        for publisher in [*self.frames.values(), *self.states.values(), self.gt]:
            publisher.close()
        if self.events is not None:
            self.events.close()


def main(argv: list[str] | None = None) -> int:
    started = start_node(PROGRAM, __doc__.split("\n\n")[0], argv)
    config, readiness = started.config, started.readiness
    log.info("opening %s", config.resolve(config.player.dataset))
    try:
        source = DatasetSource(config)
    except ConfigError as exc:  # DatasetError included: wrong path, missing video, layout mismatch
        started.refuse(str(exc))
    factory = SocketFactory()
    player = DatasetPlayer(config, source, factory, started.stop)
    readiness.ready(dataset=str(source.root), episodes=source.episodes, mode=config.player.mode,
                    follow_episodes=config.player.follow_episodes)
    log.info("replaying %s (episodes %s) in %s mode", source.root, source.episodes, config.player.mode)
    try:
        player.run()
    finally:
        readiness.clear()
        player.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
