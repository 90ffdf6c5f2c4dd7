"""How good a drafter the student is for its teacher: transformers' assisted generation, greedy, measured.

SpecKD's on-policy acceptance rate is the student's expected speculative-decoding acceptance against the teacher;
`evaluate_drafter` measures the thing itself: ``teacher.generate(..., assistant_model=student)`` (greedy, one prompt
at a time, as assisted generation requires), its mean accepted length (generated tokens per teacher forward pass)
and its wall-clock speed-up over the teacher decoding alone.

transformers 5 does not return the number of accepted tokens from ``generate`` (it is a local variable,
``n_matches``, of the assisted decoding loop), so both models' forward passes are counted with forward hooks: each
teacher forward emits its accepted drafts plus one token of its own, each student forward drafts one token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


@torch.no_grad()
def evaluate_drafter(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    num_assistant_tokens: int = 4,
) -> dict[str, float]:
    """Assisted (speculative) greedy decoding of ``prompts`` with ``student`` drafting for ``teacher``.

    Each prompt is decoded twice, greedily: by the teacher alone and by the teacher with the student as assistant
    (``num_assistant_tokens`` drafted tokens per round: constant schedule, no confidence-based early stop). A warm-up run of the first prompt is not
    timed. Greedy assisted decoding returns the teacher's own greedy output; ``identical_fraction`` checks it.

    Args:
        student (`PreTrainedModel`): the drafter; same tokenizer as the teacher.
        teacher (`PreTrainedModel`): the verifier.
        tokenizer: tokenizes ``prompts`` (no special tokens added: pass chat-templated text).
        prompts (`Sequence[str]`): the prompts, decoded one at a time.
        max_new_tokens (`int`): generated tokens per prompt at most.
        num_assistant_tokens (`int`): tokens the student drafts per teacher forward pass.

    Returns:
        `dict`: ``prompts``; ``new_tokens`` (assisted, summed over prompts); ``teacher_forwards`` (assisted) and
        ``teacher_forwards_alone``; ``mean_accepted_length`` = new tokens per assisted teacher forward (1 for the
        teacher alone; at most ``num_assistant_tokens + 1``); ``acceptance_rate`` = accepted drafts per drafted
        token (student forward passes); ``teacher_time_s`` and ``assisted_time_s`` (summed wall-clock); ``speedup`` = their ratio;
        ``identical_fraction``: share of prompts where both decodings agree.
    """
    if not prompts:
        raise ValueError("evaluate_drafter: prompts is empty.")
    if num_assistant_tokens < 1:
        raise ValueError(f"evaluate_drafter: num_assistant_tokens={num_assistant_tokens} must be >= 1.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    totals = dict.fromkeys(
        ("new_tokens", "teacher_forwards", "teacher_forwards_alone", "drafted", "teacher_time_s", "assisted_time_s"),
        0.0,
    )
    identical = 0
    with (
        _eval_mode(student, teacher),
        _constant_draft_length(student.generation_config, num_assistant_tokens),
        _counting_forwards(teacher, student) as calls,
    ):
        encoded = [
            tokenizer(text, return_tensors="pt", add_special_tokens=False).to(teacher.device) for text in prompts
        ]
        teacher.generate(**encoded[0], **{**kwargs, "max_new_tokens": 2})  # warm-up, untimed
        teacher.generate(**encoded[0], assistant_model=student, **{**kwargs, "max_new_tokens": 2})
        for enc in encoded:
            identical += _decode_twice(teacher, student, enc, kwargs, calls, totals)
    return _summary(totals, identical, len(prompts), num_assistant_tokens)


@contextmanager
def _eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """`models` in evaluation mode, each back in its own mode after."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


# the student's generation settings that make the draft length constant: no schedule, no confidence-based early stop
# (transformers' default threshold 0.4)
DRAFT_LENGTH_FIELDS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")


@contextmanager
def _constant_draft_length(config: Any, num_assistant_tokens: int) -> Iterator[None]:
    """The drafter's generation config drafting `num_assistant_tokens` per round, restored after."""
    saved = [getattr(config, name) for name in DRAFT_LENGTH_FIELDS]
    for name, value in zip(DRAFT_LENGTH_FIELDS, (num_assistant_tokens, "constant", 0.0)):
        setattr(config, name, value)
    try:
        yield
    finally:
        for name, value in zip(DRAFT_LENGTH_FIELDS, saved):
            setattr(config, name, value)


@contextmanager
def _counting_forwards(teacher: torch.nn.Module, student: torch.nn.Module) -> Iterator[list[int]]:
    """``[teacher forwards, student forwards]``, counted by forward hooks while inside (the caller may reset them)."""
    calls = [0, 0]
    hooks = [
        teacher.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)),
        student.register_forward_hook(lambda *_: calls.__setitem__(1, calls[1] + 1)),
    ]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def _decode_twice(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    enc: Any,
    kwargs: dict[str, Any],
    calls: list[int],
    totals: dict[str, float],
) -> bool:
    """One prompt decoded by the teacher alone, then with the student drafting, both timed, their forwards counted
    (`calls`) and added to `totals`; whether the two outputs are identical."""
    prompt_len = enc["input_ids"].size(1)
    calls[0] = 0
    start = time.perf_counter()
    alone = teacher.generate(**enc, **kwargs)
    totals["teacher_time_s"] += time.perf_counter() - start
    totals["teacher_forwards_alone"] += calls[0]

    calls[:] = [0, 0]
    start = time.perf_counter()
    assisted = teacher.generate(**enc, assistant_model=student, **kwargs)
    totals["assisted_time_s"] += time.perf_counter() - start
    totals["teacher_forwards"] += calls[0]
    totals["new_tokens"] += assisted.size(1) - prompt_len
    totals["drafted"] += calls[1]
    return torch.equal(alone, assisted)


def _summary(totals: dict[str, float], identical: int, prompts: int, num_assistant_tokens: int) -> dict[str, float]:
    """`evaluate_drafter`'s result from the summed counts and times."""
    forwards = max(totals["teacher_forwards"], 1)
    accepted = totals["new_tokens"] - totals["teacher_forwards"]
    return {
        "prompts": prompts,
        "num_assistant_tokens": num_assistant_tokens,
        "new_tokens": int(totals["new_tokens"]),
        "teacher_forwards": int(totals["teacher_forwards"]),
        "teacher_forwards_alone": int(totals["teacher_forwards_alone"]),
        "mean_accepted_length": totals["new_tokens"] / forwards,
        "acceptance_rate": max(accepted, 0) / max(totals["drafted"], 1),
        "teacher_time_s": totals["teacher_time_s"],
        "assisted_time_s": totals["assisted_time_s"],
        "speedup": totals["teacher_time_s"] / max(totals["assisted_time_s"], 1e-9),
        "identical_fraction": identical / prompts,
    }
