"""Offline evaluation: how far a policy's actions are from a dataset's recorded actions, per episode
and per joint, as JSON numbers and a PNG plot.

Two ways to get the policy's actions:

- ``predict`` (deterministic, needs only a policy node): this tool is the policy client. For every
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

The package: ``report`` (the error arithmetic and the report), ``predict``, ``executed``, ``report_files`` (the
JSON, traces and plot) and ``cli``.
"""

from __future__ import annotations

from common.tools.offline_eval.cli import main
from common.tools.offline_eval.executed import ExecutedRecorder, evaluate_executed, executed_errors
from common.tools.offline_eval.predict import ATTEMPTS, Patience, PolicyTooSlow, evaluate_predictions, patiently
from common.tools.offline_eval.report import (
    ALIGNMENT,
    EpisodeErrors,
    EpisodeTrace,
    ErrorAccumulator,
    EvalReport,
    EvaluationIncomplete,
    score_chunk,
    summarise,
)
from common.tools.offline_eval.report_files import plot_report, save_report

__all__ = ["ALIGNMENT", "ATTEMPTS", "EpisodeErrors", "EpisodeTrace", "ErrorAccumulator", "EvalReport",
           "EvaluationIncomplete", "ExecutedRecorder", "Patience", "PolicyTooSlow", "evaluate_executed",
           "evaluate_predictions", "executed_errors", "main", "patiently", "plot_report", "save_report",
           "score_chunk", "summarise"]
