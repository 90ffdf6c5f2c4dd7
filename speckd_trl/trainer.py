"""`SpecKDTrainer`: `GKDTrainer` whose distillation loss passes every sequence through the speculative gate.

Wiring only. Where to look:

- how a batch is made: `get_batch_samples` / `_make_completions` here (the on-policy / `seq_kd` / dataset draw and
  the generation);
- how a position is weighted: `gating.py` (`TokenGate`, `GatedBatch`: gated positions, proposals, verdicts, weights,
  the reward term's inputs, the `gate/*` statistics, logged by `GatedTrainerMixin.log`), over the pure maths of
  `gate.py`;
- how the loss is reduced: `GatedBatch.reduce` over `losses.py` (weighted generalized JSD, eager or chunked, and its
  normalization).

Teacher loading and compatibility checks are in `models.py`.

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
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.sft_trainer import SFTTrainer

from .config import SpecKDConfig, on_policy_rows
from .gating import (
    MIXED,
    OFF_POLICY,
    ON_POLICY,
    SEQ_KD,
    GatedBatch,
    GatedTrainerMixin,
    Kind,
    TokenGate,
    sampled_log_probs,
    sampled_log_probs_from_hidden,
)
from .generation import sampling_only_from, speculative_generate
from .losses import OutputHead, chunked_weighted_jsd, jsd_log_probs, weighted_jsd_from_log_probs
from .models import (
    capture_last_hidden_state,
    check_output_head,
    check_pad_token,
    check_vocab,
    load_teacher,
    load_teacher_tokenizer,
    output_head,
    output_vocab_size,
    prepare_teacher_for_fsdp,
)
from .validation import (
    check_4bit_teacher,
    check_dataset,
    check_fsdp_applied,
    check_fsdp_generation,
    check_gate_top_k,
    check_launch,
    check_loaded_teacher,
    check_quantized_student,
    check_zero3_chunked,
    check_zero3_quantized_teacher,
    is_quantized,
    named_datasets,
    prepare_prompt_completion,
)


KIND_KEY = "speckd_kind"  # batch key that records how the micro-batch's completions were made
ROW_ON_POLICY_KEY = "speckd_on_policy"  # with KIND_KEY == MIXED: bool [B], True on the rows generated on-policy
# With on_policy_generation="speculative": long [B, L] like input_ids, the student's own draft at each completion
# position of an on-policy row (it differs from input_ids where the teacher replaced a rejected draft). Without it
# the on-policy tokens themselves are the student's samples.
PROPOSALS_KEY = "speckd_proposals"
EAGER_REMEDY = "use loss_path='eager'"  # what a model whose head the chunked path cannot read should do
RNG_STATE_FILE = "speckd_rng_state_{}.pth"  # per process: the batch-kind draw, the gate's and generation's generators


class SpecKDTrainer(GatedTrainerMixin, GKDTrainer):
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
        for name, dataset in [("train_dataset", train_dataset)] + named_datasets(eval_dataset, "eval_dataset"):
            check_dataset(dataset, processing_class, args.max_length, name=name)
        train_dataset = prepare_prompt_completion(train_dataset, processing_class, args.max_length)
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                k: prepare_prompt_completion(v, processing_class, args.max_length) for k, v in eval_dataset.items()
            }
        else:
            eval_dataset = prepare_prompt_completion(eval_dataset, processing_class, args.max_length)
        if not isinstance(model, str):
            check_quantized_student(model, peft_config)

        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError(
                "SpecKDTrainer needs a teacher: pass `teacher_model=` (a model, a name or a local path) or set "
                "`teacher_model_name_or_path` in SpecKDConfig."
            )
        check_zero3_quantized_teacher(
            args.teacher_load_in_4bit if isinstance(teacher_model, str) else is_quantized(teacher_model)
        )
        # the teacher's own tokenizer, read from where it is (or was) loaded from, for the id-by-id comparison
        teacher_tokenizer = load_teacher_tokenizer(teacher_model, args)
        if isinstance(teacher_model, str):
            if args.teacher_load_in_4bit:
                check_4bit_teacher(args.device)
            teacher_model = load_teacher(teacher_model, args)
        else:
            check_loaded_teacher(teacher_model, args)

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
        # GKD's `prepare_model(teacher, evaluation_mode=True)` leaves the teacher unsharded and unplaced under FSDP
        check_fsdp_applied(self.accelerator)
        self.teacher_model = prepare_teacher_for_fsdp(self.teacher_model, self.accelerator)
        check_fsdp_generation(args, self.accelerator)
        # Logits compared on the tokenizer's ids only when the two output sizes differ (padded embeddings), else None.
        # (read through the wrappers: under DeepSpeed the teacher is an engine, whose `config` is DeepSpeed's dict)
        student, teacher = (self.accelerator.unwrap_model(m) for m in (self.model, self.teacher_model))
        check_zero3_chunked(student, args.loss_path)
        self._shared_vocab = check_vocab(student, teacher, self.processing_class, teacher_tokenizer)
        check_gate_top_k(args, self._shared_vocab or output_vocab_size(student))
        if self._shared_vocab is not None:  # never sample an id past the tokenizer (padding rows of the embedding)
            n_out = max(output_vocab_size(student), output_vocab_size(teacher))
            self.generation_config.suppress_tokens = list(range(self._shared_vocab, n_out))

        # Same draw on every process: all of them generate (or not) together.
        self._kind_rng = random.Random(args.seed)
        # The per-token gate: its draws (one training stream per process, one evaluation stream), its settings at a
        # step and its logging window.
        self._gate = TokenGate(
            args,
            temperature=self.temperature,
            device=self.accelerator.device,
            seed=args.seed,
            process_index=self.accelerator.process_index,
            proposal=args.gate_proposal,
        )
        # Per-row seeds of speculative generation (`generation.row_seeds`); a stream of its own, so turning
        # `on_policy_generation` on leaves the gate's draws unchanged.
        self._generation_generator = torch.Generator()
        self._generation_generator.manual_seed(args.seed + 1_000_003 * (self.accelerator.process_index + 1))
        self._resume_checkpoint, self._rng_restored = None, False
        self._heads_checked = False  # `check_output_head` runs on the first batch of the chunked path
        self._predicting = False  # in a `prediction_step` that returns the logits (see there)

    @property
    def _gate_generator(self) -> torch.Generator:
        """The gate's training stream of random draws (this process's)."""
        return self._gate.generator

    @property
    def _gate_window(self) -> dict[str, float]:
        """The gate's counts in the current logging window."""
        return self._gate.window

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
            sampler = _SpeculativeGenerator(self, unwrapped_model) if speculative else unwrapped_model
            # exactly the trainer's sampling settings, none inherited from the model's own generation config
            with sampling_only_from(unwrapped_model, self.generation_config):
                input_ids, attention_mask, labels = self.generate_on_policy_outputs(
                    sampler, inputs, self.generation_config
                )
        generated = {**inputs, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if speculative:  # the gate and the reward score the student's drafts, not the teacher's replacements
            generated[PROPOSALS_KEY] = sampler.proposals.to(input_ids.device)
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

    def _speckd_rng_state(self) -> dict[str, Any]:
        return {
            "kind": self._kind_rng.getstate(),
            **self._gate.state_dict(),  # "gate": its training generator, "gate_window": its logging window
            "generation": self._generation_generator.get_state(),
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
        self._gate.load_state_dict(state)
        self._generation_generator.set_state(state["generation"].cpu())

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """A plain SFT training step: completions were already generated in `get_batch_samples`."""
        if KIND_KEY not in inputs:  # called outside the Trainer loop: generate here, normalize locally
            inputs, num_items_in_batch = self._make_completions(inputs), None
        return SFTTrainer.training_step(self, model, inputs, num_items_in_batch)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """`Trainer.prediction_step`; when predictions are returned (`predict`, or `evaluate` with `compute_metrics`),
        the chunked path returns the student's logits `[B, T, V]` at every position, as GKD and the eager path do."""
        self._predicting = not prediction_loss_only
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            self._predicting = False

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
        # Causal shift: the model's output at position i predicts the token at i + 1.
        completion = inputs["labels"][:, 1:] != -100
        # What the student sampled at each position of an on-policy row: the gate's proposal and the reward's action
        sampled_ids = inputs.get(PROPOSALS_KEY, inputs["input_ids"])[:, 1:]
        kind = self._row_kinds(inputs, inputs.get(KIND_KEY, OFF_POLICY))  # issue 7: mixed batches, a kind per row
        gate = self._gate.batch(
            kind, completion, training=model.training, step=self.state.global_step, max_steps=self.state.max_steps
        )
        if self.args.loss_path == "chunked":
            weighted, weights, accepted, student_outputs, logprobs = self._chunked_terms(
                model, inputs, sampled_ids, gate
            )
        else:
            weighted, weights, accepted, student_outputs, logprobs = self._eager_terms(
                model, inputs, sampled_ids, gate
            )
        loss = gate.reduce(weighted, weights, accepted, logprobs, num_items_in_batch)
        gate.record(accepted)
        empty_cache()
        return (loss, student_outputs) if return_outputs else loss

    def _eager_terms(
        self, model: nn.Module, inputs: dict[str, Any], sampled_ids: torch.Tensor, gate: GatedBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, Callable[[], torch.Tensor]]:
        """The loss terms from both models' full logits.

        Returns:
            ``w_t D_t`` `[B, T]`, the weights `[B, T]`, the accept mask `[B, T]`, the student's outputs, and a function
            that gives the student's log-probabilities `[B, T]` of `sampled_ids` at the sampling temperature.
        """
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
        accepted = gate.accept(student_log_probs, teacher_log_probs, sampled_ids)
        weights = gate.weights(accepted)
        weighted = weighted_jsd_from_log_probs(student_log_probs, teacher_log_probs, weights, beta=self.beta)
        if not bool(torch.isfinite(weighted).all()):  # [B, T]: cheap; a bad teacher shows here first
            self._check_teacher(teacher_logits)

        def logprobs() -> torch.Tensor:  # differentiable
            return sampled_log_probs(student_log_probs, student_logits, sampled_ids, self.temperature)

        return weighted, weights, accepted, student_outputs, logprobs

    def _chunked_terms(
        self, model: nn.Module, inputs: dict[str, Any], sampled_ids: torch.Tensor, gate: GatedBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, Callable[[], torch.Tensor]]:
        """The loss terms of the chunked path, on the completion positions only.

        Returns:
            ``sum_t w_t D_t`` (scalar), the weights `[N]` of the `N` completion positions, the accept mask `[B, T]`,
            the student's outputs (logits of the last position only, of every position in a `prediction_step` that
            returns them), and a function that gives the student's log-probabilities `[B, T]` of `sampled_ids` at the
            sampling temperature (chunked too; 0 off the completion).
        """
        # logits_to_keep=1: each model projects one position; the loss projects the rest chunk by chunk. Both are
        # called through their wrappers (DDP, FSDP2), which gather what they shard. Predictions for `compute_metrics`
        # or `predict` need the student's logits at every position, as GKD returns them (logits_to_keep=0: all).
        with capture_last_hidden_state(self.accelerator.unwrap_model(model)) as captured:
            student_outputs = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                logits_to_keep=0 if self._predicting else 1,
            )
        self.teacher_model.eval()
        with torch.no_grad(), capture_last_hidden_state(self.accelerator.unwrap_model(self.teacher_model)) as teacher:
            teacher_outputs = self.teacher_model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=1
            )
        teacher_hidden = self._check_teacher(teacher["hidden"])
        # after the forwards: under FSDP2 the output layers are gathered then (`models.output_head`)
        student_head, teacher_head = self._output_heads()
        if not self._heads_checked:  # once: the heads against the logits both forwards returned (last position)
            for role, wrapped, head, hidden, outputs in (
                ("student", model, student_head, captured["hidden"], student_outputs),
                ("teacher", self.teacher_model, teacher_head, teacher_hidden, teacher_outputs),
            ):
                check_output_head(
                    self.accelerator.unwrap_model(wrapped),
                    role,
                    head,
                    hidden[:, -1],
                    self._shared_logits(outputs.logits[:, -1]),
                    remedy=EAGER_REMEDY,
                )
            self._heads_checked = True
        rows = gate.on_rows(sampled_ids)
        student_hidden = captured["hidden"][:, :-1].flatten(0, 1)[rows.rows]
        teacher_hidden = teacher_hidden[:, :-1].flatten(0, 1)[rows.rows]
        weighted, weights = chunked_weighted_jsd(
            student_hidden,
            student_head,
            teacher_hidden,
            teacher_head,
            rows.weight_fn,  # the gate's verdicts on each chunk's log-probabilities, then its weights
            beta=self.beta,
            chunk_size=self.args.loss_chunk_size,
        )

        def logprobs() -> torch.Tensor:  # differentiable
            return rows.scatter(
                sampled_log_probs_from_hidden(student_hidden, student_head, rows.sampled_ids, self.temperature)
            )

        return weighted, weights, rows.positions(), student_outputs, logprobs

    def _output_heads(self) -> tuple[OutputHead, OutputHead]:
        """The student's and the teacher's output layers, for the chunked loss (cut to the tokenizer's ids when the
        two output sizes differ, as `_shared_logits` cuts the eager path's logits)."""
        heads = (
            output_head(self.accelerator.unwrap_model(self.model), "student"),
            self._teacher_head(),
        )
        n = self._shared_vocab
        if n is None:
            return heads
        return tuple(
            dataclasses.replace(h, weight=h.weight[:n], bias=None if h.bias is None else h.bias[:n]) for h in heads
        )

    def _teacher_head(self) -> OutputHead:
        """The teacher's output layer, read without a gradient (gathered whole where it is sharded)."""
        with torch.no_grad():
            return output_head(self.accelerator.unwrap_model(self.teacher_model), "teacher")

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

    def _gate_top_k(self, step: int | None = None) -> int:
        """k of the `topk` gate at optimizer step `step` (default: the current one), per `gate_top_k_schedule`."""
        step = self.state.global_step if step is None else step
        return self._gate.top_k(step, self.state.max_steps)

    @staticmethod
    def _row_kinds(inputs: dict[str, Any], kind: str) -> Kind:
        """The batch's kind, or for a `MIXED` batch (`mixing="sample"`) its on-policy rows as a bool `[B, 1]`."""
        if kind != MIXED:
            return kind
        return inputs[ROW_ON_POLICY_KEY].bool().unsqueeze(-1)

    def _verify_rows(
        self,
        student_log_probs: torch.Tensor,
        teacher_log_probs: torch.Tensor,
        sampled_ids: torch.Tensor,
        gated: torch.Tensor,
        kind: Kind,
        uniforms: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """`TokenGate.verify_rows` at the current step's k (`[B, T, V]` log-probabilities in, `[B, T]` bits out)."""
        return self._gate.verify_rows(
            student_log_probs, teacher_log_probs, sampled_ids, gated, kind, uniforms, top_k=self._gate_top_k()
        )

    def _verify(
        self,
        student_log_probs: torch.Tensor,
        teacher_log_probs: torch.Tensor,
        sampled_ids: torch.Tensor,
        gated: torch.Tensor,
        kind: Kind,
        uniforms: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """`TokenGate.verify` at the current step's k (any leading shape)."""
        return self._gate.verify(
            student_log_probs, teacher_log_probs, sampled_ids, gated, kind, uniforms, top_k=self._gate_top_k()
        )

    def _draw_uniforms(
        self, kind: Kind, gated: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """`TokenGate.draw_uniforms` from `generator` (default: the training stream)."""
        return self._gate.draw_uniforms(kind, gated, self._gate.generator if generator is None else generator)


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
        trainer._gate.record_generation(stats)
        self.proposals = stats.proposals
        return SimpleNamespace(sequences=sequences)
