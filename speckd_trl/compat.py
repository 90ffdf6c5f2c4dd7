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

`UPSTREAM` pins the source of each TRL function copied here: `tests/test_compat.py` fails when a TRL release changes
it, so the copy is re-read against the new code before anyone trusts it.
"""

from __future__ import annotations

from typing import Any

import torch
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
}

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
