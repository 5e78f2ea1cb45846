"""Cross-session batching: the requests of many robots, each in its own session, run as one model call.

Two threads share the work. The socket thread (``nodes.policy.__main__``) reads requests, decodes and checks
them (``PolicyRuntime.check``: msgpack, every field, on a CPU the JPEG images) and answers at once what
needs no model (``metadata``, ``ping``, any bad request). ``infer`` and ``reset`` go to the
``BatchScheduler``, whose model thread takes, each time the model comes free, the oldest waiting request of
every session (up to ``policy.max_batch``) and runs them as one batch (``PolicyRuntime.infer_batch``), then
hands the replies back to the socket thread, which sends them.

Fairness and isolation:

- One queue per session, of at most ``SESSION_QUEUE`` requests. A new ``infer`` replaces the session's
  ``infer`` still waiting (the robot's newest observation is the one worth answering); the replaced one is
  answered with an ``error`` whose field is ``superseded`` (docs/protocol.md). A request beyond the bound,
  or from a new session while ``policy.max_sessions`` sessions are waiting, is answered with a ``busy``
  error at once.
- A batch takes at most one request per session, sessions in the order they started waiting, so a client
  that floods gets one row per batch like any other, and waits like any other.
- Bad requests never reach the model thread; a request that fails in the model fails alone
  (``infer_batch`` runs the batch's requests one by one when the batch as a whole fails).
- ``reset`` runs on the model thread, in the session's order with its ``infer`` requests.

``Capacity`` counts what the batches did (chunks/s, sessions served, batch sizes, queue wait) for the node's log,
its readiness file (``make status``) and its ``ping`` replies (the panel).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue
from typing import Any

from common.wire.protocol import Message, ProtocolError
from nodes.policy.io import Observation
from nodes.policy.runtime import BatchItem, ChunkResult, PolicyRuntime

log = logging.getLogger("policy")

SESSION_QUEUE = 4  # requests one session may have waiting (a new infer replaces a waiting one; resets queue)


@dataclass
class Waiting:
    """A checked ``infer`` or ``reset`` request waiting for the model thread."""

    envelope: list[bytes]
    request: Message
    op: str
    client: str
    received_at: float  # time.perf_counter(): its frames were read
    unpacked_at: float  # ... and decoded
    obs: Observation | None = None  # infer: the checked observation
    checked_s: float = 0.0
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class Done:
    """A request's outcome for the socket thread to send: a chunk, an error, or None (a reset done)."""

    waiting: Waiting
    result: ChunkResult | Exception | None


class Capacity:
    """What the batches did over the last ``period_s``: logged once per period and kept for the readiness file."""

    def __init__(self, max_batch: int, period_s: float = 10.0) -> None:
        self.max_batch = max_batch
        self.period_s = period_s
        self.lock = threading.Lock()
        self.since = time.monotonic()
        self.sizes: list[int] = []
        self.waits_ms: list[float] = []
        self.totals_ms: list[float] = []
        self.superseded = 0
        self.refused = 0
        self.failed = 0
        self.clients: set[str] = set()
        # Seconds each thread was busy: the model thread running batches, the socket thread reading, checking and
        # answering requests. Near the whole period, that thread is what limits the node.
        self.busy_s = {"model": 0.0, "socket": 0.0}
        self.last: dict[str, Any] = {"max_batch": max_batch, "chunks_per_s": 0.0, "period_s": 0.0}

    def add_batch(self, waits_s: list[float], totals_s: list[float], failed: int, clients: Iterable[str] = ()) -> None:
        with self.lock:
            self.clients.update(clients)
            self.sizes.append(len(waits_s))
            self.waits_ms.extend(wait * 1000 for wait in waits_s)
            self.totals_ms.extend(total * 1000 for total in totals_s)
            self.failed += failed

    def add_busy(self, thread: str, seconds: float) -> None:
        with self.lock:
            self.busy_s[thread] += seconds

    def count(self, *, superseded: int = 0, refused: int = 0) -> None:
        with self.lock:
            self.superseded += superseded
            self.refused += refused

    def roll(self, now: float | None = None) -> dict[str, Any] | None:
        """At the end of a period: log it, keep it as ``last`` and return it (None within a period)."""
        now = time.monotonic() if now is None else now
        elapsed = now - self.since
        if elapsed < self.period_s:
            return None
        with self.lock:
            sizes, waits, totals = self.sizes, sorted(self.waits_ms), sorted(self.totals_ms)
            superseded, refused, failed, sessions = self.superseded, self.refused, self.failed, len(self.clients)
            self.sizes, self.waits_ms, self.totals_ms, self.clients = [], [], [], set()
            busy, self.busy_s = self.busy_s, {"model": 0.0, "socket": 0.0}
            self.superseded = self.refused = self.failed = 0
            self.since = now
        chunks = len(totals)
        figures: dict[str, Any] = {
            "period_s": round(elapsed, 1), "chunks": chunks, "chunks_per_s": round(chunks / elapsed, 1),
            "batches": len(sizes), "batch_mean": round(sum(sizes) / len(sizes), 2) if sizes else 0.0,
            "batch_max": max(sizes, default=0), "max_batch": self.max_batch,
            "queue_ms_p50": round(_quantile(waits, 0.5), 2), "queue_ms_p99": round(_quantile(waits, 0.99), 2),
            "total_ms_p50": round(_quantile(totals, 0.5), 2), "total_ms_max": round(totals[-1], 2) if totals else 0.0,
            "superseded": superseded, "refused_busy": refused, "failed": failed, "sessions": sessions,
            "model_busy": round(busy["model"] / elapsed, 3), "socket_busy": round(busy["socket"] / elapsed, 3)}
        self.last = figures
        if chunks or superseded or refused or failed:
            log.info("%d chunks in %.0f s (%.1f chunks/s, %d sessions): %d batches, size mean %.1f max %d "
                     "(max_batch %d); queue wait ms p50 %.1f p99 %.1f; total ms p50 %.1f, max %.1f; %d superseded, "
                     "%d refused busy, %d failed; busy: model thread %.0f %%, socket thread %.0f %%", chunks, elapsed,
                     figures["chunks_per_s"], sessions, len(sizes),
                     figures["batch_mean"], figures["batch_max"], self.max_batch, figures["queue_ms_p50"],
                     figures["queue_ms_p99"], figures["total_ms_p50"], figures["total_ms_max"], superseded, refused,
                     failed, 100 * figures["model_busy"], 100 * figures["socket_busy"])
        return figures


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class BatchScheduler:
    """Per-session queues and the model thread that runs their oldest requests as batches."""

    def __init__(self, runtime: PolicyRuntime, *, max_batch: int, window_s: float, max_sessions: int,
                 notify: Callable[[], None] = lambda: None, capacity: Capacity | None = None) -> None:
        self.runtime = runtime
        self.max_batch = max(1, min(max_batch, runtime.max_batch))
        self.window_s = max(0.0, window_s)
        self.max_sessions = max(1, max_sessions)
        self.notify = notify
        self.capacity = capacity or Capacity(self.max_batch)
        self.cond = threading.Condition()
        self.queues: OrderedDict[str, deque[Waiting]] = OrderedDict()  # sessions in the order they started waiting
        self.done: SimpleQueue[Done] = SimpleQueue()
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------ socket thread
    def submit(self, waiting: Waiting) -> list[Done]:
        """Queue a checked request; returns what must be answered at once (a superseded or a refused request)."""
        answered: list[Done] = []
        with self.cond:
            queue = self.queues.get(waiting.client)
            if queue is None:
                if len(self.queues) >= self.max_sessions:
                    self.capacity.count(refused=1)
                    return [Done(waiting, ProtocolError(
                        "meta.client", f"at most {self.max_sessions} sessions with requests waiting (policy."
                        "max_sessions): the policy node is busy, ask again", waiting.client))]
                queue = self.queues[waiting.client] = deque()
            if waiting.op == "infer" and queue and queue[-1].op == "infer":
                old = queue.pop()
                answered.append(Done(old, ProtocolError(
                    "superseded", f"the newest observation of session {old.client!r} (request seq "
                    f"{waiting.request.seq} arrived before this one reached the model; only the newest is answered)",
                    f"seq {old.request.seq}")))
                self.capacity.count(superseded=1)
            if len(queue) >= SESSION_QUEUE:
                self.capacity.count(refused=1)
                answered.append(Done(waiting, ProtocolError(
                    "meta.client", f"at most {SESSION_QUEUE} requests of one session waiting: the policy node is "
                    "busy with this session's earlier ones, ask again", waiting.client)))
            else:
                queue.append(waiting)
                self.cond.notify()
            if not queue:
                del self.queues[waiting.client]
        return answered

    def finished(self) -> list[Done]:
        """The outcomes the model thread has handed back since the last call."""
        out: list[Done] = []
        while True:
            try:
                out.append(self.done.get_nowait())
            except Empty:
                return out

    def waiting(self) -> int:
        with self.cond:
            return sum(len(queue) for queue in self.queues.values())

    # ------------------------------------------------------------------ model thread
    def start(self, stop: threading.Event) -> None:
        self.thread = threading.Thread(target=self.run, args=(stop,), name="policy-model", daemon=True)
        self.thread.start()

    def join(self, timeout_s: float = 10.0) -> None:
        if self.thread is not None:
            with self.cond:
                self.cond.notify_all()
            self.thread.join(timeout_s)

    def take(self, stop: threading.Event, timeout_s: float = 0.2) -> tuple[list[Waiting], list[Waiting]] | None:
        """The next batch: the resets due first, then at most one ``infer`` per session, oldest sessions first.
        Waits up to ``timeout_s`` for a request, then (``policy.batch_window_ms``) up to the window after the
        oldest waiting one for other sessions to join, never past a full batch."""
        with self.cond:
            if not self.queues:
                self.cond.wait(timeout_s)
                if not self.queues or stop.is_set():
                    return None
            if self.window_s > 0:
                until = min(queue[0].queued_at for queue in self.queues.values()) + self.window_s
                while len(self.queues) < self.max_batch and not stop.is_set():
                    left = until - time.perf_counter()
                    if left <= 0:
                        break
                    self.cond.wait(left)
            resets: list[Waiting] = []
            infers: list[Waiting] = []
            for client in list(self.queues):
                queue = self.queues[client]
                while queue and queue[0].op == "reset":
                    resets.append(queue.popleft())
                if queue and len(infers) < self.max_batch:
                    infers.append(queue.popleft())
                if queue:
                    self.queues.move_to_end(client)  # what it has left waits behind the others
                else:
                    del self.queues[client]
            return resets, infers

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            taken = self.take(stop)
            if taken is None:
                continue
            resets, infers = taken
            for waiting in resets:
                try:
                    self.runtime.reset(waiting.client)
                    self.done.put(Done(waiting, None))
                except Exception as exc:  # a bug must not end the model thread
                    log.exception("reset of session %s failed", waiting.client)
                    self.done.put(Done(waiting, exc))
            if infers:
                started = time.perf_counter()
                self.run_batch(infers)
                self.capacity.add_busy("model", time.perf_counter() - started)
            self.notify()

    def run_batch(self, infers: list[Waiting]) -> None:
        start = time.perf_counter()
        items = [BatchItem(waiting.client, waiting.obs, checked_s=waiting.checked_s, queued_s=start - waiting.queued_at)
                 for waiting in infers if waiting.obs is not None]
        if len(items) != len(infers):
            raise ValueError("an infer request reached the model thread unchecked")
        try:
            results: list[ChunkResult | Exception] = list(self.runtime.infer_batch(items))
        except Exception as exc:  # a bug or a device error: every request of the batch says so
            log.exception("a batch of %d failed", len(items))
            results = [exc] * len(items)
        for waiting, result in zip(infers, results, strict=True):
            if isinstance(result, Exception) and not isinstance(result, ProtocolError):
                log.error("client %s infer failed: %s: %s", waiting.client, type(result).__name__, result)
            self.done.put(Done(waiting, result))
        self.capacity.add_batch([item.queued_s for item in items],
                                [result.timings["total_s"] for result in results if isinstance(result, ChunkResult)],
                                sum(isinstance(result, Exception) for result in results),
                                [waiting.client for waiting in infers])
