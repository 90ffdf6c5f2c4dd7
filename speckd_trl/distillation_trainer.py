"""`SpecKDDistillationTrainer`: TRL's `DistillationTrainer` whose divergence passes every completion token through the
speculative gate.

Wiring only. Where to look:

- how a batch is made: TRL's `DistillationTrainer`, unchanged: prompt-only data, on-policy completions from the
  student (transformers or vLLM, tool calls, vision-language models), a generation batch per accumulation window, and
  `num_items_in_batch` counted on the generated completions;
- how a position is weighted: `gating.py` (`TokenGate`, `GatedBatch`, `GatedRows`), the same piece `SpecKDTrainer`
  calls; every completion token is the student's sample, so it is the proposal the teacher verifies;
- how the loss is reduced: `GatedBatch.reduce` over `losses.py`, from the per-token divergence of TRL's
  `ChunkedDivergenceFunction` (hidden states and output layers, never `[N, V]` logits in full).

The one override of the loss is `_compute_loss`. TRL's version ends in `_chunked_divergence_loss`, a module-level
function that sums the per-token divergence before returning it, so the weights cannot be applied after it: this
override repeats TRL's inputs (both models' hidden states through `_get_last_hidden_state` and `_forward_redirection`,
their output layers through `models.output_head`, the reader `SpecKDTrainer` uses too, with TRL's logit-scale and
softcap rules) and calls `ChunkedDivergenceFunction` itself, as `_chunked_divergence_loss` does, keeping the per-token
values. With `gate="none"` the result is TRL's loss. On the first micro-batch both output layers are checked against
the models' own logits (`models.check_output_head`).
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from torch import nn
from transformers import PreTrainedModel, TrainerCallback
from trl import DistillationTrainer
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
from trl.kernels.chunked_logprob import _use_triton
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .config import SpecKDDistillationConfig
from .gating import ON_POLICY, GatedTrainerMixin, TokenGate, sampled_log_probs_from_hidden
from .generation import sampling_only_from
from .models import (
    capture_last_hidden_state,
    check_output_head,
    check_same_tokens,
    load_teacher_tokenizer,
    output_head,
    output_vocab_size,
    prepare_teacher_for_fsdp,
)
from .validation import (
    check_fsdp_applied,
    check_gate_top_k,
    check_launch,
    check_prompt_dataset,
    check_zero3_quantized_teacher,
    is_quantized,
    named_datasets,
)


# What a model whose output layer the chunked divergence cannot read should do instead
EAGER_REMEDY = "use SpecKDTrainer with loss_path='eager' (lmbda=1 distills on-policy only, as here)"
GATE_STATE_FILE = "speckd_gate_state_{}.pth"  # per process: the gate's training generator and logging window
# The multimodal fields `DistillationTrainer._compute_loss` forwards to both backbones (TRL 1.16)
MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class SpecKDDistillationTrainer(GatedTrainerMixin, DistillationTrainer):
    """TRL's [`~trl.DistillationTrainer`] with the speculative gate: SpecKD for on-policy-only distillation.

    The student samples every completion (through transformers or vLLM, as `DistillationTrainer`); at every completion
    token the teacher verifies the student's sample (`args.gate`), and the per-token generalized JSD (at
    `args.temperature`, as `DistillationTrainer`) is kept with weight 1 on accepted tokens and `args.reject_weight` on
    rejected ones. The accept bit is the teacher's binary reward for the sampled token: its rate is logged as
    `gate/acceptance_rate` (and `gate/acceptance_rate_on_policy`), with `reward/mean` and `reward/std` (per-sequence
    means), and `args.reward_coef > 0` adds a REINFORCE term on it. With `gate="none"` the loss is
    `DistillationTrainer`'s.

    The `spec` rule's ``q`` is the student at `args.temperature` (what it samples from with the default `top_p`,
    `top_k`, `min_p` and `repetition_penalty`); ``p`` is the teacher at temperature 1. The verdicts cost one extra
    projection of the completion tokens through the output layers (the teacher's; the student's too for `spec`),
    without gradient, a chunk of tokens at a time.

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

    def __init__(
        self,
        model: str | PreTrainedModel | nn.Module,
        teacher_model: str | PreTrainedModel | nn.Module | None = None,
        args: SpecKDDistillationConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: list[Callable] | None = None,
    ):
        if not isinstance(args, SpecKDDistillationConfig):
            raise TypeError(
                "SpecKDDistillationTrainer needs `args=SpecKDDistillationConfig(...)`, got "
                f"{type(args).__name__}. SpecKDDistillationConfig accepts every DistillationConfig field."
            )
        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError(
                "SpecKDDistillationTrainer needs a teacher: pass `teacher_model=` (a model, a name or a local path) "
                "or set `teacher_model_name_or_path` in SpecKDDistillationConfig."
            )
        # Bad input fails here, before any model is loaded or any step runs (as in `SpecKDTrainer`).
        check_launch(args)
        for name, dataset in [("train_dataset", train_dataset)] + named_datasets(eval_dataset, "eval_dataset"):
            check_prompt_dataset(dataset, processing_class, name=name)
        check_zero3_quantized_teacher(
            "quantization_config" in (args.teacher_model_init_kwargs or {})
            if isinstance(teacher_model, str)
            else is_quantized(teacher_model)
        )
        # TRL compares only the vocabulary sizes: the two tokenizers id by id here, from where the teacher is (or was
        # loaded) from, before anything is loaded
        teacher_tokenizer = load_teacher_tokenizer(teacher_model, args)
        if teacher_tokenizer is not None and processing_class is not None:
            check_same_tokens(
                getattr(processing_class, "tokenizer", processing_class),
                getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer),
            )
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: prompts_from_messages(ds) for name, ds in eval_dataset.items()}
        else:
            eval_dataset = prompts_from_messages(eval_dataset)
        super().__init__(
            model,
            teacher_model=teacher_model,
            args=args,
            train_dataset=prompts_from_messages(train_dataset),
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
        )
        # `DistillationTrainer`'s `prepare_model(teacher, evaluation_mode=True)` leaves the teacher unsharded and
        # unplaced under FSDP (see `models.prepare_teacher_for_fsdp`)
        check_fsdp_applied(self.accelerator)
        if self.teacher_model is not None:
            self.teacher_model = prepare_teacher_for_fsdp(self.teacher_model, self.accelerator)
        check_gate_top_k(args, output_vocab_size(self.accelerator.unwrap_model(self.model)))
        # The per-token gate: its draws (one training stream per process, one evaluation stream), its settings at a
        # step and its logging window. The proposals are the sampled tokens, drawn at `args.temperature`.
        self._gate = TokenGate(
            args,
            temperature=args.temperature,
            device=self.accelerator.device,
            seed=args.seed,
            process_index=self.accelerator.process_index,
        )
        self._heads_checked = False  # `_check_output_heads` runs on the first micro-batch

    # ------------------------------------------------------------------ generation

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        """TRL's generation, sampling with the trainer's settings only (`generation.sampling_only_from`): none is
        inherited from the student's own generation config, so the `spec` rule's ``q`` is what was sampled from."""
        with sampling_only_from(self.accelerator.unwrap_model(self.model), self.generation_config):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)

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
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)  # position k's hidden state predicts completion token k
        multimodal_inputs = {key: inputs[key] for key in MULTIMODAL_KEYS if key in inputs}
        if not self._heads_checked:  # before this micro-batch's own forwards, which it leaves as they are
            self._check_output_heads(
                unwrapped_student, self.accelerator.unwrap_model(self.teacher_model), input_ids, attention_mask
            )
        student_hidden = self._get_last_hidden_state(
            unwrapped_student, input_ids, attention_mask, logits_to_keep, **multimodal_inputs
        )
        # the teacher's backbone through its own wrapper, so FSDP / DeepSpeed materialize its sharded parameters
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model,
                unwrapped_teacher,
                self._get_last_hidden_state,
                unwrapped_teacher,
                input_ids,
                attention_mask,
                logits_to_keep,
                **multimodal_inputs,
            )
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

        gate = self._gate.batch(
            ON_POLICY,
            completion,
            training=unwrapped_student.training,
            step=self.state.global_step,
            max_steps=self.state.max_steps,
        )
        rows = gate.on_rows(inputs["completion_ids"].to(device))
        with maybe_gather_lm_head_ctx(student_head.weight, student_head.bias, teacher_head.weight, teacher_head.bias):
            rows.verify_hidden(student_hidden[rows.rows], student_head, teacher_hidden[rows.rows], teacher_head)
        accepted = rows.positions()  # [B, K]
        weights = gate.weights(accepted)  # [B, K]

        # TRL's `_chunked_divergence_loss` without its sum: on Triton devices only the completion tokens are
        # projected; elsewhere all of them (fixed tile shapes, no recompilation), the others masked after
        valid = completion.flatten()
        compact = _use_triton(device)
        h_s, h_t = (student_hidden[valid], teacher_hidden[valid]) if compact else (student_hidden, teacher_hidden)
        divergence, entropy = ChunkedDivergenceFunction.apply(
            h_s,
            student_head.weight,
            student_head.bias,
            h_t,
            teacher_head.weight,
            teacher_head.bias,
            self.beta,
            self.temperature,
            student_head.logit_scale,
            student_head.softcap,
            teacher_head.logit_scale,
            teacher_head.softcap,
        )
        flat_weights = weights.flatten()
        if compact:
            weighted = divergence * flat_weights[valid]
        else:
            weighted = divergence.masked_fill(~valid, 0) * flat_weights
            entropy = entropy.masked_fill(~valid, 0)

        def logprobs() -> torch.Tensor:  # the reward term's log q_tau(x_t), differentiable, [B, K]
            row_logprobs = sampled_log_probs_from_hidden(
                student_hidden[rows.rows], student_head, rows.sampled_ids, self.temperature
            )
            return rows.scatter(row_logprobs)

        loss = gate.reduce(weighted.sum(), flat_weights, accepted, logprobs, num_items_in_batch)
        gate.record(accepted)
        return loss, entropy.sum().detach(), valid.sum()

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
                check_output_head(model, role, head, captured["hidden"][:, -1], logits[:, -1], remedy=EAGER_REMEDY)

    # ------------------------------------------------------------------ checkpoints

    def _save_rng_state(self, output_dir: str) -> None:
        """The Trainer's RNG states, plus the gate's training generator and logging window (one file per process)."""
        super()._save_rng_state(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, GATE_STATE_FILE.format(self.accelerator.process_index))
        torch.save(self._gate.state_dict(), path)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        path = (
            None
            if checkpoint is None
            else os.path.join(checkpoint, GATE_STATE_FILE.format(self.accelerator.process_index))
        )
        if path is not None and os.path.isfile(path):  # else a checkpoint of another trainer or process count
            self._gate.load_state_dict(torch.load(path, weights_only=True))


def prompts_from_messages(dataset: Any) -> Any:
    """Chat `messages` rows as `prompt` rows for `DistillationTrainer`: every message before the last assistant
    message (all of them when the last is not the assistant's). Datasets that have a `prompt` column, or no
    `messages` column, are returned unchanged."""
    columns = getattr(dataset, "column_names", None) or []
    if "prompt" in columns or "messages" not in columns:
        return dataset

    def to_prompt(example: dict[str, Any]) -> dict[str, Any]:
        messages = example["messages"]
        last = len(messages) - 1 if messages and messages[-1]["role"] == "assistant" else len(messages)
        return {"prompt": messages[:last]}

    return dataset.map(to_prompt, remove_columns=["messages"])
