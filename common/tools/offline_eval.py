"""Offline evaluation: how far a policy's actions are from a dataset's recorded actions, per episode
and per joint, as JSON numbers and a PNG plot.

Two ways to get the policy's actions:

- ``predict`` (deterministic, needs only a policy node): this module is the policy client. For every
  frame i of an episode it sends that frame's observation (all cameras + state) and compares row k of
  the returned chunk with the ground-truth action of frame i+k, the frame that row is meant for (row k
  of a chunk from an observation at t is for t + k/fps). The policy session is reset at each episode
  start, which also reseeds its noise, so two runs give the same numbers.
- ``executed`` (the whole pipeline): listens to the dataset player's ground truth and the actuator's
  ``executed`` ticks and compares the target commanded at the tick that used frame k with the ground
  truth of frame k. Run the player and the actuator in lockstep (``player.mode=lockstep``,
  ``actuator.lockstep=true``) for reproducible numbers; ``--drive`` starts and stops the actuator's
  episodes itself (with ``player.follow_episodes=true`` the player follows).

Alignment is by frame time. The reference system compared the prediction from frame i with frame
i+1; ``--row-offset 1`` reproduces that (compare row k with frame i+k+1) for side-by-side numbers.

A slow policy server is waited for, not given up on at the first slow reply: every request is retried
with a growing timeout (``policy.timeout_s``, then doubled per attempt, ``--attempts`` in all), and only
then does the run stop with an error that names the frame, the timeouts tried and what to check; what was
scored until then is still written, marked ``"complete": false`` with the reason. A progress bar is drawn
on stderr only when it is a terminal; a redirected log gets one line per episode.

    python -m common.tools.offline_eval predict --config configs/lift.yaml --output eval/lift [--episodes 0 1]
    python -m common.tools.offline_eval executed --config configs/lift.yaml --output eval/lift --count 2 --drive
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.config import ConfigError, DeploymentConfig, curve_keys_for, load_config
from common.wire.actuator_client import ActuatorClient
from common.wire.protocol import KIND_ACTION, KIND_EVENT, Message
from common.wire.transport import LatestSubscriber, PeerUnavailable, RemoteError, SocketFactory

log = logging.getLogger(__name__)

ATTEMPTS = 4  # predict: tries per request, the timeout doubling each time (policy.timeout_s first)
BACKOFF = 2.0

ALIGNMENT = ("row k of the chunk predicted from frame i is compared with the ground-truth action of frame "
             "i+k+row_offset (executed: the tick that used frame k with frame k+row_offset)")


@dataclass
class EpisodeErrors:
    """Errors of one episode, per joint (config action order), in robot units."""

    episode_index: int
    frames: int  # rows in the episode
    compared: int  # (prediction, truth) pairs that entered the numbers
    mae: list[float]
    rmse: list[float]
    max_abs: list[float]
    mean_mae: float  # over joints
    horizon_mae: list[float] = field(default_factory=list)  # predict: mean |error| of chunk row k
    holds: int = 0  # executed: ticks that held position instead of acting
    run: int = 0  # which pass over the data (the same dataset episode may be evaluated more than once)
    complete: bool = True  # False: the run stopped inside this episode; the numbers cover its scored frames


@dataclass
class EvalReport:
    mode: str  # predict | executed
    names: list[str]
    alignment: str
    row_offset: int
    dataset: str
    policy: dict[str, Any]
    episodes: list[EpisodeErrors]
    overall_mae: list[float]
    overall_rmse: list[float]
    overall_mean_mae: float
    complete: bool = True  # False: the run gave up; the numbers cover what was scored before (``incomplete``)
    incomplete: str = ""  # why the run stopped early

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpisodeTrace:
    """What one episode's numbers are computed from (kept for the plot)."""

    episode_index: int
    truth: np.ndarray  # (n, D) ground-truth actions in frame order
    predicted: np.ndarray  # (n, D) the compared prediction per frame (row 0 / executed), NaN where none
    holds: int = 0
    run: int = 0


class ErrorAccumulator:
    """Running sums of |error| and error^2 per joint, and |error| per chunk row."""

    def __init__(self, dim: int, horizon: int = 0) -> None:
        self.abs = np.zeros(dim)
        self.sq = np.zeros(dim)
        self.max = np.zeros(dim)
        self.count = 0
        self.row_abs = np.zeros(horizon)
        self.row_count = np.zeros(horizon, dtype=np.int64)

    def add(self, predicted: np.ndarray, truth: np.ndarray, rows: np.ndarray | None = None) -> None:
        if len(predicted) == 0:
            return
        error = np.asarray(predicted, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
        self.abs += np.abs(error).sum(axis=0)
        self.sq += np.square(error).sum(axis=0)
        self.max = np.maximum(self.max, np.abs(error).max(axis=0))
        self.count += len(error)
        if rows is not None:
            if rows.max() >= len(self.row_abs):
                grow = rows.max() + 1 - len(self.row_abs)
                self.row_abs = np.concatenate([self.row_abs, np.zeros(grow)])
                self.row_count = np.concatenate([self.row_count, np.zeros(grow, dtype=np.int64)])
            np.add.at(self.row_abs, rows, np.abs(error).mean(axis=1))
            np.add.at(self.row_count, rows, 1)

    def result(self, episode: int, frames: int, holds: int = 0, run: int = 0, complete: bool = True) -> EpisodeErrors:
        count = max(self.count, 1)
        mae = self.abs / count
        horizon = [float(v) for v in self.row_abs / np.maximum(self.row_count, 1)]
        return EpisodeErrors(episode_index=episode, frames=frames, compared=self.count, mae=_floats(mae),
                             rmse=_floats(np.sqrt(self.sq / count)), max_abs=_floats(self.max),
                             mean_mae=float(mae.mean()) if self.count else float("nan"), horizon_mae=horizon,
                             holds=holds, run=run, complete=complete)


def score_chunk(accumulator: ErrorAccumulator, chunk: np.ndarray, truth: np.ndarray, frame: int,
                row_offset: int = 0) -> None:
    """Add a chunk predicted from ``frame``: row k against ``truth[frame + k + row_offset]``.

    Row k of a chunk from an observation taken at t is meant for t + k/fps, i.e. frame ``frame + k``;
    rows that point past the episode's end are not scored.
    """
    rows = np.arange(len(chunk))
    targets = frame + rows + row_offset
    valid = (targets >= 0) & (targets < len(truth))
    accumulator.add(chunk[valid], truth[targets[valid]], rows[valid])


def _floats(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values]


def summarise(mode: str, names: list[str], episodes: list[EpisodeErrors], *, row_offset: int, dataset: str,
              policy: dict[str, Any]) -> EvalReport:
    """The report: per-episode errors plus the overall numbers (weighted by compared pairs)."""
    total = sum(e.compared for e in episodes)
    dim = len(names)
    if total:
        mae = sum(np.asarray(e.mae) * e.compared for e in episodes) / total
        rmse = np.sqrt(sum(np.square(e.rmse) * e.compared for e in episodes) / total)
    else:
        mae = rmse = np.full(dim, np.nan)
    return EvalReport(mode=mode, names=list(names), alignment=ALIGNMENT, row_offset=row_offset, dataset=dataset,
                      policy=policy, episodes=episodes, overall_mae=_floats(mae), overall_rmse=_floats(rmse),
                      overall_mean_mae=float(np.mean(mae)))


# --------------------------------------------------------------------------------------------------
# predict: this module is the policy client
# --------------------------------------------------------------------------------------------------


class PolicyTooSlow(PeerUnavailable):
    """The policy did not answer a request even with the longest timeout; the message says where and why."""

    def __init__(self, endpoint: str, what: str, timeouts: list[float], done: str) -> None:
        self.endpoint = endpoint
        tried = ", ".join(f"{t:g}" for t in timeouts)
        ConnectionError.__init__(self, f"the policy at {endpoint} did not answer {what} after {len(timeouts)} "
                                 f"attempt(s) (timeouts {tried} s); {done}. Check that the policy node is running "
                                 "and ready (its log; <run_dir>/ready/policy.json), or allow more time with "
                                 "--attempts or --policy.timeout_s")


@dataclass
class Patience:
    """How long to wait for a slow policy: ``attempts`` tries, the timeout growing by ``backoff``."""

    first_timeout_s: float
    attempts: int = ATTEMPTS
    backoff: float = BACKOFF

    def timeouts(self) -> list[float]:
        return [self.first_timeout_s * self.backoff ** k for k in range(max(1, self.attempts))]


def patiently(call: Any, patience: Patience, endpoint: str, what: str, done: str = "") -> Any:
    """``call(timeout_s)`` retried with growing timeouts; ``PolicyTooSlow`` after the last one.

    A retried ``infer`` may reach the policy twice (the first request was slow, not lost): DiffusionPolicy
    then keeps that frame twice in its history, so such a run is not bit-reproducible; it is logged.
    """
    timeouts = patience.timeouts()
    for attempt, timeout in enumerate(timeouts, start=1):
        try:
            return call(timeout)
        except PeerUnavailable:
            if attempt == len(timeouts):
                break
            log.warning("policy at %s: no answer to %s within %.1f s (attempt %d/%d); retrying with %.1f s",
                        endpoint, what, timeout, attempt, len(timeouts), timeouts[attempt])
    raise PolicyTooSlow(endpoint, what, timeouts, done or "nothing was scored")


class EvaluationIncomplete(Exception):
    """The run gave up (``cause``) after scoring some of what it was asked: ``report`` and ``traces`` hold that
    part, marked incomplete, for ``save_report``."""

    def __init__(self, cause: BaseException, report: EvalReport, traces: list[EpisodeTrace]) -> None:
        super().__init__(str(cause))
        self.cause, self.report, self.traces = cause, report, traces


def _incomplete(cause: BaseException, report: EvalReport, traces: list[EpisodeTrace]) -> EvaluationIncomplete:
    report.complete, report.incomplete = False, str(cause)
    return EvaluationIncomplete(cause, report, traces)


def _progress(total: int, unit: str) -> Any:
    """A progress bar on a terminal; nothing on a redirected stderr (the per-episode log lines say it there,
    instead of hundreds of carriage-return redraws in a log file)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc="offline_eval", dynamic_ncols=True, disable=not sys.stderr.isatty())


def evaluate_predictions(config: DeploymentConfig, *, episodes: list[int] | None = None, row_offset: int = 0,
                         max_frames: int = 0, client_id: str = "offline_eval", factory: SocketFactory | None = None,
                         attempts: int = ATTEMPTS) -> tuple[EvalReport, list[EpisodeTrace]]:
    """Query the policy node at ``policy.endpoint`` with every frame of the dataset's episodes.

    The session id is fixed (``client_id``) and reset before each episode, so the policy's noise is
    reseeded: the same dataset, checkpoint and ``policy.seed`` give the same numbers every time.
    Each request is tried ``attempts`` times, from ``policy.timeout_s`` doubling (``patiently``).
    """
    from common.dataset_source import DatasetSource, EpisodeReader
    from common.wire.policy_client import PolicyClient

    source = DatasetSource(config, episodes=episodes)
    endpoint = config.policy.endpoint
    # One attempt per call: the retries (with growing timeouts) are ``patiently``'s.
    # CURVE keys when the policy link needs them (a missing or bad key file: ConfigError, exit 2).
    factory = factory or SocketFactory(curve=curve_keys_for(config, "client"))
    client = PolicyClient(factory, endpoint, client_id=client_id,
                          timeout_s=config.policy.timeout_s, retries=1)
    patience = Patience(config.policy.timeout_s, attempts)
    names = list(config.action_names())
    results: list[EpisodeErrors] = []
    traces: list[EpisodeTrace] = []
    lengths = {episode: source.episode(episode).length for episode in source.episodes}
    progress = _progress(sum(n if max_frames <= 0 else min(n, max_frames) for n in lengths.values()), "frame")
    scored = 0
    policy: dict[str, Any] = {"endpoint": endpoint, "seed": config.policy.seed, "client": client_id}
    accumulator: ErrorAccumulator | None = None
    try:
        contract = patiently(lambda timeout: client.metadata(timeout_s=timeout), patience, endpoint, "metadata")
        policy = {"policy_type": contract.policy_type, "checkpoint_id": contract.checkpoint_id,
                  "checkpoint_path": contract.checkpoint_path, "untrained": contract.untrained,
                  "chunk_length": contract.chunk_length, "seed": config.policy.seed, "client": client_id}
        for episode in source.episodes:
            rows = source.episode(episode)
            count = rows.length if max_frames <= 0 else min(rows.length, max_frames)
            done = f"{len(results)} of {len(lengths)} episode(s) and {scored} frame(s) were scored"
            # Fresh history and reseeded noise: episodes are independent and repeatable.
            patiently(lambda timeout: client.reset(timeout_s=timeout), patience, endpoint,
                      f"reset before episode {episode}", done)
            progress.set_postfix_str(f"episode {episode}")
            accumulator = ErrorAccumulator(len(names), contract.chunk_length)
            # A language policy gets the episode's own task string (meta/tasks), as it was trained with.
            instruction = rows.task if contract.takes_instruction and rows.task else None
            first_rows = np.full((rows.length, len(names)), np.nan, dtype=np.float32)
            reader = EpisodeReader(source, episode, config.player.prefetch_frames)
            try:
                for i in range(count):
                    images = reader.next()
                    if images is None:
                        break
                    # obs_t: the frame's time in the episode; only echoed back, never compared to a clock.
                    state, obs_t = rows.states[i], float(rows.timestamps[i])
                    chunk = patiently(
                        lambda timeout, images=images, state=state, obs_t=obs_t, task=instruction: client.infer(
                            images, state, obs_t=obs_t, timeout_s=timeout, instruction=task).actions,
                        patience, endpoint, f"infer for episode {episode} frame {i}",
                        f"{len(results)} of {len(lengths)} episode(s) and {scored} frame(s) were scored")
                    score_chunk(accumulator, chunk, rows.actions[:count], i, row_offset)
                    scored += 1
                    progress.update(1)
                    if 0 <= i + row_offset < count:
                        first_rows[i + row_offset] = chunk[0]
            finally:
                reader.close()
            results.append(accumulator.result(episode, rows.length))
            traces.append(EpisodeTrace(episode, rows.actions[:count], first_rows[:count]))
            accumulator = None
            log.info("episode %d: mean MAE %.3f over %d pairs", episode, results[-1].mean_mae,
                     results[-1].compared)
    except (PeerUnavailable, RemoteError) as exc:
        if scored == 0:
            raise
        if accumulator is not None and accumulator.count:  # the episode it stopped in, as far as it got
            results.append(accumulator.result(episode, rows.length, complete=False))
            traces.append(EpisodeTrace(episode, rows.actions[:count], first_rows[:count]))
        raise _incomplete(exc, summarise("predict", names, results, row_offset=row_offset, dataset=str(source.root),
                                         policy=policy), traces) from exc
    finally:
        progress.close()
        client.close()
    return summarise("predict", names, results, row_offset=row_offset, dataset=str(source.root),
                     policy=policy), traces


# --------------------------------------------------------------------------------------------------
# executed: listen to the player's ground truth and the actuator's ticks
# --------------------------------------------------------------------------------------------------


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
    for frame, target, hold in episode.ticks:
        if frame in episode.truth:
            commanded[frame] = target
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
    control = (ActuatorClient(factory, config.actuator.control_endpoint, client="offline_eval", timeout_s=2.0,
                              retries=3) if drive else None)
    names = recorder.names
    results: list[EpisodeErrors] = []
    traces: list[EpisodeTrace] = []
    deadline = time.monotonic() + timeout_s
    progress = _progress(count, "episode")
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
                control.send("stop")
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
        raise _incomplete(exc, summarise("executed", names, results, row_offset=row_offset,
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


def _start_when_ready(control: ActuatorClient, recorder: ExecutedRecorder, deadline: float) -> int:
    """Start an actuator episode, retrying while it is still checking the policy's contract; its episode index."""
    while True:
        try:
            reply = control.send("start")
            index = int(reply.meta["episode_index"])
            recorder.forget_stop(index)
            return index
        except RemoteError as exc:
            if time.monotonic() > deadline:
                raise
            log.info("actuator not ready to start (%s); retrying", exc)
        except PeerUnavailable:
            if time.monotonic() > deadline:
                raise
        recorder.pump(0.5)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def save_report(report: EvalReport, traces: list[EpisodeTrace], output: Path) -> dict[str, Path]:
    """Write ``<output>/offline_eval.json``, ``offline_eval.png`` and ``offline_eval_traces.npz``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "offline_eval.json", "png": output / "offline_eval.png",
             "traces": output / "offline_eval_traces.npz"}
    paths["json"].write_text(json.dumps(report.to_json(), indent=2, allow_nan=True))
    arrays: dict[str, np.ndarray] = {}
    for trace in traces:
        arrays[f"episode_{trace.episode_index}_run_{trace.run}_truth"] = trace.truth
        arrays[f"episode_{trace.episode_index}_run_{trace.run}_predicted"] = trace.predicted
    np.savez_compressed(paths["traces"], **arrays)
    plot_report(report, traces, paths["png"])
    return paths


def plot_report(report: EvalReport, traces: list[EpisodeTrace], path: Path) -> None:
    """Per-joint MAE per episode (bars), the chunk-row error curve (predict), and the first episode's
    per-joint traces of truth vs policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dim = len(report.names)
    columns = min(dim, 6)
    trace_rows = (dim + columns - 1) // columns
    figure = plt.figure(figsize=(3.2 * columns, 3.0 * (1 + trace_rows)), constrained_layout=True)
    grid = figure.add_gridspec(1 + trace_rows, columns)
    bars = figure.add_subplot(grid[0, : columns - 2 if columns > 3 else columns])
    width = 0.8 / max(len(report.episodes), 1)
    positions = np.arange(dim)
    for number, episode in enumerate(report.episodes):
        bars.bar(positions + number * width, episode.mae, width, label=f"ep {episode.episode_index}"
                 + (f" run {episode.run}" if episode.run else ""))
    bars.set_xticks(positions + width * (len(report.episodes) - 1) / 2,
                    [name.removesuffix(".pos") for name in report.names], rotation=45, ha="right", fontsize=7)
    bars.set_ylabel("MAE (robot units)")
    bars.set_title(f"{report.mode}: per-joint error (mean {report.overall_mean_mae:.2f})")
    if len(report.episodes) <= 10:
        bars.legend(fontsize=7)
    if columns > 3:
        horizon = figure.add_subplot(grid[0, columns - 2:])
        for episode in report.episodes:
            if episode.horizon_mae:
                horizon.plot(episode.horizon_mae, label=f"ep {episode.episode_index}")
        horizon.set_xlabel("chunk row k" if report.mode == "predict" else "(predict mode only)")
        horizon.set_ylabel("MAE")
        horizon.set_title("error vs. how far ahead")
    if traces:
        trace = traces[0]
        for joint in range(dim):
            axis = figure.add_subplot(grid[1 + joint // columns, joint % columns])
            axis.plot(trace.truth[:, joint], label="ground truth", linewidth=1.2)
            axis.plot(trace.predicted[:, joint], label="executed" if report.mode == "executed" else "row 0",
                      linewidth=1.0)
            axis.set_title(f"ep {trace.episode_index}: {report.names[joint]}", fontsize=8)
            axis.set_xlabel("frame", fontsize=7)
            axis.tick_params(labelsize=7)
            if joint == 0:
                axis.legend(fontsize=6)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["predict", "executed"])
    parser.add_argument("--config", required=True, help="deployment YAML, e.g. configs/lift.yaml")
    parser.add_argument("--output", default="eval", help="directory for offline_eval.json / .png")
    parser.add_argument("--episodes", type=int, nargs="*", default=None,
                        help="predict: dataset episodes (default: player.episodes, or all)")
    parser.add_argument("--count", type=int, default=1, help="executed: episodes to record")
    parser.add_argument("--drive", action="store_true", help="executed: start/stop the actuator's episodes")
    parser.add_argument("--row-offset", type=int, default=0,
                        help="compare with the truth this many frames later (1: the reference system's alignment)")
    parser.add_argument("--max-frames", type=int, default=0, help="predict: frames per episode (0: all)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="executed: give up after this long")
    parser.add_argument("--attempts", type=int, default=ATTEMPTS,
                        help="predict: tries per policy request, the timeout doubling from policy.timeout_s")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s offline_eval: %(message)s")
    try:
        config = load_config(args.config, overrides)
        if args.mode == "predict":
            report, traces = evaluate_predictions(config, episodes=args.episodes, row_offset=args.row_offset,
                                                  max_frames=args.max_frames, attempts=args.attempts)
        else:
            report, traces = evaluate_executed(config, count=args.count, drive=args.drive,
                                               row_offset=args.row_offset, timeout_s=args.timeout_s)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except EvaluationIncomplete as exc:
        paths = save_report(exc.report, exc.traces, Path(args.output))
        log.error("%s", exc.cause)
        log.error("INCOMPLETE: wrote what was scored (%d episode(s), %d pair(s)) to %s and %s, marked "
                  "\"complete\": false", len(exc.report.episodes), sum(e.compared for e in exc.report.episodes),
                  paths["json"], paths["png"])
        return 1
    except (PeerUnavailable, RemoteError, TimeoutError) as exc:
        log.error("%s", exc)
        return 1
    paths = save_report(report, traces, Path(args.output))
    log.info("mean MAE %.3f (per joint %s); wrote %s and %s", report.overall_mean_mae,
             [round(v, 3) for v in report.overall_mae], paths["json"], paths["png"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
