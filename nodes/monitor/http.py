"""The monitor's HTTP side: the page's static files, the server-sent event stream, the JSON snapshot and
the command endpoints (see ``nodes.monitor.__main__`` for the interface)."""

from __future__ import annotations

import json
import logging
import queue
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from nodes.monitor.commands import CommandError, Commands
from nodes.monitor.panel import EventHub, PanelState, json_text

log = logging.getLogger("monitor")

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = {  # the only files served: no path from the URL ever reaches the filesystem
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    # The page links the SVG; /favicon.ico is what a browser asks for on its own (the same picture).
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
    "/favicon.ico": ("favicon.svg", "image/svg+xml"),
}
KEEPALIVE_S = 10.0
MAX_BODY = 4096


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
            if op == "instruction":
                # A language policy's task, changed between episodes (the actuator refuses during one: 409).
                text = _pick(body, "text", str).get("text")
                if text is None:
                    raise CommandError(HTTPStatus.BAD_REQUEST, "text: expected the instruction (a string)")
                reply = commands.actuator("instruction", {"text": text})
                self.server.panel.set_instruction(reply.get("instruction"), reply.get("instruction_source"))
                return {"message": f"instruction set: {reply.get('instruction')!r}", "reply": reply}
            raise CommandError(HTTPStatus.NOT_FOUND, f"unknown episode command {op!r}: expected start, stop, "
                               "label, status or instruction")
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
