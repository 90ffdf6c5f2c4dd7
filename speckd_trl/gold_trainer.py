"""`SpecKDGOLDTrainer`: TRL's `GOLDTrainer` (distillation across tokenizers) whose ULD loss passes every aligned span
through the speculative gate.

Wiring only. Where to look:

- how a batch is made: TRL's `GOLDTrainer`, unchanged: chat `messages` rows, dataset or on-policy completions
  (`lmbda`), the teacher's tokenization rebuilt from the texts, byte offsets for the alignment;
- how the two tokenizations are aligned and the loss made: `compat.uld_alignment` / `compat.uld_weighted_sum` (GOLD's
  `ULDLoss`, repeated up to its per-span terms, pinned to TRL's source by a test);
- how a span is verified: `cross_tokenizer.py` (the teacher token of a student proposal, the verdict of each span at
  its first student token), through the same `GatedBatch.verdicts` as every trainer;
- the set-up, logs, evaluation draws and checkpointed random streams: the skeleton of `gated_trainer.py`.

With `gate="none"` the loss is `GOLDTrainer`'s, ULD or hybrid (and, without ULD, GOLD's own `compute_loss`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from trl.experimental.gold import GOLDTrainer
from trl.experimental.utils import empty_cache, is_byte_level_tokenizer

from .batch_kind import OFF_POLICY, BatchKind
from .compat import gold_forward, gold_record_hybrid_parts, uld_alignment, uld_cross_entropy, uld_weighted_sum
from .config import SpecKDGOLDConfig
from .cross_tokenizer import span_completion, span_verdicts, student_to_teacher_ids
from .gated_trainer import GatedLossMixin
from .models import load_teacher_tokenizer, output_vocab_size
from .validation import check_same_tokens


class SpecKDGOLDTrainer(GatedLossMixin, GOLDTrainer):
    """TRL's [`~trl.experimental.gold.GOLDTrainer`] with the speculative gate: SpecKD across tokenizers.

    GOLD aligns the student's and the teacher's tokenizations of each completion by byte offsets into spans and
    compares their merged distributions with ULD (sorted probabilities; with `uld_use_hybrid_loss`, a direct JSD on
    the tokens both vocabularies share). Here every span is verified by the teacher at its first student token (the
    student's sample on on-policy rows, its greedy prediction on dataset rows), reading the teacher's distribution at
    the span's first teacher token for the proposal's counterpart in its vocabulary, or for the first teacher token of
    the proposal's bytes where it has none (`cross_tokenizer`); the span's ULD term is kept with weight 1 if accepted
    and `args.reject_weight` if not. Every student token of the span shares its verdict in the logs
    (`gate/acceptance_rate`, `reward/*`). `gate_normalize="tokens"` keeps GOLD's mean over each sequence's spans,
    `"accepted"` divides by the sum of its weights. With `gate="none"` the loss is `GOLDTrainer`'s.

    Args: the same as [`~trl.experimental.gold.GOLDTrainer`]; `args` must be a [`SpecKDGOLDConfig`]. Text models only
    (no vision-language processor).
    """

    _tag_names = ["trl", "gold", "speckd"]
    _name = "SpecKD-GOLD"

    _config_class = SpecKDGOLDConfig
    _on_policy_batch = False  # whether the micro-batch `_prepare_inputs` returned last was sampled by the student

    def __init__(self, *args: Any, **kwargs: Any):
        """`GOLDTrainer.__init__` with the same arguments, between SpecKD's checks and its gate."""
        call = inspect.signature(GOLDTrainer.__init__).bind(None, *args, **kwargs)
        call.apply_defaults()
        given = dict(call.arguments)
        given.pop("self")
        config = given["args"]
        self._check_config(config)
        if given["teacher_model"] is None:
            given["teacher_model"] = config.teacher_model_name_or_path
        if given["teacher_model"] is None:
            raise ValueError(
                "SpecKDGOLDTrainer needs a teacher: pass `teacher_model=` (a model, a name or a local path) or set "
                "`teacher_model_name_or_path` in SpecKDGOLDConfig."
            )
        processing_class = given["processing_class"]
        if processing_class is not None and not hasattr(processing_class, "get_vocab"):
            raise ValueError(
                "SpecKDGOLDTrainer trains text models only: pass the student's tokenizer as `processing_class` (GOLD's "
                "vision-language path is not gated)."
            )
        if not config.use_uld_loss and processing_class is not None:
            self._check_shared_tokenizer(given["teacher_model"], processing_class, config)
        if config.use_uld_loss and config.use_extended_uld:
            self._check_offsets("student", processing_class)
            self._check_offsets("teacher", self._teacher_tokenizer(given["teacher_model"], config))
        super().__init__(**given)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        self._to_teacher = None
        if self.use_uld_loss and self.teacher_tokenizer is not None:
            if config.gate_rule.rejects:
                self._to_teacher = student_to_teacher_ids(
                    self._tokenizer,
                    self.teacher_tokenizer,
                    output_vocab_size(self.accelerator.unwrap_model(self.model)),
                ).to(self.accelerator.device)
        # the rule reads the teacher's distribution: its k is checked against the teacher's vocabulary
        self._init_gate(config, temperature=config.temperature, vocab_size=output_vocab_size(teacher))

    @staticmethod
    def _check_shared_tokenizer(teacher_model: Any, processing_class: Any, args: SpecKDGOLDConfig) -> None:
        """Without ULD, GOLD compares the two models' distributions id by id: refuse different tokenizers (GOLD would
        resize the teacher's embeddings to the student's vocabulary and train on a mismatch)."""
        teacher_tokenizer = load_teacher_tokenizer(teacher_model, args)
        if teacher_tokenizer is None:
            return
        try:
            check_same_tokens(processing_class, teacher_tokenizer)
        except ValueError as error:
            raise ValueError(
                f"SpecKDGOLDTrainer: use_uld_loss=False compares the models' distributions id by id, but the teacher's "
                f"tokenizer is not the student's ({error}). Set use_uld_loss=True (and use_extended_uld=True) to "
                "distil across tokenizers."
            ) from None

    @staticmethod
    def _teacher_tokenizer(teacher_model: Any, args: SpecKDGOLDConfig) -> Any:
        """The teacher's tokenizer as `GOLDTrainer` will load it (`teacher_tokenizer_name_or_path`, else where the
        teacher is or was loaded from), or `None` where it cannot be read yet (GOLD then raises its own error)."""
        name = args.teacher_tokenizer_name_or_path
        if name is None:
            name = (
                teacher_model if isinstance(teacher_model, str) else getattr(teacher_model.config, "_name_or_path", "")
            )
        return load_teacher_tokenizer(name, args) if name else None

    @staticmethod
    def _check_offsets(role: str, tokenizer: Any) -> None:
        """The byte alignment (`use_extended_uld=True`) reads both tokenizers' offsets, which GOLD computes for fast
        ByteLevel BPE tokenizers only; without this check GOLD stops while it tokenizes the dataset (the student's) or
        at the first batch (the teacher's), with an error that names neither tokenizer."""
        if tokenizer is None:
            return
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not is_byte_level_tokenizer(backend):
            kind = "a slow tokenizer, without offsets" if backend is None else "not a ByteLevel BPE tokenizer"
            raise ValueError(
                f"SpecKDGOLDTrainer: the {role}'s tokenizer ({type(tokenizer).__name__}) is {kind}. The alignment "
                "across tokenizers (use_extended_uld=True) reads byte offsets, which GOLD computes for fast ByteLevel "
                "BPE tokenizers only (Llama 3, Qwen, SmolLM, GPT-2, ...): pass the fast tokenizer of a ByteLevel "
                "model."
            )

    def _prepare_inputs(self, generation_batch: dict[str, Any]) -> dict[str, Any]:
        """GOLD's micro-batch, remembering whether the student sampled it (its slice of the generation buffer)."""
        inputs = super()._prepare_inputs(generation_batch)
        flags = self._buffered_on_policy
        slice_idx = (self._step - 1) % self.args.gradient_accumulation_steps
        self._on_policy_batch = bool(self.model.training and flags is not None and flags[slice_idx])
        return inputs

    # ------------------------------------------------------------------ loss

    def _gated_loss(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> tuple[torch.Tensor, Any]:
        """GOLD's ULD loss with each aligned span weighted by the gate's verdict (GOLD's own loss without ULD)."""
        if not (self.use_uld_loss and self.teacher_tokenizer is not None):
            return GOLDTrainer.compute_loss(self, model, inputs, True, num_items_in_batch)
        uld = self.uld_loss_fn
        outputs_student, outputs_teacher, teacher_ids, teacher_labels, teacher_offsets = gold_forward(
            self, model, inputs
        )
        student_logits, teacher_logits = outputs_student.logits, outputs_teacher.logits
        student_offsets = inputs.get("byte_offsets")
        if uld.use_extended_uld and student_offsets is None:
            raise ValueError("Input batches must include `byte_offsets` when `use_extended_uld=True`.")
        sequences = uld_alignment(
            uld,
            student_logits,
            teacher_logits,
            inputs["labels"],
            teacher_labels,
            inputs["input_ids"],
            teacher_ids,
            student_offsets,
            teacher_offsets,
        )
        if sequences is None:  # GOLD's zero for a batch without a completion on one side
            distillation = (
                torch.zeros(1, device=student_logits.device, requires_grad=True) * student_logits.sum() * 1e-8
            )
            distillation = uld.distillation_weight * distillation
        else:
            completion = span_completion(sequences, inputs["input_ids"].shape, student_logits.device)
            kind = BatchKind.on_policy() if self._on_policy_batch else BatchKind.named(OFF_POLICY)
            batch = self._open_batch(kind, completion, inputs["input_ids"], training=model.training)
            accepted, span_accepted = span_verdicts(batch, sequences, student_logits, teacher_logits, self._to_teacher)
            per_sequence = []
            for row, (sequence, verdicts) in enumerate(zip(sequences, span_accepted, strict=True)):
                if sequence is None:
                    per_sequence.append(student_logits[row].sum() * 0.0)
                    continue
                weights = batch.position_weights(verdicts).to(sequence.student.dtype)
                spans = torch.tensor(weights.numel(), device=weights.device)
                weighted = uld_weighted_sum(uld, sequence.student, sequence.teacher, weights)
                per_sequence.append(batch.normalization.normalize(weighted, weights, spans, spans))
            distillation = uld.distillation_weight * torch.stack(per_sequence).mean()
            batch.record(accepted)
        loss = uld_cross_entropy(uld, student_logits, inputs["labels"]) + self.args.kd_coef * distillation
        gold_record_hybrid_parts(self)
        empty_cache()
        return loss, outputs_student
