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
speckd-trl --trainer distillation --model_name_or_path ... --teacher_model_name_or_path ... --dataset_name ... \\
    --gate spec --max_completion_length 128 --use_vllm    # on trl.DistillationTrainer (on-policy only, vLLM)
accelerate launch --config_file examples/accelerate/multi_gpu.yaml -m speckd_trl --config recipe.yaml   # DDP
accelerate launch --config_file examples/accelerate/multi_cpu.yaml -m speckd_trl --use_cpu --config recipe.yaml
speckd-trl cache-teacher --config recipe.yaml --teacher_cache cache/   # the teacher's top-K, once (teacher_cache.py)
speckd-trl --config recipe.yaml --teacher_cache cache/ --lmbda 0     # then train from it, no teacher in memory
speckd-trl check-teacher --config recipe.yaml   # what quantizing the teacher costs it (teacher_check.py)
speckd-trl demo                            # the offline SmolLM2 demo (see speckd_trl/demo/app.py)
speckd-trl plan --teacher t/config.json --student s/config.json --teacher-quant nf4   # will it fit? (plan.py)
```

Datasets: a name that `datasets.load_dataset` knows, a local directory (`save_to_disk` output or data files), or one
local file (`.json`, `.jsonl`, `.parquet`, `.csv`). Rows are chat `messages` as for TRL's GKD. `--trainer distillation`
prompts with the messages before the last assistant turn (or reads a `prompt` column as `DistillationTrainer` does).

`--trainer gkd` (the default) trains a `SpecKDTrainer` and takes `SpecKDConfig`'s flags; `--trainer distillation`
trains a `SpecKDDistillationTrainer` and takes `SpecKDDistillationConfig`'s (the gate's flags are the same).
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
TRAINERS = ("gkd", "distillation")


@dataclass
class TrainerArguments:
    """Which SpecKD trainer `speckd-trl` builds."""

    trainer: str = field(
        default="gkd",
        metadata={
            "help": "'gkd': SpecKDTrainer, on TRL's GKDTrainer (dataset, on-policy and seq_kd completions mixed by "
            "lmbda). 'distillation': SpecKDDistillationTrainer, on trl.DistillationTrainer (on-policy only; vLLM "
            "generation with --use_vllm). Each takes its own config's flags.",
            "choices": list(TRAINERS),
        },
    )


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def make_parser(trainer: str = "gkd"):
    """The `TrlParser` over `ScriptArguments`, the trainer's config (`SpecKDConfig` for ``"gkd"``,
    `SpecKDDistillationConfig` for ``"distillation"``), `ModelConfig` and `TrainerArguments` (every field is a flag)."""
    from trl import ModelConfig, ScriptArguments, TrlParser

    from .config import SpecKDConfig, SpecKDDistillationConfig

    config_class = SpecKDDistillationConfig if trainer == "distillation" else SpecKDConfig
    return TrlParser((ScriptArguments, config_class, ModelConfig, TrainerArguments), prog="speckd-trl")


def trainer_choice(argv: Sequence[str]) -> str:
    """The `--trainer` of a command line (or of its `--config` YAML file), read before the full parse, which needs it
    to pick the config class; ``"gkd"`` when unset. An unknown value is left to the parser to report."""
    value = None
    for i, arg in enumerate(argv):
        if arg == "--trainer" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--trainer="):
            value = arg.split("=", 1)[1]
    if value is None and "--config" in argv:
        import yaml

        with open(argv[argv.index("--config") + 1]) as recipe:
            config = yaml.safe_load(recipe)
        value = config.get("trainer") if isinstance(config, dict) else None
    return value if isinstance(value, str) else "gkd"


def parse(parser, argv: list[str], trainer: str) -> tuple:
    """`parser.parse_args_and_config(argv)`, with TRL's message for unknown keys of a `--config` file (which tells
    the reader to change a parser setting) replaced by one that says what to change in the file."""
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as err:
        if not str(err).startswith("Unknown arguments from config file"):
            raise
        unknown = ", ".join(re.findall(r"'--([^']+)'", str(err))) or str(err)
        config = argv[argv.index("--config") + 1]
        raise CLIError(
            f"--config {config}: unknown keys: {unknown}. Every key of the recipe must be a flag of "
            f"`speckd-trl --trainer {trainer} --help` (without the leading dashes); remove or correct them."
        ) from None


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
        if fmt == "json" and not path.read_bytes().strip():  # `datasets` raises a bare StopIteration on it
            raise CLIError(f"--dataset_name {name}: the file is empty (no rows); there is nothing to distill on.")
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


def build_trainer(script_args, training_args, model_args, trainer_args: TrainerArguments | None = None):
    """A `SpecKDTrainer` (or, with `--trainer distillation`, a `SpecKDDistillationTrainer`) from parsed arguments."""
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from .distillation_trainer import SpecKDDistillationTrainer
    from .trainer import SpecKDTrainer

    _check_model_path("--model_name_or_path", model_args.model_name_or_path)
    cache_only = getattr(training_args, "teacher_cache", None) is not None and training_args.lmbda == 0
    if not (cache_only and training_args.teacher_model_name_or_path is None):
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

    trainer_class = SpecKDTrainer
    if trainer_args is not None and trainer_args.trainer == "distillation":
        trainer_class = SpecKDDistillationTrainer
    return trainer_class(
        model=model_args.model_name_or_path,
        teacher_model=training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )


def train(script_args, training_args, model_args, trainer_args: TrainerArguments | None = None) -> None:
    """Build the trainer (`build_trainer`), train, and save the student."""
    trainer = build_trainer(script_args, training_args, model_args, trainer_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Saved the student to {training_args.output_dir}.")
    # Every process leaves together (none exits while the main one still writes) and leaves the process group; a
    # multi-process job then exits through `exit_distributed_job` (see there).
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


CACHE_TEACHER_HELP = """\
Run the training recipe's teacher once over its training dataset (each row collated exactly as training collates
it) and write its top-K log-probabilities at every completion token to --teacher_cache DIR, shard by shard
(resumable: rerun the same command after an interruption). Then train from it without the teacher in memory:
    speckd-trl --config recipe.yaml --teacher_cache DIR --lmbda 0
See docs/teacher-cache.md.

The keys that matter (every other key of the recipe is read as training reads it):
  --teacher_cache DIR           where the cache goes (required; the same key trains from it)
  --teacher_cache_top_k K       teacher tokens kept per position (default 32); the topk gate needs gate_top_k <= K
  --teacher_cache_dtype         storage of the log-probabilities: float16 (default) or float32
  --teacher_model_name_or_path  the teacher; the cache records its name, a fingerprint of its weights and the
                                precision it ran in (teacher_quantization / teacher_load_in_4bit), and training
                                refuses it for another teacher
  --model_name_or_path          the student: its tokenizer and chat template tokenize the rows
  --dataset_name, --dataset_train_split, --max_length
                                the rows: training refuses a cache of other rows or another max_length
  --per_device_eval_batch_size  rows per teacher forward pass

One process only (not under `accelerate launch`); a second cache-teacher on the same DIR is refused while the first
writes ("in use by another process").
"""


def make_cache_teacher_parser(trainer: str = "gkd"):
    """`make_parser` for `speckd-trl cache-teacher`: the same flags, its own usage line and description."""
    import argparse

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The description as written, the flags with their defaults."""

    parser = make_parser(trainer)
    parser.prog, parser.description, parser.formatter_class = "speckd-trl cache-teacher", CACHE_TEACHER_HELP, Formatter
    parser.usage = (
        "speckd-trl cache-teacher --config recipe.yaml --teacher_cache DIR [--teacher_cache_top_k K] [training flags]"
    )
    return parser


def cache_teacher(script_args, training_args, model_args, trainer_args: TrainerArguments | None = None) -> None:
    """`speckd-trl cache-teacher --config recipe.yaml`: the training recipe's teacher over its dataset, top-K
    log-probabilities at every completion position, written to `--teacher_cache` (resumable; `teacher_cache.py`)."""
    import time

    if trainer_args is not None and trainer_args.trainer != "gkd":
        raise CLIError("cache-teacher caches dataset completions, which only --trainer gkd (SpecKDTrainer) trains on.")
    path = training_args.teacher_cache
    if path is None:
        raise CLIError(
            "cache-teacher needs --teacher_cache DIR (where to write the cache; the same key trains from it)."
        )
    # the trainer that would train on the recipe, with its teacher loaded and no cache read; nothing is evaluated
    training_args.teacher_cache, training_args.eval_strategy = None, "no"
    started = time.time()
    trainer = build_trainer(script_args, training_args, model_args, trainer_args)
    cache = trainer.cache_teacher(path)
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    positions = cache.positions
    trainer.accelerator.print(
        f"Cached the teacher's top {cache.spec.top_k} at {positions} completion positions of {len(cache)} rows in "
        f"{path} ({size / 2**20:.1f} MiB, {size / max(positions, 1) * 1e6 / 2**30:.2f} GiB per million positions; "
        f"{time.time() - started:.0f} s). Train from it with --teacher_cache {path} (and --lmbda 0: no teacher)."
    )


def check_teacher(argv: list[str]) -> None:
    """`speckd-trl check-teacher --config recipe.yaml [--check_samples 64] [--check_sensitivity]`: the recipe's teacher
    as configured (`teacher_quantization`, `teacher_load_in_4bit`) against its full-precision self on the recipe's
    dataset rows: KL per completion token, top-1 agreement, memory, a verdict (`speckd_trl/teacher_check.py`)."""
    import argparse

    from transformers import AutoTokenizer

    from .teacher_check import check_teacher as measure
    from .teacher_check import format_report

    extra = argparse.ArgumentParser(
        prog="speckd-trl check-teacher",
        add_help=False,
        description="Load the recipe's teacher in full precision and as configured (teacher_quantization, "
        "teacher_load_in_4bit, teacher_quantization_skip_modules, teacher_bnb_4bit_*), compare them on the first "
        "rows of --dataset_name: KL per completion token, top-1 agreement, memory, a verdict. Takes every training "
        "flag (listed below) and these:",
    )
    extra.add_argument("--check_samples", type=int, default=64, help="dataset rows to compare the teachers on")
    extra.add_argument("--check_batch_size", type=int, default=8, help="rows per forward pass")
    extra.add_argument(
        "--check_sensitivity",
        action="store_true",
        help="also rank the decoder layers by the KL that rounding each alone to 4 bits costs",
    )
    if "-h" in argv or "--help" in argv:
        extra.print_help()
        print()
    options, rest = extra.parse_known_args(argv)
    script_args, training_args, model_args, _ = parse(make_parser("gkd"), rest, "gkd")
    teacher = training_args.teacher_model_name_or_path
    if teacher is None:
        raise CLIError("check-teacher needs --teacher_model_name_or_path (the teacher to check).")
    _check_model_path("--teacher_model_name_or_path", teacher)
    if script_args.dataset_name is None:
        raise CLIError("check-teacher needs --dataset_name (the rows to compare the teachers on).")
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path or teacher, trust_remote_code=training_args.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = load_train_dataset(script_args.dataset_name, script_args.dataset_config)[script_args.dataset_train_split]
    report = measure(teacher, training_args, dataset, tokenizer, samples=options.check_samples,
                     batch_size=options.check_batch_size, sensitivity=options.check_sensitivity)  # fmt: skip
    for line in format_report(report, training_args.teacher_quantization_skip_modules):
        print(line)


def demo(argv: list[str]) -> None:
    """`speckd-trl demo [--config examples/demo.yaml] [--field value ...]`: the offline SmolLM2 demo."""
    from trl import TrlParser

    from .demo import DemoConfig, run_demo

    (config,) = TrlParser((DemoConfig,), prog="speckd-trl demo").parse_args_and_config(argv)
    run_demo(config)


def make_plan_parser():
    """The `argparse` parser of `speckd-trl plan`."""
    import argparse

    from .plan import DEFAULT_RESERVE_GIB, ENGINES, LOSS_PATHS, OPTIMIZERS, STUDENT_MODES, TEACHER_QUANTS

    parser = argparse.ArgumentParser(
        prog="speckd-trl plan",
        description="Estimate the peak GPU memory of SpecKD training from the two models' configs (no weights "
        "needed), broken down by term, say whether it fits a budget, and which settings would make it fit.",
    )
    parser.add_argument("--teacher", required=True, help="Teacher: a model directory or a config.json file.")
    parser.add_argument("--student", required=True, help="Student: a model directory or a config.json file.")
    parser.add_argument(
        "--teacher-quant", choices=TEACHER_QUANTS, default="none", help="Teacher weights (default: none)."
    )
    parser.add_argument("--teacher-no-double-quant", "--teacher_no_double_quant", action="store_true",
                        help="A 4-bit teacher without double quantization (teacher_bnb_4bit_use_double_quant=False).")  # fmt: skip
    parser.add_argument("--teacher-full-layers", "--teacher_full_layers", type=int, default=0,
                        help="Decoder layers of a quantized teacher kept in full precision "
                        "(teacher_quantization_skip_modules; default: 0).")  # fmt: skip
    parser.add_argument(
        "--student-mode", choices=STUDENT_MODES, default="lora", help="Student training (default: lora)."
    )
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank on every linear layer (default: 16).")
    parser.add_argument("--batch-size", type=int, default=2, help="per_device_train_batch_size (default: 2).")
    parser.add_argument(
        "--seq-len", type=int, default=512, help="Dataset sequence length, prompt + completion (default: 512)."
    )
    parser.add_argument("--prompt-len", type=int, default=None, help="Prompt tokens (default: seq-len // 4).")
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="Tokens generated on on-policy steps (default: 128)."
    )
    parser.add_argument("--lmbda", type=float, default=0.5, help="Share of on-policy batches, as GKD (default: 0.5).")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="Student gradient checkpointing.")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="Optimizer (default: adamw).")
    parser.add_argument(
        "--loss-path",
        choices=LOSS_PATHS,
        default="chunked",
        help="SpecKD loss path (default: chunked, as SpecKDConfig).",
    )
    parser.add_argument(
        "--loss-chunk-size", type=int, default=256, help="Tokens per chunk of the chunked loss (default: 256)."
    )
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="Compute dtype of both models (default: bfloat16).")  # fmt: skip
    parser.add_argument("--num-processes", "--num_processes", type=int, default=1,
                        help="GPUs, one process each (default: 1); the plan is per process.")  # fmt: skip
    parser.add_argument("--engine", choices=ENGINES, default="ddp",
                        help="Multi-GPU engine: ddp replicates everything; fsdp2 (measured on CPU processes) and zero3 "
                        "(modelled as fsdp2, its memory not measured; no quantized teacher) shard weights, gradients and "
                        "optimizer states of student and unquantized teacher over the processes (default: ddp).")  # fmt: skip
    parser.add_argument("--teacher-offload", "--teacher_offload", action="store_true",
                        help="Teacher weights kept in host memory, streamed to the GPU on each forward pass.")  # fmt: skip
    parser.add_argument("--teacher-cache-top-k", "--teacher_cache_top_k", type=int, default=0,
                        help="Dataset batches read a teacher cache of this K (speckd-trl cache-teacher) instead of "
                        "running the teacher; with --lmbda 0 no teacher is loaded (default: 0, no cache).")  # fmt: skip
    parser.add_argument("--budget-gib", type=float, default=24.0, help="GPU memory in GiB (default: 24).")
    parser.add_argument("--reserve-gib", type=float, default=DEFAULT_RESERVE_GIB,
                        help=f"GiB kept free for the CUDA context and fragmentation (default: {DEFAULT_RESERVE_GIB:g}).")  # fmt: skip
    return parser


def plan(argv: list[str]) -> None:
    """`speckd-trl plan ...`: print the memory plan (see `speckd_trl.plan`)."""
    from .plan import PlanConfig, estimate_memory, format_plan

    args = make_plan_parser().parse_args(argv)
    for flag, value in (("--teacher", args.teacher), ("--student", args.student)):
        if not Path(value).expanduser().exists():
            raise CLIError(f"{flag} {value}: no such file or directory (give a model directory or a config.json).")
    config = PlanConfig(
        teacher=args.teacher,
        student=args.student,
        teacher_quant=args.teacher_quant,
        teacher_double_quant=not args.teacher_no_double_quant,
        teacher_full_layers=args.teacher_full_layers,
        student_mode=args.student_mode,
        lora_r=args.lora_r,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        prompt_len=args.prompt_len,
        max_new_tokens=args.max_new_tokens,
        lmbda=args.lmbda,
        gradient_checkpointing=args.gradient_checkpointing,
        optimizer=args.optimizer,
        loss_path=args.loss_path,
        loss_chunk_size=args.loss_chunk_size,
        dtype=args.dtype,
        num_processes=args.num_processes,
        engine=args.engine,
        teacher_offload=args.teacher_offload,
        teacher_cache_top_k=args.teacher_cache_top_k,
    )
    print(format_plan(estimate_memory(config), budget_gib=args.budget_gib, reserve_gib=args.reserve_gib))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `speckd-trl` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes drown the errors
    try:
        if argv[:1] == ["plan"]:
            plan(argv[1:])
            return 0
        is_demo = argv[:1] == ["demo"]
        is_cache = argv[:1] == ["cache-teacher"]
        is_check = argv[:1] == ["check-teacher"]
        command = argv[1:] if is_demo or is_cache or is_check else argv
        if "--config" in command:
            value_index = command.index("--config") + 1
            path = command[value_index] if value_index < len(command) else ""
            if not Path(path).is_file():
                raise CLIError(f"--config {path}: no such file.")
        if is_demo:
            demo(command)
        elif is_check:
            check_teacher(command)
        elif is_cache:
            trainer = trainer_choice(command)
            cache_teacher(*parse(make_cache_teacher_parser(trainer), command, trainer))
        else:
            trainer = trainer_choice(command)
            train(*parse(make_parser(trainer), command, trainer))
    except CLIError as err:
        print(f"speckd-trl: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        # configuration and loading errors already say what is wrong and how to fix it: no traceback
        print(f"speckd-trl: error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


def exit_distributed_job(status: int) -> NoReturn:
    """End this process of a multi-process job with `status`, without the interpreter's teardown.

    A 2-process CPU (gloo) job could exit 134 after it had trained and saved everything: SIGABRT, "terminate called
    without an active exception", in the interpreter's teardown, when gloo's work objects, which hold tensors, are
    destroyed while the interpreter is being torn down (pytorch/pytorch#190489; the upstream fix, an exit handler
    that destroys the process groups, was abandoned: pytorch/pytorch#179291). Leaving the process group first
    (`destroy_process_group`) and collecting garbage does not prevent it from our side: measured in the CLI's job,
    the world group's object is still alive after both, held from outside any Python object (a weak reference to it
    stays valid, `gc.get_referrers` finds nothing). So once every output is written, each process runs the exit
    handlers the interpreter would run (`atexit`: logging's flush and close, experiment trackers), flushes its
    standard streams and leaves with `os._exit(status)`, skipping only the teardown where the abort happens.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def run() -> None:
    """The `speckd-trl` console script and `python -m speckd_trl`: `main()`, then exit with its status; a process of
    a multi-process job (`WORLD_SIZE > 1`, as set by `accelerate launch` and `torchrun`) exits through
    `exit_distributed_job`."""
    status = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_distributed_job(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
