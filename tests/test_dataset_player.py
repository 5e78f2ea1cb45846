"""The dataset player, run as a real process, replaying generated demo datasets of every layout.

A subscriber in the test process plays the consumer (and, for lockstep, the actuator's tick
acknowledgements); the actuator-driven end-to-end run lives in tests/test_offline_eval.py.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zmq
from conftest import NodeProcess, write_config

from common.config import load_config
from common.dataset_source import DatasetError, DatasetSource
from common.tools.demo_data import TASK_PROMPTS, DemoSpec, generate_demo_dataset, render_camera
from common.wire.images import decode_jpeg
from common.wire.protocol import KIND_ACTION, KIND_EVENT, KIND_FRAME, KIND_STATE, Message
from common.wire.transport import Publisher, SocketFactory, recv_message

WIDTH, HEIGHT = 96, 64  # small frames: the layout is what matters here, not the resolution
EPISODES, FRAMES = 2, 24


def small_config(tmp_path: Path, task: str, dataset: Path, player: dict | None = None,
                 cameras: dict | None = None) -> Path:
    raw_cameras = {name: {"width": WIDTH, "height": HEIGHT} for name in load_config(
        Path(__file__).resolve().parent.parent / "configs" / f"{task}.yaml").cameras}
    for name, extra in (cameras or {}).items():
        raw_cameras[name].update(extra)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_config(tmp_path, task, {"cameras": raw_cameras,
                                         "player": {"dataset": str(dataset), **(player or {})}})


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small demo dataset per task layout, written by LeRobot's writer (cached for the module)."""
    root = tmp_path_factory.mktemp("player-data")
    made = {}
    for task in ("lift", "stack", "sort"):
        config = load_config(small_config(root / task, task, root / "unused"))
        made[task] = generate_demo_dataset(config, root / f"{task}-demo",
                                           DemoSpec(episodes=EPISODES, frames=FRAMES, width=WIDTH, height=HEIGHT))
    return made


class Listener:
    """A SUB socket on every stream the player publishes, keeping every message in arrival order."""

    def __init__(self, config_path: Path) -> None:
        config = load_config(config_path)
        self.config = config
        self.sock = SocketFactory().socket(zmq.SUB, hwm=10000)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        for cam in config.cameras.values():
            self.sock.connect(cam.endpoint)
        for arm in config.arms.values():
            self.sock.connect(arm.state_endpoint)
        self.sock.connect(config.player.gt_endpoint)
        self.messages: list[Message] = []

    def pump(self, timeout_s: float = 0.05) -> list[Message]:
        fresh: list[Message] = []
        if self.sock.poll(int(timeout_s * 1000)):
            while True:
                try:
                    fresh.append(recv_message(self.sock, zmq.NOBLOCK))
                except zmq.Again:
                    break
        self.messages.extend(fresh)
        return fresh

    def wait_event(self, event: str, timeout_s: float = 30.0, after: int = 0, **meta: object) -> Message:
        """The first ``event`` message (matching ``meta``) at list position ``after`` or later."""
        deadline = time.monotonic() + timeout_s
        seen = after
        while time.monotonic() < deadline:
            self.pump()
            for msg in self.messages[seen:]:
                if (msg.kind == KIND_EVENT and msg.meta.get("event") == event
                        and all(msg.meta.get(k) == v for k, v in meta.items())):
                    return msg
            seen = max(seen, len(self.messages))
        events = [m.meta.get("event") for m in self.messages if m.kind == KIND_EVENT]
        raise AssertionError(f"no {event} {meta} within {timeout_s}s; got {events}")

    def position(self, msg: Message) -> int:
        return next(i for i, m in enumerate(self.messages) if m is msg)

    def episode_messages(self, episode: int, timeout_s: float = 60.0, after: int = 0) -> list[Message]:
        """Everything published from an episode_start of ``episode`` (at list position ``after`` or later) to its
        episode_end."""
        start = self.wait_event("episode_start", timeout_s, after=after, episode_index=episode)
        first = self.position(start)
        self.wait_event("episode_end", timeout_s, after=first, episode_index=episode)
        # Each stream is its own socket, so the end event can overtake the last frames: keep listening a
        # little, then take this episode's messages by their meta (callers cut each stream at its length).
        settle = time.monotonic() + 0.5
        while time.monotonic() < settle:
            self.pump()
        return [m for m in self.messages[first:] if m.meta.get("episode_index") == episode or m.kind == KIND_EVENT]

    def close(self) -> None:
        self.sock.close(linger=0)


def parquet_rows(dataset: Path, episode: int) -> dict[str, np.ndarray]:
    """The episode's rows read straight from the parquet files, independently of the player's reader."""
    table = pq.read_table(sorted((dataset / "data").rglob("*.parquet")))
    frame = table.to_pandas()
    frame = frame[frame["episode_index"] == episode].sort_values("frame_index")
    return {"state": np.stack(frame["observation.state"].to_numpy()).astype(np.float32),
            "action": np.stack(frame["action"].to_numpy()).astype(np.float32),
            "timestamp": frame["timestamp"].to_numpy(dtype=np.float64),
            "frame_index": frame["frame_index"].to_numpy()}


def best_matching_frame(image: np.ndarray, camera: str, config, states: np.ndarray) -> int:
    """Which frame of the episode a decoded image shows: the rendering it is closest to."""
    errors = [np.abs(image.astype(np.int16) - render_camera(camera, config, state, index, len(states), WIDTH,
                                                            HEIGHT)).mean()
              for index, state in enumerate(states)]
    return int(np.argmin(errors))


@pytest.mark.parametrize("task", ["lift", "stack", "sort"])
def test_realtime_replay_publishes_every_frame_in_order(task: str, datasets: dict[str, Path], tmp_path: Path) -> None:
    # The sort layout also checks a JPEG camera: the wire encoding follows cameras.<cam>.encoding.
    jpeg_cameras = {"front": {"encoding": "jpeg"}} if task == "sort" else {}
    config_path = small_config(tmp_path, task, datasets[task], {"episodes": [1], "loop": True}, jpeg_cameras)
    config = load_config(config_path)
    listener = Listener(config_path)
    player = NodeProcess("dataset_player", config_path).start()
    try:
        player.wait_ready(120)
        # The second pass of the looped episode: by then every stream's subscription is surely in place (on a
        # loaded machine the wrist camera's was not yet when the first pass's frame 0 went out, and PUB drops it).
        listener.episode_messages(1)
        messages = listener.episode_messages(1, after=len(listener.messages))
    finally:
        player.stop()
        listener.close()

    truth = parquet_rows(datasets[task], 1)
    frames_total = len(truth["timestamp"])
    start = messages[0]
    assert start.meta["frames"] == frames_total and start.src == "dataset_player"

    for camera, cam in config.cameras.items():
        frames = [m for m in messages if m.kind == KIND_FRAME and m.meta["camera"] == camera][:frames_total]
        assert [m.meta["frame_index"] for m in frames] == list(range(frames_total)), camera
        for msg in frames:
            assert msg.meta["source"] == "dataset"
            if cam.encoding == "jpeg":
                assert msg.jpeg == {"image"}
                image = decode_jpeg(msg.arrays["image"])
            else:
                assert not msg.jpeg
                image = msg.arrays["image"]
            assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == np.uint8
        # The picture is the recorded one for that row (the demo drawing of that row's joints).
        for index in (0, frames_total // 2, frames_total - 1):
            image = frames[index].arrays["image"]
            image = decode_jpeg(image) if cam.encoding == "jpeg" else image
            assert best_matching_frame(image, camera, config, truth["state"]) == index

    offset = 0
    for arm_name, arm in config.arms.items():
        states = [m for m in messages if m.kind == KIND_STATE and m.meta["arm"] == arm_name][:frames_total]
        assert [m.meta["frame_index"] for m in states] == list(range(frames_total))
        assert all(m.meta["names"] == arm.joint_names() and m.meta["source"] == "dataset" for m in states)
        # The episode's own task string rides on every state (actuator.instruction_source: dataset).
        assert {m.meta.get("task") for m in states} == {TASK_PROMPTS[task]}
        positions = np.stack([m.arrays["position"] for m in states])
        assert positions.dtype == np.float32 and positions.shape == (frames_total, 6)
        np.testing.assert_array_equal(positions, truth["state"][:, offset:offset + 6])
        offset += 6
    assert offset == truth["state"].shape[1]

    ground_truth = [m for m in messages if m.kind == KIND_ACTION][:frames_total]
    assert all(m.meta["role"] == "ground_truth" and m.meta["names"] == config.action_names() for m in ground_truth)
    assert [m.meta["frame_index"] for m in ground_truth] == list(range(frames_total))
    np.testing.assert_array_equal(np.stack([m.arrays["action"] for m in ground_truth]), truth["action"])
    np.testing.assert_allclose([m.meta["timestamp"] for m in ground_truth], truth["timestamp"], atol=1e-6)

    # Recorded timing: the player stamps at publish and never runs ahead of the recording.
    stamps = np.array([m.t for m in ground_truth])
    assert np.all(np.diff(stamps) > 0)
    recorded = truth["timestamp"][-1] - truth["timestamp"][0]
    assert stamps[-1] - stamps[0] >= recorded - 1.0 / config.fps


def test_lockstep_waits_for_each_tick_and_resends(datasets: dict[str, Path], tmp_path: Path) -> None:
    config_path = small_config(tmp_path, "lift", datasets["lift"],
                               {"mode": "lockstep", "episodes": [0], "loop": False, "lockstep_timeout_s": 1.0})
    config = load_config(config_path)
    # The test is the actuator: it publishes the executed ticks the player waits for.
    actuator = Publisher(SocketFactory(), config.actuator.events_endpoint, "actuator", hwm=100)
    listener = Listener(config_path)
    player = NodeProcess("dataset_player", config_path).start()
    truth = parquet_rows(datasets["lift"], 0)
    received: list[Message] = []

    def frames_of(messages: list[Message]) -> list[Message]:
        return [m for m in messages if m.kind == KIND_FRAME and m.meta["camera"] == "front"]

    def tick(frame: Message, inputs: dict[str, int]) -> None:
        actuator.publish(Message(kind=KIND_ACTION, meta={
            "role": "executed", "names": config.action_names(), "tick": frame.meta["frame_index"], "hold": False,
            "hold_reason": "", "episode_index": 0, "obs_t": frame.t, "inputs": inputs,
            "frame_index": frame.meta["frame_index"]}, arrays={"action": np.zeros(6, np.float32)}))

    try:
        player.wait_ready(120)
        # Frame 0 goes out (and, unacknowledged, again after lockstep_timeout_s: the slow-joiner case).
        deadline = time.monotonic() + 30
        while len(frames_of(received)) < 2 and time.monotonic() < deadline:
            received += listener.pump()
        first = frames_of(received)
        assert [m.meta["frame_index"] for m in first[:2]] == [0, 0], "frame 0 must be re-sent, not frame 1"
        assert first[1].seq > first[0].seq

        # A tick that used older messages than the pending row does not count as consumed.
        tick(first[-1], {name: 0 for name in [*config.cameras, *config.arms]})
        stale_deadline = time.monotonic() + 0.5
        while time.monotonic() < stale_deadline:
            received += listener.pump()
        assert {m.meta["frame_index"] for m in frames_of(received)} == {0}

        # Tick as the lockstep actuator does, once per new complete observation (every camera and arm
        # newer than at the last tick): the player answers each tick with the next row, in order.
        ticked: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            received += listener.pump()
            latest = {m.meta.get("camera", m.meta.get("arm")): m for m in received
                      if m.kind in (KIND_FRAME, KIND_STATE)}
            if len(latest) == 3 and all(msg.seq > ticked.get(name, 0) for name, msg in latest.items()):
                ticked = {name: msg.seq for name, msg in latest.items()}
                tick(min(latest.values(), key=lambda m: m.meta["frame_index"]), ticked)
            if any(m.kind == KIND_EVENT and m.meta.get("event") == "episode_end" for m in received):
                break
    finally:
        player.stop()
        listener.close()
        actuator.close()

    end = next(m for m in received if m.kind == KIND_EVENT and m.meta.get("event") == "episode_end")
    assert end.meta["complete"] and end.meta["frames"] == len(truth["timestamp"])
    order = [m.meta["frame_index"] for m in frames_of(received)]
    assert order == sorted(order) and sorted(set(order)) == list(range(len(truth["timestamp"])))
    ground_truth = {m.meta["frame_index"]: m.arrays["action"] for m in received if m.kind == KIND_ACTION}
    np.testing.assert_array_equal(np.stack([ground_truth[i] for i in range(len(ground_truth))]), truth["action"])


def test_follow_episodes_starts_and_stops_with_the_actuator(datasets: dict[str, Path], tmp_path: Path) -> None:
    config_path = small_config(tmp_path, "lift", datasets["lift"], {"follow_episodes": True, "episodes": [1, 0]})
    config = load_config(config_path)
    actuator = Publisher(SocketFactory(), config.actuator.events_endpoint, "actuator", hwm=100)
    listener = Listener(config_path)
    player = NodeProcess("dataset_player", config_path).start()
    try:
        player.wait_ready(120)
        time.sleep(0.5)
        listener.pump()
        assert not [m for m in listener.messages if m.kind == KIND_FRAME], "nothing plays before the actuator starts"
        # The actuator's episode_start is re-published until the player answers (PUB/SUB slow joiner).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            actuator.publish(Message(kind=KIND_EVENT, meta={"event": "episode_start", "episode_index": 7}))
            listener.pump(0.2)
            if any(m.meta.get("event") == "episode_start" for m in listener.messages):
                break
        started = listener.wait_event("episode_start", 5)
        assert started.meta["episode_index"] == 1  # the first of player.episodes
        deadline = time.monotonic() + 10
        while not [m for m in listener.messages if m.kind == KIND_FRAME] and time.monotonic() < deadline:
            listener.pump()
        actuator.publish(Message(kind=KIND_EVENT, meta={"event": "episode_stop", "episode_index": 7}))
        end = listener.wait_event("episode_end", 10, episode_index=1)
        assert end.meta["reason"] == "actuator_stop" and not end.meta["complete"]
        assert end.meta["frames"] < FRAMES
        count = len(listener.messages)
        time.sleep(0.5)
        listener.pump()
        assert not [m for m in listener.messages[count:] if m.kind == KIND_FRAME], "stopped means no more frames"
    finally:
        player.stop()
        listener.close()
        actuator.close()


# ---------------------------------------------------------------------------------------------- errors


def test_wrong_path_is_a_clear_error_and_the_node_exits(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dataset"
    config_path = small_config(tmp_path, "lift", missing)
    player = NodeProcess("dataset_player", config_path).start()
    assert player.proc.wait(timeout=120) == 2
    player.stop()
    log = player.log()
    assert "player.dataset" in log and str(missing) in log and "common.tools.demo_data" in log


def test_missing_video_file_names_camera_and_file(datasets: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(datasets["lift"], broken)
    video = next((broken / "videos" / "observation.images.wrist").rglob("*.mp4"))
    video.unlink()
    config = load_config(small_config(tmp_path, "lift", broken))
    with pytest.raises(DatasetError) as error:
        DatasetSource(config)
    assert error.value.field == "player.dataset"
    assert "'wrist'" in str(error.value) and str(video) in str(error.value)


def test_layout_mismatch_names_every_difference(datasets: dict[str, Path], tmp_path: Path) -> None:
    # A single-arm lift dataset offered to the two-arm sort deployment.
    config = load_config(small_config(tmp_path, "sort", datasets["lift"]))
    with pytest.raises(DatasetError) as error:
        DatasetSource(config)
    text = str(error.value)
    assert "camera 'left_wrist' is not in the dataset" in text and "'right_wrist'" in text
    assert "state" in text and "12 joints" in text and "action" in text
    # Same joint count, different names or image size: also named.
    renamed = load_config(small_config(tmp_path / "b", "lift", datasets["lift"], cameras={"front": {"width": 128}}))
    with pytest.raises(DatasetError, match=r"camera 'front': dataset frames are \[64, 96, 3\]"):
        DatasetSource(renamed)


def test_episode_selection_out_of_range(datasets: dict[str, Path], tmp_path: Path) -> None:
    config = load_config(small_config(tmp_path, "stack", datasets["stack"], {"episodes": [0, 5]}))
    with pytest.raises(DatasetError, match=r"episodes \[5\] do not exist") as error:
        DatasetSource(config)
    assert error.value.field == "player.episodes"
