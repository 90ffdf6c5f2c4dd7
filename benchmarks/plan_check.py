"""The memory planner against measured peak memory: small models on a CPU, SpecKD optimizer steps, side by side.

    python benchmarks/plan_check.py                 # the default configurations (a few minutes on 2 cores)
    python benchmarks/plan_check.py --only full-eager-off,lora-chunked-on
    python benchmarks/plan_check.py --only full-chunked-off,lora-chunked-off --chunk-sizes 64,128,256,512  # m_chunk

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
(`plan_check.png` next to this script; gitignored: its figures are in the tables of docs/one-gpu.md).

    python benchmarks/plan_check.py --sharded --log benchmarks/results/plan_check-sharded.log   # ~2-3 minutes

`--sharded`: per-process peaks of `shard-full` / `shard-lora` (a 57M teacher and a 38M student, vocabulary 8000,
1 x 128 tokens, chunked loss: weights, gradients and optimizer states dominate) on one process, on 2 CPU processes
under DDP (`torchrun`, accelerate's CPU job over gloo) and under FSDP2 (`accelerate launch` with
`examples/accelerate/fsdp2.yaml`; each process applies the plugin itself as `tests/fsdp_worker.py` does, then it is
accelerate's own FSDP2 path), against the planner's per-process estimate (`num_processes`, `engine`). The student
and its optimizer go through `accelerator.prepare` as `Trainer.train` does. Each process's peak is taken from the
level before its models are built, but its peak is reset once they are built and sharded and the whole copies
freed: a GPU never holds a whole copy (models are loaded on the CPU, then sharded onto the GPUs). The table shows the
process with the highest peak; the plot is `plan_check_sharded.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace


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
    # "-cache": dataset batches from a teacher cache (K = CACHE_TOP_K), built before the baseline; no teacher loaded
    "lora-chunked-off-cache": ("lora", "chunked", False, False, 2, 512, VOCAB),
    "full-eager-off-cache": ("full", "eager", False, False, 2, 512, VOCAB),
    # smaller ones, for tests/test_plan.py
    "test-full-eager-off": ("full", "eager", False, False, 2, 256, VOCAB),
    "test-lora-chunked-off": ("lora", "chunked", False, False, 2, 256, VOCAB),
    "test-lora-eager-on": ("lora", "eager", True, False, 2, 256, VOCAB),
    "test-full-chunked-on": ("full", "chunked", True, False, 2, 256, VOCAB),
    "test-lora-chunked-off-cache": ("lora", "chunked", False, False, 2, 256, VOCAB),
    # --sharded: parameters, gradients and optimizer states dominate (short sequences, chunked loss)
    "shard-full": ("full", "chunked", False, False, 1, 128, 8000),
    "shard-lora": ("lora", "chunked", False, False, 1, 128, 8000),
}
# --sharded: larger decoder layers, a smaller vocabulary (57M and 38M parameters): the weights, gradients and
# optimizer states (what sharding splits) dominate the peak
SHARD_TEACHER = dict(hidden_size=640, intermediate_size=2560, num_hidden_layers=8, num_attention_heads=10,
                     num_key_value_heads=2)  # fmt: skip
SHARD_STUDENT = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=2)  # fmt: skip
DEFAULT = [name for name in CONFIGS if not name.startswith(("test-", "shard-"))]
SHARDED = ["shard-full", "shard-lora"]
# (engine, processes) measured per configuration by --sharded; engine None: one plain process
SHARDED_RUNS = [(None, 1), ("ddp", 2), ("fsdp2", 2)]
NEW_TOKENS = 32
CACHE_TOP_K = 32


def qwen2_config(shape: dict, vocab: int, max_positions: int) -> dict:
    return dict(model_type="qwen2", vocab_size=vocab, max_position_embeddings=max_positions,
                tie_word_embeddings=False, **shape)  # fmt: skip


def plan_config(name: str, teacher: dict | None = None, student: dict | None = None):
    """The `PlanConfig` of configuration `name` (see `CONFIGS`)."""
    from speckd_trl.plan import PlanConfig

    sharded = name.startswith("shard-")
    teacher = teacher or (SHARD_TEACHER if sharded else TEACHER)
    student = student or (SHARD_STUDENT if sharded else STUDENT)
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
        teacher_cache_top_k=CACHE_TOP_K if name.endswith("-cache") else 0,
    )


# ----------------------------------------------------------------------------- one measurement (child process)


def cached_dataset(cfg, build, tokenizer, batch: dict):
    """The rows of `batch` as a tokenized dataset, and a teacher cache of them (K = `cfg.teacher_cache_top_k`) made by
    a `SpecKDTrainer` with the teacher, in a temporary directory. Built before the baseline and freed: the measured
    run reads the cache from disk and loads no teacher."""
    import gc

    from datasets import Dataset

    from speckd_trl import SpecKDConfig, SpecKDTrainer

    completion = (batch["labels"] != -100).long()
    # the collator finds the prompt by `completion_mask` (its text, required by the checks, is not read at lmbda=0)
    rows = Dataset.from_dict({"input_ids": batch["input_ids"].tolist(), "completion_mask": completion.tolist(),
                              "prompt": ["(random tokens)"] * len(completion)})  # fmt: skip
    path = tempfile.mkdtemp(prefix="plan-check-cache-")
    args = SpecKDConfig(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, bf16=False, lmbda=0.0,
                        max_length=cfg.seq_len)  # fmt: skip
    trainer = SpecKDTrainer(model=build(0, cfg.student), teacher_model=build(1, cfg.teacher), args=args,
                            train_dataset=rows, processing_class=tokenizer)  # fmt: skip
    trainer.cache_teacher(path, top_k=cfg.teacher_cache_top_k, shard_rows=len(rows))
    del trainer
    gc.collect()
    return rows, path


def run_steps(cfg, steps: int, on_measure_start=None, engine: str | None = None, on_built=None) -> float:
    """Build the models of `cfg` (a `PlanConfig`), a `SpecKDTrainer`, and run `steps` optimizer steps.

    `engine` ("ddp" / "fsdp2"): this is one process of a distributed job; the student and its optimizer go through
    `accelerator.prepare` as `Trainer.train` does (the teacher is prepared by `SpecKDTrainer` itself). `on_built` is
    called once the models are built, prepared and the originals dropped, before the first step."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from speckd_trl import SpecKDConfig, SpecKDTrainer
    from speckd_trl.batches import KIND_KEY, OFF_POLICY
    from speckd_trl.plan import load_model_config
    from speckd_trl.tools.testing import make_dataset, make_tokenizer, random_batch

    tokenizer = make_tokenizer()

    def build(seed, source):
        torch.manual_seed(seed)
        config = load_model_config(source)
        config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        return AutoModelForCausalLM.from_config(config)

    vocab = load_model_config(cfg.student).vocab_size
    batch = random_batch(cfg.batch_size, cfg.seq_len, cfg.prompt_tokens, vocab)
    teacher, dataset, cache = None, make_dataset(4), None
    if cfg.teacher_quant == "nf4":  # saved before the baseline; SpecKDTrainer loads it in NF4 as a user's run does
        teacher = tempfile.mkdtemp(prefix="plan-check-teacher-")
        build(1, cfg.teacher).save_pretrained(teacher)
    if cfg.teacher_cache_top_k:  # on disk before the baseline, as a user's cache-teacher run before training
        dataset, cache = cached_dataset(cfg, build, tokenizer, batch)
    if on_measure_start is not None:
        on_measure_start()
    student = build(0, cfg.student)
    if teacher is None and cache is None:
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
        teacher_cache=cache,
        max_length=cfg.seq_len if cache else 1024,
        **({"accelerator_config": {"use_configured_state": True}} if engine == "fsdp2" else {}),
    )
    peft_config = None
    if cfg.student_mode == "lora":
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, target_modules="all-linear")
    trainer = SpecKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
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
    if engine is not None:  # as `Trainer.train`: FSDP2 needs model and optimizer prepared together
        model, optimizer = trainer.accelerator.prepare(trainer.model, optimizer)
        trainer.model_wrapped = model
        if engine == "fsdp2":
            trainer.model = model
        del student
    if on_built is not None:
        on_built()
    if not on_policy:
        batch[KIND_KEY] = OFF_POLICY  # a dataset batch; without the key training_step generates (lmbda=1)
    loss = None
    for _ in range(steps):
        loss = trainer.training_step(model, dict(batch))
        optimizer.step()
        model.zero_grad(set_to_none=True)
    return float("nan") if loss is None else float(loss)


def cpu_fsdp_state() -> None:
    """Form this process's gloo group as accelerate's CPU job, then mark it GPU-like so that the launcher's FSDP plugin
    applies (accelerate 1.15 turns no CPU job into an FSDP job; the same as `tests/fsdp_worker.py`, see there)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)
    assert state.distributed_type == DistributedType.MULTI_CPU and state.backend == "gloo", state
    state.distributed_type = DistributedType.MULTI_GPU


def _reset_peak() -> None:
    """Reset the peak resident set (`VmHWM`) to the current one (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(name: str, steps: int, overrides: dict | None = None, engine: str | None = None) -> dict:
    import gc

    import torch
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from speckd_trl.plan import PlanConfig, estimate_memory
    from speckd_trl.teacher_check import PeakMemory

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
    if engine == "fsdp2":
        cpu_fsdp_state()
    run_steps(warm, 1, engine=engine)  # imports, thread pools, kernels, process group: resident before the baseline
    gc.collect()
    memory = PeakMemory("cuda" if torch.cuda.is_available() else "cpu")  # where the trainer puts the models

    def start():
        gc.collect()
        memory.start()

    started = time.perf_counter()
    if engine is None:
        loss = run_steps(cfg, steps, on_measure_start=start)
        measured = memory.peak_mib() * 2**20
        plan = estimate_memory(cfg)
    else:  # one process of a distributed job: the peak from the first step on, over the level before building
        built = {}

        def after_build():
            import ctypes

            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            built["peak_mib"] = memory.peak_mib()
            _reset_peak()  # the whole models built before sharding (a GPU never holds them: loaded on the CPU) out

        loss = run_steps(cfg, steps, on_measure_start=start, engine=engine, on_built=after_build)
        measured = memory.peak_mib() * 2**20  # (never below 0: `PeakMemory`)
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        plan = estimate_memory(replace(cfg, num_processes=world, engine=engine))
        return {
            "name": name,
            "engine": engine,
            "processes": world,
            "rank": rank,
            "measured_mib": measured / 2**20,
            "peak_while_building_mib": built.get("peak_mib"),
            "estimate_mib": plan.total / 2**20,
            "ratio": plan.total / measured,
            "terms_mib": {k: v / 2**20 for k, v in plan.terms.items()},
            "seconds": time.perf_counter() - started,
            "loss": loss,
        }
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


def run_child(name: str, steps: int, overrides: dict | None = None) -> dict:
    """Measure one configuration in a fresh process (what the tests call too); `overrides`: `PlanConfig` fields."""
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": str(2**20),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--steps", str(steps)]
    cmd += ["--override", json.dumps(overrides or {})]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=repo)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_sharded(name: str, steps: int, engine: str | None, processes: int) -> dict:
    """Measure configuration `name` under `engine` with `processes` CPU processes (gloo): DDP through `torchrun`
    (accelerate's CPU job), FSDP2 through `accelerate launch` with `examples/accelerate/fsdp2.yaml` (the processes
    apply it themselves, `cpu_fsdp_state`). Returns the row of the process with the highest peak, with every rank's."""
    if engine is None:
        row = run_child(name, steps)
        return {**row, "engine": "single", "processes": 1, "ranks_mib": [row["measured_mib"]]}
    from speckd_trl.tools.testing import accelerate_launch, torchrun

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2**20)  # the launchers pass the environment on
    out_dir = tempfile.mkdtemp(prefix=f"plan-check-{engine}-")
    script = [os.path.abspath(__file__), "--child", name, "--steps", str(steps), "--engine", engine, "--out", out_dir]
    if engine == "ddp":
        out = torchrun(script, nproc=processes, timeout=600)
    else:
        config = os.path.join(repo, "examples", "accelerate", f"{engine}.yaml")
        out = accelerate_launch(config, ["--num_processes", str(processes), *script], timeout=600, cwd=repo)
    if out.returncode != 0:
        raise RuntimeError(f"{name} {engine} x{processes} failed:\n{out.stderr[-3000:]}")
    rows = [json.load(open(os.path.join(out_dir, f))) for f in sorted(os.listdir(out_dir)) if f.endswith(".json")]
    assert len(rows) == processes, rows
    worst = max(rows, key=lambda r: r["measured_mib"])
    return {**worst, "engine": engine, "ranks_mib": [r["measured_mib"] for r in rows]}


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


class Log:
    """`say(text)` prints a line and keeps it; `save(path)` writes the kept lines (`--log`), nothing without a path."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def save(self, path: str | None) -> None:
        if path:
            with open(path, "w") as f:
                f.write("\n".join(self.lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(DEFAULT), help="Comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "plan_check.png"))
    parser.add_argument("--sharded", action="store_true",
                        help="Per-process peaks of " + ", ".join(SHARDED) + " on 1 process and on 2 CPU processes "
                        "under DDP and FSDP2, against the planner's per-process estimate.")  # fmt: skip
    parser.add_argument("--chunk-sizes", default=None,
                        help="Comma-separated loss_chunk_size values (e.g. 64,128,256,512): measure each --only "
                        "configuration (chunked ones) at each size and fit the planner's m_chunk, the float32 "
                        "[chunk, V] tiles alive at once, as the slope of the measured peak.")  # fmt: skip
    parser.add_argument("--log", default=None, help="Also write the output to this file.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--override", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row = measure(args.child, args.steps, json.loads(args.override), engine=args.engine)
        if args.out:
            with open(os.path.join(args.out, f"rank{row['rank']}.json"), "w") as f:
                json.dump(row, f)
            from accelerate import PartialState

            from speckd_trl.cli import exit_distributed_job

            PartialState().destroy_process_group()
            exit_distributed_job(0)  # as the CLI: a gloo job's teardown can abort a process that finished its work
        else:
            print(json.dumps(row))
        return
    if args.sharded:
        main_sharded(args)
        return
    if args.chunk_sizes:
        main_chunk_sizes(args)
        return
    names = [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    say = Log()
    say("$ python benchmarks/plan_check.py " + " ".join(sys.argv[1:]))
    started = time.time()
    rows = []
    for name in names:
        row = run_child(name, args.steps)
        rows.append(row)
        say(f"  {name:<22} estimate {row['estimate_mib']:8.0f} MiB  measured {row['measured_mib']:8.0f} MiB  "
            f"ratio {row['ratio']:.2f}  ({row['seconds']:.0f} s)")  # fmt: skip
    say(f"\n{'configuration':<22} {'mode':<5} {'loss':<8} {'batch':<7} {'B x T':<8} {'estimate MiB':>12} "
        f"{'measured MiB':>12} {'est/meas':>8}")  # fmt: skip
    for row in rows:
        mode, loss_path, on_policy, ckpt, batch, seq, _ = CONFIGS[row["name"]]
        kind = ("on" if on_policy else "off") + ("+ckpt" if ckpt else "")
        say(f"{row['name']:<22} {mode:<5} {loss_path:<8} {kind:<7} {batch}x{seq:<6} {row['estimate_mib']:>12.0f} "
            f"{row['measured_mib']:>12.0f} {row['ratio']:>8.2f}")  # fmt: skip
    plot(rows, args.plot)
    say(f"plot: {args.plot}   wall time {time.time() - started:.0f} s")
    say(json.dumps({"teacher": TEACHER, "student": STUDENT, "steps": args.steps, "rows": rows}))
    say.save(args.log)


def fit_m_chunk(sizes: list[int], measured_mib: list[float], vocab: int) -> tuple[float, float]:
    """Least-squares slope of the measured peak (MiB) over `loss_chunk_size`, and that slope in float32 `[V]` rows:
    the planner's `m_chunk` (tiles of `[chunk, V]` alive at once). Returns `(MiB per chunk row, m_chunk)`."""
    slope = statistics.linear_regression(sizes, measured_mib).slope
    return slope, slope * 2**20 / (4 * vocab)


def main_chunk_sizes(args) -> None:
    """`--chunk-sizes`: measured peak per `loss_chunk_size`, its least-squares slope in float32 vocabulary rows per
    chunk row (what the planner calls `m_chunk`), the planner's estimate beside it, a JSON line, `--log`."""
    from speckd_trl.plan import M_CHUNK

    say = Log()
    say("$ python benchmarks/plan_check.py " + " ".join(sys.argv[1:]))
    sizes = [int(c) for c in args.chunk_sizes.split(",")]
    fits = {}
    for name in [n.strip() for n in args.only.split(",")]:
        if CONFIGS[name][1] != "chunked":
            raise SystemExit(f"--chunk-sizes: {name} uses the eager loss; give chunked configurations in --only.")
        vocab = CONFIGS[name][6]
        measured = []
        for size in sizes:
            row = run_child(name, args.steps, {"loss_chunk_size": size})
            measured.append(row["measured_mib"])
            say(f"  {name:<22} loss_chunk_size {size:>4}  estimate {row['estimate_mib']:7.0f} MiB  measured "
                f"{row['measured_mib']:7.0f} MiB  ratio {row['ratio']:.2f}")  # fmt: skip
        slope, m_chunk = fit_m_chunk(sizes, measured, vocab)
        fits[name] = {"sizes": sizes, "measured_mib": measured, "mib_per_chunk_row": slope, "m_chunk": m_chunk}
        say(f"  {name}: slope {slope:.3f} MiB per chunk row = {m_chunk:.1f} float32 rows of the "
            f"vocabulary ({vocab}); the planner's m_chunk is {M_CHUNK:g}")  # fmt: skip
    say(json.dumps({"teacher": TEACHER, "student": STUDENT, "steps": args.steps, "m_chunk": M_CHUNK, "fits": fits}))
    say.save(args.log)


def main_sharded(args) -> None:
    """`--sharded`: the table engine / processes / measured / planned / ratio, a plot, a JSON line, `--log`."""
    say = Log()
    started = time.time()
    say("$ OMP_NUM_THREADS=1 python benchmarks/plan_check.py " + " ".join(sys.argv[1:]))
    names = [n.strip() for n in args.only.split(",")] if args.only != ",".join(DEFAULT) else SHARDED
    rows = []
    for name in names:
        for engine, processes in SHARDED_RUNS:
            row = run_sharded(name, args.steps, engine, processes)
            rows.append(row)
            say(f"  {name:<12} {row['engine']:<7} x{processes}  planned {row['estimate_mib']:7.0f} MiB  measured "
                f"{row['measured_mib']:7.0f} MiB (ranks {', '.join(f'{m:.0f}' for m in row['ranks_mib'])})  "
                f"ratio {row['ratio']:.2f}  ({row['seconds']:.0f} s)")  # fmt: skip
    say(f"\n{'configuration':<13} {'engine':<7} {'processes':>9} {'measured MiB':>12} {'planned MiB':>11} "
        f"{'planned/measured':>16}")  # fmt: skip
    for row in rows:
        say(f"{row['name']:<13} {row['engine']:<7} {row['processes']:>9} {row['measured_mib']:>12.0f} "
            f"{row['estimate_mib']:>11.0f} {row['ratio']:>16.2f}")  # fmt: skip
    say("\nplanned terms (MiB) per process:")
    for row in rows:
        terms = ", ".join(f"{k} {v:.0f}" for k, v in row["terms_mib"].items() if v)
        say(f"  {row['name']} {row['engine']} x{row['processes']}: {terms}")
    path = args.plot.replace("plan_check.png", "plan_check_sharded.png")
    for row in rows:
        row["label"] = f"{row['name'].removeprefix('shard-')} {row['engine']} x{row['processes']}"
    plot([{**r, "name": r["label"]} for r in rows], path)
    say(f"plot: {path}   wall time {time.time() - started:.0f} s")
    say(json.dumps({"teacher": SHARD_TEACHER, "student": SHARD_STUDENT, "steps": args.steps, "rows": rows}))
    say.save(args.log)


if __name__ == "__main__":
    main()
