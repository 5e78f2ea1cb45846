"""The files an evaluation leaves: ``offline_eval.json`` (the report), ``offline_eval_traces.npz`` (truth and
prediction per frame) and ``offline_eval.png`` (per-joint errors, the error per chunk row, the first episode's
traces)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.tools.offline_eval.report import EpisodeTrace, EvalReport


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
