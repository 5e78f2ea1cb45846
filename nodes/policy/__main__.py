"""Policy node: serves action chunks from a LeRobot checkpoint over ZeroMQ (ROUTER, one request at a time).

    python -m nodes.policy --config configs/lift.yaml [--policy.device=cuda --policy.cuda_graphs=true ...]

Ops (meta ``op``; sessions keyed by meta ``client``): ``metadata`` (the contract), ``infer`` (one chunk),
``reset`` (clears this client's history), ``ping``. Every failure is an ``error`` reply naming the
field; the node keeps serving. A checkpoint that does not fit the config is refused at start (exit 2,
started once: ``common.refusal``). All the model work lives in ``nodes.policy.runtime`` and the other
``nodes.policy`` modules it uses; this file is the loop.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import msgpack

from common.node import start_node
from common.refusal import process_age_s
from common.wire.contract import RTC_GUIDE_KEY
from common.wire.protocol import (
    KIND_REPLY,
    KIND_REQUEST,
    MAX_HEADER_BYTES,
    POLICY_OPS,
    Message,
    ProtocolError,
    decode,
    encode,
    error_message,
)
from common.wire.transport import RouterServer, SocketFactory
from nodes.policy.checkpoint import CheckpointError
from nodes.policy.runtime import MAX_CLIENT_ID_LEN, PolicyRuntime
from nodes.policy.standby import ServingLock, bind_when_free

PROGRAM = "policy"

log = logging.getLogger(PROGRAM)


def request_seq(frames: list[Any]) -> int:
    """The sequence number of a request that failed to decode, so the error reply still reaches the
    client (REQ clients discard replies whose seq differs). Plain msgpack, no numpy hook: nothing is
    ever unpickled here."""
    try:
        header_bytes = bytes(getattr(frames[0], "buffer", frames[0]))
        if len(header_bytes) > MAX_HEADER_BYTES:
            return 0
        header = msgpack.unpackb(header_bytes, raw=False, strict_map_key=False)
        seq = header.get("seq", 0) if isinstance(header, dict) else 0
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else 0
    except Exception:  # any garbage: the reply goes out with seq 0
        return 0


class TimingLog:
    """Logs the chunk times of the last ``period_s`` once per period, so a slow policy shows in its log
    (the actuator only sees the round trip; this separates inference from the network)."""

    def __init__(self, period_s: float = 10.0) -> None:
        self.period_s = period_s
        self.totals_ms: list[float] = []
        self.since = time.monotonic()

    def add(self, total_s: float) -> None:
        self.totals_ms.append(total_s * 1000)
        now = time.monotonic()
        if now - self.since >= self.period_s:
            ordered = sorted(self.totals_ms)
            log.info("%d chunks in %.0f s: total ms p50 %.1f, max %.1f", len(ordered), now - self.since,
                     ordered[len(ordered) // 2], ordered[-1])
            self.totals_ms.clear()
            self.since = now


class PolicyServer:
    def __init__(self, runtime: PolicyRuntime, server: RouterServer) -> None:
        self.runtime = runtime
        self.server = server
        self.served = 0
        self.errors = 0
        self.timing_log = TimingLog()

    def handle(self, frames: list[Any], received_at: float | None = None) -> Message:
        """Answer one request. ``received_at`` (``time.perf_counter()`` when its frames were read) starts
        the reply's ``timings.server_s``."""
        received_at = time.perf_counter() if received_at is None else received_at
        try:
            request = decode(frames)
            unpacked_at = time.perf_counter()
        except ProtocolError as exc:
            self.errors += 1
            log.warning("undecodable request: %s", exc)
            return error_message(exc, src=PROGRAM, seq=request_seq(frames))
        op = str(request.meta.get("op", ""))
        try:
            reply = self.dispatch(request, op)
        except ProtocolError as exc:
            self.errors += 1
            log.warning("client %s op %s refused: %s", request.meta.get("client"), op, exc)
            return error_message(exc, src=PROGRAM, seq=request.seq, op=op, obs_t=_obs_t(request))
        except Exception as exc:  # a bug or a device error must not take the node down
            self.errors += 1
            log.exception("client %s op %s failed", request.meta.get("client"), op)
            failure = ProtocolError("inference", "a request the policy can run", f"{type(exc).__name__}: {exc}")
            return error_message(failure, src=PROGRAM, seq=request.seq, op=op, obs_t=_obs_t(request))
        timings = reply.meta.get("timings")
        if isinstance(timings, dict):
            timings["unpack_s"] = unpacked_at - received_at
            add_encode_time(reply, received_at)
        return reply

    def dispatch(self, request: Message, op: str) -> Message:
        if request.kind != KIND_REQUEST:
            raise ProtocolError("kind", f"'{KIND_REQUEST}'", request.kind)
        if op not in POLICY_OPS:
            raise ProtocolError("meta.op", f"one of {list(POLICY_OPS)}", op)
        client = request.meta["client"]
        if not client or len(client) > MAX_CLIENT_ID_LEN:
            raise ProtocolError("meta.client", f"a session id of 1..{MAX_CLIENT_ID_LEN} characters", client)
        reply = Message(kind=KIND_REPLY, src=PROGRAM, seq=request.seq, meta={"op": op, "client": client})
        if op == "metadata":
            reply.meta["contract"] = self.runtime.contract.to_meta()
        elif op == "ping":
            reply.meta["server_time"] = time.monotonic()
        elif op == "reset":
            self.runtime.reset(client)
        else:
            result = self.runtime.infer(client, request)
            reply.meta["obs_t"] = request.meta["obs_t"]
            reply.meta["timings"] = result.timings
            reply.arrays["action"] = result.actions
            if self.runtime.rtc_max_rows and len(result.guide):
                reply.arrays[RTC_GUIDE_KEY] = result.guide
            self.served += 1
            self.timing_log.add(result.timings["total_s"])
        return reply


def add_encode_time(reply: Message, received_at: float) -> None:
    """Fill ``timings.encode_s`` and ``timings.server_s`` of an infer reply before it is sent.

    A header cannot hold the time it takes to encode itself, so the reply is encoded once here to measure
    it (the same fields, the same sizes: msgpack floats are fixed-width). ``server_s`` runs from the
    request's frames read to the end of that encode, which stands in for the one the socket does next;
    the real one falls in the client's ``network`` stage. Every part of ``server_s`` lies inside the
    client's round trip, so ``round trip - server_s`` is never negative, however the machine schedules us.
    """
    timings = reply.meta["timings"]
    timings["encode_s"] = timings["server_s"] = 0.0
    start = time.perf_counter()
    encode(reply)
    encoded = time.perf_counter()
    timings["encode_s"] = encoded - start
    timings["server_s"] = encoded - received_at


def _obs_t(request: Message) -> float | None:
    value = request.meta.get("obs_t")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def main(argv: list[str] | None = None) -> None:
    # Nothing is downloaded at run time: huggingface_hub and transformers (imported later, with LeRobot) read
    # this at import, so a missing tokenizer or VLM config is a refusal naming the files, never a wait on the
    # network (nodes.policy.vla).
    os.environ["HF_HUB_OFFLINE"] = "1"
    # Keys are loaded here, before the model: a wrong key file exits 2 at once, naming the file.
    started = start_node(PROGRAM, "armpipe policy node: serves LeRobot action chunks over ZeroMQ", argv,
                         curve_side="server", program=program_name())
    config, readiness, stop, curve = started.config, started.readiness, started.stop, started.curve
    imported_s = process_age_s()  # interpreter, torch and this node's modules (LeRobot's come next)
    loading = time.perf_counter()
    try:
        runtime = PolicyRuntime(config)
    except CheckpointError as exc:  # missing, unreadable or not matching the config: exit code 2, once
        started.refuse(f"checkpoint refused: {exc}")
    loaded_s = time.perf_counter() - loading
    contract = runtime.contract
    log.info("serving %s%s checkpoint %s (id %s) on %s: cameras %s, %d state -> %d x %d actions, %s",
             contract.policy_type, " UNTRAINED" if contract.untrained else "", contract.checkpoint_path,
             contract.checkpoint_id, contract.device, contract.cameras, len(contract.state_names),
             contract.chunk_length, len(contract.action_names), contract.extra)
    if contract.untrained:
        log.warning("the checkpoint's weights are UNTRAINED (armpipe.json): its actions are meaningless")
    warming = time.perf_counter()
    durations = runtime.warmup(config.policy.warmup)
    warmup_s = time.perf_counter() - warming
    if durations:
        log.info("warm-up: %d passes, last %.1f ms", len(durations), durations[-1] * 1000)

    # One line a restart can be judged by (bench/policy_restart.py reads it): where the start-up went.
    log.info("start-up: %.1f s to ready (imports %.1f s, LeRobot + checkpoint %.1f s, warm-up %.1f s)%s",
             process_age_s(), imported_s, loaded_s, warmup_s,
             f"; compile cache {runtime.compile_cache}" if runtime.compile_cache else "")
    log.info("start-up split of LeRobot + checkpoint: %s", runtime.startup.describe())

    # One process serves the endpoint; with policy.standby a second one, loaded, waits here to take over.
    lock = ServingLock(config.resolve(config.run_dir), config.policy.bind)
    ready_detail = {"endpoint": config.policy.bind, "checkpoint_id": contract.checkpoint_id,
                    "policy_type": contract.policy_type, "untrained": contract.untrained, "device": contract.device,
                    "curve": curve is not None}
    if not lock.try_acquire():
        readiness.ready(**ready_detail, serving=False, standby=True)
        if not lock.wait(stop):
            readiness.clear()
            return
        log.info("taking over %s: serving (%.1f s after start)", config.policy.bind, process_age_s())
    # With CURVE on (curve), only clients whose public key is in policy.allowed_clients_dir get a
    # handshake; the others never reach this loop (common.wire.curve logs each refused peer once).
    factory = SocketFactory(curve=curve)
    server = bind_when_free(factory, config.policy.bind, stop)
    if server is None:  # stopped while the old holder's port was still closing
        readiness.clear()
        factory.close()
        return
    policy_server = PolicyServer(runtime, server)
    readiness.ready(**ready_detail, serving=True, standby=False)
    try:
        while not stop.is_set():
            received = server.receive(timeout_s=0.2)
            if received is None:
                continue
            received_at = time.perf_counter()
            envelope, frames = received
            reply = policy_server.handle(frames, received_at)
            try:
                server.reply(envelope, reply)
            except ProtocolError as exc:  # a reply we could not encode: say so instead of going silent
                log.error("could not encode reply: %s", exc)
                server.reply(envelope, error_message(exc, src=PROGRAM, seq=reply.seq))
    finally:
        readiness.clear()
        server.close()
        factory.close()
        lock.release()
        log.info("stopped after %d chunks (%d errors, %d refused handshakes)", policy_server.served,
                 policy_server.errors, factory.refusals.refused)


def program_name() -> str:
    """``policy``, or the standby's own program name (``policy-standby``) where supervisord gives one: its
    readiness and refusal files must not be the serving process's."""
    name = os.environ.get("SUPERVISOR_PROCESS_NAME", "")
    return name if name.startswith(f"{PROGRAM}-") else PROGRAM


def exit_now() -> None:
    """End the process without the interpreter's teardown. Unloading torch and LeRobot takes seconds (5 s
    measured on the busy 2-core VM, after the loop had stopped in 0.2 s), and ``supervisorctl restart``
    waits for the old process to end before it starts the new one. By now the node has closed its socket
    and removed its readiness file; the logs are flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    exit_now()
