"""What a recorder finds when it starts: the work directories a dead recorder left (``pending_work``), the next
episode number (``next_recorder_index``), and the rebuild of a finished LeRobot dataset from a dead recorder's
work directory, its journal and the frames on disk (``recover_episode``)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np

from common.config import DeploymentConfig
from nodes.recorder.journal import replay_journal
from nodes.recorder.lerobot_v3 import OneEpisodeDataset
from nodes.recorder.parts import split_parts
from nodes.recorder.records import DROP_RECORDER_CRASHED, EPISODE_PREFIX, WORK_DIR, EpisodeOutcome
from nodes.recorder.segments import count_restarts, segment_breaks, segment_histograms
from nodes.recorder.side_files import complete_episode
from nodes.recorder.video import VideoResult

log = logging.getLogger(__name__)


def pending_work(output_dir: Path) -> list[Path]:
    """Work directories left by a recorder that died (oldest first)."""
    work = output_dir / WORK_DIR
    if not work.is_dir():
        return []
    # Names with a dot are rebuilds in progress (``episode_000001.rebuild``), redone from their work dir.
    return sorted(path for path in work.iterdir()
                  if path.is_dir() and path.name.startswith(EPISODE_PREFIX) and "." not in path.name)


def next_recorder_index(output_dir: Path) -> int:
    """One more than the highest episode number under ``output_dir`` (finished or in the work dir)."""
    highest = -1
    for parent in (output_dir, output_dir / WORK_DIR):
        if not parent.is_dir():
            continue
        for path in parent.iterdir():
            digits = path.name.removeprefix(EPISODE_PREFIX).split("-")[0].split(".")[0]
            if path.name.startswith(EPISODE_PREFIX) and digits.isdigit():
                highest = max(highest, int(digits))
    return highest + 1


def recover_episode(config: DeploymentConfig, output_dir: Path, work_root: Path, *,
                    vcodec: str = "h264") -> EpisodeOutcome | None:
    """Rebuild a finished LeRobot dataset from a dead recorder's work directory, in place.

    Frames are taken in order while the journal has the tick and every camera's stream has the frame
    (a cut fragmented MP4 is readable up to its last complete fragment); the rest is the unfinished tail,
    counted in ``dropped`` as ``recorder_crashed``. The work directory becomes the episode; without a
    single complete frame it is renamed ``.unrecoverable`` and left for a person to look at.
    """
    state = replay_journal(config, work_root, vcodec)
    if state is None:
        log.warning("%s: no journal start entry; removing the unusable work directory", work_root)
        shutil.rmtree(work_root, ignore_errors=True)
        return None
    info, frames = state.info, state.frames
    dataset = OneEpisodeDataset(config, work_root, state.vcodec, encode=False)
    if frames == 0:
        # Kept (renamed out of the way, never retried) so a person can look at what was left.
        kept = work_root.with_name(f"{work_root.name}.unrecoverable")
        work_root.rename(kept)
        log.warning("%s: none of %d journaled ticks has every camera's frame on disk; nothing to recover "
                    "(left in %s)", info.name, state.journaled, kept)
        return None
    tick_rows = state.tick_rows
    for row in tick_rows:
        dataset.states.append(np.asarray(row["state"], dtype=np.float32))
        dataset.actions.append(np.asarray(row["action"], dtype=np.float32))
    videos = {key: VideoResult(frames=frames, codec="",
                               histogram=segment_histograms(dataset, key, state.segment_frames))
              for key in dataset.camera_keys}
    breaks = segment_breaks(state.segment_frames)
    parts = split_parts(tick_rows, config.fps, lockstep=config.actuator.lockstep, breaks=breaks)
    dataset.save(info.task or config.task, videos, parts=parts, segments=state.segment_frames)
    stop = state.stop
    dropped = count_restarts({str(k): int(v) for k, v in (stop.get("dropped") or {}).items()}, tick_rows,
                              breaks)
    if state.journaled > frames:
        dropped[DROP_RECORDER_CRASHED] = dropped.get(DROP_RECORDER_CRASHED, 0) + state.journaled - frames
    last_t = float(tick_rows[-1]["t"])
    outcome = complete_episode(output_dir, work_root, info, label=stop.get("label", ""),
                        stop_reason=stop.get("reason", "recorder_stopped" if state.suspended else "recorder_crashed"),
                        ended_t=stop.get("ended_t", last_t),
                        ended_wall=stop.get("ended_wall", time.time()), frames=frames, tick_rows=tick_rows,
                        chunk_rows=state.chunk_rows, latency_rows=state.latency_rows, hold_events=state.hold_events,
                        rejected=stop.get("rejected", {}), dropped=dropped, recovered=True,
                        backlog_max_ticks=int(stop.get("backlog_max_ticks", 0)), parts=parts,
                        gap_rows=state.gap_rows, resumed=state.resumed)
    log.warning("%s: recovered %d of %d journaled frames after a recorder crash", info.name, frames, state.journaled)
    return outcome
