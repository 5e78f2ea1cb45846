"""What the arm feels at chunk boundaries: ``replace`` vs ``blend`` vs ``rtc``, in lockstep and in real
time with an injected round trip, side by side in one run.

The bench replays a demo dataset (``common.tools.demo_data``, the lift layout at 96x128) through the actuator's
own scheduling (``ChunkQueue`` + ``RefillPlanner``) and the policy node's own runtime (``PolicyRuntime``,
in process), with a DiffusionPolicy that it first trains for a few hundred steps on that dataset (tiny
size, LeRobot's ``DiffusionPolicy.forward`` loss, a plain AdamW loop over frames held in memory).

Time is simulated, so the injected round trip is exact and the CPU's own inference time does not
enter it: a request sent at tick ``i`` (observation = dataset frame ``i``, state = the dataset's state)
arrives ``round_trip`` later; in lockstep it arrives at once (the actuator waits for it). Observations
come from the dataset whatever the policy does (open loop, like the dataset player). Per run:

- ``acting``: share of ticks that executed a row (the rest hold);
- ``max_jump``: the largest joint change between consecutive commanded targets at a chunk boundary (the
  first tick that runs a row of a new chunk, and the two ticks after it), robot units (degrees);
  ``mean_jump`` its mean over boundaries; ``max_step``: the largest joint change anywhere;
- ``jerk``: mean |third difference| of the commanded targets times fps^3 (units/s^3), holds included;
- ``mae``: mean |target - dataset action| of the frame, over acting ticks.

Targets are the rows as the policy asked for them, before the actuator's safety filter (which would
clip steps above ``max_step`` and hide the jumps being measured).

rtc runs as the actuator does it: the request carries what ran, what is queued and then the previous
reply's guidance rows (``rtc_guide``), ``rtc_soft_rows`` after the frozen ones; the policy's
``rtc_guidance`` mask (exp) plus, at 100 ms, the other mask and rtc without guidance rows for comparison.

    python -m bench.chunk_overlap [--workdir /tmp/chunk_overlap] [--train-steps 600] [--episodes 4] [--soft-rows N]
        [--png docs/chunk_overlap.png] [--json /tmp/chunk_overlap.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import write_config
from common.config import DeploymentConfig, load_config
from common.wire.contract import RTC_DELAY_KEY, RTC_PREFIX_KEY, STATE_KEY, image_key
from common.wire.protocol import Message
from nodes.actuator.chunk_queue import ChunkQueue
from nodes.actuator.refill import RefillPlanner

log = logging.getLogger("bench.chunk_overlap")

RULES = ("replace", "blend", "rtc")
ROUND_TRIPS_MS = (0, 100, 300)
CAMERA = {"width": 128, "height": 96}
BLEND_OLD_WEIGHT = 0.5


@dataclass
class Episode:
    index: int
    images: dict[str, np.ndarray]  # camera -> (n, H, W, 3) uint8
    states: np.ndarray  # (n, D)
    actions: np.ndarray  # (n, D)

    @property
    def length(self) -> int:
        return len(self.states)


@dataclass
class RunResult:
    setting: str  # "lockstep" or "<ms> ms"
    rule: str
    rows: str  # policy.rows
    acting: float
    max_jump: float
    mean_jump: float
    max_step: float
    jerk: float
    mae: float
    chunks: int
    ticks: int
    warned: bool


# ------------------------------------------------------------------------------------------------ data


def prepare(workdir: Path, train_steps: int, seed: int = 0) -> tuple[Path, Path]:
    """The bench config (lift layout, 96x128 cameras) and a demo dataset; returns (config path, dataset)."""
    from common.tools.demo_data import DemoSpec, generate_demo_dataset

    workdir.mkdir(parents=True, exist_ok=True)
    dataset = workdir / "lift-demo"
    config_path = write_config(workdir, "lift", {"cameras": {"front": CAMERA, "wrist": CAMERA},
                                                 "player": {"dataset": str(dataset)},
                                                 "policy": {"checkpoint": str(workdir / "trained" / "pretrained_model"),
                                                            "cpu_threads": 1, "warmup": 0}})
    if not (dataset / "meta" / "info.json").exists():
        generate_demo_dataset(load_config(config_path), dataset, DemoSpec(episodes=4, frames=150, codec="h264",
                                                                          seed=seed), overwrite=True)
    return config_path, dataset


def load_episodes(config: DeploymentConfig, episodes: list[int] | None = None) -> list[Episode]:
    from common.dataset_source import DatasetSource

    source = DatasetSource(config, episodes=episodes)
    loaded = []
    for index in source.episodes:
        rows = source.episode(index)
        images = {camera: np.stack(list(source.camera_frames(index, camera)))[: rows.length]
                  for camera in config.cameras}
        loaded.append(Episode(index, images, rows.states.astype(np.float32), rows.actions.astype(np.float32)))
    return loaded


def train(config: DeploymentConfig, dataset: Path, episodes: list[Episode], output: Path, steps: int,
          seed: int = 0, batch_size: int = 16, lr: float = 1e-3) -> Path:
    """A tiny DiffusionPolicy (the checkpoint maker's, with the dataset's stats) trained ``steps`` steps."""
    import torch

    from common.tools.checkpoint_maker import SIDECAR_NAME, build_checkpoint
    from nodes.policy.checkpoint import load_lerobot_policy

    target = output / "pretrained_model"
    sidecar_path = target / SIDECAR_NAME
    if sidecar_path.exists() and json.loads(sidecar_path.read_text()).get("trained_steps") == steps:
        log.info("reusing %s (trained %d steps)", target, steps)
        return target
    build_checkpoint(config, output, policy_type="diffusion", size="tiny", dataset_root=dataset, seed=seed)
    _, policy, preprocessor, _ = load_lerobot_policy(target, torch.device("cpu"))
    cfg = policy.config
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=1e-6)
    rng = np.random.default_rng(seed)
    obs_offsets = np.arange(1 - cfg.n_obs_steps, 1)
    action_offsets = np.arange(1 - cfg.n_obs_steps, 1 - cfg.n_obs_steps + cfg.horizon)
    started = time.monotonic()
    losses: list[float] = []
    for step in range(steps):
        batch: dict[str, list[np.ndarray]] = {key: [] for key in (STATE_KEY, "action", "action_is_pad",
                                                                   *(image_key(c) for c in config.cameras))}
        for _ in range(batch_size):
            episode = episodes[int(rng.integers(len(episodes)))]
            frame = int(rng.integers(episode.length))
            obs = np.clip(frame + obs_offsets, 0, episode.length - 1)
            act = frame + action_offsets
            pad = (act < 0) | (act >= episode.length)
            act = np.clip(act, 0, episode.length - 1)
            batch[STATE_KEY].append(episode.states[obs])
            batch["action"].append(episode.actions[act])
            batch["action_is_pad"].append(pad)
            for camera in config.cameras:
                batch[image_key(camera)].append(episode.images[camera][obs])
        tensors: dict[str, Any] = {}
        for key, values in batch.items():
            array = np.stack(values)
            if key.startswith("observation.images."):
                tensors[key] = torch.from_numpy(array).permute(0, 1, 4, 2, 3).float() / 255
            else:
                tensors[key] = torch.from_numpy(array)
        loss, _ = policy.forward(preprocessor(tensors))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
        if step % 50 == 0 or step == steps - 1:
            log.info("train step %d/%d: loss %.4f (%.0f s)", step + 1, steps, float(np.mean(losses[-50:])),
                     time.monotonic() - started)
    policy.eval()
    policy.save_pretrained(target)
    sidecar = json.loads(sidecar_path.read_text())
    sidecar.update({"untrained": False, "trained_steps": steps, "final_loss": float(np.mean(losses[-50:])),
                    "training": f"bench.chunk_overlap: {steps} AdamW steps (lr {lr}, batch {batch_size}) on {dataset}"})
    sidecar_path.write_text(json.dumps(sidecar, indent=2))
    return target


# ------------------------------------------------------------------------------------------------ replay


def request(episode: Episode, frame: int, obs_t: float, client: str, prefix: np.ndarray | None = None,
            delay: int = 0) -> Message:
    arrays: dict[str, np.ndarray] = {image_key(camera): images[frame] for camera, images in episode.images.items()}
    arrays[STATE_KEY] = episode.states[frame]
    meta: dict[str, Any] = {"op": "infer", "client": client, "obs_t": obs_t}
    if prefix is not None and len(prefix):
        arrays[RTC_PREFIX_KEY] = np.ascontiguousarray(prefix, dtype=np.float32)
        meta[RTC_DELAY_KEY] = int(min(delay, len(prefix)))
    return Message(kind="request", meta=meta, arrays=arrays)


def replay(runtime: Any, episode: Episode, rule: str, round_trip_s: float | None, *, soft_rows: int = 4,
           fps: int = 30, guide: bool = True) -> tuple[RunResult, np.ndarray]:
    """One episode through the scheduler; ``round_trip_s`` None = lockstep. Returns the result and the
    commanded targets per tick (NaN before the first action). ``guide`` False: rtc without the policy's
    guidance rows (the prefix is only what ran and what is queued)."""
    lockstep = round_trip_s is None
    period = 1.0 if lockstep else 1.0 / fps
    latency = 0.0 if lockstep else float(round_trip_s)
    queue = ChunkQueue(period, rule, BLEND_OLD_WEIGHT, action_dim=episode.actions.shape[1])
    planner = RefillPlanner(period, fps, margin_rows=0 if lockstep else 1,
                            overlap_rows=soft_rows if rule == "rtc" and not lockstep else 0)
    planner.set_chunk_rows(runtime.contract.chunk_length)
    max_prefix = int(runtime.contract.extra.get("rtc_max_prefix_rows", 0))
    client = f"bench-{episode.index}"  # the same noise stream for every rule: only the rule differs
    runtime.reset(client)
    in_flight: tuple[float, float, np.ndarray, np.ndarray | None] | None = None  # (arrival, obs_t, chunk, guide)
    targets = np.full((episode.length, episode.actions.shape[1]), np.nan, dtype=np.float32)
    source = np.full(episode.length, -1.0)  # obs_t of the executed row's chunk (-1: hold)
    chunks = 0
    warned = False

    def send(tick: int, now: float) -> tuple[float, float, np.ndarray, np.ndarray | None]:
        nonlocal chunks, warned
        prefix, delay = None, 0
        if rule == "rtc" and max_prefix:
            delay = planner.delay_rows()
            prefix = queue.prefix(now, min(delay + soft_rows, max_prefix))
        result = runtime.infer(client, request(episode, tick, now, client, prefix, delay))
        chunks += 1
        notice = planner.record(latency)
        warned = warned or (notice is not None and not notice.covered)
        # rtc keeps the rows predicted after the chunk as guidance for the next request, as the actuator does.
        return now + latency, now, result.actions, result.guide if rule == "rtc" and guide else None

    for tick in range(episode.length):
        now = tick * period
        if lockstep and in_flight is None and queue.depth(now) <= planner.threshold():
            arrival, obs_t, chunk, guide_rows = send(tick, now)
            queue.insert(chunk, obs_t, arrival, guide_rows)
        if in_flight is not None and in_flight[0] <= now + 1e-9:
            queue.insert(in_flight[2], in_flight[1], in_flight[0], in_flight[3])
            in_flight = None
        popped = queue.pop(now)
        if popped is not None:
            targets[tick], source[tick] = popped[0], popped[2]
        elif tick:
            targets[tick] = targets[tick - 1]
        if not lockstep and in_flight is None and queue.depth(now) <= planner.threshold():
            in_flight = send(tick, now)
            if latency == 0.0:  # arrives before the next tick
                queue.insert(in_flight[2], in_flight[1], now, in_flight[3])
                in_flight = None
    return score(episode, targets, source, rule, "lockstep" if lockstep else f"{latency * 1000:.0f} ms", chunks,
                 warned, fps, runtime.config.policy.rows), targets


def score(episode: Episode, targets: np.ndarray, source: np.ndarray, rule: str, setting: str, chunks: int,
          warned: bool, fps: int, rows: str) -> RunResult:
    acting = source >= 0
    started = np.flatnonzero(acting)
    first = int(started[0]) if len(started) else episode.length
    steps = np.abs(np.diff(targets, axis=0))  # steps[t-1] = |target[t] - target[t-1]|
    boundary = np.zeros(episode.length, dtype=bool)
    previous_source = -1.0
    for tick in range(first, episode.length):
        if acting[tick]:
            boundary[tick] = tick > first and source[tick] != previous_source
            previous_source = source[tick]
    # A boundary's jump: the largest joint step at the switch tick and the two after it (a continued chunk
    # may move its discontinuity a row or two later; it must not escape the measure).
    switches = np.flatnonzero(boundary)
    jumps = (np.asarray([np.nanmax(steps[t - 1:t + 2]) for t in switches]) if len(switches) else np.zeros(1))
    valid = targets[first:]
    jerk = np.abs(np.diff(valid, n=3, axis=0)).mean() * fps ** 3 if len(valid) > 3 else math.nan
    mae = float(np.abs(targets[acting] - episode.actions[acting]).mean()) if acting.any() else math.nan
    return RunResult(setting=setting, rule=rule, rows=rows, acting=float(acting[first:].mean()) if first < len(acting)
                     else 0.0, max_jump=float(jumps.max()), mean_jump=float(jumps.mean()),
                     max_step=float(np.nanmax(steps[first:])) if first < len(steps) else 0.0, jerk=float(jerk), mae=mae,
                     chunks=chunks, ticks=episode.length - first, warned=warned)


def combine(results: list[RunResult]) -> RunResult:
    """Episodes of one (setting, rule, rows) combined: means, and the max of the max jump."""
    first = results[0]
    return RunResult(setting=first.setting, rule=first.rule, rows=first.rows,
                     acting=float(np.mean([r.acting for r in results])),
                     max_jump=max(r.max_jump for r in results),
                     mean_jump=float(np.mean([r.mean_jump for r in results])),
                     max_step=max(r.max_step for r in results),
                     jerk=float(np.mean([r.jerk for r in results])), mae=float(np.mean([r.mae for r in results])),
                     chunks=sum(r.chunks for r in results), ticks=sum(r.ticks for r in results),
                     warned=any(r.warned for r in results))


# ------------------------------------------------------------------------------------------------ output


def markdown(results: list[RunResult], machine: str, train_info: dict[str, Any]) -> str:
    lines = [f"Machine: {machine}. Checkpoint: tiny DiffusionPolicy (DDIM 10 steps, 8 rows per chunk, horizon 16) "
             f"trained {train_info.get('trained_steps')} steps on the lift demo data (final loss "
             f"{train_info.get('final_loss', float('nan')):.3f}); 30 Hz; round trip injected in simulated time.", "",
             "| round trip | rows | rule | acting | largest boundary jump | mean boundary jump | largest step | "
             "mean abs jerk | MAE vs dataset | chunks | warned |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.setting} | {r.rows} | {r.rule} | {r.acting * 100:.1f} % | {r.max_jump:.2f} | "
                     f"{r.mean_jump:.2f} | {r.max_step:.2f} | {r.jerk:.0f} | {r.mae:.2f} | {r.chunks} | "
                     f"{'yes' if r.warned else 'no'} |")
    return "\n".join(lines)


def plot(results: list[RunResult], traces: dict[str, dict[str, np.ndarray]], truth: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(f"{r.setting}\n{r.rows}" if r.rows != "n_action_steps" else r.setting
                                  for r in results))
    figure, axes = plt.subplots(2, 3, figsize=(16, 8), constrained_layout=True)
    metrics = [("max_jump", "largest boundary jump (deg)"), ("jerk", "mean |jerk| (deg/s^3)"),
               ("acting", "share of ticks acting"), ("mae", "MAE vs dataset actions (deg)")]
    width = 0.8 / len(RULES)
    for axis, (key, title) in zip(axes.flat[:4], metrics, strict=True):
        for number, rule in enumerate(RULES):
            values = []
            for setting in settings:
                match = [r for r in results if r.rule == rule and
                         (f"{r.setting}\n{r.rows}" if r.rows != "n_action_steps" else r.setting) == setting]
                values.append(getattr(match[0], key) if match else np.nan)
            axis.bar(np.arange(len(settings)) + number * width, values, width, label=rule)
        axis.set_xticks(np.arange(len(settings)) + width, settings, fontsize=8)
        axis.set_title(title)
        axis.legend(fontsize=8)
    for axis, (setting, by_rule) in zip(axes.flat[4:], traces.items(), strict=False):
        axis.plot(truth[:, 0], color="black", linewidth=1.5, label="dataset action")
        for rule, trace in by_rule.items():
            axis.plot(trace[:, 0], linewidth=1.0, label=rule)
        axis.set_title(f"shoulder_pan, episode 0, {setting}")
        axis.set_xlabel("tick")
        axis.legend(fontsize=8)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/chunk_overlap")
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--episodes", type=int, default=4, help="dataset episodes replayed per run")
    parser.add_argument("--soft-rows", type=int, default=0,
                        help="rtc: rows sent after the frozen ones as soft guidance (0: actuator.rtc_soft_rows)")
    parser.add_argument("--png", default="docs/chunk_overlap.png")
    parser.add_argument("--json", default="")
    parser.add_argument("--markdown", default="")
    parser.add_argument("--machine", default="2-core dev VM, no GPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    torch.set_num_threads(1)
    from nodes.policy.runtime import PolicyRuntime

    workdir = Path(args.workdir)
    config_path, dataset = prepare(workdir, args.train_steps)
    config = load_config(config_path)
    episodes = load_episodes(config)
    checkpoint = train(config, dataset, episodes, workdir / "trained", args.train_steps)
    train_info = json.loads((checkpoint / "armpipe.json").read_text())
    soft_rows = args.soft_rows or config.actuator.rtc_soft_rows
    # The same checkpoint and noise with the other soft-weight schedule, for rtc at 100 ms (a fourth row).
    other_guidance = "linear" if config.policy.rtc_guidance == "exp" else "exp"
    runtimes = {"n_action_steps": PolicyRuntime(config),
                "horizon": PolicyRuntime(load_config(config_path, ["--policy.rows=horizon"])),
                other_guidance: PolicyRuntime(load_config(config_path, [f"--policy.rtc_guidance={other_guidance}"]))}
    replayed = episodes[: args.episodes]
    plan: list[tuple[str, float | None, str]] = [("n_action_steps", None, rule) for rule in RULES]
    plan += [("n_action_steps", ms / 1000, rule) for ms in ROUND_TRIPS_MS for rule in RULES]
    plan += [(other_guidance, 0.1, "rtc"), ("no guide rows", 0.1, "rtc")]
    plan += [("horizon", ms / 1000, rule) for ms in (100, 300) for rule in RULES]
    results: list[RunResult] = []
    traces: dict[str, dict[str, np.ndarray]] = {}
    started = time.monotonic()
    for rows, round_trip, rule in plan:
        per_episode = []
        for episode in replayed:
            result, targets = replay(runtimes.get(rows, runtimes["n_action_steps"]), episode, rule, round_trip,
                                     soft_rows=soft_rows, fps=config.fps, guide=rows != "no guide rows")
            if rows in (other_guidance, "no guide rows"):
                result.rule = f"rtc ({other_guidance} guidance)" if rows == other_guidance else "rtc (no guide rows)"
            per_episode.append(result)
            if episode is replayed[0] and rows == "n_action_steps" and round_trip in (0.1, 0.3):
                traces.setdefault(result.setting, {})[rule] = targets
        results.append(combine(per_episode))
        r = results[-1]
        log.info("%-8s %-14s %-7s acting %5.1f %%  max jump %6.2f  mean jump %5.2f  jerk %8.0f  MAE %5.2f  (%.0f s)",
                 r.setting, rows, rule, r.acting * 100, r.max_jump, r.mean_jump, r.jerk, r.mae,
                 time.monotonic() - started)
    text = markdown(results, args.machine, train_info)
    log.info("results:\n%s", text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    plot(results, traces, replayed[0].actions, Path(args.png))
    log.info("wrote %s", args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
