"""The speculative accept/reject gate: proposals, accept masks and their statistics.

At every completion position ``t`` the student *proposes* a token ``x_t`` and the teacher *verifies* it, like the
verify step of speculative decoding. All functions here are pure tensor functions (no model, no trainer state), so
they can be tested against slow loop references and reused outside the trainer.

Shapes: ``B`` batch, ``T`` positions, ``V`` vocabulary.
"""

from __future__ import annotations

import torch


GATES = ("topk", "spec", "none")


def _uniform(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """U(0, 1) draws of ``shape`` on ``device``, taken from ``generator`` (which may live on another device)."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def propose(
    student_logits: torch.Tensor,
    *,
    mode: str = "greedy",
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """The student's own proposal at each position of a teacher-forced (dataset or ``seq_kd``) sequence.

    Args:
        student_logits (`torch.Tensor` of shape `[B, T, V]`): student next-token logits at temperature 1.
        mode (`str`): ``"greedy"`` takes ``argmax q_t``; ``"sample"`` draws ``x_t ~ softmax(student_logits)``
            with ``generator`` (inverse-CDF sampling, so a seeded generator gives reproducible proposals).
        generator (`torch.Generator`, *optional*): source of randomness for ``"sample"``.
        uniforms (`torch.Tensor` of shape `[B, T]`, *optional*): U(0, 1) draws to use for ``"sample"`` instead of
            drawing from ``generator`` (the chunked loss draws them once for the whole batch and slices them).

    Returns:
        `torch.LongTensor` of shape `[B, T]`: the proposed token ids.
    """
    if mode == "greedy":
        return student_logits.argmax(dim=-1)
    if mode == "sample":
        probs = torch.softmax(student_logits.float(), dim=-1)
        cdf = probs.cumsum(dim=-1)
        if uniforms is None:
            uniforms = _uniform(cdf.shape[:-1], cdf.device, generator)
        u = uniforms.to(cdf.device, cdf.dtype).unsqueeze(-1) * cdf[..., -1:]
        # first index whose cumulative probability exceeds u (never a zero-probability token); the clamp guards the
        # float round-off at the end of the CDF
        return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=student_logits.size(-1) - 1)
    raise ValueError(f"propose: mode={mode!r} is not supported; use 'greedy' or 'sample'.")


def teacher_rank(teacher_logits: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
    """0-based rank of each proposal under the teacher, ties broken toward the lower token id.

    The rank is the number of tokens that a stable descending sort puts before ``x_t``: tokens with a strictly larger
    logit, plus tokens with an equal logit and a smaller id. ``rank < k`` is therefore "``x_t`` is in the teacher's
    top-k", with ties at the boundary resolved like a stable sort. ``torch.topk`` leaves the order of ties unspecified
    (it differs between CPU and CUDA and with ``k``), so the gate does not use it: the same logits give the same
    verdict on every device. Only ``[B, T, V]`` comparisons are made; no sort.

    Args:
        teacher_logits (`torch.Tensor` of shape `[B, T, V]`): teacher next-token logits.
        proposals (`torch.LongTensor` of shape `[B, T]`): proposed token ids.

    Returns:
        `torch.LongTensor` of shape `[B, T]`.
    """
    proposed_logit = teacher_logits.gather(-1, proposals.unsqueeze(-1))  # [B, T, 1]
    vocab_ids = torch.arange(teacher_logits.size(-1), device=teacher_logits.device)
    ahead = (teacher_logits > proposed_logit) | (
        (teacher_logits == proposed_logit) & (vocab_ids < proposals[..., None])
    )
    return ahead.sum(dim=-1)


def accept_mask(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    proposals: torch.Tensor,
    mask: torch.Tensor,
    *,
    gate: str,
    top_k: int = 5,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    normalized: bool = False,
) -> torch.BoolTensor:
    """The teacher's verdict ``a_t`` on the student's proposals.

    - ``"topk"``: accept iff ``x_t`` is among the teacher's ``top_k`` most likely tokens (see `teacher_rank` for ties).
    - ``"spec"``: accept with probability ``min(1, p_t(x_t) / q_t(x_t))``, speculative sampling's acceptance rule,
      i.e. iff ``u_t < p_t(x_t) / q_t(x_t)`` with ``u_t ~ U(0, 1)`` from ``generator``. When ``x_t ~ q_t`` the
      expected acceptance is ``1 - TV(p_t, q_t)``.
    - ``"none"``: accept everywhere (plain GKD).

    ``q_t = softmax(student_logits)`` must be the distribution the proposal was actually drawn from, so scale the
    student logits before calling: for on-policy tokens divide by the generation temperature; for proposals drawn by
    `propose` pass them at temperature 1. ``p_t = softmax(teacher_logits)`` is the teacher at temperature 1. A
    mismatch silently biases the acceptance rate. ``student_logits`` is only read for ``"spec"``.

    Log-probabilities may be passed in place of logits (the verdicts are the same: ranks do not change, and
    ``log_softmax`` of log-probabilities is the identity); with ``normalized=True`` the ``"spec"`` rule then reads
    ``log p(x_t)`` and ``log q(x_t)`` directly instead of normalizing both ``[B, T, V]`` tensors again.

    Args:
        student_logits (`torch.Tensor` of shape `[B, T, V]`): logits of the proposal distribution ``q``.
        teacher_logits (`torch.Tensor` of shape `[B, T, V]`): teacher logits (``p``).
        proposals (`torch.LongTensor` of shape `[B, T]`): proposed token ids ``x_t``.
        mask (`torch.BoolTensor` of shape `[B, T]`): positions to gate (completion positions).
        gate (`str`): ``"topk"``, ``"spec"`` or ``"none"``.
        top_k (`int`): ``k`` for ``"topk"``.
        generator (`torch.Generator`, *optional*): source of ``u_t`` for ``"spec"``; seed it for reproducibility.
        uniforms (`torch.Tensor` of shape `[B, T]`, *optional*): the ``u_t`` to use for ``"spec"`` instead of drawing
            them from ``generator``.
        normalized (`bool`): both ``student_logits`` and ``teacher_logits`` are log-probabilities (``log_softmax``
            outputs, e.g. the divergence's own).

    Returns:
        `torch.BoolTensor` of shape `[B, T]`: ``True`` where accepted; always ``False`` where ``mask`` is ``False``.
    """
    mask = mask.bool()
    proposals = proposals.long()
    if gate == "none":
        return mask.clone()
    if gate == "topk":
        if top_k < 1:
            raise ValueError(f"accept_mask: top_k={top_k} must be >= 1.")
        if top_k >= teacher_logits.size(-1):
            return mask.clone()
        # One pass: the k-th largest teacher logit is the threshold (its value is well defined even where torch.topk's
        # order of ties is not). Above it: accepted, below: rejected; only a proposal whose logit equals it needs
        # the exact tie-broken rank.
        proposed = teacher_logits.gather(-1, proposals.unsqueeze(-1)).squeeze(-1)
        threshold = teacher_logits.topk(top_k, dim=-1).values[..., -1]
        accepted = proposed > threshold
        tied = proposed == threshold
        if tied.any():
            accepted[tied] = teacher_rank(teacher_logits[tied], proposals[tied]) < top_k
        return accepted & mask
    if gate == "spec":
        idx = proposals.unsqueeze(-1)
        if normalized:
            log_p = teacher_logits.gather(-1, idx).squeeze(-1).float()
            log_q = student_logits.gather(-1, idx).squeeze(-1).float()
        else:  # (a fused log-softmax then a gather is faster on CPU than z(x) - logsumexp(z))
            log_p = torch.log_softmax(teacher_logits.float(), dim=-1).gather(-1, idx).squeeze(-1)
            log_q = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, idx).squeeze(-1)
        u = _uniform(proposals.shape, proposals.device, generator) if uniforms is None else uniforms.to(log_p.device)
        # u < p/q  <=>  log u < log p - log q; u = 0 (log u = -inf) is always accepted, like u < min(1, p/q)
        return (torch.log(u) < log_p - log_q) & mask
    raise ValueError(f"accept_mask: gate={gate!r} is not supported; use one of {GATES}.")


def sequence_rewards(accepted: torch.Tensor, gated: torch.Tensor) -> torch.Tensor:
    """Per-sequence binary-reward mean: the share of gated positions the teacher accepted.

    Args:
        accepted (`torch.BoolTensor` of shape `[B, T]`): ``a_t``.
        gated (`torch.BoolTensor` of shape `[B, T]`): positions that went through the gate.

    Returns:
        `torch.Tensor` of shape `[B']`: mean reward of each sequence that has at least one gated position.
    """
    counts = gated.sum(dim=-1)
    rewards = (accepted & gated).sum(dim=-1).float() / counts.clamp(min=1)
    return rewards[counts > 0]
