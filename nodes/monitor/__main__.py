"""Web monitor: a live panel of the whole pipeline, pushed to the browser with server-sent events.

    python -m nodes.monitor --config configs/lift.yaml      # then open http://127.0.0.1:9000

What it shows: every camera (JPEG-encoded *here*, at most ``monitor.frame_hz`` per camera, never in
the control loop), joint states and executed actions over time with the replayed ground truth
overlaid, policy round trip and inference time per chunk, queue depth, holds and faults with their
reasons, the actuator's loop statistics, and every node's state from supervisord's XML-RPC interface
plus its readiness file. Buttons: restart a node (supervisord), start an episode, stop it with a
success or failure label (the actuator's control socket, Lazy Pirate REQ).

Exposure: it listens on ``monitor.host`` (127.0.0.1 by default). ``--monitor.host=0.0.0.0`` serves the
panel, buttons included, to the network: do that only on a trusted network. Cross-site POSTs (a page
from another origin driving the buttons through your browser) are refused either way.

HTTP interface (used by ``static/app.js``; handy from curl too):
- ``GET /`` the page; ``GET /events`` the SSE stream; ``GET /api/state`` a JSON snapshot;
- ``POST /api/episode/start`` ``{"episode_index"?: int}``; ``POST /api/episode/stop`` ``{"label"?: "success" |
  "failure"}``; ``POST /api/episode/label`` ``{"label": ..., "episode_index"?: int}``;
  ``POST /api/nodes/<program>/restart``. Replies are ``{"ok": bool, "message": str, ...}``; a refused
  command is an HTTP 4xx/5xx with ``ok: false`` and a message that says why.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import cv2
import numpy as np

from common.config import DeploymentConfig, parse_node_args
from common.node import Readiness, setup_logging
from common.supervisor_client import (
    SupervisorClient,
    SupervisorError,
    SupervisorUnavailable,
    UnknownProcess,
    read_readiness,
)
from common.wire.images import encode_jpeg
from common.wire.protocol import KIND_ACTION, KIND_EVENT, KIND_FRAME, KIND_REQUEST, KIND_STATE, Message, ProtocolError
from common.wire.transport import (
    LatestSubscriber,
    PeerUnavailable,
    RemoteError,
    RequestClient,
    SocketFactory,
    stop_event_on_signals,
)

log = logging.getLogger("monitor")

PROGRAM = "monitor"
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = {  # the only files served: no path from the URL ever reaches the filesystem
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
CLIENT_QUEUE = 256  # events waiting per browser; a browser that falls further behind loses events
NODES_PERIOD_S = 1.0
KEEPALIVE_S = 10.0
MAX_BODY = 4096
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
        self.pending_series: dict[str, list[dict[str, Any]]] = {"state": [], "action": [], "gt": []}
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_KEEP)
        self.loop_stats: dict[str, Any] | None = None
        self.episode: dict[str, Any] | None = None
        self.player: dict[str, Any] | None = None
        self.nodes: dict[str, Any] = {"programs": [], "error": "not polled yet", "unsupervised": []}
        self.contract: dict[str, Any] = {"ok": None, "differences": []}
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
                      "queue_depth": meta.get("queue_depth"),
                      "timings": {str(k): _finite(v) for k, v in timings.items()},
                      "chunk": None if chunk is None else np.asarray(chunk, dtype=np.float64).tolist()}
            with self.lock:
                self.chunk_history.append({k: v for k, v in sample.items() if k != "chunk"})
            self.hub.publish("chunk", sample)
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
        elif event in ("episode_start", "episode_stop", "episode_label"):
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
        elif event == "policy_error":
            self._note("fault", f"policy error ({meta.get('op', '')}): {meta.get('message', '')}")
        elif event == "input_refused":
            self._note("fault", f"refused {meta.get('kind')} {meta.get('stream')}: {meta.get('reason')} "
                       f"({_finite(meta.get('ahead_s'))} s ahead)")
        elif event in ("clamped", "anchor_mismatch", "reconnected", "units_mismatch"):
            detail = meta.get("joints") or meta.get("reason") or meta.get("differences") or ""
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
            height, width = msg.meta.get("_jpeg_shapes", {}).get("image", [0, 0, 3])[:2]
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

    def set_nodes(self, nodes: dict[str, Any]) -> None:
        with self.lock:
            self.nodes = nodes
        self.hub.publish("nodes", nodes)

    def snapshot(self) -> dict[str, Any]:
        """Everything a newly connected page needs to draw itself at once."""
        with self.lock:
            return {
                "config": self.describe(),
                "frames": [view.last_payload for view in self.cameras.values() if view.last_payload],
                "series": {"state": list(self.state_history), "action": list(self.action_history),
                           "gt": list(self.gt_history), "now": time.monotonic()},
                "chunks": list(self.chunk_history),
                "loop_stats": self.loop_stats,
                "episode": self.episode,
                "player": self.player,
                "nodes": self.nodes,
                "contract": dict(self.contract),
                "log": list(self.log),
                "bad_messages": self.bad_messages,
            }

    def describe(self) -> dict[str, Any]:
        config = self.config
        return {
            "task": config.task, "fps": config.fps, "cameras": list(config.cameras),
            "arms": {name: arm.joint_names() for name, arm in config.arms.items()},
            "action_names": config.action_names(),
            "lower_limits": config.lower_limits(), "upper_limits": config.upper_limits(),
            "history_s": config.monitor.history_s, "supervisor_url": config.monitor.supervisor_url,
            "control_endpoint": config.actuator.control_endpoint,
        }


# --------------------------------------------------------------------------------------------------
# Commands: actuator control socket and supervisord
# --------------------------------------------------------------------------------------------------


class CommandError(Exception):
    """A command the monitor refuses or that failed; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: HTTPStatus, message: str, **detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(message)


class Commands:
    def __init__(self, config: DeploymentConfig, factory: SocketFactory, panel: PanelState) -> None:
        self.config = config
        self.panel = panel
        self.factory = factory
        self.control_lock = threading.Lock()  # one REQ socket, one request at a time
        self.control: RequestClient | None = None
        self.supervisor = SupervisorClient(config.monitor.supervisor_url,
                                           ready_dir=config.resolve(config.run_dir) / "ready")

    def actuator(self, op: str, meta: dict[str, Any]) -> dict[str, Any]:
        """Send one control op; returns the reply's meta. Errors become ``CommandError`` with the reason."""
        request = Message(kind=KIND_REQUEST, src=PROGRAM, meta={"op": op, "client": PROGRAM, **meta})
        endpoint = self.config.actuator.control_endpoint
        with self.control_lock:
            if self.control is None:
                self.control = RequestClient(self.factory, endpoint, timeout_s=self.config.monitor.control_timeout_s,
                                             retries=1)
            try:
                reply = self.control.request(request)
            except RemoteError as exc:
                raise CommandError(HTTPStatus.CONFLICT, f"actuator refused {op}: {exc}", field=exc.field,
                                   expected=exc.expected) from exc
            except PeerUnavailable as exc:
                raise CommandError(HTTPStatus.SERVICE_UNAVAILABLE, f"actuator unreachable at {endpoint} "
                                   f"(is it running?): {exc}") from exc
            except ProtocolError as exc:
                raise CommandError(HTTPStatus.BAD_GATEWAY, f"actuator sent a malformed reply: {exc}") from exc
        return {key: value for key, value in reply.meta.items() if not key.startswith("_")}

    def restart(self, program: str) -> dict[str, Any]:
        own = [entry for entry in self.poll_nodes()["programs"] if entry.get("self")]
        if own and program in (own[0]["name"], f"{own[0]['group']}:{own[0]['name']}"):
            # Stopping ourselves would end this request before the start call: nobody would start us again.
            raise CommandError(HTTPStatus.CONFLICT, f"the monitor cannot restart itself ({program}); use "
                               f"`supervisorctl -s {self.config.monitor.supervisor_url.removesuffix('/RPC2')} "
                               f"restart {program}`")
        try:
            status = self.supervisor.restart(program)
        except UnknownProcess as exc:
            raise CommandError(HTTPStatus.NOT_FOUND, str(exc), known=exc.known) from exc
        except SupervisorUnavailable as exc:
            raise CommandError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from exc
        except SupervisorError as exc:
            raise CommandError(HTTPStatus.BAD_GATEWAY, str(exc)) from exc
        return status.to_dict()

    def poll_nodes(self) -> dict[str, Any]:
        """supervisord's programs with readiness, plus ready files of nodes it does not run."""
        ready = read_readiness(self.config.resolve(self.config.run_dir) / "ready")
        programs: list[dict[str, Any]] = []
        error = ""
        try:
            programs = [{**status.to_dict(), "self": status.pid == os.getpid()}
                        for status in self.supervisor.processes()]
        except SupervisorUnavailable as exc:
            error = str(exc)
        except Exception as exc:  # a supervisord answering garbage must not stop the poller
            error = f"supervisord at {self.config.monitor.supervisor_url}: {type(exc).__name__}: {exc}"
        supervised = {program["name"] for program in programs}
        unsupervised = [{"name": name, "pid": entry.get("pid"), "alive": entry.get("alive"),
                         "age_s": entry.get("age_s")} for name, entry in ready.items() if name not in supervised]
        return {"programs": programs, "unsupervised": unsupervised, "error": error, "polled_wall": time.time()}

    def close(self) -> None:
        with self.control_lock:
            if self.control is not None:
                self.control.close()


# --------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------


class MonitorServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], panel: PanelState, hub: EventHub, commands: Commands,
                 stop: threading.Event) -> None:
        super().__init__(address, MonitorHandler)
        self.panel = panel
        self.hub = hub
        self.commands = commands
        self.stop = stop


class MonitorHandler(BaseHTTPRequestHandler):
    server: MonitorServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------ responses
    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        self._send(status, json_text(payload).encode(), "application/json")

    # ------------------------------------------------------------------ GET
    def do_GET(self) -> None:
        path = urlparse(self.path).path
        if path in STATIC_FILES:
            filename, content_type = STATIC_FILES[path]
            self._send(HTTPStatus.OK, (STATIC_DIR / filename).read_bytes(), content_type)
        elif path == "/events":
            self._events()
        elif path == "/api/state":
            self._json(HTTPStatus.OK, self.server.panel.snapshot())
        else:
            self._json(HTTPStatus.NOT_FOUND, {"ok": False, "message": f"no such page: {path}"})

    def _events(self) -> None:
        hub, stop = self.server.hub, self.server.stop
        client = hub.subscribe()
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"retry: 1000\n\n" + hub.encode("snapshot", self.server.panel.snapshot()))
            self.wfile.flush()
            while not stop.is_set():
                try:
                    payload = client.get(timeout=KEEPALIVE_S)
                except queue.Empty:
                    payload = b": keepalive\n\n"  # lets a dead connection show up as a write error
                self.wfile.write(payload)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        finally:
            hub.unsubscribe(client)
            self.close_connection = True

    # ------------------------------------------------------------------ POST
    def do_POST(self) -> None:
        path = urlparse(self.path).path
        try:
            self._check_origin()
            body = self._body()
            result = self._command(path, body)
        except CommandError as exc:
            log.info("command %s refused: %s", path, exc)
            self._json(exc.status, {"ok": False, "message": str(exc), **exc.detail})
            return
        self._json(HTTPStatus.OK, {"ok": True, **result})

    def _check_origin(self) -> None:
        # Browsers send Origin on cross-site POSTs: refuse any page but ours driving the robot.
        origin = self.headers.get("Origin")
        if origin and urlparse(origin).netloc != self.headers.get("Host", ""):
            raise CommandError(HTTPStatus.FORBIDDEN, f"cross-origin command from {origin} refused")

    def _body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError as exc:
            raise CommandError(HTTPStatus.BAD_REQUEST, "Content-Length: expected an integer") from exc
        if length > MAX_BODY:
            raise CommandError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body: expected at most {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise CommandError(HTTPStatus.BAD_REQUEST, f"body: expected JSON ({exc})") from exc
        if not isinstance(body, dict):
            raise CommandError(HTTPStatus.BAD_REQUEST, "body: expected a JSON object")
        return body

    def _command(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        commands = self.server.commands
        parts = [part for part in path.split("/") if part]
        if parts[:2] == ["api", "episode"] and len(parts) == 3:
            op = parts[2]
            if op == "start":
                meta = _pick(body, "episode_index", int)
                reply = commands.actuator("start", meta)
                return {"message": f"episode {reply.get('episode_index', '')} started", "reply": reply}
            if op == "stop":
                meta = _pick(body, "label", str)
                if meta.get("label") not in (None, "", "success", "failure"):
                    raise CommandError(HTTPStatus.BAD_REQUEST, f"label: expected 'success' or 'failure', "
                                       f"got {meta['label']!r}")
                reply = commands.actuator("stop", meta)
                label = meta.get("label") or "no label"
                return {"message": f"episode {reply.get('episode_index', '')} stopped ({label})", "reply": reply}
            if op == "label":
                meta = {**_pick(body, "label", str), **_pick(body, "episode_index", int)}
                reply = commands.actuator("label", meta)
                return {"message": f"episode {reply.get('episode_index', '')} labelled {meta.get('label')!r}",
                        "reply": reply}
            if op == "status":
                return {"message": "actuator status", "reply": commands.actuator("status", {})}
            raise CommandError(HTTPStatus.NOT_FOUND, f"unknown episode command {op!r}: expected start, stop, "
                               "label or status")
        if parts[:2] == ["api", "nodes"] and len(parts) == 4 and parts[3] == "restart":
            status = commands.restart(parts[2])
            self.server.panel.set_nodes(commands.poll_nodes())
            return {"message": f"{parts[2]} restarted (pid {status['pid']}, {status['state']})", "node": status}
        raise CommandError(HTTPStatus.NOT_FOUND, f"unknown command {path}")


def _pick(body: dict[str, Any], key: str, kind: type) -> dict[str, Any]:
    """``{key: body[key]}`` when present and of ``kind`` (bool is not an int here); a wrong type is a 400."""
    if key not in body or body[key] is None:
        return {}
    value = body[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CommandError(HTTPStatus.BAD_REQUEST, f"{key}: expected {kind.__name__}, got {value!r}")
    return {key: value}


# --------------------------------------------------------------------------------------------------
# Threads and main
# --------------------------------------------------------------------------------------------------


def endpoints(config: DeploymentConfig) -> list[str]:
    return [*(cam.endpoint for cam in config.cameras.values()),
            *(arm.state_endpoint for arm in config.arms.values()),
            config.player.gt_endpoint, config.actuator.events_endpoint]


def read_streams(panel: PanelState, subscriber: LatestSubscriber, stop: threading.Event) -> None:
    while not stop.is_set():
        for msg in subscriber.poll(timeout_s=0.1):
            try:
                panel.ingest(msg)
            except Exception:  # one odd message must not blind the panel
                log.exception("message %s from %s not shown", msg.kind, msg.src)
        if subscriber.bad_messages != panel.bad_messages:
            panel.bad_messages = subscriber.bad_messages
            panel._note("fault", f"{subscriber.bad_messages} malformed message(s) dropped; last: "
                        f"{subscriber.last_error}")


def pump(panel: PanelState, stop: threading.Event) -> None:
    """Push batched series and throttled camera frames."""
    period = 1.0 / max(1.0, panel.config.monitor.series_hz, panel.config.monitor.frame_hz)
    while not stop.wait(period):
        now = time.monotonic()
        panel.flush_series()
        panel.encode_frames(now)


def poll_nodes(panel: PanelState, commands: Commands, stop: threading.Event) -> None:
    while not stop.is_set():
        panel.set_nodes(commands.poll_nodes())
        stop.wait(NODES_PERIOD_S)


def run(config: DeploymentConfig, stop: threading.Event) -> None:
    readiness = Readiness(config, PROGRAM)
    hub = EventHub()
    panel = PanelState(config, hub)
    factory = SocketFactory()
    commands = Commands(config, factory, panel)
    subscriber = LatestSubscriber(factory, endpoints(config), hwm=64)
    try:
        server = MonitorServer((config.monitor.host, config.monitor.port), panel, hub, commands, stop)
    except OSError as exc:
        log.error("cannot listen on %s:%d (monitor.host / monitor.port): %s", config.monitor.host,
                  config.monitor.port, exc)
        subscriber.close()
        raise SystemExit(1) from exc
    threads = [
        threading.Thread(target=read_streams, args=(panel, subscriber, stop), name="streams", daemon=True),
        threading.Thread(target=pump, args=(panel, stop), name="pump", daemon=True),
        threading.Thread(target=poll_nodes, args=(panel, commands, stop), name="nodes", daemon=True),
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True),
    ]
    for thread in threads:
        thread.start()
    host, port = server.server_address[:2]
    if config.monitor.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving the panel (with its robot controls) to the network on %s:%d", host, port)
    readiness.ready(url=f"http://{host}:{port}/")
    log.info("panel at http://%s:%d/ (streams %s, supervisord %s)", host, port, subscriber.endpoints,
             config.monitor.supervisor_url)
    try:
        stop.wait()
    finally:
        readiness.clear()
        server.shutdown()
        server.server_close()
        for thread in threads:
            thread.join(timeout=2)
        subscriber.close()
        commands.close()


def main(argv: list[str] | None = None) -> int:
    setup_logging(PROGRAM)
    args = parse_node_args("armpipe web monitor", argv)
    run(args.config, stop_event_on_signals())
    return 0


if __name__ == "__main__":
    sys.exit(main())
