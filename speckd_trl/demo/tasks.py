"""Offline, deterministic chat datasets from `reasoning-gym <https://github.com/open-thought/reasoning-gym>`_.

The default task is reasoning-gym's ``basic_arithmetic`` restricted to the sum of two numbers from 0 to 100
(``min_terms=max_terms=2``, ``min_digits=max_digits=2``, ``operators=("+",)``, no parentheses, no negation), e.g.
``What is 47 + 85? Answer with only the number.`` -> ``132``. Why this task:

* Answers are short integers (1-3 digits), so exact match is unambiguous and cheap, and completions are a handful
  of tokens: generation during on-policy distillation stays fast on a CPU.
* SmolLM2 tokenizes every digit as its own token, and a 135M model learns this quickly: measured on a 2-core CPU,
  SmolLM2-135M-Instruct (dequantized Q4_1) goes from 11% eval exact match (it mostly explains instead of answering,
  or adds wrongly) to 43% after 40 full fine-tuning steps of batch 8 at lr 3e-5 (about 2 minutes). That leaves
  clear headroom above and below for a teacher / student pair to show an effect.
* 101 * 101 = 10,201 distinct problems: enough that train and eval never need to share a prompt, and the eval
  de-duplication does not skew the eval split toward harder problems (with 1-digit operands a few hundred train rows
  already cover every 1-digit problem, so eval would be left with the 2-digit ones only).
* The generator is procedural (no download, nothing read from the Hub) and seeded per item, so datasets are
  reproducible bit for bit.

Harder settings are keyword arguments away (``operators=("+", "-")``, ``max_terms=3``, ``max_digits=3``). For
comparison, ``chain_sum`` (``+``/``-`` chains with negative answers; defaults here: 2 terms of 1-2 digits) went from
20% to 39% after the same 40 steps and 44% after 100; with 2-3 terms it starts at 12%. Any other reasoning-gym task
name works too: its own question text is used, followed by an "answer only" instruction.

Caveats found in reasoning-gym 0.1.25:

* It seeds item ``idx`` with ``Random(seed + idx)``, so datasets built from seeds ``s`` and ``s + 1`` are the same
  items shifted by one. `build_task_dataset` therefore derives its reasoning-gym seed from a hash of
  ``(task, seed)`` and gives the eval split a seed range that starts after the train range.
* ``basic_arithmetic`` with ``"/"`` and ``allow_parentheses=False`` writes the wrong divisor into the question (the
  answer does not match the expression in ~90% of items); `build_task_dataset` refuses that combination.
"""

from __future__ import annotations

import hashlib
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from datasets import Dataset, DatasetDict


DEFAULT_TASK = "basic_arithmetic"
ANSWER_INSTRUCTION = "Answer with only the final answer."

# Defaults applied when `task` is the named task; explicit **task_kwargs override them.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "basic_arithmetic": {
        "min_terms": 2,
        "max_terms": 2,
        "min_digits": 2,
        "max_digits": 2,
        "operators": ("+",),
        "allow_parentheses": False,
        "allow_negation": False,
    },
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "allow_negation": False},
}

# How many candidate eval items to draw per requested eval row before giving up (small task spaces can run dry).
_MAX_DRAWS_PER_EVAL_ROW = 50


def _format_prompt(task: str, item: dict[str, Any]) -> str:
    """A short user prompt for `item`; arithmetic tasks use their bare expression."""
    expression = item.get("metadata", {}).get("expression")
    if task in ("chain_sum", "basic_arithmetic") and expression:
        return f"What is {expression.strip()}? Answer with only the number."
    return f"{item['question'].strip()}\n{ANSWER_INSTRUCTION}"


def _derive_seed(task: str, seed: int, split: str) -> int:
    """A stable (process-independent) 48-bit reasoning-gym seed for `(task, seed, split)`."""
    digest = hashlib.sha256(f"speckd_trl:{task}:{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


def _row(task: str, item: dict[str, Any], system_prompt: str | None = None) -> dict[str, Any]:
    answer = str(item["answer"]).strip()
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return {
        "messages": [
            *system,
            {"role": "user", "content": _format_prompt(task, item)},
            {"role": "assistant", "content": answer},
        ],
        "answer": answer,
    }


def build_task_dataset(
    task: str = DEFAULT_TASK,
    *,
    num_train: int,
    num_eval: int,
    seed: int = 0,
    system_prompt: str | None = None,
    **task_kwargs: Any,
) -> DatasetDict:
    """Build train / eval chat datasets for a reasoning-gym task, offline and deterministically.

    Args:
        task: A reasoning-gym dataset name (see ``reasoning_gym.factory.DATASETS``). Default
            ``"basic_arithmetic"``: sums of two numbers from 0 to 100 (see the module docstring).
        num_train: Number of train rows (> 0). Train rows are kept as generated, repeats included.
        num_eval: Number of eval rows (>= 0). Eval rows are unique and none of their prompts occurs in train.
        seed: Base seed; the same `(task, seed, num_train, num_eval, task_kwargs)` gives identical rows.
        system_prompt: If given, every conversation starts with this system message (chat templates such as
            SmolLM2's otherwise insert a long default one).
        **task_kwargs: Passed to the task's reasoning-gym config, overriding this module's defaults for the task
            (``seed`` and ``size`` are managed here and may not be passed).

    Returns:
        A ``DatasetDict`` with splits ``"train"`` and ``"eval"``. Each row is
        ``{"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        "answer": answer}`` where the prompt asks for only the final answer.

    Raises:
        ValueError: Unknown task, bad sizes, ``seed``/``size`` in `task_kwargs`, or a task space too small to
            give `num_eval` eval rows that do not occur in train.
    """
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise ValueError(f"Unknown reasoning-gym task {task!r}; available: {', '.join(sorted(DATASETS))}")
    if num_train <= 0 or num_eval < 0:
        raise ValueError(f"num_train must be > 0 and num_eval >= 0, got num_train={num_train}, num_eval={num_eval}")
    reserved = {"seed", "size"} & task_kwargs.keys()
    if reserved:
        raise ValueError(f"{sorted(reserved)} are set by build_task_dataset (use `seed=`, `num_train=`, `num_eval=`)")
    config = {**TASK_DEFAULTS.get(task, {}), **task_kwargs}
    if task == "basic_arithmetic" and "/" in config.get("operators", ()) and not config.get("allow_parentheses"):
        raise ValueError(
            "reasoning-gym's basic_arithmetic writes wrong divisors into the question when '/' is used with "
            "allow_parentheses=False; pass allow_parentheses=True or drop '/' from operators."
        )

    # Item i of a split is seeded with base + i. Train uses [base, base + num_train), eval starts right after, so
    # no eval item shares an RNG seed with a train item; exact-duplicate prompts are removed below as well.
    base = _derive_seed(task, seed, "train")
    train_source = reasoning_gym.create_dataset(task, seed=base, size=num_train, **config)
    train_rows = [_row(task, train_source[i], system_prompt) for i in range(num_train)]

    max_draws = max(num_eval * _MAX_DRAWS_PER_EVAL_ROW, 1)
    eval_source = reasoning_gym.create_dataset(task, seed=base + num_train, size=max_draws, **config)
    seen = {row["messages"][-2]["content"] for row in train_rows}
    eval_rows: list[dict[str, Any]] = []
    draws = 0
    while len(eval_rows) < num_eval:
        if draws >= max_draws:
            raise ValueError(
                f"Could only find {len(eval_rows)} of {num_eval} eval prompts not in train after {max_draws} draws "
                f"for task {task!r} with config {config}; widen the task (more terms / digits) or ask for fewer rows."
            )
        row = _row(task, eval_source[draws], system_prompt)
        draws += 1
        prompt = row["messages"][-2]["content"]
        if prompt not in seen:
            seen.add(prompt)
            eval_rows.append(row)

    return DatasetDict({"train": Dataset.from_list(train_rows), "eval": _from_list(eval_rows)})


def _from_list(rows: list[dict[str, Any]]) -> Dataset:
    """`Dataset.from_list`, keeping the row schema when `rows` is empty."""
    if rows:
        return Dataset.from_list(rows)
    return Dataset.from_dict({"messages": [], "answer": []})


_SPECIAL_TOKEN = re.compile(r"<\|[^|<>]*\|>|</?s>")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*", re.IGNORECASE)


def extract_answer(text: str) -> str:
    """Extract the final answer from a model completion.

    Drops chat special tokens (``<|im_end|>`` ...), takes the content of an ``<answer>...</answer>`` tag if there is
    one, else the first non-empty line; on that line keeps what follows the last ``=`` (so ``"2 + 3 = 5"`` gives
    ``"5"``), removes a leading "The answer is" / "Answer:", and strips whitespace and trailing periods.

    Returns:
        The extracted answer string (possibly empty).
    """
    text = _SPECIAL_TOKEN.sub("", text)
    tagged = _ANSWER_TAG.search(text)
    if tagged:
        text = tagged.group(1)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    answer = lines[0] if lines else ""
    if "=" in answer:
        answer = answer.rsplit("=", 1)[1]
    answer = _ANSWER_PREFIX.sub("", answer.strip())
    return answer.strip().rstrip(".").strip()


def _as_number(text: str) -> Decimal | None:
    """`text` as a finite Decimal (commas and surrounding whitespace ignored), or None if it is not a number."""
    try:
        value = Decimal(text.replace(",", "").strip())
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def exact_match(prediction_text: str, answer: str) -> bool:
    """Whether the completion `prediction_text` answers `answer` exactly.

    The prediction goes through `extract_answer`; the reference is stripped of whitespace and trailing periods.
    When both parse as numbers they are compared numerically (``"-4.0"`` == ``"-4"``, ``"1,000"`` == ``"1000"``),
    otherwise as strings, case-sensitively.

    Returns:
        True on a match.
    """
    predicted = extract_answer(prediction_text)
    reference = answer.strip().rstrip(".").strip()
    predicted_number, reference_number = _as_number(predicted), _as_number(reference)
    if predicted_number is not None and reference_number is not None:
        return predicted_number == reference_number
    return predicted == reference
