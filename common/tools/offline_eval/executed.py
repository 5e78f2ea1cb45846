"""``executed``: offline evaluation of the whole pipeline. The dataset player's ground truth and the actuator's
``executed`` ticks are paired by dataset frame (``ExecutedRecorder``) and the target commanded for frame k is scored
against frame k's truth; ``--drive`` starts and stops the actuator's episodes itself."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.config import DeploymentConfig
from common.tools.offline_eval.report import (
    EpisodeErrors,
    EpisodeTrace,
    ErrorAccumulator,
    EvalReport,
    incomplete,
    progress_bar,
    summarise,
)
from common.wire.actuator_client import ActuatorClient
from common.wire.protocol import KIND_ACTION, KIND_EVENT, Message
from common.wire.transport import LatestSubscriber, PeerUnavailable, RemoteError, SocketFactory

log = logging.getLogger(__name__)


@dataclass
class _LiveEpisode:
    episode_index: int
    frames: int
    run: int
    truth: dict[int, np.ndarray] = field(default_factory=dict)
    # Every tick attributed to this pass, in the order the actuator published them: (frame index, target, hold).
    # Which of them are scored is decided when the pass is taken, once its truth is all in (``executed_errors``).
    ticks: list[tuple[int, np.ndarray, bool]] = field(default_factory=list)
    ended: bool = False
    complete: bool = False


class ExecutedRecorder:
    """Pairs the actuator's executed targets with the player's ground truth, by dataset frame index.

    The ground truth (the player's ``gt`` stream) and the ticks (the actuator's ``events`` stream) come from two
    publishers into one SUB socket, which takes turns between them: each stream keeps its own order, but nothing
    orders one against the other. A tick that used frame k can be read before the truth of frame k (the evaluator
    fell behind and both streams queued up), so a tick is kept even when its frame's truth has not arrived yet;
    the pairing is made when the pass is taken, from everything received by then.

    Which pass a tick belongs to: with ``--drive`` (``take_driven``), the actuator episode that the evaluator
    started for it (ticks carry their ``episode_id``; the actuator's ``episode_stop`` event, which comes after its
    last tick on the same stream, says that all of them are in). Without it (``take_finished``), the dataset pass
    being played when the tick arrives. When several ticks used the same frame (real time), the last one counts:
    it is what was commanded for that frame. Ticks while the actuator is idle (``episode_index == -1``) are not the
    policy's and are skipped.
    """

    def __init__(self, config: DeploymentConfig, factory: SocketFactory | None = None) -> None:
        self.config = config
        self.names = list(config.action_names())
        self.sub = LatestSubscriber(factory or SocketFactory(), [config.player.gt_endpoint,
                                                                 config.actuator.events_endpoint], hwm=100_000)
        self.current: _LiveEpisode | None = None
        self.finished: list[_LiveEpisode] = []
        self.runs: dict[int, int] = {}
        # Drive: every tick of an actuator episode (by episode_id), and the episodes the actuator has stopped
        # (episode_index -> episode_id), from its own stream.
        self.actuator_ticks: dict[str, list[tuple[int, np.ndarray, bool]]] = {}
        self.actuator_stops: dict[int, str] = {}
        self.heard: set[str] = set()  # the publishers' stats events seen (``wait_for_publishers``)

    def pump(self, timeout_s: float = 0.05) -> None:
        for msg in self.sub.poll(timeout_s, max_messages=100_000):
            self._handle(msg)

    def _handle(self, msg: Message) -> None:
        if msg.kind == KIND_EVENT and msg.meta.get("event") in ("player_stats", "loop_stats"):
            self.heard.add(str(msg.meta["event"]))
        role = msg.meta.get("role")
        if msg.kind == KIND_EVENT and msg.meta.get("source") == "dataset":
            event = msg.meta.get("event")
            if event == "episode_start":
                episode = int(msg.meta["episode_index"])
                run = self.runs.get(episode, 0)
                self.runs[episode] = run + 1
                self.current = _LiveEpisode(episode, int(msg.meta.get("frames", 0)), run)
            elif event == "episode_end" and self.current is not None:
                self.current.ended = True
                self.current.complete = bool(msg.meta.get("complete", False))
        elif msg.kind == KIND_EVENT and msg.meta.get("event") == "episode_stop":  # the actuator's
            index, uid = msg.meta.get("episode_index"), msg.meta.get("episode_id")
            if isinstance(index, int) and isinstance(uid, str):
                self.actuator_stops[index] = uid
        elif msg.kind == KIND_ACTION and role == "ground_truth" and self.current is not None:
            if msg.meta.get("episode_index") == self.current.episode_index:
                self.current.truth[int(msg.meta["frame_index"])] = np.array(msg.arrays["action"], dtype=np.float32)
        elif msg.kind == KIND_ACTION and role == "executed":
            frame = msg.meta.get("frame_index", -1)
            if msg.meta.get("episode_index", -1) == -1 or not isinstance(frame, int) or isinstance(frame, bool):
                return
            tick = (frame, np.array(msg.arrays["action"], dtype=np.float32), bool(msg.meta.get("hold")))
            uid = msg.meta.get("episode_id")
            if isinstance(uid, str):
                self.actuator_ticks.setdefault(uid, []).append(tick)
            if self.current is not None:
                self.current.ticks.append(tick)

    def wait_for_publishers(self, deadline: float) -> None:
        """Until both publishers were heard from (their stats come every second): the SUB is connected to both."""
        while not {"player_stats", "loop_stats"} <= self.heard:
            if time.monotonic() > deadline:
                raise TimeoutError(f"heard only {sorted(self.heard)} of the player's player_stats and the actuator's "
                                   f"loop_stats on {self.config.player.gt_endpoint} and "
                                   f"{self.config.actuator.events_endpoint}")
            self.pump(0.1)

    def pass_ended(self) -> bool:
        """Whether the player ended the pass being recorded."""
        return self.current is not None and self.current.ended

    def take_finished(self, settle_s: float = 0.3) -> _LiveEpisode | None:
        """The current pass once the player ended it (after letting its last ticks arrive), its ticks those that
        arrived while it played. Without ``--drive`` nothing says when the last tick is in: ``settle_s`` is a guess."""
        episode = self.current
        if episode is None or not episode.ended:
            return None
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            self.pump(0.02)
        if self.current is episode:  # (the player may have begun its next pass meanwhile)
            self.current = None
        self.finished.append(episode)
        return episode

    def take_driven(self, actuator_episode: int, deadline: float) -> _LiveEpisode:
        """The current pass, ended by the player, with the ticks of the actuator episode ``actuator_episode`` that
        played it, once the actuator's ``episode_stop`` for that episode is in (its ticks all came before it on the
        same stream). Call after ``stop``; ``TimeoutError`` past ``deadline``."""
        while (uid := self.actuator_stops.get(actuator_episode)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no episode_stop from the actuator for its episode {actuator_episode}")
            self.pump(0.05)
        episode, self.current = self.current, None
        if episode is None or not episode.ended:
            raise RuntimeError("take_driven: the player has not ended a pass")
        episode.ticks = self.actuator_ticks.pop(uid, [])
        self.finished.append(episode)
        return episode

    def forget_stop(self, actuator_episode: int) -> None:
        """Before starting an actuator episode: an earlier one with the same index (an actuator restarted since)
        must not stand for it."""
        self.actuator_stops.pop(actuator_episode, None)

    def close(self) -> None:
        self.sub.close()


def executed_errors(episode: _LiveEpisode, dim: int, row_offset: int = 0) -> tuple[EpisodeErrors, EpisodeTrace]:
    frames = max(episode.frames, max(episode.truth, default=-1) + 1)
    truth = np.full((frames, dim), np.nan, dtype=np.float32)
    executed = np.full((frames, dim), np.nan, dtype=np.float32)
    for index, row in episode.truth.items():
        truth[index] = row
    # The ticks that used a frame of this pass (its truth is all in now); the last tick per frame counts.
    commanded: dict[int, np.ndarray] = {}
    holds = 0
    for frame, goal, hold in episode.ticks:
        if frame in episode.truth:
            commanded[frame] = goal
            holds += hold
    accumulator = ErrorAccumulator(dim)
    for index, row in sorted(commanded.items()):
        target = index + row_offset
        if 0 <= target < frames:
            executed[target] = row
            if target in episode.truth:
                accumulator.add(row[None], truth[target][None])
    return (accumulator.result(episode.episode_index, frames, holds=holds, run=episode.run),
            EpisodeTrace(episode.episode_index, truth, executed, holds, episode.run))


def evaluate_executed(config: DeploymentConfig, *, count: int, drive: bool = False, row_offset: int = 0,
                      timeout_s: float = 600.0, factory: SocketFactory | None = None,
                      recorder: ExecutedRecorder | None = None) -> tuple[EvalReport, list[EpisodeTrace]]:
    """Record ``count`` dataset episodes played through the pipeline and score the executed targets.

    ``drive``: start an actuator episode, wait for the player to finish its dataset episode, stop the
    actuator episode; repeat. Needs ``player.follow_episodes=true`` so the player starts with it.
    """
    factory = factory or SocketFactory()
    own_recorder = recorder is None
    recorder = recorder or ExecutedRecorder(config, factory)
    # One attempt per send: the retries are _start_when_ready's and _stop's, which know what a lost reply means.
    control = (ActuatorClient(factory, config.actuator.control_endpoint, client="offline_eval", timeout_s=2.0,
                              retries=1) if drive else None)
    names = recorder.names
    results: list[EpisodeErrors] = []
    traces: list[EpisodeTrace] = []
    deadline = time.monotonic() + timeout_s
    progress = progress_bar(count, "episode")
    try:
        # Nothing may be published before both SUB connections are up (PUB drops what no subscriber holds yet).
        recorder.wait_for_publishers(deadline)
        while len(results) < count:
            late = f"recorded {len(results)} of {count} episodes within {timeout_s}s"
            if control is None:
                episode = _wait(recorder, recorder.take_finished, deadline, late)
            else:
                actuator_episode = _start_when_ready(control, recorder, deadline)
                _wait(recorder, recorder.pass_ended, deadline, late)
                _stop(control, deadline)
                episode = recorder.take_driven(actuator_episode, deadline)
            if not episode.complete:
                log.warning("episode %d ended early; scoring the %d frames played", episode.episode_index,
                            len(episode.truth))
            result, trace = executed_errors(episode, len(names), row_offset)
            results.append(result)
            traces.append(trace)
            log.info("episode %d (run %d): mean MAE %.3f over %d frames, %d holds", result.episode_index,
                     result.run, result.mean_mae, result.compared, result.holds)
            progress.update(1)
    except (PeerUnavailable, RemoteError, TimeoutError) as exc:
        if not results:
            raise
        raise incomplete(exc, summarise("executed", names, results, row_offset=row_offset,
                                         dataset=str(config.player.dataset),
                                         policy={"endpoint": config.policy.endpoint, "seed": config.policy.seed}),
                          traces) from exc
    finally:
        progress.close()
        if control is not None:
            control.close()
        if own_recorder:
            recorder.close()
    return summarise("executed", names, results, row_offset=row_offset, dataset=str(config.player.dataset),
                     policy={"endpoint": config.policy.endpoint, "seed": config.policy.seed}), traces


def _wait(recorder: ExecutedRecorder, take: Any, deadline: float, what: str) -> Any:
    """``take()`` until it gives something, pumping the recorder meanwhile; ``TimeoutError(what)`` past
    ``deadline``."""
    while (found := take()) is None or found is False:
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        recorder.pump(0.05)
    return found


def _running_episode(control: ActuatorClient) -> int | None:
    """The actuator's running episode (its ``status``), None when none runs."""
    status = control.send("status")
    return int(status.meta["episode_index"]) if status.meta.get("state") == "running" else None


def _start_when_ready(control: ActuatorClient, recorder: ExecutedRecorder, deadline: float) -> int:
    """Start an actuator episode, retrying while it is still checking the policy's contract; its episode index.

    A start that got no answer may still have started the episode (the reply was lost, or came after the
    timeout): when the next attempt is refused, an episode that runs now is the one it started."""
    unanswered = False
    while True:
        try:
            index = int(control.send("start").meta["episode_index"])
            break
        except RemoteError as exc:
            if unanswered and (running := _running_episode(control)) is not None:
                log.info("the actuator's episode %d runs: started by a start whose reply was lost", running)
                index = running
                break
            if time.monotonic() > deadline:
                raise
            log.info("actuator not ready to start (%s); retrying", exc)
        except PeerUnavailable:
            unanswered = True
            if time.monotonic() > deadline:
                raise
        recorder.pump(0.5)
    recorder.forget_stop(index)
    return index


def _stop(control: ActuatorClient, deadline: float) -> None:
    """Stop the actuator's episode; a refused retry after a stop that got no answer means that one did it."""
    unanswered = False
    while True:
        try:
            control.send("stop")
            return
        except RemoteError:
            if unanswered and _running_episode(control) is None:
                return
            raise
        except PeerUnavailable:
            unanswered = True
            if time.monotonic() > deadline:
                raise
