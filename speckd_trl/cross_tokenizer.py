"""The gate across tokenizers: which teacher token stands for a student proposal, and the verdicts on GOLD's aligned
spans.

GOLD (`trl.experimental.gold`) aligns the student's and the teacher's tokenizations of the same completion by byte
offsets into *spans*: the shortest runs of tokens on both sides that end at the same byte (`ULDLoss
._align_by_byte_offsets`). A span's start is a byte boundary of both tokenizations, so there the teacher has a
next-token distribution conditioned on exactly the text the student's proposal follows; inside a span, where one side
has split a token of the other, it has none. So:

- every span is verified at its first student token: the student proposes a token there (the sampled one on
  on-policy rows, its greedy prediction on dataset rows), and the rule reads the teacher's distribution at the span's
  first teacher position for the proposal's *teacher token* (`student_to_teacher_ids`):
  - the counterpart, where the teacher's vocabulary holds the same token string (GOLD's matched tokens);
  - else the first teacher token of the proposal's bytes under the teacher's own BPE (the teacher's first step toward
    spelling the proposal);
- the other student tokens of the span share its verdict (the teacher cannot verify a prefix that ends inside one of
  its own tokens), and the span's loss (GOLD's per-span ULD term) is weighted by it.

Why the first teacher token and not the product over the teacher tokens that spell the proposal: the product needs
the teacher's distributions after each of those tokens, which exist only where the proposal is the token the sequence
holds and ends on a teacher boundary (never for a greedy proposal that differs from the dataset's token); the first
token is defined at every span, has a rank (which the `topk` rule reads; a product has none), and it is the factor that
carries the choice: once a word has started, the teacher's continuation of it is nearly certain. It is an upper bound
of the text's probability, so the verdict is lenient on proposals without a counterpart: the teacher rejects only a
proposal it would not even start.
"""

from __future__ import annotations

from typing import Any

import torch

from .weighting import GatedBatch


def student_to_teacher_ids(student_tokenizer: Any, teacher_tokenizer: Any, size: int) -> torch.Tensor:
    """The teacher token that stands for each student token id below `size` (the student's output vocabulary), -1 for
    none (ids beyond the tokenizer, tokens the teacher cannot spell).

    The counterpart where the teacher's vocabulary has the same token string (as GOLD's hybrid loss matches tokens);
    the student's end-of-sequence token maps to the teacher's; any other token maps to the first token of its string
    under the teacher's BPE model (ByteLevel tokenizers share the byte alphabet, so that is the teacher's first token of
    the proposal's bytes, exact even for a token that holds part of a UTF-8 character).
    """
    ids = torch.full((size,), -1, dtype=torch.long)
    teacher_vocab = teacher_tokenizer.get_vocab()
    model = teacher_tokenizer.backend_tokenizer.model
    for token, student_id in student_tokenizer.get_vocab().items():
        if student_id >= size:
            continue
        if token in teacher_vocab:
            ids[student_id] = teacher_vocab[token]
        elif student_id == student_tokenizer.eos_token_id and teacher_tokenizer.eos_token_id is not None:
            ids[student_id] = teacher_tokenizer.eos_token_id
        else:
            pieces = model.tokenize(token)
            if pieces:
                ids[student_id] = pieces[0].id
    return ids


def span_completion(sequences: list[Any], shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Bool `[B, T_s]`: the student positions in GOLD's loss (the tokens of its aligned spans, `compat.AlignedSequence`;
    a `None` sequence has none): the positions the gate verifies and logs."""
    completion = torch.zeros(shape, dtype=torch.bool, device=device)
    for row, sequence in enumerate(sequences):
        if sequence is not None:
            for span in sequence.student_spans:
                completion[row, span] = True
    return completion


@torch.no_grad()
def span_verdicts(
    batch: GatedBatch,
    sequences: list[Any],
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    to_teacher: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The gate's verdicts on GOLD's aligned spans (see the module's docstring).

    Args:
        batch (`GatedBatch`): the gate on this micro-batch, over `span_completion`'s positions.
        sequences (`list[compat.AlignedSequence | None]`): each row's aligned spans.
        student_logits (`torch.Tensor` of shape `[B, T_s, V_s]`), teacher_logits (`torch.Tensor` of shape
            `[B, T_t, V_t]`): both models' logits over their own sequences (position ``t`` predicts token ``t + 1``).
        to_teacher (`torch.LongTensor` of shape `[V_s]`): `student_to_teacher_ids`.

    Returns:
        The accept bits `[B, T_s]` at every student position of a span (its span's verdict; False elsewhere), and per
        row the verdicts of its spans `[G]` (`None` for a `None` row).
    """
    width = student_logits.size(1)
    at, student_rows, teacher_rows, verified = [], [], [], []  # `verified`: (row, span) of each verdict asked for
    for row, sequence in enumerate(sequences):
        if sequence is None:
            continue
        for g, (student_span, teacher_span) in enumerate(
            zip(sequence.student_spans, sequence.teacher_spans, strict=True)
        ):
            if student_span[0] < 1 or teacher_span[0] < 1:
                continue  # no position predicts a sequence's first token: not verified (accepted)
            at.append(row * width + student_span[0])
            student_rows.append((row, student_span[0] - 1))
            teacher_rows.append((row, teacher_span[0] - 1))
            verified.append((row, g))
    span_accepted = {}
    if at and batch.gate.rule.rejects and bool(batch.gated.any()):
        s_row, s_pos = torch.tensor(student_rows, device=student_logits.device).unbind(-1)
        t_row, t_pos = torch.tensor(teacher_rows, device=teacher_logits.device).unbind(-1)
        student_log_probs = torch.log_softmax(student_logits[s_row, s_pos].float(), dim=-1)
        teacher_log_probs = torch.log_softmax(teacher_logits[t_row, t_pos].float(), dim=-1)
        index = torch.tensor(at, device=student_logits.device)
        verdicts = batch.verdicts(student_log_probs, teacher_log_probs, at=index, to_teacher=to_teacher)
        span_accepted = dict(zip(verified, verdicts.tolist(), strict=True))
    accepted = batch.completion.clone()
    per_row: list[torch.Tensor | None] = []
    for row, sequence in enumerate(sequences):
        if sequence is None:
            per_row.append(None)
            continue
        verdicts = [span_accepted.get((row, g), True) for g in range(len(sequence.student_spans))]
        for span, verdict in zip(sequence.student_spans, verdicts, strict=True):
            accepted[row, span] = verdict
        per_row.append(torch.tensor(verdicts, dtype=torch.bool, device=student_logits.device))
    return accepted, per_row
