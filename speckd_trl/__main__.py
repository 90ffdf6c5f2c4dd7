"""`python -m speckd_trl` (also under `accelerate launch -m speckd_trl`)."""

import sys

from .cli import main


sys.exit(main())
