"""`SpecKDServerDistillationTrainer`: TRL's `ServerDistillationTrainer` (the teacher on a vLLM server) with the gate.

Wiring only. TRL's trainer does the generation, the server request and its alignment, called as the start of TRL's
`compute_loss` calls it (`compat.server_forward`, the copy pinned to TRL's source); here the loss of `compute_loss` is
the gated one:

- the server's answer as the loss and the gate read it (a `losses.SparseTeacher`, the gate's view with the sampled
  token's log-probability written in): `server_teacher.py`;
- the divergence is the forward KL over the teacher's top-k plus a tail bucket, on its ``K + 1`` buckets
  (`server_teacher.bucket_forward_kl`), and the gate reads the ``K + 1`` candidates of each position
  (`server_teacher.candidate_view`), never `[B, T, V]` views: with `gate="none"` it is TRL's top-k + tail server loss
  (tested against `_compute_server_forward_kl_loss`), normalized as TRL normalizes it (the micro-batch's completion
  tokens, divided by the accumulation steps); the student projects only the positions the loss reads;
- the set-up, on-policy sampling, weights, reward term, logs and checkpointed streams: the skeleton of
  `gated_trainer.py` (`PromptTrainerMixin`, `GatedLossMixin`) over `weighting.GatedBatch`.

What runs in-process in the tests: everything but the HTTP request, with a client that scores sequences with a local
teacher the way the server does (`tools.testing.LocalTeacherClient`). The server itself (vLLM, GPU) is checked by the
GPU script.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from trl.experimental.server_distillation import ServerDistillationTrainer

from .batch_kind import BatchKind
from .compat import server_forward
from .config import SpecKDServerDistillationConfig
from .divergence import jsd_log_probs
from .gated_trainer import GatedLossMixin, PromptTrainerMixin
from .reduction import LossTerms, sampled_log_probs
from .server_teacher import bucket_forward_kl, candidate_view, check_top_k_decidable, server_sparse_teacher


class SpecKDServerDistillationTrainer(GatedLossMixin, PromptTrainerMixin, ServerDistillationTrainer):
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
    _config_class = SpecKDServerDistillationConfig

    def _gated_loss(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> tuple[torch.Tensor, Any]:
        """The gated forward KL over the server teacher's top-k plus tail, for one micro-batch.

        The start is TRL's `ServerDistillationTrainer.compute_loss` (`compat.server_forward`: the layout its server
        request reads, the student's forward, the server's answer); the loss is normalized as TRL's: over this
        micro-batch's completion tokens, divided by the accumulation steps (`num_items_in_batch` is not read).
        """
        student_outputs, teacher_result, logits, tokens, completion = server_forward(self, model, inputs)
        logits = logits[..., : self._vocab_size]

        student_log_probs = jsd_log_probs(logits, self.temperature)  # the divergence's, as TRL's
        teacher = server_sparse_teacher(teacher_result, completion, self._vocab_size, view=False)
        batch = self._open_batch(BatchKind.on_policy(), completion, tokens, training=model.training)
        if "top_k" in self._gate.rule.teacher_reads:  # ids past the student's vocabulary took some of the slots
            check_top_k_decidable(teacher, tokens, batch.gated, batch.top_k)
        # the gate reads the student at temperature 1 (its rule applies the sampling temperature), as the other trainers
        log_probs_t1 = student_log_probs if self.temperature == 1.0 else jsd_log_probs(logits)
        if self._gate.rule.rejects:  # the verdicts on the K + 1 candidates of each position, not on [B, T, V] views
            student_view, teacher_view, proposals = candidate_view(
                teacher,
                teacher_result["actual_logprobs"],
                tokens,
                completion,
                log_probs_t1,
                required_by=self.args.gate if self._gate.rule.reads_student else None,
            )
            accepted = dataclasses.replace(batch, sampled_ids=proposals).verdicts(student_view, teacher_view)
        else:
            accepted = batch.verdicts(log_probs_t1, log_probs_t1)  # (every completion token; nothing is read)
        # the top-K + tail forward KL on its K + 1 buckets, as TRL computes it (the config refuses target filtering)
        weighted = bucket_forward_kl(teacher, student_log_probs) * batch.weights(accepted).to(student_log_probs.dtype)

        def sampled() -> torch.Tensor:  # the reward term's log q_tau(x_t), differentiable
            return sampled_log_probs(log_probs_t1, logits, tokens, self.temperature)

        loss = self._close_batch(batch, LossTerms(weighted.sum(), accepted, sampled, student_outputs), None)
        if model.training:  # TRL's server path normalizes per micro-batch and scales for accumulation itself
            loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)  # (1 outside the Trainer loop)
        return loss, student_outputs
