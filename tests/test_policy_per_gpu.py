"""Beyond one card, as docs/operations.md ("Capacity", "Beyond one card") says to run it: one policy process per
GPU, each under its own supervisord (role ``server``) with its own deployment file (its ``policy.bind`` port and
``run_dir``), its own ``ARMPIPE_RUN`` and supervisord port, and ``CUDA_VISIBLE_DEVICES`` naming its card; robots
spread by their ``policy.endpoint``. On this CPU machine the variable only travels: the test checks that each
policy process has its own in its environment, that both serve their robots, and that stopping one leaves the
other serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, write_config
from test_policy_node import SMALL, observation

from bench.harness import Supervised
from common.config import load_config
from common.tools.checkpoint_maker import build_checkpoint
from common.wire.policy_client import PolicyClient
from common.wire.transport import PeerUnavailable, SocketFactory

pytestmark = pytest.mark.timeout(900)


def environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_one_policy_process_per_gpu_under_supervisord(tmp_path: Path) -> None:
    small = {"cameras": {"front": SMALL, "wrist": SMALL}}
    checkpoint = build_checkpoint(load_config(write_config(tmp_path, "lift", small)), tmp_path / "checkpoint",
                                  policy_type="diffusion", size="tiny")
    servers: list[Supervised] = []
    try:
        for gpu in (0, 1):
            folder = tmp_path / f"gpu{gpu}"
            folder.mkdir()
            config_path = write_config(folder, "lift", {**small, "policy": {
                "checkpoint": str(checkpoint), "cpu_threads": 1, "timeout_s": 20.0}})
            config = load_config(config_path)
            server = Supervised("server", "lift", config_path, config.resolve(config.run_dir), free_port())
            server.env["CUDA_VISIBLE_DEVICES"] = str(gpu)
            servers.append(server.start())
        for server in servers:
            server.wait_all_ready(timeout_s=240)
        chunks = []
        for gpu, server in enumerate(servers):
            policy = server.process("policy")
            assert environment(policy.pid)["CUDA_VISIBLE_DEVICES"] == str(gpu)
            robot = PolicyClient(SocketFactory(), server.config.policy.endpoint, client_id=f"robot-{gpu}",
                                 timeout_s=20.0, retries=1)
            chunks.append(robot.infer(*observation(server.config, 7), obs_t=1.0).actions)
            robot.close()
        assert chunks[0].shape == chunks[1].shape and np.all(np.isfinite(chunks))
        assert servers[0].config.policy.endpoint != servers[1].config.policy.endpoint

        # The servers are independent: one stopped, the other one's robots still get chunks.
        servers[0].shutdown()
        robot = PolicyClient(SocketFactory(), servers[1].config.policy.endpoint, client_id="robot-1",
                             timeout_s=20.0, retries=1)
        assert robot.infer(*observation(servers[1].config, 8), obs_t=2.0).actions.shape == chunks[1].shape
        robot.close()
        gone = PolicyClient(SocketFactory(), servers[0].config.policy.endpoint, client_id="robot-0",
                            timeout_s=1.0, retries=1)
        with pytest.raises(PeerUnavailable):
            gone.ping()
        gone.close()
    finally:
        for server in servers:
            server.shutdown()
