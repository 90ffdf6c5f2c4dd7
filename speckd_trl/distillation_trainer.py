"""`SpecKDDistillationTrainer`: TRL's `DistillationTrainer` whose divergence passes every completion token through the
speculative gate.

Wiring only. Where to look:

- how a batch is made: TRL's `DistillationTrainer`, unchanged: prompt-only data, on-policy completions from the
  student (transformers or vLLM, tool calls, vision-language models), a generation batch per accumulation window, and
  `num_items_in_batch` counted on the generated completions;
- how a position is weighted: `weighting.py` (`TokenGate`, `GatedBatch`), the same piece `SpecKDTrainer` calls, over
  the rule of `rules.py`; every completion token is the student's sample, so it is the proposal the teacher verifies;
- how the loss is reduced: `GatedBatch.reduce` over `losses.gated_loss`, from the per-token divergence computed from
  hidden states and output layers, never `[N, V]` logits in full: on the CPU by SpecKD's chunked loss
  (`losses.chunked_weighted_jsd`, the gate reading its chunks), elsewhere by TRL's `ChunkedDivergenceFunction`
  (`_closed_form_loss` says which);
- the set-up (prompt datasets, the gate), on-policy sampling with the trainer's settings only, the logs, evaluation
  draws and checkpointed random streams: the skeleton of `gated_trainer.py` (`PromptTrainerMixin`); here, what
  `DistillationTrainer` makes different: its teacher's checks (`_before_parent_init`) and placement under FSDP
  (`_after_parent_init`), and its loss.

The one override of the loss is `_compute_loss`. TRL's version sums the per-token divergence before returning it, so
the weights cannot be applied after it: `compat.py` repeats TRL's steps up to that sum (pinned to TRL's source by a
test), and the output layers are read by `models.output_head`, the reader `SpecKDTrainer` uses too. With
`gate="none"` the result is TRL's loss. On the first micro-batch both output layers are checked against the models'
own logits (`models.check_output_head`).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn
from trl import DistillationTrainer
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .batch_kind import BatchKind
from .compat import distillation_hidden_states, distillation_inputs, per_token_divergence
from .config import SpecKDDistillationConfig
from .gated_trainer import PromptTrainerMixin
from .losses import chunked_weighted_jsd
from .models import (
    EAGER_REMEDY,
    capture_last_hidden_state,
    check_output_head,
    is_quantized,
    load_teacher_tokenizer,
    output_head,
    prepare_teacher_for_fsdp,
)
from .reduction import LossTerms, sampled_log_probs_from_hidden
from .validation import (
    check_fsdp_applied,
    check_same_tokens,
    check_zero3_quantized_teacher,
)


# What a model whose output layer the chunked divergence cannot read should do instead: `DistillationTrainer` has no
# eager loss path, `SpecKDTrainer` has (`models.EAGER_REMEDY`, said of `SpecKDTrainer`)
SPECKD_EAGER_REMEDY = (
    EAGER_REMEDY.replace("use ", "use SpecKDTrainer with ", 1) + " (lmbda=1 distills on-policy only, as here)"
)


class SpecKDDistillationTrainer(PromptTrainerMixin, DistillationTrainer):
    """TRL's [`~trl.DistillationTrainer`] with the speculative gate: SpecKD for on-policy-only distillation.

    The student samples every completion (through transformers or vLLM, as `DistillationTrainer`); at every completion
    token the teacher verifies the student's sample (`args.gate`), and the per-token generalized JSD (at
    `args.temperature`, as `DistillationTrainer`) is kept with weight 1 on accepted tokens and `args.reject_weight` on
    rejected ones. The accept bit is the teacher's binary reward for the sampled token: its rate is logged as
    `gate/acceptance_rate` (and `gate/acceptance_rate_on_policy`), with `reward/mean` and `reward/std` (per-sequence
    means), and `args.reward_coef > 0` adds a REINFORCE term on it. With `gate="none"` the loss is
    `DistillationTrainer`'s.

    The `spec` rule's ``q`` is the student at `args.temperature` (what it samples from with the default `top_p`,
    `top_k`, `min_p` and `repetition_penalty`); ``p`` is the teacher at temperature 1. On the CPU the verdicts read
    the loss's own chunks of log-probabilities; with TRL's divergence (GPUs, ZeRO-3) they cost one extra projection of
    the completion tokens through the output layers (the teacher's; the student's too for `spec`), without gradient, a
    chunk of tokens at a time.

    Use it instead of [`SpecKDTrainer`] for purely on-policy distillation from prompt-only data, with what
    `DistillationTrainer` brings (vLLM generation, tool calls, vision-language models; this package tests only the
    transformers generation path); use `SpecKDTrainer` (on GKD) to mix on-policy with dataset or teacher-generated
    completions (`lmbda`, `seq_kd`), for speculative (teacher-corrected) generation, the eager or chunked loss paths,
    or `teacher_load_in_4bit`.

    Args: the same as [`~trl.DistillationTrainer`]; `args` must be a [`SpecKDDistillationConfig`]. `teacher_model`
    defaults to `args.teacher_model_name_or_path`. A `train_dataset` / `eval_dataset` of chat `messages` rows (the
    format of [`SpecKDTrainer`]) is turned into `prompt` rows: every message before the last assistant message.
    """

    _tag_names = ["trl", "distillation", "speckd"]
    _name = "SpecKD-Distillation"

    _config_class = SpecKDDistillationConfig
    _heads_checked = False  # `_check_output_heads` runs on the first micro-batch

    def _before_parent_init(self, given: dict[str, Any]) -> None:
        """The teacher (`args.teacher_model_name_or_path` by default) checked before anything is loaded: ZeRO-3 with a
        quantized teacher, and its tokenizer id by id against the student's (TRL compares only the vocabulary sizes),
        read from where the teacher is (or was loaded) from."""
        args = given["args"]
        if given["teacher_model"] is None:
            given["teacher_model"] = args.teacher_model_name_or_path
        teacher_model, processing_class = given["teacher_model"], given["processing_class"]
        if teacher_model is None:
            raise ValueError(
                "SpecKDDistillationTrainer needs a teacher: pass `teacher_model=` (a model, a name or a local path) "
                "or set `teacher_model_name_or_path` in SpecKDDistillationConfig."
            )
        check_zero3_quantized_teacher(
            "quantization_config" in (args.teacher_model_init_kwargs or {})
            if isinstance(teacher_model, str)
            else is_quantized(teacher_model)
        )
        teacher_tokenizer = load_teacher_tokenizer(teacher_model, args)
        if teacher_tokenizer is not None and processing_class is not None:
            check_same_tokens(
                getattr(processing_class, "tokenizer", processing_class),
                getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer),
            )

    def _after_parent_init(self) -> None:
        """`DistillationTrainer`'s `prepare_model(teacher, evaluation_mode=True)` leaves the teacher unsharded and
        unplaced under FSDP (see `models.prepare_teacher_for_fsdp`)."""
        check_fsdp_applied(self.accelerator)
        if self.teacher_model is not None:
            self.teacher_model = prepare_teacher_for_fsdp(self.teacher_model, self.accelerator)

    # ------------------------------------------------------------------ loss

    def _compute_loss(
        self, unwrapped_student: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gated divergence of one micro-batch (runs inside the student wrapper's forward, as TRL's).

        `inputs` holds `prompt_ids` / `prompt_mask` `[B, P]` and `completion_ids` / `completion_mask` `[B, K]` (and
        `tool_mask` `[B, K]` in multi-turn tool use: tool outputs are neither trained on nor gated).

        Returns:
            The loss (scalar), the sum of the student's per-token entropy and the number of completion tokens (as
            `DistillationTrainer._compute_loss`, for its `entropy` metric).
        """
        input_ids, attention_mask, loss_mask = distillation_inputs(inputs)
        if not self._heads_checked:  # before this micro-batch's own forwards, which it leaves as they are
            self._check_output_heads(
                unwrapped_student, self.accelerator.unwrap_model(self.teacher_model), input_ids, attention_mask
            )
        student_hidden, teacher_hidden = distillation_hidden_states(
            self, unwrapped_student, inputs, input_ids, attention_mask
        )
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        student_head = output_head(unwrapped_student, "student", gathered=False, dtype=student_hidden.dtype)
        teacher_head = output_head(unwrapped_teacher, "teacher", gathered=False, dtype=teacher_hidden.dtype)
        if student_head.weight.device != teacher_head.weight.device:
            raise ValueError(
                f"The student `lm_head` is on {student_head.weight.device} but the teacher `lm_head` is on "
                f"{teacher_head.weight.device}. Place both on the same device in their `device_map`."
            )
        device = student_head.weight.device
        student_hidden = student_hidden.to(device).flatten(0, 1)  # [B * K, H_s]
        teacher_hidden = teacher_hidden.to(teacher_head.weight.device).flatten(0, 1)  # [B * K, H_t]
        completion = loss_mask.to(device) != 0  # [B, K]

        batch = self._open_batch(
            BatchKind.on_policy(), completion, inputs["completion_ids"].to(device), training=unwrapped_student.training
        )
        rows = batch.rows
        valid = completion.flatten()
        if self._closed_form_loss(device):
            # the gate reads each chunk's log-probabilities inside the loss: no projection of its own
            entropies = []
            with maybe_gather_lm_head_ctx(
                student_head.weight, student_head.bias, teacher_head.weight, teacher_head.bias
            ):
                weighted_sum, row_verdicts = chunked_weighted_jsd(
                    student_hidden[rows],
                    student_head,
                    teacher_hidden[rows],
                    teacher_head,
                    batch,
                    beta=self.beta,
                    temperature=self.temperature,
                    entropies=entropies,
                )
            accepted = batch.positions(row_verdicts)  # [B, K]
            entropy = torch.cat(entropies) if entropies else student_hidden.new_zeros(0, dtype=torch.float32)
        else:
            with maybe_gather_lm_head_ctx(
                student_head.weight, student_head.bias, teacher_head.weight, teacher_head.bias
            ):
                accepted = batch.verdicts_from_hidden(
                    student_hidden[rows], student_head, teacher_hidden[rows], teacher_head
                )  # [B, K]
            divergence, entropy, index = per_token_divergence(
                student_hidden,
                student_head,
                teacher_hidden,
                teacher_head,
                valid,
                beta=self.beta,
                temperature=self.temperature,
            )
            weights = batch.weights(accepted).flatten()
            weighted_sum = (divergence * (weights if index is None else weights[index])).sum()

        def sampled_log_probs() -> torch.Tensor:  # the reward term's log q_tau(x_t), differentiable, [B, K]
            return batch.scatter(
                sampled_log_probs_from_hidden(
                    student_hidden[rows], student_head, batch.sampled_ids.flatten()[rows], self.temperature
                )
            )

        loss = self._close_batch(batch, LossTerms(weighted_sum, accepted, sampled_log_probs), num_items_in_batch)
        return loss, entropy.sum().detach(), valid.sum()

    def _closed_form_loss(self, device: torch.device) -> bool:
        """Whether the micro-batch's loss is `losses.chunked_weighted_jsd` (SpecKD's chunked loss, its gradient in
        closed form in the forward pass, the gate reading each chunk's log-probabilities) rather than TRL's
        `ChunkedDivergenceFunction` followed by the gate's own projection (`GatedBatch.verdicts_from_hidden`).

        On the CPU, where TRL's function runs its torch tiles, ours projects each chunk through both output layers once
        (TRL's twice: forward and backward; three times for 0 < beta < 1) and the gate costs no projection of its own:
        measured in `benchmarks/trl_side_by_side.py`. Elsewhere (TRL's Triton kernels on a GPU, unmeasured against
        ours) and under DeepSpeed ZeRO-3 (whose partitioned output layer TRL's function gathers again in its backward)
        TRL's function stays. The loss and gradients are TRL's to float round-off (tested). The chunk's
        log-probabilities are at the divergence's temperature, which the gate reads only at temperature 1 (a rule
        that reads probabilities needs the teacher's own).
        """
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if device.type != "cpu" or is_deepspeed_zero3_enabled():
            return False
        return self.temperature == 1.0 or not self._gate.rule.rejects

    @torch.no_grad()
    def _check_output_heads(
        self, student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> None:
        """Once, on the first micro-batch, before its own forwards: both models' own logits at the last position (one
        forward each, no gradient) against what `output_head` computes from the same forward's final hidden states
        (`models.check_output_head`). Every process runs it, so sharded models gather together.

        Not under DeepSpeed ZeRO-3, where a forward of the whole model besides the backbone's breaks ZeRO-3's parameter
        prefetching for the steps after it (measured: "Cannot partition a param in flight"): there it warns instead.
        """
        self._heads_checked = True
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            warnings.warn(
                "SpecKDDistillationTrainer: under DeepSpeed ZeRO-3 the output layers are read by TRL's logit-scale and "
                "softcap rules without the start-up comparison with the models' own logits (an extra forward would "
                "disturb ZeRO-3's prefetching). For a model family not tried before, run one step without ZeRO-3 "
                "first: a head the rules do not describe stops there with an error.",
                UserWarning,
                stacklevel=2,
            )
            return
        for role, model in (("student", student), ("teacher", teacher)):
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            # as TRL's `_get_last_hidden_state`: some models (SmolVLM / Idefics3) take no `logits_to_keep`
            keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
            with capture_last_hidden_state(model) as captured:
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **keep).logits
            head = output_head(model, role, gathered=False, dtype=captured["hidden"].dtype)
            with maybe_gather_lm_head_ctx(head.weight, head.bias):
                check_output_head(
                    model, role, head, captured["hidden"][:, -1], logits[:, -1], remedy=SPECKD_EAGER_REMEDY
                )
