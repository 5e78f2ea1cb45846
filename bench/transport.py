"""Transport microbenchmark: one 3-camera observation round trip, side by side in one run.

    .venv/bin/python -m bench.transport [--iterations 300] [--only transports|curve] [--markdown FILE]

Payload (the issue's reference case): three 480x640x3 uint8 images plus 12 float32 state values, answered
by a 16x12 float32 chunk. Each server runs in its own process on loopback. Variants:

- ``armpipe``: the project's protocol — multipart, one frame per image, zero-copy send and
  ``np.frombuffer`` receive, REQ (Lazy Pirate client) -> ROUTER.
- ``msgpack-numpy 1 frame``: the same sockets, the whole observation packed into one msgpack-numpy frame.
- ``openpi websocket``: an openpi-style WebSocket server (msgpack over one socket, as openpi's
  ``WebsocketPolicyServer``) with the ``openpi-client`` package's ``WebsocketClientPolicy`` as client.
- ``2 in-memory copies``: copying the payload twice in memory, the floor any transport is measured against.

The CURVE section measures what authentication and encryption of the policy link (``common.wire.curve``)
add: the armpipe client and server with and without CURVE, both up at once and called alternately
(plain, CURVE, plain, ...) so a busy machine slows both alike, for raw frames and for JPEG frames
(quality 90, encoded by the client and decoded by the server on every call, as the actuator and the
policy node do). The images are the synthetic camera's test pattern, so JPEG sizes are those of a
camera picture rather than of noise.

Absolute times on a shared 2-core machine mean little; the ratios in the last column are the result.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import msgpack_numpy
import numpy as np
import zmq
import zmq.auth

from common.tools.keys import make_key_pair
from common.wire.curve import CurveKeys
from common.wire.policy_client import PolicyClient
from common.wire.protocol import KIND_REPLY, Message, decode, decode_images
from common.wire.transport import RouterServer, SocketFactory
from nodes.camera.backends import synthetic_pattern

log = logging.getLogger("bench.transport")

CAMERAS = ("front", "left_wrist", "right_wrist")
CHUNK = np.linspace(-1, 1, 16 * 12, dtype=np.float32).reshape(16, 12)


def make_observation() -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    images = {name: rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for name in CAMERAS}
    return images, np.arange(12, dtype=np.float32)


def camera_observation() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Three 480x640 synthetic camera pictures (what JPEG sees on a real camera, unlike noise)."""
    images = {name: np.ascontiguousarray(synthetic_pattern(name, 640, 480)[:, :640]) for name in CAMERAS}
    return images, np.arange(12, dtype=np.float32)


# ------------------------------------------------------------------------------------------ servers
def serve_armpipe(endpoint: str, ready: mp.Event, curve: CurveKeys | None = None) -> None:
    server = RouterServer(SocketFactory(curve=curve), endpoint)
    ready.set()
    while True:
        request = server.receive(1.0)
        if request is None:
            continue
        envelope, frames = request
        msg = decode_images(decode(frames))  # JPEG frames decoded as the policy node does
        # Touch the arrays as a real server would (views; no copy).
        _ = sum(int(a.reshape(-1)[0]) for a in msg.arrays.values())
        server.reply(envelope, Message(kind=KIND_REPLY, seq=msg.seq, meta={"op": "infer", "obs_t": msg.meta["obs_t"]},
                                       arrays={"action": CHUNK}))


def serve_msgpack_one_frame(endpoint: str, ready: mp.Event) -> None:
    sock = zmq.Context.instance().socket(zmq.REP)
    sock.bind(endpoint)
    ready.set()
    packed_reply = msgpack.packb({"action": CHUNK}, default=msgpack_numpy.encode)
    while True:
        obs = msgpack.unpackb(sock.recv(copy=False).buffer, object_hook=msgpack_numpy.decode)
        _ = sum(int(a.reshape(-1)[0]) for a in obs.values() if isinstance(a, np.ndarray))
        sock.send(packed_reply)


def serve_openpi_websocket(port: int, ready: mp.Event) -> None:
    """Mirrors openpi's WebsocketPolicyServer: metadata on connect, then msgpack in / msgpack out."""
    import websockets.asyncio.server
    from openpi_client import msgpack_numpy as openpi_msgpack

    packer = openpi_msgpack.Packer()

    async def handler(websocket: websockets.asyncio.server.ServerConnection) -> None:
        await websocket.send(packer.pack({"server": "bench"}))
        async for message in websocket:
            obs = openpi_msgpack.unpackb(message)
            _ = sum(int(a.reshape(-1)[0]) for a in obs.values() if isinstance(a, np.ndarray))
            await websocket.send(packer.pack({"actions": CHUNK}))

    async def main() -> None:
        async with websockets.asyncio.server.serve(handler, "127.0.0.1", port, compression=None, max_size=None):
            ready.set()
            await asyncio.Future()

    asyncio.run(main())


# ------------------------------------------------------------------------------------------ clients
def time_calls(call: Callable[[], object], iterations: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(target: Callable[..., None], *args: object, **kwargs: object) -> mp.Process:
    ready = mp.Event()
    proc = mp.Process(target=target, args=(*args, ready), kwargs=kwargs, daemon=True)
    proc.start()
    if not ready.wait(30):
        raise RuntimeError(f"{target.__name__} did not start")
    return proc


def run(iterations: int) -> list[tuple[str, list[float]]]:
    images, state = make_observation()
    results: list[tuple[str, list[float]]] = []

    port = free_port()
    server = start(serve_armpipe, f"tcp://127.0.0.1:{port}")
    client = PolicyClient(SocketFactory(), f"tcp://127.0.0.1:{port}", client_id="bench", timeout_s=5.0)

    def armpipe_call() -> None:
        reply = client.infer(images, state, obs_t=time.monotonic())
        assert reply.actions.shape == (16, 12)

    results.append(("armpipe multipart zero-copy (ZeroMQ)", time_calls(armpipe_call, iterations)))
    client.close()
    server.terminate()

    port = free_port()
    server = start(serve_msgpack_one_frame, f"tcp://127.0.0.1:{port}")
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.connect(f"tcp://127.0.0.1:{port}")
    observation = {**{f"observation.images.{k}": v for k, v in images.items()}, "observation.state": state}

    def msgpack_call() -> None:
        sock.send(msgpack.packb(observation, default=msgpack_numpy.encode))
        reply = msgpack.unpackb(sock.recv(), object_hook=msgpack_numpy.decode)
        assert reply["action"].shape == (16, 12)

    results.append(("msgpack-numpy, one frame (ZeroMQ)", time_calls(msgpack_call, iterations)))
    sock.close(0)
    server.terminate()

    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    port = free_port()
    server = start(serve_openpi_websocket, port)
    policy = WebsocketClientPolicy(host="127.0.0.1", port=port)

    def openpi_call() -> None:
        assert policy.infer(observation)["actions"].shape == (16, 12)

    results.append(("openpi WebSocket (openpi-client 0.1.2)", time_calls(openpi_call, iterations)))
    server.terminate()

    payload = [*images.values(), state]

    def copy_twice() -> None:
        for array in payload:
            np.copy(np.copy(array))

    results.append(("2 in-memory copies of the payload", time_calls(copy_twice, iterations)))
    return results


def curve_keys(directory: Path) -> tuple[CurveKeys, CurveKeys]:
    """(server, client) keys made by the project's keys tool, the client allowed by the server."""
    allowed = directory / "allowed"
    _, server_secret = make_key_pair(directory, "server")
    _, client_secret = make_key_pair(allowed, "robot")
    public, secret = zmq.auth.load_certificate(server_secret)
    client_public, client_private = zmq.auth.load_certificate(client_secret)
    return (CurveKeys(server_public=public, server_secret=secret, allowed_clients_dir=str(allowed)),
            CurveKeys(server_public=public, client_public=client_public, client_secret=client_private))


def run_curve(iterations: int, warmup: int = 20) -> list[tuple[str, list[float], list[float]]]:
    """(frames, plain samples, CURVE samples) for raw and JPEG frames, plain and CURVE called alternately."""
    import tempfile

    images, state = camera_observation()
    rows: list[tuple[str, list[float], list[float]]] = []
    with tempfile.TemporaryDirectory() as keys_dir:
        server_keys, client_keys = curve_keys(Path(keys_dir))
        plain_port, curve_port = free_port(), free_port()
        servers = [start(serve_armpipe, f"tcp://127.0.0.1:{plain_port}"),
                   start(serve_armpipe, f"tcp://127.0.0.1:{curve_port}", curve=server_keys)]
        plain = PolicyClient(SocketFactory(), f"tcp://127.0.0.1:{plain_port}", client_id="plain", timeout_s=5.0)
        curve = PolicyClient(SocketFactory(curve=client_keys), f"tcp://127.0.0.1:{curve_port}", client_id="curve",
                             timeout_s=5.0)
        try:
            for label, jpeg in (("raw", False), ("JPEG q90", True)):
                samples: dict[str, list[float]] = {"plain": [], "curve": []}
                for index in range(warmup + iterations):
                    for name, client in (("plain", plain), ("curve", curve)):
                        start_t = time.perf_counter()
                        reply = client.infer(images, state, obs_t=time.monotonic(), jpeg=jpeg)
                        elapsed = time.perf_counter() - start_t
                        assert reply.actions.shape == (16, 12)
                        if index >= warmup:
                            samples[name].append(elapsed)
                rows.append((label, samples["plain"], samples["curve"]))
        finally:
            plain.close()
            curve.close()
            for server in servers:
                server.terminate()
    return rows


def jpeg_payload_bytes() -> int:
    from common.images import encode_jpeg

    images, _ = camera_observation()
    return sum(encode_jpeg(image, 90).nbytes for image in images.values())


def curve_markdown(rows: list[tuple[str, list[float], list[float]]], iterations: int) -> str:
    raw_bytes = 3 * 480 * 640 * 3
    sizes = {"raw": raw_bytes, "JPEG q90": jpeg_payload_bytes()}
    lines = [
        f"Round trip of one observation (3 synthetic-camera 480x640x3 frames + 12 float32) answered by a 16x12 "
        f"float32 chunk, plain TCP vs CURVE (`common.wire.curve`), {iterations} calls each after 20 warm-up, called "
        f"alternately; servers in separate processes on loopback. JPEG: encoded by the client and decoded by the "
        f"server on every call.",
        "",
        "| frames | bytes per request | plain median ms | CURVE median ms | CURVE adds (median) ms | plain p90 ms "
        "| CURVE p90 ms | CURVE / plain |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    added = {}
    for label, plain, curve in rows:
        p_med, c_med = statistics.median(plain), statistics.median(curve)
        added[label] = c_med - p_med
        lines.append(f"| {label} | {sizes[label]:,} | {p_med * 1e3:.2f} | {c_med * 1e3:.2f} "
                     f"| {added[label] * 1e3:+.2f} | {statistics.quantiles(plain, n=10)[-1] * 1e3:.2f} "
                     f"| {statistics.quantiles(curve, n=10)[-1] * 1e3:.2f} | {c_med / p_med:.2f} |")
    jpeg_added = added.get("JPEG q90", float("nan")) * 1e3
    lines += ["", f"- With JPEG frames CURVE adds **{jpeg_added:.2f} ms** per round trip (target: at most 1 ms)."]
    return "\n".join(lines)


def to_markdown(results: list[tuple[str, list[float]]], iterations: int) -> str:
    medians = {name: statistics.median(samples) for name, samples in results}
    ours = medians[results[0][0]]
    lines = [
        f"Round trip of one observation (3 x 480x640x3 uint8 + 12 float32) answered by a 16x12 float32 chunk; "
        f"{iterations} iterations after 20 warm-up, server in a separate process on loopback.",
        "",
        "| variant | median ms | p90 ms | median / armpipe |",
        "|---|---:|---:|---:|",
    ]
    for name, samples in results:
        p90 = statistics.quantiles(samples, n=10)[-1]
        lines.append(f"| {name} | {medians[name] * 1e3:.2f} | {p90 * 1e3:.2f} | {medians[name] / ours:.2f} |")
    websocket = medians[results[2][0]]
    copies = medians[results[3][0]]
    lines += [
        "",
        f"- armpipe vs WebSocket: **{websocket / ours:.1f}x faster** (target: at least 8x).",
        f"- armpipe vs two in-memory copies: **{ours / copies:.1f}x** the copy time (target: at most 8x).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--only", choices=["transports", "curve"], help="run one section (default: both)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tables = []
    if args.only != "curve":
        tables.append(to_markdown(run(args.iterations), args.iterations))
    if args.only != "transports":
        tables.append(curve_markdown(run_curve(args.iterations), args.iterations))
    text = "\n\n".join(tables)
    log.info("%s", text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
