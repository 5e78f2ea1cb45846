"""The recorder's metrics, summary and plots: per-episode numbers (action error against the dataset's
ground truth, loop lateness, holds, chunk round trips), the run's summary over ``metrics.jsonl``, and
matplotlib figures. Pure functions of finished episodes; the finisher thread calls them."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nodes.recorder.parts import gap_summary
from nodes.recorder.records import EpisodeOutcome

if TYPE_CHECKING:  # imported where a file is read: a (re)started recorder is recording sooner
    import pandas as pd

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


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


def _episode_ticks(ticks: pd.DataFrame) -> dict[str, int] | None:
    """The actuator's tick numbers within the episode that were recorded: first, last, and how many."""
    if ticks.empty or "episode_tick" not in ticks or (ticks["episode_tick"] < 0).all():
        return None
    numbers = ticks["episode_tick"]
    return {"first": int(numbers.min()), "last": int(numbers.max()), "recorded": int((numbers >= 0).sum())}


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
        "task": info.task,
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
        "dropped_ticks_by_reason": dict(outcome.dropped),
        "episode_id": info.episode_id,
        "episode_ticks": _episode_ticks(ticks),
        "writer_backlog_max_ticks": outcome.backlog_max_ticks,
        "rejected_ticks": dict(outcome.rejected_ticks),
        "inputs_matched_fraction": float(ticks["inputs_matched"].mean()) if not ticks.empty else None,
        "implicit_start": info.implicit_start,
        "recovered": outcome.recovered,
        # Recorder restarts the recording was resumed across, and the downtime's ticks the actuator's backlog
        # filled in (armpipe/gap_ticks.parquet: no frames).
        "resumed": outcome.resumed,
        "gap_ticks_filled": outcome.gap_ticks,
        # A recording cut at gaps in time (nodes.recorder.parts): its parts and the gaps between them.
        **gap_summary(outcome.parts),
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
    import pandas as pd

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
        # Recordings cut into parts at gaps in time (none of them compresses time): name -> parts, gap seconds.
        "split_episodes": {entry["episode"]: {"parts": entry["parts"], "gap_s": entry.get("gap_s", 0.0)}
                           for entry in episodes if int(entry.get("parts", 1)) > 1},
        "per_episode": [{"episode": e["episode"], "label": e.get("label", ""), "duration_s": e.get("duration_s"),
                         "frames": e.get("frames"), "stop_reason": e.get("stop_reason"), "parts": e.get("parts", 1)}
                        for e in episodes],
        "updated_wall": time.time(),
    }


def write_json(path: Path, payload: Any) -> None:
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
