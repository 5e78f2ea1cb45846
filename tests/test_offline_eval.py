"""Offline evaluation: the error arithmetic, the deterministic predict path against a real policy node,
and the lockstep pipeline (player + actuator + policy, all real processes) scored twice."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import PYTHON, REPO_ROOT, NodeProcess, wait_for, write_config

from bench.harness import StandInServer
from common.config import load_config
from common.tools.demo_data import DemoSpec, generate_demo_dataset
from common.tools.offline_eval import (
    ErrorAccumulator,
    EvalReport,
    ExecutedRecorder,
    evaluate_executed,
    evaluate_predictions,
    executed_errors,
    save_report,
    score_chunk,
    summarise,
)
from common.tools.offline_eval.executed import _start_when_ready, _stop
from common.wire.actuator_client import ActuatorClient
from common.wire.protocol import KIND_ACTION, KIND_EVENT, KIND_REPLY, Message, ProtocolError, error_message
from common.wire.transport import Publisher, SocketFactory

POLICY_NODES: dict[Path, NodeProcess] = {}  # the module's policy node, by its config path
FRAMES = 10  # per episode: more than one 8-row chunk, few enough for a diffusion policy on a busy 2-core CPU


# ---------------------------------------------------------------------------------------------- arithmetic


def test_chunk_rows_are_scored_against_the_frames_they_are_meant_for() -> None:
    truth = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)  # frame i's action: [2i, 2i+1]
    exact = ErrorAccumulator(2, 4)
    score_chunk(exact, truth[3:7].copy(), truth, frame=3)  # a perfect chunk from frame 3
    assert exact.count == 4 and exact.result(0, 10).mae == [0.0, 0.0]

    shifted = ErrorAccumulator(2, 4)
    score_chunk(shifted, truth[3:7].copy(), truth, frame=3, row_offset=1)  # the reference's frame i+1
    result = shifted.result(0, 10)
    assert result.mae == [2.0, 2.0] and result.rmse == [2.0, 2.0] and result.horizon_mae == [2.0] * 4

    tail = ErrorAccumulator(2, 4)
    score_chunk(tail, np.zeros((4, 2), np.float32), truth, frame=8)  # rows 2 and 3 point past the end
    assert tail.count == 2 and tail.row_count.tolist() == [1, 1, 0, 0]
    assert tail.result(0, 10).mae == [17.0, 18.0]  # mean of |0 - 16|, |0 - 18| and |0 - 17|, |0 - 19|


def test_per_joint_numbers_and_overall_weighting() -> None:
    first = ErrorAccumulator(2)
    first.add(np.array([[1.0, 0.0], [3.0, 0.0]]), np.zeros((2, 2)))
    second = ErrorAccumulator(2)
    second.add(np.array([[0.0, 4.0]]), np.zeros((1, 2)))
    episodes = [first.result(0, 2), second.result(1, 1)]
    assert episodes[0].mae == [2.0, 0.0] and episodes[0].max_abs == [3.0, 0.0]
    assert episodes[0].rmse == pytest.approx([np.sqrt(5.0), 0.0])
    report = summarise("predict", ["a.pos", "b.pos"], episodes, row_offset=0, dataset="d", policy={})
    assert report.overall_mae == pytest.approx([4.0 / 3.0, 4.0 / 3.0])  # weighted by compared pairs
    assert report.overall_mean_mae == pytest.approx(4.0 / 3.0)


def test_report_files(tmp_path: Path) -> None:
    accumulator = ErrorAccumulator(6, 3)
    truth = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    score_chunk(accumulator, truth[:3] + 1.0, truth, frame=0)
    report = summarise("predict", [f"j{i}.pos" for i in range(6)], [accumulator.result(0, 5)], row_offset=0,
                       dataset="d", policy={"policy_type": "diffusion"})
    from common.tools.offline_eval import EpisodeTrace

    paths = save_report(report, [EpisodeTrace(0, truth, truth + 1.0)], tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["episodes"][0]["mae"] == pytest.approx([1.0] * 6) and saved["names"][0] == "j0.pos"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000
    assert set(np.load(paths["traces"])) == {"episode_0_run_0_truth", "episode_0_run_0_predicted"}


# ------------------------------------------------------------------------------ pairing ticks with the truth


class TwoStreams:
    """The player's ground-truth publisher and the actuator's event publisher (real PUB sockets on the config's
    endpoints) and an ``ExecutedRecorder`` subscribed to both, connected."""

    def __init__(self, tmp_path: Path) -> None:
        self.config = load_config(write_config(tmp_path, "lift"))
        factory = SocketFactory()
        self.gt = Publisher(factory, self.config.player.gt_endpoint, "dataset_player", hwm=1024)
        self.events = Publisher(factory, self.config.actuator.events_endpoint, "actuator", hwm=1024)
        self.recorder = ExecutedRecorder(self.config)
        self.truth = np.arange(3 * 6, dtype=np.float32).reshape(3, 6)
        self.names = list(self.config.action_names())

        def heard() -> bool:
            self.gt.publish(Message(kind=KIND_EVENT, meta={"event": "player_stats"}))
            self.events.publish(Message(kind=KIND_EVENT, meta={"event": "loop_stats"}))
            self.recorder.pump(0.05)
            return {"player_stats", "loop_stats"} <= self.recorder.heard

        wait_for(heard, timeout_s=30, message="the recorder never heard both publishers")

    def until(self, condition: Any, what: str) -> None:
        """Pump the recorder until ``condition()``: it has read what was published so far."""
        wait_for(lambda: self.recorder.pump(0.02) or condition(), timeout_s=30, message=what)

    def pass_start(self) -> None:
        self.gt.publish(Message(kind=KIND_EVENT, meta={"event": "episode_start", "episode_index": 0, "frames": 3,
                                                       "source": "dataset"}))
        self.until(lambda: self.recorder.current is not None, "episode_start not read")

    def truth_and_end(self) -> None:
        for frame, row in enumerate(self.truth):
            meta = {"role": "ground_truth", "episode_index": 0, "frame_index": frame, "names": self.names}
            self.gt.publish(Message(kind=KIND_ACTION, meta=meta, arrays={"action": row}))
        self.gt.publish(Message(kind=KIND_EVENT, meta={"event": "episode_end", "complete": True,
                                                       "source": "dataset"}))
        self.until(self.recorder.pass_ended, "episode_end not read")

    def tick(self, frame: int, offset: float, uid: str = "a1", index: int = 0) -> None:
        self.events.publish(Message(kind=KIND_ACTION, meta={
            "role": "executed", "names": self.names, "episode_index": index, "episode_id": uid, "frame_index": frame,
            "hold": False},
            arrays={"action": self.truth[frame] + offset}))

    def close(self) -> None:
        self.recorder.close()
        self.gt.close()
        self.events.close()


@pytest.fixture
def streams(tmp_path: Path) -> Iterator[TwoStreams]:
    pair = TwoStreams(tmp_path)
    try:
        yield pair
    finally:
        pair.close()


def test_a_tick_read_before_its_frames_truth_is_still_scored(streams: TwoStreams) -> None:
    """The two streams reach the recorder through one SUB socket that takes turns between them: a loaded
    evaluator can read the tick that used frame k before the truth of frame k (CI lost a frame of a lockstep pass
    this way). Here every tick is read before any truth: all three frames are still scored."""
    streams.pass_start()
    for frame in range(3):
        streams.tick(frame, offset=1.0)
    streams.until(lambda: len(streams.recorder.current.ticks) == 3, "ticks not read")  # type: ignore[union-attr]
    streams.truth_and_end()
    episode = streams.recorder.take_finished(settle_s=0.0)
    assert episode is not None
    result, trace = executed_errors(episode, 6)
    assert result.compared == 3 and result.mae == [1.0] * 6
    np.testing.assert_array_equal(trace.predicted, streams.truth + 1.0)


def test_driven_pass_takes_its_actuator_episodes_ticks_whenever_they_arrive(streams: TwoStreams) -> None:
    """--drive: a pass's ticks are those of the actuator episode started for it, all in once the actuator's
    episode_stop is (same stream, after the last tick), wherever they fall against the player's stream: here
    before the pass's own episode_start; a tick of another actuator episode is not the pass's."""
    streams.tick(0, offset=5.0, uid="old", index=7)
    for frame in range(3):
        streams.tick(frame, offset=2.0)
    streams.until(lambda: len(streams.recorder.actuator_ticks.get("a1", [])) == 3, "ticks not read")
    streams.pass_start()
    streams.truth_and_end()
    streams.events.publish(Message(kind=KIND_EVENT, meta={"event": "episode_stop", "episode_index": 0,
                                                          "episode_id": "a1"}))
    episode = streams.recorder.take_driven(0, deadline=time.monotonic() + 30)
    result, _ = executed_errors(episode, 6)
    assert result.compared == 3 and result.mae == [2.0] * 6


class LosingActuator(StandInServer):
    """The actuator's control socket as a loaded machine can answer it: the first start and the first stop are
    carried out but answered after the client gave up; the retries are refused as the actuator refuses them."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(SocketFactory(), endpoint, name="losing-actuator")
        self.running: int | None = None
        self.ops: list[str] = []

    def answer(self, request: Message) -> Message:
        op = str(request.meta["op"])
        self.ops.append(op)
        late = self.ops.count(op) == 1 and op in ("start", "stop")
        if op == "status":
            meta: dict[str, Any] = {"state": "running" if self.running is not None else "idle",
                                    "episode_index": -1 if self.running is None else self.running}
        elif op == "start" and self.running is None:
            self.running, meta = 4, {"episode_index": 4, "state": "running"}
        elif op == "stop" and self.running is not None:
            meta, self.running = {"episode_index": self.running, "state": "idle"}, None
        else:
            return error_message(ProtocolError("op", f"{op} that fits the episode's state", op), src="actuator",
                                 seq=request.seq, op=op)
        if late:
            time.sleep(2.5)  # well past the client's timeout (1 s): this reply is lost
        return Message(kind=KIND_REPLY, seq=request.seq, meta={"op": op, **meta})


def test_drive_takes_a_start_and_a_stop_whose_replies_were_lost(streams: TwoStreams) -> None:
    """A start whose reply came too late started the episode: the retry is refused ('already running'), and the
    episode that runs is the pass's (it used to retry start until --timeout-s). Likewise a stop."""
    endpoint = streams.config.actuator.control_endpoint
    actuator = LosingActuator(endpoint)
    actuator.start()
    control = ActuatorClient(SocketFactory(), endpoint, client="test", timeout_s=1.0, retries=1)
    try:
        deadline = time.monotonic() + 30
        assert _start_when_ready(control, streams.recorder, deadline) == 4
        _stop(control, deadline)
    finally:
        control.close()
        actuator.close()
    assert actuator.running is None
    # Each op retried (how often depends on the timing), then refused once and checked with the status.
    assert actuator.ops[0] == "start" and actuator.ops.count("status") == 2 and actuator.ops[-1] == "status"


# ---------------------------------------------------------------------------------------------- real nodes


@pytest.fixture(scope="module")
def lift_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full-size (480x640, what the tiny checkpoint's contract says) but short lift demo episodes."""
    config = load_config(REPO_ROOT / "configs" / "lift.yaml")
    return generate_demo_dataset(config, tmp_path_factory.mktemp("eval-data") / "lift-demo",
                                 DemoSpec(episodes=2, frames=FRAMES, codec="h264"))


@pytest.fixture(scope="module")
def policy_node(tiny_checkpoint, lift_dataset: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Path]:
    config_path = write_config(tmp_path_factory.mktemp("eval-policy"), "lift", {
        # Two denoising steps: the numbers only need to be reproducible, not good, and CPU time is scarce.
        "policy": {"checkpoint": str(tiny_checkpoint("lift", "diffusion")), "timeout_s": 60.0,
                   "num_inference_steps": 2},
        "player": {"dataset": str(lift_dataset), "episodes": [0]},
        # No rest move after stop: in lockstep the actuator only ticks when the player publishes.
        "arms": {"main": {"rest_pose": []}},
    })
    node = NodeProcess("policy", config_path).start()
    POLICY_NODES[config_path] = node
    try:
        node.wait_ready(300)
        yield config_path
    finally:
        node.stop()


def test_predict_path_gives_the_same_numbers_in_process_and_from_the_cli(policy_node: Path, tmp_path: Path) -> None:
    config = load_config(policy_node)
    report, traces = evaluate_predictions(config, episodes=[1])
    assert [e.episode_index for e in report.episodes] == [1]
    for episode in report.episodes:
        assert episode.frames == FRAMES and len(episode.mae) == 6
        # Every frame's chunk has 8 rows; rows past the episode end are not scored.
        assert episode.compared == sum(min(8, FRAMES - i) for i in range(FRAMES))
        assert len(episode.horizon_mae) == 8 and all(np.isfinite(episode.mae))
    assert traces[0].truth.shape == (FRAMES, 6) and not np.isnan(traces[0].predicted).any()

    # A second run (another process, the CLI) resets and reseeds the session: identical numbers.
    output = tmp_path / "eval"
    result = subprocess.run([PYTHON, "-m", "common.tools.offline_eval", "predict", "--config", str(policy_node),
                             "--output", str(output), "--episodes", "1"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((output / "offline_eval.json").read_text())
    assert [e["mae"] for e in saved["episodes"]] == [e.mae for e in report.episodes]
    assert (output / "offline_eval.png").stat().st_size > 10_000


def test_a_run_that_gives_up_writes_what_it_scored_and_logs_a_line_per_episode(policy_node: Path,
                                                                              tmp_path: Path) -> None:
    """The policy stops answering (SIGSTOP) after episode 0 was scored: the run ends with exit 1 and an error,
    and offline_eval.json holds episode 0, marked incomplete. Its stderr is a file, not a terminal: no
    progress-bar redraws, a line per episode."""
    output, log_path = tmp_path / "eval", tmp_path / "offline_eval.log"
    policy = POLICY_NODES[policy_node]
    with log_path.open("w") as log_file:
        run = subprocess.Popen([PYTHON, "-m", "common.tools.offline_eval", "predict", "--config", str(policy_node),
                                "--output", str(output), "--episodes", "0", "1", "--attempts", "2",
                                "--policy.timeout_s=2"], cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "episode 0: mean MAE" in log_path.read_text() or run.poll() is not None, timeout_s=240,
                     interval_s=0.05, message="episode 0 was never scored")
            assert policy.proc is not None
            policy.proc.send_signal(signal.SIGSTOP)
            try:
                returncode = run.wait(timeout=120)
            finally:
                policy.proc.send_signal(signal.SIGCONT)
        finally:
            if run.poll() is None:
                run.kill()
    text = log_path.read_text()
    assert returncode == 1, text[-3000:]
    assert "\r" not in text  # no progress bar in a log file
    assert "did not answer" in text and "INCOMPLETE" in text
    saved = json.loads((output / "offline_eval.json").read_text())
    assert saved["complete"] is False and "did not answer" in saved["incomplete"]
    assert saved["episodes"][0]["episode_index"] == 0 and saved["episodes"][0]["complete"] is True
    assert saved["episodes"][0]["compared"] == sum(min(8, FRAMES - i) for i in range(FRAMES))
    assert all(e["compared"] > 0 for e in saved["episodes"]) and np.isfinite(saved["overall_mean_mae"])
    assert (output / "offline_eval.png").stat().st_size > 10_000


def test_lockstep_pipeline_scores_the_same_error_twice(policy_node: Path, tmp_path: Path,
                                                       node_processes: list[NodeProcess]) -> None:
    # Player and actuator on the policy node's config (same endpoints and run dir), both in lockstep;
    # the actuator only logs its commands (dry run), the player follows the actuator's episodes.
    common = ["--actuator.lockstep=true", "--actuator.dry_run=true", "--player.mode=lockstep",
              "--player.follow_episodes=true", "--player.loop=true", "--player.episodes=[0]"]
    config = load_config(policy_node, common)
    recorder = ExecutedRecorder(config)  # connected before anything plays
    actuator = NodeProcess("actuator", policy_node, args=common).start()
    node_processes.append(actuator)
    player = NodeProcess("dataset_player", policy_node, args=common).start()
    node_processes.append(player)
    try:
        actuator.wait_ready(180)
        player.wait_ready(180)
        report, traces = evaluate_executed(config, count=2, drive=True, timeout_s=240, recorder=recorder)
    finally:
        recorder.close()
    assert isinstance(report, EvalReport) and report.mode == "executed"
    first, second = report.episodes
    assert (first.episode_index, first.run, second.episode_index, second.run) == (0, 0, 0, 1)
    assert first.compared == second.compared == FRAMES, "every frame was executed once"
    assert first.holds == 0 and np.all(np.isfinite(first.mae))
    assert first.mae == second.mae and first.rmse == second.rmse
    np.testing.assert_array_equal(traces[0].predicted, traces[1].predicted)
    # The executed targets are the policy's, not the recorded actions replayed.
    assert first.mean_mae > 0
