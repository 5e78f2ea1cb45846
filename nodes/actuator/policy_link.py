"""The actuator's side of the policy link, as the control loop sees it: the policy's contract (checked against the
config at start and whenever the policy comes back; the actuator refuses to move on a mismatch, saying what
differs), the instruction a language policy needs, the requests (``submit_infer``) and what comes back: a chunk
checked and queued when it lands, or a failure that makes the loop hold (``policy_unreachable``,
``policy_error`` with a doubling back-off). The requests themselves run in ``nodes.actuator.policy_worker``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from common.config import DeploymentConfig
from common.node import Readiness
from common.wire.contract import PolicyContract, contract_differences, units_differences
from common.wire.policy_client import ChunkReply
from common.wire.transport import PeerUnavailable, RemoteError
from nodes.actuator.autostart import AutoStartWait
from nodes.actuator.core import ControlCore
from nodes.actuator.episodes import IDLE, EpisodeRecord
from nodes.actuator.holds import HOLD_MISSING_INPUT, HOLD_POLICY_ERROR, HOLD_POLICY_UNREACHABLE
from nodes.actuator.inputs import InputBook, Observation
from nodes.actuator.latency import LatencyTracker
from nodes.actuator.policy_worker import Job, JobResult, PolicyWorker
from nodes.actuator.publishing import EventStream
from nodes.actuator.refill import CoverageNotice

log = logging.getLogger("actuator")

CONTRACT_RECHECK_S = 2.0  # how often a refused (or unchecked) contract is asked for again
POLICY_ERROR_BACKOFF_S = 0.5  # after an error reply, wait this long before asking again ...
POLICY_ERROR_BACKOFF_MAX_S = 8.0  # ... doubling per error in a row up to this (a confused policy: no storm)


class PolicyLink:
    """The policy's contract, the instruction, the requests and their results; given what it acts on explicitly."""

    def __init__(self, config: DeploymentConfig, core: ControlCore, worker: PolicyWorker, inputs: InputBook,
                 events: EventStream, latency: LatencyTracker, readiness: Readiness, *,
                 start_episode: Callable[[object], EpisodeRecord], on_chunk_queued: Callable[[Job], None]) -> None:
        self.config = config
        self.settings = config.actuator
        self.core = core
        self.worker = worker
        self.inputs = inputs
        self.events = events
        self.latency = latency
        self.readiness = readiness  # cleared at start (common.node.start_node)
        self.start_episode = start_episode
        self.on_chunk_queued = on_chunk_queued  # a chunk's rows were just queued (real time: the phase follows it)
        self.started_at = time.monotonic()
        self.contract: PolicyContract | None = None
        self.answered = False  # a contract came from the policy at least once
        # The task in words for a language policy: actuator.instruction, changed between episodes by the control
        # socket's instruction op (with instruction_source: dataset, the fallback until the player sends a task).
        self.instruction = self.settings.instruction
        self._readiness_detail: dict[str, Any] | None = None  # what the readiness file says now
        self.needs_contract = True
        self.next_contract_check = 0.0
        self.next_request_at = 0.0
        self.auto_start_armed = self.settings.auto_start
        self.auto_start_due = False
        self.auto_start_waits = AutoStartWait(config) if self.settings.auto_start else None
        self.policy_errors = 0  # policy_error events, and how many came in a row (for the back-off)
        self.policy_error_streak = 0

    def handle_result(self, result: JobResult, now: float) -> None:
        job, error = result.job, result.error
        if error is not None:
            self._policy_failed(job, error)
            return
        if job.kind == "contract":
            assert result.contract is not None
            self.contract_checked(result.contract)
        elif job.kind == "infer":
            assert result.reply is not None
            self._chunk_arrived(job, result.reply, now)

    def _policy_failed(self, job: Job, error: Exception) -> None:
        if isinstance(error, PeerUnavailable):
            if self.core.policy_problem != HOLD_POLICY_UNREACHABLE:
                log.warning("policy unreachable (%s): %s", job.kind, error)
            self.core.on_policy_failure(HOLD_POLICY_UNREACHABLE, str(error))
            # A policy that comes back may be a different checkpoint: check its contract before using it.
            self.needs_contract = True
            self.next_contract_check = 0.0
            return
        if isinstance(error, RemoteError):
            text = (f"policy answered {job.kind} with an error: {error} (field {error.field!r}, "
                    f"expected {error.expected})")
        else:
            text = f"policy {job.kind} failed: {type(error).__name__}: {error}"
        self._policy_error(job.kind, text)

    def _policy_error(self, op: str, text: str) -> None:
        """Hold (``policy_error``), publish it, and wait before asking again: twice as long per error in a row."""
        log.error(text)
        self.core.on_policy_failure(HOLD_POLICY_ERROR, text)
        backoff = min(POLICY_ERROR_BACKOFF_S * 2 ** self.policy_error_streak, POLICY_ERROR_BACKOFF_MAX_S)
        self.policy_error_streak += 1
        self.policy_errors += 1
        self.next_request_at = time.monotonic() + backoff
        self.events.event("policy_error", op=op, message=text, count=self.policy_errors, backoff_s=backoff)

    def current_instruction(self) -> str:
        """The instruction the next infer request carries ("" when there is none): the dataset player's task under
        ``instruction_source: dataset`` once one came, else ``actuator.instruction`` (or what the control socket
        set)."""
        if self.settings.instruction_source == "dataset" and self.inputs.task:
            return self.inputs.task
        return self.instruction

    def _instruction_differences(self, contract: PolicyContract) -> list[str]:
        """A language policy needs an instruction before it may move (with instruction_source: dataset, the
        player's task may still bring one, so only the request waits for it)."""
        if not contract.takes_instruction or self.instruction or self.settings.instruction_source == "dataset":
            return []
        return [f"instruction: the policy ({contract.policy_type}) takes a language instruction and "
                "actuator.instruction is empty: set actuator.instruction in the config (or "
                "--actuator.instruction='pick up the cube'), send the control socket's instruction op, or set "
                "actuator.instruction_source: dataset to use the dataset player's task"]

    def contract_checked(self, contract: PolicyContract) -> None:
        differences = contract_differences(contract, self.config) + self._instruction_differences(contract)
        units = units_differences(contract, self.config)
        if units and self.settings.units_mismatch_intended:
            if contract.checkpoint_id != getattr(self.contract, "checkpoint_id", None):
                log.warning("the checkpoint's dataset stats disagree with the arms' units/limits; accepted because "
                            "actuator.units_mismatch_intended is true:\n  %s", "\n  ".join(units))
                self.events.event("units_mismatch", differences=units, intended=True,
                                    checkpoint_id=contract.checkpoint_id)
        else:
            differences += units
        was_ok = self.core.episodes.contract_ok
        self.contract = contract
        self.needs_contract = bool(differences)
        self.next_contract_check = time.monotonic() + CONTRACT_RECHECK_S
        if self.core.policy_problem == HOLD_POLICY_UNREACHABLE:
            self.core.on_policy_failure("", "")
        ended = self.core.set_contract(not differences, differences)
        if differences:
            if was_ok or not self.answered:
                log.error("policy contract does not match the config; refusing to move:\n  %s",
                          "\n  ".join(differences))
            self.events.event("contract_mismatch", differences=differences, checkpoint_id=contract.checkpoint_id)
            if ended is not None:
                self.events.episode("episode_stop", ended, reason="contract_mismatch")
        else:
            self._chunking_known(contract)
            if not was_ok:
                log.info("policy contract matches (%s %s, chunk %d, checkpoint %s%s)", contract.policy_type,
                         contract.device, contract.chunk_length, contract.checkpoint_id,
                         ", UNTRAINED" if contract.untrained else "")
                if self.auto_start_armed and self.core.episodes.state == IDLE:
                    self.auto_start_due = True  # started by maybe_auto_start once the programs it waits for are up
        if not self.answered:
            self.answered = True
            self._mark_ready()
        elif self.readiness.path.exists():
            self._mark_ready()  # a refusal that began or ended, or now differs: make status shows the current one

    def submit_infer(self, observation: Observation, obs_t: float, age: float, on_frame: bool = False) -> None:
        """Ask for the next chunk; under ``overlap: rtc`` with the rows that ran or will run meanwhile, and with the
        current instruction for a policy that takes one (none yet: no request, the loop holds saying why)."""
        instruction: str | None = None
        if self.contract is not None and self.contract.takes_instruction:
            instruction = self.current_instruction()
            if not instruction:
                self.core.on_policy_failure(HOLD_MISSING_INPUT, "no instruction yet: the dataset player's states carry "
                                            "no meta.task and actuator.instruction is empty")
                return
        prefix, delay = self.core.rtc_prefix(obs_t, age)
        self.worker.submit(Job("infer", self.core.generation, observation, obs_t=obs_t,
                               rtc_prefix=prefix, rtc_delay_rows=delay, instruction=instruction, on_frame=on_frame))

    def _chunking_known(self, contract: PolicyContract) -> None:
        """The contract's chunk length drives the refill; a refill_rows it cannot honour is said once."""
        rtc_rows = int(contract.extra.get("rtc_max_prefix_rows", 0) or 0)
        problem = self.core.set_chunk_rows(contract.chunk_length, rtc_rows)
        if problem:
            log.warning("%s", problem)
            self.events.event("schedule", covered=True, round_trip_p90_s=-1.0, inference_p90_s=-1.0,
                                chunk_rows=contract.chunk_length, fps=float(self.config.fps), message=problem)

    def round_trip_p90_s(self) -> float:
        measured = self.core.refill.round_trip()
        if measured is None:
            return -1.0
        return 0.0 if self.settings.lockstep else measured  # lockstep: frame time, the request is waited for

    def _schedule_notice(self, notice: CoverageNotice) -> None:
        """Said once per change: the round trip stopped (or started again) fitting inside a chunk."""
        if notice.covered:
            log.info("%s", notice.message)
        else:
            log.warning("%s", notice.message)
        self.events.event("schedule", covered=notice.covered, round_trip_p90_s=notice.round_trip_s,
                            inference_p90_s=notice.inference_s, chunk_rows=notice.chunk_rows, fps=notice.fps,
                            message=notice.message)

    def _chunk_problem(self, job: Job, reply: ChunkReply) -> str:
        """Why a reply cannot be used ("" when it can): it may only say what was asked. Its rows must be
        the contract's chunk_length of action_dim values, and its echoed obs_t the one this request sent
        (the chunk is timed by the sent one: a lying echo must not make old rows look new)."""
        actions = reply.actions
        rows = self.contract.chunk_length if self.contract is not None else None
        if actions.ndim != 2 or actions.shape[1] != self.core.dim:
            return (f"policy chunk refused: arrays[action] has shape {list(actions.shape)}, expected "
                    f"[rows, {self.core.dim}] ({self.core.dim} action values per row)")
        if actions.shape[0] == 0 or (rows is not None and actions.shape[0] != rows):
            return (f"policy chunk refused: arrays[action] has {actions.shape[0]} rows, the contract's chunk_length "
                    f"is {rows}")
        if not (math.isfinite(reply.obs_t) and reply.obs_t == float(job.obs_t)):
            return (f"policy chunk refused: meta.obs_t echoed {reply.obs_t!r}, the request sent {float(job.obs_t)!r} "
                    "(the policy must echo the observation time unchanged)")
        return ""

    def _chunk_arrived(self, job: Job, reply: ChunkReply, now: float) -> None:
        if job.generation != self.core.generation:
            return  # an episode boundary passed: the chunk is void anyway
        problem = self._chunk_problem(job, reply)
        if problem:
            self._policy_error("infer", problem)
            return
        # The round trip is the client's one pair of instants (request sent, reply read), the same the latency
        # chain reports. Lockstep waits for the chunk before the tick: in frame time its round trip is 0.
        round_trip = 0.0 if self.settings.lockstep else reply.round_trip_s
        notice = self.core.on_round_trip(round_trip, reply.timings.get("total_s"))
        if notice is not None:
            self._schedule_notice(notice)
        try:
            result = self.core.on_chunk(reply.actions, float(job.obs_t), now, job.generation, reply.guide)
        except ValueError as exc:
            self._policy_error("infer", f"policy chunk unusable: {exc}")
            return
        if result is None:
            return
        if job.observation is not None and result.accepted:
            self.latency.chunk_queued(float(job.obs_t), job.observation.stamps, reply.sent_t, reply.received_t,
                                      time.monotonic(), reply.timings)
            self.on_chunk_queued(job)
        self.policy_error_streak = 0
        self.events.event("chunk", arrays={"chunk": np.ascontiguousarray(reply.actions, dtype=np.float32)},
                            rows=result.rows, accepted=result.accepted, dropped_stale=result.dropped_stale,
                            blended=result.blended, replaced=result.replaced, obs_t=reply.obs_t, arrival_t=now,
                            round_trip_s=reply.round_trip_s, timings=reply.timings, batch=reply.batch,
                            queue_depth=self.core.queue.depth(now), refill_rows=self.core.refill.threshold(),
                            round_trip_p90_s=self.round_trip_p90_s(), rtc_delay_rows=job.rtc_delay_rows,
                            rtc_prefix_rows=0 if job.rtc_prefix is None else len(job.rtc_prefix))

    def _maybe_auto_start(self, now: float) -> None:
        """Start the auto-start episode once the contract matched and the programs it waits for are ready."""
        if not self.auto_start_due or self.core.episodes.state != IDLE or not self.core.episodes.contract_ok:
            return
        # Real time: every camera and arm first, since a tick without them holds and cannot become a recorded
        # frame. Lockstep ticks only on a delivered observation, so there is nothing to lose by starting, and
        # a lockstep feeder (the player, offline evaluation) may wait for the episode before its first frame.
        if not self.settings.lockstep and not self.inputs.complete():
            return
        if self.auto_start_waits is not None and not self.auto_start_waits.done(now):
            return
        self.auto_start_due = False
        self.start_episode(None)

    def check_contract(self, now: float) -> None:
        if self.needs_contract and self.worker.pending == 0 and now >= self.next_contract_check:
            self.next_contract_check = now + CONTRACT_RECHECK_S
            self.worker.submit(Job("contract"))
        wait = self.settings.contract_wait_s
        if not self.answered and wait > 0 and now - self.started_at > wait and not self.readiness.path.exists():
            log.warning("no contract from the policy at %s after %.1fs; ready, but refusing to start until it "
                        "answers", self.config.policy.endpoint, wait)
            self._mark_ready()
        self._maybe_auto_start(now)

    def _mark_ready(self) -> None:
        """Write the readiness file, or rewrite it when what it says changed. ``refusing`` (the generic key
        ``make status`` and the panel read): why this running node refuses to move, "" when it does not."""
        contract = "ok" if self.core.episodes.contract_ok else "mismatch" if self.answered else "unchecked"
        differences = list(self.core.episodes.differences)
        refusing = ""
        if contract == "mismatch":
            refusing = "refuses to move: the policy's contract does not match the config: " + "; ".join(differences)
        elif contract == "unchecked":
            refusing = f"refuses to start: no contract from the policy at {self.config.policy.endpoint} yet"
        detail = {"contract": contract, "differences": differences, "refusing": refusing,
                  "dry_run": self.settings.dry_run, "lockstep": self.settings.lockstep}
        if detail == self._readiness_detail:
            return
        self._readiness_detail = detail
        self.readiness.ready(**detail)
