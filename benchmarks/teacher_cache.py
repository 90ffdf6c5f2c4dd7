"""The teacher cache against the live NF4 teacher, on the demo's models: memory, step time, disk, precision, quality.

    python benchmarks/teacher_cache.py                 # memory / step time (one run, ratios), disk per K, precision
    python benchmarks/teacher_cache.py --log benchmarks/results/teacher-cache.log

The setup is the offline demo's (`speckd_trl/demo/app.py`, cached): the teacher is SmolLM2-135M-Instruct tuned on
the task (NF4 when live), the student the untuned SmolLM2-135M-Instruct with LoRA r=16 on every linear layer (the
transfer regime), the data the demo's 2000 train rows. Every run is a dataset-batch run (`lmbda=0`), SpecKD's
defaults (`gate="topk"`, k=5, chunked loss).

- `memory and step time` (each arm in a fresh subprocess, glibc mapping every allocation above 1 MiB separately as
  `plan_check.py` does): the peak memory above the level before any model is loaded (the models' weights, the
  trainer, `--steps` training steps: `training_step` + `optimizer.step` on collated train batches) and the median
  step time after one warm-up step, `live` (the NF4 teacher runs on every batch) against `cache` (K = the default 32,
  no teacher loaded), and their ratios;
- `disk`: caches of the whole train set at K = 8, 32, 128 (float16 values, ids in the smallest type) and K=32 and 128
  in float32 (the K=128 float32 one from the teacher, the others truncated from it: the same values, the tail to float rounding): size on disk,
  completion positions, GiB per million positions, build time;
- `precision and approximation`: the loss of a few train batches from each cache against the live teacher's (relative
  difference), and float16 against float32 storage at K=32.

Held-out quality (a student trained from the cache against one trained with the live teacher, same seeds, paired)
runs through `quality.py`, `--methods speckd-topk,speckd-topk-cache --teacher-cache DIR` (see benchmarks/README.md).
Prints tables and a final JSON line; saves a plot.
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
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

DISK_KS = (8, 32, 128)
DEFAULT_K = 32


def setup(cache_dir: str | None = None):
    """The demo's tuned teacher, untuned student and train rows (built and cached by the demo's `prepare`)."""
    from speckd_trl.demo import DemoConfig, hub, prepare

    config = DemoConfig(student_init="base")
    cache = Path(cache_dir).expanduser() if cache_dir else hub.cache_dir()
    teacher_dir, student_dir, data, _ = prepare(config, cache)
    return config, teacher_dir, student_dir, data["train"]


def make_trainer(student_dir, teacher, train, output_dir: str, **overrides):
    """SpecKD's defaults on dataset batches (`lmbda=0`), the student with LoRA r=16 on every linear layer."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speckd_trl import SpecKDConfig, SpecKDTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    args = SpecKDConfig(output_dir=output_dir, report_to="none", use_cpu=not torch.cuda.is_available(), seed=0,
                        lmbda=0.0, per_device_train_batch_size=8, learning_rate=5e-4, max_new_tokens=8,
                        teacher_load_in_4bit=True, disable_tqdm=True, **overrides)  # fmt: skip
    student = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32)
    peft = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    return SpecKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                         processing_class=tokenizer, peft_config=peft)  # fmt: skip


def batches(trainer, n: int, size: int = 8):
    from speckd_trl.batches import KIND_KEY, OFF_POLICY

    rows = trainer.train_dataset
    return [{**trainer.data_collator([rows[i] for i in range(s, s + size)]), KIND_KEY: OFF_POLICY}
            for s in range(0, n * size, size)]  # fmt: skip


# ----------------------------------------------------------------------------- one arm (child process)


def child(arm: str, cache_path: str, steps: int, cache_dir: str | None) -> dict:
    import gc

    import torch

    from speckd_trl.tools.testing import PeakMemory

    config, teacher_dir, student_dir, train = setup(cache_dir)
    gc.collect()
    memory = PeakMemory("cuda" if torch.cuda.is_available() else "cpu")
    memory.start()  # before any model: the peak counts the weights (the teacher's, live) and the steps
    overrides = dict(teacher_cache=cache_path) if arm == "cache" else {}
    teacher = str(teacher_dir) if arm == "live" else None
    trainer = make_trainer(student_dir, teacher, train, tempfile.mkdtemp(), **overrides)
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    model.train()
    optimizer = trainer.create_optimizer()
    times = []
    for i, batch in enumerate(batches(trainer, steps + 1)):
        started = time.perf_counter()
        trainer.training_step(model, batch)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i:  # the first step warms up
            times.append(time.perf_counter() - started)
    return {
        "arm": arm,
        "teacher_loaded": trainer.teacher_model is not None,
        "peak_mib": memory.peak_mib(),
        "step_ms": 1000 * statistics.median(times),
        "step_ms_min": 1000 * min(times),
        "step_ms_max": 1000 * max(times),
    }


def run_child(arm: str, cache_path: str, steps: int, cache_dir: str | None) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", arm, "--cache-path", cache_path,
           "--steps", str(steps)] + (["--cache-dir", cache_dir] if cache_dir else [])  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{arm} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the parent


def truncated_cache(source: Path, target: Path, k: int, values_dtype: str) -> None:
    """A cache of `k` <= K tokens (and `values_dtype`) written from a larger one, without the teacher: the top-k of a
    top-K row are its first k, and the tail grows by the K - k values dropped (exact)."""
    import dataclasses

    import numpy as np
    import torch
    from datasets import Dataset

    from speckd_trl.teacher_cache import TeacherCache, _shard_features, _shard_name, _write_meta

    cache = TeacherCache.open(source)
    spec = dataclasses.replace(cache.spec, top_k=k, values_dtype=values_dtype)
    target.mkdir(parents=True, exist_ok=True)
    shards, positions = {}, {}
    for index, shard in enumerate(cache._shards):
        columns = {"key": list(shard["key"]), "ids": [], "values": [], "log_tail": []}
        for row in shard:
            values = torch.as_tensor(np.stack(row["values"]).astype(np.float32)) if len(row["log_tail"]) else None
            if values is None:
                columns["ids"].append([]), columns["values"].append([]), columns["log_tail"].append([])
                continue
            tail = torch.as_tensor(np.asarray(row["log_tail"], dtype=np.float32))
            tail = torch.logsumexp(torch.cat([values[:, k:], tail[:, None]], dim=1), dim=1)
            columns["ids"].append(np.stack(row["ids"])[:, :k].tolist())
            columns["values"].append(values[:, :k].tolist())
            columns["log_tail"].append(tail.tolist())
        name = _shard_name(index)
        Dataset.from_dict(columns, features=_shard_features(spec)).save_to_disk(str(target / name))
        shards[name] = len(shard)
        positions[name] = sum(len(t) for t in columns["log_tail"])
    _write_meta(target, spec, shards, positions, complete=True)


def build_caches(teacher_trainer, root: Path, log) -> dict:
    """The largest cache (K=128, float32) from the teacher, then the others truncated from it: {name: row}."""
    from speckd_trl.teacher_cache import TeacherCache

    rows = {}
    largest = f"k{max(DISK_KS)}-float32"
    plan = [(max(DISK_KS), "float32")] + [(k, "float16") for k in DISK_KS] + [(DEFAULT_K, "float32")]
    for k, dtype in plan:
        name = f"k{k}-{dtype}"
        path = root / name
        if name in rows:
            continue
        started = time.time()
        if name == largest:
            cache = teacher_trainer.cache_teacher(str(path), top_k=k, values_dtype=dtype)
        else:
            if not (path / "speckd_teacher_cache.json").is_file():
                truncated_cache(root / largest, path, k, dtype)
            cache = TeacherCache.open(path)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        rows[name] = {
            "k": k,
            "dtype": dtype,
            "path": str(path),
            "rows": len(cache),
            "positions": cache.positions,
            "mib": size / 2**20,
            "gib_per_million_positions": size / cache.positions * 1e6 / 2**30,
            "build_s": round(time.time() - started, 1),
            "from": "teacher" if name == largest else largest,
        }
        log(f"  cache {name}: {rows[name]['mib']:.1f} MiB for {cache.positions} positions "
            f"({rows[name]['gib_per_million_positions']:.3f} GiB per million), {rows[name]['build_s']} s "
            f"(from the {rows[name]['from']})")  # fmt: skip
    return rows


def loss_differences(teacher_trainer, student_dir, train, caches: dict, n_batches: int) -> dict:
    """Per cache: the mean relative difference of its loss from the live teacher's, on the same batches and student
    (the top-K + tail approximation and the storage precision together)."""
    import torch

    live_losses = []
    for batch in batches(teacher_trainer, n_batches):
        with torch.no_grad():
            live_losses.append(teacher_trainer.compute_loss(teacher_trainer.model, batch).item())
    out = {}
    for name, row in caches.items():
        trainer = make_trainer(student_dir, None, train, tempfile.mkdtemp(), teacher_cache=row["path"])
        trainer.model.train()  # (the cache serves training batches)
        with torch.no_grad():
            losses = [trainer.compute_loss(trainer.model, b).item() for b in batches(trainer, n_batches)]
        diffs = [abs(a - b) / b for a, b in zip(losses, live_losses)]
        out[name] = {"relative_loss_difference": statistics.mean(diffs), "loss": statistics.mean(losses)}
    out["live"] = {"loss": statistics.mean(live_losses)}
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = result["arms"]
    disk = [r for r in result["disk"].values() if r["dtype"] == "float16"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].bar([a["arm"] for a in arms], [a["peak_mib"] for a in arms], color=["#888", "#2a7"])
    axes[0].set_title("peak memory above the start (MiB)", fontsize=10)
    axes[1].bar([a["arm"] for a in arms], [a["step_ms"] for a in arms], color=["#888", "#2a7"])
    axes[1].set_title("median dataset-batch step (ms)", fontsize=10)
    axes[2].plot([r["k"] for r in disk], [r["gib_per_million_positions"] for r in disk], "o-")
    axes[2].set_xscale("log", base=2)
    axes[2].set_title("cache size (GiB per million completion tokens)", fontsize=10)
    axes[2].set_xlabel("K")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per arm (after one warm-up step)")
    parser.add_argument("--loss-batches", type=int, default=4, help="train batches of the loss comparison")
    parser.add_argument("--root", default=None, help="where the caches go (default: a temporary directory)")
    parser.add_argument("--cache-dir", default=None, help="The demo's cache (default: the user cache).")
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "teacher_cache.png"))
    parser.add_argument("--log", default="", help="also append the tables and the final JSON line here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.cache_path, args.steps, args.cache_dir)))
        return

    def log(line: str = "") -> None:
        print(line, flush=True)
        if args.log:
            with open(args.log, "a") as handle:
                handle.write(line + "\n")

    started = time.time()
    log(f"$ python benchmarks/teacher_cache.py {' '.join(sys.argv[1:])}")
    config, teacher_dir, student_dir, train = setup(args.cache_dir)
    root = Path(args.root or tempfile.mkdtemp(prefix="teacher-cache-bench-"))
    teacher_trainer = make_trainer(student_dir, str(teacher_dir), train, tempfile.mkdtemp())
    log("disk (the demo's 2000 train rows):")
    disk = build_caches(teacher_trainer, root, log)
    quality = loss_differences(teacher_trainer, student_dir, train, disk, args.loss_batches)
    del teacher_trainer
    default = disk[f"k{DEFAULT_K}-float16"]["path"]
    arms = [run_child(arm, default, args.steps, args.cache_dir) for arm in ("live", "cache")]
    live, cache = arms
    log("\n| arm | teacher in memory | peak memory MiB | step ms (median, min-max) |")
    log("|---|---|---|---|")
    for a in arms:
        log(f"| {a['arm']} | {a['teacher_loaded']} | {a['peak_mib']:.0f} | {a['step_ms']:.0f} "
            f"({a['step_ms_min']:.0f}-{a['step_ms_max']:.0f}) |")  # fmt: skip
    ratios = {"peak_memory": cache["peak_mib"] / live["peak_mib"], "step_time": cache["step_ms"] / live["step_ms"]}
    log(f"cache / live: peak memory x{ratios['peak_memory']:.2f}, step time x{ratios['step_time']:.2f}")
    log("\n| cache | MiB | positions | GiB per million positions | build s | loss vs live (rel. diff.) |")
    log("|---|---|---|---|---|---|")
    for name, row in disk.items():
        log(f"| {name} | {row['mib']:.1f} | {row['positions']} | {row['gib_per_million_positions']:.3f} | "
            f"{row['build_s']} | {quality[name]['relative_loss_difference']:.2e} |")  # fmt: skip
    result = {"arms": arms, "ratios": ratios, "disk": disk, "loss": quality, "wall_s": round(time.time() - started)}
    plot(result, args.plot)
    log(f"plot: {args.plot}   wall time {result['wall_s']} s")
    log(json.dumps(result))


if __name__ == "__main__":
    main()
