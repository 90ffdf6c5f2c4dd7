"""Gate-rule variants measured by the lab (`lab_capacity.py`), each one `GateRule` class registered here, in the
benchmark, the way CONTRIBUTING.md's "How to add a gate" adds one: a variant enters the package only if the lab's
validation split says it helps somewhere.

- `TeacherUncertainTopK` ("confidence gating"): the `topk` verdict only where the teacher is unsure (its entropy at
  least `threshold` nats); where it is confident the position keeps full weight.
- `StudentUncertain` (a selection baseline): full weight where the student is least sure (its entropy at least
  `threshold` nats), `reject_weight` where it is already confident.
- `TopKTargetFilterAll` (``"topk_filter_all"``): rejects every proposal, so that with the package's target filtering
  (`reject_target="top_k"`, `reject_weight=1`) every position is distilled toward the teacher's top-k renormalized
  at full weight: plain top-k-truncated distillation, no gate (the comparison for target filtering, which filters
  only where `topk` rejects).

`LabSpecKDTrainer` (what `lab_capacity.py` builds) lets one rule edit SKD rollouts under another loss gate
(`generation_gate`), which the lab measured and the package does not offer (it never helped).

`variant(base, threshold)` makes a rule with its own name (``"topk_uncertain@0.5"``; ``"topk_filter_all"``
without a threshold) and registers it, so that a `SpecKDConfig(gate=...)` selects it.
"""

from __future__ import annotations

import torch

from speckd_trl import SpecKDTrainer
from speckd_trl.rules import GATE_RULES, GateRule, TopKGate


def _entropy(logits: torch.Tensor, normalized: bool) -> torch.Tensor:
    """Entropy (nats) `[...]` of the distributions `[..., V]` (logits, or log-probabilities when `normalized`)."""
    log_p = logits.float() if normalized else torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


class TeacherUncertainTopK(TopKGate):
    """Accept where the teacher's entropy is below `threshold`; elsewhere the `topk` verdict."""

    name = "topk_uncertain"
    threshold = 0.5

    def accept(self, student_logits, teacher_logits, proposals, *, top_k, uniforms, normalized=False):
        verdict = super().accept(
            student_logits, teacher_logits, proposals, top_k=top_k, uniforms=uniforms, normalized=normalized
        )
        return verdict | (_entropy(teacher_logits, normalized) < self.threshold)


class StudentUncertain(GateRule):
    """Accept (full weight) where the student's entropy is at least `threshold`; `reject_weight` elsewhere."""

    name = "student_uncertain"
    reads_student = True
    threshold = 1.0

    def accept(self, student_logits, teacher_logits, proposals, *, top_k, uniforms, normalized=False):
        return _entropy(student_logits, normalized) >= self.threshold


class TopKTargetFilterAll(GateRule):
    """Rejects every proposal: with the package's target filtering (`reject_target="top_k"`, `reject_weight=1`) every
    position is distilled toward the teacher's top-k renormalized, at full weight (top-k-truncated distillation)."""

    name = "topk_filter_all"
    uses_top_k = True

    def accept(self, student_logits, teacher_logits, proposals, *, top_k, uniforms, normalized=False):
        return torch.zeros_like(proposals, dtype=torch.bool)


class LabSpecKDTrainer(SpecKDTrainer):
    """`SpecKDTrainer` where `generation_gate`, when set, verifies and replaces the student's drafts in speculative
    generation in place of the loss's `gate` (SKD's rollout editing, e.g. under `gate="none"`): a comparison the lab
    measured and the package does not offer (it never helped)."""

    generation_gate: str | None = None

    @property
    def _generation_gate(self) -> str:
        return self.generation_gate or super()._generation_gate


VARIANTS = {rule.name: rule for rule in (TeacherUncertainTopK, StudentUncertain, TopKTargetFilterAll)}


def variant(base: str, threshold: float | None = None) -> str:
    """Register the rule `base` (a key of `VARIANTS`) at `threshold` (None: a rule without one, under its own name);
    returns its gate name."""
    if threshold is None:
        GATE_RULES.setdefault(base, VARIANTS[base])
        return base
    name = f"{base}@{threshold:g}"
    if name not in GATE_RULES:
        GATE_RULES[name] = type(name, (VARIANTS[base],), {"name": name, "threshold": threshold})
    return name
