"""Per-position weighted generalized JSD and its normalization.

The divergence itself is TRL's: `GKDTrainer.generalized_jsd_loss` with ``reduction="none"`` returns the element-wise
terms ``[B, T, V]``; summing over the vocabulary gives the per-position divergence ``D_beta(p_t, q_t)`` that SpecKD
weights. Reusing it keeps ``gate="none"`` bit-for-bit equal to GKD (beta=0 forward KL(p||q), beta=1 reverse KL(q||p),
otherwise the JSD through the mixture ``beta * p + (1 - beta) * q``).

Shapes: ``B`` batch, ``T`` positions, ``V`` vocabulary.
"""

from __future__ import annotations

import torch
from trl.experimental.gkd import GKDTrainer


NORMALIZATIONS = ("tokens", "accepted")


def weighted_generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``w_t * D_beta(p_t^tau, q_t^tau)`` at every position, no reduction.

    Positions with weight 0 contribute exactly 0 to the value and the gradient (as long as the logits are finite).

    Args:
        student_logits (`torch.Tensor` of shape `[B, T, V]`): student logits ``z^S``.
        teacher_logits (`torch.Tensor` of shape `[B, T, V]`): teacher logits ``z^T`` (no gradient is needed).
        weights (`torch.Tensor` of shape `[B, T]`): ``w_t``; 0 on masked positions.
        beta (`float`): generalized JSD interpolation in ``[0, 1]``.
        temperature (`float`): softmax temperature ``tau`` applied to both logits.

    Returns:
        `torch.Tensor` of shape `[B, T]`.
    """
    per_vocab = GKDTrainer.generalized_jsd_loss(
        student_logits, teacher_logits, labels=None, beta=beta, temperature=temperature, reduction="none"
    )
    return per_vocab.sum(dim=-1) * weights.to(per_vocab.dtype)


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
    window = n_micro if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=weighted.device)
    window = window.to(weighted.dtype).clamp(min=1)
    if normalize == "tokens":
        return weighted.sum() / window
    if normalize == "accepted":
        per_micro = weighted.sum() / weights.sum().to(weighted.dtype).clamp(min=1)
        return per_micro * n_micro.to(weighted.dtype) / window
    raise ValueError(f"normalize_loss: normalize={normalize!r} is not supported; use one of {NORMALIZATIONS}.")
