"""The trainer skeleton every SpecKD trainer shares around its gate, written once; each trainer keeps what its TRL parent
makes different.

- `GatedTrainerMixin` (every trainer): the config check, the gate's set-up (`_init_gate`), a micro-batch's gate opened
  (`_open_batch`) and its loss reduced and recorded (`_close_batch`); the logging window's `gate/*`, `reward/*` and
  `gen/*` metrics next to `loss` (`log`); an evaluation stream of gate draws that restarts with every `evaluate`; the
  gate's random streams and logging window in every checkpoint, restored on resume, so that a resumed run continues
  the same loss and metrics trajectory (`_rng_streams` / `_load_rng_streams`; a trainer with more streams extends
  both);
- `GatedLossMixin` (a trainer that replaces its parent's whole `compute_loss`): `compute_loss`'s signature, around the
  trainer's `_gated_loss`;
- `PromptTrainerMixin` (the trainers on TRL's `DistillationTrainer`: prompt-only data, every completion sampled by the
  student): its `__init__` (the parent's arguments, prompt datasets checked before and the gate set up after) and its
  on-policy sampling with the trainer's settings only (`_generate_single_turn`).
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from transformers.trainer_utils import get_last_checkpoint

from .batch_kind import BatchKind
from .data import prompts_from_messages
from .generation import sampling_only_from
from .models import output_vocab_size
from .reduction import LossTerms
from .rules import GREEDY, Proposal
from .validation import check_gate_top_k, check_launch, check_prompt_dataset, named_datasets
from .weighting import GatedBatch, TokenGate


RNG_STATE_FILE = "speckd_rng_state_{}.pth"  # per process: the gate's streams and window (and the trainer's own)
# What `SpecKDDistillationTrainer` wrote before every trainer shared `RNG_STATE_FILE`: still read on resume.
OLD_GATE_STATE_FILE = "speckd_gate_state_{}.pth"


class GatedTrainerMixin:
    """The gate's set-up and per-micro-batch steps, logging, evaluation draws and checkpointed random streams of a
    trainer that owns a `TokenGate` (`self._gate`). Put it first among the trainer's bases.

    A trainer names its config class (`_config_class`), calls `_init_gate` once its TRL parent is set up and, per
    micro-batch, `_open_batch` then `_close_batch`.
    """

    _config_class: type
    _gate: TokenGate
    _resume_checkpoint: str | None = None
    _rng_restored: bool = False

    # ------------------------------------------------------------------ set-up

    @classmethod
    def _check_config(cls, args: Any) -> None:
        """Refuse `args` that are not a `_config_class` (which accepts every field of the TRL config it extends)."""
        config = cls._config_class
        if not isinstance(args, config):
            raise TypeError(
                f"{cls.__name__} needs `args={config.__name__}(...)`, got {type(args).__name__}. {config.__name__} "
                f"accepts every {config.__bases__[-1].__name__} field."
            )

    def _init_gate(self, args: Any, *, temperature: float, vocab_size: int, proposal: Proposal = GREEDY) -> None:
        """The per-token gate, after `gate_top_k` is checked against the `vocab_size` the loss compares: its rule, its
        draws (one training stream per process, one evaluation stream), its settings at a step and its logging window.
        `temperature`: the student's sampling temperature (the ``q`` of a rule that reads the student); `proposal`:
        the student's proposal on dataset and `seq_kd` positions (`rules.Proposal`)."""
        check_gate_top_k(args, vocab_size)
        self._gate = TokenGate(
            args,
            temperature=temperature,
            device=self.accelerator.device,
            seed=args.seed,
            process_index=self.accelerator.process_index,
            proposal=proposal,
        )

    # ------------------------------------------------------------------ a micro-batch

    def _open_batch(
        self, kind: BatchKind, completion: torch.Tensor, sampled_ids: torch.Tensor, *, training: bool
    ) -> GatedBatch:
        """The gate on one micro-batch at the current optimizer step (`TokenGate.batch`)."""
        step, max_steps = self.state.global_step, self.state.max_steps
        return self._gate.batch(kind, completion, sampled_ids, training=training, step=step, max_steps=max_steps)

    def _close_batch(
        self, batch: GatedBatch, terms: LossTerms, num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor:
        """The micro-batch's loss (`GatedBatch.reduce`), its verdicts recorded in the logging window."""
        loss = batch.reduce(terms, num_items_in_batch)
        batch.record(terms.accepted)
        return loss

    # ------------------------------------------------------------------ logs and evaluation

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


class GatedLossMixin(GatedTrainerMixin):
    """`compute_loss` of a trainer that replaces its TRL parent's whole loss: the trainer's `_gated_loss`."""

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The gated loss of one micro-batch (`_gated_loss`), with the student's outputs if `return_outputs`."""
        loss, outputs = self._gated_loss(model, inputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _gated_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> tuple[torch.Tensor, Any]:
        """The micro-batch's loss, normalized for its accumulation window, and the student's outputs."""
        raise NotImplementedError


def prompt_datasets(train_dataset: Any, eval_dataset: Any, processing_class: Any) -> tuple[Any, Any]:
    """The datasets checked for on-policy training (`validation.check_prompt_dataset`) and chat `messages` rows
    turned into `prompt` rows (`data.prompts_from_messages`); `eval_dataset` may be a dict of datasets."""
    for name, dataset in [("train_dataset", train_dataset)] + named_datasets(eval_dataset, "eval_dataset"):
        check_prompt_dataset(dataset, processing_class, name=name)
    if isinstance(eval_dataset, dict):
        eval_dataset = {name: prompts_from_messages(ds) for name, ds in eval_dataset.items()}
    else:
        eval_dataset = prompts_from_messages(eval_dataset)
    return prompts_from_messages(train_dataset), eval_dataset


class PromptTrainerMixin(GatedTrainerMixin):
    """A SpecKD trainer on TRL's `DistillationTrainer` (or a subclass): it takes its parent's arguments, checks them and
    turns chat `messages` rows into `prompt` rows before its parent's `__init__`, and sets up the gate after it (the
    student samples every completion, at `args.temperature`, so that is the ``q`` its rule reads)."""

    def __init__(self, *args: Any, **kwargs: Any):
        """The TRL parent's `__init__` with the same arguments, between SpecKD's checks and its gate."""
        call = inspect.signature(super().__init__).bind(*args, **kwargs)
        call.apply_defaults()
        given = call.arguments  # the parent's arguments by name
        config = given["args"]
        self._check_config(config)
        check_launch(config)
        given["train_dataset"], given["eval_dataset"] = prompt_datasets(
            given["train_dataset"], given["eval_dataset"], given["processing_class"]
        )
        self._before_parent_init(given)
        super().__init__(**given)
        self._after_parent_init()
        self._vocab_size = output_vocab_size(self.accelerator.unwrap_model(self.model))
        self._init_gate(config, temperature=config.temperature, vocab_size=self._vocab_size)

    def _before_parent_init(self, given: dict[str, Any]) -> None:
        """The trainer's own checks of the parent's arguments (`given`, by name, completed in place where a default
        applies), before anything is loaded."""

    def _after_parent_init(self) -> None:
        """What follows the parent's `__init__`, before the gate is set up."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        """TRL's generation, sampling with the trainer's settings only (`generation.sampling_only_from`): none is
        inherited from the student's own generation config, so the `spec` rule's ``q`` is what was sampled from."""
        with sampling_only_from(self.accelerator.unwrap_model(self.model), self.generation_config):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
