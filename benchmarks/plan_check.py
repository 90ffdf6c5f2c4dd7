"""The memory planner against measured peak memory: small models on a CPU, SpecKD optimizer steps, side by side.

    python benchmarks/plan_check.py                 # the default configurations (a few minutes on 2 cores)
    python benchmarks/plan_check.py --only full-eager-off,lora-chunked-on

Random-init Qwen2 teacher and student built from configs (no download), tens of millions of parameters, vocabulary
32000, float32 (CPU). Each configuration runs in a fresh subprocess: it imports torch / transformers / trl / peft,
runs one throw-away step of a tiny model through the same code path (so that lazily imported modules, thread pools
and kernels are resident before the baseline), then takes the baseline (`VmRSS`, `VmHWM` reset through
`/proc/self/clear_refs`), builds the teacher and student, the `SpecKDTrainer` and its optimizer, and runs `--steps`
optimizer steps (`training_step` + `optimizer.step` + `zero_grad`). Measured = peak resident set (`VmHWM`) minus the
baseline: exactly the planner's terms (weights, LoRA, gradients, optimizer states, activations, logits, generation
cache). glibc is told to map every allocation above 1 MiB separately (`MALLOC_MMAP_THRESHOLD_`), so that freed
tensors leave the resident set at once. On a GPU the child measures `torch.cuda.max_memory_allocated` instead.

Prints planner estimate vs measured and their ratio per configuration, a final JSON line, and saves a plot
(`plan_check.png` next to this script; gitignored: its figures are in the README tables).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

VOCAB = 32000
TEACHER = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
               num_key_value_heads=2)  # fmt: skip
STUDENT = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2)  # fmt: skip

# name: (student mode, loss path, on-policy, gradient checkpointing, batch, seq, vocab); "-nf4": NF4 teacher
CONFIGS = {
    "full-eager-off": ("full", "eager", False, False, 2, 512, VOCAB),
    "full-chunked-off": ("full", "chunked", False, False, 2, 512, VOCAB),
    "lora-eager-off": ("lora", "eager", False, False, 2, 512, VOCAB),
    "lora-chunked-off": ("lora", "chunked", False, False, 2, 512, VOCAB),
    "full-eager-on": ("full", "eager", True, False, 2, 512, VOCAB),
    "lora-chunked-on": ("lora", "chunked", True, False, 2, 512, VOCAB),
    "lora-eager-ckpt-off": ("lora", "eager", False, True, 4, 512, VOCAB),
    "full-eager-off-v8k": ("full", "eager", False, False, 4, 512, 8000),
    "lora-chunked-off-nf4": ("lora", "chunked", False, False, 2, 512, VOCAB),
    # smaller ones, for tests/test_plan.py
    "test-full-eager-off": ("full", "eager", False, False, 2, 256, VOCAB),
    "test-lora-chunked-off": ("lora", "chunked", False, False, 2, 256, VOCAB),
    "test-lora-eager-on": ("lora", "eager", True, False, 2, 256, VOCAB),
    "test-full-chunked-on": ("full", "chunked", True, False, 2, 256, VOCAB),
}
DEFAULT = [name for name in CONFIGS if not name.startswith("test-")]
NEW_TOKENS = 32


def qwen2_config(shape: dict, vocab: int, max_positions: int) -> dict:
    return dict(model_type="qwen2", vocab_size=vocab, max_position_embeddings=max_positions,
                tie_word_embeddings=False, **shape)  # fmt: skip


def plan_config(name: str, teacher: dict = TEACHER, student: dict = STUDENT):
    """The `PlanConfig` of configuration `name` (see `CONFIGS`)."""
    from speckd_trl.plan import PlanConfig

    mode, loss_path, on_policy, ckpt, batch, seq, vocab = CONFIGS[name]
    return PlanConfig(
        teacher=qwen2_config(teacher, vocab, 2 * seq),
        student=qwen2_config(student, vocab, 2 * seq),
        teacher_quant="nf4" if name.endswith("-nf4") else "none",
        student_mode=mode,
        lora_r=16,
        batch_size=batch,
        seq_len=seq,
        prompt_len=seq - NEW_TOKENS if on_policy else seq // 4,
        max_new_tokens=NEW_TOKENS,
        lmbda=1.0 if on_policy else 0.0,
        gradient_checkpointing=ckpt,
        optimizer="adamw",
        loss_path=loss_path,
        dtype="float32",
    )


# ----------------------------------------------------------------------------- one measurement (child process)


def run_steps(cfg, steps: int, on_measure_start=None) -> float:
    """Build the models of `cfg` (a `PlanConfig`), a `SpecKDTrainer`, and run `steps` optimizer steps."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from speckd_trl import SpecKDConfig, SpecKDTrainer
    from speckd_trl.plan import load_model_config
    from speckd_trl.testing import make_dataset, make_tokenizer, random_batch
    from speckd_trl.trainer import KIND_KEY, OFF_POLICY

    tokenizer = make_tokenizer()

    def build(seed, source):
        torch.manual_seed(seed)
        config = load_model_config(source)
        config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        return AutoModelForCausalLM.from_config(config)

    teacher = None
    if cfg.teacher_quant == "nf4":  # saved before the baseline; SpecKDTrainer loads it in NF4 as a user's run does
        teacher = tempfile.mkdtemp(prefix="plan-check-teacher-")
        build(1, cfg.teacher).save_pretrained(teacher)
    if on_measure_start is not None:
        on_measure_start()
    student = build(0, cfg.student)
    if teacher is None:
        teacher = build(1, cfg.teacher)
    on_policy = cfg.lmbda >= 1.0
    args = SpecKDConfig(
        output_dir=tempfile.mkdtemp(),
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        lmbda=cfg.lmbda,
        max_new_tokens=cfg.max_new_tokens,
        per_device_train_batch_size=cfg.batch_size,
        loss_path=cfg.loss_path,
        loss_chunk_size=cfg.loss_chunk_size,
        gate="topk",
        reject_weight=0.1,  # random models reject nearly everything: keep a non-zero loss
        beta=0.5,
        learning_rate=1e-4,
        teacher_load_in_4bit=cfg.teacher_quant == "nf4",
    )
    peft_config = None
    if cfg.student_mode == "lora":
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, target_modules="all-linear")
    trainer = SpecKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=make_dataset(4),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.generation_config.eos_token_id = None  # every on-policy sequence gets exactly max_new_tokens tokens
    trainer.current_gradient_accumulation_steps = 1  # set by `train()`, which this bypasses
    model = trainer.model
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = trainer.create_optimizer()
    vocab = load_model_config(cfg.student).vocab_size
    batch = random_batch(cfg.batch_size, cfg.seq_len, cfg.prompt_tokens, vocab)
    if not on_policy:
        batch[KIND_KEY] = OFF_POLICY  # a dataset batch; without the key training_step generates (lmbda=1)
    loss = None
    for _ in range(steps):
        loss = trainer.training_step(model, dict(batch))
        optimizer.step()
        model.zero_grad(set_to_none=True)
    return float("nan") if loss is None else float(loss)


def measure(name: str, steps: int, overrides: dict | None = None) -> dict:
    import gc

    import torch
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from speckd_trl.plan import PlanConfig, estimate_memory
    from speckd_trl.testing import PeakMemory

    cfg = plan_config(name)
    if overrides:
        cfg = PlanConfig(**{**vars(cfg), **overrides})
    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2)  # fmt: skip
    warm = PlanConfig(
        **{
            **vars(cfg),
            "teacher": qwen2_config(tiny, 96, 128),
            "student": qwen2_config(tiny, 96, 128),
            "batch_size": 1,
            "seq_len": 64,
            "prompt_len": 32,
            "max_new_tokens": 4,
        }  # fmt: skip
    )
    run_steps(warm, 1)  # imports, thread pools, kernels: resident before the baseline
    gc.collect()
    memory = PeakMemory("cuda" if torch.cuda.is_available() else "cpu")  # where the trainer puts the models

    def start():
        gc.collect()
        memory.start()

    started = time.perf_counter()
    loss = run_steps(cfg, steps, on_measure_start=start)
    measured = memory.peak_mib() * 2**20
    plan = estimate_memory(cfg)
    return {
        "name": name,
        "measured_mib": measured / 2**20,
        "estimate_mib": plan.total / 2**20,
        "ratio": plan.total / measured,
        "phase": plan.phase,
        "terms_mib": {k: v / 2**20 for k, v in plan.terms.items()},
        "seconds": time.perf_counter() - started,
        "loss": loss,
    }


def run_child(name: str, steps: int) -> dict:
    """Measure one configuration in a fresh process (what the tests call too)."""
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": str(2**20),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--steps", str(steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=repo)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["estimate_mib"] for r in rows], 0.4, label="planner estimate")
    ax.bar([x + 0.2 for x in xs], [r["measured_mib"] for r in rows], 0.4, label="measured peak RSS growth")
    ax.set_xticks(list(xs), [r["name"] for r in rows], fontsize=8, rotation=20)
    ax.set_ylabel("MiB")
    ax.set_title("speckd_trl.plan vs measured peak memory (CPU, float32, SpecKD optimizer steps)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(DEFAULT), help="Comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "plan_check.png"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--override", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, json.loads(args.override))))
        return
    names = [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    started = time.time()
    rows = []
    for name in names:
        row = run_child(name, args.steps)
        rows.append(row)
        print(f"  {name:<22} estimate {row['estimate_mib']:8.0f} MiB  measured {row['measured_mib']:8.0f} MiB  "
              f"ratio {row['ratio']:.2f}  ({row['seconds']:.0f} s)", flush=True)  # fmt: skip
    print(f"\n{'configuration':<22} {'mode':<5} {'loss':<8} {'batch':<7} {'B x T':<8} {'estimate MiB':>12} "
          f"{'measured MiB':>12} {'est/meas':>8}")  # fmt: skip
    for row in rows:
        mode, loss_path, on_policy, ckpt, batch, seq, _ = CONFIGS[row["name"]]
        kind = ("on" if on_policy else "off") + ("+ckpt" if ckpt else "")
        print(f"{row['name']:<22} {mode:<5} {loss_path:<8} {kind:<7} {batch}x{seq:<6} {row['estimate_mib']:>12.0f} "
              f"{row['measured_mib']:>12.0f} {row['ratio']:>8.2f}")  # fmt: skip
    plot(rows, args.plot)
    print(f"plot: {args.plot}   wall time {time.time() - started:.0f} s")
    print(json.dumps({"teacher": TEACHER, "student": STUDENT, "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
