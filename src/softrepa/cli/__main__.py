"""`python -m softrepa.cli ...` (e.g. under `accelerate launch -m softrepa.cli train ...`) == `softrepa ...`."""

import sys

from .main import main

sys.exit(main())
