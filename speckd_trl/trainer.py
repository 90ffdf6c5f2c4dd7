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

import dataclasses
import itertools
import math
import os
import random
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import AutoConfig, PreTrainedModel, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl.experimental.gkd import GKDTrainer
from trl.experimental.utils import empty_cache
from trl.kernels.chunked_logprob import ChunkedLogProbFunction
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.sft_trainer import SFTTrainer

from .config import SpecKDConfig, on_policy_rows
from .gate import accept_mask, propose, sequence_rewards
from .generation import GenerationStats, speculative_generate
from .losses import (
    OutputHead,
    chunked_weighted_jsd,
    jsd_log_probs,
    loss_denominator,
    normalize_loss,
    policy_gradient_loss,
    weighted_jsd_from_log_probs,
)
from .models import (
    capture_last_hidden_state,
    check_pad_token,
    check_vocab,
    last_hidden_state,
    load_teacher,
    load_teacher_tokenizer,
    output_head,
    output_vocab_size,
)
from .validation import (
    check_4bit_teacher,
    check_dataset,
    check_launch,
    check_quantized_student,
    prepare_prompt_completion,
)


ON_POLICY = "on_policy"
SEQ_KD = "seq_kd"
OFF_POLICY = "off_policy"
MIXED = "mixed"  # mixing="sample": some rows on-policy, the rest seq_kd or dataset
KIND_KEY = "speckd_kind"  # batch key that records how the micro-batch's completions were made
ROW_ON_POLICY_KEY = "speckd_on_policy"  # with KIND_KEY == MIXED: bool [B], True on the rows generated on-policy
# With on_policy_generation="speculative": long [B, L] like input_ids, the student's own draft at each completion
# position of an on-policy row (it differs from input_ids where the teacher replaced a rejected draft). Without it
# the on-policy tokens themselves are the student's samples.
PROPOSALS_KEY = "speckd_proposals"
RNG_STATE_FILE = "speckd_rng_state_{}.pth"  # per process: the batch-kind draw, the gate's and generation's generators
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
        check_launch(args)
        check_pad_token(processing_class)
        # Bad input fails here, before any model is prepared or any step runs.
        for name, dataset in [("train_dataset", train_dataset)] + _named(eval_dataset, "eval_dataset"):
            check_dataset(dataset, processing_class, args.max_length, name=name)
        train_dataset = prepare_prompt_completion(train_dataset, processing_class)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: prepare_prompt_completion(v, processing_class) for k, v in eval_dataset.items()}
        else:
            eval_dataset = prepare_prompt_completion(eval_dataset, processing_class)
        if not isinstance(model, str):
            check_quantized_student(model, peft_config)

        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError(
                "SpecKDTrainer needs a teacher: pass `teacher_model=` (a model, a name or a local path) or set "
                "`teacher_model_name_or_path` in SpecKDConfig."
            )
        teacher_tokenizer = None
        if isinstance(teacher_model, str):
            if args.teacher_load_in_4bit:
                check_4bit_teacher(args.device)
            teacher_tokenizer = load_teacher_tokenizer(teacher_model, args)
            teacher_model = load_teacher(teacher_model, args)
        elif args.teacher_model_init_kwargs is not None:
            raise ValueError(
                "You passed teacher_model_init_kwargs to SpecKDConfig, but your teacher_model is already instantiated."
            )

        # The teacher is already loaded with our kwargs; GKD would try to apply them to an instance and raise.
        init_kwargs, args.teacher_model_init_kwargs = args.teacher_model_init_kwargs, None
        # GKD refuses different `config.vocab_size`s outright; `check_vocab` below accepts padded embeddings that
        # both cover the tokenizer (Qwen), so GKD's check sees the student's size until it is done.
        teacher_config = teacher_model.config.get_text_config()
        teacher_vocab_size = teacher_config.vocab_size
        teacher_config.vocab_size = _config_vocab_size(model, args) or teacher_vocab_size
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
            teacher_config.vocab_size = teacher_vocab_size
        # Logits compared on the tokenizer's ids only when the two output sizes differ (padded embeddings), else None.
        self._shared_vocab = check_vocab(self.model, self.teacher_model, self.processing_class, teacher_tokenizer)
        if self._shared_vocab is not None:  # never sample an id past the tokenizer (padding rows of the embedding)
            n_out = max(output_vocab_size(self.model), output_vocab_size(self.teacher_model))
            self.generation_config.suppress_tokens = list(range(self._shared_vocab, n_out))

        # Same draw on every process: all of them generate (or not) together.
        self._kind_rng = random.Random(args.seed)
        self._gate_generator = torch.Generator(device=self.accelerator.device)
        self._gate_generator.manual_seed(args.seed + self.accelerator.process_index)
        # Evaluation draws its gate uniforms from a stream of its own, re-seeded by every `evaluate`: it never moves
        # the training draws, and the same model evaluates to the same loss every time.
        self._eval_gate_generator = torch.Generator(device=self.accelerator.device)
        self._gate_window = self._new_gate_window()
        # Per-row seeds of speculative generation (`generation.row_seeds`); a stream of its own, so turning
        # `on_policy_generation` on leaves the gate's draws unchanged.
        self._generation_generator = torch.Generator()
        self._generation_generator.manual_seed(args.seed + 1_000_003 * (self.accelerator.process_index + 1))
        self._resume_checkpoint, self._rng_restored = None, False

    # ------------------------------------------------------------------ batches

    def _draw_kind(self) -> str:
        """On-policy with probability `lmbda`, else `seq_kd` if enabled, else the dataset batch (as GKD)."""
        if self._kind_rng.random() < self.lmbda:
            return ON_POLICY
        return SEQ_KD if self.seq_kd else OFF_POLICY

    def _draw_on_policy_rows(self, batch_size: int) -> torch.Tensor:
        """`mixing="sample"`: which rows of a micro-batch are generated on-policy, bool `[B]`.

        `config.on_policy_rows(lmbda, B)` rows, drawn without replacement. The shared generator advances by exactly
        one draw per micro-batch whatever `B` is, so processes stay in step even when their last batches differ.
        """
        row_rng = random.Random(self._kind_rng.getrandbits(64))
        rows = row_rng.sample(range(batch_size), on_policy_rows(self.lmbda, batch_size))
        on_policy = torch.zeros(batch_size, dtype=torch.bool)
        on_policy[rows] = True
        return on_policy

    def _make_completions(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Draw the micro-batch's kind and, for on-policy / `seq_kd`, replace its completions by generated ones.

        With `mixing="sample"` the draw is per row: the on-policy rows and the others are generated separately and
        put back in their places, right-padded to a common length (the batch is then of kind `MIXED`, with the rows'
        kinds under `ROW_ON_POLICY_KEY`).
        """
        if self.args.mixing == "batch":
            kind = self._draw_kind()
            return {**self._generate(kind, inputs), KIND_KEY: kind}
        batch_size = inputs["input_ids"].size(0)
        on_policy = self._draw_on_policy_rows(batch_size)
        other = SEQ_KD if self.seq_kd else OFF_POLICY
        if on_policy.all() or not on_policy.any():
            kind = ON_POLICY if on_policy.all() else other
            return {**self._generate(kind, inputs), KIND_KEY: kind}
        parts = [
            self._generate(ON_POLICY, _select_rows(inputs, on_policy)),
            self._generate(other, _select_rows(inputs, ~on_policy)),
        ]
        pad_token_id = self.processing_class.pad_token_id if self.processing_class.pad_token_id is not None else 0
        merged = _merge_rows(inputs, parts, [on_policy, ~on_policy], pad_token_id)
        return {**merged, KIND_KEY: MIXED, ROW_ON_POLICY_KEY: on_policy.to(inputs["input_ids"].device)}

    def _generate(self, kind: str, inputs: dict[str, Any]) -> dict[str, Any]:
        """`inputs` with its completions generated by the student (on-policy) or the teacher (`seq_kd`)."""
        if kind == OFF_POLICY:
            return inputs
        generator_model = self.model_wrapped if kind == ON_POLICY else self.teacher_model
        with unwrap_model_for_generation(
            generator_model,
            self.accelerator,
            generation_kwargs=self.generation_kwargs,
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs if kind == ON_POLICY else None,
        ) as unwrapped_model:
            speculative = kind == ON_POLICY and self.args.on_policy_generation == "speculative"
            if speculative:
                unwrapped_model = _SpeculativeGenerator(self, unwrapped_model)
            input_ids, attention_mask, labels = self.generate_on_policy_outputs(
                unwrapped_model, inputs, self.generation_config
            )
        generated = {**inputs, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if speculative:  # the gate and the reward score the student's drafts, not the teacher's replacements
            generated[PROPOSALS_KEY] = unwrapped_model.proposals.to(input_ids.device)
        return generated

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list[dict[str, Any]], torch.Tensor]:
        """Fetch an accumulation window, generate its completions, and count its completion tokens.

        Returns:
            The micro-batches and `num_items_in_batch`: completion tokens in the window (labels != -100 after the
            causal shift), averaged over processes when `average_tokens_across_devices` (DDP then averages the
            gradients, which makes the sum over all processes' tokens divided by their total).
        """
        batches = list(itertools.islice(epoch_iterator, num_batches))
        if self._resume_checkpoint is not None and not self._rng_restored:
            # The Trainer restores the RNG states after fetching the first window after a resume (the skipping data
            # loader draws from them), which is after our generation: restore them between the two.
            self._load_rng_state(self._resume_checkpoint)
        batch_samples = [self._make_completions(batch) for batch in batches]
        num_items = sum((batch["labels"][:, 1:] != -100).sum() for batch in batch_samples)
        num_items = torch.as_tensor(num_items, device=device)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            num_items = self.accelerator.gather(num_items).sum() / self.accelerator.num_processes
        return batch_samples, num_items

    # ------------------------------------------------------------------ checkpoints

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; remembers the checkpoint so that our RNG states are restored before the first generation."""
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            checkpoint = get_last_checkpoint(self.args.output_dir) if checkpoint else None
        self._resume_checkpoint, self._rng_restored = checkpoint, False
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        """`Trainer.evaluate`; the gate's evaluation draws restart from `args.seed` (per process) on every call."""
        self._eval_gate_generator.manual_seed(self.args.seed + self.accelerator.process_index)
        return super().evaluate(*args, **kwargs)

    def _speckd_rng_state(self) -> dict[str, Any]:
        return {
            "kind": self._kind_rng.getstate(),
            "gate": self._gate_generator.get_state(),
            "generation": self._generation_generator.get_state(),
            "gate_window": dict(self._gate_window),
        }

    def _save_rng_state(self, output_dir: str) -> None:
        """The Trainer's RNG states, plus ours (one file per process): the batch-kind draw (identical on every
        process), the gate's and speculative generation's generators (per process), and the logging window's
        gate counts, so that a resumed run continues the same loss and metrics trajectory."""
        super()._save_rng_state(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        torch.save(
            self._speckd_rng_state(), os.path.join(output_dir, RNG_STATE_FILE.format(self.accelerator.process_index))
        )

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """Restore the Trainer's and our RNG states once per resume (see `get_batch_samples`)."""
        if checkpoint is None or self._rng_restored:
            return
        super()._load_rng_state(checkpoint)
        self._rng_restored = True
        path = os.path.join(checkpoint, RNG_STATE_FILE.format(self.accelerator.process_index))
        if not os.path.isfile(path):  # a checkpoint of another trainer, or of a run with more processes
            return
        state = torch.load(path, weights_only=True)
        kind_state = state["kind"]
        self._kind_rng.setstate((kind_state[0], tuple(kind_state[1]), kind_state[2]))
        self._gate_generator.set_state(state["gate"].cpu())
        self._generation_generator.set_state(state["generation"].cpu())
        self._gate_window = {**self._new_gate_window(), **state["gate_window"]}

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
        # What the student sampled at each position of an on-policy row: the gate's proposal and the reward's action
        sampled_ids = inputs.get(PROPOSALS_KEY, inputs["input_ids"])[:, 1:]
        kind = self._row_kinds(inputs, kind)  # issue 7: mixing="sample" batches carry a kind per row
        gated = completion & self._is_gated(kind)
        generator = self._gate_generator if model.training else self._eval_gate_generator
        uniforms = self._draw_uniforms(kind, gated, generator)

        if self.args.loss_path == "chunked":
            weighted, weights, accepted, student_outputs, sampled_logprobs = self._chunked_terms(
                model, inputs, sampled_ids, completion, gated, kind, uniforms
            )
        else:
            student_outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            self.teacher_model.eval()
            with torch.no_grad():
                teacher_logits = self.teacher_model(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                ).logits[:, :-1]
            student_logits = self._shared_logits(student_outputs.logits[:, :-1])
            teacher_logits = self._shared_logits(teacher_logits)
            # GKD's divergence, split at its log-softmax so that the gate reads the same log-probabilities
            student_log_probs, teacher_log_probs = jsd_log_probs(student_logits), jsd_log_probs(teacher_logits)
            accepted = self._verify_rows(student_log_probs, teacher_log_probs, sampled_ids, gated, kind, uniforms) | (
                completion & ~gated
            )
            weights = self._loss_weights(accepted) * completion
            weighted = weighted_jsd_from_log_probs(student_log_probs, teacher_log_probs, weights, beta=self.beta)
            if not bool(torch.isfinite(weighted).all()):  # [B, T]: cheap; a bad teacher shows here first
                self._check_teacher(teacher_logits)

            def sampled_logprobs() -> torch.Tensor:
                logprobs = student_log_probs  # at the sampling temperature, differentiable
                if self.temperature != 1.0:
                    logprobs = jsd_log_probs(student_logits, self.temperature)
                return logprobs.gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1)

        loss = self.args.kd_coef * normalize_loss(
            weighted,
            weights,
            completion,
            normalize=self.args.gate_normalize,
            num_items_in_batch=num_items_in_batch,
        )
        sampled = gated & self._on_policy_positions(kind, gated)  # issue 7: the on-policy rows of a mixed batch
        if self.args.reward_coef > 0 and sampled.any():
            # the accept bit is the teacher's reward for the sampled token: a REINFORCE step on it
            loss = loss + self.args.reward_coef * policy_gradient_loss(
                sampled_logprobs(),
                accepted,
                sampled,
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
        sampled_ids: torch.Tensor,
        completion: torch.Tensor,
        gated: torch.Tensor,
        kind: str,
        uniforms: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, Callable[[], torch.Tensor]]:
        """The loss terms of the chunked path, on the completion positions only.

        Returns:
            ``sum_t w_t D_t`` (scalar), the weights `[N]` of the `N` completion positions, the accept mask `[B, T]`,
            the student's outputs (logits of the last position only), and a function that gives the student's
            log-probabilities `[B, T]` of `sampled_ids` at the sampling temperature (chunked too; 0 off the
            completion).
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
        self._check_teacher(teacher_hidden)
        rows = completion.flatten().nonzero().squeeze(-1)
        student_hidden = captured["hidden"][:, :-1].flatten(0, 1)[rows]
        teacher_hidden = teacher_hidden[:, :-1].flatten(0, 1)[rows]
        row_sampled, row_gated = sampled_ids.flatten()[rows], gated.flatten()[rows]
        row_uniforms = {name: u.flatten()[rows] for name, u in uniforms.items()}
        row_accepted = torch.ones_like(row_gated)

        def weight_fn(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, chunk: slice) -> torch.Tensor:
            chunk_uniforms = {name: u[chunk] for name, u in row_uniforms.items()}
            verdict = self._verify(
                student_log_probs, teacher_log_probs, row_sampled[chunk], row_gated[chunk], kind, chunk_uniforms
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
                row_sampled,
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
        """The student's and the teacher's output layers, for the chunked loss (cut to the tokenizer's ids when the
        two output sizes differ, as `_shared_logits` cuts the eager path's logits)."""
        heads = (
            output_head(self.accelerator.unwrap_model(self.model), "student"),
            output_head(self.accelerator.unwrap_model(self.teacher_model), "teacher"),
        )
        n = self._shared_vocab
        if n is None:
            return heads
        return tuple(
            dataclasses.replace(h, weight=h.weight[:n], bias=None if h.bias is None else h.bias[:n]) for h in heads
        )

    # ------------------------------------------------------------------ guard rails

    def _shared_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits `[..., V]` cut to the tokenizer's ids when the models' output sizes differ (padded embeddings)."""
        return logits if self._shared_vocab is None else logits[..., : self._shared_vocab]

    def _check_teacher(self, teacher_out: torch.Tensor) -> torch.Tensor:
        """Stop with an error naming the step when the teacher's logits (or hidden states) are not all finite.

        The chunked path checks the teacher's hidden states `[N, H]` every micro-batch; the eager path checks the
        `[B, T]` loss terms and only looks at the `[B, T, V]` logits when those are not finite.
        """
        if not bool(torch.isfinite(teacher_out).all()):
            step = self.state.global_step
            raise RuntimeError(
                f"The teacher produced non-finite outputs (NaN or inf) at training step {step + 1} (global_step="
                f"{step}). Training stopped: a loss against them would be NaN. Check the teacher's weights and dtype "
                "(fp16 overflow: load it in bfloat16 or float32), or its quantization settings."
            )
        return teacher_out

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

    @staticmethod
    def _row_kinds(inputs: dict[str, Any], kind: str) -> str | torch.Tensor:
        """The batch's kind, or for a `MIXED` batch (`mixing="sample"`) its on-policy rows as a bool `[B, 1]`."""
        if kind != MIXED:
            return kind
        return inputs[ROW_ON_POLICY_KEY].bool().unsqueeze(-1)

    def _is_gated(self, kind: str | torch.Tensor) -> bool | torch.Tensor:
        if isinstance(kind, torch.Tensor):  # per row, [B, 1]
            return (kind & self.args.gates_on_policy) | (~kind & self.args.gates_off_policy)
        return self.args.gates_on_policy if kind == ON_POLICY else self.args.gates_off_policy

    @staticmethod
    def _on_policy_positions(kind: str | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Bool like `like` `[B, T]`: True at the positions of on-policy rows."""
        if isinstance(kind, torch.Tensor):
            return kind.to(like.device).expand_as(like)
        return torch.full_like(like, kind == ON_POLICY, dtype=torch.bool)

    def _draw_uniforms(
        self, kind: str | torch.Tensor, gated: torch.Tensor, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The gate's U(0, 1) draws for the micro-batch, `[B, T]` each, from `generator` (the training or the
        evaluation stream), made once so every loss path uses them.

        For a mixed batch the per-position kinds go along as ``"on_policy"`` (bool `[B, T]`), so that both loss
        paths slice them with the draws and `_verify` treats each position by its row's kind.
        """
        uniforms = {}
        if not gated.any() or self.args.gate == "none":
            return uniforms
        on_policy = self._on_policy_positions(kind, gated)
        if self.args.gate_proposal == "sample" and bool((gated & ~on_policy).any()):
            uniforms["proposal"] = self._uniform(gated.shape, generator)
        if self.args.gate == "spec":
            uniforms["accept"] = self._uniform(gated.shape, generator)
        if isinstance(kind, torch.Tensor):
            uniforms["on_policy"] = on_policy
        return uniforms

    def _uniform(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=generator.device).to(self.accelerator.device)

    @torch.no_grad()
    def _verify_rows(
        self,
        student_log_probs: torch.Tensor,
        teacher_log_probs: torch.Tensor,
        sampled_ids: torch.Tensor,
        gated: torch.Tensor,
        kind: str,
        uniforms: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """`_verify` on a `[B, T]` batch (`[B, T, V]` log-probabilities in, `[B, T]` accept bits out).

        When at most half the positions are gated (an on-policy batch is mostly prompt and padding), only the gated
        positions are copied out and verified; otherwise the whole batch goes through the gate's `[.., V]` passes
        (cheaper than copying most of it) and the mask drops the rest. Both give the same verdicts.
        """
        if not gated.any() or self.args.gate == "none":
            return gated.clone()
        if 2 * int(gated.sum()) > gated.numel():
            return self._verify(student_log_probs, teacher_log_probs, sampled_ids, gated, kind, uniforms)
        rows = gated.nonzero(as_tuple=True)
        verdict = self._verify(
            student_log_probs[rows],
            teacher_log_probs[rows],
            sampled_ids[rows],
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
        student_log_probs: torch.Tensor,
        teacher_log_probs: torch.Tensor,
        sampled_ids: torch.Tensor,
        gated: torch.Tensor,
        kind: str,
        uniforms: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The teacher's accept bits on the student's proposals at the gated positions.

        The inputs are the divergence's log-probabilities (temperature 1), so the `spec` rule needs no `[.., V]`
        pass of its own except for on-policy tokens sampled at a temperature other than 1.

        `sampled_ids` are the tokens the student sampled (read at on-policy positions only: the proposals there).

        Shapes: log-probabilities `[..., V]`, the rest `[...]` (a batch `[B, T]` or a chunk of rows `[n]`).
        """
        if not gated.any():
            return torch.zeros_like(gated)
        if self.args.gate == "none":
            return gated.clone()
        student_log_probs = student_log_probs.detach()
        on_policy = uniforms.get("on_policy")
        if on_policy is not None:  # mixed batch (mixing="sample"): each position by its row's kind
            proposals = sampled_ids
            # `_draw_uniforms` drew the "proposal" uniforms iff a dataset / seq_kd position is gated; without them
            # none is, and `propose` would draw from torch's global generator (shifting every later draw of the run)
            if self.args.gate_proposal == "greedy" or "proposal" in uniforms:
                own = propose(student_log_probs, mode=self.args.gate_proposal, uniforms=uniforms.get("proposal"))
                proposals = torch.where(on_policy, sampled_ids, own)
            proposal_log_probs = torch.where(
                on_policy[..., None], self._sampling_log_probs(student_log_probs), student_log_probs
            )
        elif kind == ON_POLICY:
            # The proposal is the sampled token, drawn from the student at the generation temperature
            # (GKD samples with top_k=0, top_p=1), so that is the q of the `spec` rule.
            proposals = sampled_ids
            proposal_log_probs = self._sampling_log_probs(student_log_probs)
        else:
            proposals = propose(student_log_probs, mode=self.args.gate_proposal, uniforms=uniforms.get("proposal"))
            proposal_log_probs = student_log_probs
        return accept_mask(
            proposal_log_probs,
            teacher_log_probs,
            proposals,
            gated,
            gate=self.args.gate,
            top_k=self._gate_top_k(),
            uniforms=uniforms.get("accept"),
            normalized=True,
        )

    def _sampling_log_probs(self, student_log_probs: torch.Tensor) -> torch.Tensor:
        """The student's log-probabilities at the generation temperature, from those at temperature 1 (the `spec`
        rule's ``q`` for sampled tokens; the `topk` rule does not read the student, so it is left as is)."""
        if self.temperature == 1.0 or self.args.gate != "spec":
            return student_log_probs
        return jsd_log_probs(student_log_probs, self.temperature)

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

    def _record_gate(self, kind: str | torch.Tensor, accepted: torch.Tensor, gated: torch.Tensor) -> None:
        window = self._gate_window
        on_policy = self._on_policy_positions(kind, gated)
        for suffix, rows in (("on", gated & on_policy), ("off", gated & ~on_policy)):
            window[f"accepted_{suffix}"] += (accepted & rows).sum().item()
            window[f"gated_{suffix}"] += rows.sum().item()
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


def _config_vocab_size(model: Any, args: SpecKDConfig) -> int | None:
    """The student's `config.vocab_size` (read from its config file when it is given as a name or path)."""
    if isinstance(model, str):
        try:
            config = AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError):
            return None  # SFTTrainer reports the bad path
        return config.get_text_config().vocab_size
    config = getattr(model, "config", None)
    return config.get_text_config().vocab_size if config is not None else None


def _named(dataset: Any, name: str) -> list[tuple[str, Any]]:
    if isinstance(dataset, dict):
        return [(f"{name}[{key!r}]", value) for key, value in dataset.items()]
    return [(name, dataset)]


def _select_rows(inputs: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The micro-batch restricted to `rows` (bool `[B]`): per-row tensors and lists are indexed, the rest kept."""
    batch_size = rows.numel()
    index = rows.nonzero().squeeze(-1)
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == batch_size:
            out[key] = value[index.to(value.device)]
        elif isinstance(value, list) and len(value) == batch_size:
            out[key] = [value[i] for i in index.tolist()]
        else:
            out[key] = value
    return out


def _merge_rows(
    inputs: dict[str, Any], parts: list[dict[str, Any]], rows: list[torch.Tensor], pad_token_id: int
) -> dict[str, Any]:
    """Put the rows of `parts` (generated separately for the bool masks `rows`) back in their places of `inputs`.

    `input_ids`, `attention_mask` and `labels` (and the on-policy rows' drafts under `PROPOSALS_KEY`, which are the
    tokens themselves on rows that have none) are right-padded to the longest part (pad id, 0, -100). A causal model's
    outputs at a row's real positions do not depend on padding after them, so each row's loss is unchanged. The
    prompts and any other key are the original batch's.
    """
    merged = dict(inputs)
    width = max(part["input_ids"].size(1) for part in parts)
    fills = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
    if any(PROPOSALS_KEY in part for part in parts):  # rows without drafts: their tokens are the proposals
        fills[PROPOSALS_KEY] = pad_token_id
    for key, fill in fills.items():
        values = [part.get(key, part["input_ids"]) for part in parts]
        out = values[0].new_full((rows[0].numel(), width), fill)
        for value, mask in zip(values, rows):
            out[mask.nonzero().squeeze(-1).to(out.device), : value.size(1)] = value
        merged[key] = out
    return merged


class _SpeculativeGenerator:
    """Stands in for the student in GKD's `generate_on_policy_outputs`, whose `model.generate` call it answers with
    `speculative_generate`, so that the ids, attention mask and labels keep exactly GKD's format.

    Sampling follows the trainer's generation config: the student's temperature `args.temperature` (GKD samples with
    `top_k=0, top_p=1`), the teacher verifies with `args.gate` / `args.gate_top_k`, `args.gate_draft_len` tokens per
    teacher forward; the statistics go to the trainer's logging window.
    """

    def __init__(self, trainer: SpecKDTrainer, student: nn.Module):
        self.trainer, self.student = trainer, student
        self.proposals: torch.Tensor | None = None  # the last call's `GenerationStats.proposals`

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
            vocab_size=trainer._shared_vocab,
        )
        trainer._record_generation(stats)
        self.proposals = stats.proposals
        return SimpleNamespace(sequences=sequences)
