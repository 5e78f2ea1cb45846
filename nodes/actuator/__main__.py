"""The actuator node: the control loop between the sensors, the policy and the servo bus.

One loop (``nodes.actuator.loop.Actuator.run``) over an injected pacer (``nodes.actuator.pacer``): real time, one
tick per period at ``config.fps`` phase-locked to the replies; or lockstep (``actuator.lockstep``), one tick per
new observation of the dataset player. Between ticks it serves what lands: a due request leaves when its frames
land, a reply is checked and queued when it lands, control requests are answered. Each tick:

1. inputs: the newest frame of every camera and the newest state of every arm, the policy's results;
2. decide hold or act (``nodes.actuator.core``): stale or missing inputs, no episode, a refused contract, an
   unreachable or failing policy, an empty queue, stale rows or a corrupt row all mean *hold the last commanded
   target*; acting pops the queued row meant for this tick (``chunk_queue``) through the safety filter
   (``safety``: joint limits, max step per tick);
3. act: the target to each arm's bus (unless ``actuator.dry_run``; ``bus_writer``) and one ``action`` message;
   then the next chunk is asked for when the rows left cover the measured round trip (``refill``), in the
   policy worker thread so inference overlaps execution.

The room: ``loop`` (the loop), ``pacer`` (when it ticks), ``core`` (the decisions: pure logic, no sockets, the
property tests drive it directly), ``holds`` (the hold reasons), ``inputs``, ``policy_link`` (contract, requests,
results), ``policy_worker``, ``bus_writer``, ``control`` (the control socket's handler), ``publishing`` (what is
published), ``chunk_queue``, ``refill``, ``safety``, ``episodes``, ``latency``, ``backlog``, ``autostart``,
``openpi_client``. It may import ``common`` and its own room. The message contract is in docs (streams):
``action`` per tick, ``hold``/``chunk``/``episode_*``/``loop_stats``/``contract_mismatch`` events.
"""

from __future__ import annotations

import logging
import os

from common.node import start_node
from nodes.actuator import PROGRAM
from nodes.actuator.loop import Actuator
from nodes.actuator.pacer import LockstepPacer, RealtimePacer

log = logging.getLogger("actuator")


def set_priority(nice: int) -> None:
    """Apply ``actuator.nice`` (range-checked with the config; a failure to raise the priority is logged,
    not fatal)."""
    if nice == 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        log.info("running at nice %d", nice)
    except PermissionError:
        log.warning("actuator.nice=%d needs root or CAP_SYS_NICE; running at nice %d", nice,
                    os.getpriority(os.PRIO_PROCESS, 0))


def main(argv: list[str] | None = None) -> None:
    started = start_node(PROGRAM, "armpipe actuator: the control loop (policy chunks -> safe goal positions)", argv,
                         curve_side="client")
    set_priority(started.config.actuator.nice)
    config = started.config
    pacer = LockstepPacer() if config.actuator.lockstep else RealtimePacer(config.fps)
    Actuator(config, started.stop, started.readiness, pacer, started.curve).run()


if __name__ == "__main__":
    main()
