"""Step time and peak memory, TRL's GKD against SpecKD (eager and chunked loss paths), side by side in one run.

    python benchmarks/speed_memory.py                        # CPU defaults: vocab 49152, batch 2 x 512
    python benchmarks/speed_memory.py --hidden 1024 --layers 8 --batch 8 --bf16     # a GPU

Random-init Qwen2 student and teacher built from configs (no download), SmolLM2's vocabulary size by default. Each
(method, measurement) runs in a fresh subprocess, so that one's memory cannot hide in another's allocator, and
reports. Times: one process per measurement runs every method's step in turns, round after round (a slow spell of a
shared machine then falls on all methods alike), and reports each method's median over `--steps` rounds after
`--warmup` untimed ones. Peak memory: one process per method and measurement, the peak of one step above the level
after an untimed warm-up step: `torch.cuda.max_memory_allocated` on a GPU; on a CPU the process's peak resident
memory (`VmHWM`, reset through `/proc/self/clear_refs`), with glibc told to map every allocation above 1 MiB
separately, so that freed tensors leave the resident set at once (the timing processes keep glibc's default, which
reuses freed memory: mapping fresh pages for every tensor would slow all methods).

Measurements, each for every method:

- `off-policy step`: `training_step` (forward, loss, backward) on a dataset batch (prompt = the first quarter);
- `on-policy step`: `training_step` with `lmbda=1`: the student generates `--new-tokens` tokens after a prompt of
  `seq - new_tokens` tokens, then forward, loss and backward (the same sampling for every method);
- `loss stage`: the off-policy step on models with no decoder layers (embedding, final norm, output layer), which
  leaves what the methods do differently: the output layer, the gate and the divergence with their backward.

Per method and measurement it also times the gate alone (`gate_ms`: the trainer's gate, draws and verdicts, on the step's
log-probabilities, median of 5), which a difference of noisy step times cannot isolate, and reports the spread of
the step times (`ms_min`, `ms_max`).

Methods: `GKD` (TRL's `GKDTrainer` as shipped), `SpecKD defaults` (`SpecKDConfig()` as shipped: gate topk on the
chunked path), SpecKD with `gate` none / topk / spec on the eager path (`loss_path="eager"`: the same `[B, T, V]`
logits as GKD), and spec on the chunked path. Prints a table with the ratios to GKD and a final JSON line, and saves
a plot.
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


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

METHODS = {
    "GKD": None,
    "SpecKD defaults": {},  # SpecKDConfig() as shipped: gate topk (k=5), loss_path chunked
    "SpecKD none (eager)": dict(gate="none", loss_path="eager"),
    "SpecKD topk (eager)": dict(gate="topk", loss_path="eager"),
    "SpecKD spec (eager)": dict(gate="spec", loss_path="eager"),
    "SpecKD spec (chunked)": dict(gate="spec", loss_path="chunked"),
}
MEASUREMENTS = ("off-policy step", "on-policy step", "loss stage")


# ----------------------------------------------------------------------------- one measurement (child process)


def build_models(args, tokenizer, layers, device):
    import torch

    from speckd_trl.tools.testing import make_model

    models = []
    for seed in (0, 1):
        heads = max(4, args.hidden // 64)
        model = make_model(
            seed,
            tokenizer,
            vocab_size=args.vocab,
            layers=layers,
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=max(256, args.seq),
        )
        models.append(model.to(device=device, dtype=torch.bfloat16 if args.bf16 else torch.float32))
    return models


def make_batch(args, prompt_len, device):
    from speckd_trl.tools.testing import random_batch

    batch = random_batch(args.batch, args.seq, prompt_len, args.vocab)
    return {k: v.to(device) for k, v in batch.items()}


def build_trainers(args, methods, on_policy, layers):
    """One trainer per method, all on the same student and teacher, and the batch they train on."""
    import torch
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from speckd_trl import SpecKDConfig, SpecKDTrainer
    from speckd_trl.batches import KIND_KEY, OFF_POLICY
    from speckd_trl.tools.testing import make_dataset, make_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    student, teacher = build_models(args, tokenizer, layers, device)
    # eos never ends a sampled sequence early: every method generates exactly `new_tokens` tokens
    student.generation_config.eos_token_id = None
    prompt_len = args.seq - args.new_tokens if on_policy else args.seq // 4
    batch = make_batch(args, prompt_len, device)
    common = dict(
        **trainer_basics(args, device),
        lmbda=1.0 if on_policy else 0.0,
        max_new_tokens=args.new_tokens,
    )
    trainers = {}
    for method in methods:
        overrides = METHODS[method]
        if overrides is None:
            trainer_cls, config = GKDTrainer, GKDConfig(**common)
        else:
            trainer_cls, config = SpecKDTrainer, SpecKDConfig(**common, **overrides)
        trainer = trainer_cls(
            model=student,
            teacher_model=teacher,
            args=config,
            train_dataset=make_dataset(4),
            processing_class=tokenizer,
        )
        trainer.generation_config.eos_token_id = None
        trainer.current_gradient_accumulation_steps = 1  # set by `train()`, which this benchmark bypasses
        inputs = {**batch, KIND_KEY: OFF_POLICY} if trainer_cls is SpecKDTrainer and not on_policy else batch
        trainers[method] = (trainer, inputs)
    return trainers, device


def trainer_basics(args, device) -> dict:
    """The config fields every trainer of these benchmarks shares: a scratch output directory, no reporting, the
    precision and device asked for, seed 0, `--batch` rows per device."""
    return dict(
        output_dir=tempfile.mkdtemp(),
        report_to="none",
        bf16=args.bf16,
        use_cpu=device.type == "cpu",
        seed=0,
        per_device_train_batch_size=args.batch,
    )


def one_step(trainer, inputs, device) -> tuple[float, float]:
    """Seconds and loss of one `training_step` (forward, loss, backward; generation first when on-policy)."""
    import torch

    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = trainer.training_step(trainer.model, dict(inputs))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, float(loss)


def child_time(args) -> list[dict]:
    """Time every method in turns (one step each, round after round), so that a slow spell of a shared machine
    falls on all methods alike; the median over `steps` rounds."""
    methods = args.methods.split(",")
    trainers, device = build_trainers(args, methods, args.measure == "on-policy step", _layers(args))
    times = {m: [] for m in methods}
    for round_index in range(args.warmup + args.steps):
        for method in methods:
            seconds, loss = one_step(*trainers[method], device)
            if round_index >= args.warmup:
                times[method].append(seconds)
    return [
        {
            "method": m,
            "measure": args.measure,
            "ms": 1000 * statistics.median(times[m]),
            "ms_min": 1000 * min(times[m]),
            "ms_max": 1000 * max(times[m]),
            "gate_ms": gate_ms(*trainers[m], device, on_policy=args.measure == "on-policy step"),
        }
        for m in methods
    ]


def gate_ms(trainer, inputs, device, *, on_policy: bool, repeats: int = 5) -> float:
    """Milliseconds of the gate alone on this batch (median of `repeats`): the trainer's gate (`TokenGate.batch`, its
    random draws, then `GatedBatch.accept`) on the models' log-probabilities; 0 for GKD and `gate="none"`. A step-time difference between
    methods mixes the gate with the machine's noise; this isolates it. On-policy: the last `new_tokens` positions
    stand for the generated ones."""
    import torch

    from speckd_trl import SpecKDTrainer
    from speckd_trl.batch_kind import BatchKind
    from speckd_trl.losses import jsd_log_probs

    if not isinstance(trainer, SpecKDTrainer) or not trainer.args.gate_rule.rejects:
        return 0.0
    with torch.no_grad():
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        student = jsd_log_probs(trainer.model(input_ids=ids, attention_mask=mask).logits[:, :-1])
        teacher = jsd_log_probs(trainer.teacher_model(input_ids=ids, attention_mask=mask).logits[:, :-1])
    completion, sampled_ids = inputs["labels"][:, 1:] != -100, inputs["input_ids"][:, 1:]
    kind = BatchKind.on_policy() if on_policy else BatchKind()  # (else every row the dataset's)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        batch = trainer._gate.batch(kind, completion, sampled_ids, training=True, step=0, max_steps=1)
        batch.verdicts(student, teacher)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def child_memory(args) -> dict:
    """Peak memory of one method's step, above the level after an untimed warm-up step."""
    from speckd_trl.teacher_check import PeakMemory

    trainers, device = build_trainers(args, [args.methods], args.measure == "on-policy step", _layers(args))
    trainer, inputs = trainers[args.methods]
    memory = PeakMemory(device)
    one_step(trainer, inputs, device)
    memory.start()
    _, loss = one_step(trainer, inputs, device)
    return {"method": args.methods, "measure": args.measure, "peak_mib": memory.peak_mib(), "loss": loss}


def _layers(args) -> int:
    return 0 if args.measure == "loss stage" else args.layers


# ----------------------------------------------------------------------------- the side-by-side run (parent)


CHILD_SETTINGS = ("vocab", "hidden", "layers", "batch", "seq", "new_tokens", "steps", "warmup", "threads")


def launch_child(script: str, args, mode: str, settings, *extra: str) -> object:
    """Run `script --child mode` in a fresh process with `args`' `settings` (and `--bf16`) and `extra` arguments, and
    return the JSON of its last line: the one protocol of this script, `trl_side_by_side.py` and `packing.py`."""
    cmd = [sys.executable, script, "--child", mode, *extra]
    for name in settings:
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.bf16:
        cmd.append("--bf16")
    env = dict(os.environ)
    if mode == "memory":  # freed tensors leave the resident set at once; timing keeps glibc's default allocator
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} {' '.join(extra)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(args, mode, methods, measure, script: str = __file__):
    return launch_child(script, args, mode, CHILD_SETTINGS, "--methods", methods, "--measure", measure)


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    measures = list(dict.fromkeys(r["measure"] for r in rows))
    width = 0.8 / len(measures)
    for ax, key, label in ((axes[0], "ms_ratio", "time / GKD's"), (axes[1], "mem_ratio", "peak memory / GKD's")):
        for i, measure in enumerate(measures):
            values = [next(r[key] for r in rows if r["method"] == m and r["measure"] == measure) for m in methods]
            ax.bar(
                [j + (i - (len(measures) - 1) / 2) * width for j in range(len(methods))], values, width, label=measure
            )
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(methods)), [m.replace(" (", "\n(") for m in methods], fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_arguments(doc: str, methods, measurements, plot: str) -> argparse.ArgumentParser:
    """The command line this script and `trl_side_by_side.py` share: model and batch sizes, steps, threads, the
    methods and measurements to run, the plot, and the hidden `--child` / `--measure` of a measuring subprocess."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
    parser.add_argument(
        "--methods", default=",".join(methods), help="Comma-separated subset of the methods, timed in this order."
    )
    parser.add_argument(
        "--measures", default=",".join(measurements), help="Comma-separated subset of: " + ", ".join(measurements)
    )
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), plot))
    parser.add_argument("--child", choices=("time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    return parser


def answer_as_child(args, child_time, child_memory) -> bool:
    """In a measuring subprocess (`--child time|memory`): set the threads, print the measurement as one JSON line and
    return True; in the parent, return False."""
    if not args.child:
        return False
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(json.dumps(child_time(args) if args.child == "time" else child_memory(args)))
    return True


def main():
    parser = model_arguments(__doc__, METHODS, MEASUREMENTS, "speed_memory.png")
    args = parser.parse_args()
    if answer_as_child(args, child_time, child_memory):
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    methods = [m.strip() for m in args.methods.split(",")]
    if "GKD" not in methods or any(m not in METHODS for m in methods):
        parser.error(f"--methods must include GKD and name only these: {', '.join(METHODS)}")
    measures = [m.strip() for m in args.measures.split(",")]
    if not measures or any(m not in MEASUREMENTS for m in measures):
        parser.error(f"--measures must name some of: {', '.join(MEASUREMENTS)}")
    started = time.time()
    rows = []
    for measure_name in measures:
        timed = {r["method"]: r for r in run_child(args, "time", ",".join(methods), measure_name)}
        for method in methods:
            row = {**timed[method], **run_child(args, "memory", method, measure_name)}
            rows.append(row)
            print(f"  measured {method:<22} {measure_name:<15} {row['ms']:9.1f} ms {row['peak_mib']:8.0f} MiB")
    for row in rows:
        base = next(r for r in rows if r["method"] == "GKD" and r["measure"] == row["measure"])
        row["ms_ratio"] = row["ms"] / base["ms"]
        # a tiny configuration can fit GKD's step in memory the process already holds: no ratio to a peak of 0
        row["mem_ratio"] = row["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else float("nan")

    title = (
        f"{device}, vocab {args.vocab}, batch {args.batch} x {args.seq}, hidden {args.hidden} x {args.layers} layers"
        f"{', bf16' if args.bf16 else ', fp32'}{f', {args.threads} thread(s)' if args.threads else ''}"
    )
    print(f"\n{title}; median of {args.steps} steps; peak memory above the level before the step")
    header = f"{'method':<23}" + "".join(f"| {m:<32}" for m in measures)
    print(header)
    print(f"{'':<23}" + "| ms (x GKD)     MiB (x GKD)      " * len(measures))
    for method in methods:
        line = f"{method:<23}"
        for measure_name in measures:
            r = next(r for r in rows if r["method"] == method and r["measure"] == measure_name)
            line += f"| {r['ms']:7.0f} ({r['ms_ratio']:4.2f}) {r['peak_mib']:7.0f} ({r['mem_ratio']:4.2f})    "
        print(line)
    print(
        "\nthe gate alone (draws and verdicts on the step's log-probabilities): ms (share of the method's step time);"
    )
    print("step times' spread over the timed rounds: min-max ms")
    for method in methods:
        line = f"{method:<23}"
        for measure_name in measures:
            r = next(r for r in rows if r["method"] == method and r["measure"] == measure_name)
            gate = f"{r['gate_ms']:6.1f} ({100 * r['gate_ms'] / r['ms']:4.1f}%)"
            line += f"| {gate:<15} {r['ms_min']:6.0f}-{r['ms_max']:<6.0f}   "
        print(line)
    plot(rows, args.plot, title)
    print(f"plot: {args.plot}   wall time {time.time() - started:.0f} s")
    summary = {
        "device": device,
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "measure")},
        "rows": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
