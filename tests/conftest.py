"""Test-suite environment: no hub, no experimental-API warning. The tiny builders live in `speckd_trl.testing`."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
