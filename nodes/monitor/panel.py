"""The monitor's panel state: the newest of every stream (camera frames JPEG-encoded here, joint and action
series, chunk timings, holds and faults, loop statistics, node states) and the hub that pushes it to
every connected browser as server-sent events."""

from __future__ import annotations

import base64
import json
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from common.config import DeploymentConfig
from common.wire.images import encode_jpeg
from common.wire.protocol import KIND_ACTION, KIND_EVENT, KIND_FRAME, KIND_STATE, Message, ProtocolError

log = logging.getLogger("monitor")

CLIENT_QUEUE = 256  # events waiting per browser; a browser that falls further behind loses events
LOG_KEEP = 100


# --------------------------------------------------------------------------------------------------
# Push: one queue per connected browser
# --------------------------------------------------------------------------------------------------


class EventHub:
    """Fan-out of server-sent events; each event is serialised once, whatever the number of browsers."""

    def __init__(self) -> None:
        self._clients: set[queue.Queue[bytes]] = set()
        self._lock = threading.Lock()
        self.dropped = 0

    @staticmethod
    def encode(event: str, data: Any) -> bytes:
        return f"event: {event}\ndata: {json_text(data)}\n\n".encode()

    def subscribe(self) -> queue.Queue[bytes]:
        client: queue.Queue[bytes] = queue.Queue(maxsize=CLIENT_QUEUE)
        with self._lock:
            self._clients.add(client)
        return client

    def unsubscribe(self, client: queue.Queue[bytes]) -> None:
        with self._lock:
            self._clients.discard(client)

    def publish(self, event: str, data: Any) -> None:
        payload = self.encode(event, data)
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            try:
                client.put_nowait(payload)
            except queue.Full:
                self.dropped += 1  # a stalled browser; frames and stats are re-sent soon anyway

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._clients)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return str(value)


def _without_non_finite(value: Any) -> Any:
    """``value`` with every NaN / inf replaced by None (JSON null), containers and arrays included."""
    if isinstance(value, dict):
        return {key: _without_non_finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_non_finite(item) for item in value]
    if isinstance(value, np.ndarray):
        return _without_non_finite(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def json_text(data: Any) -> str:
    """Strict JSON for the browser. Python's json writes NaN, which JSON.parse rejects: one NaN (the
    actuator's target before any position is known) would make the page drop a whole snapshot, so
    non-finite numbers go out as null."""
    try:
        return json.dumps(data, separators=(",", ":"), default=_json_default, allow_nan=False)
    except ValueError:  # only non-finite floats raise here; rare, so the clean-up runs only then
        return json.dumps(_without_non_finite(data), separators=(",", ":"), default=_json_default, allow_nan=False)


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and np.isfinite(value) else None


# --------------------------------------------------------------------------------------------------
# The panel's state, fed by the stream reader
# --------------------------------------------------------------------------------------------------


@dataclass
class CameraView:
    latest: Message | None = None
    received: int = 0
    received_at: float = 0.0
    encoded_seq: int = -1
    encoded_at: float = 0.0
    last_payload: dict[str, Any] | None = None
    stats: dict[str, Any] = field(default_factory=dict)


class PanelState:
    """Everything the page shows, kept by the reader thread and pushed by the pump thread."""

    def __init__(self, config: DeploymentConfig, hub: EventHub) -> None:
        self.config = config
        self.hub = hub
        self.lock = threading.Lock()
        self.cameras = {name: CameraView() for name in config.cameras}
        history = max(10, int(config.monitor.history_s * config.fps))
        self.state_history: deque[dict[str, Any]] = deque(maxlen=history * max(1, len(config.arms)))
        self.action_history: deque[dict[str, Any]] = deque(maxlen=history)
        self.gt_history: deque[dict[str, Any]] = deque(maxlen=history)
        self.chunk_history: deque[dict[str, Any]] = deque(maxlen=200)
        self.latency_history: deque[dict[str, Any]] = deque(maxlen=300)  # the actuator's latency events
        self.pending_series: dict[str, list[dict[str, Any]]] = {"state": [], "action": [], "gt": []}
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_KEEP)
        self.loop_stats: dict[str, Any] | None = None
        self.episode: dict[str, Any] | None = None
        self.player: dict[str, Any] | None = None
        self.nodes: dict[str, Any] = {"programs": [], "error": "not polled yet", "unsupervised": []}
        self.contract: dict[str, Any] = {"ok": None, "differences": []}
        # The policy node's capacity figures (Commands.policy_capacity): None until first asked.
        self.capacity: dict[str, Any] | None = None
        # The task instruction a language policy gets (the actuator's): None until an event or status says it.
        self.instruction: dict[str, Any] = {"text": None, "source": ""}
        self.bad_messages = 0

    # ------------------------------------------------------------------ ingest (reader thread)
    def ingest(self, msg: Message) -> None:
        if msg.kind == KIND_FRAME:
            view = self.cameras.get(str(msg.meta.get("camera")))
            if view is not None:
                with self.lock:
                    view.latest = msg
                    view.received += 1
                    view.received_at = time.monotonic()
        elif msg.kind == KIND_STATE:
            position = msg.arrays.get("position")
            if position is not None:
                self._series("state", {"t": msg.t, "arm": msg.meta.get("arm"), "names": msg.meta.get("names"),
                                       "values": np.asarray(position, dtype=np.float64).tolist()})
        elif msg.kind == KIND_ACTION:
            self._ingest_action(msg)
        elif msg.kind == KIND_EVENT:
            self._ingest_event(msg)

    def _series(self, name: str, sample: dict[str, Any]) -> None:
        history = {"state": self.state_history, "action": self.action_history, "gt": self.gt_history}[name]
        with self.lock:
            history.append(sample)
            self.pending_series[name].append(sample)

    def _ingest_action(self, msg: Message) -> None:
        action = msg.arrays.get("action")
        if action is None:
            return
        values = np.asarray(action, dtype=np.float64).reshape(-1).tolist()
        if msg.meta.get("role") == "ground_truth":
            self._series("gt", {"t": msg.t, "values": values, "frame_index": msg.meta.get("frame_index"),
                                "episode_index": msg.meta.get("episode_index")})
        elif msg.meta.get("role") == "executed":
            self._series("action", {
                "t": msg.t, "values": values, "hold": bool(msg.meta.get("hold")),
                "hold_reason": msg.meta.get("hold_reason", ""), "queue_depth": msg.meta.get("queue_depth"),
                "lateness_s": _finite(msg.meta.get("lateness_s")), "episode_index": msg.meta.get("episode_index"),
                "tick": msg.meta.get("tick"), "frame_index": msg.meta.get("frame_index")})

    def _note(self, level: str, text: str, **extra: Any) -> None:
        entry = {"wall": time.time(), "level": level, "text": text, **extra}
        with self.lock:
            self.log.append(entry)
        self.hub.publish("log", entry)

    def _ingest_event(self, msg: Message) -> None:
        meta = msg.meta
        event = meta.get("event")
        if event == "camera_stats":
            view = self.cameras.get(str(meta.get("camera")))
            if view is not None:
                view.stats = {key: meta.get(key) for key in ("fps", "dropped", "errors", "backend")}
                if meta.get("errors"):
                    self._note("warn", f"camera {meta.get('camera')}: {meta.get('errors')} error(s)")
        elif event == "chunk":
            timings = meta.get("timings") if isinstance(meta.get("timings"), dict) else {}
            chunk = msg.arrays.get("chunk")
            sample = {"t": msg.t, "obs_t": _finite(meta.get("obs_t")), "rows": meta.get("rows"),
                      "dropped_stale": meta.get("dropped_stale"), "round_trip_s": _finite(meta.get("round_trip_s")),
                      "queue_depth": meta.get("queue_depth"), "batch": meta.get("batch"),
                      "timings": {str(k): _finite(v) for k, v in timings.items()},
                      "chunk": None if chunk is None else np.asarray(chunk, dtype=np.float64).tolist()}
            with self.lock:
                self.chunk_history.append({k: v for k, v in sample.items() if k != "chunk"})
            self.hub.publish("chunk", sample)
        elif event == "latency":
            stages = meta.get("stages") if isinstance(meta.get("stages"), dict) else {}
            sample = {"t": msg.t, "tick": meta.get("tick"), "first_row": bool(meta.get("first_row")),
                      "end_to_end_s": _finite(meta.get("end_to_end_s")),
                      "stages": {str(k): _finite(v) for k, v in stages.items()}}
            with self.lock:
                self.latency_history.append(sample)
            self.hub.publish("latency", sample)
        elif event == "loop_stats":
            stats = {key: value for key, value in meta.items() if key != "event"}
            stats["t"] = msg.t
            with self.lock:
                self.loop_stats = stats
                if "contract_ok" in meta:
                    self.contract["ok"] = bool(meta["contract_ok"])
            self.hub.publish("loop_stats", stats)
        elif event == "hold":
            self._note("hold", f"hold: {meta.get('reason')} (total {meta.get('count')})", reason=meta.get("reason"))
        elif event in ("episode_start", "episode_end") and msg.src.startswith("dataset"):
            # The player's own episode boundaries (on player.gt_endpoint), not the actuator's episodes.
            with self.lock:
                self.player = {"event": event, "episode_index": meta.get("episode_index"), "frames": meta.get("frames")}
            self.hub.publish("player", self.player)
        elif event == "instruction":
            self.set_instruction(meta.get("instruction"), meta.get("source"))
            self._note("info", f"instruction: {meta.get('instruction')!r}")
        elif event in ("episode_start", "episode_stop", "episode_label"):
            if event == "episode_start" and "instruction" in meta:
                self.set_instruction(meta.get("instruction"), None)
            episode = {"event": event, "episode_index": meta.get("episode_index"), "label": meta.get("label", ""),
                       "reason": meta.get("reason", ""), "t": msg.t, "wall": time.time()}
            with self.lock:
                self.episode = episode
            self.hub.publish("episode", episode)
            self._note("info", f"{event.replace('_', ' ')} {meta.get('episode_index')}"
                       + (f" ({meta.get('label')})" if meta.get("label") else "")
                       + (f": {meta.get('reason')}" if meta.get("reason") and event == "episode_stop" else ""))
        elif event == "contract_mismatch":
            differences = [str(item) for item in meta.get("differences", [])]
            with self.lock:
                self.contract = {"ok": False, "differences": differences}
            self._note("fault", "policy contract mismatch: " + "; ".join(differences))
        elif event == "schedule":
            # The actuator's chunk scheduling verdict (the round trip vs the chunk), sent once per change.
            self._note("info" if meta.get("covered") else "warn", f"schedule: {meta.get('message', '')}")
        elif event == "policy_error":
            self._note("fault", f"policy error ({meta.get('op', '')}): {meta.get('message', '')}")
        elif event == "input_refused":
            self._note("fault", f"refused {meta.get('kind')} {meta.get('stream')}: {meta.get('reason')} "
                       f"({_finite(meta.get('ahead_s'))} s ahead)")
        elif event in ("clamped", "anchor_mismatch", "reconnected", "units_mismatch"):
            detail = meta.get("joints") or meta.get("reason") or meta.get("differences") or ""
            if isinstance(detail, (list, tuple)):  # one line per difference, not a Python list's repr
                detail = "; ".join(str(item) for item in detail)
            self._note("fault", f"{event.replace('_', ' ')}: {detail}")
        elif isinstance(event, str) and event.endswith("error"):
            self._note("fault", f"{msg.src}: {event}: {meta.get('message', '')}")

    # ------------------------------------------------------------------ push (pump thread)
    def flush_series(self) -> None:
        with self.lock:
            batch = self.pending_series
            self.pending_series = {"state": [], "action": [], "gt": []}
        if any(batch.values()):
            self.hub.publish("series", {**batch, "now": time.monotonic()})

    def encode_frames(self, now: float) -> None:
        """JPEG-encode each camera's newest frame, at most ``frame_hz`` times a second per camera."""
        period = 1.0 / max(0.1, self.config.monitor.frame_hz)
        for name, view in self.cameras.items():
            with self.lock:
                msg = view.latest
                due = msg is not None and msg.seq != view.encoded_seq and now - view.encoded_at >= period
            if not due or msg is None:
                continue
            try:
                payload = self._encode(name, msg, view)
            except (ProtocolError, cv2.error, ValueError) as exc:
                view.encoded_seq = msg.seq
                self._note("fault", f"camera {name}: frame {msg.seq} cannot be shown: {exc}")
                continue
            view.encoded_seq, view.encoded_at, view.last_payload = msg.seq, now, payload
            self.hub.publish("frame", payload)

    def _encode(self, name: str, msg: Message, view: CameraView) -> dict[str, Any]:
        image = msg.arrays.get("image")
        if image is None:
            raise ProtocolError("arrays[image]", "a camera image")
        if "image" in msg.jpeg:
            jpeg = np.asarray(image, dtype=np.uint8)  # already JPEG on the wire: pass it through
            height, width = msg.jpeg_shapes.get("image", (0, 0, 3))[:2]
        else:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ProtocolError("arrays[image]", "uint8 HxWx3", f"{image.dtype}{list(image.shape)}")
            height, width = image.shape[:2]
            max_width = self.config.monitor.max_width
            if max_width > 0 and width > max_width:
                scale = max_width / width
                image = cv2.resize(image, (max_width, max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
            jpeg = encode_jpeg(np.ascontiguousarray(image), self.config.monitor.jpeg_quality)
        return {"camera": name, "seq": msg.seq, "t": msg.t, "age_s": max(0.0, time.monotonic() - msg.t),
                "width": int(width), "height": int(height), "received": view.received,
                "source": msg.meta.get("source", ""), "frame_index": msg.meta.get("frame_index"),
                "episode_index": msg.meta.get("episode_index"), "stats": view.stats,
                "jpeg": base64.b64encode(jpeg.tobytes()).decode("ascii")}

    def set_instruction(self, text: Any, source: Any) -> None:
        """The actuator's current instruction ("" when it has none), from its events or its status reply."""
        if not isinstance(text, str):
            return
        with self.lock:
            self.instruction = {"text": text,
                                "source": source if isinstance(source, str) else self.instruction.get("source", "")}
            payload = dict(self.instruction)
        self.hub.publish("instruction", payload)

    def set_nodes(self, nodes: dict[str, Any]) -> None:
        with self.lock:
            self.nodes = nodes
        self.hub.publish("nodes", nodes)

    def set_capacity(self, capacity: dict[str, Any]) -> None:
        with self.lock:
            self.capacity = capacity
        self.hub.publish("capacity", capacity)

    def snapshot(self) -> dict[str, Any]:
        """Everything a newly connected page needs to draw itself at once."""
        with self.lock:
            return {
                "config": self.describe(),
                "frames": [view.last_payload for view in self.cameras.values() if view.last_payload],
                "series": {"state": list(self.state_history), "action": list(self.action_history),
                           "gt": list(self.gt_history), "now": time.monotonic()},
                "chunks": list(self.chunk_history),
                "latency": list(self.latency_history),
                "loop_stats": self.loop_stats,
                "episode": self.episode,
                "player": self.player,
                "nodes": self.nodes,
                "capacity": self.capacity,
                "contract": dict(self.contract),
                "instruction": dict(self.instruction),
                "log": list(self.log),
                "bad_messages": self.bad_messages,
            }

    def describe(self) -> dict[str, Any]:
        config = self.config
        return {
            "task": config.task, "fps": config.fps, "cameras": list(config.cameras),
            "camera_sizes": {name: [camera.width, camera.height] for name, camera in config.cameras.items()},
            "arms": {name: arm.joint_names() for name, arm in config.arms.items()},
            "action_names": config.action_names(),
            "lower_limits": config.lower_limits(), "upper_limits": config.upper_limits(),
            "history_s": config.monitor.history_s, "supervisor_url": config.monitor.supervisor_url,
            "control_endpoint": config.actuator.control_endpoint,
        }
