"""The command line of ``python -m common.tools.offline_eval`` (``armpipe-eval``): the package's docstring says
what it does."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import common.tools.offline_eval as package
from common.config import ConfigError, load_config
from common.tools.offline_eval.executed import evaluate_executed
from common.tools.offline_eval.predict import ATTEMPTS, evaluate_predictions
from common.tools.offline_eval.report import EvaluationIncomplete
from common.tools.offline_eval.report_files import save_report
from common.wire.transport import PeerUnavailable, RemoteError

log = logging.getLogger("common.tools.offline_eval")


def main(argv: list[str] | None = None) -> int:
    # ``python -m`` would show the package's __main__.py as the program's name.
    prog = "python -m common.tools.offline_eval" if sys.argv[0].endswith("__main__.py") else None
    parser = argparse.ArgumentParser(prog=prog, description=(package.__doc__ or "").split("\n\n")[0])
    parser.add_argument("mode", choices=["predict", "executed"])
    parser.add_argument("--config", required=True, help="deployment YAML, e.g. configs/lift.yaml")
    parser.add_argument("--output", default="eval", help="directory for offline_eval.json / .png")
    parser.add_argument("--episodes", type=int, nargs="*", default=None,
                        help="predict: dataset episodes (default: player.episodes, or all)")
    parser.add_argument("--count", type=int, default=1, help="executed: episodes to record")
    parser.add_argument("--drive", action="store_true", help="executed: start/stop the actuator's episodes")
    parser.add_argument("--row-offset", type=int, default=0,
                        help="compare with the truth this many frames later (1: the reference system's alignment)")
    parser.add_argument("--max-frames", type=int, default=0, help="predict: frames per episode (0: all)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="executed: give up after this long")
    parser.add_argument("--attempts", type=int, default=ATTEMPTS,
                        help="predict: tries per policy request, the timeout doubling from policy.timeout_s")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s offline_eval: %(message)s")
    try:
        config = load_config(args.config, overrides)
        if args.mode == "predict":
            report, traces = evaluate_predictions(config, episodes=args.episodes, row_offset=args.row_offset,
                                                  max_frames=args.max_frames, attempts=args.attempts)
        else:
            report, traces = evaluate_executed(config, count=args.count, drive=args.drive,
                                               row_offset=args.row_offset, timeout_s=args.timeout_s)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except EvaluationIncomplete as exc:
        paths = save_report(exc.report, exc.traces, Path(args.output))
        log.error("%s", exc.cause)
        log.error("INCOMPLETE: wrote what was scored (%d episode(s), %d pair(s)) to %s and %s, marked "
                  "\"complete\": false", len(exc.report.episodes), sum(e.compared for e in exc.report.episodes),
                  paths["json"], paths["png"])
        return 1
    except (PeerUnavailable, RemoteError, TimeoutError) as exc:
        log.error("%s", exc)
        return 1
    paths = save_report(report, traces, Path(args.output))
    log.info("mean MAE %.3f (per joint %s); wrote %s and %s", report.overall_mean_mae,
             [round(v, 3) for v in report.overall_mae], paths["json"], paths["png"])
    return 0

