"""`accelerate launch` as the README documents it: `examples/accelerate/multi_cpu.yaml` really starts two processes
that train as one DDP job (gloo on the CPU), through the `speckd-trl` CLI on tiny models saved to disk."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from speckd_trl.tools.testing import accelerate_launch


REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "accelerate" / "multi_cpu.yaml"
ROWS, PER_DEVICE_BATCH, PROCESSES = 8, 2, 2  # ROWS: the `workspace` fixture's (conftest.py)


def launch(workspace, out, *flags) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file multi_cpu.yaml -m speckd_trl ...` for one epoch on the tiny models."""
    command = [
        "-m", "speckd_trl",
        "--model_name_or_path", str(workspace / "student"),
        "--teacher_model_name_or_path", str(workspace / "teacher"),
        "--dataset_name", str(workspace / "train.jsonl"),
        "--output_dir", str(out),
        *flags, "--report_to", "none", "--seed", "0",
        "--num_train_epochs", "1", "--per_device_train_batch_size", str(PER_DEVICE_BATCH),
        "--logging_steps", "1", "--save_strategy", "epoch", "--save_only_model",
        "--max_new_tokens", "4", "--lmbda", "0.5", "--gate", "topk", "--gate_top_k", "10",
    ]  # fmt: skip
    return accelerate_launch(CONFIG, command, timeout=240, cwd=REPO)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_accelerate_launch_runs_two_processes_as_one_job(workspace):
    out = workspace / "out"
    result = launch(workspace, out, "--use_cpu")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    # One epoch of 8 rows is 8 / (2 processes x batch 2) = 2 optimizer steps. One process would take 4 steps, and
    # two processes that each trained alone (not one DDP job) would each take 4.
    steps = ROWS // (PROCESSES * PER_DEVICE_BATCH)
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == [f"checkpoint-{steps}"], checkpoints
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"] == steps
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == steps and all(loss > 0 for loss in losses)
    assert (out / "model.safetensors").is_file()
    assert f"Saved the student to {out}." in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="without a GPU, processes without --use_cpu do not form a job")
@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_processes_that_would_train_alone_are_an_error(workspace):
    """Without `--use_cpu` on a machine with no GPU, each process would train alone on the whole dataset."""
    result = launch(workspace, workspace / "out")
    assert result.returncode != 0
    assert "2 processes were launched (WORLD_SIZE=2) but training sees a world of 1" in result.stderr
    assert "--use_cpu" in result.stderr
    assert not (workspace / "out" / "model.safetensors").exists()
