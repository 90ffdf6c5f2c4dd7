"""Gate-rule variants measured by the lab (`lab_capacity.py`), each one `GateRule` class registered here, in the
benchmark, the way CONTRIBUTING.md's "How to add a gate" adds one: a variant enters the package only if the lab's
validation split says it helps somewhere.

- `TeacherUncertainTopK` ("confidence gating"): the `topk` verdict only where the teacher is unsure (its entropy at
  least `threshold` nats); where it is confident the position keeps full weight.
- `StudentUncertain` (a selection baseline): full weight where the student is least sure (its entropy at least
  `threshold` nats), `reject_weight` where it is already confident.

`variant(base, threshold)` makes a rule with its own name (``"topk_uncertain@0.5"``) and registers it, so that a
`SpecKDConfig(gate=...)` selects it.
"""

from __future__ import annotations

import torch

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


VARIANTS = {rule.name: rule for rule in (TeacherUncertainTopK, StudentUncertain)}


def variant(base: str, threshold: float) -> str:
    """Register the rule `base` (a key of `VARIANTS`) at `threshold`; returns its gate name."""
    name = f"{base}@{threshold:g}"
    if name not in GATE_RULES:
        GATE_RULES[name] = type(name, (VARIANTS[base],), {"name": name, "threshold": threshold})
    return name
