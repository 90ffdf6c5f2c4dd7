"""`GatedTrainerMixin`: what both SpecKD trainers add to their TRL trainer around their gate.

- the logging window's `gate/*`, `reward/*` and `gen/*` metrics next to `loss` (`log`);
- an evaluation stream of gate draws that restarts with every `evaluate`;
- the gate's random streams and logging window in every checkpoint, restored on resume, so that a resumed run
  continues the same loss and metrics trajectory (`_rng_streams` / `_load_rng_streams`; a trainer with more streams
  extends both).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers.trainer_utils import get_last_checkpoint

from .weighting import TokenGate


RNG_STATE_FILE = "speckd_rng_state_{}.pth"  # per process: the gate's streams and window (and the trainer's own)
# What `SpecKDDistillationTrainer` wrote before both trainers shared `RNG_STATE_FILE`: still read on resume.
OLD_GATE_STATE_FILE = "speckd_gate_state_{}.pth"


class GatedTrainerMixin:
    """Logging, evaluation draws and checkpointed random streams of a trainer that owns a `TokenGate` (`self._gate`).
    Put it first among the trainer's bases."""

    _gate: TokenGate
    _resume_checkpoint: str | None = None
    _rng_restored: bool = False

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        """`Trainer.evaluate`; the gate's evaluation draws restart from `args.seed` (per process) on every call."""
        self._gate.reset_eval_generator()
        return super().evaluate(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the gate's acceptance rates and the reward statistics of the logging window (all processes)."""
        if self.model.training and "loss" in logs:
            logs.update(
                self._gate.pop_metrics(
                    lambda totals: self.accelerator.reduce(totals, reduction="sum"),
                    device=self.args.device,
                    # the values of the step that just ran (global_step has already moved past it)
                    step=self.state.global_step - 1,
                    max_steps=self.state.max_steps,
                )
            )
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints

    def _rng_streams(self) -> dict[str, Any]:
        """The random streams and counts a checkpoint keeps (this process's): the gate's training generator and
        logging window. A trainer with streams of its own adds them."""
        return self._gate.state_dict()

    def _load_rng_streams(self, state: dict[str, Any]) -> None:
        """Restore what `_rng_streams` saved."""
        self._gate.load_state_dict(state)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; remembers the checkpoint, so that a trainer can restore the RNG states before its first
        use of them (`_load_rng_state` runs once per resume)."""
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            checkpoint = get_last_checkpoint(self.args.output_dir) if checkpoint else None
        self._resume_checkpoint, self._rng_restored = checkpoint, False
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_rng_state(self, output_dir: str) -> None:
        """The Trainer's RNG states, plus `_rng_streams` (one file per process)."""
        super()._save_rng_state(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        torch.save(
            self._rng_streams(), os.path.join(output_dir, RNG_STATE_FILE.format(self.accelerator.process_index))
        )

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """Restore the Trainer's RNG states and `_rng_streams`, once per resume (a second call is a no-op)."""
        if checkpoint is None or self._rng_restored:
            return
        super()._load_rng_state(checkpoint)
        self._rng_restored = True
        for name in (RNG_STATE_FILE, OLD_GATE_STATE_FILE):
            path = os.path.join(checkpoint, name.format(self.accelerator.process_index))
            if os.path.isfile(path):  # else a checkpoint of another trainer, or of a run with more processes
                self._load_rng_streams(torch.load(path, weights_only=True))
                return
