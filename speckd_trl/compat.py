"""What we repeat of TRL's private code, in one place.

`SpecKDDistillationTrainer` weights TRL's per-token divergence, which TRL 1.16 only computes inside private code:
`DistillationTrainer._compute_loss` (both models' last hidden states through `_get_last_hidden_state` and
`_forward_redirection`) ends in the module-level `_chunked_divergence_loss`, which sums the per-token divergence
before returning it. The two functions here repeat those steps, with the same private helpers, up to that sum:

- `distillation_hidden_states`: the inputs and both models' hidden states of `_compute_loss`;
- `per_token_divergence`: `_chunked_divergence_loss`'s call of `ChunkedDivergenceFunction`, without the sum.

`SpecKDServerDistillationTrainer` replaces `ServerDistillationTrainer.compute_loss` (TRL reduces its server loss
inside it), keeping its start:

- `server_forward`: the input layout its server request reads, the student's forward and the teacher server's answer
  (through the private `_compute_prompt_length` and `_get_teacher_token_logprobs_from_server`), aligned as TRL
  aligns them.

`SpecKDGOLDTrainer` weights GOLD's ULD loss per aligned span, which `ULDLoss._compute_distillation_loss` averages
over the spans of each sequence before returning it; it replaces `GOLDTrainer.compute_loss` (text teachers):

- `gold_forward`: the teacher's inputs rebuilt from the texts (`build_teacher_inputs_from_texts`) and both forwards, as
  `GOLDTrainer.compute_loss` makes them;
- `uld_alignment`: `_compute_distillation_loss` up to the aligned, merged distributions of each sequence, with the
  absolute positions of each aligned span's tokens (which the gate reads);
- `uld_weighted_sum`: its per-sequence ULD (sorted L1, or `_compute_hybrid_uld_loss`) as a weighted sum over spans;
- `uld_cross_entropy`, `gold_record_hybrid_parts`: `ULDLoss.__call__`'s cross-entropy term, and the end of
  `GOLDTrainer.compute_loss` (the hybrid loss's parts for the logs).

`SpecKDTrainer(packing=True)` packs each dataset micro-batch with the best-fit-decreasing packer behind
`trl.pack_dataset(strategy="bfd")`, the private `trl.data_utils._pack_bfd`, called (not copied) on a pyarrow table of
the micro-batch's rows (`pack_bfd`); pinned here too, so that a change of its output reaches the packing tests' eyes.

`UPSTREAM` pins the source of each TRL function copied here: `tests/test_compat.py` fails when a TRL release changes
it, so the copy is re-read against the new code before anyone trusts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from trl.data_utils import _pack_bfd
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
from trl.kernels.chunked_logprob import _use_triton

from .models import OutputHead


# sha256 of `inspect.getsource(...)` of the TRL code this module repeats, at the TRL version in constraints.txt
UPSTREAM = {
    "trl.trainer.distillation_trainer.DistillationTrainer._compute_loss": (
        "9fc0021cbcc0b5e90ee09c8afcc998e7c0db3ba2bfbedfa863fd4630c2578013"
    ),
    "trl.trainer.distillation_trainer._chunked_divergence_loss": (
        "550cb45191ab1654ac65f2d7fb8ca8b81789c16b4799efaf37eadb54363077e4"
    ),
    "trl.experimental.server_distillation.server_distillation_trainer.ServerDistillationTrainer.compute_loss": (
        "0bb0f043aa7c304030472bfc4986382026b62a90c8567ed1493aab6151b974e9"
    ),
    "trl.experimental.gold.gold_trainer.GOLDTrainer.compute_loss": (
        "13740ff7e1f55e2ed7bbb4e284331e5212313d7f2c3c2342a24a0798f3c831d9"
    ),
    "trl.experimental.gold.gold_trainer.ULDLoss.__call__": (
        "dd8650a24d31c04ac60e3c4fad030b5e4c22084e73459e312a0e50965cb47c51"
    ),
    "trl.experimental.gold.gold_trainer.ULDLoss._compute_distillation_loss": (
        "fb401c4c0c6cf4431514afdd7247128f344807a7e2797d79af27395b75a84fd0"
    ),
    "trl.data_utils._pack_bfd": "bb6af93352c7ef4fc775b204d4dcc7658757c563bdfab57acfd23fdad9efa54c",
}


def pack_bfd(table: Any, seq_length: int) -> Any:
    """`trl.pack_dataset(strategy="bfd")`'s packer on a pyarrow table of list columns: rows of at most `seq_length`
    elements (longer rows cut), with a ``seq_lengths`` column (the lengths of the rows in each packed row)."""
    return _pack_bfd(table, seq_length, on_seq_length_overflow="truncate")


# The multimodal fields `DistillationTrainer._compute_loss` forwards to both backbones
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


def distillation_inputs(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`DistillationTrainer._compute_loss`'s model inputs from a micro-batch of prompts `[B, P]` and completions
    `[B, K]`: ``input_ids`` and ``attention_mask`` `[B, P + K]` and the loss mask `[B, K]` (the completion mask, times
    the `tool_mask` in multi-turn tool use: tool outputs are not trained on)."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    loss_mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        loss_mask = loss_mask * inputs["tool_mask"]
    return input_ids, attention_mask, loss_mask


def distillation_hidden_states(
    trainer: Any,
    unwrapped_student: torch.nn.Module,
    inputs: dict[str, Any],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' final hidden states at the completion positions, as `DistillationTrainer._compute_loss` computes
    them: the student through `trainer._get_last_hidden_state` (inside the student wrapper's forward), the teacher
    without gradient through its own wrapper (`trainer._forward_redirection`), so that FSDP / DeepSpeed materialize its
    sharded parameters. `input_ids` and `attention_mask` `[B, P + K]` are `distillation_inputs`' for `inputs`.

    Returns:
        The student's `[B, K, H_s]` and the teacher's `[B, K, H_t]` hidden states (position ``k`` predicts completion
        token ``k``).
    """
    logits_to_keep = inputs["completion_ids"].size(1)
    multimodal_inputs = {key: inputs[key] for key in MULTIMODAL_KEYS if key in inputs}
    student_hidden = trainer._get_last_hidden_state(
        unwrapped_student, input_ids, attention_mask, logits_to_keep, **multimodal_inputs
    )
    trainer.teacher_model.eval()
    unwrapped_teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    with torch.no_grad():
        teacher_hidden = trainer._forward_redirection(
            trainer.teacher_model,
            unwrapped_teacher,
            trainer._get_last_hidden_state,
            unwrapped_teacher,
            input_ids,
            attention_mask,
            logits_to_keep,
            **multimodal_inputs,
        )
    return student_hidden, teacher_hidden


def per_token_divergence(
    student_hidden: torch.Tensor,
    student_head: OutputHead,
    teacher_hidden: torch.Tensor,
    teacher_head: OutputHead,
    valid: torch.Tensor,
    *,
    beta: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`_chunked_divergence_loss` without its sum: TRL's per-token generalized JSD and student entropy.

    On Triton devices only the valid rows are projected; elsewhere all of them (fixed tile shapes, no recompilation),
    the others set to 0 after.

    Args:
        student_hidden (`torch.Tensor` of shape `[M, H_s]`), teacher_hidden (`torch.Tensor` of shape `[M, H_t]`):
            the final hidden states, flattened.
        student_head (`OutputHead`), teacher_head (`OutputHead`): the output layers (`models.output_head`).
        valid (`torch.BoolTensor` of shape `[M]`): the rows in the loss.
        beta (`float`), temperature (`float`): the divergence's.

    Returns:
        The divergence and the entropy, `[n]` each, and the row index they are for: `None` (all `M` rows, 0 where not
        `valid`) or `valid` (the `n` valid rows only).
    """
    compact = _use_triton(student_hidden.device)
    h_s, h_t = (student_hidden[valid], teacher_hidden[valid]) if compact else (student_hidden, teacher_hidden)
    divergence, entropy = ChunkedDivergenceFunction.apply(
        h_s,
        student_head.weight,
        student_head.bias,
        h_t,
        teacher_head.weight,
        teacher_head.bias,
        beta,
        temperature,
        student_head.logit_scale,
        student_head.softcap,
        teacher_head.logit_scale,
        teacher_head.softcap,
    )
    if compact:
        return divergence, entropy, valid
    return divergence.masked_fill(~valid, 0), entropy.masked_fill(~valid, 0), None


def server_forward(
    trainer: Any, model: torch.nn.Module, inputs: dict[str, Any]
) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The start of `ServerDistillationTrainer.compute_loss`, up to its loss: the ``input_ids`` / ``attention_mask`` /
    ``labels`` layout its server request reads, rebuilt from a micro-batch of prompts `[B, P]` and completions
    `[B, K]`; the student's forward; the teacher server's answer (`trainer._compute_prompt_length`,
    `trainer._get_teacher_token_logprobs_from_server`); and the student's logits, tokens and labels cut to the
    ``T <= K`` positions the server answered for. One difference from TRL: the student's forward projects only the
    positions from ``prompt_length - 1`` on (`logits_to_keep`), the ones the loss reads, so the returned outputs hold
    those logits only.

    Returns:
        The student's outputs; the server's dict (``actual_logprobs`` `[B, T]`, ``topk_logprobs`` and
        ``topk_token_ids`` `[B, T, K_top]`); the student's logits `[B, T, V_out]` (position ``t`` predicts completion
        token ``t``); the completion tokens `[B, T]`; and the completion mask `[B, T]` (labels other than -100).
    """
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    completion_labels = torch.where(completion_mask.bool(), completion_ids, torch.full_like(completion_ids, -100))
    labels = torch.cat([torch.full_like(prompt_ids, -100), completion_labels], dim=1)
    server_inputs = {
        **inputs,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "prompt_attention_mask": prompt_mask,
    }
    prompt_length = trainer._compute_prompt_length(server_inputs)
    # Unlike TRL, which projects every position, the student's output layer projects only the positions the loss
    # reads (from `prompt_length - 1` on, with `logits_to_keep` where the model takes it): the same logits, without
    # the prompt's `[B, P, V]` (most of an on-policy batch) in the forward and the backward.
    keep = input_ids.size(1) - prompt_length + 1
    takes_keep = "logits_to_keep" in trainer.model_kwarg_keys
    student_outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, **({"logits_to_keep": keep} if takes_keep else {})
    )
    teacher_result = trainer._get_teacher_token_logprobs_from_server(server_inputs, prompt_length)
    length = teacher_result["actual_logprobs"].shape[1]
    logits = student_outputs.logits[:, -keep:-1][:, :length]
    tokens = input_ids[:, prompt_length:][:, :length]
    completion = labels[:, prompt_length:][:, :length] != -100
    return student_outputs, teacher_result, logits, tokens, completion


def gold_forward(trainer: Any, model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[Any, Any, torch.Tensor, ...]:
    """The start of `GOLDTrainer.compute_loss` with ULD across tokenizers and a text teacher: the teacher's inputs from
    the batch's prompt and completion texts (`build_teacher_inputs_from_texts`), the student's forward and the
    teacher's (without gradient).

    Returns:
        The student's outputs, the teacher's outputs, and the teacher's `input_ids`, `labels` `[B, T_t]` and
        completion-relative byte offsets `[B, T_t, 2]`.
    """
    from trl.experimental.gold.gold_trainer import build_teacher_inputs_from_texts

    student_forward_kwargs = trainer._get_model_forward_kwargs(inputs)
    teacher_input_ids, teacher_labels, teacher_attention_mask, teacher_byte_offsets = build_teacher_inputs_from_texts(
        trainer.teacher_tokenizer,
        inputs["original_prompt_text"],
        inputs["original_completion_text"],
        use_extended_uld=trainer.uld_loss_fn.use_extended_uld,
    )
    device = trainer.accelerator.device
    teacher_input_ids = teacher_input_ids.to(device)
    teacher_labels = teacher_labels.to(device)
    teacher_attention_mask = teacher_attention_mask.to(device)
    outputs_student = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        use_cache=False,
        **student_forward_kwargs,
    )
    trainer.teacher_model.eval()
    with torch.no_grad():
        outputs_teacher = trainer.teacher_model(input_ids=teacher_input_ids, attention_mask=teacher_attention_mask)
    return outputs_student, outputs_teacher, teacher_input_ids, teacher_labels, teacher_byte_offsets


@dataclass
class AlignedSequence:
    """One sequence's aligned spans, as `ULDLoss._compute_distillation_loss` compares them.

    Attributes:
        student (`torch.Tensor` of shape `[G, V_s]`), teacher (`torch.Tensor` of shape `[G, V_t]`): the merged
            distributions of the ``G`` spans (ULD's inputs).
        student_spans (`list[list[int]]`), teacher_spans (`list[list[int]]`): each span's token positions in the
            student's and the teacher's sequence (absolute indices of `input_ids`).
    """

    student: torch.Tensor
    teacher: torch.Tensor
    student_spans: list[list[int]]
    teacher_spans: list[list[int]]


def uld_alignment(
    uld: Any,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_labels: torch.Tensor,
    student_input_ids: torch.Tensor,
    teacher_input_ids: torch.Tensor,
    student_byte_offsets: torch.Tensor | None,
    teacher_byte_offsets: torch.Tensor | None,
) -> list[AlignedSequence | None] | None:
    """`ULDLoss._compute_distillation_loss` (of the `ULDLoss` `uld`) up to its per-sequence loss: per sequence its
    `AlignedSequence`, or `None` for a sequence that TRL gives a zero loss; `None` in all when TRL returns its
    all-empty zero."""
    student_answer_index, student_answer_size = uld._get_start_and_size_answers(student_labels)
    teacher_answer_index, teacher_answer_size = uld._get_start_and_size_answers(teacher_labels)
    if uld.skip_student_eos:
        student_answer_size = [size - 1 for size in student_answer_size]
    if uld.skip_teacher_eos:
        teacher_answer_size = [size - 1 for size in teacher_answer_size]
    if (
        not student_answer_size
        or not teacher_answer_size
        or max(max(student_answer_size), max(teacher_answer_size)) <= 0
    ):
        return None
    bayesian = uld.token_merge_strategy == "bayesian"
    sequences: list[AlignedSequence | None] = []
    for i in range(student_logits.size(0)):
        student_start, student_size = student_answer_index[i], student_answer_size[i]
        teacher_start, teacher_size = teacher_answer_index[i], teacher_answer_size[i]
        if student_size <= 0 or teacher_size <= 0:
            sequences.append(None)
            continue
        if bayesian and (student_start == 0 or teacher_start == 0):
            if uld.use_extended_uld:
                if student_byte_offsets is None or teacher_byte_offsets is None:
                    raise ValueError("Byte offsets are required when `use_extended_uld=True`.")
                s_answer = student_byte_offsets[i, student_start : student_start + student_size].tolist()
                t_answer = teacher_byte_offsets[i, teacher_start : teacher_start + teacher_size].tolist()
                student_groups, teacher_groups = uld._align_by_byte_offsets(s_answer, t_answer)
                if not student_groups or not teacher_groups:
                    sequences.append(None)
                    continue
                student_drop, teacher_drop = len(student_groups[0]), len(teacher_groups[0])
            else:
                student_drop = teacher_drop = 1
            student_start, student_size = student_start + student_drop, student_size - student_drop
            teacher_start, teacher_size = teacher_start + teacher_drop, teacher_size - teacher_drop
            if student_size <= 0 or teacher_size <= 0:
                sequences.append(None)
                continue
        shift = 1 if bayesian else 0
        student_answer_logits = student_logits[i, student_start - shift : student_start + student_size - shift]
        teacher_answer_logits = teacher_logits[i, teacher_start - shift : teacher_start + teacher_size - shift]
        student_probs = F.softmax(student_answer_logits / uld.student_temperature, dim=-1)
        teacher_probs = F.softmax(teacher_answer_logits / uld.teacher_temperature, dim=-1)
        student_token_ids = student_input_ids[i, student_start : student_start + student_size].tolist()
        teacher_token_ids = teacher_input_ids[i, teacher_start : teacher_start + teacher_size].tolist()
        if uld.use_extended_uld:
            if student_byte_offsets is None or teacher_byte_offsets is None:
                raise ValueError("Byte offsets are required when `use_extended_uld=True`.")
            s_answer = student_byte_offsets[i, student_start : student_start + student_size].tolist()
            t_answer = teacher_byte_offsets[i, teacher_start : teacher_start + teacher_size].tolist()
            student_groups, teacher_groups = uld._align_by_byte_offsets(s_answer, t_answer)
            paired = [(sg, tg) for sg, tg in zip(student_groups, teacher_groups, strict=False) if sg and tg]
            student_groups = [sg for sg, _ in paired]
            teacher_groups = [tg for _, tg in paired]
            student_aligned = uld._merge_probabilities_with_alignment_groups(
                student_probs, student_groups, student_token_ids
            )
            teacher_aligned = uld._merge_probabilities_with_alignment_groups(
                teacher_probs, teacher_groups, teacher_token_ids
            )
        else:
            min_length = min(len(student_token_ids), len(teacher_token_ids))
            student_aligned, teacher_aligned = student_probs[:min_length, :], teacher_probs[:min_length, :]
            student_groups = teacher_groups = [[k] for k in range(min_length)]
        sequences.append(
            AlignedSequence(
                student_aligned,
                teacher_aligned,
                [[student_start + k for k in group] for group in student_groups],
                [[teacher_start + k for k in group] for group in teacher_groups],
            )
        )
    return sequences


def uld_weighted_sum(uld: Any, student_aligned: torch.Tensor, teacher_aligned: torch.Tensor, weights: torch.Tensor):
    """``sum_g w_g l_g`` over a sequence's spans, ``l_g`` the ULD loss `_compute_distillation_loss` averages over them
    (its sorted L1, or `_compute_hybrid_uld_loss` with the hybrid loss). With every weight 1 it is that average times
    the number of spans. The hybrid loss is computed once per distinct weight (it is linear in its rows)."""
    if uld.use_hybrid_loss and uld._vocab_mapping is not None:
        total = student_aligned.new_zeros(())
        for value in torch.unique(weights).tolist():
            rows = (weights == value).nonzero().squeeze(-1)
            total = total + value * rows.numel() * uld._compute_hybrid_uld_loss(
                student_aligned[rows], teacher_aligned[rows]
            )
        return total
    student_sorted = student_aligned.sort(dim=-1, descending=True).values
    teacher_sorted = teacher_aligned.sort(dim=-1, descending=True).values
    size = max(student_sorted.size(-1), teacher_sorted.size(-1))
    student_sorted = F.pad(student_sorted, (0, size - student_sorted.size(-1)))
    teacher_sorted = F.pad(teacher_sorted, (0, size - teacher_sorted.size(-1)))
    per_span = (student_sorted - teacher_sorted).abs().sum(dim=-1)  # [G]
    return (weights.to(per_span.dtype) * per_span).sum()


def uld_cross_entropy(uld: Any, student_logits: torch.Tensor, student_labels: torch.Tensor) -> torch.Tensor | float:
    """`ULDLoss.__call__`'s cross-entropy term on the student's labels (0.0 with `uld_crossentropy_weight=0`)."""
    if uld.crossentropy_weight <= 0:
        return 0.0
    shift_logits = student_logits[..., :-1, :].contiguous()
    shift_labels = student_labels[..., 1:].contiguous()
    loss_fct = torch.nn.CrossEntropyLoss(ignore_index=uld.ignore_index)
    return uld.crossentropy_weight * loss_fct(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))


def gold_record_hybrid_parts(trainer: Any) -> None:
    """The end of `GOLDTrainer.compute_loss`: the hybrid loss's matched and unmatched parts (of its last call) added to
    the trainer's `matched_loss` / `unmatched_loss` logs."""
    uld = trainer.uld_loss_fn
    if not (hasattr(uld, "last_matched_loss") and hasattr(uld, "last_unmatched_loss")):
        return
    step_eq = 1.0 / max(1, int(trainer.args.gradient_accumulation_steps))
    trainer._matched_sum += uld.last_matched_loss.item() if uld.last_matched_loss is not None else 0.0
    trainer._unmatched_sum += uld.last_unmatched_loss.item() if uld.last_unmatched_loss is not None else 0.0
    trainer._matched_step_eq += step_eq
    trainer._unmatched_step_eq += step_eq
