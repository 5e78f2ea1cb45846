"""``python -m common.tools.offline_eval``."""

import sys

from common.tools.offline_eval.cli import main

sys.exit(main())
