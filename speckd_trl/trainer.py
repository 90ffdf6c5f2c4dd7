"""`SpecKDTrainer`: `GKDTrainer` whose distillation loss passes every sequence through the speculative gate.

Wiring only. Where to look:

- how a batch is made: `batches.py` (the on-policy / `seq_kd` / dataset draw, per-row mixing, the speculative
  sampler), called from `get_batch_samples`; the generation itself is GKD's `generate_on_policy_outputs`;
- how a position is weighted: `weighting.py` (`TokenGate`, `GatedBatch`: gated positions, proposals, verdicts,
  weights), over the rule of `rules.py`;
- how the loss is reduced: `GatedBatch.reduce` over `losses.py` (weighted generalized JSD, eager or chunked, and its
  normalization), from the `losses.LossTerms` of `_eager_terms` / `_chunked_terms`;
- the gate's set-up, a micro-batch's open / reduce / record steps, `compute_loss`'s signature, the logs, evaluation
  draws and checkpointed random streams: the skeleton of `gated_trainer.py` (`GatedLossMixin`); the output-head
  reader and teacher loading: `models.py`; input checks: `validation.py`; dataset transforms: `data.py`.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.utils import DistributedType
from datasets import Dataset
from torch import nn
from transformers import AutoConfig, PreTrainedModel, TrainerCallback
from trl.experimental.gkd import GKDTrainer
from trl.experimental.utils import empty_cache
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.sft_trainer import SFTTrainer

from .batches import (
    KIND_KEY,
    OFF_POLICY,
    ON_POLICY,
    PROPOSALS_KEY,
    BatchKinds,
    SpeculativeSampler,
    make_completions,
    recorded_kind,
)
from .config import SpecKDConfig
from .data import collator_max_length, prepare_prompt_completion
from .divergence import jsd_log_probs, weighted_jsd_from_log_probs
from .gated_trainer import GatedLossMixin
from .generation import sampling_only_from
from .losses import chunked_weighted_jsd
from .models import (
    EAGER_REMEDY,
    OutputHead,
    capture_last_hidden_state,
    check_output_head,
    is_quantized,
    load_teacher,
    load_teacher_tokenizer,
    output_head,
    output_vocab_size,
    prepare_teacher_for_fsdp,
)
from .packing import PACKED_KEY, check_packable, model_inputs, pack_micro_batch
from .reduction import LossTerms, sampled_log_probs, sampled_log_probs_from_hidden
from .sparse_teacher import SparseTeacher, sparse_teacher_from_hidden
from .teacher_cache import TeacherCache, cache_teacher, report_cache_teacher, run_fields
from .validation import (
    check_4bit_teacher,
    check_dataset,
    check_fsdp_applied,
    check_fsdp_generation,
    check_launch,
    check_loaded_teacher,
    check_pad_token,
    check_quantized_student,
    check_vocab,
    check_zero3_chunked,
    check_zero3_quantized_teacher,
    named_datasets,
    quantization_setting,
)
from .weighting import GatedBatch


class SpecKDTrainer(GatedLossMixin, GKDTrainer):
    """Trainer for Speculative Knowledge Distillation (SpecKD), a drop-in replacement for `GKDTrainer`.

    At every completion position the student proposes a token (the token it sampled, for on-policy sequences; its own
    greedy or sampled prediction under teacher forcing, for dataset and `seq_kd` sequences) and the teacher verifies
    it (`args.gate`). GKD's generalized JSD is kept with weight 1 on accepted positions and `args.reject_weight` on
    rejected ones. The accept bit is the teacher's binary reward for the student's action; its rate is logged as
    `gate/acceptance_rate*` and `reward/mean`, `reward/std` (per-sequence means).

    Args: the same as [`~trl.experimental.gkd.GKDTrainer`]; `args` must be a [`SpecKDConfig`]. `teacher_model` may be a
    model, a name or a local path (quantized as `args.teacher_quantization` says), or `None` to use
    `args.teacher_model_name_or_path`. `processing_class` is required and must have a pad token.
    """

    _tag_names = ["trl", "gkd", "speckd"]
    _name = "SpecKD"
    _config_class = SpecKDConfig
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
        # Bad input fails here, before any model is prepared or any step runs.
        self._check_config(args)
        check_launch(args)
        check_pad_token(processing_class)
        train_dataset, eval_dataset = chat_datasets(train_dataset, eval_dataset, processing_class, args.max_length)
        if not isinstance(model, str):
            check_quantized_student(model, peft_config)
        teacher = _Teacher.resolve(teacher_model, args, evaluates=eval_dataset is not None)
        with teacher.as_gkd_sees_it(model, args) as gkd_teacher, _packing_hidden(args):
            super().__init__(
                model,
                teacher_model=gkd_teacher,
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
        self._prepare_models(teacher)
        self._init_gate_state(args, teacher)
        if args.packing:  # a model that would let packed sequences attend to each other fails here
            # (the forward that probes it, only where a lone process may run one: not under sharded weights)
            probe = self.accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU)
            for role, wrapped in (("student", self.model), ("teacher", self.teacher_model)):
                if wrapped is not None:
                    check_packable(wrapped, role, vocab_size=len(self.processing_class), probe=probe)

    def _prepare_models(self, teacher: _Teacher) -> None:
        """After GKD's `__init__`: the teacher placed (or dropped, with a teacher cache alone), the launch checked, and
        the ids both models' logits are compared on (`_shared_vocab`: the tokenizer's ids when the two output sizes
        differ, padded embeddings; else None)."""
        args = self.args
        # GKD's `prepare_model(teacher, evaluation_mode=True)` leaves the teacher unsharded and unplaced under FSDP
        check_fsdp_applied(self.accelerator)
        # GKD generates without the KV cache whenever gradient checkpointing is on (SFTConfig's default), but generation
        # runs inside `unwrap_model_for_generation`, which turns checkpointing off for it: with the cache a new token
        # costs one position's forward, not the whole sequence's (the same samples; 4x faster on the student of
        # `benchmarks/trl_side_by_side.py`, as TRL's `DistillationTrainer` generates)
        self.generation_config.use_cache = True
        self.generation_kwargs["use_cache"] = True
        if teacher.model is None:
            self.teacher_model = None
        else:
            self.teacher_model = prepare_teacher_for_fsdp(self.teacher_model, self.accelerator)
            check_fsdp_generation(args, self.accelerator)
        # (read through the wrappers: under DeepSpeed the teacher is an engine, whose `config` is DeepSpeed's dict)
        student = self.accelerator.unwrap_model(self.model)
        check_zero3_chunked(student, args.modes.loss_path)
        self._shared_vocab = None
        self._teacher_cache = None
        if self.teacher_model is None:  # a teacher cache alone: it holds the ids the loss compares
            self._teacher_cache = self._open_teacher_cache(None, teacher.name)
            if self._teacher_cache.spec.vocab_size != output_vocab_size(student):  # (a student padded past them)
                self._shared_vocab = self._teacher_cache.spec.vocab_size
            return
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        self._shared_vocab = check_vocab(student, unwrapped_teacher, self.processing_class, teacher.tokenizer)
        if self._shared_vocab is not None:  # never sample an id past the tokenizer (padding rows of the embedding)
            n_out = max(output_vocab_size(student), output_vocab_size(unwrapped_teacher))
            self.generation_config.suppress_tokens = list(range(self._shared_vocab, n_out))

    def _init_gate_state(self, args: SpecKDConfig, teacher: _Teacher) -> None:
        """The gate (`GatedTrainerMixin._init_gate`), the batch-kind draw, speculative generation's generator, the
        loss paths' flags and, with a live teacher, its teacher cache."""
        student = self.accelerator.unwrap_model(self.model)
        self._init_gate(
            args,
            temperature=self.temperature,
            vocab_size=self._shared_vocab or output_vocab_size(student),
            proposal=args.modes.proposal,
        )
        # Same draw on every process: all of them generate (or not) together.
        self._batch_kinds = BatchKinds(args.seed, lmbda=self.lmbda, seq_kd=self.seq_kd)
        # Per-row seeds of speculative generation (`generation.row_seeds`); a stream of its own, so turning
        # `on_policy_generation` on leaves the gate's draws unchanged.
        self._generation_generator = torch.Generator()
        self._generation_generator.manual_seed(args.seed + 1_000_003 * (self.accelerator.process_index + 1))
        self._heads_checked: set[str] = set()  # `check_output_head` runs on each model's first chunked batch
        self._predicting = False  # in a `prediction_step` that returns the logits (see there)
        if self.teacher_model is not None and args.teacher_cache is not None:
            self._teacher_cache = self._open_teacher_cache(self.accelerator.unwrap_model(self.teacher_model))

    def _open_teacher_cache(self, teacher: nn.Module | None, teacher_name: str | None = None) -> TeacherCache:
        """`args.teacher_cache`, checked against this run: tokenizer, chat template, dataset, max_length, the
        divergence's temperature (1), the vocabulary the loss compares, K against the gate's k, and the teacher (its
        config and weights when one is loaded, else `teacher_name`; `args.teacher_cache_check_teacher`)."""
        args = self.args
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        expect = run_fields(
            tokenizer=tokenizer, dataset=self.train_dataset, max_length=args.max_length, teacher=teacher
        )
        expect["temperature"] = 1.0  # SpecKDTrainer's divergence is at temperature 1, as GKD's
        check = args.teacher_cache_check_teacher
        cache = TeacherCache.open(
            args.teacher_cache,
            expect,
            top_k=args.largest_top_k,
            teacher=teacher if check else None,
            teacher_name=teacher_name if check else None,
        )
        report_cache_teacher(cache, teacher, checked=check)
        student = self.accelerator.unwrap_model(self.model)
        n_loss = self._shared_vocab or output_vocab_size(student)
        n_cache = cache.spec.vocab_size
        if teacher is not None and n_cache != n_loss or not (len(tokenizer) <= n_cache <= output_vocab_size(student)):
            raise ValueError(
                f"teacher_cache={args.teacher_cache!r} holds log-probabilities over {n_cache} tokens; this run compares "
                f"{n_loss} (student output {output_vocab_size(student)}, tokenizer {len(tokenizer)}). Build the cache "
                "again for this student and teacher."
            )
        return cache

    # ------------------------------------------------------------------ batches

    def _make_completions(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The micro-batch with its kind drawn and its completions generated (`batches.make_completions`)."""
        pad_token_id = self.processing_class.pad_token_id if self.processing_class.pad_token_id is not None else 0
        made = make_completions(
            inputs, self._batch_kinds, self._generate, mixing=self.args.modes.mixing, pad_token_id=pad_token_id
        )
        if self.args.packing and made[KIND_KEY] == OFF_POLICY:  # dataset rows: packed (`packing.py`)
            max_length = collator_max_length(self.args.max_length, self.processing_class)
            made = pack_micro_batch(made, max_length, pad_token_id)
        return made

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
            speculative = kind == ON_POLICY and self.args.modes.on_policy_generation.speculative
            sampler = unwrapped_model
            if speculative:
                sampler = SpeculativeSampler(
                    unwrapped_model,
                    self.teacher_model,
                    gate=self._generation_gate,
                    top_k=self._gate.top_k(self.state.global_step, self.state.max_steps),
                    draft_len=self.args.gate_draft_len,
                    generator=self._generation_generator,
                    vocab_size=self._shared_vocab,
                    on_stats=self._gate.record_generation,
                )
            # exactly the trainer's sampling settings, none inherited from the model's own generation config
            with sampling_only_from(unwrapped_model, self.generation_config):
                input_ids, attention_mask, labels = self.generate_on_policy_outputs(
                    sampler, inputs, self.generation_config
                )
        generated = {**inputs, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if speculative:  # the gate and the reward score the student's drafts, not the teacher's replacements
            generated[PROPOSALS_KEY] = sampler.proposals.to(input_ids.device)
        return generated

    @property
    def _generation_gate(self) -> str:
        """The rule that verifies the student's drafts in speculative generation: the loss's `gate` (the lab's
        `LabSpecKDTrainer` overrides it to measure SKD's rollout editing under an ungated loss)."""
        return self.args.gate

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
        # The Trainer restores the RNG states after fetching the first window after a resume (the skipping data loader
        # draws from them), which is after our generation: restore them between the two (once per resume).
        self._load_rng_state(self._resume_checkpoint)
        batch_samples = [self._make_completions(batch) for batch in batches]
        num_items = sum((batch["labels"][:, 1:] != -100).sum() for batch in batch_samples)
        num_items = torch.as_tensor(num_items, device=device)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            num_items = self.accelerator.gather(num_items).sum() / self.accelerator.num_processes
        return batch_samples, num_items

    # ------------------------------------------------------------------ checkpoints

    def _rng_streams(self) -> dict[str, Any]:
        """The gate's streams and window, plus the batch-kind draw (identical on every process) and speculative
        generation's generator (per process)."""
        return {
            **super()._rng_streams(),
            **self._batch_kinds.state_dict(),
            "generation": self._generation_generator.get_state(),
        }

    def _load_rng_streams(self, state: dict[str, Any]) -> None:
        super()._load_rng_streams(state)
        self._batch_kinds.load_state_dict(state)
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

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """`Trainer.evaluate`; refused on a trainer without a teacher (`_check_can_evaluate`)."""
        self._check_can_evaluate("evaluate")
        return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.predict`; refused on a trainer without a teacher (`_check_can_evaluate`)."""
        self._check_can_evaluate("predict")
        return super().predict(*args, **kwargs)

    def _check_can_evaluate(self, method: str) -> None:
        """Evaluation needs the live teacher: its loss compares the student with the teacher on the evaluation rows,
        and a teacher cache holds the training rows only (by choice: rows of the same keys would serve, but a
        held-out set never is among them). A trainer reading only the cache (lmbda=0, no teacher) refuses it."""
        if self.teacher_model is None:
            raise ValueError(
                f"SpecKDTrainer.{method}() needs the teacher, and this trainer has none: it reads teacher_cache="
                f"{self.args.teacher_cache!r} (lmbda=0), which holds the training rows only. Pass `teacher_model=` "
                "(dataset batches still read the cache), or evaluate the saved student without SpecKD's loss."
            )

    # ------------------------------------------------------------------ loss

    def _gated_loss(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> tuple[torch.Tensor, Any]:
        """Gated generalized JSD of one micro-batch, normalized for its accumulation window (`compute_loss`).

        `args.loss_path="eager"` computes it from both models' full logits, `"chunked"` from their final hidden
        states, `args.loss_chunk_size` completion tokens at a time (`losses.chunked_weighted_jsd`); both give the
        same loss, gradients and gate decisions (the gate's random draws are made once per micro-batch).
        """
        # Causal shift: the model's output at position i predicts the token at i + 1.
        completion = inputs["labels"][:, 1:] != -100
        # What the student sampled at each position of an on-policy row: the gate's proposal and the reward's action
        sampled_ids = inputs.get(PROPOSALS_KEY, inputs["input_ids"])[:, 1:]
        kind = recorded_kind(inputs, seq_kd=self.seq_kd)
        batch = self._open_batch(kind, completion, sampled_ids, training=model.training)
        batch.packed = inputs.get(PACKED_KEY)  # per-sequence statistics of packed rows
        cached = self._cached_teacher(model, inputs, batch)
        loss_terms = self._chunked_terms if self.args.modes.loss_path.from_hidden_states else self._eager_terms
        terms = loss_terms(model, inputs, batch, cached)
        loss = self._close_batch(batch, terms, num_items_in_batch)
        empty_cache()
        return loss, terms.outputs

    def _cached_teacher(self, model: nn.Module, inputs: dict[str, Any], batch: GatedBatch) -> SparseTeacher | None:
        """The teacher cache's rows for a training micro-batch of dataset rows, `[B, T, K]`; None where the live
        teacher is used (no cache; on-policy or `seq_kd` rows; evaluation). With a cache the loss paths cut the live
        teacher to the same top-K + tail (`TeacherCache.live`): one loss scale on every batch."""
        if self._teacher_cache is None or not model.training or not batch.kind.all_dataset:
            return None
        if PACKED_KEY in inputs:  # each sequence found by its own tokens, then moved to its packed places
            return inputs[PACKED_KEY].sparse_teacher(self._teacher_cache, batch.completion)
        return self._teacher_cache.batch(inputs["input_ids"], inputs["attention_mask"], batch.completion)

    def _eager_terms(
        self, model: nn.Module, inputs: dict[str, Any], batch: GatedBatch, cached: SparseTeacher | None = None
    ) -> LossTerms:
        """The loss terms from both models' full `[B, T, V]` logits, as GKD computes them (from a teacher cache's
        top-K + tail, `cached`, instead of the teacher's logits when given; with a cache, the live teacher's are cut
        to the same top-K + tail)."""
        student_outputs = model(**model_inputs(inputs))
        target = None
        if cached is None:
            self.teacher_model.eval()
            with torch.no_grad():
                teacher_logits = self.teacher_model(**model_inputs(inputs)).logits[:, :-1]
            teacher_logits = self._shared_logits(teacher_logits)
        student_logits = self._shared_logits(student_outputs.logits[:, :-1])
        # GKD's divergence, split at its log-softmax so that the gate reads the same log-probabilities
        student_log_probs = jsd_log_probs(student_logits)
        if cached is None:
            teacher_log_probs = jsd_log_probs(teacher_logits)
            if self._teacher_cache is not None:  # one loss scale: the live teacher cut as the cache is (`live`)
                cached = self._teacher_cache.live(teacher_log_probs)
        else:
            teacher_logits = None
        if cached is not None:  # the top-K as the gate reads it, and the tail-bucket target of the divergence
            teacher_log_probs = cached.log_probs()
            target = cached.target(teacher_log_probs, student_log_probs)
        accepted = batch.verdicts(student_log_probs, teacher_log_probs)
        weighted = weighted_jsd_from_log_probs(
            student_log_probs,
            batch.targets(teacher_log_probs, accepted, target),
            batch.weights(accepted),
            beta=self.beta,
        )
        if not bool(torch.isfinite(weighted).all()):  # [B, T]: cheap; a bad teacher shows here first
            self._check_teacher(teacher_log_probs if teacher_logits is None else teacher_logits)

        def sampled() -> torch.Tensor:  # differentiable
            return sampled_log_probs(student_log_probs, student_logits, batch.sampled_ids, self.temperature)

        return LossTerms(weighted.sum(), accepted, sampled, student_outputs)

    def _chunked_terms(
        self, model: nn.Module, inputs: dict[str, Any], batch: GatedBatch, cached: SparseTeacher | None = None
    ) -> LossTerms:
        """The loss terms from both models' final hidden states, on the completion positions only, a chunk at a time
        (the student's outputs hold the logits of the last position only, of every position in a `prediction_step`
        that returns them); against a teacher cache's top-K + tail (`cached`) instead of the teacher when given, and
        with a cache against the live teacher cut to the same top-K + tail."""
        # logits_to_keep=1: each model projects one position; the loss projects the rest chunk by chunk. Both are
        # called through their wrappers (DDP, FSDP2), which gather what they shard. Predictions for `compute_metrics`
        # or `predict` need the student's logits at every position, as GKD returns them (logits_to_keep=0: all).
        with capture_last_hidden_state(self.accelerator.unwrap_model(model)) as captured:
            student_outputs = model(**model_inputs(inputs), logits_to_keep=0 if self._predicting else 1)
        checks = [("student", model, captured["hidden"], student_outputs)]
        if cached is None:
            self.teacher_model.eval()
            with torch.no_grad(), capture_last_hidden_state(self.accelerator.unwrap_model(self.teacher_model)) as t:
                teacher_outputs = self.teacher_model(**model_inputs(inputs), logits_to_keep=1)
            teacher_hidden = self._check_teacher(t["hidden"])
            checks.append(("teacher", self.teacher_model, teacher_hidden, teacher_outputs))
        # after the forwards: under FSDP2 the output layers are gathered then (`models.output_head`)
        student_head, teacher_head = self._output_heads() if cached is None else (self._student_head(), None)
        heads = {"student": student_head, "teacher": teacher_head}
        for role, wrapped, hidden, outputs in checks:  # once per model: its head against the logits it returned
            if role not in self._heads_checked:
                check_output_head(
                    self.accelerator.unwrap_model(wrapped),
                    role,
                    heads[role],
                    hidden[:, -1],
                    self._shared_logits(outputs.logits[:, -1]),
                    remedy=EAGER_REMEDY,
                )
                self._heads_checked.add(role)
        rows, chunk_size = batch.rows, self.args.loss_chunk_size
        student_hidden = captured["hidden"][:, :-1].flatten(0, 1)[rows]
        if cached is None:
            teacher_rows = teacher_hidden[:, :-1].flatten(0, 1)[rows]
            if self._teacher_cache is not None:  # one loss scale: the live teacher cut as the cache is (`live`)
                teacher_rows = sparse_teacher_from_hidden(
                    teacher_rows, teacher_head, self._teacher_cache.live, chunk_size=chunk_size
                )
        else:
            teacher_rows = cached.at(rows)
        weighted_sum, row_verdicts = chunked_weighted_jsd(  # the gate (`batch`) reads each chunk's log-probabilities
            student_hidden, student_head, teacher_rows, teacher_head, batch, beta=self.beta, chunk_size=chunk_size
        )

        def sampled() -> torch.Tensor:  # differentiable
            ids = batch.sampled_ids.flatten()[rows]
            return batch.scatter(sampled_log_probs_from_hidden(student_hidden, student_head, ids, self.temperature))

        return LossTerms(weighted_sum, batch.positions(row_verdicts), sampled, student_outputs)

    # ------------------------------------------------------------------ teacher cache

    def cache_teacher(
        self,
        path: str,
        *,
        top_k: int | None = None,
        values_dtype: str | None = None,
        shard_rows: int = 1024,
        batch_size: int | None = None,
    ) -> TeacherCache:
        """Run the teacher over the training dataset, collated as training collates it, and write its top-K
        log-probabilities at every completion position to `path` (resumable); the cache, opened and checked for this
        trainer. The arguments and defaults: `teacher_cache.cache_teacher`, which this calls."""
        return cache_teacher(
            self, path, top_k=top_k, values_dtype=values_dtype, shard_rows=shard_rows, batch_size=batch_size
        )

    def _output_heads(self) -> tuple[OutputHead, OutputHead]:
        """The student's and the teacher's output layers, for the chunked loss (cut to the tokenizer's ids when the
        two output sizes differ, as `_shared_logits` cuts the eager path's logits)."""
        return self._student_head(), self._shared_head(self._teacher_head())

    def _student_head(self) -> OutputHead:
        """The student's output layer, cut as `_output_heads` cuts it."""
        return self._shared_head(output_head(self.accelerator.unwrap_model(self.model), "student"))

    def _shared_head(self, head: OutputHead) -> OutputHead:
        n = self._shared_vocab
        if n is None:
            return head
        return dataclasses.replace(head, weight=head.weight[:n], bias=None if head.bias is None else head.bias[:n])

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


@contextmanager
def _packing_hidden(args: SpecKDConfig) -> Iterator[None]:
    """`args.packing` off during GKD's `__init__`: `SFTTrainer` would take it for its own padding-free collator and
    refuse GKD's. SpecKD packs dataset micro-batches itself (`packing.py`)."""
    packing, args.packing = args.packing, False
    try:
        yield
    finally:
        args.packing = packing


def chat_datasets(train_dataset: Any, eval_dataset: Any, processing_class: Any, max_length: int | None) -> tuple:
    """The datasets checked (`validation.check_dataset`) and turned into the rows GKD's collator reads
    (`data.prepare_prompt_completion`); `eval_dataset` may be a dict of datasets."""
    for name, dataset in [("train_dataset", train_dataset)] + named_datasets(eval_dataset, "eval_dataset"):
        check_dataset(dataset, processing_class, max_length, name=name)
    if isinstance(eval_dataset, dict):
        eval_dataset = {k: prepare_prompt_completion(v, processing_class, max_length) for k, v in eval_dataset.items()}
    else:
        eval_dataset = prepare_prompt_completion(eval_dataset, processing_class, max_length)
    return prepare_prompt_completion(train_dataset, processing_class, max_length), eval_dataset


@dataclasses.dataclass(frozen=True)
class _Teacher:
    """The run's teacher before GKD's `__init__`: the loaded model (None with a teacher cache alone), its own
    tokenizer (for the id-by-id comparison, read from where it is or was loaded from) and the name it was given by
    (which a teacher cache must have been made by)."""

    model: nn.Module | None
    tokenizer: Any = None
    name: str | None = None

    @classmethod
    def resolve(cls, teacher_model: Any, args: SpecKDConfig, *, evaluates: bool) -> _Teacher:
        """`teacher_model` (or `args.teacher_model_name_or_path`) checked and loaded, as `args` says. With a teacher
        cache, dataset batches never run the teacher: with lmbda=0 and nothing to evaluate, none is loaded (a name or
        path is not even opened); a model passed in is kept for nothing but its checks."""
        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        named = teacher_model if isinstance(teacher_model, str) else None
        cache_only = args.teacher_cache is not None and args.lmbda == 0 and not evaluates
        if cache_only and (teacher_model is None or named is not None):
            return cls(None, name=named)
        if teacher_model is None:
            if args.teacher_cache is not None:
                why = f"lmbda={args.lmbda} makes on-policy batches" if args.lmbda > 0 else "evaluation runs"
                raise ValueError(
                    f"SpecKDTrainer: teacher_cache={args.teacher_cache!r} serves dataset batches only, and {why} that "
                    "need a live teacher: pass `teacher_model=` (or `teacher_model_name_or_path`), or train with "
                    "lmbda=0 and no eval_dataset to use the cache alone."
                )
            raise ValueError(
                "SpecKDTrainer needs a teacher: pass `teacher_model=` (a model, a name or a local path) or set "
                "`teacher_model_name_or_path` in SpecKDConfig (or a `teacher_cache` with lmbda=0)."
            )
        check_zero3_quantized_teacher(
            args.teacher_quantization_method != "none" if named is not None else is_quantized(teacher_model)
        )
        tokenizer = load_teacher_tokenizer(teacher_model, args)
        if named is None:
            check_loaded_teacher(teacher_model, args)
            return cls(teacher_model, tokenizer)
        if args.teacher_quantization_method in ("int8", "nf4", "fp4"):
            check_4bit_teacher(args.device, quantization_setting(args))
        return cls(load_teacher(teacher_model, args), tokenizer, named)

    @contextmanager
    def as_gkd_sees_it(self, student: Any, args: SpecKDConfig) -> Iterator[nn.Module]:
        """The teacher to hand GKD's `__init__`, with what GKD would refuse hidden until it returns: the teacher is
        already loaded with `args.teacher_model_init_kwargs` (GKD would apply them to an instance and raise), and GKD
        refuses different `config.vocab_size`s outright where `check_vocab` accepts padded embeddings that both
        cover the tokenizer (Qwen), so it sees the student's size. With no teacher, a stand-in that has the student's
        config and no weights (`_NoTeacher`, never called)."""
        if self.model is None:
            config = (
                AutoConfig.from_pretrained(student, trust_remote_code=args.trust_remote_code)
                if isinstance(student, str)
                else student.config
            )
            yield _NoTeacher(config)
            return
        init_kwargs, args.teacher_model_init_kwargs = args.teacher_model_init_kwargs, None
        config = self.model.config.get_text_config()
        vocab_size = config.vocab_size
        config.vocab_size = _config_vocab_size(student, args) or vocab_size
        try:
            yield self.model
        finally:
            args.teacher_model_init_kwargs = init_kwargs
            config.vocab_size = vocab_size


class _NoTeacher(nn.Module):
    """Stands in for the teacher in GKD's `__init__` when a teacher cache replaces it: the student's config, no
    weights; never called."""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("No teacher is loaded: this run reads the teacher cache (teacher_cache, lmbda=0).")


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
