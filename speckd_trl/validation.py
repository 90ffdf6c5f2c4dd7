"""Up-front checks of the trainer's inputs: each raises before any training with one message that says what is wrong,
the offending value and how to fix it.

Checks of the models' vocabularies live in `models.py` (`check_vocab`), next to the code that reads the models.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any

import torch
from datasets import Dataset, IterableDataset


# bitsandbytes' 4-bit kernels: CUDA, CPU (>= 0.48), Intel XPU and Habana HPU; not Apple MPS.
BNB_4BIT_DEVICES = ("cuda", "cpu", "xpu", "hpu")
# prompts tokenized by `check_dataset` to compare with `max_length` (the first rows; enough to catch a wrong setting
# without tokenizing a large dataset twice)
MAX_LENGTH_CHECK_ROWS = 1000


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def check_launch(args: Any) -> None:
    """Raise if a launcher started several processes that would not train as one job.

    `accelerate launch` / `torchrun` set `WORLD_SIZE` in every process. On a machine with no GPU and `use_cpu=False`
    the processes do not join a process group: each would train alone on the whole dataset, with no error.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size != launched:
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but training sees a world of "
            f"{args.world_size}: each process would train alone on the whole dataset. On a machine without a GPU set "
            "use_cpu=True (`--use_cpu`), so that the processes join one gloo process group (see "
            "examples/accelerate/multi_cpu.yaml)."
        )


def check_fsdp_applied(accelerator: Any) -> None:
    """Warn when the launcher asked for FSDP (`ACCELERATE_USE_FSDP`) but the job is not an FSDP job.

    accelerate (checked with 1.15) applies its FSDP settings only to GPU-like jobs: a job of CPU processes
    (`use_cpu=True`, `accelerate launch --config_file examples/accelerate/fsdp2.yaml ... --use_cpu`) silently trains
    as DDP instead, every process holding whole models.
    """
    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if requested and getattr(accelerator.state, "fsdp_plugin", None) is None:
        warnings.warn(
            f"FSDP was requested (ACCELERATE_USE_FSDP=true) but accelerate runs this job as "
            f"{accelerator.distributed_type.value}, without FSDP: every process holds the whole student and teacher. "
            "accelerate enables FSDP for GPU (and other accelerator) processes only, not for CPU processes "
            "(use_cpu=True).",
            UserWarning,
            stacklevel=3,
        )


def check_fsdp_generation(args: Any, accelerator: Any) -> None:
    """Raise if speculative generation would run under FSDP with several processes.

    FSDP gathers every layer's weights with a collective at each forward, so all processes must run the same number
    of forwards. transformers' `generate` keeps them in step (`synced_gpus`, on by default under FSDP2), but
    `speculative_generate` stops each process when its own rows are done: the processes would wait on each other
    forever.
    """
    if (
        getattr(args, "on_policy_generation", None) == "speculative"
        and getattr(accelerator.state, "fsdp_plugin", None) is not None
        and accelerator.num_processes > 1
    ):
        raise ValueError(
            "on_policy_generation='speculative' is not supported under FSDP with several processes: each process "
            "would run its own number of forwards through the sharded models and wait on the others forever. Use "
            "on_policy_generation='student' (transformers' generate, kept in step across processes), or DDP."
        )


def check_4bit_teacher(device: torch.device | str) -> None:
    """Raise if a 4-bit teacher cannot be loaded here: bitsandbytes missing, or a device it has no kernels for."""
    if not bitsandbytes_available():
        raise ImportError(
            "teacher_load_in_4bit=True needs the bitsandbytes package, which is not installed. Install it with "
            "`pip install bitsandbytes`, or set teacher_load_in_4bit=False."
        )
    device_type = torch.device(device).type
    if device_type not in BNB_4BIT_DEVICES:
        raise ValueError(
            f"teacher_load_in_4bit=True is not supported on device {device_type!r}: bitsandbytes has 4-bit kernels "
            f"for {', '.join(BNB_4BIT_DEVICES)} only. Train on one of those, or set teacher_load_in_4bit=False."
        )


def check_loaded_teacher(teacher: Any, args: Any) -> None:
    """Raise for settings that apply only to a teacher given as a name or path when the teacher is a loaded model.

    - `teacher_load_in_4bit=True` on a teacher that is not quantized: it cannot be applied to a loaded model, and the
      teacher would stay in full precision (an out-of-memory on the GPU it was meant to fit, or silently more memory).
    - `teacher_model_init_kwargs`: loading arguments for a model that is already loaded.
    """
    if args.teacher_load_in_4bit and not is_quantized(teacher):
        path = getattr(teacher, "name_or_path", None) or "path/to/teacher"
        raise ValueError(
            f"teacher_load_in_4bit=True loads a teacher given as a name or path in 4-bit, but the teacher passed is an "
            f"already loaded {type(teacher).__name__} in {getattr(teacher, 'dtype', 'full precision')}, which it "
            f"cannot quantize: it would train in full precision. Pass its name or path instead "
            f"(teacher_model={path!r}), or load it in 4-bit yourself: AutoModelForCausalLM.from_pretrained({path!r}, "
            "quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4'))."
        )
    if args.teacher_model_init_kwargs is not None:
        raise ValueError(
            "You passed teacher_model_init_kwargs to the config, but your teacher_model is already loaded: those "
            "arguments apply to a teacher given as a name or path. Remove them, or pass the teacher's name or path."
        )


def check_gate_top_k(args: Any, vocab_size: int) -> None:
    """Raise when the `topk` gate's k (any k of its schedule) is not below the vocabulary size: every token is then
    among the teacher's top k, and the gate would accept everything, the ungated loss under another name."""
    if args.gate != "topk":
        return
    if args.gate_top_k_schedule == "constant":
        ks = {"gate_top_k": args.gate_top_k}
    else:
        ks = {"gate_top_k_start": args.gate_top_k_start, "gate_top_k_end": args.gate_top_k_end}
    for name, k in ks.items():
        if k >= vocab_size:
            raise ValueError(
                f"{name}={k} is not below the vocabulary size {vocab_size}: every token is among the teacher's top "
                f"{k}, so gate='topk' would accept every proposal (the loss of gate='none'). Use a k below "
                f"{vocab_size} (the default is 5), or gate='none' for the ungated loss."
            )


ZERO3_TRAINABLE_HEAD = (
    "loss_path='chunked' reads the {role}'s output layer directly, and under DeepSpeed ZeRO-3 a trainable output "
    "layer's gradient would not reach ZeRO-3's partitioned gradient. Freeze lm_head (train the student with LoRA, "
    "peft_config=LoraConfig(...), whose lm_head stays frozen) or use loss_path='eager'."
)


def check_zero3_chunked(student: Any, loss_path: str) -> None:
    """Refuse, before any training, the chunked loss on a DeepSpeed ZeRO-3 student whose output layer is trainable
    (`models.output_head` reads the layer outside its forward, where ZeRO-3 cannot reduce its gradient)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if loss_path != "chunked" or not is_deepspeed_zero3_enabled():
        return
    head = student.get_output_embeddings() if hasattr(student, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.requires_grad:
        raise ValueError(ZERO3_TRAINABLE_HEAD.format(role="student"))


def check_zero3_quantized_teacher(quantized: bool) -> None:
    """Refuse a 4-bit (or 8-bit) teacher under DeepSpeed ZeRO-3, before it is loaded or partitioned.

    ZeRO-3 partitions the teacher too (TRL's `prepare_deepspeed`), and bitsandbytes' packed weights do not come back
    whole from its gather: measured on 2 CPU processes, the first step matches one process and the later ones do not
    (under ZeRO-2 the teacher stays whole on each process and every step matches).
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if quantized and is_deepspeed_zero3_enabled():
        raise ValueError(
            "A quantized (bitsandbytes 4-bit / 8-bit) teacher is not supported under DeepSpeed ZeRO-3: ZeRO-3 "
            "partitions the teacher, and the quantized weights do not survive its gather (the teacher's outputs "
            "change after the first step). Use ZeRO-2 or FSDP2 (the 4-bit teacher then stays whole on each "
            "process), or an unquantized teacher (teacher_load_in_4bit=False) that ZeRO-3 shards."
        )


def is_quantized(model: Any) -> bool:
    """Whether a loaded model holds quantized (bitsandbytes, GPTQ, AWQ, ...) weights."""
    return bool(
        getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or getattr(model, "hf_quantizer", None) is not None
        or getattr(model, "is_quantized", False)
    )


def check_quantized_student(model: Any, peft_config: Any) -> None:
    """Raise for a quantized student without adapters: its quantized weights cannot be trained."""
    if peft_config is None and is_quantized(model) and not hasattr(model, "peft_config"):
        raise ValueError(
            f"The student {type(model).__name__} is quantized, and quantized weights cannot be trained directly. "
            "Pass `peft_config=` (e.g. `LoraConfig(r=16, target_modules='all-linear')`) to train adapters on it "
            "(QLoRA), or load the student unquantized."
        )


def _columns(dataset: Any) -> list[str] | None:
    columns = getattr(dataset, "column_names", None)
    if columns is None and isinstance(dataset, IterableDataset) and dataset.features is not None:
        columns = list(dataset.features)
    return columns


def dataset_format(dataset: Any) -> str | None:
    """``"messages"``, ``"prompt_completion"``, ``"tokenized"`` or None, from the dataset's columns."""
    columns = _columns(dataset)
    if columns is None:
        return None
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "input_ids" in columns:
        return "tokenized"
    return "unknown"


def check_dataset(dataset: Any, tokenizer: Any, max_length: int | None, name: str = "train_dataset") -> None:
    """Raise for an empty dataset, rows without `messages` or `prompt`/`completion`, a chat dataset with a tokenizer
    that has no chat template, or a `max_length` that does not leave room for a completion after a prompt.

    Only `datasets.Dataset` rows are read (the first `MAX_LENGTH_CHECK_ROWS` for the length check); other datasets
    (iterable, torch) are checked by their columns when they have some.
    """
    if dataset is None:
        return
    _check_not_empty(dataset, name)
    kind, columns = dataset_format(dataset), _columns(dataset)
    if kind == "unknown":
        raise ValueError(
            f"{name} has columns {columns}, but SpecKDTrainer needs chat rows `messages` (a list of "
            "{'role', 'content'} dicts ending with the assistant turn) or `prompt` and `completion` columns. "
            f"{_column_advice(columns)}"
        )
    if kind == "tokenized" and "prompt" not in columns:
        raise ValueError(
            f"{name} has tokenized rows (`input_ids`) but no `prompt` column: TRL's GKD collator reads the prompt's "
            "text from it (for on-policy generation it needs the prompt). Add the prompt text as a `prompt` column, "
            "or pass `prompt` and `completion` text columns and let the trainer tokenize them."
        )
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    chat = kind == "messages" or (kind == "prompt_completion" and _is_conversational(_first(dataset)["prompt"]))
    if chat:
        _check_chat_template(tokenizer, name)
    if max_length is not None and isinstance(dataset, Dataset) and kind in ("messages", "prompt_completion"):
        longest, row = 0, -1
        for i, example in enumerate(dataset.select(range(min(len(dataset), MAX_LENGTH_CHECK_ROWS)))):
            n = len(prompt_token_ids(example, tokenizer))
            if n > longest:
                longest, row = n, i
        if longest >= max_length:
            raise ValueError(
                f"max_length={max_length} is shorter than the prompts: the prompt of row {row} of {name} has "
                f"{longest} tokens, which leaves no room for a completion (sequences are cut to max_length tokens). "
                f"Raise max_length above {longest} (prompt plus completion), or shorten or filter the long prompts."
            )


def named_datasets(dataset: Any, name: str) -> list[tuple[str, Any]]:
    """`[(name, dataset)]`, or for a dict of datasets (several evaluation sets) one `name[key]` per entry."""
    if isinstance(dataset, dict):
        return [(f"{name}[{key!r}]", value) for key, value in dataset.items()]
    return [(name, dataset)]


def check_prompt_dataset(dataset: Any, tokenizer: Any, name: str = "train_dataset") -> None:
    """`check_dataset` for `SpecKDDistillationTrainer`, which reads prompts only: raise for an empty dataset, rows
    without a `prompt` column (text or chat messages) or chat `messages`, or chat rows with a tokenizer that has no
    chat template. Runs before any model is loaded."""
    if dataset is None:
        return
    _check_not_empty(dataset, name)
    columns = _columns(dataset)
    if columns is not None and "prompt" not in columns and "messages" not in columns:
        advice = (
            "Rename the column that holds them, e.g. `dataset.rename_column('question', 'prompt')`."
            if "completion" not in columns
            else "Rename or map the columns."
        )
        raise ValueError(
            f"{name} has columns {columns}, but SpecKDDistillationTrainer needs prompts: a `prompt` column (text, or "
            "a list of {'role', 'content'} messages), or chat `messages` rows (every message before the last "
            f"assistant turn is the prompt). {advice}"
        )
    if columns is not None and isinstance(dataset, Dataset):
        first = _first(dataset)
        if "messages" in first or _is_conversational(first["prompt"]):
            _check_chat_template(getattr(tokenizer, "tokenizer", tokenizer), name)


def _check_not_empty(dataset: Any, name: str) -> None:
    if (isinstance(dataset, Dataset) or hasattr(dataset, "__len__")) and len(dataset) == 0:
        raise ValueError(
            f"{name} is empty (0 rows): there is nothing to distill on. Check the dataset path, split and any "
            "filtering applied before building the trainer."
        )


def _check_chat_template(tokenizer: Any, name: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{name} holds chat messages, but the tokenizer {type(tokenizer).__name__} has no chat template "
            "(tokenizer.chat_template is None), so the conversations cannot be turned into text. Use the chat/instruct "
            "model's tokenizer or set `tokenizer.chat_template = '...'` (a Jinja template)."
        )


def _column_advice(columns: list[str]) -> str:
    """What to do with a dataset of other columns than `SpecKDTrainer` reads, by what those columns hold."""
    if "conversations" in columns:
        return (
            "Rename the chat column: `dataset.rename_column('conversations', 'messages')` (ShareGPT rows also need "
            "their {'from', 'value'} keys mapped to {'role', 'content'})."
        )
    if "prompt" in columns:
        return (
            "Prompt-only rows have no completion for the dataset batches: for on-policy distillation from prompts "
            "alone use SpecKDDistillationTrainer (`speckd-trl --trainer distillation`), or add a `completion` column."
        )
    if "text" in columns:
        return (
            "Plain `text` rows have no prompt/completion boundary: split them into `prompt` and `completion` columns, "
            "or put the prompts alone in a `prompt` column for SpecKDDistillationTrainer (on-policy only)."
        )
    return "Rename or map the columns to `messages`, or to `prompt` and `completion`."


def _first(dataset: Any) -> dict[str, Any]:
    return dataset[0] if isinstance(dataset, Dataset) else next(iter(dataset))


def _is_conversational(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def prompt_token_ids(example: dict[str, Any], tokenizer: Any) -> list[int]:
    """The prompt's token ids, as `DataCollatorForChatML` tokenizes it."""
    if "messages" in example:
        text = tokenizer.apply_chat_template(example["messages"][:-1], add_generation_prompt=True, tokenize=False)
    elif _is_conversational(example["prompt"]):
        text = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=False)
    else:
        text = example["prompt"]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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
    if _is_conversational(dataset[0]["prompt"]):
        return dataset.map(to_messages, remove_columns=["prompt", "completion"])
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)

    def tokenize(example: dict[str, Any]) -> dict[str, Any]:
        prompt = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
        row = {"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)}
        return keep_last(row, limit)

    return dataset.map(tokenize, remove_columns=["completion"])
