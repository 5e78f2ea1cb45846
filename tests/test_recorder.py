"""The evaluation recorder as a real process, fed by real publishers on the contract's streams.

The test process publishes what the cameras, state readers, dataset player and actuator publish (same
kinds, meta and arrays as docs streams), the recorder subscribes as in production, and the results are
read back with LeRobot's own ``LeRobotDataset`` and replayed by the real dataset player.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT, NodeProcess, start_node, wait_for, write_config

from common.config import load_config
from common.wire.protocol import KIND_ACTION, KIND_EVENT, KIND_FRAME, KIND_STATE, Message
from common.wire.transport import LatestSubscriber, Publisher, SocketFactory
from nodes.recorder.__main__ import Finisher
from nodes.recorder.side_files import finished_without_metrics, load_outcome
from nodes.recorder.video import readable_frames

WIDTH, HEIGHT = 64, 64  # small frames: h264 needs even sizes; content still tells frames apart


def small_config(tmp_path: Path, task: str = "lift", **recorder: Any) -> Path:
    raw = yaml.safe_load((REPO_ROOT / "configs" / f"{task}.yaml").read_text())
    cameras = {name: {"width": WIDTH, "height": HEIGHT} for name in raw["cameras"]}
    return write_config(tmp_path, task, {"cameras": cameras, "recorder": {"input_wait_s": 0.3, **recorder}})


def image_for(camera_index: int, k: int) -> np.ndarray:
    """A frame whose content encodes (camera, k): flat colour plus a moving bar."""
    image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    image[:] = (40 + 50 * camera_index, (7 * k) % 200, 120)
    image[:, (k * 3) % WIDTH] = 255
    return image


class Streams:
    """Publishers bound where cameras, state readers, the player and the actuator would bind."""

    def __init__(self, config_path: Path) -> None:
        self.config = load_config(config_path)
        factory = SocketFactory()
        # A roomy send queue: the test publishes bursts and must not drop a tick it later counts.
        self.cameras = {name: Publisher(factory, cam.endpoint, f"camera-{name}", hwm=256)
                        for name, cam in self.config.cameras.items()}
        self.arms = {name: Publisher(factory, arm.state_endpoint, f"state_reader-{name}", hwm=256)
                     for name, arm in self.config.arms.items()}
        self.actuator = Publisher(factory, self.config.actuator.events_endpoint, "actuator", hwm=256)
        self.player = Publisher(factory, self.config.player.gt_endpoint, "dataset_player", hwm=256)
        self.names = self.config.action_names()
        self.tick_count = 0

    def state_for(self, k: int) -> np.ndarray:
        return (np.arange(len(self.names), dtype=np.float32) * 2.0 + 0.5 * k).astype(np.float32)

    def action_for(self, k: int) -> np.ndarray:
        return (self.state_for(k) + 1.0).astype(np.float32)

    def event(self, event: str, **meta: Any) -> None:
        self.actuator.publish(Message(kind=KIND_EVENT, meta={"event": event, **meta}))

    def observation(self, k: int, *, player_episode: int | None = None) -> dict[str, int]:
        """Publish frame k of every camera and every arm's state; returns the inputs map of a tick."""
        inputs: dict[str, int] = {}
        replay = {} if player_episode is None else {"episode_index": player_episode, "frame_index": k}
        source = "camera" if player_episode is None else "dataset"
        for index, (name, pub) in enumerate(self.cameras.items()):
            msg = pub.publish(Message(kind=KIND_FRAME, meta={"camera": name, "source": source, **replay},
                                      arrays={"image": image_for(index, k)}))
            inputs[name] = msg.seq
        state = self.state_for(k)
        for index, (name, pub) in enumerate(self.arms.items()):
            arm = self.config.arms[name]
            msg = pub.publish(Message(kind=KIND_STATE, meta={"arm": name, "names": arm.joint_names(), "source": source,
                                                             **replay},
                                      arrays={"position": state[index * 6:(index + 1) * 6].copy()}))
            inputs[name] = msg.seq
        return inputs

    def ground_truth(self, player_episode: int, k: int, action: np.ndarray) -> None:
        self.player.publish(Message(kind=KIND_ACTION, meta={
            "role": "ground_truth", "names": self.names, "episode_index": player_episode, "frame_index": k,
            "timestamp": k / self.config.fps}, arrays={"action": action}))

    def tick(self, k: int, episode_index: int, inputs: dict[str, int], *, hold_reason: str = "",
             frame_index: int = -1, action: np.ndarray | None = None, queue_depth: int = 5,
             scheduled_t: float | None = None) -> None:
        """One executed tick. ``scheduled_t``: the slot it was meant for (the actuator's ``t - lateness_s``)."""
        self.tick_count += 1
        now = time.monotonic()
        lateness_s = 0.001 * (k % 5) if scheduled_t is None else now - scheduled_t
        self.actuator.publish(Message(kind=KIND_ACTION, t=now, meta={
            "role": "executed", "names": self.names, "tick": self.tick_count, "hold": bool(hold_reason),
            "hold_reason": hold_reason, "episode_index": episode_index, "obs_t": time.monotonic(), "inputs": inputs,
            "frame_index": frame_index, "queue_depth": queue_depth, "lateness_s": lateness_s},
            arrays={"action": self.action_for(k) if action is None else action}))

    def chunk(self, round_trip_s: float, rows: int = 8) -> None:
        self.actuator.publish(Message(kind=KIND_EVENT, meta={
            "event": "chunk", "rows": rows, "dropped_stale": 1, "obs_t": time.monotonic(), "round_trip_s": round_trip_s,
            "timings": {"inference_s": round_trip_s / 2, "total_s": round_trip_s * 0.8}, "queue_depth": rows},
            arrays={"chunk": np.ones((rows, len(self.names)), dtype=np.float32)}))

    def preroll(self) -> None:
        """Let the recorder's subscriptions settle (ZeroMQ drops what is published before they do)."""
        for k in range(10):
            self.tick(k, -1, self.observation(k), hold_reason="idle")
            time.sleep(0.03)

    def start_episode(self, output_dir: Path, episode_index: int, recorder_name: str, **meta: Any) -> None:
        """Send episode_start until the recorder has opened the episode's work directory."""
        work = output_dir / ".work" / recorder_name

        def opened() -> bool:
            self.event("episode_start", episode_index=episode_index, label="", reason="", **meta)
            return work.is_dir()

        wait_for(opened, timeout_s=30, interval_s=0.2, message=f"recorder never opened {work}")

    def close(self) -> None:
        for pub in (*self.cameras.values(), *self.arms.values(), self.actuator, self.player):
            pub.close()


def run_episode(streams: Streams, episode_index: int, frames: int, *, first_k: int = 0,
                player_episode: int | None = None, holds: dict[int, str] | None = None,
                gt_offset: float = 0.0, running: threading.Event | None = None) -> None:
    # Paced like the real-time actuator: tick k is meant for the slot start + k / fps, and says how late it ran.
    period = 1.0 / streams.config.fps
    start = time.monotonic()
    for k in range(first_k, first_k + frames):
        if running is not None and not running.is_set():
            return
        slot = start + (k - first_k) * period
        time.sleep(max(0.0, slot - time.monotonic()))
        inputs = streams.observation(k, player_episode=player_episode)
        if player_episode is not None:
            streams.ground_truth(player_episode, k, streams.action_for(k) + np.float32(gt_offset))
        if k % 8 == 0:
            streams.chunk(0.010 + 0.001 * (k % 3))
        hold_reason = (holds or {}).get(k, "")
        streams.tick(k, episode_index, inputs, hold_reason=hold_reason,
                     frame_index=k if player_episode is not None else -1, scheduled_t=slot)
        if not hold_reason:  # the goal went to the bus: its latency chain follows (docs/protocol.md section 8)
            streams.event("latency", tick=streams.tick_count, episode_index=episode_index, row=k % 8,
                          first_row=k % 8 == 0, end_to_end_s=0.05 + 0.001 * k,
                          stages={"inference": 0.01, "to_tick": 0.04 + 0.001 * k})


def load_dataset(root: Path) -> Any:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset(repo_id=f"armpipe/{root.name}", root=root, video_backend="pyav")


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def streams(tmp_path: Path) -> Any:
    config_path = small_config(tmp_path)
    streams = Streams(config_path)
    yield config_path, streams
    streams.close()


def kill_mid_episode(pub: Streams, recorder: NodeProcess, output_dir: Path, episode_index: int, name: str,
                     first_k: int) -> None:
    """Start an episode, publish ticks continuously, and SIGKILL the recorder once 10 are journaled."""
    pub.start_episode(output_dir, episode_index, name)
    running = threading.Event()
    running.set()
    publisher = threading.Thread(target=run_episode, args=(pub, episode_index, 600),
                                 kwargs={"first_k": first_k, "running": running})
    publisher.start()
    journal = output_dir / ".work" / name / "journal.jsonl"
    # Every camera's fragmented MP4 (encoded as the episode runs) already holds 10 frames a reader can get.
    streams = [output_dir / ".work" / name / "stream" / f"observation.images.{camera}.mp4"
               for camera in pub.config.cameras]
    try:
        wait_for(lambda: journal.exists() and journal.read_text().count('"type":"tick"') >= 13
                 and all(path.exists() and readable_frames(path) >= 10 for path in streams), timeout_s=60,
                 interval_s=0.2, message=f"{name} never reached the journal")
        recorder.kill(signal.SIGKILL)  # mid-episode: ticks are still being published
        assert publisher.is_alive()
    finally:
        running.clear()
        publisher.join()
    recorder.ready_path.unlink()  # SIGKILL left the dead process's readiness file behind



def test_kill_mid_episode_keeps_earlier_episodes(streams: Any, node_processes: list) -> None:
    config_path, pub = streams
    output_dir = Path(load_config(config_path).recorder.output_dir)
    recorder = start_node(node_processes, config_path, "recorder", timeout_s=180)
    pub.preroll()
    pub.start_episode(output_dir, 0, "episode_000000")
    run_episode(pub, 0, 40)
    pub.event("episode_stop", episode_index=0, label="success", reason="stop")
    wait_for(lambda: read_metrics(output_dir), timeout_s=90,
             message=f"episode 0 never finished:\n{recorder.log()[-3000:]}")
    # The player starts now (its imports take a while on a small machine) and replays episode 0 later.
    replay = Replay(config_path.parent, output_dir / "episode_000000", node_processes)
    kill_mid_episode(pub, recorder, output_dir, 1, "episode_000001", first_k=100)

    # The finished episode is untouched by the crash and loads with LeRobot.
    dataset = load_dataset(output_dir / "episode_000000")
    assert dataset.num_episodes == 1
    assert dataset.num_frames == 40
    states = np.stack([dataset.hf_dataset[i]["observation.state"].numpy() for i in range(40)])
    actions = np.stack([dataset.hf_dataset[i]["action"].numpy() for i in range(40)])
    np.testing.assert_allclose(states, np.stack([pub.state_for(k) for k in range(40)]))
    np.testing.assert_allclose(actions, np.stack([pub.action_for(k) for k in range(40)]))
    image = dataset[39]["observation.images.front"]  # C,H,W float in [0,1], decoded from the mp4
    assert tuple(image.shape) == (3, HEIGHT, WIDTH)
    expected = image_for(0, 39).astype(np.float32) / 255.0
    assert np.abs(image.permute(1, 2, 0).numpy() - expected).mean() < 0.06  # lossy video, same picture
    metrics = read_metrics(output_dir)
    assert len(metrics) == 1 and metrics[0]["label"] == "success" and metrics[0]["frames"] == 40
    assert not (output_dir / "episode_000001").exists()  # the interrupted one is not passed off as finished

    # ... and replays through the real dataset player, on the streams cameras and state readers use.
    replay.verify(dataset, states)


def test_restart_rebuilds_the_interrupted_episode(streams: Any, node_processes: list) -> None:
    config_path, pub = streams
    output_dir = Path(load_config(config_path).recorder.output_dir)
    recorder = start_node(node_processes, config_path, "recorder", timeout_s=180)
    pub.preroll()
    kill_mid_episode(pub, recorder, output_dir, 4, "episode_000000", first_k=100)
    journaled = (output_dir / ".work" / "episode_000000" / "journal.jsonl").read_text().count('"type":"tick"')

    restarted = start_node(node_processes, config_path, "recorder", timeout_s=180)
    wait_for(lambda: read_metrics(output_dir), timeout_s=120,
             message=f"episode not rebuilt:\n{restarted.log()[-3000:]}")
    assert not (output_dir / ".work" / "episode_000000").exists()
    recovered = load_dataset(output_dir / "episode_000000")
    # Every frame complete on disk before the kill survives; the tail still in the encoders is lost, and counted.
    assert 10 <= recovered.num_frames <= journaled
    for index in (0, recovered.num_frames - 1):
        np.testing.assert_allclose(recovered.hf_dataset[index]["observation.state"].numpy(), pub.state_for(100 + index))
        np.testing.assert_allclose(recovered.hf_dataset[index]["action"].numpy(), pub.action_for(100 + index))
    metrics = read_metrics(output_dir)[0]
    assert metrics["recovered"] and metrics["stop_reason"] == "recorder_crashed"
    assert metrics["actuator_episode"] == 4 and metrics["frames"] == recovered.num_frames
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["episodes"] == 1 and summary["recovered_episodes"] == ["episode_000000"]

    # The restarted recorder records the next episode after it, without touching the rebuilt one.
    pub.start_episode(output_dir, 5, "episode_000001")
    run_episode(pub, 5, 20)
    pub.event("episode_stop", episode_index=5, label="failure", reason="stop")
    wait_for(lambda: len(read_metrics(output_dir)) == 2, timeout_s=90, message="episode after restart not saved")
    assert load_dataset(output_dir / "episode_000001").num_frames == 20
    assert load_dataset(output_dir / "episode_000000").num_frames == recovered.num_frames


def test_ground_truth_arriving_after_its_tick_is_still_paired(streams: Any, node_processes: list) -> None:
    """The player's truth travels on its own socket: even the first row's may come after the tick."""
    config_path, pub = streams
    output_dir = Path(load_config(config_path).recorder.output_dir)
    start_node(node_processes, config_path, "recorder", timeout_s=180)
    pub.preroll()
    pub.start_episode(output_dir, 0, "episode_000000")
    for k in range(6):
        inputs = pub.observation(k, player_episode=2)
        pub.tick(k, 0, inputs, frame_index=k)
        time.sleep(0.1)  # well inside recorder.input_wait_s (0.5 s)
        pub.ground_truth(2, k, pub.action_for(k) + np.float32(0.25))
    pub.event("episode_stop", episode_index=0, label="success", reason="stop")
    wait_for(lambda: read_metrics(output_dir), timeout_s=90, message="no metrics")
    error = read_metrics(output_dir)[-1]["action_error"]
    assert error["frames_compared"] == 6  # the first row too
    assert error["mae"] == pytest.approx(0.25, abs=1e-5)


class Replay:
    """The real dataset player replaying a recorded episode on its own endpoints, and a subscriber to them."""

    def __init__(self, tmp_path: Path, episode_root: Path, node_processes: list) -> None:
        (tmp_path / "replay").mkdir()
        config = load_config(small_config(tmp_path / "replay"))
        self.subscriber = LatestSubscriber(SocketFactory(), [
            config.cameras["front"].endpoint, config.player.gt_endpoint,
            *(arm.state_endpoint for arm in config.arms.values())], hwm=1024)
        self.player = NodeProcess("dataset_player", tmp_path / "replay" / "lift.yaml",
                                  args=[f"--player.dataset={episode_root}",
                                        f"--player.repo_id=armpipe/{episode_root.name}", "--player.loop=true"])
        node_processes.append(self.player)
        self.player.start()

    def verify(self, dataset: Any, states: np.ndarray) -> None:
        self.player.wait_ready(timeout_s=180)
        seen: dict[str, list[Message]] = {"frame": [], "state": [], "gt": []}

        def collect() -> bool:
            for msg in self.subscriber.poll(0.1):
                if msg.kind == KIND_FRAME:
                    seen["frame"].append(msg)
                elif msg.kind == KIND_STATE:
                    seen["state"].append(msg)
                elif msg.kind == KIND_ACTION and msg.meta.get("role") == "ground_truth":
                    seen["gt"].append(msg)
            return min(len(seen["gt"]), len(seen["state"]), len(seen["frame"])) >= 10

        wait_for(collect, timeout_s=60, message=f"no replayed streams:\n{self.player.log()[-3000:]}")
        self.subscriber.close()
        for gt in seen["gt"]:
            k = gt.meta["frame_index"]
            np.testing.assert_allclose(gt.arrays["action"], dataset.hf_dataset[k]["action"].numpy())
        for state in seen["state"]:
            np.testing.assert_allclose(state.arrays["position"], states[state.meta["frame_index"]])
        frame = seen["frame"][-1]
        assert frame.meta["source"] == "dataset" and frame.meta["camera"] == "front"
        assert tuple(frame.jpeg_shapes.get("image", frame.arrays["image"].shape)) == (HEIGHT, WIDTH, 3)


def test_metrics_for_a_replayed_episode(streams: Any, node_processes: list) -> None:
    """Holds, latency and the action error against the replayed dataset's ground truth end up in the files."""
    config_path, pub = streams
    config = load_config(config_path)
    output_dir = Path(config.recorder.output_dir)
    recorder = NodeProcess("recorder", config_path)
    node_processes.append(recorder)
    recorder.start().wait_ready(timeout_s=120)
    pub.preroll()

    holds = {5: "queue_empty", 6: "queue_empty", 7: "stale_frame"}
    # A language policy's instruction (episode_start's ``instruction``) is the episode's task in the recording.
    instruction = "put the red cube in the box"
    pub.start_episode(output_dir, 3, "episode_000000", instruction=instruction)
    pub.event("hold", reason="queue_empty", count=1)
    run_episode(pub, 3, 30, player_episode=0, holds=holds, gt_offset=0.5)
    pub.event("episode_stop", episode_index=3, label="", reason="stop")
    wait_for(lambda: read_metrics(output_dir), timeout_s=90, message=f"no metrics:\n{recorder.log()[-3000:]}")
    # A label given after the stop (the actuator's ``label`` op) replaces the empty one.
    pub.event("episode_label", episode_index=3, label="failure", reason="")
    wait_for(lambda: read_metrics(output_dir)[-1]["label"] == "failure", timeout_s=30, message="label not applied")

    metrics = read_metrics(output_dir)[-1]
    assert metrics["actuator_episode"] == 3 and metrics["frames"] == 30
    assert metrics["holds"]["ticks_by_reason"] == {"queue_empty": 2, "stale_frame": 1}
    assert metrics["holds"]["events_by_reason"] == {"queue_empty": 1}
    error = metrics["action_error"]
    assert error["frames_compared"] == 27  # holding ticks are not compared
    assert error["mae"] == pytest.approx(0.5, abs=1e-5) and error["rmse"] == pytest.approx(0.5, abs=1e-5)
    round_trip = metrics["latency"]["round_trip_s"]
    assert round_trip["n"] == 4 and 0.010 <= round_trip["p50"] <= 0.012
    assert metrics["latency"]["inference_s"]["max"] == pytest.approx(0.006, abs=1e-6)
    assert metrics["dropped_stale_rows"] == 4

    root = output_dir / "episode_000000"
    assert metrics["task"] == instruction
    dataset = load_dataset(root)
    assert dataset.meta.tasks.index.tolist() == [instruction] and dataset[0]["task"] == instruction
    ticks = pd.read_parquet(root / "armpipe" / "ticks.parquet")
    assert list(ticks["frame_index"]) == list(range(30))
    assert ticks["hold"].sum() == 3 and ticks["inputs_matched"].all()
    chunks = pd.read_parquet(root / "armpipe" / "chunks.parquet")
    latency = pd.read_parquet(root / "armpipe" / "latency.parquet")
    assert len(latency) == 27 and latency["first_row"].sum() == 4  # one row per goal written, not per hold
    np.testing.assert_allclose(latency["end_to_end_s"], latency["stage_inference_s"] + latency["stage_to_tick_s"])
    assert len(chunks) == 4 and np.asarray(chunks["chunk"].iloc[0].tolist()).shape == (8, len(pub.names))
    for plot in ("joints.png", "timing.png"):
        assert (root / "armpipe" / "plots" / plot).stat().st_size > 10_000
    assert (output_dir / "plots" / "summary.png").stat().st_size > 10_000
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["failure"] == 1 and summary["success_rate"] == 0.0
    assert summary["holds_by_reason"] == {"queue_empty": 2, "stale_frame": 1}
    assert summary["action_error"]["mae"] == pytest.approx(0.5, abs=1e-5)
    assert load_dataset(root).num_frames == 30

    # A recorder killed between moving the episode into place and writing its metrics: the next start finds
    # it (no armpipe/episode.json) and redoes them from the side files, with the same result.
    recorder.stop()
    (root / "armpipe" / "episode.json").unlink()
    (output_dir / "metrics.jsonl").unlink()
    assert finished_without_metrics(output_dir) == [root]
    Finisher(config, output_dir).publish(load_outcome(root))
    redone = read_metrics(output_dir)[-1]
    for key in ("frames", "holds", "action_error", "latency", "label", "duration_s"):
        assert redone[key] == metrics[key], key
    assert finished_without_metrics(output_dir) == []


def test_written_episodes_are_lerobot_v3_that_lerobot_merges(tmp_path: Path) -> None:
    # The writer does not use LeRobot's classes (they import torch): LeRobot's own reader and merger
    # must still take its episodes, with the statistics LeRobot computes (per joint, per channel).
    from lerobot.datasets.aggregate import aggregate_datasets

    from common.wire.contract import image_key
    from nodes.recorder.lerobot_v3 import OneEpisodeDataset

    config = load_config(small_config(tmp_path))
    lengths = (12, 7)
    for episode, length in enumerate(lengths):
        dataset = OneEpisodeDataset(config, tmp_path / f"episode_{episode}", "h264", "ultrafast")
        for k in range(length):
            state = np.arange(6, dtype=np.float32) + 100 * episode + k
            dataset.add_frame({image_key(camera): image_for(index, k) for index, camera in enumerate(config.cameras)},
                              state, state + 1)
        dataset.save(config.task)
    first = load_dataset(tmp_path / "episode_0")
    np.testing.assert_allclose(first.meta.stats["observation.state"]["mean"], np.arange(6) + 5.5)
    assert first.meta.stats[image_key("front")]["mean"].shape == (3, 1, 1)
    aggregate_datasets(repo_ids=["armpipe/e0", "armpipe/e1"], aggr_repo_id="armpipe/all",
                       roots=[tmp_path / "episode_0", tmp_path / "episode_1"], aggr_root=tmp_path / "all")
    merged = load_dataset(tmp_path / "all")
    assert merged.num_episodes == 2 and merged.num_frames == sum(lengths)
    row = merged[lengths[0] + 3]  # episode 1, frame 3
    assert int(row["episode_index"]) == 1 and int(row["frame_index"]) == 3
    np.testing.assert_allclose(row["observation.state"].numpy(), np.arange(6) + 103)
    image = row["observation.images.wrist"].permute(1, 2, 0).numpy()
    assert np.abs(image - image_for(1, 3).astype(np.float32) / 255.0).mean() < 0.06
    assert merged.meta.tasks.index.tolist() == [config.task]
