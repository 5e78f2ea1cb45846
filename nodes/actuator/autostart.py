"""What the auto-started first episode waits for: the programs that record it.

With ``actuator.auto_start`` the actuator used to start its first episode as soon as the policy's contract
matched, which on a small robot computer is seconds before the recorder is up: the start of the episode
was never recorded. Now the auto-start waits until every program in ``actuator.auto_start_after`` (by
default the recorder) has its readiness file (``<run_dir>/ready/<program>.json``, ``common.node.Readiness``),
at most ``actuator.auto_start_wait_s``, then starts anyway and says which programs it stopped waiting for.
(It also waits until every camera and arm has delivered: see ``PolicyLink._maybe_auto_start``.)

Only programs that are part of this deployment are waited for: under supervisord (which sets
``SUPERVISOR_SERVER_URL`` in its children) the ones its ``getAllProcessInfo`` lists; a program the
supervisord does not run, or an actuator started by hand, waits for nothing.
"""

from __future__ import annotations

import logging
import os

from common.config import DeploymentConfig
from common.supervisor_client import SupervisorClient, SupervisorUnavailable

log = logging.getLogger("actuator")

# After a program's readiness file appears its subscriptions still take a moment to reach the publishers.
SETTLE_S = 0.5


def supervised_programs(timeout_s: float = 2.0) -> set[str] | None:
    """Program names the supervisord running this process runs; None when not under supervisord; an empty
    set when it did not answer (then every configured program is waited for, bounded)."""
    url = os.environ.get("SUPERVISOR_SERVER_URL", "")
    if not url:
        return None
    try:
        return {status.name for status in SupervisorClient(url, timeout_s=timeout_s).processes()}
    except (SupervisorUnavailable, ValueError, OSError) as exc:
        log.warning("auto-start: supervisord at %s did not list its programs (%s); waiting for the configured "
                    "ones anyway", url, exc)
        return set()


class AutoStartWait:
    """``done(now)`` is True once the first auto-started episode may begin."""

    def __init__(self, config: DeploymentConfig) -> None:
        self.ready_dir = config.resolve(config.run_dir) / "ready"
        self.wait_s = config.actuator.auto_start_wait_s
        wanted = list(config.actuator.auto_start_after)
        supervised = supervised_programs() if wanted else None
        if supervised is None:
            self.programs: list[str] = []
        elif supervised:
            self.programs = [name for name in wanted if name in supervised]
        else:  # supervisord did not answer: wait (bounded) for every configured program
            self.programs = wanted
        self.since: float | None = None  # first call
        self.all_ready_at: float | None = None
        self.finished = not self.programs
        if self.programs:
            log.info("auto-start waits for %s to be ready (at most %.0f s)", ", ".join(self.programs), self.wait_s)

    def missing(self) -> list[str]:
        return [name for name in self.programs if not (self.ready_dir / f"{name}.json").exists()]

    def done(self, now: float) -> bool:
        if self.finished:
            return True
        if self.since is None:
            self.since = now
        missing = self.missing()
        if not missing:
            if self.all_ready_at is None:
                self.all_ready_at = now
            if now - self.all_ready_at >= SETTLE_S:
                log.info("auto-start: %s ready after %.1f s; starting the episode", ", ".join(self.programs),
                         now - self.since)
                self.finished = True
        elif now - self.since >= self.wait_s:
            log.warning("auto-start: %s not ready after %.0f s (actuator.auto_start_wait_s); starting the episode "
                        "without them: it may not be recorded from its start", ", ".join(missing), self.wait_s)
            self.finished = True
        else:
            self.all_ready_at = None
        return self.finished
