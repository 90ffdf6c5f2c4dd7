"""A teacher on a vLLM server as the loss and the gate read it: its answer as a `losses.SparseTeacher`, and the gate's
view of it.

The server (TRL's `ServerDistillationTrainer._get_teacher_token_logprobs_from_server`) returns the teacher's top
`loss_top_k` log-probabilities and token ids at every completion position, and its log-probability of the sampled
token:

- the teacher is a `losses.SparseTeacher`: its top-k, and the tail mass ``1 - sum`` of their probabilities (the
  server returns no tail; TRL's ``loss_add_tail`` computes it the same way); ids past the student's vocabulary (a
  teacher with a larger padded vocabulary) are no token: dropped from the top-k, their mass in the tail
  (`server_sparse_teacher`), never counted by the gate (`check_top_k_decidable` where they leave it too few);
- the gate reads `losses.sparse_log_probs` of it, with the teacher's log-probability of the sampled token written in
  (`with_sampled_log_probs`; what a rule may read of a server teacher: ``{"top_k", "proposal"}``,
  `rules.GateRule.teacher_reads`, checked by `SpecKDServerDistillationConfig`): `spec`, which reads the sampled token
  only, is exact, and `topk` is exact for ``gate_top_k < loss_top_k`` (ties: see `server_sparse_teacher`).

Shapes: ``B`` batch, ``T`` completion positions, ``K`` the server's top-K, ``V`` the student's vocabulary.
"""

from __future__ import annotations

import torch

from .sparse_teacher import SparseTeacher, no_token_slots


def server_sparse_teacher(
    teacher_result: dict[str, torch.Tensor], required: torch.Tensor, vocab_size: int, *, view: bool = True
):
    """The server's answer as a `SparseTeacher` and the gate's view of it.

    Args:
        teacher_result: `ServerDistillationTrainer._get_teacher_token_logprobs_from_server`'s dict:
            ``topk_logprobs`` `[B, T, K]` (``-inf`` where missing), ``topk_token_ids`` `[B, T, K]`,
            ``actual_logprobs`` `[B, T]` (the sampled token's).
        required (`torch.BoolTensor` of shape `[B, T]`): the completion positions.
        vocab_size (`int`): ``V``.

    Ties. The server cuts its top-K with ``torch.topk``, which keeps an arbitrary subset of the tokens tied at the
    K-th value, in no fixed order. The gate's `topk` rule ranks the returned tokens (and the sampled one) by value,
    then id (`rules.teacher_rank`), so a tie at the gate's k-th place goes to the lower id exactly as on the full
    teacher whenever the tied tokens are all returned, i.e. unless the tie reaches the K-th place (``K - k + 1`` or
    more tokens tied at the k-th value: none with ``k = 5``, ``K = 20`` short of 16-way ties). With ``k = K`` it
    always reaches it, and the returned set is no longer the rule's top-k: `SpecKDServerDistillationConfig` refuses
    ``gate_top_k >= loss_top_k`` for that reason (the server cannot be asked for the rule's order).

    Ids past the student's vocabulary. A teacher whose output is padded beyond the student's (Qwen2.5-7B's 152064 rows
    against Qwen2.5-0.5B's 151936) may return ids ``>= V``. The student puts no probability on them, so their mass
    goes to the tail bucket, exactly: their slots are dropped (`losses.no_token_slots`) and the tail ``1 - sum`` is
    taken over the other slots. The gate never counts them either (the view has the ``V`` ids only).

    Returns:
        The `SparseTeacher` `[B, T, K]` (tail ``log(1 - sum exp(top-k))`` over the slots of ids ``< V``) and the
        gate's `[B, T, V]` log-probabilities (`losses.sparse_log_probs`, the sampled token's log-probability written
        in); with ``view=False`` the `SparseTeacher` alone (the gate then reads `candidate_view`).

    Raises:
        ValueError: where the server returned no top-1 log-probability at a completion position.
    """
    values, ids = teacher_result["topk_logprobs"], teacher_result["topk_token_ids"].long()
    missing = required & ~torch.isfinite(values[..., 0])
    if missing.any():
        raise ValueError(
            f"The teacher server returned no log-probabilities at {int(missing.sum())} of {int(required.sum())} "
            "completion positions; check that it serves the same model and tokenizer, and its max_logprobs."
        )
    floor = -1e4
    values = torch.where(required.unsqueeze(-1), values, torch.full_like(values, floor)).clamp_min(floor)
    valid = no_token_slots(ids, vocab_size)
    in_vocab = values if valid is None else values.masked_fill(~valid, float("-inf"))
    log_mass = torch.logsumexp(in_vocab, dim=-1).clamp(max=-1e-7)  # as TRL's `_add_tail_bucket`
    log_tail = torch.log(-torch.expm1(log_mass))
    teacher = SparseTeacher(ids, values, log_tail, vocab_size, valid)
    return (teacher, teacher.log_probs()) if view else teacher


def check_top_k_decidable(teacher: SparseTeacher, tokens: torch.Tensor, gated: torch.Tensor, top_k: int) -> None:
    """Refuse a top-k verdict the server's answer cannot decide. Where ids past the student's vocabulary take slots of
    the returned top-K (`server_sparse_teacher`), fewer than `top_k` student tokens may be left in it; a sampled token
    that is not among them then has an unknown rank among the student's tokens (its own log-probability is known, not
    how many tokens left out lie above it).

    Args:
        teacher (`SparseTeacher` of shape `[B, T, K]`): `server_sparse_teacher`'s.
        tokens (`torch.LongTensor` of shape `[B, T]`), gated (`torch.BoolTensor` of shape `[B, T]`): the sampled
            tokens and the positions the gate verifies.
        top_k (`int`): the rule's k at this step.

    Raises:
        ValueError: naming both vocabulary sizes and the `loss_top_k` that would serve.
    """
    if teacher.valid is None:
        return
    real = teacher.valid.sum(dim=-1)  # [B, T] student tokens returned
    returned = ((teacher.ids == tokens.unsqueeze(-1)) & teacher.valid).any(dim=-1)
    undecided = gated & (real < top_k) & ~returned
    if bool(undecided.any()):
        padded = int((~teacher.valid).sum(dim=-1)[gated].max())
        raise ValueError(
            f"The teacher server returned ids past the student's vocabulary (the student has {teacher.vocab_size} "
            f"tokens, the teacher's ids reach {int(teacher.ids.max()) + 1} or more: a padded embedding): up to "
            f"{padded} of its top loss_top_k={teacher.ids.size(-1)} are no student token, leaving fewer than "
            f"gate_top_k={top_k} student tokens at {int(undecided.sum())} gated positions, where the gate cannot "
            f"rank the sampled token. Set loss_top_k >= {top_k + padded} (and the server's max_logprobs with it)."
        )


def with_sampled_log_probs(
    teacher_view: torch.Tensor,
    sampled: torch.Tensor,
    tokens: torch.Tensor,
    completion: torch.Tensor,
    *,
    required_by: str | None = None,
) -> torch.Tensor:
    """The gate's view `[B, T, V]` with the teacher's log-probability of each sampled token written in.

    Args:
        teacher_view (`torch.Tensor` of shape `[B, T, V]`): `server_sparse_teacher`'s view.
        sampled (`torch.Tensor` of shape `[B, T]`): the server's ``actual_logprobs`` (non-finite where it has none).
        tokens (`torch.LongTensor` of shape `[B, T]`), completion (`torch.BoolTensor` of shape `[B, T]`): the sampled
            tokens and the completion positions.
        required_by (`str`, *optional*): the gate whose rule reads the student's ``q`` of every sampled token, and so
            the teacher's log-probability of it: the server must have returned one at every completion position.

    Raises:
        ValueError: where `required_by` and the server returned none at some completion position.
    """
    if required_by is not None and bool((completion & ~torch.isfinite(sampled)).any()):
        raise ValueError(
            f"gate={required_by!r} reads the teacher's log-probability of every sampled token, and the teacher "
            "server returned none at some completion positions; check the server's prompt log-probabilities."
        )
    sampled = torch.where(completion, sampled, torch.zeros_like(sampled)).clamp_min(-1e4)
    return teacher_view.scatter(-1, tokens.unsqueeze(-1), sampled.unsqueeze(-1).to(teacher_view.dtype))


def candidate_view(
    teacher: SparseTeacher,
    sampled: torch.Tensor,
    tokens: torch.Tensor,
    completion: torch.Tensor,
    student_log_probs: torch.Tensor,
    *,
    required_by: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gate's view on ``K + 1`` candidate tokens per position instead of the ``V`` of `with_sampled_log_probs`:
    the teacher's top-K and the sampled token, in id order, with the same verdicts for the rules a server teacher
    serves (`topk`, `spec`), without building `[B, T, V]` tensors.

    Every token outside the candidates has the floor in the `[B, T, V]` view, below every value a rule compares with
    the sampled token's: the `topk` rank counts only candidates (the relabelling keeps id order within a position, so
    ties still go to the lower id), and `spec` reads the sampled token's two log-probabilities, which the view keeps.
    The sampled token's log-probability replaces its top-K slot, if it has one (that slot then holds the floor), as in
    `with_sampled_log_probs`; a slot that is no student token (`SparseTeacher.valid`) holds the floor too.

    Args:
        teacher (`SparseTeacher` of shape `[B, T, K]`): `server_sparse_teacher`'s.
        sampled, tokens, completion, required_by: as `with_sampled_log_probs`.
        student_log_probs (`torch.Tensor` of shape `[B, T, V]`): the student's, at temperature 1 (read without
            gradient).

    Returns:
        The student's and the teacher's log-probabilities at the candidates `[B, T, K + 1]`, and each sampled token's
        index among them `[B, T]` (the proposals of `weighting.GatedBatch.verdicts` on this view).
    """
    if required_by is not None and bool((completion & ~torch.isfinite(sampled)).any()):
        raise ValueError(
            f"gate={required_by!r} reads the teacher's log-probability of every sampled token, and the teacher "
            "server returned none at some completion positions; check the server's prompt log-probabilities."
        )
    floor = -1e4
    vocab = teacher.vocab_size
    ids, values = teacher.ids.long(), teacher.values.float().clamp_min(floor)
    tokens = tokens.long()
    dropped = ids == tokens.unsqueeze(-1)  # the sampled token's own slot: its value comes from `sampled`
    if teacher.valid is not None:
        dropped |= ~teacher.valid
    values = values.masked_fill(dropped, floor)
    ids = torch.where(dropped, torch.full_like(ids, vocab), ids)  # sorted after every token id (and never gathered)
    sampled = torch.where(completion, sampled, torch.zeros_like(sampled)).float().clamp_min(floor)
    candidates = torch.cat([ids, tokens.unsqueeze(-1)], dim=-1)  # [B, T, K + 1]
    order = candidates.argsort(dim=-1, stable=True)
    candidates = candidates.gather(-1, order)
    teacher_values = torch.cat([values, sampled.unsqueeze(-1)], dim=-1).gather(-1, order)
    index = (order == ids.size(-1)).long().argmax(dim=-1)  # where the sampled token went
    student_values = student_log_probs.detach().gather(-1, candidates.clamp(max=vocab - 1))
    return student_values, teacher_values, index


def bucket_forward_kl(teacher: SparseTeacher, student_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-K tokens and one tail bucket, per position, differentiable in the
    student: TRL's server loss for ``beta=0`` with ``loss_add_tail`` (`_compute_server_forward_kl_loss` before its
    reduction), computed on the ``K + 1`` buckets as TRL computes it. It equals the full-vocabulary divergence against
    `sparse_teacher.tail_bucket_target` (values and gradient; see there) without its `[B, T, V]` target.

    Slots that are no student token or that hold the floor (the server's ``-inf`` padding, positions off the
    completion: `server_sparse_teacher`) are left out, as TRL leaves out the ``-inf`` ones.

    Args:
        teacher (`SparseTeacher` of shape `[B, T, K]`): `server_sparse_teacher`'s.
        student_log_probs (`torch.Tensor` of shape `[B, T, V]`): ``log q`` at the divergence's temperature.

    Returns:
        `torch.Tensor` of shape `[B, T]`.
    """
    floor = -1e4
    ids, values = teacher.ids.long(), teacher.values.to(student_log_probs.dtype)
    support = values > floor
    if teacher.valid is not None:
        support &= teacher.valid
        ids = torch.where(teacher.valid, ids, torch.zeros_like(ids))
    neg_inf = torch.full((), float("-inf"), dtype=student_log_probs.dtype, device=student_log_probs.device)
    student_top = torch.where(support, student_log_probs.gather(-1, ids), neg_inf)
    teacher_top = torch.where(support, values, neg_inf)

    def with_tail(log_probs: torch.Tensor) -> torch.Tensor:  # TRL's `_add_tail_bucket`
        log_sum = torch.logsumexp(log_probs, dim=-1, keepdim=True).clamp(max=-1e-7)
        return torch.cat([log_probs, torch.log(-torch.expm1(log_sum))], dim=-1)

    student_buckets, teacher_buckets = with_tail(student_top), with_tail(teacher_top)
    support = torch.cat([support, torch.ones_like(support[..., :1])], dim=-1)
    zero = torch.zeros((), dtype=student_log_probs.dtype, device=student_log_probs.device)
    safe_student = torch.where(support, student_buckets, zero)
    safe_teacher = torch.where(support, teacher_buckets, zero)
    teacher_probs = torch.where(support, teacher_buckets.exp(), zero)
    return torch.nan_to_num(teacher_probs * (safe_teacher - safe_student), nan=0.0).sum(dim=-1)
