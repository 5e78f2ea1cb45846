"""Door 2 of issue 24: armpipe's robot side on an openpi-compatible server (``policy.backend: openpi``).

The server is ``bench.harness.OpenpiStandIn``, which serves as openpi's ``serve_policy`` does (its
``WebsocketPolicyServer``'s framing and metadata); the actuator is the real process. The lying-peer tests
(tests/test_lying_peer.py) run against this backend as well, D10 with emulated servos; here: what the
backend itself must do (observations in the configured keys, latency compensation from the observation sent,
replace and blend, what the server cannot do refused or said once, the API key).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import NodeProcess, wait_for, write_config
from test_actuator import control, ready_detail
from test_lying_peer import CHUNK, Rig, good_reply
from websockets.sync.client import connect

from bench.harness import OpenpiStandIn
from common.config import load_config
from common.wire.protocol import Message
from common.wire.transport import RemoteError
from nodes.actuator.openpi_client import OpenpiPolicyClient, OpenpiServerError

SERVER_DELAY_S = 0.2  # the stand-in's "inference": rows meant for the first 0.2 s are stale on arrival


def ramp(request: Message, rows: np.ndarray) -> Message:
    time.sleep(SERVER_DELAY_S)
    steps = np.linspace(0.0, 10.0, len(rows), dtype=np.float32)[:, None]
    return good_reply(request, np.repeat(steps, rows.shape[1], axis=1))


@pytest.fixture
def rigs() -> Any:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close()


@pytest.mark.parametrize("overlap", ["replace", "blend"])
def test_chunks_from_an_openpi_server_run_with_latency_compensation_and_the_overlap_rule(
        tmp_path: Path, node_processes: list[NodeProcess], rigs: list[Rig], overlap: str) -> None:
    rig = Rig(tmp_path, node_processes, ramp, backend="openpi", actuator={"overlap": overlap, "refill_rows": 20})
    rigs.append(rig)
    assert ready_detail(rig.actuator)["contract"] == "ok"
    chunks = wait_for(lambda: [e for e in rig.tap.events("chunk") if e.meta["accepted"]][2:] or None, 20,
                      message=f"fewer than 3 chunks accepted:\n{rig.actuator.log()[-3000:]}")
    # Observations went out in openpi's flat layout with the config's default keys.
    _, obs = rig.policy.server.observations[0]  # type: ignore[union-attr]
    assert sorted(obs) == ["observation/front", "observation/state", "observation/wrist"]
    assert obs["observation/front"].shape == (48, 64, 3) and obs["observation/front"].dtype == np.uint8
    assert obs["observation/state"].dtype == np.float32 and obs["observation/state"].shape == (6,)
    # Timed from the observation sent: the rows whose time passed during the server's 0.2 s are dropped.
    for event in chunks:
        assert event.meta["dropped_stale"] >= int(SERVER_DELAY_S * 30) - 1, event.meta
        assert event.meta["timings"]["inference_s"] >= SERVER_DELAY_S * 0.9  # server_timing.infer_ms
    rule = "replaced" if overlap == "replace" else "blended"
    assert any(event.meta[rule] > 0 for event in chunks), [e.meta for e in chunks]
    executed = rig.executed()
    assert executed and all(m.meta["obs_t"] in {e.meta["obs_t"] for e in rig.tap.events("chunk")} for m in executed)
    # What the server cannot do is said once, at start.
    assert rig.actuator.log().count("an openpi server has no real-time chunking prefixes") == 1


@pytest.mark.parametrize(("actuator", "chunk_length", "expected"), [
    ({"overlap": "rtc"}, CHUNK, "actuator.overlap: rtc needs a policy that continues a prefix"),
    ({}, 0, "openpi.server.chunk_length: the server's metadata has no action_horizon"),
])
def test_what_the_server_cannot_give_is_refused_before_moving(
        tmp_path: Path, node_processes: list[NodeProcess], rigs: list[Rig], actuator: dict[str, Any],
        chunk_length: int, expected: str) -> None:
    rig = Rig(tmp_path, node_processes, backend="openpi", actuator=actuator, chunk_length=chunk_length, start=False)
    rigs.append(rig)
    wait_for(lambda: ready_detail(rig.actuator)["contract"] == "mismatch", 10,
             message=f"contract {ready_detail(rig.actuator)}:\n{rig.actuator.log()[-2000:]}")
    differences = control(rig.config, "status").meta["differences"]
    assert any(expected in text for text in differences), differences
    with pytest.raises(RemoteError, match="refusing to start"):
        control(rig.config, "start")
    time.sleep(1.0)
    assert rig.policy.infers == [] and rig.executed() == []


def test_the_client_sends_the_api_key_and_names_a_refusal(tmp_path: Path) -> None:
    server = OpenpiStandIn(lambda obs: {"actions": np.zeros((4, 6), np.float32)},
                           metadata={"action_horizon": 4, "fps": 30}, api_key="lab-key-1").start()
    try:
        (tmp_path / "api.key").write_text("lab-key-1\n")
        config_path = write_config(tmp_path, "lift", {"policy": {"backend": "openpi"}, "openpi": {"server": {
            "endpoint": server.url, "layout": "nested"}}})
        config = load_config(config_path)
        without = OpenpiPolicyClient(config)
        with pytest.raises(OpenpiServerError, match=r"HTTP 401 \(check openpi.server.api_key_file\)"):
            without.metadata()
        config = load_config(config_path, [f"--openpi.server.api_key_file={tmp_path / 'api.key'}"])
        client = OpenpiPolicyClient(config)
        contract = client.metadata()
        assert contract.chunk_length == 4 and contract.extra["rtc_max_prefix_rows"] == 0
        images = {name: np.zeros((480, 640, 3), np.uint8) for name in config.cameras}
        reply = client.infer(images, np.arange(6, dtype=np.float32), 12.5, instruction="lift the cube")
        assert reply.actions.shape == (4, 6) and reply.obs_t == 12.5 and reply.timings["total_s"] >= 0
        _, obs = server.observations[-1]
        assert sorted(obs["images"]) == ["front", "wrist"] and list(obs["states"]) == ["main"]
        assert obs["prompt"] == "lift the cube"
        client.close()
        # openpi's health check answers as openpi's does.
        with pytest.raises(Exception, match="200"):
            connect(f"{server.url}/healthz")
    finally:
        server.close()
