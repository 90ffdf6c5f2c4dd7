"""The divergence: GKD's generalized JSD per position, its closed-form gradient, and target filtering.

The divergence is TRL's: the element-wise terms ``[B, T, V]`` of `GKDTrainer.generalized_jsd_loss` with
``reduction="none"``; summing over the vocabulary gives the per-position divergence ``D_beta(p_t, q_t)`` that SpecKD
weights (beta=0 forward KL(p||q), beta=1 reverse KL(q||p), otherwise the JSD through the mixture
``beta * p + (1 - beta) * q``). TRL's function is split in two here, its ``log_softmax`` (`jsd_log_probs`) and the
rest (`generalized_jsd_from_log_probs`), each the same operations as TRL's, so that the gate reads ``log p(x_t)`` and
``log q(x_t)`` from the divergence's own log-probabilities instead of normalizing ``[B, T, V]`` logits again; a test
keeps the per-position divergence (values and gradients) bit for bit TRL's for float32 and float64 logits.

- the eager loss (`weighted_generalized_jsd`, `weighted_jsd_from_log_probs`): ``w_t D_beta(p_t, q_t)`` from full
  ``[B, T, V]`` logits or log-probabilities, exactly as GKD, autograd through every operation;
- the chunked loss's divergence (`generalized_jsd_and_logit_grad`): the same values to float round-off and their
  gradient with respect to the student's logits in closed form (as fused linear-cross-entropy kernels do), so that
  no chunk's logits are kept for the backward pass (`losses.chunked_weighted_jsd`);
- target filtering (`top_k_log_probs`): a distribution restricted to its top-k tokens, the target of rejected
  positions with ``reject_target="top_k"``; `RejectTarget` (`REJECT_TARGET_MODES`) is ``reject_target`` resolved,
  the target of rejected positions that the gate asks for.

Shapes: ``B`` batch, ``T`` positions, ``V`` vocabulary.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F


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
    # Each [..., V] temporary is freed or reused in place as soon as it is read (the chunked loss's peak memory is a
    # few of them): the same operations in the same order as written in the docstring, so the same values.
    if beta == 0:
        p = teacher_log_probs.exp()
        gap = (teacher_log_probs - student_log_probs).mul_(p)  # p (t - s)
        divergence = gap.sum(dim=-1)
        del gap
        return divergence, (student_log_probs.exp().sub_(p) if grad else None)  # q - p
    if beta == 1:
        q = student_log_probs.exp()
        log_ratio = student_log_probs - teacher_log_probs
        divergence = (q * log_ratio).sum(dim=-1)
        return divergence, (log_ratio.sub_(divergence.unsqueeze(-1)).mul_(q) if grad else None)
    a = student_log_probs + math.log1p(-beta)
    b = teacher_log_probs + math.log(beta)
    mixture_log_probs = torch.maximum(a, b)
    mixture_log_probs += a.sub_(b).abs_().neg_().exp_().log1p_()  # max(a, b) + log1p(exp(-|a - b|))
    del a, b
    teacher_term = (teacher_log_probs - mixture_log_probs).mul_(teacher_log_probs.exp())  # p (t - m)
    teacher_kl = teacher_term.sum(dim=-1)
    del teacher_term
    log_ratio = student_log_probs.sub(mixture_log_probs)  # s - m
    del mixture_log_probs
    q = student_log_probs.exp()
    kl_student = (q * log_ratio).sum(dim=-1)
    divergence = beta * teacher_kl + (1 - beta) * kl_student
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


class RejectTarget:
    """What a rejected position is distilled toward (`reject_target`): one object per value (`REJECT_TARGET_MODES`),
    asked by the gate (`weighting.GatedBatch.targets`) and the configs instead of its name.

    Attributes:
        name (`str`): the value of `reject_target` that selects it.
        filters (`bool`): whether it changes the target of rejected positions (it then reads the teacher's top-k, needs
            a gate that rejects, and is `SpecKDTrainer`'s only).
    """

    name: ClassVar[str]
    filters: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def targets(
        self, teacher_log_probs: torch.Tensor, accepted: torch.Tensor, target: torch.Tensor, top_k: int
    ) -> torch.Tensor:
        """The divergence's target log-probabilities `[..., V]`: `target` where `accepted` `[...]`, and where rejected
        what this object says (from the teacher's log-probabilities and the step's `top_k`)."""
        return target


class TeacherTarget(RejectTarget):
    """``"teacher"``: rejected positions keep the target of accepted ones (the teacher's distribution)."""

    name = "teacher"


class TopKTarget(RejectTarget):
    """``"top_k"``: rejected positions are distilled toward the teacher's top-k renormalized (`top_k_log_probs`)."""

    name = "top_k"
    filters = True

    def targets(self, teacher_log_probs, accepted, target, top_k):
        filtered = top_k_log_probs(teacher_log_probs, top_k)
        return torch.where(accepted.bool().unsqueeze(-1), target, filtered)


REJECT_TARGET_MODES: dict[str, RejectTarget] = {t.name: t for t in (TeacherTarget(), TopKTarget())}
