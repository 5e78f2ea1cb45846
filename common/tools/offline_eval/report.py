"""What offline evaluation reports: the errors of an episode per joint (``ErrorAccumulator``, ``score_chunk``: row k
of a chunk against the frame it is meant for), the report over all episodes (``summarise``), a run that gave up
after scoring part of it (``EvaluationIncomplete``), and the progress shown meanwhile."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

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


class EvaluationIncomplete(Exception):
    """The run gave up (``cause``) after scoring some of what it was asked: ``report`` and ``traces`` hold that
    part, marked incomplete, for ``save_report``."""

    def __init__(self, cause: BaseException, report: EvalReport, traces: list[EpisodeTrace]) -> None:
        super().__init__(str(cause))
        self.cause, self.report, self.traces = cause, report, traces


def incomplete(cause: BaseException, report: EvalReport, traces: list[EpisodeTrace]) -> EvaluationIncomplete:
    report.complete, report.incomplete = False, str(cause)
    return EvaluationIncomplete(cause, report, traces)


def progress_bar(total: int, unit: str) -> Any:
    """A progress bar on a terminal; nothing on a redirected stderr (the per-episode log lines say it there,
    instead of hundreds of carriage-return redraws in a log file)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc="offline_eval", dynamic_ncols=True, disable=not sys.stderr.isatty())
