"""The layout keeps its promises, read from the imports of the source (docs/architecture.md, "Map of the
rooms"): every library module under common/ is used by at least two programs, common never imports a
node's room, and no node imports another node's room.

Programs are the nodes (``nodes/<node>``), the command-line tools (``common/tools/<tool>``) and the
benchmarks (``bench/<bench>.py``); tests do not count. A program uses a module when the module is in the
closure of its imports, lazy ones inside functions included.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from conftest import REPO_ROOT

# A module that waits for its consumers, with the reason. Keep this short: an entry is a promise.
NOT_YET_SHARED: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    paths = [*REPO_ROOT.glob("common/**/*.py"), *REPO_ROOT.glob("nodes/**/*.py"), *REPO_ROOT.glob("bench/*.py")]
    return {module_name(path): path for path in paths}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """For each module, the project modules it imports (anywhere in the file)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        targets = set()
        for dotted in imported:
            parts = dotted.split(".")
            # The longest prefix that is a module: ``from common.wire.protocol import Message`` -> the module.
            for end in range(len(parts), 0, -1):
                if ".".join(parts[:end]) in modules:
                    targets.add(".".join(parts[:end]))
                    break
        graph[name] = targets - {name}
    return graph


def programs(modules: dict[str, Path]) -> dict[str, str]:
    """Program name -> its entry module."""
    found = {}
    for name, path in modules.items():
        parts = name.split(".")
        if parts[0] == "nodes" and len(parts) == 2 and path.name != "__init__.py":
            found[name] = name  # a node module (nodes/state_reader.py)
        elif parts[0] == "nodes" and len(parts) == 3 and parts[2] == "__main__":
            found[".".join(parts[:2])] = name  # a node room (nodes/actuator/__main__.py)
        elif parts[:2] == ["common", "tools"] and len(parts) == 3:
            found[name] = name  # a tool
        elif parts[0] == "bench" and len(parts) == 2 and parts[1] != "harness":
            found[name] = name  # a benchmark (the harness is their shared library)
    return found


def users_of(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = import_graph(modules)
    users: dict[str, set[str]] = defaultdict(set)
    for program, entry in programs(modules).items():
        seen, todo = {entry}, [entry]
        while todo:
            for dep in graph[todo.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        for module in seen:
            users[module].add(program)
    return users


def library_modules(modules: dict[str, Path]) -> list[str]:
    """common/ minus the tools (programs themselves) and package files."""
    return sorted(name for name, path in modules.items() if name.startswith("common.")
                  and not name.startswith("common.tools") and path.name != "__init__.py")


def test_the_reader_finds_the_programs_and_their_imports() -> None:
    modules = source_modules()
    found = programs(modules)
    assert {"nodes.actuator", "nodes.policy", "nodes.state_reader", "common.tools.status",
            "bench.transport"} <= set(found)
    users = users_of(modules)
    # The actuator room's private parts are reached through its __main__ only; the wire by nearly everything.
    assert users["nodes.actuator.core"] == {"nodes.actuator"}
    wire_users = {"nodes.actuator", "nodes.policy", "nodes.camera", "common.tools.offline_eval"}
    assert wire_users <= users["common.wire.protocol"]


def test_every_library_module_in_common_is_used_by_two_programs() -> None:
    modules = source_modules()
    users = users_of(modules)
    lonely = {name: sorted(users[name]) for name in library_modules(modules)
              if len(users[name]) < 2 and name not in NOT_YET_SHARED}
    assert not lonely, f"common/ holds only what two or more programs use; move these into their room: {lonely}"
    assert set(NOT_YET_SHARED) <= set(modules), "an exemption names a module that no longer exists"


def test_common_never_imports_a_node_and_no_node_imports_another_nodes_room() -> None:
    graph = import_graph(source_modules())
    crossings = [(module, dep) for module, deps in graph.items() for dep in deps
                 if (module.startswith("common") and dep.startswith("nodes"))
                 or (module.startswith("nodes.") and dep.startswith("nodes.")
                     and module.split(".")[1] != dep.split(".")[1])]
    assert not crossings


def test_dataset_features_are_the_ones_lerobot_builds_from_the_hardware() -> None:
    from lerobot.utils.feature_utils import hw_to_dataset_features

    from common.config import load_config
    from common.layout import dataset_features

    for task in ("lift", "sort"):
        config = load_config(REPO_ROOT / "configs" / f"{task}.yaml")
        joints = dict.fromkeys(config.state_names(), float)
        cameras = {name: (cam.height, cam.width, 3) for name, cam in config.cameras.items()}
        lerobot = {**hw_to_dataset_features({**joints, **cameras}, "observation"),
                   **hw_to_dataset_features(dict.fromkeys(config.action_names(), float), "action")}
        for feature in lerobot.values():
            feature.pop("info", None)  # LeRobot 0.6.1 marks depth maps; the writers add their video info
        ours = dataset_features(config)
        assert ours == lerobot
        assert dataset_features(config, (48, 64))["observation.images.front"]["shape"] == (48, 64, 3)
