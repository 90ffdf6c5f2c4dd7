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

from .batch_kind import BatchKind
from .compat import server_forward
from .config import SpecKDServerDistillationConfig
from .distillation_trainer import prompt_datasets
from .gated_trainer import GatedTrainerMixin
from .generation import sampling_only_from
from .losses import (
    LossTerms,
    SparseTeacher,
    jsd_log_probs,
    no_token_slots,
    sampled_log_probs,
    weighted_jsd_from_log_probs,
)
from .models import output_vocab_size
from .validation import check_gate_top_k, check_launch
from .weighting import TokenGate


def server_sparse_teacher(teacher_result: dict[str, torch.Tensor], required: torch.Tensor, vocab_size: int):
    """The server's answer as a `SparseTeacher` and the gate's view of it.

    Args:
        teacher_result: `ServerDistillationTrainer._get_teacher_token_logprobs_from_server`'s dict:
            ``topk_logprobs`` `[B, T, K]` (``-inf`` where missing), ``topk_token_ids`` `[B, T, K]`,
            ``actual_logprobs`` `[B, T]` (the sampled token's).
        required (`torch.BoolTensor` of shape `[B, T]`): the completion positions.
        vocab_size (`int`): ``V``.

    Ties. The server cuts its top-K with ``torch.topk``, which keeps an arbitrary subset of the tokens tied at the
    K-th value, in no fixed order. The gate's `topk` rule ranks the returned tokens (and the sampled one) by value,
    then id (`rules.teacher_rank`), so a tie at the gate's k-th place goes to the lower id exactly as on the full
    teacher whenever the tied tokens are all returned, i.e. unless the tie reaches the K-th place (``K - k + 1`` or
    more tokens tied at the k-th value: none with ``k = 5``, ``K = 20`` short of 16-way ties). With ``k = K`` it
    always reaches it, and the returned set is no longer the rule's top-k: `SpecKDServerDistillationConfig` refuses
    ``gate_top_k >= loss_top_k`` for that reason (the server cannot be asked for the rule's order).

    Ids past the student's vocabulary. A teacher whose output is padded beyond the student's (Qwen2.5-7B's 152064 rows
    against Qwen2.5-0.5B's 151936) may return ids ``>= V``. The student puts no probability on them, so their mass
    goes to the tail bucket, exactly: their slots are dropped (`losses.no_token_slots`) and the tail ``1 - sum`` is
    taken over the other slots. The gate never counts them either (the view has the ``V`` ids only).

    Returns:
        The `SparseTeacher` `[B, T, K]` (tail ``log(1 - sum exp(top-k))`` over the slots of ids ``< V``) and the
        gate's `[B, T, V]` log-probabilities (`losses.sparse_log_probs`, the sampled token's log-probability written
        in).

    Raises:
        ValueError: where the server returned no top-1 log-probability at a completion position.
    """
    values, ids = teacher_result["topk_logprobs"], teacher_result["topk_token_ids"].long()
    missing = required & ~torch.isfinite(values[..., 0])
    if missing.any():
        raise ValueError(
            f"The teacher server returned no log-probabilities at {int(missing.sum())} of {int(required.sum())} "
            "completion positions; check that it serves the same model and tokenizer, and its max_logprobs."
        )
    floor = -1e4
    values = torch.where(required.unsqueeze(-1), values, torch.full_like(values, floor)).clamp_min(floor)
    valid = no_token_slots(ids, vocab_size)
    in_vocab = values if valid is None else values.masked_fill(~valid, float("-inf"))
    log_mass = torch.logsumexp(in_vocab, dim=-1).clamp(max=-1e-7)  # as TRL's `_add_tail_bucket`
    log_tail = torch.log(-torch.expm1(log_mass))
    teacher = SparseTeacher(ids, values, log_tail, vocab_size, valid)
    return teacher, teacher.log_probs()


def check_top_k_decidable(teacher: SparseTeacher, tokens: torch.Tensor, gated: torch.Tensor, top_k: int) -> None:
    """Refuse a top-k verdict the server's answer cannot decide. Where ids past the student's vocabulary take slots of
    the returned top-K (`server_sparse_teacher`), fewer than `top_k` student tokens may be left in it; a sampled token
    that is not among them then has an unknown rank among the student's tokens (its own log-probability is known, not
    how many tokens left out lie above it).

    Args:
        teacher (`SparseTeacher` of shape `[B, T, K]`): `server_sparse_teacher`'s.
        tokens (`torch.LongTensor` of shape `[B, T]`), gated (`torch.BoolTensor` of shape `[B, T]`): the sampled
            tokens and the positions the gate verifies.
        top_k (`int`): the rule's k at this step.

    Raises:
        ValueError: naming both vocabulary sizes and the `loss_top_k` that would serve.
    """
    if teacher.valid is None:
        return
    real = teacher.valid.sum(dim=-1)  # [B, T] student tokens returned
    returned = ((teacher.ids == tokens.unsqueeze(-1)) & teacher.valid).any(dim=-1)
    undecided = gated & (real < top_k) & ~returned
    if bool(undecided.any()):
        padded = int((~teacher.valid).sum(dim=-1)[gated].max())
        raise ValueError(
            f"The teacher server returned ids past the student's vocabulary (the student has {teacher.vocab_size} "
            f"tokens, the teacher's ids reach {int(teacher.ids.max()) + 1} or more: a padded embedding): up to "
            f"{padded} of its top loss_top_k={teacher.ids.size(-1)} are no student token, leaving fewer than "
            f"gate_top_k={top_k} student tokens at {int(undecided.sum())} gated positions, where the gate cannot "
            f"rank the sampled token. Set loss_top_k >= {top_k + padded} (and the server's max_logprobs with it)."
        )


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
            BatchKind.on_policy(),
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
