"""Test-suite environment: no hub, no experimental-API warning. The tiny builders live in `speckd_trl.tools.testing`."""

import json
import os

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


WORKSPACE_ROWS = 8


@pytest.fixture
def workspace(tmp_path):
    """Tiny student and teacher saved under `tmp_path / "student"` and `"teacher"` (each with the tokenizer), and
    `WORKSPACE_ROWS` chat rows in `tmp_path / "train.jsonl"`: what the CLI reads from disk."""
    from speckd_trl.tools.testing import make_dataset, make_model, make_tokenizer

    tokenizer = make_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        make_model(seed, tokenizer).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    with open(tmp_path / "train.jsonl", "w") as f:
        for row in make_dataset(WORKSPACE_ROWS):
            f.write(json.dumps(row) + "\n")
    return tmp_path
