"""The latency chain of one executed goal, from the camera's capture to the goal written to the bus: what
the two programs that build it share, the actuator (``nodes/actuator/latency.py``, its ``latency`` events) and
the latency bench (``bench/latency.py``, the same chain for its baselines and its tables).

A ``latency`` event (docs/protocol.md, section "The latency chain") carries ``stamps``, times on the robot's
monotonic clock (camera, state-reader and actuator share it: one machine), and the policy's own durations from
its reply's ``timings``, so the two machines' clocks never need to agree. ``stages`` turns both into
consecutive durations whose sum is exactly ``written_t - capture_t``. The recorder and the panel read the
finished events, not this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Robot-clock stamps, in the order the goal's information passes them.
STAMPS = ("capture_t", "published_t", "received_t", "sent_t", "replied_t", "scheduled_t", "executed_t",
          "written_t")

# (stage name, what it is): consecutive, non-overlapping; their sum is written_t - capture_t.
STAGES: tuple[tuple[str, str], ...] = (
    ("publish", "capture -> published: the sensor node's time from capture to handing the message to ZeroMQ"),
    ("to_actuator", "published -> received by the actuator: encoding (JPEG), transport, the actuator's poll"),
    ("to_request", "received -> request sent: the rest of the frame set, JPEG decode, building the request"),
    ("network", "round trip minus the policy's server time: both directions on the wire and in the sockets, "
                "and the encode of the reply as it is sent"),
    ("server_decode", "policy: unpack the frames, validate, decode JPEG, upload (unpack_s + decode_s)"),
    ("server_queue", "policy: waiting for the model while it runs another batch (queue_s; 0 from older servers)"),
    ("inference", "policy: normalise, model, unnormalise (preprocess_s + inference_s + postprocess_s)"),
    ("server_reply", "policy: the rest of its time, building the reply (server_s - unpack - total); the reply's one "
                     "encode, as the socket sends it, is in network"),
    ("to_queue", "reply received -> row scheduled: the worker hands the chunk to the control loop, which queues it"),
    ("to_tick", "row scheduled -> row executed: the row waits for the tick it is meant for"),
    ("bus_write", "row executed -> goal written: the bus writer's sync write of the goal positions"),
)
STAGE_NAMES = tuple(name for name, _ in STAGES)


class LatencyError(ValueError):
    """A latency record that cannot be turned into stages; names the field."""


def _number(values: Mapping[str, Any], key: str, where: str) -> float:
    value = values.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LatencyError(f"{where}.{key}: expected a finite number, got {value!r}")
    return float(value)


def stages(stamps: Mapping[str, Any], server: Mapping[str, Any]) -> dict[str, float]:
    """Consecutive stage durations (seconds, in ``STAGE_NAMES`` order) of one executed goal."""
    t = {key: _number(stamps, key, "stamps") for key in STAMPS}
    s = {key: _number(server, key, "server") for key in ("unpack_s", "decode_s", "preprocess_s", "inference_s",
                                                        "postprocess_s", "total_s", "server_s")}
    # queue_s came with cross-session batching; a server without it never queued (total_s has no wait in it).
    s["queue_s"] = _number(server, "queue_s", "server") if "queue_s" in server else 0.0
    round_trip = t["replied_t"] - t["sent_t"]
    return {
        "publish": t["published_t"] - t["capture_t"],
        "to_actuator": t["received_t"] - t["published_t"],
        "to_request": t["sent_t"] - t["received_t"],
        "network": round_trip - s["server_s"],
        "server_decode": s["unpack_s"] + s["decode_s"],
        "server_queue": s["queue_s"],
        "inference": s["preprocess_s"] + s["inference_s"] + s["postprocess_s"],
        "server_reply": s["server_s"] - s["unpack_s"] - s["total_s"],
        "to_queue": t["scheduled_t"] - t["replied_t"],
        "to_tick": t["executed_t"] - t["scheduled_t"],
        "bus_write": t["written_t"] - t["executed_t"],
    }
