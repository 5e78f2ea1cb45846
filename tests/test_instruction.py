"""The actuator's side of the task instruction (issue 20, item 3), with the real actuator process.

The policy is played by the test (``test_lying_peer.FakePolicy``, the protocol as docs/protocol.md says it)
advertising ``takes_instruction``, and it records the ``meta.instruction`` of every infer request. Sensors
come from ``SensorFeed`` publishers; under ``instruction_source: dataset`` their states carry the dataset
player's ``meta.task``.

- No instruction: refused at the contract check naming ``actuator.instruction``; the control socket's
  ``instruction`` op ends the refusal, and every request then carries it.
- The op is refused during an episode and for a bad text (``meta.text``); ``status`` and ``episode_start``
  carry the instruction; a new one set between episodes goes out with the next episode's requests.
- ``instruction_source: dataset``: the requests carry the task of the states, and follow when it changes;
  with the real dataset player replaying a demo dataset, its episodes' task reaches the policy.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import NodeProcess, wait_for, write_config
from test_actuator import EventTap, SensorFeed, ready_detail, start_actuator
from test_lying_peer import FakePolicy, fast_config

from common.config import DeploymentConfig, load_config
from common.wire.actuator_client import ActuatorClient
from common.wire.protocol import Message
from common.wire.transport import RemoteError, SocketFactory


class TaskFeed(SensorFeed):
    """A SensorFeed whose states carry ``meta.task``, as the dataset player's do."""

    def __init__(self, config: DeploymentConfig, task: object) -> None:
        super().__init__(config, hz=30)
        self.task = task

    def publish_once(self, frame_index: int | None = None) -> None:
        t = time.monotonic()
        for name, pub in self.cameras.items():
            pub.publish(Message(kind="frame", t=t, meta={"camera": name, "source": "dataset"},
                                arrays={"image": self.images[name]}))
        for name, pub in self.arms.items():
            pub.publish(Message(kind="state", t=t, meta={"arm": name, "names": self.config.arms[name].joint_names(),
                                                         "source": "dataset", "task": self.task},
                                arrays={"position": self.position.astype(np.float32)}))


class Setup:
    def __init__(self, tmp_path: Path, node_processes: list[NodeProcess], actuator: dict[str, Any],
                 task: object = None) -> None:
        self.config_path = fast_config(tmp_path, actuator)
        self.config = load_config(self.config_path)
        self.policy = FakePolicy(self.config)
        self.policy.contract = dataclasses.replace(self.policy.contract, takes_instruction=True)
        self.feed = (TaskFeed(self.config, task) if task is not None else SensorFeed(self.config, hz=30)).start()
        self.tap = EventTap(self.config)
        self.client = ActuatorClient(SocketFactory(), self.config.actuator.control_endpoint, client="test",
                                     timeout_s=3.0, retries=1)
        self.actuator = start_actuator(node_processes, self.config_path).wait_ready(60)
        # The tap's SUB connected before the actuator bound: wait until it hears the actuator (ticks), so that no
        # event of the test is published before the subscription is up.
        wait_for(lambda: self.tap.actions(), 30, message="the event tap never heard the actuator")

    def instructions_since(self, since: float) -> list[object]:
        return [msg.meta.get("instruction") for arrived, msg in list(self.policy.infers) if arrived >= since]

    def wait_instruction(self, text: str, since: float) -> None:
        wait_for(lambda: text in self.instructions_since(since), 30,
                 message=f"no request carried {text!r}: {self.instructions_since(since)[-5:]}\n"
                         f"{self.actuator.log()[-2000:]}")

    def close(self) -> None:
        self.client.close()
        self.tap.close()
        self.feed.close()
        self.policy.close()


@pytest.fixture
def setups() -> Any:
    made: list[Setup] = []
    yield made
    for setup in made:
        setup.close()


def test_a_language_policy_gets_the_instruction_and_the_control_socket_changes_it_between_episodes(
        tmp_path: Path, node_processes: list[NodeProcess], setups: list[Setup]) -> None:
    setup = Setup(tmp_path, node_processes, {"instruction": ""})
    setups.append(setup)
    client = setup.client

    # No instruction for a language policy: refused at the contract check, naming the field.
    detail = ready_detail(setup.actuator)
    assert detail["contract"] == "mismatch", detail
    assert any("actuator.instruction" in difference for difference in detail["differences"]), detail
    assert "actuator.instruction" in detail["refusing"]
    with pytest.raises(RemoteError, match=r"actuator\.instruction"):
        client.send("start")

    # Bad texts are refused naming meta.text; the actuator keeps serving.
    for bad in (7, "", "   ", "x" * 600):
        with pytest.raises(RemoteError) as refused:
            client.send("instruction", text=bad)
        assert refused.value.field == "meta.text", refused.value
    with pytest.raises(RemoteError) as missing:
        client.send("instruction")
    assert missing.value.field == "meta.text" and "missing" in str(missing.value)

    # Set between episodes: the refusal ends, status and the next episode's requests carry it.
    reply = client.set_instruction("pick up the red cube")
    assert reply.meta["instruction"] == "pick up the red cube" and reply.meta["instruction_source"] == "config"
    wait_for(lambda: ready_detail(setup.actuator)["contract"] == "ok", 10, message="the refusal did not end")
    status = client.send("status").meta
    assert status["contract_ok"] and status["instruction"] == "pick up the red cube"
    started = time.monotonic()
    client.send("start")
    setup.wait_instruction("pick up the red cube", started)
    assert set(setup.instructions_since(started)) == {"pick up the red cube"}
    start_event = wait_for(lambda: setup.tap.events("episode_start"), 10)
    assert start_event[-1].meta["instruction"] == "pick up the red cube"

    # Not during an episode.
    with pytest.raises(RemoteError) as running:
        client.set_instruction("put it back")
    assert running.value.field == "meta.op" and "between episodes" in str(running.value)
    assert client.send("status").meta["instruction"] == "pick up the red cube"

    # Stop, change it, start again: the new episode's requests carry the new one, and only it.
    client.send("stop")
    wait_for(lambda: client.send("status").meta["state"] == "idle", 30, message="the episode did not stop")
    assert client.set_instruction("put the cube in the box ✓").meta["instruction"] == "put the cube in the box ✓"
    events_before = len(setup.tap.events("episode_start"))
    second = time.monotonic()
    client.send("start")
    setup.wait_instruction("put the cube in the box ✓", second)
    starts = wait_for(lambda: (s := setup.tap.events("episode_start")) and len(s) > events_before and s, 10)
    assert starts[-1].meta["instruction"] == "put the cube in the box ✓"
    time.sleep(0.5)
    infers = [msg for arrived, msg in list(setup.policy.infers) if arrived >= second]
    newest = [msg.meta.get("instruction") for msg in infers[-3:]]
    assert newest and set(newest) == {"put the cube in the box ✓"}, newest
    assert setup.tap.events("instruction")  # published for the panel and the recorder


def test_instruction_source_dataset_sends_the_players_task(
        tmp_path: Path, node_processes: list[NodeProcess], setups: list[Setup]) -> None:
    setup = Setup(tmp_path, node_processes, {"instruction": "", "instruction_source": "dataset"},
                  task="stack the red block on the blue block")
    setups.append(setup)
    assert ready_detail(setup.actuator)["contract"] == "ok"  # the player's task will come with the states
    started = time.monotonic()
    setup.client.send("start")
    setup.wait_instruction("stack the red block on the blue block", started)
    assert setup.client.send("status").meta["instruction"] == "stack the red block on the blue block"
    # The player moves to an episode with another task: the requests follow it.
    setup.feed.task = "sort the parts into the left and right bins"
    setup.wait_instruction("sort the parts into the left and right bins", time.monotonic())


def test_the_dataset_players_task_reaches_the_policy(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    """The real dataset player replaying a demo dataset: its episodes' task ("lift the cube") goes out with
    every request of an actuator whose instruction_source is dataset (and no instruction configured)."""
    from common.tools.demo_data import TASK_PROMPTS, DemoSpec, generate_demo_dataset

    cameras = {name: {"width": 96, "height": 64, "max_age_s": 0.5} for name in ("front", "wrist")}
    base = {"cameras": cameras, "arms": {"main": {"max_state_age_s": 0.5}},
            "actuator": {"dry_run": True, "refill_rows": 10, "max_chunk_age_s": 1.0, "instruction": "",
                         "instruction_source": "dataset"},
            "policy": {"timeout_s": 1.0, "retries": 1}}
    (tmp_path / "make").mkdir()
    config = load_config(write_config(tmp_path / "make", "lift", base))
    dataset = generate_demo_dataset(config, tmp_path / "lift-demo", DemoSpec(episodes=2, frames=60, width=96,
                                                                             height=64))
    config_path = write_config(tmp_path, "lift", {**base, "player": {"dataset": str(dataset), "loop": True}})
    config = load_config(config_path)
    policy = FakePolicy(config)
    policy.contract = dataclasses.replace(policy.contract, takes_instruction=True)
    client = ActuatorClient(SocketFactory(), config.actuator.control_endpoint, client="test", timeout_s=3.0,
                            retries=1)
    try:
        player = NodeProcess("dataset_player", config_path).start()
        node_processes.append(player)
        player.wait_ready(120)
        actuator = start_actuator(node_processes, config_path).wait_ready(60)
        assert ready_detail(actuator)["contract"] == "ok"
        started = time.monotonic()
        client.send("start")
        wait_for(lambda: any(arrived >= started for arrived, _ in list(policy.infers)), 60,
                 message=f"no request reached the policy:\n{actuator.log()[-3000:]}")
        sent = {msg.meta.get("instruction") for arrived, msg in list(policy.infers) if arrived >= started}
        assert sent == {TASK_PROMPTS["lift"]}, sent
        assert client.send("status").meta["instruction"] == TASK_PROMPTS["lift"]
    finally:
        client.close()
        policy.close()
