"""The reduction: a micro-batch's weighted divergence and REINFORCE term to the scalar that is back-propagated.

A loss path (eager or chunked, any trainer) hands its `LossTerms` to `gated_loss`: ``kd_coef`` times the weighted
divergence normalized for the accumulation window (`normalize_loss`: per completion token, or per accepted token,
``gate_normalize``, resolved into a `Normalization`), plus ``reward_coef`` times a REINFORCE term on the gate's accept bits of the student's sampled
tokens (`policy_gradient_loss`), whose log-probabilities come from full logits (`sampled_log_probs`) or from hidden
states, tile by tile over the vocabulary (`sampled_log_probs_from_hidden`).

Shapes: ``B`` batch, ``T`` positions, ``V`` vocabulary, ``N`` flattened positions, ``H`` hidden size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from trl.kernels.chunked_logprob import ChunkedLogProbFunction

from .chunked import OutputLayer
from .divergence import jsd_log_probs


VOCAB_TILE = 8192  # vocabulary columns per tile of the chunked log-probabilities (reward term)


class Normalization:
    """The loss denominator of `gate_normalize`: one object per value (`NORMALIZATION_MODES`), asked by `normalize_loss`
    instead of its name.

    Attributes:
        name (`str`): the value of `gate_normalize` that selects it.
    """

    name: ClassVar[str]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def normalize(
        self, weighted: torch.Tensor, weights: torch.Tensor, n_micro: torch.Tensor, window: torch.Tensor
    ) -> torch.Tensor:
        """The scalar loss from ``sum_t w_t D_t`` (`weighted`), the weights, the micro-batch's completion tokens
        `n_micro` and the accumulation window's `window` (see `normalize_loss`)."""
        raise NotImplementedError


class TokenNormalization(Normalization):
    """``"tokens"``: ``sum_t w_t D_t / N``, ``N`` the window's completion tokens."""

    name = "tokens"

    def normalize(self, weighted, weights, n_micro, window):
        return weighted.sum() / window


class AcceptedNormalization(Normalization):
    """``"accepted"``: ``sum_t w_t D_t / max(1, sum_t w_t)`` per micro-batch, weighted by its share of the window."""

    name = "accepted"

    def normalize(self, weighted, weights, n_micro, window):
        per_micro = weighted.sum() / weights.sum().to(weighted.dtype).clamp(min=1)
        return per_micro * n_micro.to(weighted.dtype) / window


NORMALIZATION_MODES: dict[str, Normalization] = {n.name: n for n in (TokenNormalization(), AcceptedNormalization())}
NORMALIZATIONS = tuple(NORMALIZATION_MODES)  # the names, for config choices: ("tokens", "accepted")


def get_normalization(normalize: str | Normalization) -> Normalization:
    """The `Normalization` named `normalize` (a key of `NORMALIZATION_MODES`); a `Normalization` as it is."""
    if isinstance(normalize, Normalization):
        return normalize
    if normalize not in NORMALIZATION_MODES:
        raise ValueError(f"normalize_loss: normalize={normalize!r} is not supported; use one of {NORMALIZATIONS}.")
    return NORMALIZATION_MODES[normalize]


def normalize_loss(
    weighted: torch.Tensor,
    weights: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    normalize: str | Normalization = "tokens",
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
        normalize (`str` or `Normalization`): ``"tokens"`` or ``"accepted"``.
        num_items_in_batch (`torch.Tensor` or `int`, *optional*): completion tokens in the accumulation window (per
            process); ``None`` means this micro-batch alone.

    Returns:
        `torch.Tensor`: scalar loss.
    """
    n_micro = completion_mask.sum()
    window = loss_denominator(completion_mask, num_items_in_batch).to(weighted.dtype)
    return get_normalization(normalize).normalize(weighted, weights, n_micro, window)


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
    normalize: Normalization,
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
        normalize (`Normalization`): the loss denominator (`normalize_loss`).
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
