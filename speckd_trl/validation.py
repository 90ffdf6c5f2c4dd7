"""Up-front checks of the trainer's inputs: each raises before any training with one message that says what is wrong,
the offending value and how to fix it.

The dataset transforms these checks come before are in `data.py`.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any

import torch
from datasets import Dataset

from .data import columns_of, dataset_format, is_conversational
from .losses import LossPath
from .models import ZERO3_TRAINABLE_HEAD, is_quantized, output_vocab_size


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
        args.modes.on_policy_generation.speculative
        and getattr(accelerator.state, "fsdp_plugin", None) is not None
        and accelerator.num_processes > 1
    ):
        raise ValueError(
            "on_policy_generation='speculative' is not supported under FSDP with several processes: each process "
            "would run its own number of forwards through the sharded models and wait on the others forever. Use "
            "on_policy_generation='student' (transformers' generate, kept in step across processes), or DDP."
        )


def check_4bit_teacher(device: torch.device | str, setting: str = "teacher_load_in_4bit=True") -> None:
    """Raise if a bitsandbytes teacher (`setting`: what asked for it) cannot be loaded here: bitsandbytes missing, or a
    device it has no kernels for."""
    if not bitsandbytes_available():
        raise ImportError(
            f"{setting} needs the bitsandbytes package, which is not installed. Install it with "
            "`pip install bitsandbytes`, or load the teacher in full precision (teacher_quantization='none')."
        )
    device_type = torch.device(device).type
    if device_type not in BNB_4BIT_DEVICES:
        raise ValueError(
            f"{setting} is not supported on device {device_type!r}: bitsandbytes has kernels for "
            f"{', '.join(BNB_4BIT_DEVICES)} only. Train on one of those, or load the teacher in full precision "
            "(teacher_quantization='none')."
        )


def quantization_setting(args: Any) -> str:
    """How the config asks for a quantized teacher, as the user wrote it (for error messages)."""
    if args.teacher_load_in_4bit and args.teacher_quantization == "auto":
        return "teacher_load_in_4bit=True"
    return f"teacher_quantization={args.teacher_quantization_method!r}"


def check_loaded_teacher(teacher: Any, args: Any) -> None:
    """Raise for settings that apply only to a teacher given as a name or path when the teacher is a loaded model.

    - `teacher_load_in_4bit=True` (or another `teacher_quantization`) on a teacher that is not quantized: it cannot be applied to a loaded model, and the
      teacher would stay in full precision (an out-of-memory on the GPU it was meant to fit, or silently more memory).
    - `teacher_model_init_kwargs`: loading arguments for a model that is already loaded.
    """
    method = args.teacher_quantization_method
    if method != "none" and not is_quantized(teacher):
        path = getattr(teacher, "name_or_path", None) or "path/to/teacher"
        example = (
            "BitsAndBytesConfig(load_in_8bit=True)"
            if method == "int8"
            else f"BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='{method}')"
            if method in ("nf4", "fp4")
            else "the QuantizationConfig you passed"
        )
        raise ValueError(
            f"{quantization_setting(args)} quantizes a teacher given as a name or path, but the teacher passed is an "
            f"already loaded {type(teacher).__name__} in {getattr(teacher, 'dtype', 'full precision')}, which it "
            f"cannot quantize: it would train in full precision. Pass its name or path instead "
            f"(teacher_model={path!r}), or load it quantized yourself: AutoModelForCausalLM.from_pretrained({path!r}, "
            f"quantization_config={example})."
        )
    if args.teacher_model_init_kwargs is not None:
        raise ValueError(
            "You passed teacher_model_init_kwargs to the config, but your teacher_model is already loaded: those "
            "arguments apply to a teacher given as a name or path. Remove them, or pass the teacher's name or path."
        )


def check_gate_top_k(args: Any, vocab_size: int) -> None:
    """Raise when the k of a rule that reads it (`topk`; any k of its schedule) is not below the vocabulary size: every
    token is then among the teacher's top k, and the gate would accept everything, the ungated loss under another
    name."""
    if not args.gate_rule.uses_top_k:
        return
    for name, k in args.modes.top_k.fields("gate_top_k").items():  # the fields that set k, by name
        if k >= vocab_size:
            raise ValueError(
                f"{name}={k} is not below the vocabulary size {vocab_size}: every token is among the teacher's top "
                f"{k}, so gate={args.gate!r} would accept every proposal (the loss of gate='none'). Use a k below "
                f"{vocab_size} (the default is 5), or gate='none' for the ungated loss."
            )


def check_zero3_chunked(student: Any, loss_path: LossPath) -> None:
    """Refuse, before any training, a loss path that reads the output layer directly (the chunked one) on a DeepSpeed
    ZeRO-3 student whose output layer is trainable (`models.output_head` reads the layer outside its forward, where
    ZeRO-3 cannot reduce its gradient)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not loss_path.from_hidden_states or not is_deepspeed_zero3_enabled():
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


def check_quantized_student(model: Any, peft_config: Any) -> None:
    """Raise for a quantized student without adapters: its quantized weights cannot be trained."""
    if peft_config is None and is_quantized(model) and not hasattr(model, "peft_config"):
        raise ValueError(
            f"The student {type(model).__name__} is quantized, and quantized weights cannot be trained directly. "
            "Pass `peft_config=` (e.g. `LoraConfig(r=16, target_modules='all-linear')`) to train adapters on it "
            "(QLoRA), or load the student unquantized."
        )


def check_dataset(dataset: Any, tokenizer: Any, max_length: int | None, name: str = "train_dataset") -> None:
    """Raise for an empty dataset, rows without `messages` or `prompt`/`completion`, a chat dataset with a tokenizer
    that has no chat template, or a `max_length` that does not leave room for a completion after a prompt.

    Only `datasets.Dataset` rows are read (the first `MAX_LENGTH_CHECK_ROWS` for the length check); other datasets
    (iterable, torch) are checked by their columns when they have some.
    """
    if dataset is None:
        return
    _check_not_empty(dataset, name)
    kind, columns = dataset_format(dataset), columns_of(dataset)
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
    chat = kind == "messages" or (kind == "prompt_completion" and is_conversational(_first(dataset)["prompt"]))
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
    columns = columns_of(dataset)
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
        if "messages" in first or is_conversational(first["prompt"]):
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


def prompt_token_ids(example: dict[str, Any], tokenizer: Any) -> list[int]:
    """The prompt's token ids, as `DataCollatorForChatML` tokenizes it."""
    if "messages" in example:
        text = tokenizer.apply_chat_template(example["messages"][:-1], add_generation_prompt=True, tokenize=False)
    elif is_conversational(example["prompt"]):
        text = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=False)
    else:
        text = example["prompt"]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_pad_token(processing_class: Any) -> None:
    """Raise if the tokenizer has no pad token (batches and generated sequences need one)."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer is None:
        raise ValueError("SpecKDTrainer needs `processing_class` (the tokenizer shared by student and teacher).")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError(
            "The tokenizer has no pad token (pad_token_id is None). Set one before building the trainer, e.g. "
            "`tokenizer.pad_token = tokenizer.eos_token`, or add a dedicated one with "
            "`tokenizer.add_special_tokens({'pad_token': '<pad>'})` and resize the models' embeddings."
        )


def check_vocab(
    student: torch.nn.Module, teacher: torch.nn.Module, tokenizer: Any, teacher_tokenizer: Any = None
) -> int | None:
    """Raise if student and teacher logits cannot be compared token by token; say how many logits to compare.

    - With `teacher_tokenizer` (the teacher's own, when it was loaded from a directory that has one), both tokenizers
      must map the same ids to the same tokens on their shared ids (`get_vocab()`), not merely have the same size.
    - Each model's output must cover every id of `tokenizer`.
    - Outputs of different sizes are accepted when both cover the tokenizer (an embedding padded past the tokenizer,
      as Qwen models have): the logits are then compared on the tokenizer's ids only.

    Returns:
        `len(tokenizer)` when the two output sizes differ (slice both models' logits to it), else None.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if teacher_tokenizer is not None:
        check_same_tokens(tokenizer, getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer))
    n_student = check_covers_tokenizer(student, "student", tokenizer)
    n_teacher = check_covers_tokenizer(teacher, "teacher", tokenizer)
    if n_student != n_teacher:
        # both cover the tokenizer (checked above): the extra rows are padding that no token id reaches
        return len(tokenizer)
    return None


def check_covers_tokenizer(model: torch.nn.Module, role: str, tokenizer: Any) -> int:
    """Raise unless `model` has a logit for every id of `tokenizer`; return its output size."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    n, n_tokenizer = output_vocab_size(model), len(tokenizer)
    if n_tokenizer > n:
        raise ValueError(
            f"Vocabulary mismatch: the tokenizer has {n_tokenizer} tokens but the {role} produces only {n} "
            f"logits, so it was not trained with this tokenizer (token ids >= {n} have no logit). SpecKD "
            "compares the two next-token distributions id by id: pass the tokenizer both models were trained "
            "with (a teacher and student of the same family share one), or distill across tokenizers with "
            "SpecKDGOLDTrainer (TRL's GOLD / ULD, which aligns them, with the gate). Resizing the embeddings would only silence this "
            "error: the new rows are untrained."
        )
    return n


def check_same_tokens(tokenizer: Any, teacher_tokenizer: Any) -> None:
    """Raise if the two tokenizers give a shared id to different tokens (compared on the ids both have)."""
    student_vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    teacher_vocab = {i: t for t, i in teacher_tokenizer.get_vocab().items()}
    shared = sorted(set(student_vocab) & set(teacher_vocab))
    differing = [i for i in shared if student_vocab[i] != teacher_vocab[i]]
    if differing or not shared:
        examples = ", ".join(f"id {i}: {student_vocab[i]!r} vs {teacher_vocab[i]!r}" for i in differing[:3])
        raise ValueError(
            f"Vocabulary mismatch: the student's tokenizer and the teacher's tokenizer differ on {len(differing)} of "
            f"their {len(shared)} shared token ids ({examples}). SpecKD compares the two next-token distributions "
            "id by id, so both models must use the same tokenizer: pick a teacher and student of the same family, "
            "or distill across tokenizers with SpecKDGOLDTrainer (SpecKDGOLDConfig: TRL's GOLD, whose ULD loss aligns the "
            "two tokenizations, with the gate)."
        )
