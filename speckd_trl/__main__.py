"""`python -m speckd_trl` (also under `accelerate launch --config_file examples/accelerate/... -m speckd_trl`)."""

import sys

from .cli import main


sys.exit(main())
