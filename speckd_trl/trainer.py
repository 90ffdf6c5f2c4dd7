"""`SpecKDTrainer`: `GKDTrainer` whose distillation loss passes every sequence through the speculative gate.

Wiring only: the maths is in `gate.py` (proposals, accept masks) and `losses.py` (weighted generalized JSD and its
normalization); teacher loading and compatibility checks are in `models.py`.

Two things differ from TRL 1.16's `GKDTrainer` besides the gate:

- On-policy (student) and `seq_kd` (teacher) generation happens when the Trainer fetches the micro-batches of an
  accumulation window (`get_batch_samples`), not inside `training_step`. The loss denominator `num_items_in_batch` is
  then counted on the sequences that are actually trained on. GKD counts it on the dataset labels before replacing
  them with generated ones, which mis-scales the loss and gradient of every generated batch.
- The on-policy / `seq_kd` / dataset draw uses a generator seeded with `args.seed` that advances identically on every
  process, so all processes pick the same batch kind (no process generates while another does not).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel, TrainerCallback
from trl.experimental.gkd import GKDTrainer
from trl.experimental.utils import empty_cache
from trl.kernels.chunked_logprob import ChunkedLogProbFunction
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.sft_trainer import SFTTrainer

from .config import SpecKDConfig
from .gate import accept_mask, propose, sequence_rewards
from .generation import GenerationStats, speculative_generate
from .losses import (
    OutputHead,
    chunked_weighted_jsd,
    loss_denominator,
    normalize_loss,
    policy_gradient_loss,
    weighted_generalized_jsd,
)
from .models import (
    capture_last_hidden_state,
    check_pad_token,
    check_vocab,
    last_hidden_state,
    load_teacher,
    output_head,
)


ON_POLICY = "on_policy"
SEQ_KD = "seq_kd"
OFF_POLICY = "off_policy"
KIND_KEY = "speckd_kind"  # batch key that records how the micro-batch's completions were made
VOCAB_TILE = 8192  # vocabulary columns per tile of the chunked log-probabilities (reward term)


class SpecKDTrainer(GKDTrainer):
    """Trainer for Speculative Knowledge Distillation (SpecKD), a drop-in replacement for `GKDTrainer`.

    At every completion position the student proposes a token (the token it sampled, for on-policy sequences; its own
    greedy or sampled prediction under teacher forcing, for dataset and `seq_kd` sequences) and the teacher verifies
    it (`args.gate`). GKD's generalized JSD is kept with weight 1 on accepted positions and `args.reject_weight` on
    rejected ones. The accept bit is the teacher's binary reward for the student's action; its rate is logged as
    `gate/acceptance_rate*` and `reward/mean`, `reward/std` (per-sequence means).

    Args: the same as [`~trl.experimental.gkd.GKDTrainer`]; `args` must be a [`SpecKDConfig`]. `teacher_model` may be a
    model, a name or a local path (loaded in 4-bit when `args.teacher_load_in_4bit`), or `None` to use
    `args.teacher_model_name_or_path`. `processing_class` is required and must have a pad token.
    """

    _tag_names = ["trl", "gkd", "speckd"]
    _name = "SpecKD"
    # `compute_loss` divides by the completion tokens of the whole accumulation window itself.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str | None = None,
        teacher_model: PreTrainedModel | nn.Module | str | None = None,
        args: SpecKDConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: Any = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        peft_config: Any = None,
        formatting_func: Callable | None = None,
    ):
        if not isinstance(args, SpecKDConfig):
            raise TypeError(
                f"SpecKDTrainer needs `args=SpecKDConfig(...)`, got {type(args).__name__}. SpecKDConfig accepts every "
                "GKDConfig field."
            )
        check_pad_token(processing_class)

        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError(
                "SpecKDTrainer needs a teacher: pass `teacher_model=` (a model, a name or a local path) or set "
                "`teacher_model_name_or_path` in SpecKDConfig."
            )
        if isinstance(teacher_model, str):
            teacher_model = load_teacher(teacher_model, args)
        elif args.teacher_model_init_kwargs is not None:
            raise ValueError(
                "You passed teacher_model_init_kwargs to SpecKDConfig, but your teacher_model is already instantiated."
            )

        # The teacher is already loaded with our kwargs; GKD would try to apply them to an instance and raise.
        init_kwargs, args.teacher_model_init_kwargs = args.teacher_model_init_kwargs, None
        try:
            super().__init__(
                model,
                teacher_model=teacher_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                peft_config=peft_config,
                formatting_func=formatting_func,
            )
        finally:
            args.teacher_model_init_kwargs = init_kwargs
        check_vocab(self.model, self.teacher_model, self.processing_class)

        # Same draw on every process: all of them generate (or not) together.
        self._kind_rng = random.Random(args.seed)
        self._gate_generator = torch.Generator(device=self.accelerator.device)
        self._gate_generator.manual_seed(args.seed + self.accelerator.process_index)
        self._gate_window = self._new_gate_window()
        # Per-row seeds of speculative generation (`generation.row_seeds`); a stream of its own, so turning
        # `on_policy_generation` on leaves the gate's draws unchanged.
        self._generation_generator = torch.Generator()
        self._generation_generator.manual_seed(args.seed + 1_000_003 * (self.accelerator.process_index + 1))

    # ------------------------------------------------------------------ batches

    def _draw_kind(self) -> str:
        """On-policy with probability `lmbda`, else `seq_kd` if enabled, else the dataset batch (as GKD)."""
        if self._kind_rng.random() < self.lmbda:
            return ON_POLICY
        return SEQ_KD if self.seq_kd else OFF_POLICY

    def _make_completions(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Draw the micro-batch's kind and, for on-policy / `seq_kd`, replace its completions by generated ones."""
        kind = self._draw_kind()
        if kind != OFF_POLICY:
            generator_model = self.model_wrapped if kind == ON_POLICY else self.teacher_model
            with unwrap_model_for_generation(
                generator_model,
                self.accelerator,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs if kind == ON_POLICY else None,
            ) as unwrapped_model:
                if kind == ON_POLICY and self.args.on_policy_generation == "speculative":
                    unwrapped_model = _SpeculativeGenerator(self, unwrapped_model)
                input_ids, attention_mask, labels = self.generate_on_policy_outputs(
                    unwrapped_model, inputs, self.generation_config
                )
            inputs = {**inputs, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return {**inputs, KIND_KEY: kind}

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list[dict[str, Any]], torch.Tensor]:
        """Fetch an accumulation window, generate its completions, and count its completion tokens.

        Returns:
            The micro-batches and `num_items_in_batch`: completion tokens in the window (labels != -100 after the
            causal shift), averaged over processes when `average_tokens_across_devices` (DDP then averages the
            gradients, which makes the sum over all processes' tokens divided by their total).
        """
        batch_samples = [self._make_completions(batch) for batch in itertools.islice(epoch_iterator, num_batches)]
        num_items = sum((batch["labels"][:, 1:] != -100).sum() for batch in batch_samples)
        num_items = torch.as_tensor(num_items, device=device)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            num_items = self.accelerator.gather(num_items).sum() / self.accelerator.num_processes
        return batch_samples, num_items

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """A plain SFT training step: completions were already generated in `get_batch_samples`."""
        if KIND_KEY not in inputs:  # called outside the Trainer loop: generate here, normalize locally
            inputs, num_items_in_batch = self._make_completions(inputs), None
        return SFTTrainer.training_step(self, model, inputs, num_items_in_batch)

    # ------------------------------------------------------------------ loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Gated generalized JSD of one micro-batch, normalized for its accumulation window.

        `args.loss_path="eager"` computes it from both models' full logits, `"chunked"` from their final hidden
        states, `args.loss_chunk_size` completion tokens at a time (`losses.chunked_weighted_jsd`); both give the
        same loss, gradients and gate decisions (the gate's random draws are made once per micro-batch).
        """
        kind = inputs.get(KIND_KEY, OFF_POLICY)
        # Causal shift: the model's output at position i predicts the token at i + 1.
        labels = inputs["labels"][:, 1:]
        completion = labels != -100
        gated = completion if self._is_gated(kind) else torch.zeros_like(completion)
        uniforms = self._draw_uniforms(kind, gated)

        if self.args.loss_path == "chunked":
            weighted, weights, accepted, student_outputs, sampled_logprobs = self._chunked_terms(
                model, inputs, labels, completion, gated, kind, uniforms
            )
        else:
            student_outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            self.teacher_model.eval()
            with torch.no_grad():
                teacher_logits = self.teacher_model(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                ).logits[:, :-1]
            student_logits = student_outputs.logits[:, :-1]
            accepted = self._verify_rows(student_logits, teacher_logits, labels, gated, kind, uniforms) | (
                completion & ~gated
            )
            weights = self._loss_weights(accepted) * completion
            weighted = weighted_generalized_jsd(student_logits, teacher_logits, weights, beta=self.beta)

            def sampled_logprobs() -> torch.Tensor:
                logprobs = torch.log_softmax(student_logits.float() / self.temperature, dim=-1)
                return logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)

        loss = self.args.kd_coef * normalize_loss(
            weighted,
            weights,
            completion,
            normalize=self.args.gate_normalize,
            num_items_in_batch=num_items_in_batch,
        )
        if self.args.reward_coef > 0 and kind == ON_POLICY and gated.any():
            # the accept bit is the teacher's reward for the sampled token: a REINFORCE step on it
            loss = loss + self.args.reward_coef * policy_gradient_loss(
                sampled_logprobs(),
                accepted,
                gated,
                denominator=loss_denominator(completion, num_items_in_batch),
            )
        if model.training:
            self._record_gate(kind, accepted, gated)
        empty_cache()
        return (loss, student_outputs) if return_outputs else loss

    def _chunked_terms(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        labels: torch.Tensor,
        completion: torch.Tensor,
        gated: torch.Tensor,
        kind: str,
        uniforms: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, Callable[[], torch.Tensor]]:
        """The loss terms of the chunked path, on the completion positions only.

        Returns:
            ``sum_t w_t D_t`` (scalar), the weights `[N]` of the `N` completion positions, the accept mask `[B, T]`,
            the student's outputs (logits of the last position only), and a function that gives the student's
            log-probabilities `[B, T]` of the labels at the sampling temperature (chunked too; 0 off the completion).
        """
        student_head, teacher_head = self._output_heads()
        # logits_to_keep=1: the model projects one position; the loss projects the rest chunk by chunk
        with capture_last_hidden_state(self.accelerator.unwrap_model(model)) as captured:
            student_outputs = model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=1
            )
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_hidden = last_hidden_state(self.teacher_model, inputs["input_ids"], inputs["attention_mask"])
        rows = completion.flatten().nonzero().squeeze(-1)
        student_hidden = captured["hidden"][:, :-1].flatten(0, 1)[rows]
        teacher_hidden = teacher_hidden[:, :-1].flatten(0, 1)[rows]
        row_labels, row_gated = labels.flatten()[rows], gated.flatten()[rows]
        row_uniforms = {name: u.flatten()[rows] for name, u in uniforms.items()}
        row_accepted = torch.ones_like(row_gated)

        def weight_fn(student_logits: torch.Tensor, teacher_logits: torch.Tensor, chunk: slice) -> torch.Tensor:
            chunk_uniforms = {name: u[chunk] for name, u in row_uniforms.items()}
            verdict = self._verify(
                student_logits, teacher_logits, row_labels[chunk], row_gated[chunk], kind, chunk_uniforms
            )
            row_accepted[chunk] = verdict | ~row_gated[chunk]
            return self._loss_weights(row_accepted[chunk])

        weighted, weights = chunked_weighted_jsd(
            student_hidden,
            student_head,
            teacher_hidden,
            teacher_head,
            weight_fn,
            beta=self.beta,
            chunk_size=self.args.loss_chunk_size,
        )
        accepted = torch.zeros_like(completion).flatten()
        accepted[rows] = row_accepted

        def sampled_logprobs() -> torch.Tensor:
            row_logprobs = ChunkedLogProbFunction.apply(
                student_hidden,
                student_head.weight,
                student_head.bias,
                row_labels,
                self.temperature,
                VOCAB_TILE,
                student_head.softcap,
                student_head.logit_scale,
                (),
            )[0]
            logprobs = torch.zeros(completion.numel(), device=row_logprobs.device, dtype=row_logprobs.dtype)
            return logprobs.index_put((rows,), row_logprobs).view_as(completion)

        return weighted, weights, accepted.view_as(completion), student_outputs, sampled_logprobs

    def _output_heads(self) -> tuple[OutputHead, OutputHead]:
        """The student's and the teacher's output layers, for the chunked loss."""
        return (
            output_head(self.accelerator.unwrap_model(self.model), "student"),
            output_head(self.accelerator.unwrap_model(self.teacher_model), "teacher"),
        )

    def _loss_weights(self, accepted: torch.Tensor) -> torch.Tensor:
        """``w_t``: 1 where accepted (or not gated), `reject_weight` where rejected."""
        return torch.where(accepted, 1.0, self._reject_weight())

    def _gate_top_k(self, step: int | None = None) -> int:
        """k of the `topk` gate at optimizer step `step` (default: the current one), per `gate_top_k_schedule`."""
        step = self.state.global_step if step is None else step
        return self.args.gate_top_k_at(step, self.state.max_steps)

    def _reject_weight(self, step: int | None = None) -> float:
        """Weight of rejected positions at optimizer step `step` (default: the current one)."""
        step = self.state.global_step if step is None else step
        return self.args.reject_weight_at(step, self.state.max_steps)

    def _is_gated(self, kind: str) -> bool:
        return self.args.gates_on_policy if kind == ON_POLICY else self.args.gates_off_policy

    def _draw_uniforms(self, kind: str, gated: torch.Tensor) -> dict[str, torch.Tensor]:
        """The gate's U(0, 1) draws for the micro-batch, `[B, T]` each, made once so every loss path uses them."""
        uniforms = {}
        if not gated.any() or self.args.gate == "none":
            return uniforms
        if kind != ON_POLICY and self.args.gate_proposal == "sample":
            uniforms["proposal"] = self._uniform(gated.shape)
        if self.args.gate == "spec":
            uniforms["accept"] = self._uniform(gated.shape)
        return uniforms

    def _uniform(self, shape: torch.Size) -> torch.Tensor:
        generator = self._gate_generator
        return torch.rand(shape, generator=generator, device=generator.device).to(self.accelerator.device)

    @torch.no_grad()
    def _verify_rows(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        gated: torch.Tensor,
        kind: str,
        uniforms: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """`_verify` on the gated positions only (`[B, T, V]` logits in, `[B, T]` accept bits out): prompt and
        padding positions, most of an on-policy batch, never enter the gate's `[.., V]` passes."""
        if not gated.any() or self.args.gate == "none":
            return gated.clone()
        rows = gated.nonzero(as_tuple=True)
        verdict = self._verify(
            student_logits[rows],
            teacher_logits[rows],
            labels[rows],
            gated[rows],
            kind,
            {name: u[rows] for name, u in uniforms.items()},
        )
        accepted = torch.zeros_like(gated)
        accepted[rows] = verdict
        return accepted

    @torch.no_grad()
    def _verify(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        gated: torch.Tensor,
        kind: str,
        uniforms: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The teacher's accept bits on the student's proposals at the gated positions.

        Shapes: logits `[..., V]`, the rest `[...]` (a batch `[B, T]` or a chunk of rows `[n]`).
        """
        if not gated.any():
            return torch.zeros_like(gated)
        if self.args.gate == "none":
            return gated.clone()
        student_logits = student_logits.detach()
        if kind == ON_POLICY:
            # The proposal is the sampled token, drawn from the student at the generation temperature
            # (GKD samples with top_k=0, top_p=1), so that is the q of the `spec` rule.
            proposals = labels.clamp(min=0)
            proposal_logits = student_logits / self.temperature
        else:
            proposals = propose(student_logits, mode=self.args.gate_proposal, uniforms=uniforms.get("proposal"))
            proposal_logits = student_logits
        return accept_mask(
            proposal_logits,
            teacher_logits,
            proposals,
            gated,
            gate=self.args.gate,
            top_k=self._gate_top_k(),
            uniforms=uniforms.get("accept"),
        )

    # ------------------------------------------------------------------ logging

    @staticmethod
    def _new_gate_window() -> dict[str, float]:
        return dict.fromkeys(
            ("accepted_on", "gated_on", "accepted_off", "gated_off", "reward_sum", "reward_sq_sum", "sequences")
            + ("gen_row_blocks", "gen_tokens", "gen_runs", "gen_run_sum", "gen_replaced"),
            0.0,
        )

    def _record_generation(self, stats: GenerationStats) -> None:
        window = self._gate_window
        window["gen_row_blocks"] += stats.row_blocks
        window["gen_tokens"] += stats.generated_tokens
        window["gen_runs"] += len(stats.accepted_runs)
        window["gen_run_sum"] += sum(stats.accepted_runs)
        window["gen_replaced"] += stats.replaced_tokens

    def _record_gate(self, kind: str, accepted: torch.Tensor, gated: torch.Tensor) -> None:
        suffix = "on" if kind == ON_POLICY else "off"
        window = self._gate_window
        window[f"accepted_{suffix}"] += (accepted & gated).sum().item()
        window[f"gated_{suffix}"] += gated.sum().item()
        rewards = sequence_rewards(accepted, gated)
        window["reward_sum"] += rewards.sum().item()
        window["reward_sq_sum"] += rewards.square().sum().item()
        window["sequences"] += rewards.numel()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the gate's acceptance rates and the reward statistics of the logging window (all processes)."""
        if self.model.training and "loss" in logs:
            keys = list(self._gate_window)
            totals = torch.tensor([self._gate_window[k] for k in keys], dtype=torch.float64, device=self.args.device)
            totals = dict(zip(keys, self.accelerator.reduce(totals, reduction="sum").tolist()))
            self._gate_window = self._new_gate_window()
            logs.update(gate_metrics(totals))
            # the values of the step that just ran (global_step has already moved past it)
            if self.args.gate == "topk":
                logs["gate/top_k"] = self._gate_top_k(self.state.global_step - 1)
            if self.args.gate != "none":
                logs["gate/reject_weight"] = self._reject_weight(self.state.global_step - 1)
        super().log(logs, start_time)


def gate_metrics(totals: dict[str, float]) -> dict[str, float]:
    """Acceptance rates and reward statistics from a window's summed counts; a kind with no gated token is omitted."""
    metrics = {}
    gated = totals["gated_on"] + totals["gated_off"]
    if gated > 0:
        metrics["gate/acceptance_rate"] = (totals["accepted_on"] + totals["accepted_off"]) / gated
    if totals["gated_on"] > 0:
        metrics["gate/acceptance_rate_on_policy"] = totals["accepted_on"] / totals["gated_on"]
    if totals["gated_off"] > 0:
        metrics["gate/acceptance_rate_off_policy"] = totals["accepted_off"] / totals["gated_off"]
    if totals["sequences"] > 0:
        mean = totals["reward_sum"] / totals["sequences"]
        metrics["reward/mean"] = mean
        metrics["reward/std"] = math.sqrt(max(totals["reward_sq_sum"] / totals["sequences"] - mean**2, 0.0))
    if totals.get("gen_tokens", 0) > 0:  # speculative on-policy generation ran in this window
        metrics["gen/teacher_forwards_per_token"] = totals["gen_row_blocks"] / totals["gen_tokens"]
        metrics["gen/mean_accepted_run"] = totals["gen_run_sum"] / max(totals["gen_runs"], 1)
        metrics["gen/replaced_fraction"] = totals["gen_replaced"] / totals["gen_tokens"]
    return metrics


class _SpeculativeGenerator:
    """Stands in for the student in GKD's `generate_on_policy_outputs`, whose `model.generate` call it answers with
    `speculative_generate`, so that the ids, attention mask and labels keep exactly GKD's format.

    Sampling follows the trainer's generation config: the student's temperature `args.temperature` (GKD samples with
    `top_k=0, top_p=1`), the teacher verifies with `args.gate` / `args.gate_top_k`, `args.gate_draft_len` tokens per
    teacher forward; the statistics go to the trainer's logging window.
    """

    def __init__(self, trainer: SpecKDTrainer, student: nn.Module):
        self.trainer, self.student = trainer, student

    def generate(self, input_ids, attention_mask, generation_config, **_):
        trainer = self.trainer
        trainer.teacher_model.eval()
        sequences, stats = speculative_generate(
            self.student,
            trainer.teacher_model,
            input_ids,
            attention_mask,
            gate=trainer.args.gate,
            top_k=trainer._gate_top_k(),
            draft_len=trainer.args.gate_draft_len,
            max_new_tokens=generation_config.max_new_tokens,
            temperature=generation_config.temperature,
            do_sample=generation_config.do_sample,
            eos_token_id=generation_config.eos_token_id,
            pad_token_id=generation_config.pad_token_id,
            generator=trainer._generation_generator,
        )
        trainer._record_generation(stats)
        return SimpleNamespace(sequences=sequences)
