"""Robot-side nodes never load torch: each runs as a real process and, once it has done its work, its
memory map holds no ``libtorch``.

These are the nodes of the robot computer (camera, state-reader, actuator, servo emulator, monitor,
recorder) and the dataset player that stands in for the cameras and state-reader. A node is checked
after it used the LeRobot code that could bring torch in: the Feetech driver (state-reader, actuator
once its bus is connected), LeRobot's OpenCV camera class, the v3 dataset files and their video
(player, once a frame went out), the v3 writer (recorder, once an episode is saved).
"""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import NodeProcess, start_node, wait_for, write_config

from common.config import load_config
from common.wire.protocol import KIND_FRAME
from common.wire.transport import LatestSubscriber, SocketFactory

SMALL = {"width": 96, "height": 64}  # frame size is irrelevant here; small keeps the machine free


def torch_mappings(node: NodeProcess) -> list[str]:
    """The lines of the process's /proc/<pid>/maps that name a torch library."""
    assert node.proc is not None and node.proc.poll() is None, f"{node.program} is not running:\n{node.log()[-3000:]}"
    maps = Path(f"/proc/{node.proc.pid}/maps").read_text()
    return sorted({line.split()[-1] for line in maps.splitlines() if "libtorch" in line})


def assert_no_torch(*nodes: NodeProcess) -> None:
    loaded = {node.program: torch_mappings(node) for node in nodes}
    assert not any(loaded.values()), f"torch is loaded in: { {name: libs for name, libs in loaded.items() if libs} }"



def test_servo_emulator_state_reader_and_actuator_with_the_feetech_bus(tmp_path: Path,
                                                                      node_processes: list[NodeProcess]) -> None:
    # contract_wait_s: ready without a policy; not dry-run, so the actuator connects LeRobot's bus driver.
    config_path = write_config(tmp_path, "lift", {"actuator": {"contract_wait_s": 0.5, "dry_run": False},
                                                  "cameras": {"front": SMALL, "wrist": SMALL}})
    emulator = start_node(node_processes, config_path, "servo_emulator", "main")
    reader = start_node(node_processes, config_path, "state_reader", "main")  # ready once its bus is connected
    actuator = start_node(node_processes, config_path, "actuator")
    wait_for(lambda: "arm main connected on" in actuator.log(), 60,
             message=f"the actuator never connected its bus:\n{actuator.log()[-3000:]}")
    assert_no_torch(emulator, reader, actuator)


def test_cameras_synthetic_and_lerobot_opencv(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    not_a_camera = tmp_path / "not-a-camera"
    not_a_camera.write_bytes(b"\0" * 64)
    config_path = write_config(tmp_path, "lift", {"cameras": {
        "front": {**SMALL, "backend": "synthetic"},
        # An existing path that is no camera: LeRobot's OpenCVCamera is imported and built, then fails.
        "wrist": {**SMALL, "backend": "opencv", "device": str(not_a_camera), "retry_s": 0.3}}})
    synthetic = start_node(node_processes, config_path, "camera", "front")
    opencv = start_node(node_processes, config_path, "camera", "wrist", ready=False)
    wait_for(lambda: str(not_a_camera) in opencv.log(), 60,
             message=f"the OpenCV camera never tried its device:\n{opencv.log()[-3000:]}")
    assert_no_torch(synthetic, opencv)


def test_monitor(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    config_path = write_config(tmp_path, "lift", {"cameras": {"front": SMALL, "wrist": SMALL}})
    monitor = start_node(node_processes, config_path, "monitor")
    assert_no_torch(monitor)


def test_recorder_after_writing_an_episode(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    # The streams of tests/test_recorder.py stand in for cameras, state-reader and actuator; the recorder
    # encodes and writes the LeRobot v3 episode, then is checked.
    from test_recorder import Streams, read_metrics, run_episode, small_config

    config_path = small_config(tmp_path)
    output_dir = Path(load_config(config_path).recorder.output_dir)
    streams = Streams(config_path)
    try:
        recorder = start_node(node_processes, config_path, "recorder")
        streams.preroll()
        streams.start_episode(output_dir, 0, "episode_000000")
        run_episode(streams, 0, 20)
        streams.event("episode_stop", episode_index=0, label="success", reason="stop")
        wait_for(lambda: read_metrics(output_dir), timeout_s=90,
                 message=f"the episode never finished:\n{recorder.log()[-3000:]}")
    finally:
        streams.close()
    assert (output_dir / "episode_000000" / "meta" / "info.json").is_file()
    assert_no_torch(recorder)


def test_dataset_player_once_it_publishes(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    from common.tools.demo_data import DemoSpec, generate_demo_dataset

    config_path = write_config(tmp_path, "lift", {"cameras": {"front": SMALL, "wrist": SMALL},
                                                  "player": {"dataset": str(tmp_path / "demo")}})
    config = load_config(config_path)
    generate_demo_dataset(config, tmp_path / "demo", DemoSpec(episodes=1, frames=30, **SMALL))
    frames = LatestSubscriber(SocketFactory(), [config.cameras["front"].endpoint], hwm=100)
    try:
        player = start_node(node_processes, config_path, "dataset_player")
        wait_for(lambda: any(m.kind == KIND_FRAME for m in frames.poll(0.2)), 60,
                 message=f"the player published no frame:\n{player.log()[-3000:]}")
        assert_no_torch(player)
    finally:
        frames.close()


def test_stand_in_forwards_to_the_real_device_utils_when_torch_is_wanted() -> None:
    # In a fresh interpreter: the stand-in keeps torch out of LeRobot's motor imports, and the first use
    # of a device helper (or any other name of the module) gets LeRobot's real, torch-backed code.
    import subprocess

    script = (
        "import sys\n"
        "from common import lerobot_lite\n"
        "assert lerobot_lite.install()\n"
        "import lerobot.motors.feetech, lerobot.utils.constants\n"
        "assert 'torch' not in sys.modules, 'torch loaded by the motor imports'\n"
        "from lerobot.utils.device_utils import get_safe_dtype\n"
        "import torch\n"
        "assert get_safe_dtype(torch.float64, 'cpu') is torch.float64\n"
        "import lerobot.utils\n"
        "assert str(lerobot.utils.get_safe_torch_device('cpu')) == 'cpu'\n"
        "assert not isinstance(sys.modules['lerobot.utils.device_utils'], lerobot_lite.StandIn)\n"
        "assert lerobot.utils.device_utils is sys.modules['lerobot.utils.device_utils']\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

