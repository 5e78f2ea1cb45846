"""What every node process shares: logging set-up and the readiness file supervisord users look at."""

from __future__ import annotations

import json
import logging
import os
import time

from common.config import DeploymentConfig


def setup_logging(node: str) -> logging.Logger:
    level = os.environ.get("ARMPIPE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s {node} %(name)s: %(message)s")
    return logging.getLogger(node)


class Readiness:
    """``<run_dir>/ready/<program>.json`` exists exactly while the node is up and ready.

    A node marks itself ready once its sockets are bound and its model, dataset or device is loaded;
    ``python -m nodes.status`` and the monitor read these files next to supervisord's process state.
    """

    def __init__(self, config: DeploymentConfig, program: str) -> None:
        self.path = config.resolve(config.run_dir) / "ready" / f"{program}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clear()

    def ready(self, **detail: object) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "since": time.time(), **detail}, default=str))
        tmp.replace(self.path)
        logging.getLogger(__name__).info("READY %s", self.path.stem)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
