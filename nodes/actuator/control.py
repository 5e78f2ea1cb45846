"""The actuator's control socket: ``start``, ``stop``, ``label``, ``instruction``, ``backlog`` and ``status`` from
the monitor, the recorder, the tools and the tests (``common.wire.actuator_client`` is the client). A handler given
what it acts on explicitly: the core (episodes, holds, queue), the loop's episode start, the policy link (contract,
instruction), the backlog, the buses and the events publisher. The control loop calls ``serve`` when a request is
waiting; each request gets one reply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from common.config import DeploymentConfig
from common.wire.protocol import (
    CONTROL_OPS,
    INSTRUCTION_KEY,
    KIND_REPLY,
    KIND_REQUEST,
    Message,
    ProtocolError,
    check_instruction,
    decode,
    error_message,
)
from common.wire.transport import RouterServer
from nodes.actuator import PROGRAM
from nodes.actuator.backlog import Backlog
from nodes.actuator.bus_writer import Buses
from nodes.actuator.core import ControlCore
from nodes.actuator.episodes import RUNNING, STOPPING, EpisodeError, EpisodeRecord
from nodes.actuator.policy_link import PolicyLink
from nodes.actuator.publishing import EventStream

log = logging.getLogger("actuator")


class ControlHandler:
    """One reply per control request; an unknown op or a refused episode change is an error naming the field."""

    def __init__(self, socket: RouterServer, config: DeploymentConfig, core: ControlCore, *,
                 start_episode: Callable[[object], EpisodeRecord], policy: PolicyLink, backlog: Backlog,
                 buses: Buses, events: EventStream) -> None:
        self.control = socket
        self.settings = config.actuator
        self.core = core
        self.start_episode = start_episode
        self.policy = policy
        self.backlog = backlog
        self.buses = buses
        self.events = events

    def serve(self) -> None:
        """Answer every request waiting on the socket."""
        while (request := self.control.receive(0.0)) is not None:
            self._handle_control(*request)

    def _handle_control(self, envelope: list[bytes], frames: list[Any]) -> None:
        try:
            request = decode(frames)
        except ProtocolError as exc:
            self.control.reply(envelope, error_message(exc, src=PROGRAM))
            return
        op = str(request.meta.get("op", ""))
        try:
            if request.kind != KIND_REQUEST:
                raise ProtocolError("kind", "request", request.kind)
            if op not in CONTROL_OPS:
                raise ProtocolError("meta.op", f"one of {list(CONTROL_OPS)}", op)
            meta = getattr(self, f"_op_{op}")(request.meta)
            reply = Message(kind=KIND_REPLY, src=PROGRAM, seq=request.seq, meta={"op": op, **meta})
        except (ProtocolError, EpisodeError) as exc:
            log.info("control %s refused: %s", op or "?", exc)
            reply = error_message(exc, src=PROGRAM, seq=request.seq, op=op)
        except Exception as exc:  # a bug must not take the control loop down: answer, log, carry on
            log.exception("control %s failed", op)
            reply = error_message(exc, src=PROGRAM, seq=request.seq, op=op)
        try:
            self.control.reply(envelope, reply)
        except ProtocolError as exc:
            # A reply the wire cannot carry (over the header limit, a field it does not allow) is a bug in the op,
            # not a reason to end the control loop: the client gets an error naming what failed, the loop goes on.
            log.error("control %s: the reply could not be encoded: %s", op or "?", exc)
            self.control.reply(envelope, error_message(exc, src=PROGRAM, seq=request.seq, op=op))

    def _op_start(self, meta: dict[str, Any]) -> dict[str, Any]:
        record = self.start_episode(meta.get("episode_index"))
        return {"episode_index": record.index, "state": self.core.episodes.public_state}

    def _op_stop(self, meta: dict[str, Any]) -> dict[str, Any]:
        record = self.core.stop(meta.get("label", ""))
        self.events.episode("episode_stop", record, reason="stop")
        log.info("episode %d stopped%s", record.index, f" ({record.label})" if record.label else "")
        return {"episode_index": record.index, "label": record.label, "state": self.core.episodes.public_state}

    def _op_label(self, meta: dict[str, Any]) -> dict[str, Any]:
        record = self.core.episodes.label(meta.get("label"), meta.get("episode_index"))
        self.events.episode("episode_label", record, reason="label")
        log.info("episode %d labelled %s", record.index, record.label)
        return {"episode_index": record.index, "label": record.label}

    def _op_instruction(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Change the instruction (``meta.text``) between episodes; the next episode's requests carry it."""
        episodes = self.core.episodes
        if episodes.state in (RUNNING, STOPPING):
            raise EpisodeError("meta.op", "an instruction change between episodes (stop the episode first)",
                               f"the instruction changes only between episodes: episode {episodes.episode_index} is "
                               f"{episodes.state}; stop it first")
        expected = "the task instruction as UTF-8 text of 1..512 bytes"
        if "text" not in meta:
            raise ProtocolError("meta.text", f"{expected} (field is missing)")
        try:
            text = check_instruction({INSTRUCTION_KEY: meta["text"]}, required=True)
        except ProtocolError as exc:
            raise ProtocolError("meta.text", exc.expected, exc.got) from None
        assert text is not None
        self.policy.instruction = text
        log.info("instruction set by %s: %r", meta.get("client", "?"), text)
        self.events.event("instruction", instruction=text, source=self.settings.instruction_source)
        if self.policy.contract is not None:
            self.policy.contract_checked(self.policy.contract)  # a refusal for want of an instruction ends now
        return {"instruction": self.policy.current_instruction(),
                "instruction_source": self.settings.instruction_source, "state": episodes.public_state}

    def _op_backlog(self, meta: dict[str, Any]) -> dict[str, Any]:
        """What a recorder restarted mid-episode missed (nodes/actuator/backlog.py; docs/protocol.md section 6)."""
        return self.backlog.serve(meta)

    def _op_status(self, meta: dict[str, Any]) -> dict[str, Any]:
        del meta
        episodes = self.core.episodes
        contract = self.policy.contract
        return {"state": episodes.public_state, "episode_index": episodes.episode_index,
                "holds": dict(self.core.holds), "ticks": self.core.ticks, "contract_ok": episodes.contract_ok,
                "differences": episodes.differences, "hold_reason": self.core.hold_reason or "",
                "queue_depth": len(self.core.queue), "dry_run": self.settings.dry_run,
                "lockstep": self.settings.lockstep,
                "instruction": self.policy.current_instruction(),
                "instruction_source": self.settings.instruction_source,
                "checkpoint_id": contract.checkpoint_id if contract else "",
                "untrained": bool(contract.untrained) if contract else False,
                "last_stopped": episodes.last_stopped.index if episodes.last_stopped else -1,
                "last_label": episodes.last_stopped.label if episodes.last_stopped else "",
                "bus": self.buses.status()}
