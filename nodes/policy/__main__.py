"""Policy node: serves action chunks from a LeRobot checkpoint over ZeroMQ (ROUTER; sessions batched).

    python -m nodes.policy --config configs/lift.yaml [--policy.device=cuda --policy.cuda_graphs=true ...]

Ops (meta ``op``; sessions keyed by meta ``client``): ``metadata`` (the contract), ``infer`` (one chunk),
``reset`` (clears this client's history), ``ping``. Every failure is an ``error`` reply naming the
field; the node keeps serving. A checkpoint that does not fit the config is refused at start (exit 2,
started once: ``common.refusal``). All the model work lives in ``nodes.policy.runtime`` and the other
``nodes.policy`` modules it uses; this file is the socket loop: it decodes and checks requests, answers
what needs no model, and hands ``infer`` / ``reset`` to the model thread of ``nodes.policy.batching``, which
runs the waiting requests of different sessions as one batch and hands the replies back to be sent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any

import msgpack
import zmq

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
    error_message,
)
from common.wire.transport import RouterServer, SocketFactory
from nodes.policy.batching import BatchScheduler, Capacity, Done, Waiting
from nodes.policy.checkpoint import CheckpointError, keep_unused_transformers_out
from nodes.policy.runtime import MAX_CLIENT_ID_LEN, PolicyRuntime
from nodes.policy.standby import ServingLock, bind_when_free

PROGRAM = "policy"
MAX_READS_PER_WAKE = 256  # requests read in a row before the loop sends the replies that are ready

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


class PolicyServer:
    """The socket side of the node: answers what needs no model at once, hands ``infer`` and ``reset`` to the
    batch scheduler, and sends the replies the model thread hands back."""

    def __init__(self, runtime: PolicyRuntime, server: RouterServer, scheduler: BatchScheduler) -> None:
        self.runtime = runtime
        self.server = server
        self.scheduler = scheduler
        self.served = 0
        self.errors = 0

    def on_request(self, envelope: list[bytes], frames: list[Any], received_at: float) -> None:
        """Take one request: ``received_at`` (``time.perf_counter()`` when its frames were read) starts the
        reply's ``timings.server_s``."""
        reply = self.intake(envelope, frames, received_at)
        if reply is not None:
            self.send(envelope, reply)

    def intake(self, envelope: list[bytes], frames: list[Any], received_at: float) -> Message | None:
        """The reply to send now, or None when the request waits for the model thread."""
        try:
            request = decode(frames)
            unpacked_at = time.perf_counter()
        except ProtocolError as exc:
            self.errors += 1
            log.warning("undecodable request: %s", exc)
            return error_message(exc, src=PROGRAM, seq=request_seq(frames))
        op = str(request.meta.get("op", ""))
        try:
            outcome = self.dispatch(request, op, envelope, received_at, unpacked_at)
        except ProtocolError as exc:
            self.errors += 1
            log.warning("client %s op %s refused: %s", request.meta.get("client"), op, exc)
            return error_message(exc, src=PROGRAM, seq=request.seq, op=op, obs_t=_obs_t(request))
        except Exception as exc:  # a bug must not take the node down
            self.errors += 1
            log.exception("client %s op %s failed", request.meta.get("client"), op)
            failure = ProtocolError("inference", "a request the policy can run", f"{type(exc).__name__}: {exc}")
            return error_message(failure, src=PROGRAM, seq=request.seq, op=op, obs_t=_obs_t(request))
        if isinstance(outcome, Message):
            return outcome
        for done in self.scheduler.submit(outcome):  # a superseded or refused request is answered now
            self.send_done(done)
        return None

    def dispatch(self, request: Message, op: str, envelope: list[bytes], received_at: float,
                 unpacked_at: float) -> Message | Waiting:
        if request.kind != KIND_REQUEST:
            raise ProtocolError("kind", f"'{KIND_REQUEST}'", request.kind)
        if op not in POLICY_OPS:
            raise ProtocolError("meta.op", f"one of {list(POLICY_OPS)}", op)
        client = request.meta["client"]
        if not client or len(client) > MAX_CLIENT_ID_LEN:
            raise ProtocolError("meta.client", f"a session id of 1..{MAX_CLIENT_ID_LEN} characters", client)
        if op == "metadata":
            return self.reply_to(request, op, contract=self.runtime.contract.to_meta())
        if op == "ping":  # the capacity figures of the last period too: the panel reads them from here
            return self.reply_to(request, op, server_time=time.monotonic(), capacity=self.scheduler.capacity.last)
        waiting = Waiting(envelope=envelope, request=request, op=op, client=client, received_at=received_at,
                          unpacked_at=unpacked_at)
        if op == "infer":
            checking = time.perf_counter()
            waiting.obs = self.runtime.check(request)  # a bad observation is answered here, never queued
            waiting.checked_s = time.perf_counter() - checking
            waiting.queued_at = time.perf_counter()
        return waiting

    def reply_to(self, request: Message, op: str, **meta: Any) -> Message:
        return Message(kind=KIND_REPLY, src=PROGRAM, seq=request.seq,
                       meta={"op": op, "client": request.meta["client"], **meta})

    def send_done(self, done: Done) -> None:
        waiting, result = done.waiting, done.result
        request = waiting.request
        if result is None:  # a reset
            reply = self.reply_to(request, waiting.op)
        elif isinstance(result, Exception):
            self.errors += 1
            failure = result if isinstance(result, ProtocolError) else ProtocolError(
                "inference", "a request the policy can run", f"{type(result).__name__}: {result}")
            if failure.field != "superseded":
                log.warning("client %s op %s refused: %s", waiting.client, waiting.op, failure)
            reply = error_message(failure, src=PROGRAM, seq=request.seq, op=waiting.op, obs_t=_obs_t(request))
        else:
            reply = self.reply_to(request, waiting.op, obs_t=request.meta["obs_t"], timings=result.timings,
                                  batch=result.batch_size)
            reply.arrays["action"] = result.actions
            if self.runtime.rtc_max_rows and len(result.guide):
                reply.arrays[RTC_GUIDE_KEY] = result.guide
            result.timings["unpack_s"] = waiting.unpacked_at - waiting.received_at
            # The reply is encoded once, as it is sent: server_s ends here, and that encode (a header cannot time
            # itself) falls in the client's network stage, so every part of server_s lies inside its round trip.
            result.timings["server_s"] = time.perf_counter() - waiting.received_at
            self.served += 1
        self.send(waiting.envelope, reply)

    def send(self, envelope: list[bytes], reply: Message) -> None:
        try:
            self.server.reply(envelope, reply)
        except ProtocolError as exc:  # a reply we could not encode: say so instead of going silent
            log.error("could not encode reply: %s", exc)
            self.server.reply(envelope, error_message(exc, src=PROGRAM, seq=reply.seq))


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
    keep_unused_transformers_out(config.resolve(config.policy.checkpoint))
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
    # The model thread wakes the socket loop through a pipe when replies are ready (a zmq socket belongs to
    # one thread: only this one touches the ROUTER).
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)

    def wake() -> None:
        with contextlib.suppress(BlockingIOError):  # the pipe is full: the loop is awake already
            os.write(wake_write, b"\0")

    settings = config.policy
    max_batch = max(1, min(settings.max_batch, runtime.max_batch))
    scheduler = BatchScheduler(runtime, max_batch=max_batch, window_s=settings.batch_window_ms / 1000,
                               max_sessions=settings.max_sessions, notify=wake,
                               capacity=Capacity(max_batch, period_s=settings.capacity_period_s))
    log.info("batching: up to %d requests of different sessions per model call%s, window %.1f ms",
             scheduler.max_batch, "" if runtime.max_batch > 1 else f" ({contract.policy_type}: one at a time)",
             scheduler.window_s * 1000)
    policy_server = PolicyServer(runtime, server, scheduler)
    serving_detail = {**ready_detail, "serving": True, "standby": False}
    readiness.ready(**serving_detail, capacity=scheduler.capacity.last)
    scheduler.start(stop)
    poller = zmq.Poller()
    poller.register(server.sock, zmq.POLLIN)
    poller.register(wake_read, zmq.POLLIN)
    try:
        while not stop.is_set():
            events = dict(poller.poll(200))
            busy_from = time.perf_counter()
            if wake_read in events:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_read, 4096)
            for done in scheduler.finished():
                policy_server.send_done(done)
            if server.sock in events:
                for _ in range(MAX_READS_PER_WAKE):  # what has arrived, then the replies again
                    received = server.receive(timeout_s=0)
                    if received is None:
                        break
                    policy_server.on_request(*received, time.perf_counter())
            scheduler.capacity.add_busy("socket", time.perf_counter() - busy_from)
            figures = scheduler.capacity.roll()
            if figures is not None:
                readiness.update(**serving_detail, capacity=figures)
    finally:
        readiness.clear()
        scheduler.join()
        server.close()
        factory.close()
        lock.release()
        os.close(wake_read)
        os.close(wake_write)
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
