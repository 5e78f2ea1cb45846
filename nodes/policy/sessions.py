"""Per-client policy sessions: each client id has its own observation history (DiffusionPolicy's
``n_obs_steps``) and its own seeded noise generator, kept in a bounded LRU.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def session_seed(base_seed: int, client: str) -> int:
    """A stable 63-bit seed from ``policy.seed`` and the client id (Python's hash() is salted per process)."""
    digest = hashlib.sha256(f"{base_seed}:{client}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class Session:
    client: str
    seed: int
    generator: torch.Generator
    history: deque[Tensor]  # per-frame conditioning (diffusion) or nothing (single-frame policies)
    requests: int = 0
    last_used: float = field(default_factory=time.monotonic)

    def reset(self) -> None:
        self.history.clear()
        # Reseed as well, so an episode after a reset replays exactly like the first one.
        self.generator.manual_seed(self.seed)


class SessionStore:
    """Per-client sessions in a bounded LRU: the least recently used one is dropped when full."""

    def __init__(self, max_sessions: int, base_seed: int, history_len: int, device: torch.device) -> None:
        self.max_sessions = max(1, max_sessions)
        self.base_seed = base_seed
        self.history_len = history_len
        self.device = device
        self.sessions: OrderedDict[str, Session] = OrderedDict()

    def get(self, client: str) -> Session:
        session = self.sessions.get(client)
        if session is None:
            seed = session_seed(self.base_seed, client)
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            session = Session(client=client, seed=seed, generator=generator, history=deque(maxlen=self.history_len))
            self.sessions[client] = session
            while len(self.sessions) > self.max_sessions:
                dropped, _ = self.sessions.popitem(last=False)
                log.info("session limit %d reached: dropped least recently used session %s", self.max_sessions,
                         dropped)
        self.sessions.move_to_end(client)
        session.last_used = time.monotonic()
        return session

    def reset(self, client: str) -> None:
        session = self.sessions.get(client)
        if session is not None:
            session.reset()
