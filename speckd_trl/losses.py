"""Per-position weighted generalized JSD and its normalization.

The divergence is TRL's: the element-wise terms ``[B, T, V]`` of `GKDTrainer.generalized_jsd_loss` with
``reduction="none"``; summing over the vocabulary gives the per-position divergence ``D_beta(p_t, q_t)`` that SpecKD
weights (beta=0 forward KL(p||q), beta=1 reverse KL(q||p), otherwise the JSD through the mixture
``beta * p + (1 - beta) * q``). TRL's function is split in two here, its ``log_softmax`` (`jsd_log_probs`) and the
rest (`generalized_jsd_from_log_probs`), each the same operations as TRL's, so that the gate reads ``log p(x_t)`` and
``log q(x_t)`` from the divergence's own log-probabilities instead of normalizing ``[B, T, V]`` logits again; a test
keeps the per-position divergence (values and gradients) bit for bit TRL's for float32 and float64 logits.

Two paths compute the same loss:

- eager (`weighted_generalized_jsd`): from both models' full ``[B, T, V]`` logits, exactly as GKD;
- chunked (`chunked_weighted_jsd`): from both models' final hidden states and output layers, ``chunk_size`` tokens
  at a time, so that only ``[chunk_size, V]`` logits ever exist. The gate runs on each chunk's log-probs, and each
  chunk's divergence and gradient are computed in closed form in the forward pass (`generalized_jsd_and_logit_grad`;
  as fused linear-cross-entropy kernels do), so neither model's logits are kept for the backward pass. Its values
  equal the eager path's to float round-off (tested), not bit for bit.

Shapes: ``B`` batch, ``T`` positions, ``V`` vocabulary, ``N`` flattened positions, ``H`` hidden size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from trl.kernels.chunked_logprob import ChunkedLogProbFunction


NORMALIZATIONS = ("tokens", "accepted")
LOSS_PATHS = ("eager", "chunked")
VOCAB_TILE = 8192  # vocabulary columns per tile of the chunked log-probabilities (reward term)


def jsd_log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)``, the first step of GKD's divergence, made apart so the gate can read it.

    The computation is `GKDTrainer.generalized_jsd_loss`'s own (a division by ``temperature``, skipped when it is 1,
    since ``z / 1`` is ``z`` exactly; then ``log_softmax``), so float32 results are bit for bit GKD's. Half-precision
    logits are computed in float32, where GKD stays in their dtype: float16 overflows (range 65504) when logits are
    divided by a small temperature, and ``inf - inf`` gives NaN in the divergence; bfloat16 keeps 8 mantissa bits, so
    near-uniform distributions (a high temperature) give divergences off by tens of percent (measured in the tests).
    The price is float32 ``[B, T, V]`` temporaries on the eager path; the chunked path holds a chunk at a time.

    Args:
        logits (`torch.Tensor` of shape `[..., V]`): logits.
        temperature (`float`): softmax temperature ``tau``.

    Returns:
        `torch.Tensor` of shape `[..., V]`: log-probabilities (float32 for half-precision logits, else the logits'
        dtype).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def generalized_jsd_from_log_probs(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """GKD's element-wise generalized JSD terms from log-probabilities (its ``reduction="none"`` output).

    The operations of `GKDTrainer.generalized_jsd_loss` after its ``log_softmax``, unchanged (a test checks the
    result is bit for bit TRL's): beta=0 forward KL(p||q), beta=1 reverse KL(q||p), otherwise the KL of both to the
    mixture ``beta * p + (1 - beta) * q``. TRL's function takes logits only; taking the log-probabilities lets the
    gate read ``log p(x_t)`` and ``log q(x_t)`` from the divergence's own ``[.., V]`` tensors instead of computing
    two more.

    Args:
        student_log_probs (`torch.Tensor` of shape `[..., V]`): ``log q``, from `jsd_log_probs`.
        teacher_log_probs (`torch.Tensor` of shape `[..., V]`): ``log p``, from `jsd_log_probs`.
        beta (`float`): generalized JSD interpolation in ``[0, 1]``.

    Returns:
        `torch.Tensor` of shape `[..., V]`: sum it over the vocabulary for ``D_beta(p_t, q_t)``.
    """
    if beta == 0:
        return F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    if beta == 1:
        return F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    beta = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
    mixture_log_probs = torch.logsumexp(
        torch.stack([student_log_probs + torch.log1p(-beta), teacher_log_probs + torch.log(beta)]), dim=0
    )
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
    return beta * kl_teacher + (1 - beta) * kl_student


def generalized_jsd_and_logit_grad(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, *, beta: float, grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``D_beta(p, q)`` per position and its gradient with respect to the student's logits, in closed form.

    The same values as `generalized_jsd_from_log_probs` summed over the vocabulary (to float round-off: the mixture
    is ``max(a, b) + log1p(exp(-|a - b|))`` instead of ``logsumexp(stack([a, b]))``, which costs a copy and several
    passes more), and the gradient autograd would give through it and ``log_softmax``, in a few element-wise passes
    instead of the backward of every operation: for the chunked loss these passes are most of the step.

    With ``s = log q``, ``t = log p``, ``q = exp(s)``, ``p = exp(t)``:

    - beta=0, forward KL(p||q): ``D = sum p (t - s)``, gradient ``q - p``;
    - beta=1, reverse KL(q||p): ``D = sum q (s - t)``, gradient ``q * ((s - t) - D)``;
    - otherwise, with the mixture ``m = log((1 - beta) q + beta p)``: ``D = beta sum p (t - m) + (1 - beta) sum q
      (s - m)``, gradient ``(1 - beta) q * ((s - m) - KL(q||m))`` (``dD/dq = (1 - beta)(s - m)``, through the
      softmax).

    Args:
        student_log_probs (`torch.Tensor` of shape `[..., V]`): ``log q``, from `jsd_log_probs` (finite).
        teacher_log_probs (`torch.Tensor` of shape `[..., V]`): ``log p``, from `jsd_log_probs` (finite).
        beta (`float`): generalized JSD interpolation in ``[0, 1]``.
        grad (`bool`): also compute the gradient.

    Returns:
        ``D`` of shape `[...]`, and ``dD/dz`` of shape `[..., V]` for student logits ``z`` at temperature 1 (divide
        it by the temperature for logits that were divided by it), or None without `grad`.
    """
    q, p = student_log_probs.exp(), teacher_log_probs.exp()
    if beta == 0:
        divergence = (p * (teacher_log_probs - student_log_probs)).sum(dim=-1)
        return divergence, (q - p) if grad else None
    if beta == 1:
        log_ratio = student_log_probs - teacher_log_probs
        divergence = (q * log_ratio).sum(dim=-1)
        return divergence, (q * (log_ratio - divergence.unsqueeze(-1))) if grad else None
    a = student_log_probs + math.log1p(-beta)
    b = teacher_log_probs + math.log(beta)
    mixture_log_probs = torch.maximum(a, b) + torch.log1p(torch.exp(-(a - b).abs()))
    del a, b
    log_ratio = student_log_probs - mixture_log_probs  # s - m
    kl_student = (q * log_ratio).sum(dim=-1)
    divergence = beta * (p * (teacher_log_probs - mixture_log_probs)).sum(dim=-1) + (1 - beta) * kl_student
    if not grad:
        return divergence, None
    log_ratio -= kl_student.unsqueeze(-1)
    return divergence, log_ratio.mul_(q).mul_(1 - beta)


def weighted_jsd_from_log_probs(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, weights: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """``w_t * D_beta(p_t, q_t)`` at every position from log-probabilities (see `weighted_generalized_jsd`).

    Args:
        student_log_probs (`torch.Tensor` of shape `[B, T, V]`): ``log q``, from `jsd_log_probs`.
        teacher_log_probs (`torch.Tensor` of shape `[B, T, V]`): ``log p``, from `jsd_log_probs`.
        weights (`torch.Tensor` of shape `[B, T]`): ``w_t``; 0 on masked positions.
        beta (`float`): generalized JSD interpolation in ``[0, 1]``.

    Returns:
        `torch.Tensor` of shape `[B, T]`.
    """
    per_vocab = generalized_jsd_from_log_probs(student_log_probs, teacher_log_probs, beta=beta)
    return per_vocab.sum(dim=-1) * weights.to(per_vocab.dtype)


def top_k_log_probs(log_probs: torch.Tensor, top_k: int, floor: float = -1e4) -> torch.Tensor:
    """The distributions restricted to their `top_k` most likely tokens and renormalized (target filtering).

    Ties at the k-th value are all kept. The dropped tokens get a log-probability of about `floor` (finite, so that a
    divergence against the result stays finite; their probability is 0 in float32).

    Args:
        log_probs (`torch.Tensor` of shape `[..., V]`): log-probabilities (e.g. the teacher's, from `jsd_log_probs`).
        top_k (`int`): tokens kept, >= 1.

    Returns:
        `torch.Tensor` of shape `[..., V]`.
    """
    threshold = log_probs.topk(min(top_k, log_probs.size(-1)), dim=-1).values[..., -1:]
    return torch.log_softmax(log_probs.masked_fill(log_probs < threshold, floor), dim=-1)


def teacher_top_k(log_probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a sparse teacher keeps of each distribution: its `top_k` tokens, their log-probabilities and the log of the
    mass outside them (a teacher cache's row, or what a vLLM teacher server returns plus the tail).

    The tokens are the `topk` rule's top-k, in its order: value descending, then id ascending (`rules.teacher_rank`).
    ``torch.topk`` alone keeps an arbitrary subset of the tokens tied at the k-th value (and lists ties in no fixed
    order), which with bf16/fp16 logits would keep a high-id tied token and drop a lower one; here the tied places go
    to the lowest ids, so the first ``k <= K`` of a row are exactly the rule's top-k and a sparse view gives the full
    teacher's `topk` verdicts for any ``gate_top_k <= K``, ties included.

    The tail is the log-sum-exp of the tokens left out (not ``log(1 - sum)`` of the kept ones, which cancels badly
    when the top-k hold nearly all the mass); it is ``-inf`` when `top_k` covers the vocabulary.

    Args:
        log_probs (`torch.Tensor` of shape `[..., V]`): the teacher's log-probabilities.
        top_k (`int`): tokens kept, >= 1 (at most ``V`` are).

    Returns:
        ``ids`` `[..., K]` (long, in the rule's order), ``values`` `[..., K]`, ``log_tail`` `[...]` with
        ``K = min(top_k, V)``.
    """
    k = min(top_k, log_probs.size(-1))
    values, ids = log_probs.topk(k, dim=-1)
    ids = _lowest_ids_on_ties(log_probs, values, ids)
    # the rule's order: id ascending, then a stable sort by value descending
    ids = ids.sort(dim=-1).values
    values = log_probs.gather(-1, ids)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, order)
    rest = log_probs.scatter(-1, ids, float("-inf"))
    return ids, values, torch.logsumexp(rest, dim=-1)


TIE_ROWS_PER_SCAN = 256


def _lowest_ids_on_ties(log_probs: torch.Tensor, values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`ids` `[..., K]` (``torch.topk``'s) with the places of the tokens tied at the K-th value given to the lowest
    tied ids. Only the rows where more tokens tie at the K-th value than it has places for change; the `[n, V]` scan
    runs on those rows alone."""
    threshold = values[..., -1:]
    tied = log_probs == threshold  # [..., V]
    places = ids.size(-1) - (values > threshold).sum(dim=-1)  # [...] places left for the tied tokens
    crossing = tied.sum(dim=-1) > places
    if not bool(crossing.any()):
        return ids
    rows = crossing.nonzero(as_tuple=True)
    vocab, k = log_probs.size(-1), ids.size(-1)
    positions = torch.arange(vocab, device=log_probs.device)
    tied = tied[rows]  # [R, V]
    # the lowest tied ids first (the others at V, past every id), K of them per row; 256 rows at a time, so that the
    # [rows, V] ids stay small beside the logits (bf16 logits tie at the K-th place in many rows)
    lowest = torch.cat(
        [
            torch.where(chunk, positions, vocab).topk(k, dim=-1, largest=False).values
            for chunk in tied.split(TIE_ROWS_PER_SCAN)
        ]
    )
    row_values, row_ids = values[rows], ids[rows]
    above = row_values > threshold[rows]
    # the tokens above the threshold first (torch.topk lists them first, by value), then the lowest tied ids
    slot = torch.arange(k, device=ids.device) - above.sum(dim=-1, keepdim=True)
    fixed = torch.where(slot >= 0, lowest.gather(-1, slot.clamp(min=0)), row_ids)
    ids = ids.clone()
    ids[rows] = fixed
    return ids


def sparse_log_probs(
    ids: torch.Tensor,
    values: torch.Tensor,
    vocab_size: int,
    floor: float = -1e4,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """A sparse teacher as `[..., V]` log-probabilities for the gate: `values` at `ids`, `floor` elsewhere.

    The `topk` rule's verdicts read the same top-k from it as from the full distribution for any k <= K, ties
    included, when the K tokens are the rule's own top-K (`teacher_top_k` keeps the lowest ids among the tokens tied
    at the K-th value, as the rule ranks them). Target filtering (`top_k_log_probs`) keeps every token tied at the
    k-th value, so it reads the same only where that tie does not reach past the K-th place.

    Args:
        ids (`torch.LongTensor` of shape `[..., K]`), values (`torch.Tensor` of shape `[..., K]`): `teacher_top_k`'s.
        vocab_size (`int`): ``V``.
        floor (`float`): the log-probability of the tokens left out (finite, about 0 in probability).
        valid (`torch.BoolTensor` of shape `[..., K]`, *optional*): the slots that hold a token of the ``V``; the
            others (an id past the vocabulary, `no_token_slots`) are left out, as the tokens not in the top-K. With
            it, values below `floor` read as `floor`.

    Returns:
        `torch.Tensor` of shape `[..., V]` (float32, or `values`' dtype if wider).
    """
    dtype = torch.promote_types(values.dtype, torch.float32)
    out = torch.full((*ids.shape[:-1], vocab_size), floor, dtype=dtype, device=values.device)
    if valid is None:
        return out.scatter_(-1, ids.long(), values.to(dtype))
    # a slot that is no token writes `floor` at an id in range (amax: never over a real value written there)
    ids, values = _slots_in_range(ids, valid), torch.where(valid, values.to(dtype), floor)
    return out.scatter_reduce_(-1, ids, values, reduce="amax")


def no_token_slots(ids: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """The slots of a sparse teacher that hold a token of the loss's vocabulary, `[..., K]` bool; `None` when all
    do.

    A teacher whose output is larger than the student's (a padded embedding: Qwen2.5-7B's 152064 rows against
    Qwen2.5-0.5B's 151936) may list ids ``>= V`` among its top-K. They are no token the student has (it puts no
    probability on them), so their mass belongs to the tail bucket: the slot is dropped (`valid` of
    `sparse_log_probs`, `tail_bucket_target`, `SparseTeacher`) and the tail computed from the other slots holds it.

    Args:
        ids (`torch.LongTensor` of shape `[..., K]`): the teacher's top-K ids.
        vocab_size (`int`): ``V``, the loss's vocabulary.
    """
    valid = ids < vocab_size
    return None if bool(valid.all()) else valid


def _slots_in_range(ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`ids` `[..., K]` with the slots that are no token pointed at id 0 (their writes are then masked out)."""
    return torch.where(valid, ids.long(), torch.zeros_like(ids, dtype=torch.long))


def tail_bucket_target(
    ids: torch.Tensor,
    values: torch.Tensor,
    log_tail: torch.Tensor,
    student_log_probs: torch.Tensor,
    floor: float = -1e4,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The `[..., V]` target that makes the full-vocabulary divergence equal the top-K + tail-bucket one.

    TRL's server teacher (`trl.experimental.server_distillation`, ``loss_add_tail``) compares the two models on
    ``K + 1`` buckets: the teacher's top-K tokens and the rest, where the teacher has its tail mass ``P`` and the
    student its own ``S``. That divergence (for every beta) and its gradient with respect to the student's logits
    equal the full-vocabulary divergence against this target: the top-K tokens keep the teacher's log-probabilities,
    and every other token ``j`` gets ``log P + log q_j - log S``, the teacher's tail mass spread the way the student
    spreads its own (the ratio ``p_j / q_j`` is the same on every tail token, so the divergence's derivative with
    respect to the target sums to 0 over the tail: treating the target as a constant, as the loss paths do, gives
    the bucket's exact gradient). So the eager and chunked losses, the gate's weights and the normalization run
    unchanged on a sparse teacher; `tests/test_teacher_cache.py` checks it against a by-hand bucket divergence.

    Args:
        ids (`torch.LongTensor` of shape `[..., K]`), values (`torch.Tensor` of shape `[..., K]`), log_tail
            (`torch.Tensor` of shape `[...]`): the sparse teacher (`teacher_top_k`); `log_tail` may be ``-inf``.
        student_log_probs (`torch.Tensor` of shape `[..., V]`): ``log q`` at the divergence's temperature (read
            without gradient).
        floor (`float`): lower bound of every target log-probability (keeps the divergence finite where the teacher's
            tail is empty).
        valid (`torch.BoolTensor` of shape `[..., K]`, *optional*): the slots that hold a token of the ``V``
            (`no_token_slots`); the others are not in the top-K, and their mass must be in `log_tail`.

    Returns:
        `torch.Tensor` of shape `[..., V]`, in `student_log_probs`' dtype.
    """
    student = student_log_probs.detach()
    ids = ids.long()
    if valid is None:
        in_top = torch.zeros_like(student, dtype=torch.bool).scatter_(-1, ids, True)
    else:  # a count of the real slots at each id (the slots that are no token add 0 at id 0)
        ids = _slots_in_range(ids, valid)
        in_top = torch.zeros_like(student).scatter_add_(-1, ids, valid.to(student.dtype)) > 0
    log_student_tail = torch.logsumexp(student.masked_fill(in_top, float("-inf")), dim=-1, keepdim=True)
    # where the student's tail is empty (K covers the vocabulary) every token is overwritten by the scatter below
    spread = (
        log_tail.to(student.dtype).unsqueeze(-1) + student - log_student_tail.clamp_min(torch.finfo(student.dtype).min)
    )
    spread = torch.nan_to_num(spread, nan=floor, neginf=floor).clamp_min(floor)
    values = values.to(student.dtype).clamp_min(floor)
    if valid is None:
        return spread.scatter(-1, ids, values)
    # the top-K's values over -inf at their ids; a slot that is no token writes -inf (amax: changes nothing)
    values = torch.where(valid, values, float("-inf"))
    return spread.masked_fill(in_top, float("-inf")).scatter_reduce(-1, ids, values, reduce="amax")


def weighted_generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``w_t * D_beta(p_t^tau, q_t^tau)`` at every position, no reduction.

    With all weights 1 this is `GKDTrainer.generalized_jsd_loss(..., reduction="none").sum(-1)` bit for bit (for
    half-precision logits, computed in float32 here: see `jsd_log_probs`). Positions with weight 0 contribute exactly 0
    to the value and the gradient (as long as the logits are finite).

    Args:
        student_logits (`torch.Tensor` of shape `[B, T, V]`): student logits ``z^S``.
        teacher_logits (`torch.Tensor` of shape `[B, T, V]`): teacher logits ``z^T`` (no gradient is needed).
        weights (`torch.Tensor` of shape `[B, T]`): ``w_t``; 0 on masked positions.
        beta (`float`): generalized JSD interpolation in ``[0, 1]``.
        temperature (`float`): softmax temperature ``tau`` applied to both logits.

    Returns:
        `torch.Tensor` of shape `[B, T]`.
    """
    return weighted_jsd_from_log_probs(
        jsd_log_probs(student_logits, temperature), jsd_log_probs(teacher_logits, temperature), weights, beta=beta
    )


def normalize_loss(
    weighted: torch.Tensor,
    weights: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    normalize: str = "tokens",
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Reduce the per-position weighted divergence of one micro-batch to the scalar that is back-propagated.

    ``"tokens"``: ``sum_t w_t D_t / N`` with ``N`` the number of completion tokens. With gradient accumulation ``N``
    is ``num_items_in_batch``, the completion-token count of the whole accumulation window (counted after on-policy
    generation), so k micro-batches of size b give the same gradient as one batch of size k*b.

    ``"accepted"``: ``sum_t w_t D_t / max(1, sum_t w_t)`` within the micro-batch (each accepted token weighs like a
    GKD token). Its denominator depends on the gate, which is only known after the forward pass, so across an
    accumulation window the micro-batches are combined by their share of completion tokens:
    ``(n_micro / num_items_in_batch) * loss_micro``.

    A micro-batch with nothing accepted gives 0 with a zero gradient, never NaN.

    Only sums of the three tensors are taken, so any shapes work: the chunked path passes its scalar sum and ``[N]``
    vectors.

    Args:
        weighted (`torch.Tensor` of shape `[B, T]`): output of `weighted_generalized_jsd`.
        weights (`torch.Tensor` of shape `[B, T]`): ``w_t`` (0 off the completion).
        completion_mask (`torch.BoolTensor` of shape `[B, T]`): completion positions.
        normalize (`str`): ``"tokens"`` or ``"accepted"``.
        num_items_in_batch (`torch.Tensor` or `int`, *optional*): completion tokens in the accumulation window (per
            process); ``None`` means this micro-batch alone.

    Returns:
        `torch.Tensor`: scalar loss.
    """
    n_micro = completion_mask.sum()
    window = loss_denominator(completion_mask, num_items_in_batch).to(weighted.dtype)
    if normalize == "tokens":
        return weighted.sum() / window
    if normalize == "accepted":
        per_micro = weighted.sum() / weights.sum().to(weighted.dtype).clamp(min=1)
        return per_micro * n_micro.to(weighted.dtype) / window
    raise ValueError(f"normalize_loss: normalize={normalize!r} is not supported; use one of {NORMALIZATIONS}.")


def loss_denominator(completion_mask: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    """``N`` of ``gate_normalize="tokens"``: the window's completion tokens, or the micro-batch's when not given."""
    if num_items_in_batch is None:
        window = completion_mask.sum()
    else:
        window = torch.as_tensor(num_items_in_batch, device=completion_mask.device)
    return window.float().clamp(min=1)


def policy_gradient_loss(
    logprobs: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, *, denominator: torch.Tensor | float
) -> torch.Tensor:
    """REINFORCE with a mean baseline: ``-sum_t (r_t - b) log q(x_t) / N`` over the positions in ``mask``.

    ``b`` is the mean reward over ``mask`` (the micro-batch's gated on-policy tokens), a baseline that lowers the
    variance without biasing the gradient much at the usual batch sizes; a micro-batch whose rewards are all equal
    gives 0. Only ``logprobs`` carries a gradient.

    Args:
        logprobs (`torch.Tensor` of shape `[B, T]`): ``log q(x_t)`` of the sampled tokens under the sampling policy.
        rewards (`torch.Tensor` of shape `[B, T]`): ``r_t`` (the gate's accept bits).
        mask (`torch.BoolTensor` of shape `[B, T]`): positions that were sampled and gated.
        denominator: ``N``, as in `loss_denominator`.

    Returns:
        `torch.Tensor`: scalar loss.
    """
    mask = mask.bool()
    rewards = rewards.to(logprobs.dtype)
    baseline = (rewards * mask).sum() / mask.sum().clamp(min=1)
    advantage = (rewards - baseline).detach()
    return -torch.where(mask, advantage * logprobs, 0.0).sum() / denominator


@dataclass
class LossTerms:
    """What a loss path (eager or chunked, either trainer) hands to the reduction, with the same shapes on every path.

    Attributes:
        weighted_sum (`torch.Tensor`): ``sum_t w_t D_t`` over the micro-batch, a differentiable scalar.
        accepted (`torch.BoolTensor` of shape `[B, T]`): the accept mask: the teacher's verdicts where gated, True on
            the other completion positions, False off the completion.
        sampled_log_probs (`Callable[[], torch.Tensor]`): gives ``log q_tau(x_t)`` `[B, T]` of the sampled tokens
            (differentiable; 0 where not computed), called only when the reward term is on.
        outputs (`Any`): the student's model outputs (returned by `compute_loss(..., return_outputs=True)`).
    """

    weighted_sum: torch.Tensor
    accepted: torch.Tensor
    sampled_log_probs: Callable[[], torch.Tensor]
    outputs: Any = None


def gated_loss(
    terms: LossTerms,
    *,
    weights: torch.Tensor,
    completion: torch.Tensor,
    sampled: torch.Tensor,
    kd_coef: float,
    reward_coef: float,
    normalize: str,
    num_items_in_batch: torch.Tensor | int | None,
) -> torch.Tensor:
    """A micro-batch's loss: ``kd_coef`` times the weighted divergence normalized for the accumulation window
    (`normalize_loss`), plus ``reward_coef`` times the REINFORCE term on the accept bits of the sampled positions
    (`policy_gradient_loss`) when there are any.

    Args:
        terms (`LossTerms`): the loss path's terms.
        weights (`torch.Tensor` of shape `[B, T]`): ``w_t`` (0 off the completion; only their sum is read).
        completion (`torch.BoolTensor` of shape `[B, T]`): the completion positions.
        sampled (`torch.BoolTensor` of shape `[B, T]`): the gated positions whose tokens the student sampled.
        kd_coef (`float`), reward_coef (`float`): the two terms' weights.
        normalize (`str`): ``"tokens"`` or ``"accepted"`` (`normalize_loss`).
        num_items_in_batch: completion tokens of the accumulation window (`None`: this micro-batch's).

    Returns:
        `torch.Tensor`: scalar loss.
    """
    loss = kd_coef * normalize_loss(
        terms.weighted_sum, weights, completion, normalize=normalize, num_items_in_batch=num_items_in_batch
    )
    if reward_coef > 0 and sampled.any():
        # the accept bit is the teacher's reward for the sampled token: a REINFORCE step on it
        loss = loss + reward_coef * policy_gradient_loss(
            terms.sampled_log_probs(),
            terms.accepted,
            sampled,
            denominator=loss_denominator(completion, num_items_in_batch),
        )
    return loss


def sampled_log_probs(
    student_log_probs: torch.Tensor, student_logits: torch.Tensor, ids: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``log q_tau(x_t)`` of the sampled tokens, differentiable: the reward term's log-probabilities.

    Args:
        student_log_probs (`torch.Tensor` of shape `[B, T, V]`): the student's log-probabilities at temperature 1
            (reused when `temperature` is 1).
        student_logits (`torch.Tensor` of shape `[B, T, V]`): the student's logits.
        ids (`torch.LongTensor` of shape `[B, T]`): the sampled tokens ``x_t``.
        temperature (`float`): the sampling temperature ``tau``.

    Returns:
        `torch.Tensor` of shape `[B, T]`.
    """
    logprobs = student_log_probs
    if temperature != 1.0:
        logprobs = jsd_log_probs(student_logits, temperature)
    return logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def sampled_log_probs_from_hidden(
    hidden: torch.Tensor, head: OutputLayer, ids: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``log q_tau(x)`` of `ids` from the student's final hidden states, tile by tile over the vocabulary (TRL's
    `ChunkedLogProbFunction`), differentiable: the reward term's log-probabilities without `[N, V]` logits.

    Args:
        hidden (`torch.Tensor` of shape `[N, H]`): the student's final hidden states.
        head (`OutputLayer`): the student's output layer.
        ids (`torch.LongTensor` of shape `[N]`): the sampled tokens.
        temperature (`float`): the sampling temperature.

    Returns:
        `torch.Tensor` of shape `[N]`.
    """
    return ChunkedLogProbFunction.apply(
        hidden, head.weight, head.bias, ids, temperature, VOCAB_TILE, head.softcap, head.logit_scale, ()
    )[0]


class OutputLayer(Protocol):
    """What the chunked loss reads of a model's output layer: ``logits = transform(project(h))``. `models.OutputHead`
    is the one implementation (`models.output_head` reads it from a model)."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    logit_scale: float
    softcap: float | None

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ W.T + b`` in float32, shape `[n, V]`."""
        ...

    @property
    def transforms(self) -> bool:
        """Whether `transform` changes the logits."""
        ...

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """The logit scale and softcap, applied to projected logits (differentiable)."""
        ...


ChunkFn = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]
TargetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SparseTeacher:
    """A teacher known only by its top-K tokens and tail mass at each position (a teacher cache, a teacher server).

    Attributes:
        ids (`torch.LongTensor` of shape `[..., K]`), values (`torch.Tensor` of shape `[..., K]`), log_tail
            (`torch.Tensor` of shape `[...]`): as `teacher_top_k` returns them (any integer or float dtype).
        vocab_size (`int`): ``V``.
        valid (`torch.BoolTensor` of shape `[..., K]`, *optional*): the slots that hold a token of the ``V``
            (`no_token_slots`: a teacher server may list ids past the student's vocabulary); `None`: all do.
    """

    ids: torch.Tensor
    values: torch.Tensor
    log_tail: torch.Tensor
    vocab_size: int
    valid: torch.Tensor | None = None

    def log_probs(self, rows: Any = slice(None)) -> torch.Tensor:
        """`[n, V]` (or `[..., V]`) log-probabilities the gate reads (`sparse_log_probs`) at `rows`."""
        return sparse_log_probs(self.ids[rows], self.values[rows], self.vocab_size, valid=self._valid(rows))

    def target(
        self, log_probs: torch.Tensor, student_log_probs: torch.Tensor, rows: Any = slice(None)
    ) -> torch.Tensor:
        """The divergence's target at `rows` (`tail_bucket_target`: the top-K + tail-bucket divergence)."""
        return tail_bucket_target(
            self.ids[rows], self.values[rows], self.log_tail[rows], student_log_probs, valid=self._valid(rows)
        )

    def _valid(self, rows: Any) -> torch.Tensor | None:
        return None if self.valid is None else self.valid[rows]


def sparse_teacher_from_hidden(
    hidden: torch.Tensor,
    head: OutputLayer,
    top_k_of: Callable[[torch.Tensor], SparseTeacher],
    *,
    chunk_size: int = 256,
    temperature: float = 1.0,
) -> SparseTeacher:
    """A live teacher's sparse view at `N` positions from its final hidden states, for the chunked loss: its logits
    projected `chunk_size` rows at a time (never `[N, V]` at once), normalized (`jsd_log_probs`) and cut by
    `top_k_of` (e.g. `teacher_cache.TeacherCache.live`: the cache's top-K + tail, as stored).

    Args:
        hidden (`torch.Tensor` of shape `[N, H]`): the teacher's final hidden states (read without gradient).
        head (`OutputLayer`): the teacher's output layer (``V`` rows).
        top_k_of (`Callable`): ``top_k_of(log_probs [n, V]) -> SparseTeacher [n, K]``.
        chunk_size (`int`): rows of logits projected at a time.
        temperature (`float`): softmax temperature of the log-probabilities.

    Returns:
        A `SparseTeacher` of shape `[N, K]`.
    """
    teacher = _HiddenTeacher(hidden.detach(), head, temperature)
    with torch.no_grad():
        parts = [
            top_k_of(teacher.log_probs(slice(start, start + chunk_size)))
            for start in range(0, max(hidden.size(0), 1), chunk_size)  # (one empty chunk when N = 0)
        ]
    return SparseTeacher(
        torch.cat([p.ids for p in parts]),
        torch.cat([p.values for p in parts]),
        torch.cat([p.log_tail for p in parts]),
        head.weight.size(0),
    )


@dataclass
class _HiddenTeacher:
    """A live teacher in the chunked loss: its final hidden states, projected a chunk of rows at a time."""

    hidden: torch.Tensor  # [N, H_t]
    head: OutputLayer
    temperature: float

    def log_probs(self, rows: slice) -> torch.Tensor:
        return jsd_log_probs(self.head.transform(self.head.project(self.hidden[rows])), self.temperature)

    def target(self, log_probs: torch.Tensor, student_log_probs: torch.Tensor, rows: slice) -> torch.Tensor:
        return log_probs


class _ChunkedWeightedJSD(torch.autograd.Function):
    """``sum_t w_t D_beta(p_t, q_t)`` over chunks of tokens, its gradient taken chunk by chunk in the forward pass."""

    @staticmethod
    def forward(
        ctx,
        student_hidden: torch.Tensor,  # [N, H_s]
        student_weight: torch.Tensor,  # [V, H_s]
        student_bias: torch.Tensor | None,
        teacher: SparseTeacher | _HiddenTeacher,
        student_head: OutputLayer,
        chunk_fn: ChunkFn,
        weight_of: Callable[[torch.Tensor], torch.Tensor] | None,
        target_of: TargetFn | None,
        beta: float,
        temperature: float,
        chunk_size: int,
        grad_enabled: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # `needs_input_grad` follows `requires_grad` even under `torch.no_grad()` (evaluation): no gradient work there
        needs_hidden, needs_weight, needs_bias = (grad_enabled and needs for needs in ctx.needs_input_grad[:3])
        needs_grad = needs_hidden or needs_weight or needs_bias
        n_rows = student_hidden.size(0)
        device = student_hidden.device
        total = torch.zeros((), device=device, dtype=torch.float32)
        values = []  # chunk_fn's outputs, [n] per chunk
        grad_hidden = torch.zeros(student_hidden.shape, device=device, dtype=torch.float32) if needs_hidden else None
        grad_weight = torch.zeros(student_weight.shape, device=device, dtype=torch.float32) if needs_weight else None
        grad_bias = torch.zeros(student_bias.shape, device=device, dtype=torch.float32) if needs_bias else None
        for start in range(0, n_rows, chunk_size):
            rows = slice(start, min(start + chunk_size, n_rows))
            hidden = student_hidden[rows]
            teacher_log_probs = teacher.log_probs(rows)
            raw = student_head.project(hidden)
            transforms = needs_grad and student_head.transforms
            with torch.set_grad_enabled(transforms):  # autograd only through the logit scale / softcap
                logits = student_head.transform(raw.requires_grad_(transforms))
            student_log_probs = jsd_log_probs(logits.detach(), temperature)
            chunk_values = chunk_fn(student_log_probs, teacher_log_probs, rows)
            values.append(chunk_values)
            chunk_weights = (chunk_values if weight_of is None else weight_of(chunk_values)).to(torch.float32)
            target = teacher.target(teacher_log_probs, student_log_probs, rows)
            if target_of is not None:  # the divergence's target from the chunk's values (target filtering)
                target = target_of(teacher_log_probs, chunk_values, target)
            teacher_log_probs = target
            # D_t and dD_t/d logits in closed form (autograd through the divergence's operations was most of the time)
            divergence, grad_logits = generalized_jsd_and_logit_grad(
                student_log_probs, teacher_log_probs, beta=beta, grad=needs_grad
            )
            chunk_loss = divergence * chunk_weights.to(divergence.dtype)
            total += chunk_loss.sum()
            if not needs_grad:
                continue
            grad_logits *= (chunk_weights / temperature).to(grad_logits.dtype).unsqueeze(-1)
            if transforms:
                (grad_logits,) = torch.autograd.grad(logits, raw, grad_logits)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits.to(student_weight.dtype) @ student_weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), hidden.float())
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
            del teacher_log_probs, raw, logits, student_log_probs, grad_logits, chunk_loss
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype, None if student_bias is None else student_bias.dtype)
        values = torch.cat(values) if values else torch.zeros(0, device=device, dtype=torch.float32)
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, _grad_weights: torch.Tensor | None):
        grads = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            grads.append(None if grad is None else (grad * grad_total).to(dtype))
        return (*grads[:2], grads[2], None, None, None, None, None, None, None, None, None)


def chunked_weighted_jsd(
    student_hidden: torch.Tensor,
    student_head: OutputLayer,
    teacher_hidden: torch.Tensor | SparseTeacher,
    teacher_head: OutputLayer | None,
    chunk_fn: ChunkFn,
    *,
    weight_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
    target_of: TargetFn | None = None,
    beta: float,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_t w_t D_beta(p_t, q_t)`` from hidden states, never holding more than ``chunk_size`` rows of logits.

    For each chunk of rows, both models' logits are projected through their output layers and normalized
    (`jsd_log_probs`), ``chunk_fn`` turns the log-probabilities into per-row values (the gate's verdicts, or the
    weights themselves) and ``weight_of`` the values into the loss weights, and the divergence and its
    gradient with respect to the logits come in closed form (`generalized_jsd_and_logit_grad`: the values of the
    eager path's `weighted_jsd_from_log_probs` to float round-off, without autograd through its operations). The
    gradients with respect to the student's hidden states, output weight and bias are accumulated in float32 and
    returned by the backward pass, so the chunk's logits are freed before the next chunk starts. Peak extra memory:
    a few ``[chunk_size, V]`` float32 tensors plus the ``[N, H]`` gradient (and a ``[V, H]`` one when the student's
    output layer is trained). The teacher gets no gradient.

    Args:
        student_hidden (`torch.Tensor` of shape `[N, H_s]`): the student's final hidden states (after the last norm).
        student_head (`OutputLayer`): the student's output layer; its weight and bias get gradients if they require
            them.
        teacher_hidden (`torch.Tensor` of shape `[N, H_t]`): the teacher's final hidden states at the same positions;
            or a `SparseTeacher` of shape `[N, K]` (a teacher cache's rows): its `sparse_log_probs` are what
            ``chunk_fn`` reads and its `tail_bucket_target` the divergence's target (the top-K + tail divergence).
        teacher_head (`OutputLayer`): the teacher's output layer (same vocabulary ``V``); `None` with a
            `SparseTeacher`.
        chunk_fn (`Callable`): ``chunk_fn(student_log_probs [n, V], teacher_log_probs [n, V], rows: slice) -> [n]``,
            a pure function of the chunk's (detached) log-probabilities at ``temperature``: per-row values, e.g. the
            gate's verdicts.
        weight_of (`Callable`, *optional*): ``weight_of(values [n]) -> [n]``, the loss weights ``w_t`` of the
            chunk's rows from ``chunk_fn``'s values; by default the values are the weights.
        target_of (`Callable`, *optional*): ``target_of(teacher_log_probs [n, V], values [n], target [n, V]) ->
            [n, V]``, the divergence's target from the teacher's log-probabilities, ``chunk_fn``'s values and the
            unfiltered target (target filtering); by default the unfiltered target (the teacher's log-probabilities,
            or a `SparseTeacher`'s tail-bucket target).
        beta (`float`): generalized JSD interpolation in ``[0, 1]``.
        temperature (`float`): softmax temperature of the divergence.
        chunk_size (`int`): rows of logits projected at a time.

    Returns:
        A scalar: ``sum_t w_t D_t`` (differentiable), and ``chunk_fn``'s values of shape `[N]`, in row order (not
        differentiable).
    """
    if chunk_size < 1:
        raise ValueError(f"chunked_weighted_jsd: chunk_size={chunk_size} must be >= 1.")
    if isinstance(teacher_hidden, SparseTeacher):
        teacher, teacher_vocab = teacher_hidden, teacher_hidden.vocab_size
    else:
        teacher = _HiddenTeacher(teacher_hidden.detach(), teacher_head, temperature)
        teacher_vocab = teacher_head.weight.size(0)
    if student_head.weight.size(0) != teacher_vocab:
        raise ValueError(
            f"chunked_weighted_jsd: the student's output layer has {student_head.weight.size(0)} rows and the "
            f"teacher's {teacher_vocab}; both models need the same vocabulary."
        )
    return _ChunkedWeightedJSD.apply(
        student_hidden,
        student_head.weight,
        student_head.bias,
        teacher,
        student_head,
        chunk_fn,
        weight_of,
        target_of,
        beta,
        temperature,
        chunk_size,
        torch.is_grad_enabled(),
    )
