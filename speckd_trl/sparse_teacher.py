"""The sparse teacher: a teacher known by its top-K tokens and the mass of the rest (a teacher cache, a server).

A teacher cache row and a vLLM teacher server's answer hold, at each position, the teacher's top-K tokens, their
log-probabilities and the log of the mass outside them (`teacher_top_k`: the `topk` rule's own top-K, ties toward the
lower id). Two views of it feed the unchanged gate and loss paths:

- what the gate reads (`sparse_log_probs`): `[..., V]` log-probabilities with the top-K in place and a floor elsewhere,
  from which the `topk` rule reads the full teacher's verdicts for any ``k <= K``;
- what the divergence is taken against (`tail_bucket_target`): the `[..., V]` target whose full-vocabulary divergence
  equals TRL's top-K + tail-bucket one (values and gradient).

`SparseTeacher` holds the four tensors and gives both views; `sparse_teacher_from_hidden` cuts a live teacher the
same way, a chunk of rows at a time; a teacher server's answer becomes one in `server_teacher.py`. `no_token_slots`
marks the slots of ids past the student's vocabulary (a padded teacher), whose mass goes to the tail.

Shapes: ``B`` batch, ``T`` positions, ``V`` vocabulary, ``K`` tokens kept, ``N`` flattened positions, ``H`` hidden
size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .chunked import OutputLayer
from .divergence import jsd_log_probs


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

    def at(self, positions: torch.Tensor) -> SparseTeacher:
        """The teacher at some positions of its `[B, T]` ones: `positions` (`torch.LongTensor` of shape `[N]`) are
        flat indices into `[B * T]` (e.g. `weighting.GatedBatch.rows`); the result is `[N, K]`."""
        flat = (t.flatten(0, 1) if t.dim() > 2 else t.flatten() for t in (self.ids, self.values, self.log_tail))
        valid = None if self.valid is None else self.valid.flatten(0, 1)[positions]
        return SparseTeacher(*(t[positions] for t in flat), self.vocab_size, valid)

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
    hidden = hidden.detach()
    with torch.no_grad():
        parts = [
            top_k_of(jsd_log_probs(head.transform(head.project(hidden[start : start + chunk_size])), temperature))
            for start in range(0, max(hidden.size(0), 1), chunk_size)  # (one empty chunk when N = 0)
        ]
    return SparseTeacher(
        torch.cat([p.ids for p in parts]),
        torch.cat([p.values for p in parts]),
        torch.cat([p.log_tail for p in parts]),
        head.weight.size(0),
    )
