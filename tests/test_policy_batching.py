"""Cross-session batching in the policy runtime: a batch gives each session the chunk it gets alone.

The node-level behaviour (real processes, many clients, floods and bad requests) is in
tests/test_policy_batching_node.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_policy_runtime import make_runtime, observation

from nodes.policy.runtime import BatchItem, ChunkResult, PolicyRuntime
from nodes.policy.speed import batch_bucket, pad_rows

# Batched CPU kernels (convolutions, matrix products) sum in another order than at batch 1, and a 100-step
# DDPM loop carries the float32 rounding along: a batch row agrees with the same request alone to this
# tolerance, in robot units (degrees or the -100..100 range; one STS3215 servo step is 0.088 degrees). Measured
# on the tiny checkpoints: at most 5e-4 (diffusion, DDPM 100 steps), 3e-5 (ACT).
BATCH_ATOL = 5e-3


def alone(runtime: PolicyRuntime, client: str, messages: list) -> list[np.ndarray]:
    runtime.reset(client)
    return [runtime.infer(client, msg).actions for msg in messages]


def batched(runtime: PolicyRuntime, clients: list[str], per_client: dict[str, list]) -> dict[str, list[np.ndarray]]:
    """Each step one batch of every client's next observation."""
    for client in clients:
        runtime.reset(client)
    out: dict[str, list[np.ndarray]] = {client: [] for client in clients}
    for step in range(len(per_client[clients[0]])):
        items = [BatchItem(client, runtime.check(per_client[client][step])) for client in clients]
        for client, result in zip(clients, runtime.infer_batch(items), strict=True):
            assert isinstance(result, ChunkResult), result
            assert result.batch_size == len(clients)
            out[client].append(result.actions)
    return out


@pytest.mark.parametrize("policy_type", ["diffusion", "act"])
def test_a_batch_gives_each_session_its_chunk_alone(policy_type: str, tiny_checkpoint, tmp_path: Path) -> None:
    task = "lift" if policy_type == "diffusion" else "sort"
    runtime = make_runtime(tmp_path, tiny_checkpoint(task, policy_type), task)
    clients = [f"robot-{index}" for index in range(4)]
    per_client = {client: [observation(runtime.config, 10 * index + step) for step in range(3)]
                  for index, client in enumerate(clients)}
    reference = {client: alone(runtime, client, per_client[client]) for client in clients}
    together = batched(runtime, clients, per_client)
    for client in clients:
        for step, (mine, theirs) in enumerate(zip(together[client], reference[client], strict=True)):
            np.testing.assert_allclose(mine, theirs, rtol=0, atol=BATCH_ATOL, err_msg=f"{client} step {step}")
    # Sessions differ (their own seeds and observations): no row is another session's.
    assert not np.allclose(together[clients[0]][0], together[clients[1]][0])


def test_a_failing_request_fails_alone_and_leaves_its_session_as_it_was(tiny_checkpoint, tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, tiny_checkpoint("lift", "diffusion"))
    good, bad = observation(runtime.config, 1), observation(runtime.config, 2)
    reference = alone(runtime, "robot-good", [good])
    runtime.reset("robot-good")
    runtime.reset("robot-bad")
    bad_obs = runtime.check(bad)
    bad_obs.state = bad_obs.state[:3]  # past the checks: the model call itself fails for this row
    results = runtime.infer_batch([BatchItem("robot-good", runtime.check(good)), BatchItem("robot-bad", bad_obs)])
    assert isinstance(results[0], ChunkResult) and isinstance(results[1], Exception)
    np.testing.assert_allclose(results[0].actions, reference[0], rtol=0, atol=BATCH_ATOL)
    # The failed request moved neither its session's history nor its noise on.
    assert alone(runtime, "robot-bad", [bad])[0].shape == (8, 6)
    session = runtime.sessions.get("robot-bad")
    assert session.requests == 1


def test_batch_buckets_and_padding() -> None:
    import torch

    assert [batch_bucket(size) for size in (1, 2, 3, 5, 9, 16, 17, 64, 65)] == [1, 2, 4, 8, 16, 16, 32, 64, 65]
    padded = pad_rows(torch.arange(6.0).reshape(3, 2), 4)
    assert padded.tolist() == [[0, 1], [2, 3], [4, 5], [4, 5]]


def test_make_status_shows_the_policy_capacity_line() -> None:
    from common.supervisor_client import describe_capacity

    line = describe_capacity({"chunks_per_s": 118.5, "batch_mean": 3.9, "batch_max": 8, "max_batch": 16,
                              "queue_ms_p99": 12.5, "superseded": 0, "refused_busy": 1})
    assert line == "118.5 chunks/s, batch mean 3.9 max 8/16, queue wait p99 12.5 ms, superseded 0, busy 1"
    line = describe_capacity({"chunks_per_s": 118.5, "sessions": 4, "batch_mean": 3.9, "batch_max": 8, "max_batch": 16,
                              "queue_ms_p99": 12.5, "model_busy": 0.853, "superseded": 0, "refused_busy": 1})
    assert line == ("118.5 chunks/s from 4 sessions, batch mean 3.9 max 8/16, queue wait p99 12.5 ms, model thread "
                    "busy 85 %, superseded 0, busy 1")


@pytest.mark.parametrize("policy_type", ["smolvla", "pi0", "pi05"])
def test_a_language_policy_batches_with_each_sessions_instruction_and_noise(policy_type: str, tiny_checkpoint,
                                                                         tmp_path: Path, monkeypatch) -> None:
    """SmolVLA / pi0 / pi0.5 on LeRobot's plain path: a batch of sessions with different instructions gives each
    the chunk it gets alone (its own instruction's tokens, its own seeded noise); an rtc request in the batch runs its
    row alone (LeRobot's real-time chunking takes one prefix per call) and still gets its chunk."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runtime = make_runtime(tmp_path, tiny_checkpoint("lift", policy_type), max_batch=4)
    assert runtime.max_batch == 4
    instructions = ["pick up the cube", "put the cube in the bowl", "open the gripper"]
    clients = [f"robot-{index}" for index in range(3)]
    per_client = {}
    for index, client in enumerate(clients):
        messages = [observation(runtime.config, 10 * index + step) for step in range(2)]
        for message in messages:
            message.meta["instruction"] = instructions[index]
        per_client[client] = messages
    reference = {client: alone(runtime, client, per_client[client]) for client in clients}
    together = batched(runtime, clients, per_client)
    for client in clients:
        for step, (mine, theirs) in enumerate(zip(together[client], reference[client], strict=True)):
            np.testing.assert_allclose(mine, theirs, rtol=0, atol=BATCH_ATOL, err_msg=f"{client} step {step}")
    # Same observation, another instruction: another chunk (the rows did not share one instruction).
    runtime.reset("robot-x")
    runtime.reset("robot-y")
    same = observation(runtime.config, 5)
    other = observation(runtime.config, 5)
    same.meta["instruction"], other.meta["instruction"] = instructions[0], instructions[1]
    first, second = runtime.infer_batch([BatchItem("robot-x", runtime.check(same)),
                                         BatchItem("robot-y", runtime.check(other))])
    assert isinstance(first, ChunkResult) and isinstance(second, ChunkResult)
    assert not np.allclose(first.actions, second.actions)
    if runtime.rtc_max_rows:
        prefix = np.ascontiguousarray(reference[clients[0]][0][:4])
        with_rtc = observation(runtime.config, 3)
        with_rtc.meta.update({"instruction": instructions[0], "rtc_delay_rows": 2})
        with_rtc.arrays["rtc_prefix"] = prefix
        runtime.reset("robot-rtc")
        runtime.reset("robot-plain")
        expected = runtime.infer("robot-rtc", with_rtc).actions
        runtime.reset("robot-rtc")
        mixed = runtime.infer_batch([BatchItem("robot-rtc", runtime.check(with_rtc)),
                                     BatchItem("robot-plain", runtime.check(per_client[clients[1]][0]))])
        assert all(isinstance(result, ChunkResult) for result in mixed)
        np.testing.assert_allclose(mixed[0].actions, expected, rtol=0, atol=BATCH_ATOL)
