"""Dataset transforms: the rows a user passes, in the forms the TRL trainers read.

- `dataset_format`: which of the accepted formats a dataset is in (``messages``, ``prompt``/``completion``,
  tokenized, prompt-only);
- `prepare_prompt_completion`: `prompt`/`completion` and tokenized rows for `SpecKDTrainer` (GKD's collator reads
  ``messages`` or ``input_ids``), cut to ``max_length`` as TRL cuts chat rows;
- `prompts_from_messages`: chat rows as the ``prompt`` rows `SpecKDDistillationTrainer` reads.

The checks of those datasets (clear errors for what no transform can fix) are in `validation.py`.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset, IterableDataset


def columns_of(dataset: Any) -> list[str] | None:
    columns = getattr(dataset, "column_names", None)
    if columns is None and isinstance(dataset, IterableDataset) and dataset.features is not None:
        columns = list(dataset.features)
    return columns


def dataset_format(dataset: Any) -> str | None:
    """``"messages"``, ``"prompt_completion"``, ``"tokenized"`` or None, from the dataset's columns."""
    columns = columns_of(dataset)
    if columns is None:
        return None
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "input_ids" in columns:
        return "tokenized"
    return "unknown"


def is_conversational(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def to_messages(example: dict[str, Any]) -> dict[str, Any]:
    """A conversational `prompt`/`completion` row as the `messages` row `DataCollatorForChatML` reads."""
    return {"messages": list(example["prompt"]) + list(example["completion"])}


def collator_max_length(max_length: int | None, tokenizer: Any) -> int:
    """The length `DataCollatorForChatML` cuts chat rows to: `max_length`, or when it is None
    ``min(tokenizer.model_max_length, 1024)``."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    return max_length if max_length is not None else min(tokenizer.model_max_length, 1024)


def keep_last(example: dict[str, Any], max_length: int) -> dict[str, Any]:
    """A tokenized row cut to its last `max_length` tokens (`input_ids` and its per-token `attention_mask` /
    `completion_mask`), as `DataCollatorForChatML` cuts chat rows: the oldest prompt tokens go first."""
    return {
        key: example[key][-max_length:] for key in ("input_ids", "attention_mask", "completion_mask") if key in example
    }


def prepare_prompt_completion(dataset: Any, tokenizer: Any, max_length: int | None = None) -> Any:
    """`prompt`/`completion` and tokenized rows in the form TRL's GKD collator reads, cut to `max_length` as it cuts
    chat rows.

    TRL's `DataCollatorForChatML` reads `messages` or `input_ids`, and cuts only the `messages` rows (to their last
    `max_length` tokens, the oldest prompt tokens first; `collator_max_length`). Here conversational rows (lists of
    messages) become ``messages = prompt + completion`` (the collator cuts them); plain-text rows are tokenized to
    ``input_ids`` with a ``completion_mask`` (prompt and completion tokenized separately, so the boundary is exact) and
    cut the same way; already tokenized rows are cut the same way when they carry a ``completion_mask``.

    Raises:
        ValueError: for tokenized rows longer than `max_length` without a ``completion_mask`` (the collator then finds
            the prompt by tokenizing it again, which a cut would misalign).
    """
    kind = dataset_format(dataset)
    if kind not in ("prompt_completion", "tokenized") or not isinstance(dataset, Dataset):
        return dataset
    limit = collator_max_length(max_length, tokenizer)
    if kind == "tokenized":
        if "completion_mask" in dataset.column_names:
            return dataset.map(keep_last, fn_kwargs={"max_length": limit})
        longest = max((len(ids) for ids in dataset["input_ids"]), default=0)
        if longest > limit:
            raise ValueError(
                f"The dataset's tokenized rows have up to {longest} tokens, more than max_length={limit}, and no "
                "`completion_mask` column to cut them by. Add a `completion_mask` (1 on completion tokens), cut the "
                f"rows to {limit} tokens yourself, or raise max_length."
            )
        return dataset
    if is_conversational(dataset[0]["prompt"]):
        return dataset.map(to_messages, remove_columns=["prompt", "completion"])
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)

    def tokenize(example: dict[str, Any]) -> dict[str, Any]:
        prompt = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
        row = {"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)}
        return keep_last(row, limit)

    return dataset.map(tokenize, remove_columns=["completion"])


def prompts_from_messages(dataset: Any) -> Any:
    """Chat `messages` rows as `prompt` rows for `DistillationTrainer`: every message before the last assistant
    message (all of them when the last is not the assistant's). Datasets that have a `prompt` column, or no
    `messages` column, are returned unchanged."""
    columns = getattr(dataset, "column_names", None) or []
    if "prompt" in columns or "messages" not in columns:
        return dataset

    def to_prompt(example: dict[str, Any]) -> dict[str, Any]:
        messages = example["messages"]
        last = len(messages) - 1 if messages and messages[-1]["role"] == "assistant" else len(messages)
        return {"prompt": messages[:last]}

    return dataset.map(to_prompt, remove_columns=["messages"])
