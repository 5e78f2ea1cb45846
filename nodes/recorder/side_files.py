"""A finished episode's side files (``armpipe/`` in its dataset: ticks, chunks, latency and gap ticks as parquet,
``outcome.json``): written when the episode is made final and moved into place (``complete_episode``), read
back into its ``EpisodeOutcome`` when its metrics are still due (``load_outcome``,
``finished_without_metrics``)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nodes.recorder.lerobot_v3 import STREAM_DIR
from nodes.recorder.records import (
    EPISODE_METRICS,
    EPISODE_PREFIX,
    GAP_TICKS_FILE,
    JOURNAL,
    OUTCOME_FILE,
    SIDE_DIR,
    EpisodeInfo,
    EpisodeOutcome,
)


def complete_episode(output_dir: Path, root: Path, info: EpisodeInfo, *, label: str, stop_reason: str, ended_t: float,
              ended_wall: float, frames: int, tick_rows: list[dict[str, Any]], chunk_rows: list[dict[str, Any]],
              hold_events: dict[str, int], rejected: dict[str, int], dropped: dict[str, int],
              recovered: bool, backlog_max_ticks: int = 0,
              latency_rows: list[dict[str, Any]] | None = None,
              parts: list[dict[str, Any]] | None = None, gap_rows: list[dict[str, Any]] | None = None,
              resumed: int = 0) -> EpisodeOutcome:
    """Write the side files into a finalised dataset root and rename it into ``output_dir``."""
    import pandas as pd

    side = root / SIDE_DIR
    side.mkdir(exist_ok=True)
    parts = parts or []
    for part in parts:  # which LeRobot episode (part) of the recording each frame is in
        for row in tick_rows[int(part["from_frame"]):int(part["from_frame"]) + int(part["frames"])]:
            row["part"] = int(part["part"])
    ticks = pd.DataFrame(tick_rows)
    if "inputs" in ticks:
        ticks["inputs"] = ticks["inputs"].map(lambda value: json.dumps(value, sort_keys=True))
    chunks = pd.DataFrame(chunk_rows)
    ticks.to_parquet(side / "ticks.parquet")
    chunks.to_parquet(side / "chunks.parquet")
    pd.DataFrame(latency_rows or [], columns=None if latency_rows else ["tick", "end_to_end_s"]).to_parquet(
        side / "latency.parquet")
    if gap_rows:  # ticks of a recorder's downtime, from the actuator's backlog (no frames)
        pd.DataFrame(gap_rows).to_parquet(side / GAP_TICKS_FILE)
    # Enough to redo the metrics if the process dies between the rename below and writing them.
    (side / OUTCOME_FILE).write_text(json.dumps({
        "info": asdict(info), "label": label, "stop_reason": stop_reason, "ended_t": ended_t,
        "ended_wall": ended_wall, "frames": frames, "hold_events": hold_events, "rejected": rejected,
        "dropped": dropped, "recovered": recovered, "backlog_max_ticks": backlog_max_ticks, "parts": parts,
        "gap_ticks": len(gap_rows or []), "resumed": resumed}))
    shutil.rmtree(root / STREAM_DIR, ignore_errors=True)  # the camera streams, now copied into videos/
    (root / JOURNAL).unlink(missing_ok=True)
    final = output_dir / info.name
    if final.exists():  # a finished episode is never overwritten; keep both
        final = output_dir / f"{info.name}-{int(time.time())}"
    root.rename(final)
    return EpisodeOutcome(info=info, label=label, stop_reason=stop_reason, ended_t=ended_t, ended_wall=ended_wall,
                          frames=frames, ticks=ticks, chunks=chunks, hold_events=hold_events,
                          rejected_ticks=rejected, dropped=dropped, recovered=recovered, path=final,
                          backlog_max_ticks=backlog_max_ticks, parts=parts, gap_ticks=len(gap_rows or []),
                          resumed=resumed)


def finished_without_metrics(output_dir: Path) -> list[Path]:
    """Finished episodes (renamed into place) whose metrics were never written: the process died between."""
    if not output_dir.is_dir():
        return []
    return sorted(path for path in output_dir.iterdir()
                  if path.is_dir() and path.name.startswith(EPISODE_PREFIX)
                  and (path / SIDE_DIR / OUTCOME_FILE).exists() and not (path / SIDE_DIR / EPISODE_METRICS).exists())


def load_outcome(path: Path) -> EpisodeOutcome:
    """The ``EpisodeOutcome`` of a finished episode directory, from its side files."""
    import pandas as pd

    saved = json.loads((path / SIDE_DIR / OUTCOME_FILE).read_text())
    info = EpisodeInfo(**saved["info"])
    return EpisodeOutcome(info=info, label=saved["label"], stop_reason=saved["stop_reason"], ended_t=saved["ended_t"],
                          ended_wall=saved["ended_wall"], frames=saved["frames"],
                          ticks=pd.read_parquet(path / SIDE_DIR / "ticks.parquet"),
                          chunks=pd.read_parquet(path / SIDE_DIR / "chunks.parquet"),
                          hold_events=saved["hold_events"], rejected_ticks=saved["rejected"],
                          dropped=saved.get("dropped", {}), recovered=saved["recovered"], path=path,
                          backlog_max_ticks=int(saved.get("backlog_max_ticks", 0)),
                          parts=list(saved.get("parts") or []), gap_ticks=int(saved.get("gap_ticks", 0)),
                          resumed=int(saved.get("resumed", 0)))
