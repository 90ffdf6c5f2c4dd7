"""`python -m speckd_trl` (also under `accelerate launch --config_file examples/accelerate/... -m speckd_trl`)."""

from .cli import run


run()
