"""Start-up of each robot-side node, and whether it loads torch, for two source trees side by side.

    .venv/bin/python -m bench.node_startup [--before DIR] [--tries 3] [--markdown FILE]

For each node, alternating between the trees in one run (so both see the same machine load):
- import: a fresh ``python -c "import nodes.<node>"`` (plus, for the nodes that import their heavy
  parts lazily, what they import before they act: the bus driver, the dataset reader, the writer);
- ready: from ``python -m nodes.<node>`` being started to its readiness file (the actuator: to its bus
  being connected, the log line ``arm main connected on``), with the servo emulator serving the bus;
- torch: whether ``libtorch`` is mapped into the process once it is ready.

``--before`` is another checkout of armpipe (e.g. ``git worktree add /tmp/before <commit>`` with the
same ``.venv``); without it only this tree is measured.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import write_config
from common.config import REPO_ROOT, load_config

log = logging.getLogger("bench.node_startup")
SMALL = {"width": 96, "height": 64}

# What each node imports before it acts (its module plus the lazy imports of its start-up path). Names
# of both layouts (before/after the nodes/<node>/ packages): a tree imports those it has.
IMPORTS = {
    "servo_emulator": ["nodes.servo_emulator"],
    "state_reader": ["nodes.state_reader"],
    "actuator": ["nodes.actuator", "common.feetech_bus"],
    "camera": ["nodes.camera"],
    "monitor": ["nodes.monitor"],
    "recorder": ["nodes.recorder", "nodes.recorder.writer", "common.episode_writer"],
    "dataset_player": ["nodes.dataset_player", "common.dataset_source", "av"],
}
NAMES = {"servo_emulator": "main", "state_reader": "main", "camera": "front"}


def import_seconds(root: Path, modules: list[str]) -> tuple[float, bool]:
    # A module this tree does not have is skipped; anything missing beneath it is an error.
    code = ("import importlib, sys, time\n"
            "def load(name):\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except ModuleNotFoundError as exc:\n        if exc.name != name:\n            raise\n"
            "start = time.perf_counter()\n" + "".join(f"load({m!r})\n" for m in modules)
            + "print(time.perf_counter() - start, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(root)}).stdout.split()
    return float(out[0]), out[1] == "True"


def torch_mapped(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


class Node:
    def __init__(self, root: Path, config_path: Path, module: str) -> None:
        self.module, self.name = module, NAMES.get(module, "")
        program = f"{module}-{self.name}" if self.name else module
        self.ready = Path(load_config(config_path).run_dir) / "ready" / f"{program}.json"
        self.log_path = config_path.parent / f"{program}-{root.name}.log"
        cmd = [sys.executable, "-m", f"nodes.{module}", "--config", str(config_path)]
        if self.name:
            cmd += ["--name", self.name]
        self.ready.unlink(missing_ok=True)
        self.started = time.monotonic()
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=root, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(root)})

    def wait(self, timeout_s: float = 300.0) -> float:
        while time.monotonic() - self.started < timeout_s:
            done = self.ready.exists()
            if done and self.module == "actuator":
                done = "arm main connected on" in self.log_path.read_text(errors="replace")
            if done:
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.02)
        raise TimeoutError(f"{self.module} not ready in {timeout_s}s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def measure(roots: dict[str, Path], tries: int, workdir: Path) -> dict[str, dict[str, dict[str, list]]]:
    from common.tools.demo_data import DemoSpec, generate_demo_dataset

    config_path = write_config(workdir, "lift", {"cameras": {"front": SMALL, "wrist": SMALL},
                                                 "actuator": {"contract_wait_s": 0.5, "dry_run": False},
                                                 "player": {"dataset": str(workdir / "demo")}})
    generate_demo_dataset(load_config(config_path), workdir / "demo", DemoSpec(episodes=1, frames=30, **SMALL))
    results: dict[str, dict[str, dict[str, list]]] = {}
    emulator: Node | None = None  # one servo emulator serves the bus nodes of both trees
    try:
        for module in IMPORTS:
            results[module] = {label: {"import": [], "ready": [], "torch": []} for label in roots}
            if module in ("state_reader", "actuator") and emulator is None:
                emulator = Node(REPO_ROOT, config_path, "servo_emulator")
                emulator.wait()
            for attempt in range(tries):
                for label, root in roots.items():
                    seconds, torch_imported = import_seconds(root, IMPORTS[module])
                    entry = results[module][label]
                    entry["import"].append(seconds)
                    node = Node(root, config_path, module)
                    try:
                        entry["ready"].append(node.wait())
                        entry["torch"].append(torch_mapped(node.proc.pid) or torch_imported)
                    finally:
                        node.stop()
                    log.info("%-15s %-6s try %d: import %.2fs, ready %.2fs, torch %s", module, label, attempt + 1,
                             seconds, entry["ready"][-1], entry["torch"][-1])
            if module == "actuator" and emulator is not None:
                emulator.stop()
                emulator = None
    finally:
        if emulator is not None:
            emulator.stop()
    return results


def to_markdown(results: dict[str, dict[str, dict[str, list]]], tries: int) -> str:
    labels = list(next(iter(results.values())))
    head = " | ".join(f"{label} import s | {label} ready s | {label} torch" for label in labels)
    lines = [f"Median of {tries} tries per node and tree, alternating trees in one run.", "",
             f"| node | {head} |" + (" ready ratio |" if len(labels) == 2 else ""),
             "|---|" + "---:|---:|---|" * len(labels) + ("---:|" if len(labels) == 2 else "")]
    for module, by_label in results.items():
        cells = []
        for label in labels:
            entry = by_label[label]
            cells.append(f"{statistics.median(entry['import']):.2f} | {statistics.median(entry['ready']):.2f} | "
                         f"{'yes' if any(entry['torch']) else 'no'}")
        ratio = ""
        if len(labels) == 2:
            first, second = (statistics.median(by_label[label]["ready"]) for label in labels)
            ratio = f" {first / second:.1f}x |"
        lines.append(f"| {module} | " + " | ".join(cells) + " |" + ratio)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="another armpipe checkout to compare with")
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    roots = {"before": args.before.resolve(), "after": REPO_ROOT} if args.before else {"this": REPO_ROOT}
    with tempfile.TemporaryDirectory(prefix="armpipe-startup-") as tmp:
        results = measure(roots, args.tries, Path(tmp))
    table = to_markdown(results, args.tries)
    log.info("load average at the end: %s\n%s", os.getloadavg(), table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
