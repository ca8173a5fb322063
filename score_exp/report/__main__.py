"""``python -m score_exp.report`` = ``score-report``."""

import sys

from score_exp.report.cli import main

sys.exit(main())
