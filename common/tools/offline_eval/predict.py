"""``predict``: offline evaluation as the policy's client. Every frame of an episode goes to the policy node, the
session reset (and its noise reseeded) at each episode start, and every chunk is scored against the frames its
rows are meant for; a slow policy is waited for with growing timeouts (``patiently``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.config import DeploymentConfig, curve_keys_for
from common.tools.offline_eval.report import (
    EpisodeErrors,
    EpisodeTrace,
    ErrorAccumulator,
    EvalReport,
    incomplete,
    progress_bar,
    score_chunk,
    summarise,
)
from common.wire.transport import PeerUnavailable, RemoteError, SocketFactory

log = logging.getLogger(__name__)

ATTEMPTS = 4  # predict: tries per request, the timeout doubling each time (policy.timeout_s first)
BACKOFF = 2.0


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
    progress = progress_bar(sum(n if max_frames <= 0 else min(n, max_frames) for n in lengths.values()), "frame")
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
        raise incomplete(exc, summarise("predict", names, results, row_offset=row_offset, dataset=str(source.root),
                                         policy=policy), traces) from exc
    finally:
        progress.close()
        client.close()
    return summarise("predict", names, results, row_offset=row_offset, dataset=str(source.root),
                     policy=policy), traces
