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
import pytest
import yaml
from conftest import REPO_ROOT, NodeProcess, wait_for, write_config

from common.config import load_config
from common.protocol import KIND_ACTION, KIND_EVENT, KIND_FRAME, KIND_STATE, Message
from common.transport import LatestSubscriber, Publisher, SocketFactory

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
             frame_index: int = -1, action: np.ndarray | None = None, queue_depth: int = 5) -> None:
        self.tick_count += 1
        self.actuator.publish(Message(kind=KIND_ACTION, meta={
            "role": "executed", "names": self.names, "tick": self.tick_count, "hold": bool(hold_reason),
            "hold_reason": hold_reason, "episode_index": episode_index, "obs_t": time.monotonic(), "inputs": inputs,
            "frame_index": frame_index, "queue_depth": queue_depth, "lateness_s": 0.001 * (k % 5)},
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

    def start_episode(self, output_dir: Path, episode_index: int, recorder_name: str) -> None:
        """Send episode_start until the recorder has opened the episode's work directory."""
        work = output_dir / ".work" / recorder_name

        def opened() -> bool:
            self.event("episode_start", episode_index=episode_index, label="", reason="")
            return work.is_dir()

        wait_for(opened, timeout_s=30, interval_s=0.2, message=f"recorder never opened {work}")

    def close(self) -> None:
        for pub in (*self.cameras.values(), *self.arms.values(), self.actuator, self.player):
            pub.close()


def run_episode(streams: Streams, episode_index: int, frames: int, *, first_k: int = 0,
                player_episode: int | None = None, holds: dict[int, str] | None = None,
                gt_offset: float = 0.0, running: threading.Event | None = None) -> None:
    for k in range(first_k, first_k + frames):
        if running is not None and not running.is_set():
            return
        inputs = streams.observation(k, player_episode=player_episode)
        if player_episode is not None:
            streams.ground_truth(player_episode, k, streams.action_for(k) + np.float32(gt_offset))
        if k % 8 == 0:
            streams.chunk(0.010 + 0.001 * (k % 3))
        streams.tick(k, episode_index, inputs, hold_reason=(holds or {}).get(k, ""),
                     frame_index=k if player_episode is not None else -1)
        time.sleep(1.0 / 60)  # 60 Hz: faster than the task's 30 fps but paced like a real loop


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


def test_kill_mid_episode_keeps_earlier_episodes_and_recovers_the_rest(streams: Any, node_processes: list) -> None:
    config_path, pub = streams
    config = load_config(config_path)
    output_dir = Path(config.recorder.output_dir)
    recorder = NodeProcess("recorder", config_path)
    node_processes.append(recorder)
    recorder.start().wait_ready(timeout_s=120)
    pub.preroll()

    pub.start_episode(output_dir, 0, "episode_000000")
    run_episode(pub, 0, 40)
    pub.event("episode_stop", episode_index=0, label="success", reason="stop")
    wait_for(lambda: (output_dir / "episode_000000" / "meta" / "info.json").exists(), timeout_s=90,
             message=f"episode 0 never finished:\n{recorder.log()[-3000:]}")
    wait_for(lambda: read_metrics(output_dir), timeout_s=30, message="no metrics line for episode 0")

    pub.start_episode(output_dir, 1, "episode_000001")
    running = threading.Event()
    running.set()
    publisher = threading.Thread(target=run_episode, args=(pub, 1, 600), kwargs={"first_k": 100, "running": running})
    publisher.start()
    journal = output_dir / ".work" / "episode_000001" / "journal.jsonl"
    try:
        wait_for(lambda: journal.exists() and journal.read_text().count('"type":"tick"') >= 10, timeout_s=30,
                 message="episode 1 never reached the journal")
        recorder.kill(signal.SIGKILL)  # mid-episode: ticks are still being published
        assert publisher.is_alive()
    finally:
        running.clear()
        publisher.join()

    # The finished episode is untouched by the crash and loads with LeRobot.
    dataset = load_dataset(output_dir / "episode_000000")
    assert dataset.num_episodes == 1
    assert dataset.num_frames == 40
    states = np.stack([dataset.hf_dataset[i]["observation.state"].numpy() for i in range(40)])
    actions = np.stack([dataset.hf_dataset[i]["action"].numpy() for i in range(40)])
    np.testing.assert_allclose(states, np.stack([pub.state_for(k) for k in range(40)]))
    np.testing.assert_allclose(actions, np.stack([pub.action_for(k) for k in range(40)]))
    item = dataset[39]
    image = item["observation.images.front"]  # C,H,W float in [0,1], decoded from the mp4
    assert tuple(image.shape) == (3, HEIGHT, WIDTH)
    expected = image_for(0, 39).astype(np.float32) / 255.0
    assert np.abs(image.permute(1, 2, 0).numpy() - expected).mean() < 0.06  # lossy video, same picture
    metrics = read_metrics(output_dir)[0]
    assert metrics["label"] == "success" and metrics["frames"] == 40 and not metrics["recovered"]

    # A restarted recorder rebuilds the interrupted episode from its journal and staged frames.
    recorder.ready_path.unlink()  # SIGKILL left the dead process's readiness file behind
    restarted = NodeProcess("recorder", config_path)
    node_processes.append(restarted)
    restarted.start().wait_ready(timeout_s=120)
    recovered_root = output_dir / "episode_000001"
    assert (recovered_root / "meta" / "info.json").exists()
    assert not (output_dir / ".work" / "episode_000001").exists()
    recovered = load_dataset(recovered_root)
    assert 10 <= recovered.num_frames < 600
    first_state = recovered.hf_dataset[0]["observation.state"].numpy()
    np.testing.assert_allclose(first_state, pub.state_for(100))
    lines = read_metrics(output_dir)
    assert [line["episode"] for line in lines] == ["episode_000000", "episode_000001"]
    assert lines[1]["recovered"] and lines[1]["stop_reason"] == "recorder_crashed"
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["episodes"] == 2 and summary["success"] == 1 and summary["success_rate"] == 1.0
    assert summary["recovered_episodes"] == ["episode_000001"]

    # The earlier episode replays through the real dataset player (same streams as cameras/state readers).
    replay_player(config_path.parent, output_dir / "episode_000000", node_processes)


def replay_player(tmp_path: Path, episode_root: Path, node_processes: list) -> None:
    (tmp_path / "replay").mkdir()
    player_config = small_config(tmp_path / "replay")
    config = load_config(player_config)
    factory = SocketFactory()
    subscriber = LatestSubscriber(factory, [config.cameras["front"].endpoint, config.player.gt_endpoint,
                                            *(arm.state_endpoint for arm in config.arms.values())], hwm=256)
    player = NodeProcess("dataset_player", player_config,
                         args=[f"--player.dataset={episode_root}", f"--player.repo_id=armpipe/{episode_root.name}",
                               "--player.loop=false"])
    node_processes.append(player)
    player.start().wait_ready(timeout_s=120)
    seen: dict[str, list[Message]] = {"frame": [], "state": [], "gt": []}

    def collect() -> bool:
        for msg in subscriber.poll(0.1):
            if msg.kind == KIND_FRAME:
                seen["frame"].append(msg)
            elif msg.kind == KIND_STATE:
                seen["state"].append(msg)
            elif msg.kind == KIND_ACTION and msg.meta.get("role") == "ground_truth":
                seen["gt"].append(msg)
        return len(seen["gt"]) >= 5 and len(seen["frame"]) >= 5

    wait_for(collect, timeout_s=60, message=f"no replayed frames:\n{player.log()[-3000:]}")
    subscriber.close()
    gt = seen["gt"][-1]
    k = gt.meta["frame_index"]
    dataset = load_dataset(episode_root)
    np.testing.assert_allclose(gt.arrays["action"], dataset.hf_dataset[k]["action"].numpy())
    assert seen["frame"][-1].arrays["image"].shape == (HEIGHT, WIDTH, 3) or seen["frame"][-1].jpeg


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
    pub.start_episode(output_dir, 3, "episode_000000")
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
    import pandas as pd

    ticks = pd.read_parquet(root / "armpipe" / "ticks.parquet")
    assert list(ticks["frame_index"]) == list(range(30))
    assert ticks["hold"].sum() == 3 and ticks["inputs_matched"].all()
    chunks = pd.read_parquet(root / "armpipe" / "chunks.parquet")
    assert len(chunks) == 4 and np.asarray(chunks["chunk"].iloc[0].tolist()).shape == (8, len(pub.names))
    for plot in ("joints.png", "timing.png"):
        assert (root / "armpipe" / "plots" / plot).stat().st_size > 10_000
    assert (output_dir / "plots" / "summary.png").stat().st_size > 10_000
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["failure"] == 1 and summary["success_rate"] == 0.0
    assert summary["holds_by_reason"] == {"queue_empty": 2, "stale_frame": 1}
    assert summary["action_error"]["mae"] == pytest.approx(0.5, abs=1e-5)
    assert load_dataset(root).num_frames == 30
