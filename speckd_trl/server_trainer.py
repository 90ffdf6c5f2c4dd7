"""`SpecKDServerDistillationTrainer`: TRL's `ServerDistillationTrainer` (the teacher on a vLLM server) with the gate.

Wiring only. TRL's trainer does the generation, the server request and its alignment
(`_get_teacher_token_logprobs_from_server`: the teacher's top `loss_top_k` log-probabilities and token ids at every
completion position, and its log-probability of the sampled token), called as the start of TRL's `compute_loss` calls
it (`compat.server_forward`, the copy pinned to TRL's source); here the loss of `compute_loss` is the gated one:

- the teacher is a `losses.SparseTeacher`: its top-k, and the tail mass ``1 - sum`` of their probabilities (the
  server returns no tail; TRL's ``loss_add_tail`` computes it the same way); ids past the student's vocabulary (a
  teacher with a larger padded vocabulary) are no token: dropped from the top-k, their mass in the tail
  (`server_sparse_teacher`), never counted by the gate (`check_top_k_decidable` where they leave it too few);
- the gate reads `losses.sparse_log_probs` of it, with the teacher's log-probability of the sampled token written in
  (what a rule may read of a server teacher: ``{"top_k", "proposal"}``, `rules.GateRule.teacher_reads`, checked by
  `SpecKDServerDistillationConfig`): `spec`, which reads the sampled token only, is exact, and `topk` is exact for
  ``gate_top_k < loss_top_k`` (ties: see `server_sparse_teacher`);
- the divergence is the forward KL against `losses.tail_bucket_target`: with `gate="none"` it is TRL's top-k + tail
  server loss (tested against `_compute_server_forward_kl_loss`), normalized as TRL normalizes it (the micro-batch's
  completion tokens, divided by the accumulation steps);
- the weights, the reward term, the logs and the checkpointed streams: `weighting.GatedBatch`, `gated_trainer`.

What runs in-process in the tests: everything but the HTTP request, with a client that scores sequences with a local
teacher the way the server does (`tools.testing.LocalTeacherClient`). The server itself (vLLM, GPU) is checked by the
GPU script.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset, IterableDataset
from torch import nn
from transformers import PreTrainedModel, TrainerCallback
from trl.experimental.server_distillation import ServerDistillationTrainer

from .batches import ON_POLICY
from .compat import server_forward
from .config import SpecKDServerDistillationConfig
from .distillation_trainer import prompt_datasets
from .gated_trainer import GatedTrainerMixin
from .generation import sampling_only_from
from .losses import (
    LossTerms,
    jsd_log_probs,
    sampled_log_probs,
    weighted_jsd_from_log_probs,
)
from .models import output_vocab_size
from .sparse_teacher import check_top_k_decidable, server_sparse_teacher
from .validation import check_gate_top_k, check_launch
from .weighting import TokenGate


class SpecKDServerDistillationTrainer(GatedTrainerMixin, ServerDistillationTrainer):
    """TRL's [`~trl.experimental.server_distillation.ServerDistillationTrainer`] with the speculative gate: SpecKD from a
    teacher on a vLLM server (no teacher in this process's memory).

    The student samples every completion (as `DistillationTrainer`); the server scores them and returns the teacher's
    top `loss_top_k` tokens per position and its log-probability of the sampled token; the teacher verifies each sampled
    token (`args.gate`) and the forward KL over the top-k plus tail is kept with weight 1 on accepted tokens and
    `args.reject_weight` on rejected ones. Logs as the other SpecKD trainers (`gate/acceptance_rate`, `reward/mean`).

    Args: as [`~trl.experimental.server_distillation.ServerDistillationTrainer`]; `args` must be a
    [`SpecKDServerDistillationConfig`]. Chat `messages` rows are turned into `prompt` rows, as in
    [`SpecKDDistillationTrainer`].
    """

    _tag_names = ["trl", "server-distillation", "speckd"]
    _name = "SpecKD-Server-Distillation"

    def __init__(
        self,
        model: str | PreTrainedModel | nn.Module,
        args: SpecKDServerDistillationConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
    ):
        if not isinstance(args, SpecKDServerDistillationConfig):
            raise TypeError(
                "SpecKDServerDistillationTrainer needs `args=SpecKDServerDistillationConfig(...)`, got "
                f"{type(args).__name__}. It accepts every ServerDistillationConfig field."
            )
        check_launch(args)
        train_dataset, eval_dataset = prompt_datasets(train_dataset, eval_dataset, processing_class)
        super().__init__(
            model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self._vocab_size = output_vocab_size(self.accelerator.unwrap_model(self.model))
        check_gate_top_k(args, self._vocab_size)
        self._gate = TokenGate(
            args,
            temperature=args.temperature,
            device=self.accelerator.device,
            seed=args.seed,
            process_index=self.accelerator.process_index,
        )

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        """TRL's generation, sampling with the trainer's settings only (as `SpecKDDistillationTrainer`)."""
        with sampling_only_from(self.accelerator.unwrap_model(self.model), self.generation_config):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The gated forward KL over the server teacher's top-k plus tail, for one micro-batch.

        The start is TRL's `ServerDistillationTrainer.compute_loss` (`compat.server_forward`: the layout its server
        request reads, the student's forward, the server's answer); the loss is normalized as TRL's: over this
        micro-batch's completion tokens, divided by the accumulation steps.
        """
        student_outputs, teacher_result, logits, tokens, completion = server_forward(self, model, inputs)
        logits = logits[..., : self._vocab_size]

        student_log_probs = jsd_log_probs(logits, self.temperature)  # the divergence's, as TRL's
        teacher, teacher_view = server_sparse_teacher(teacher_result, completion, self._vocab_size)
        actual = teacher_result["actual_logprobs"]
        if self._gate.rule.reads_student and bool((completion & ~torch.isfinite(actual)).any()):
            raise ValueError(
                f"gate={self.args.gate!r} reads the teacher's log-probability of every sampled token, and the teacher "
                "server returned none at some completion positions; check the server's prompt log-probabilities."
            )
        actual = torch.where(completion, actual, torch.zeros_like(actual)).clamp_min(-1e4)
        teacher_view = teacher_view.scatter(-1, tokens.unsqueeze(-1), actual.unsqueeze(-1).to(teacher_view.dtype))
        batch = self._gate.batch(
            ON_POLICY,
            completion,
            tokens,
            training=model.training,
            step=self.state.global_step,
            max_steps=self.state.max_steps,
        )
        if "top_k" in self._gate.rule.teacher_reads:  # ids past the student's vocabulary took some of the slots
            check_top_k_decidable(teacher, tokens, batch.gated, batch.top_k)
        # the gate reads the student at temperature 1 (its rule applies the sampling temperature), as the other trainers
        log_probs_t1 = student_log_probs if self.temperature == 1.0 else jsd_log_probs(logits)
        accepted = batch.verdicts(log_probs_t1, teacher_view)
        target = batch.targets(teacher_view, accepted, teacher.target(teacher_view, student_log_probs))
        weighted = weighted_jsd_from_log_probs(student_log_probs, target, batch.weights(accepted), beta=0.0)

        def sampled() -> torch.Tensor:  # the reward term's log q_tau(x_t), differentiable
            return sampled_log_probs(log_probs_t1, logits, tokens, self.temperature)

        loss = batch.reduce(LossTerms(weighted.sum(), accepted, sampled, student_outputs), None)
        batch.record(accepted)
        if model.training:  # TRL's server path normalizes per micro-batch and scales for accumulation itself
            loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)  # (1 outside the Trainer loop)
        return (loss, student_outputs) if return_outputs else loss
