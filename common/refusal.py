"""Stopping for good on an error a restart cannot fix, without supervisord counting it as a crash loop.

A node that refuses its configuration, checkpoint or dataset exits with code 2 (``EXIT_REFUSED``), which
the supervisor programs list in ``exitcodes``. That alone is not enough: supervisord (4.x) judges an
exit by how long the process lived *before* it looks at the exit code. A process that ends within
``startsecs`` of its spawn is a failed start whatever its code: STARTING -> BACKOFF, spawned again
after 1, 2, 3 ... s, up to ``startretries`` times (``supervisorctl start`` answers ``spawn error``).
Only a process that outlived ``startsecs`` (RUNNING) is judged by its code: EXITED, and with
``autorestart=unexpected`` an expected code is left alone.

So ``refuse()`` keeps the process alive until it is older than its program's ``startsecs``, then
exits 2: supervisord spawns it exactly once and leaves it EXITED. The node asks supervisord itself for
the value (``getAllConfigInfo`` at ``SUPERVISOR_SERVER_URL``, both set for every child), so it cannot
drift from the program's settings; ``ARMPIPE_STARTSECS`` overrides that, and when supervisord does not
answer the node waits ``FALLBACK_STARTSECS``. Run by hand (not under supervisord) a refusal exits at
once. Everything else about supervision stays as supervisord does it: a crash in the first
``startsecs`` (exit 1, an unhandled exception, kill -9) backs off (1, 2, 3 ... s) and retries; a crash
later restarts at once, and backs off if the new process fails again within ``startsecs``.

Why a node-side wait and not ``startsecs=0``: with ``startsecs=0`` every process is RUNNING at once,
so a node crashing at start would be restarted immediately and forever, with no back-off at all. An
event listener that stops a BACKOFF program would be a second moving part for the same effect.

The one-line reason goes to the log (``REFUSED: ...``) and to ``<run_dir>/refused/<program>.json``
(program = supervisord's ``SUPERVISOR_PROCESS_NAME``), which ``common.supervisor_client`` merges into
each program's status for ``make status`` and the web panel. Standard library only.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, NoReturn

EXIT_REFUSED = 2  # configuration, checkpoint or dataset error: restarting will not help
STARTSECS_ENV = "ARMPIPE_STARTSECS"  # overrides the startsecs supervisord reports for this program
FALLBACK_STARTSECS = 5.0  # under supervisord, when it does not say: longer than any startsecs armpipe uses
LINGER_MARGIN_S = 0.5  # beyond startsecs: the age below is measured from fork, supervisord's from just before
REFUSED_DIR = "refused"

log = logging.getLogger("armpipe.refusal")
_IMPORTED_AT = time.monotonic()


def process_age_s() -> float:
    """Seconds since this process was created (Linux: /proc; elsewhere: since this module was imported)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        # Field 22 is the start time in clock ticks since boot; the command name (field 2) may hold spaces.
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED_AT


def program_startsecs() -> float:
    """This program's ``startsecs``: ``ARMPIPE_STARTSECS``, else supervisord's own setting; 0 when not supervised."""
    text = os.environ.get(STARTSECS_ENV, "").strip()
    if text:
        try:
            return max(0.0, float(text))
        except ValueError:
            log.warning("%s=%r is not a number of seconds; asking supervisord", STARTSECS_ENV, text)
    name, url = os.environ.get("SUPERVISOR_PROCESS_NAME", ""), os.environ.get("SUPERVISOR_SERVER_URL", "")
    if not os.environ.get("SUPERVISOR_ENABLED") or not name:
        return 0.0
    group = os.environ.get("SUPERVISOR_GROUP_NAME", name)
    try:
        from common.supervisor_client import SupervisorClient

        for info in SupervisorClient(url, timeout_s=2.0).config_info():
            if info.get("name") == name and info.get("group") == group:
                return max(0.0, float(info["startsecs"]))
        log.warning("supervisord at %s does not list %s:%s", url, group, name)
    except Exception as exc:  # any failure to ask: wait the fallback rather than crash-loop
        log.warning("cannot ask supervisord at %s for startsecs (%s: %s)", url or "(no URL)", type(exc).__name__, exc)
    return FALLBACK_STARTSECS


def linger_s() -> float:
    """How long a refusing process still has to live so that supervisord counts it as started."""
    startsecs = program_startsecs()
    return max(0.0, startsecs + LINGER_MARGIN_S - process_age_s()) if startsecs > 0 else 0.0


def refusal_path(run_dir: Path, program: str) -> Path:
    return Path(run_dir) / REFUSED_DIR / f"{program}.json"


def refuse(reason: str, *, program: str = "", run_dir: Path | None = None) -> NoReturn:
    """Log ``reason``, record it for the status views, outlive ``startsecs``, then exit with code 2.

    ``program`` is the supervisor program name when the caller knows it; under supervisord its own
    ``SUPERVISOR_PROCESS_NAME`` wins. ``run_dir``: the deployment's run directory (where the status views
    look); without one (the config itself did not load) ``ARMPIPE_RUN``, then nothing is recorded.
    """
    log.error("REFUSED: %s", reason)
    name = os.environ.get("SUPERVISOR_PROCESS_NAME") or program
    directory = run_dir if run_dir is not None else (Path(os.environ["ARMPIPE_RUN"]) if os.environ.get("ARMPIPE_RUN")
                                                     else None)
    if name and directory is not None:
        path = refusal_path(directory, name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), "since": time.time(), "exit_code": EXIT_REFUSED,
                                       "reason": reason}))
            tmp.replace(path)
        except OSError as exc:
            log.warning("cannot record the refusal in %s: %s", path, exc)
    wait = linger_s()
    if wait > 0:
        log.info("exiting with code %d in %.1f s (supervisord then counts one start and leaves it EXITED)",
                 EXIT_REFUSED, wait)
        time.sleep(wait)
    raise SystemExit(EXIT_REFUSED)


def read_refusals(refused_dir: Path) -> dict[str, dict[str, Any]]:
    """``{program: {pid, since, exit_code, reason}}`` from ``<run_dir>/refused/*.json``; unreadable ones skipped."""
    entries: dict[str, dict[str, Any]] = {}
    directory = Path(refused_dir)
    if not directory.is_dir():
        return entries
    for path in sorted(directory.glob("*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(entry, dict) and isinstance(entry.get("reason"), str):
            entries[path.stem] = entry
    return entries
