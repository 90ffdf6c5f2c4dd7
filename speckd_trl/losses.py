"""SpecKD's loss, eager or chunked: the chunked weighted JSD (`chunked_weighted_jsd`), and the loss's public names.

Two paths compute the same loss, ``sum_t w_t D_beta(p_t, q_t)`` with the gate's weights ``w_t`` (`LossPath`,
``loss_path`` resolved: `EAGER`, `CHUNKED`):

- eager (`divergence.weighted_generalized_jsd`): from both models' full ``[B, T, V]`` logits, exactly as GKD;
- chunked (`chunked_weighted_jsd`): from both models' final hidden states and output layers, ``chunk_size`` tokens
  at a time, so that only ``[chunk_size, V]`` logits ever exist. The gate runs on each chunk's log-probs, and each
  chunk's divergence and gradient are computed in closed form in the forward pass
  (`divergence.generalized_jsd_and_logit_grad`), so neither model's logits are kept for the backward pass. Its
  values equal the eager path's to float round-off (tested), not bit for bit.

The loss's parts, one job per module (each name is importable from here too, as `speckd_trl.losses.<name>`):

- `divergence.py`: the generalized JSD per position, its closed-form gradient, target filtering;
- `sparse_teacher.py`: a teacher known by its top-K and tail (a teacher cache, a teacher server): `SparseTeacher`,
  the gate's view of it and the tail-bucket target;
- `reduction.py`: normalization for the accumulation window and the REINFORCE term (`LossTerms`, `gated_loss`);
- `chunked.py`: the chunk loop, which owns chunking and gradient accumulation for any per-chunk loss; here the
  per-chunk loss is the gated divergence (`ChunkGate` and a teacher's two views give it what it reads).

Shapes: ``N`` flattened positions, ``n`` the rows of a chunk, ``V`` vocabulary, ``H`` hidden size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .chunked import ChunkOutput, OutputLayer, chunked_linear_loss
from .divergence import (
    generalized_jsd_and_logit_grad,
    generalized_jsd_from_log_probs,
    jsd_log_probs,
    top_k_log_probs,
    weighted_generalized_jsd,
    weighted_jsd_from_log_probs,
)
from .reduction import (
    NORMALIZATIONS,
    LossTerms,
    gated_loss,
    loss_denominator,
    normalize_loss,
    policy_gradient_loss,
    sampled_log_probs,
    sampled_log_probs_from_hidden,
)
from .sparse_teacher import (
    SparseTeacher,
    no_token_slots,
    sparse_log_probs,
    sparse_teacher_from_hidden,
    tail_bucket_target,
    teacher_top_k,
)


__all__ = [
    "LOSS_PATHS",
    "NORMALIZATIONS",
    "ChunkGate",
    "HiddenTeacher",
    "LossTerms",
    "OutputLayer",
    "RowWeights",
    "SparseTeacher",
    "chunked_weighted_jsd",
    "gated_loss",
    "generalized_jsd_and_logit_grad",
    "generalized_jsd_from_log_probs",
    "jsd_log_probs",
    "loss_denominator",
    "no_token_slots",
    "normalize_loss",
    "policy_gradient_loss",
    "sampled_log_probs",
    "sampled_log_probs_from_hidden",
    "sparse_log_probs",
    "sparse_teacher_from_hidden",
    "tail_bucket_target",
    "teacher_top_k",
    "top_k_log_probs",
    "weighted_generalized_jsd",
    "weighted_jsd_from_log_probs",
]


@dataclass(frozen=True)
class LossPath:
    """How `SpecKDTrainer` computes a micro-batch's loss terms (`loss_path`), resolved from its name
    (`LOSS_PATH_MODES`); the trainer and its checks ask it instead of comparing the name.

    Attributes:
        name (`str`): the value of `loss_path` that selects it.
        from_hidden_states (`bool`): the loss is computed from both models' final hidden states and output layers,
            `loss_chunk_size` completion tokens at a time (`chunked_weighted_jsd`), reading each model's output layer
            directly; else from both models' full `[B, T, V]` logits, as GKD.
    """

    name: str
    from_hidden_states: bool


EAGER = LossPath("eager", from_hidden_states=False)
CHUNKED = LossPath("chunked", from_hidden_states=True)
LOSS_PATH_MODES: dict[str, LossPath] = {path.name: path for path in (EAGER, CHUNKED)}
LOSS_PATHS = tuple(LOSS_PATH_MODES)  # the names, for config choices: ("eager", "chunked")


@runtime_checkable
class ChunkGate(Protocol):
    """What the chunked loss asks of the gate about a chunk of rows (`weighting.GatedBatch` answers; `RowWeights`
    stands for fixed weights). Every argument is detached, at the divergence's temperature."""

    def chunk_verdicts(
        self, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, rows: slice
    ) -> torch.Tensor:
        """Per-row values `[n]` of the chunk `rows` from both models' log-probabilities `[n, V]` (the gate's
        verdicts); `chunked_weighted_jsd` returns them."""
        ...

    def position_weights(self, values: torch.Tensor) -> torch.Tensor:
        """The loss weights ``w_t`` `[n]` of the chunk's rows from their values."""
        ...

    def targets(self, teacher_log_probs: torch.Tensor, values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The divergence's target `[n, V]` from the teacher's log-probabilities, the rows' values and the unfiltered
        target (the teacher's log-probabilities, or a sparse teacher's tail-bucket target)."""
        ...


@dataclass
class RowWeights:
    """A `ChunkGate` of fixed weights: `fn` gives each chunk's values, which are its weights; the target is the
    teacher's.

    Attributes:
        fn (`Callable`): ``fn(student_log_probs [n, V], teacher_log_probs [n, V], rows: slice) -> [n]``.
    """

    fn: Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]

    def chunk_verdicts(
        self, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, rows: slice
    ) -> torch.Tensor:
        return self.fn(student_log_probs, teacher_log_probs, rows)

    def position_weights(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def targets(self, teacher_log_probs: torch.Tensor, values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return target


@dataclass
class HiddenTeacher:
    """A live teacher in the chunked loss: its final hidden states, projected a chunk of rows at a time. It gives the
    two views a `SparseTeacher` gives: what the gate reads (`log_probs`) and the divergence's target (`target`).

    Attributes:
        hidden (`torch.Tensor` of shape `[N, H_t]`): the teacher's final hidden states (detached).
        head (`OutputLayer`): the teacher's output layer.
        temperature (`float`): softmax temperature of the log-probabilities.
    """

    hidden: torch.Tensor
    head: OutputLayer
    temperature: float

    @property
    def vocab_size(self) -> int:
        return self.head.weight.size(0)

    def log_probs(self, rows: slice) -> torch.Tensor:
        """The teacher's log-probabilities `[n, V]` at the chunk `rows`."""
        return jsd_log_probs(self.head.transform(self.head.project(self.hidden[rows])), self.temperature)

    def target(self, log_probs: torch.Tensor, student_log_probs: torch.Tensor, rows: slice) -> torch.Tensor:
        """The divergence's target: the teacher's log-probabilities themselves."""
        return log_probs


@dataclass
class _GatedJSD:
    """The chunked loss's per-chunk function (a `chunked.ChunkLoss`): ``w_t D_beta(p_t, q_t)`` of a chunk of rows and
    its gradient with respect to the student's logits, in closed form (`generalized_jsd_and_logit_grad`: the values of
    the eager path's `weighted_jsd_from_log_probs` to float round-off, without autograd through its operations)."""

    teacher: SparseTeacher | HiddenTeacher
    gate: ChunkGate
    beta: float
    temperature: float
    entropies: list[torch.Tensor] | None = None  # a list: each chunk's student entropy `[n]` is appended to it

    def __call__(self, logits: torch.Tensor, rows: slice, *, grad: bool) -> ChunkOutput:
        student_log_probs = jsd_log_probs(logits, self.temperature)
        if self.entropies is not None:  # (of the student at the divergence's temperature, as TRL's metric)
            self.entropies.append(-(student_log_probs.exp() * student_log_probs).sum(dim=-1))
        teacher_log_probs = self.teacher.log_probs(rows)
        values = self.gate.chunk_verdicts(student_log_probs, teacher_log_probs, rows)
        weights = self.gate.position_weights(values).to(torch.float32)
        target = self.teacher.target(teacher_log_probs, student_log_probs, rows)
        target = self.gate.targets(teacher_log_probs, values, target)  # (target filtering)
        del teacher_log_probs
        divergence, grad_logits = generalized_jsd_and_logit_grad(student_log_probs, target, beta=self.beta, grad=grad)
        if grad_logits is not None:  # d(w_t D_t)/dz for logits z divided by the temperature
            grad_logits *= (weights / self.temperature).to(grad_logits.dtype).unsqueeze(-1)
        return ChunkOutput(divergence * weights.to(divergence.dtype), grad_logits, values)


def chunked_weighted_jsd(
    student_hidden: torch.Tensor,
    student_head: OutputLayer,
    teacher_hidden: torch.Tensor | SparseTeacher,
    teacher_head: OutputLayer | None,
    gate: ChunkGate | Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor],
    *,
    beta: float,
    temperature: float = 1.0,
    chunk_size: int = 256,
    entropies: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_t w_t D_beta(p_t, q_t)`` from hidden states, never holding more than ``chunk_size`` rows of logits.

    For each chunk of rows (`chunked.chunked_linear_loss`), both models' logits are normalized (`jsd_log_probs`);
    the gate reads the log-probabilities (`ChunkGate.chunk_verdicts`), and its verdicts give the weights and the
    divergence's target; the divergence and its gradient come in closed form. The gradients with respect to the
    student's hidden states, output weight and bias are accumulated in float32 and returned by the backward pass.
    Peak extra memory: a few ``[chunk_size, V]`` float32 tensors plus the ``[N, H]`` gradient (and a ``[V, H]`` one
    when the student's output layer is trained). The teacher gets no gradient.

    Args:
        student_hidden (`torch.Tensor` of shape `[N, H_s]`): the student's final hidden states (after the last norm).
        student_head (`OutputLayer`): the student's output layer; its weight and bias get gradients if they require
            them.
        teacher_hidden (`torch.Tensor` of shape `[N, H_t]`): the teacher's final hidden states at the same positions;
            or a `SparseTeacher` of shape `[N, K]` (a teacher cache's rows): its `sparse_log_probs` are what the gate
            reads and its `tail_bucket_target` the divergence's target (the top-K + tail divergence).
        teacher_head (`OutputLayer`): the teacher's output layer (same vocabulary ``V``); `None` with a
            `SparseTeacher`.
        gate (`ChunkGate`): the gate of the rows (e.g. a `weighting.GatedBatch` whose `rows` they are); or a function
            ``fn(student_log_probs [n, V], teacher_log_probs [n, V], rows: slice) -> [n]`` of the chunk's (detached)
            log-probabilities at ``temperature``, whose values are the weights (`RowWeights`).
        beta (`float`): generalized JSD interpolation in ``[0, 1]``.
        temperature (`float`): softmax temperature of the divergence.
        chunk_size (`int`): rows of logits projected at a time.
        entropies (`list`, *optional*): when given, each chunk's student entropy ``-sum q log q`` `[n]` (at
            ``temperature``, detached) is appended to it, in row order (`SpecKDDistillationTrainer`'s `entropy` metric).

    Returns:
        A scalar: ``sum_t w_t D_t`` (differentiable), and the gate's values (`ChunkGate.chunk_verdicts`) of shape
        `[N]`, in row order (not differentiable).
    """
    if chunk_size < 1:
        raise ValueError(f"chunked_weighted_jsd: chunk_size={chunk_size} must be >= 1.")
    if not isinstance(teacher_hidden, SparseTeacher):
        teacher_hidden = HiddenTeacher(teacher_hidden.detach(), teacher_head, temperature)
    if student_head.weight.size(0) != teacher_hidden.vocab_size:
        raise ValueError(
            f"chunked_weighted_jsd: the student's output layer has {student_head.weight.size(0)} rows and the "
            f"teacher's {teacher_hidden.vocab_size}; both models need the same vocabulary."
        )
    chunk_loss = _GatedJSD(
        teacher_hidden, gate if isinstance(gate, ChunkGate) else RowWeights(gate), beta, temperature, entropies
    )
    return chunked_linear_loss(student_hidden, student_head, chunk_loss, chunk_size=chunk_size)
