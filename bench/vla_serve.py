"""SmolVLA, pi0 and pi0.5 served end to end by the policy node: chunk round trips over the real socket.

    python -m bench.vla_serve --device cuda --size default --types smolvla,pi0,pi05 --out DIR

For each type: build a random-weight checkpoint with ``common.tools.checkpoint_maker`` (its tokenizer and, for
SmolVLA, its VLM config made locally), start the real policy node (``python -m nodes.policy``, HF_HUB_OFFLINE)
on ``configs/lift.yaml`` (two 480x640 cameras, 6 joints), and send ``--requests`` infer requests from a
``PolicyClient`` with raw uint8 frames and an instruction (two instructions, alternating), one at a time after
the node's own warm-up. Recorded per type: seconds to build the checkpoint and to the node's readiness, the
client's round trip (p50, p90, min) and the node's ``inference_s`` and ``total_s`` (p50); whether another
instruction changes the chunk and the same one replays it (after a reset: the same session noise); one
``overlap: rtc`` request (a prefix of 10 rows, 4 frozen) to show LeRobot's real-time chunking runs on the card.
This is LeRobot's plain path inside the node (issue 20); the fast path (issue 21) is timed by bench/vla_gpu.py.

Results: ``DIR/vla-serve.jsonl`` (one object per type, written as it comes), ``DIR/vla-serve.md`` (table).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import write_config
from common.config import REPO_ROOT, load_config
from common.wire.policy_client import PolicyClient
from common.wire.transport import SocketFactory

log = logging.getLogger("bench.vla_serve")
INSTRUCTIONS = ("pick up the red cube and put it in the box", "stack the blue cube on the green cube")


def build(policy_type: str, size: str, device: str, work: Path) -> tuple[Path, float]:
    # In a child process: the parent never imports torch, and the builder's memory is gone before the node loads.
    started = time.monotonic()
    output = work / f"ckpt-{policy_type}"
    subprocess.run([sys.executable, "-m", "common.tools.checkpoint_maker", "--config", str(REPO_ROOT / "configs" /
                    "lift.yaml"), "--policy-type", policy_type, "--size", size, "--device", device, "--output",
                    str(output)], check=True, cwd=REPO_ROOT)
    return output / "pretrained_model", time.monotonic() - started


def serve(policy_type: str, checkpoint: Path, device: str, requests: int, work: Path,
          speed: dict[str, Any] | None = None) -> dict[str, Any]:
    folder = work / f"node-{policy_type}"
    folder.mkdir(parents=True, exist_ok=True)
    config_path = write_config(folder, "lift", {"policy": {"checkpoint": str(checkpoint), "device": device,
                                                           "warmup": 2, "cpu_threads": 0, **(speed or {})}})
    config = load_config(config_path)
    ready = Path(config.run_dir) / "ready" / "policy.json"
    log_path = folder / "policy.log"
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        node = subprocess.Popen([sys.executable, "-m", "nodes.policy", "--config", str(config_path)], cwd=REPO_ROOT,
                                stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        while not ready.exists():
            if node.poll() is not None:
                raise RuntimeError(f"policy node exited {node.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() - started > 400:
                raise RuntimeError(f"policy node not ready after 400 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        ready_s = time.monotonic() - started
        client = PolicyClient(SocketFactory(), config.policy.endpoint, client_id="bench", timeout_s=120, retries=1)
        contract = client.metadata()
        rng = np.random.default_rng(0)
        images = {name: rng.integers(0, 256, (cam.height, cam.width, 3), dtype=np.uint8)
                  for name, cam in config.cameras.items()}
        lower, upper = np.array(config.lower_limits()), np.array(config.upper_limits())
        state = rng.uniform(lower, upper).astype(np.float32)
        round_trips, inference, total = [], [], []
        chunks = []
        for index in range(requests):
            reply = client.infer(images, state, obs_t=float(index), instruction=INSTRUCTIONS[index % 2])
            round_trips.append(reply.round_trip_s)
            inference.append(reply.timings["inference_s"])
            total.append(reply.timings["total_s"])
            chunks.append(reply.actions)
        # The instruction reaches the model: after a reset (the session's noise reseeded) the same observation with
        # another instruction gives another chunk, and with the same instruction the same chunk again.
        told = []
        for text in (INSTRUCTIONS[0], INSTRUCTIONS[1], INSTRUCTIONS[0]):
            client.reset()
            told.append(client.infer(images, state, obs_t=0.0, instruction=text).actions)
        instruction_gap = float(np.abs(told[0] - told[1]).max())
        replay_gap = float(np.abs(told[0] - told[2]).max())
        prefix = np.ascontiguousarray(chunks[-1][2:12])
        rtc = client.infer(images, state, obs_t=float(requests), instruction=INSTRUCTIONS[0], rtc_prefix=prefix,
                           rtc_delay_rows=4)
        rtc_gap = float(np.abs(rtc.actions[:4] - prefix[:4]).mean())
        client.close()
        weights = checkpoint / "model.safetensors"
        return {
            "policy_type": policy_type, "device": contract.device, "chunk": list(chunks[0].shape),
            "takes_instruction": contract.takes_instruction, "extra": contract.extra,
            "weights_gb": round(weights.stat().st_size / 1e9, 2), "ready_s": round(ready_s, 1),
            "requests": requests,
            "round_trip_ms": {"p50": 1000 * statistics.median(round_trips),
                              "p90": 1000 * float(np.percentile(round_trips, 90)), "min": 1000 * min(round_trips)},
            "inference_ms_p50": 1000 * statistics.median(inference), "total_ms_p50": 1000 * statistics.median(total),
            "rtc_round_trip_ms": 1000 * rtc.round_trip_s, "rtc_frozen_rows_mean_abs_gap": rtc_gap,
            "other_instruction_max_diff": instruction_gap, "same_instruction_replay_max_diff": replay_gap,
            "startup_line": next((line for line in log_path.read_text().splitlines() if "start-up:" in line), ""),
        }
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()


def markdown(rows: list[dict[str, Any]], card: str) -> str:
    lines = [f"card: {card}", "",
             "| policy | weights | chunk | node ready | round trip p50 / p90 / min | node inference p50 "
             "| node total p50 | rtc request | other instruction / replay max diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['policy_type']} | failed: {row['error'][:200]} | | | | | | | |")
            continue
        rt = row["round_trip_ms"]
        lines.append(f"| {row['policy_type']} | {row['weights_gb']} GB | {row['chunk'][0]}x{row['chunk'][1]} | "
                     f"{row['ready_s']} s | {rt['p50']:.1f} / {rt['p90']:.1f} / {rt['min']:.1f} ms | "
                     f"{row['inference_ms_p50']:.1f} ms | {row['total_ms_p50']:.1f} ms | "
                     f"{row['rtc_round_trip_ms']:.1f} ms | {row['other_instruction_max_diff']:.3g} / "
                     f"{row['same_instruction_replay_max_diff']:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="default", choices=("tiny", "default"))
    parser.add_argument("--types", default="smolvla,pi0,pi05")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--fast", action="store_true", help="the node's VLA fast path: policy.dtype bf16, cuda_graphs")
    parser.add_argument("--work", default="/tmp/armpipe-vla-serve")
    parser.add_argument("--out", default="/tmp/armpipe-vla-serve/out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = "cpu"
    if args.device == "cuda":
        card = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, check=False).stdout.strip()
    rows: list[dict[str, Any]] = []
    for policy_type in args.types.split(","):
        try:
            checkpoint, build_s = build(policy_type, args.size, args.device, work)
            row = serve(policy_type, checkpoint, args.device, args.requests, work,
                        {"dtype": "bf16", "cuda_graphs": True} if args.fast else None)
            row["build_s"] = round(build_s, 1)
            row["card"] = card
            shutil.rmtree(checkpoint.parent, ignore_errors=True)  # 8 GB each for pi0 / pi0.5
        except Exception as exc:  # one type failing must not lose the others' numbers
            log.exception("%s failed", policy_type)
            row = {"policy_type": policy_type, "error": f"{type(exc).__name__}: {exc}", "card": card}
        rows.append(row)
        log.info("RESULT %s", json.dumps(row))
        with (out / "vla-serve.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        (out / "vla-serve.md").write_text(markdown(rows, card))
    log.info("\n%s", markdown(rows, card))


if __name__ == "__main__":
    main()
