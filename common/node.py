"""What every node process shares: how it starts (command line, logging, readiness, signals, refusals) and
the readiness file supervisord users look at."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import NoReturn

from common.config import DeploymentConfig, parse_node_args
from common.refusal import refuse
from common.wire.curve import CurveKeys
from common.wire.transport import stop_event_on_signals


def setup_logging(node: str) -> logging.Logger:
    level = os.environ.get("ARMPIPE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s {node} %(name)s: %(message)s")
    return logging.getLogger(node)


class Readiness:
    """``<run_dir>/ready/<program>.json`` exists exactly while the node is up and ready.

    A node marks itself ready once its sockets are bound and its model, dataset or device is loaded;
    ``python -m common.tools.status`` and the monitor read these files next to supervisord's process state.
    """

    def __init__(self, config: DeploymentConfig, program: str) -> None:
        self.path = config.resolve(config.run_dir) / "ready" / f"{program}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clear()

    def ready(self, **detail: object) -> None:
        self.since = time.time()
        self.update(**detail)
        logging.getLogger(__name__).info("READY %s", self.path.stem)

    def update(self, **detail: object) -> None:
        """Rewrite the file of a node that is ready with new detail (figures a node keeps current), quietly."""
        tmp = self.path.with_suffix(".tmp")
        since = getattr(self, "since", time.time())
        tmp.write_text(json.dumps({"pid": os.getpid(), "since": since, **detail}, default=str))
        tmp.replace(self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class StartedNode:
    """A node process once started: its config and instance, its supervisord program name, its readiness
    file (cleared: not ready yet), the stop event SIGTERM/SIGINT set, and its side's CURVE keys (or None)."""

    config: DeploymentConfig
    name: str  # the camera or arm this instance serves; "" for a node of one instance
    program: str  # supervisord's name for it: the node (``recorder``) or node-instance (``camera-front``)
    readiness: Readiness
    stop: threading.Event
    curve: CurveKeys | None = None

    def refuse(self, reason: str) -> NoReturn:
        """Stop for good on an error a restart cannot fix: exit code 2, the reason logged and kept for
        ``make status`` (``common.refusal``)."""
        refuse(reason, program=self.program, run_dir=self.config.resolve(self.config.run_dir))


OVERRIDES_HELP = "Any config field can be overridden: --<field>.<sub>=<value>, e.g. --actuator.dry_run=true."


def cli_description(text: str) -> str:
    """A node's ``--help`` description from its docstring (or summary line): the first paragraph on one line, as
    argparse reflows it anyway (a whole docstring came out as one run-on paragraph, its usage example folded into
    the prose), and how any config field is overridden, which the options list cannot show."""
    summary = " ".join(text.strip().split("\n\n")[0].split())
    return f"{summary} {OVERRIDES_HELP}" if summary else OVERRIDES_HELP


def start_node(node: str, description: str, argv: list[str] | None = None, *, instance_of: str = "",
               curve_side: str = "", program: str = "") -> StartedNode:
    """The start every node shares: the command line of ``python -m nodes.<node>`` (``parse_node_args``:
    a bad config exits 2 naming the field), logging under the program name, the readiness file cleared,
    and a stop event set on SIGTERM/SIGINT.

    ``instance_of`` ("camera" or "arm") makes it a node of many instances, named ``<node>-<instance>``; its
    logging starts once ``--name`` is read, a single node's before the command line (so a config error is
    logged in its format). ``program``: a single node's program name when it is not the node's own
    (the policy's standby, ``policy-standby``).
    """
    prog = f"python -m nodes.{node}"
    description = cli_description(description)
    if instance_of:
        args = parse_node_args(description, argv, instance_of=instance_of, curve_side=curve_side, prog=prog)
        program = f"{node}-{args.name}"
        setup_logging(program)
    else:
        program = program or node
        setup_logging(program)
        args = parse_node_args(description, argv, curve_side=curve_side, prog=prog)
    return StartedNode(config=args.config, name=args.name, program=program,
                       readiness=Readiness(args.config, program), stop=stop_event_on_signals(), curve=args.curve)
