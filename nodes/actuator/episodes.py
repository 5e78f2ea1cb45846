"""The actuator's episode state machine: idle -> running -> stopping (to the rest pose) -> idle.

``refused`` overlays all of it: while the policy's contract disagrees with the config no episode may
start, and a running one is ended. Commands that make no sense in the current state raise
``EpisodeError`` naming the meta field at fault, so the control socket can answer with a clear error.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

IDLE = "idle"
RUNNING = "running"
STOPPING = "stopping"
REFUSED = "refused"
LABELS = ("success", "failure")


class EpisodeError(ValueError):
    """A control command that cannot be carried out; ``field`` names the offending request field."""

    def __init__(self, field: str, expected: str, message: str) -> None:
        self.field = field
        self.expected = expected
        super().__init__(message)


@dataclass
class EpisodeRecord:
    index: int
    label: str = ""
    stop_reason: str = ""
    # The episode's identity in every event and tick: the index starts again at 0 when the actuator restarts,
    # this does not (the recorder keys episodes by it).
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    ticks: int = 0  # ticks published during the episode (their episode_tick numbers are 0..ticks-1)


@dataclass
class Episodes:
    """Which episode runs, which ones ended, and their labels."""

    state: str = IDLE
    current: EpisodeRecord | None = None
    last_stopped: EpisodeRecord | None = None
    next_index: int = 0
    contract_ok: bool = False
    differences: list[str] = field(default_factory=list)
    stopped: dict[int, EpisodeRecord] = field(default_factory=dict)

    @property
    def episode_index(self) -> int:
        """The running (or stopping) episode's index, -1 when none."""
        return self.current.index if self.current is not None and self.state in (RUNNING, STOPPING) else -1

    @property
    def active(self) -> EpisodeRecord | None:
        """The running (or stopping) episode's record, None when none."""
        return self.current if self.state in (RUNNING, STOPPING) else None

    @property
    def public_state(self) -> str:
        return REFUSED if not self.contract_ok and self.state == IDLE else self.state

    # ------------------------------------------------------------------ contract
    def set_contract(self, ok: bool, differences: list[str]) -> EpisodeRecord | None:
        """Record the latest contract check; a mismatch ends a running episode (returned)."""
        self.contract_ok = ok
        self.differences = list(differences)
        if not ok and self.state == RUNNING:
            return self._end("contract_mismatch", label="")
        if not ok and self.state == STOPPING:
            # Already ended (and maybe labelled): only the move to the rest pose is abandoned.
            self.state = IDLE
            self.current = None
        return None

    # ------------------------------------------------------------------ commands
    def start(self, episode_index: object = None) -> EpisodeRecord:
        if not self.contract_ok:
            detail = "; ".join(self.differences) or "the policy's contract has not been checked yet (is it up?)"
            raise EpisodeError("op", "a policy whose contract matches the config",
                               f"refusing to start: {detail}")
        if self.state == RUNNING:
            assert self.current is not None
            raise EpisodeError("op", "start while no episode is running",
                               f"episode {self.current.index} is already running; stop it first")
        if episode_index is None:
            index = self.next_index
        elif isinstance(episode_index, int) and not isinstance(episode_index, bool) and episode_index >= 0:
            index = episode_index
        else:
            raise EpisodeError("meta.episode_index", "a non-negative integer",
                               f"episode_index must be a non-negative integer, got {episode_index!r}")
        # Starting during the slow move to the rest pose abandons that move: the new episode takes over.
        self.current = EpisodeRecord(index=index)
        self.next_index = max(self.next_index, index + 1)
        self.state = RUNNING
        return self.current

    def stop(self, label: object = "", *, reason: str = "stop") -> EpisodeRecord:
        """End the running episode: the loop holds, then moves to the rest pose, then ``rest_reached``."""
        if self.state != RUNNING:
            raise EpisodeError("op", "stop while an episode is running", "no episode is running")
        label = self._check_label(label, allow_empty=True)
        record = self._end(reason, label=label)
        self.state = STOPPING
        self.current = record
        return record

    def rest_reached(self) -> None:
        if self.state == STOPPING:
            self.state = IDLE
            self.current = None

    def label(self, label: object, episode_index: object = None) -> EpisodeRecord:
        label = self._check_label(label, allow_empty=False)
        if episode_index is None:
            record = self.last_stopped
            if record is None:
                raise EpisodeError("meta.episode_index", "a stopped episode to label", "no episode has stopped yet")
        else:
            record = self.stopped.get(episode_index) if isinstance(episode_index, int) else None
            if record is None:
                raise EpisodeError("meta.episode_index", f"one of the stopped episodes {sorted(self.stopped)}",
                                   f"episode_index {episode_index!r} is not a stopped episode")
        record.label = label
        return record

    # ------------------------------------------------------------------ helpers
    def _end(self, reason: str, label: str) -> EpisodeRecord:
        assert self.current is not None
        record = self.current
        record.label = label
        record.stop_reason = reason
        self.stopped[record.index] = record
        self.last_stopped = record
        self.current = None
        self.state = IDLE
        return record

    @staticmethod
    def _check_label(label: object, *, allow_empty: bool) -> str:
        if label is None and allow_empty:
            return ""
        if not isinstance(label, str) or (label not in LABELS and not (allow_empty and label == "")):
            raise EpisodeError("meta.label", f"one of {list(LABELS)}", f"label must be one of {list(LABELS)}, "
                               f"got {label!r}")
        return label
