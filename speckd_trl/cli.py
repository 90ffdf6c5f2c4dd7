"""`speckd-trl`: train a student with SpecKD from the shell, in TRL's script conventions.

```bash
speckd-trl \\
    --model_name_or_path path/to/student \\
    --teacher_model_name_or_path path/to/teacher --teacher_load_in_4bit \\
    --dataset_name data/train.jsonl \\
    --gate topk --gate_top_k 5 --lmbda 0.5 \\
    --use_peft --lora_r 16 --lora_target_modules all-linear \\
    --output_dir out
speckd-trl --config recipe.yaml            # YAML keys are the same flags; the command line overrides them
accelerate launch -m speckd_trl --config recipe.yaml   # or: torchrun --nproc_per_node 2 -m speckd_trl ...
speckd-trl demo                            # the offline SmolLM2 demo (see speckd_trl/demo.py)
```

Datasets: a name that `datasets.load_dataset` knows, a local directory (`save_to_disk` output or data files), or one
local file (`.json`, `.jsonl`, `.parquet`, `.csv`). Rows are chat `messages` as for TRL's GKD.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def make_parser():
    """The `TrlParser` over `ScriptArguments`, `SpecKDConfig` and `ModelConfig` (every field is a flag)."""
    from trl import ModelConfig, ScriptArguments, TrlParser

    from .config import SpecKDConfig

    return TrlParser((ScriptArguments, SpecKDConfig, ModelConfig), prog="speckd-trl")


def load_train_dataset(name: str, config: str | None = None):
    """A `DatasetDict` from a hub-style name, a local directory or a single local file."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(name)
    if path.is_file():
        fmt = LOCAL_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise CLIError(
                f"--dataset_name {name}: unsupported file type {path.suffix!r}; use {sorted(LOCAL_FORMATS)}."
            )
        return load_dataset(fmt, data_files=str(path))
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            dataset = load_from_disk(str(path))
            return dataset if isinstance(dataset, DatasetDict) else DatasetDict({"train": dataset})
        return load_dataset(str(path), name=config)
    if name.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_FORMATS:
        raise CLIError(f"--dataset_name {name}: no such file or directory.")
    return load_dataset(name, name=config)


def _check_model_path(flag: str, value: str | None) -> None:
    if value is None:
        raise CLIError(f"{flag} is required.")
    looks_local = value.startswith((".", "/", "~")) or value.count("/") > 1
    if looks_local and not Path(value).expanduser().exists():
        raise CLIError(f"{flag} {value}: no such directory.")


def train(script_args, training_args, model_args) -> None:
    """Build a `SpecKDTrainer` from parsed arguments, train, and save the student."""
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from .trainer import SpecKDTrainer

    _check_model_path("--model_name_or_path", model_args.model_name_or_path)
    _check_model_path("--teacher_model_name_or_path", training_args.teacher_model_name_or_path)
    if script_args.dataset_name is None:
        raise CLIError(
            "--dataset_name is required (a dataset name, a local directory or a .json/.jsonl/.parquet file)."
        )

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:  # QLoRA student
        model_init_kwargs.update(quantization_config=quantization_config, device_map={"": training_args.device})
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    dataset = load_train_dataset(script_args.dataset_name, script_args.dataset_config)
    if script_args.dataset_train_split not in dataset:
        raise CLIError(
            f"--dataset_train_split {script_args.dataset_train_split}: the dataset has splits {list(dataset)}."
        )
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = dataset.get(script_args.dataset_test_split)

    trainer = SpecKDTrainer(
        model=model_args.model_name_or_path,
        teacher_model=training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Saved the student to {training_args.output_dir}.")


def demo(argv: list[str]) -> None:
    """`speckd-trl demo [--config examples/demo.yaml] [--field value ...]`: the offline SmolLM2 demo."""
    from trl import TrlParser

    from .demo import DemoConfig, run_demo

    (config,) = TrlParser((DemoConfig,), prog="speckd-trl demo").parse_args_and_config(argv)
    run_demo(config)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `speckd-trl` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes drown the errors
    try:
        is_demo = argv[:1] == ["demo"]
        command = argv[1:] if is_demo else argv
        if "--config" in command:
            value_index = command.index("--config") + 1
            path = command[value_index] if value_index < len(command) else ""
            if not Path(path).is_file():
                raise CLIError(f"--config {path}: no such file.")
        if is_demo:
            demo(command)
        else:
            train(*make_parser().parse_args_and_config(command))
    except CLIError as err:
        print(f"speckd-trl: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        # configuration and loading errors already say what is wrong and how to fix it: no traceback
        print(f"speckd-trl: error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
