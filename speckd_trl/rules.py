"""The gate rules: how the teacher verifies the student's proposals, one class per rule.

At every completion position ``t`` the student *proposes* a token ``x_t`` and the teacher *verifies* it, like the
verify step of speculative decoding. A rule is a `GateRule`: a small class that says whether it accepts a proposal
(`GateRule.accept`), which token the teacher puts in place of a rejected draft during SKD-style generation
(`GateRule.replacement_probs`), and what it needs (the student's probabilities, random numbers, a ``k``). Everything
else asks the rule, the way PEFT's LoRA layers ask their `LoraVariant`: the configs validate ``gate`` against
`GATE_RULES`, the trainers' weighting (`weighting.py`) and SKD generation (`generation.py`) call the rule's methods,
and nothing outside this module compares a rule's name. Adding a rule is one subclass here plus its test (see
CONTRIBUTING.md, "How to add a gate").

The student's own proposal on teacher-forced (dataset, ``seq_kd``) positions is a `Proposal` the same way (`PROPOSALS`:
greedy or sampled), asked by the gate instead of its name.

The functions here are pure tensor functions (no model, no trainer state), tested against slow loop references.

Shapes: ``B`` batch, ``T`` positions, ``V`` vocabulary; a rule's methods take any leading shape ``[...]``.
"""

from __future__ import annotations

from typing import ClassVar

import torch


class GateRule:
    """One gate rule: the teacher's verdict on a student's proposal.

    Subclasses set the class attributes and implement `accept` (and `replacement_probs` when the rule can reject),
    then register with `register_rule`.

    Attributes:
        name (`str`): the value of the configs' ``gate`` field that selects this rule.
        rejects (`bool`): whether the rule can reject a proposal; ``False`` means every proposal is accepted (the
            plain, ungated loss): nothing is verified, drawn or logged as a rejection.
        reads_student (`bool`): whether the verdict reads the student's probability ``q(x_t)`` of the proposal. Then
            ``q`` must be the distribution the proposal was drawn from (the sampling temperature for on-policy
            tokens), and a sampler that filters the distribution (top-p, repetition penalty, ...) biases it.
        draws_uniforms (`bool`): whether the verdict takes one U(0, 1) draw per position (``uniforms``).
        uses_top_k (`bool`): whether the verdict reads ``top_k`` (then it must be below the vocabulary size).
        teacher_reads (`frozenset[str]`): what the verdict reads of the teacher, among `TEACHER_READS`: ``"top_k"``
            (its ``top_k`` most likely tokens, ties toward the lower id, and their log-probabilities), ``"proposal"``
            (its log-probability of the proposed token), ``"full"`` (anything else: its whole distribution, the
            default). A partly known teacher (a teacher cache, a teacher server) serves only the rules whose reads it
            holds (`check_teacher_reads`); declare the least the rule needs.
    """

    name: ClassVar[str]
    rejects: ClassVar[bool] = True
    reads_student: ClassVar[bool] = False
    draws_uniforms: ClassVar[bool] = False
    uses_top_k: ClassVar[bool] = False
    teacher_reads: ClassVar[frozenset[str]] = frozenset({"full"})

    def accept(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        proposals: torch.Tensor,
        *,
        top_k: int,
        uniforms: torch.Tensor | None,
        normalized: bool = False,
    ) -> torch.Tensor:
        """The verdict at every position (no mask: `accept_mask` applies it).

        Args:
            student_logits (`torch.Tensor` of shape `[..., V]`): logits of the distribution ``q`` the proposals were
                drawn from (read only when `reads_student`).
            teacher_logits (`torch.Tensor` of shape `[..., V]`): the teacher's logits ``p`` at temperature 1.
            proposals (`torch.LongTensor` of shape `[...]`): the proposed token ids ``x_t``.
            top_k (`int`): ``k`` (read only when `uses_top_k`).
            uniforms (`torch.Tensor` of shape `[...]`, *optional*): one U(0, 1) draw per position (given exactly when
                `draws_uniforms`).
            normalized (`bool`): both logits are log-probabilities (``log_softmax`` outputs).

        Returns:
            `torch.BoolTensor` of shape `[...]`.
        """
        raise NotImplementedError

    def accept_greedy_drafts(
        self, draft_logits: torch.Tensor, teacher_logits: torch.Tensor, drafts: torch.Tensor, *, top_k: int
    ) -> torch.Tensor:
        """SKD generation with ``do_sample=False``: the verdicts on greedy drafts (``q`` a point mass), `[...]`.

        By default the rule's own `accept`; a rule that reads ``q`` or draws random numbers says what it does when
        the student decodes greedily."""
        return self.accept(draft_logits, teacher_logits, drafts, top_k=top_k, uniforms=None)

    def replacement_probs(
        self, teacher_logits: torch.Tensor, draft_logits: torch.Tensor, *, top_k: int
    ) -> torch.Tensor:
        """SKD generation: the (unnormalized) distribution the teacher's replacement of a rejected draft is sampled
        from.

        Args:
            teacher_logits (`torch.Tensor` of shape `[R, V]`): the teacher's logits at the rejected positions.
            draft_logits (`torch.Tensor` of shape `[R, V]`): the student's logits at its sampling temperature there.
            top_k (`int`): ``k`` (for rules that use it).

        Returns:
            `torch.Tensor` of shape `[R, V]`, non-negative with a positive sum per row.
        """
        return torch.softmax(teacher_logits, dim=-1)


GATE_RULES: dict[str, type[GateRule]] = {}

# What a rule may read of the teacher at a position (`GateRule.teacher_reads`), and how errors name it. A loaded
# teacher offers everything ("full"); a teacher cache its top-K ("top_k"); a teacher server its top-k and its
# log-probability of the sampled token ("top_k", "proposal").
TEACHER_READS = {
    "top_k": "the teacher's top-k tokens",
    "proposal": "the teacher's log-probability of the proposed token",
    "full": "the teacher's whole distribution",
}


def register_rule(rule: type[GateRule]) -> type[GateRule]:
    """Class decorator: make `rule` selectable as ``gate=rule.name`` (configs, trainers, generation)."""
    if rule.name in GATE_RULES:
        raise ValueError(f"register_rule: a gate rule named {rule.name!r} is already registered.")
    GATE_RULES[rule.name] = rule
    return rule


def get_rule(name: str, owner: str = "gate") -> GateRule:
    """The rule selected by ``gate=name``; an error naming `owner`, the value and the choices for any other name."""
    if name not in GATE_RULES:
        raise ValueError(f"{owner}: gate={name!r} is not supported; use one of {', '.join(map(repr, GATE_RULES))}.")
    return GATE_RULES[name]()


def check_teacher_reads(rule: GateRule, offers: frozenset[str] | set[str], *, owner: str, teacher: str) -> None:
    """Raise unless `rule` reads only what a partly known teacher `offers` (keys of `TEACHER_READS`).

    Args:
        rule: the run's gate rule.
        offers: what the teacher holds (``{"full"}`` holds everything).
        owner: who asks (the config or class named in the error).
        teacher: what the teacher is, for the error (e.g. ``"a teacher cache (its top-K tokens)"``).

    Raises:
        ValueError: naming the rule, what it reads that the teacher lacks, and the rules that would work.
    """
    if "full" in offers:
        return
    missing = sorted(set(rule.teacher_reads) - set(offers))
    if not missing:
        return
    fits = [name for name, r in GATE_RULES.items() if set(r.teacher_reads) <= set(offers)]
    raise ValueError(
        f"{owner}: gate={rule.name!r} reads {' and '.join(TEACHER_READS.get(m, m) for m in missing)}, which "
        f"{teacher} does not hold. Use a gate that reads only what it holds ({', '.join(map(repr, fits))}), or a "
        "loaded teacher."
    )


@register_rule
class TopKGate(GateRule):
    """``"topk"``: accept iff ``x_t`` is among the teacher's ``top_k`` most likely tokens (ties toward the lower token
    id, see `teacher_rank`). A rejected draft is replaced by a sample from the teacher's top-k renormalized."""

    name = "topk"
    uses_top_k = True
    teacher_reads = frozenset({"top_k"})

    def accept(self, student_logits, teacher_logits, proposals, *, top_k, uniforms, normalized=False):
        if top_k < 1:
            raise ValueError(f"accept_mask: top_k={top_k} must be >= 1.")
        if top_k >= teacher_logits.size(-1):
            return torch.ones_like(proposals, dtype=torch.bool)
        # One pass: the k-th largest teacher logit is the threshold (its value is well defined even where torch.topk's
        # order of ties is not). Above it: accepted, below: rejected; only a proposal whose logit equals it needs
        # the exact tie-broken rank.
        proposed = teacher_logits.gather(-1, proposals.unsqueeze(-1)).squeeze(-1)
        threshold = teacher_logits.topk(top_k, dim=-1).values[..., -1]
        accepted = proposed > threshold
        tied = proposed == threshold
        if tied.any():
            accepted[tied] = teacher_rank(teacher_logits[tied], proposals[tied]) < top_k
        return accepted

    def replacement_probs(self, teacher_logits, draft_logits, *, top_k):
        p = torch.softmax(teacher_logits, dim=-1)
        order = torch.sort(teacher_logits, descending=True, stable=True).indices  # stable: lower id first on ties
        keep = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, order[:, :top_k], True)
        return p * keep


@register_rule
class SpecGate(GateRule):
    """``"spec"``: accept with probability ``min(1, p_t(x_t) / q_t(x_t))``, speculative sampling's acceptance rule,
    i.e. iff ``u_t < p_t(x_t) / q_t(x_t)`` with ``u_t ~ U(0, 1)``. When ``x_t ~ q_t`` the expected acceptance is
    ``1 - TV(p_t, q_t)``. A rejected draft is replaced by a sample from the residual ``max(0, p - q)`` normalized, so
    every emitted token is distributed exactly as ``p``; with greedy drafts (``q`` a point mass) a draft is accepted
    iff it is the teacher's argmax (greedy speculative decoding)."""

    name = "spec"
    reads_student = True
    draws_uniforms = True
    teacher_reads = frozenset({"proposal"})

    def accept(self, student_logits, teacher_logits, proposals, *, top_k, uniforms, normalized=False):
        idx = proposals.unsqueeze(-1)
        if normalized:
            log_p = teacher_logits.gather(-1, idx).squeeze(-1).float()
            log_q = student_logits.gather(-1, idx).squeeze(-1).float()
        else:  # (a fused log-softmax then a gather is faster on CPU than z(x) - logsumexp(z))
            log_p = torch.log_softmax(teacher_logits.float(), dim=-1).gather(-1, idx).squeeze(-1)
            log_q = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, idx).squeeze(-1)
        # u < p/q  <=>  log u < log p - log q; u = 0 (log u = -inf) is always accepted, like u < min(1, p/q)
        return torch.log(uniforms.to(log_p.device)) < log_p - log_q

    def accept_greedy_drafts(self, draft_logits, teacher_logits, drafts, *, top_k):
        return TopKGate().accept(draft_logits, teacher_logits, drafts, top_k=1, uniforms=None)

    def replacement_probs(self, teacher_logits, draft_logits, *, top_k):
        p = torch.softmax(teacher_logits, dim=-1)
        residual = (p - torch.softmax(draft_logits, dim=-1)).clamp(min=0)
        # a rejection with p == q happens only by float round-off; the residual is then empty and p is the exact answer
        empty = residual.sum(dim=-1, keepdim=True) <= 0
        return torch.where(empty, p, residual)


@register_rule
class NoGate(GateRule):
    """``"none"``: accept every proposal: the trainers' plain, ungated loss (GKD's, `DistillationTrainer`'s)."""

    name = "none"
    rejects = False
    teacher_reads = frozenset()

    def accept(self, student_logits, teacher_logits, proposals, *, top_k, uniforms, normalized=False):
        return torch.ones_like(proposals, dtype=torch.bool)


GATES = tuple(GATE_RULES)  # the rules' names, for config choices: ("topk", "spec", "none")


def uniform(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """U(0, 1) draws of ``shape`` on ``device``, taken from ``generator`` (which may live on another device)."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


class Proposal:
    """The student's own proposal at the positions of a teacher-forced (dataset or ``seq_kd``) sequence: one object per
    value of `SpecKDConfig.gate_proposal` (`PROPOSALS`), asked by the gate (`weighting.py`) instead of its name.

    Attributes:
        name (`str`): the value of `gate_proposal` that selects it.
        draws_uniforms (`bool`): whether it draws one U(0, 1) per position (the gate draws them from its seeded stream).
    """

    name: ClassVar[str]
    draws_uniforms: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def propose(
        self,
        student_logits: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        uniforms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The proposed token ids `[B, T]` from the student's logits `[B, T, V]` at temperature 1 (see `propose`)."""
        raise NotImplementedError


class GreedyProposal(Proposal):
    """``"greedy"``: ``argmax q_t``."""

    name = "greedy"

    def propose(self, student_logits, *, generator=None, uniforms=None):
        return student_logits.argmax(dim=-1)


class SampledProposal(Proposal):
    """``"sample"``: ``x_t ~ softmax(student_logits)``, by inverse-CDF sampling (a seeded generator, or given
    uniforms, give reproducible proposals)."""

    name = "sample"
    draws_uniforms = True

    def propose(self, student_logits, *, generator=None, uniforms=None):
        probs = torch.softmax(student_logits.float(), dim=-1)
        cdf = probs.cumsum(dim=-1)
        if uniforms is None:
            uniforms = uniform(cdf.shape[:-1], cdf.device, generator)
        u = uniforms.to(cdf.device, cdf.dtype).unsqueeze(-1) * cdf[..., -1:]
        # first index whose cumulative probability exceeds u (never a zero-probability token); the clamp guards the
        # float round-off at the end of the CDF
        return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=student_logits.size(-1) - 1)


GREEDY = GreedyProposal()  # the proposal where none is configured
PROPOSALS: dict[str, Proposal] = {p.name: p for p in (GREEDY, SampledProposal())}


def get_proposal(mode: str | Proposal) -> Proposal:
    """The `Proposal` named `mode` (a key of `PROPOSALS`); a `Proposal` is returned as it is."""
    if isinstance(mode, Proposal):
        return mode
    if mode not in PROPOSALS:
        raise ValueError(f"propose: mode={mode!r} is not supported; use 'greedy' or 'sample'.")
    return PROPOSALS[mode]


def propose(
    student_logits: torch.Tensor,
    *,
    mode: str | Proposal = "greedy",
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """The student's own proposal at each position of a teacher-forced (dataset or ``seq_kd``) sequence.

    Args:
        student_logits (`torch.Tensor` of shape `[B, T, V]`): student next-token logits at temperature 1.
        mode (`str` or `Proposal`): ``"greedy"`` takes ``argmax q_t``; ``"sample"`` draws
            ``x_t ~ softmax(student_logits)`` with ``generator`` (inverse-CDF sampling, so a seeded generator gives
            reproducible proposals).
        generator (`torch.Generator`, *optional*): source of randomness for ``"sample"``.
        uniforms (`torch.Tensor` of shape `[B, T]`, *optional*): U(0, 1) draws to use for ``"sample"`` instead of
            drawing from ``generator`` (the chunked loss draws them once for the whole batch and slices them).

    Returns:
        `torch.LongTensor` of shape `[B, T]`: the proposed token ids.
    """
    return get_proposal(mode).propose(student_logits, generator=generator, uniforms=uniforms)


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
    """The teacher's verdict ``a_t`` on the student's proposals under the rule ``gate`` (`GATE_RULES`).

    ``q_t = softmax(student_logits)`` must be the distribution the proposal was actually drawn from, so scale the
    student logits before calling: for on-policy tokens divide by the generation temperature; for proposals drawn by
    `propose` pass them at temperature 1. ``p_t = softmax(teacher_logits)`` is the teacher at temperature 1. A
    mismatch silently biases the acceptance rate of a rule that reads the student (`GateRule.reads_student`).

    Log-probabilities may be passed in place of logits (the verdicts are the same: ranks do not change, and
    ``log_softmax`` of log-probabilities is the identity); with ``normalized=True`` a rule reads ``log p(x_t)`` and
    ``log q(x_t)`` directly instead of normalizing both ``[B, T, V]`` tensors again.

    Args:
        student_logits (`torch.Tensor` of shape `[B, T, V]`): logits of the proposal distribution ``q``.
        teacher_logits (`torch.Tensor` of shape `[B, T, V]`): teacher logits (``p``).
        proposals (`torch.LongTensor` of shape `[B, T]`): proposed token ids ``x_t``.
        mask (`torch.BoolTensor` of shape `[B, T]`): positions to gate (completion positions).
        gate (`str`): the rule's name, a key of `GATE_RULES` (``"topk"``, ``"spec"``, ``"none"``).
        top_k (`int`): ``k`` for rules that use it.
        generator (`torch.Generator`, *optional*): source of the uniforms of a rule that draws them; seed it for
            reproducibility.
        uniforms (`torch.Tensor` of shape `[B, T]`, *optional*): the U(0, 1) draws to use instead of drawing them
            from ``generator``.
        normalized (`bool`): both ``student_logits`` and ``teacher_logits`` are log-probabilities (``log_softmax``
            outputs, e.g. the divergence's own).

    Returns:
        `torch.BoolTensor` of shape `[B, T]`: ``True`` where accepted; always ``False`` where ``mask`` is ``False``.
    """
    rule = get_rule(gate, owner="accept_mask")
    mask = mask.bool()
    if not rule.rejects:
        return mask.clone()
    if rule.draws_uniforms and uniforms is None:
        uniforms = uniform(proposals.shape, proposals.device, generator)
    accepted = rule.accept(
        student_logits, teacher_logits, proposals.long(), top_k=top_k, uniforms=uniforms, normalized=normalized
    )
    return accepted & mask
