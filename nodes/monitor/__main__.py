"""Web monitor: a live panel of the whole pipeline, pushed to the browser with server-sent events.

    python -m nodes.monitor --config configs/lift.yaml      # then open http://127.0.0.1:9000

What it shows: every camera (JPEG-encoded *here*, at most ``monitor.frame_hz`` per camera, never in
the control loop), joint states and executed actions over time with the replayed ground truth
overlaid, policy round trip and inference time per chunk, queue depth, holds and faults with their
reasons, the actuator's loop statistics, the policy node's capacity (chunks/s, sessions, batch sizes, queue
wait: its ``ping`` reply, asked over the policy link), and every node's state from supervisord's XML-RPC
interface plus its readiness file. Buttons: restart a node (supervisord), start an episode, stop it with a
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

The room: ``panel`` (panel state and the browser push hub), ``commands`` (actuator control socket and
supervisord), ``http`` (the HTTP server and handler), ``static/`` (the page); this module holds the
threads and ``main``. It may import ``common`` and its own room.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from common.config import DeploymentConfig
from common.node import Readiness, start_node
from common.streams import pipeline_endpoints
from common.wire.transport import LatestSubscriber, SocketFactory
from nodes.monitor.commands import PROGRAM, CommandError, Commands
from nodes.monitor.http import MonitorServer
from nodes.monitor.panel import EventHub, PanelState

log = logging.getLogger("monitor")

INSTRUCTION_ASK_S = 5.0  # how often the actuator's status is asked for its instruction until known
NODES_PERIOD_S = 1.0
POLICY_PERIOD_S = 2.0  # how often the policy node is asked for its capacity figures (a ping)


# --------------------------------------------------------------------------------------------------
# Threads and main
# --------------------------------------------------------------------------------------------------


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
    asked = 0.0
    while not stop.is_set():
        panel.set_nodes(commands.poll_nodes())
        if panel.instruction["text"] is None and time.monotonic() - asked > INSTRUCTION_ASK_S:
            # Not told yet (no instruction or episode_start event since the monitor started): ask the actuator,
            # now and then only, so a button never waits long behind the question while the actuator is down.
            asked = time.monotonic()
            try:
                reply = commands.actuator("status", {})
                panel.set_instruction(reply.get("instruction"), reply.get("instruction_source"))
            except CommandError:
                pass
        stop.wait(NODES_PERIOD_S)


def poll_policy(panel: PanelState, commands: Commands, stop: threading.Event) -> None:
    """The policy node's capacity (chunks/s, sessions, batch sizes, queue wait), asked over the policy link.
    This thread owns the policy client and closes it when it stops: the shutdown waits for it only 2 s, while a
    ping to a dead policy may take ``monitor.control_timeout_s`` per attempt."""
    try:
        while not stop.is_set():
            panel.set_capacity(commands.policy_capacity())
            stop.wait(POLICY_PERIOD_S)
    finally:
        commands.close_policy()


def run(config: DeploymentConfig, stop: threading.Event, readiness: Readiness) -> None:
    hub = EventHub()
    panel = PanelState(config, hub)
    factory = SocketFactory()
    commands = Commands(config, factory, panel)
    subscriber = LatestSubscriber(factory, pipeline_endpoints(config), hwm=64)
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
        threading.Thread(target=poll_policy, args=(panel, commands, stop), name="policy", daemon=True),
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
    started = start_node(PROGRAM, "armpipe web monitor", argv)
    run(started.config, started.stop, started.readiness)
    return 0


if __name__ == "__main__":
    sys.exit(main())
