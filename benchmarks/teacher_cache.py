"""The teacher cache against the live NF4 teacher, on the demo's models: memory, step time, disk, precision, quality.

    python benchmarks/teacher_cache.py                 # memory / step time (one run, ratios), disk per K, precision
    python benchmarks/teacher_cache.py --log benchmarks/results/teacher-cache.log
    python benchmarks/teacher_cache.py --bias --threads 1    # the top-K + tail loss against the full one (no training)

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

`--bias`: the top-K + tail-bucket divergence a cache of K gives against the full divergence, on the same rows and
student (no cache is written, nothing trains). The teacher is the demo's tuned SmolLM2-135M-Instruct in float32;
two students: `base`, the untuned SmolLM2-135M-Instruct, and `noise0.05`, the teacher plus Gaussian noise of 5% of
each weight matrix's std (`tools.testing.perturbed_copy`, `--noise`). Three kinds of data, `--rows` each (64): the
demo's first train rows (`arithmetic`), generic prompts answered by the untuned model's own samples (`chat`,
temperature 1, `--max-new-tokens`; for the base student its own samples, as in an on-policy batch) and paragraphs of
the standard library's docstrings (`docs`: text neither model wrote). Per row, summed over its completion tokens:
the full divergence (`losses.generalized_jsd_from_log_probs`, GKD's) and, per K in `--ks` and K = V, the one a run
with a cache of K computes (`TeacherCache.live`, the cut a cache run makes of its live teacher: top-K in the rule's
order, floor, `--values-dtype` rounding; then `SparseTeacher.target`, the tail-bucket target of both loss paths), at
each of `--betas` (temperature 1, ungated: the gate's weights are the same on both for gate_top_k <= K). Prints the
cached / full ratio per data kind x student x K x beta (mean and std over rows, range, pooled over tokens) and a
check (K = V in float32 storage: 1 exactly); saves `teacher_cache-bias.png`. `--tiny` runs it on tiny random
models (the smoke test).

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

    from speckd_trl.teacher_check import PeakMemory

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


# ----------------------------------------------------------------------------- the bias of the top-K + tail (--bias)

BIAS_KS = (8, 32, 128)
BIAS_BETAS = (0.0, 0.5)
# the chat kind's prompts: every topic in every form (64), answered by the untuned model's own samples
TOPICS = ("the moon", "coffee", "a rainy afternoon", "learning to swim", "volcanoes", "the history of bread",
          "saving money", "honeybees", "a train journey", "chess", "sleep", "the ocean tides", "writing a letter",
          "houseplants", "the first computers", "a city at night")  # fmt: skip
FORMS = ("Tell me about {}.", "Write a short poem about {}.", "Give me three tips about {}.", "Explain {} to a child.")
# the docs kind: paragraphs of the standard library's docstrings (text neither model wrote), round robin
DOC_MODULES = ("argparse", "difflib", "json", "logging", "shutil", "statistics", "textwrap", "csv", "heapq",
               "functools", "string", "decimal", "random", "collections", "pathlib", "calendar")  # fmt: skip


def chat_prompts(n: int) -> list[str]:
    prompts = [form.format(topic) for form in FORMS for topic in TOPICS]
    return [prompts[i % len(prompts)] for i in range(n)]


def docs_rows(n: int) -> list[dict]:
    """`n` chat rows whose answers are paragraphs (200-700 characters, no code) of the standard library's docstrings,
    taken from the modules of `DOC_MODULES` in turn: text that neither model wrote."""
    import importlib
    import inspect

    per_module = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        members = [module] + [getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")]
        paragraphs, seen = [], set()
        for obj in members:
            own = obj is module or getattr(obj, "__module__", None) == name
            if not own or not (obj is module or inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            for paragraph in (inspect.getdoc(obj) or "").split("\n\n"):
                text = " ".join(paragraph.split())
                if 200 <= len(text) <= 700 and ">>>" not in text and text not in seen:
                    seen.add(text)
                    paragraphs.append((getattr(obj, "__qualname__", name), text))
        per_module.append((name, paragraphs))
    rows = []
    for i in range(max(len(p) for _, p in per_module)):
        for name, paragraphs in per_module:
            if i < len(paragraphs):
                label, text = paragraphs[i]
                where = name if label == name else f"{name}.{label}"
                rows.append({"messages": [{"role": "user", "content": f"Explain `{where}` from the Python standard "
                                           "library."}, {"role": "assistant", "content": text}]})  # fmt: skip
    if len(rows) < n:
        raise ValueError(f"--rows {n}: the docstrings give {len(rows)} paragraphs")
    return rows[:n]


def sampled_rows(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int = 0) -> list[dict]:
    """Chat rows of `prompts` answered by `model`'s own samples (temperature 1, no top-k/top-p cut, seed `seed`)."""
    import torch

    torch.manual_seed(seed)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    rows = []
    try:
        for start in range(0, len(prompts), 16):
            chunk = prompts[start : start + 16]
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in chunk]  # fmt: skip
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**encoded, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                     max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            for prompt, ids in zip(chunk, out[:, encoded["input_ids"].size(1) :]):
                answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
                rows.append({"messages": [{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": answer}]})  # fmt: skip
    finally:
        tokenizer.padding_side = side
    return rows


def bias_spec(vocab_size: int, top_k: int, values_dtype: str):
    """A `CacheSpec` with the K, storage type and vocabulary of a cache (what the cut reads; the rest is unused)."""
    from speckd_trl.teacher_cache import CacheSpec, ids_dtype

    return CacheSpec(teacher="", teacher_config_hash="", teacher_dtype="float32", tokenizer_hash="",
                     chat_template_hash="", dataset_fingerprint="", num_rows=0, max_length=None,
                     top_k=min(top_k, vocab_size), temperature=1.0, vocab_size=vocab_size,
                     ids_dtype=ids_dtype(vocab_size), values_dtype=values_dtype, shard_rows=1024)  # fmt: skip


def row_divergences(teacher, student, tokenizer, rows: list[dict], ks, betas, *, values_dtype: str = "float16",
                    batch_size: int = 8, chunk: int = 256) -> dict:  # fmt: skip
    """Per row: the full divergence (`losses.generalized_jsd_from_log_probs`, GKD's, summed over the row's completion
    tokens) and, per K, the top-K + tail one a cache of that K gives (`TeacherCache.live`, the cut a run with a cache
    makes of its live teacher, then `SparseTeacher.target`, the tail-bucket target the loss paths use), at every beta;
    plus the check at K = V in float32 storage (equal to the full divergence).

    Returns:
        ``{"tokens": [per row], "full": {beta: [per row]}, "cut": {(K, beta): [per row]}, "check": {beta: [...]}}``,
        sums over each row's completion tokens, in float64; K = V is keyed ``V``.
    """
    import torch
    from trl.experimental.utils import DataCollatorForChatML

    from speckd_trl.losses import generalized_jsd_from_log_probs, jsd_log_probs
    from speckd_trl.teacher_cache import TeacherCache

    vocab = len(tokenizer)
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=1024)
    cuts = {min(k, vocab): TeacherCache(Path("bias"), bias_spec(vocab, k, values_dtype), []) for k in ks}
    check = TeacherCache(Path("bias"), bias_spec(vocab, vocab, "float32"), [])
    n = len(rows)
    out = {"tokens": [0] * n, "full": {b: [0.0] * n for b in betas}, "check": {b: [0.0] * n for b in betas},
           "cut": {(k, b): [0.0] * n for k in cuts for b in betas}}  # fmt: skip

    def add(key_rows: list, where: torch.Tensor, values: torch.Tensor) -> None:
        for r, v in zip(where.tolist(), values.double().tolist()):
            key_rows[r] += v

    for start in range(0, n, batch_size):
        batch = collator(rows[start : start + batch_size])
        completion = batch["labels"][:, 1:] != -100
        row_of = (torch.arange(completion.size(0))[:, None] + start).expand_as(completion)[completion]
        with torch.no_grad():
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            t_logits = teacher(**inputs).logits[:, :-1][completion][:, :vocab]
            s_logits = student(**inputs).logits[:, :-1][completion][:, :vocab]
            for r in row_of.tolist():
                out["tokens"][r] += 1
            for i in range(0, row_of.numel(), chunk):
                t, s, where = (jsd_log_probs(t_logits[i : i + chunk]), jsd_log_probs(s_logits[i : i + chunk]),
                               row_of[i : i + chunk])  # fmt: skip
                views = {k: cache.live(t) for k, cache in cuts.items()}
                targets = {k: view.target(t, s) for k, view in views.items()}
                checked = check.live(t).target(t, s)
                for beta in betas:
                    add(out["full"][beta], where, generalized_jsd_from_log_probs(s, t, beta=beta).sum(-1))
                    add(out["check"][beta], where, generalized_jsd_from_log_probs(s, checked, beta=beta).sum(-1))
                    for k, target in targets.items():
                        add(out["cut"][(k, beta)], where, generalized_jsd_from_log_probs(s, target, beta=beta).sum(-1))
    return out


def bias_table(divergences: dict, kind: str, student: str, vocab: int) -> list[dict]:
    """Per (K, beta): the cached / full ratio of each row's loss (mean, spread and range over rows; pooled over
    every token), and the full divergence per token."""
    import math

    lines = []
    full, tokens = divergences["full"], sum(divergences["tokens"])
    for (k, beta), cut in divergences["cut"].items():
        ratios = [c / f for c, f in zip(cut, full[beta]) if f > 0]
        lines.append({
            "data": kind, "student": student, "k": k, "K": "V" if k == vocab else str(k), "beta": beta,
            "rows": len(ratios), "tokens": tokens, "ratio_mean": statistics.mean(ratios),
            "ratio_std": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratio_pooled": sum(cut) / sum(full[beta]), "full_per_token": sum(full[beta]) / tokens,
        })  # fmt: skip
    for beta, checked in divergences["check"].items():
        gap = max((abs(c / f - 1) for c, f in zip(checked, full[beta]) if f > 0), default=math.nan)
        lines.append(
            {"data": kind, "student": student, "check": "K=V float32", "beta": beta, "max_abs_ratio_minus_1": gap}
        )
    return lines


def bias_models(args):
    """The teacher, its tokenizer, the arithmetic rows and the students' loaders (a student at a time): the demo's
    models, or tiny random ones (`--tiny`, for the smoke test)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speckd_trl.tools.testing import make_dataset, make_model, make_tokenizer, perturbed_copy

    if args.tiny:
        tokenizer = make_tokenizer()
        teacher = make_model(1, tokenizer).eval()
        arithmetic = list(make_dataset(args.rows))
        names = {"teacher": "tiny Qwen2 (seed 1)", "base": "tiny Qwen2 (seed 0)"}
        base = lambda: make_model(0, tokenizer).eval()  # noqa: E731
    else:
        _, teacher_dir, student_dir, train = setup(args.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
        teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
        arithmetic = [train[i] for i in range(args.rows)]
        names = {"teacher": str(teacher_dir), "base": str(student_dir)}
        base = lambda: AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32).eval()  # noqa: E731
    students = {"base": base, f"noise{args.noise:g}": lambda: perturbed_copy(teacher, args.noise, seed=0).eval()}
    return teacher, tokenizer, arithmetic, students, names


def run_bias(args, log) -> dict:
    import gc

    import torch

    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, tokenizer, arithmetic, students, names = bias_models(args)
    vocab = len(tokenizer)
    ks = sorted({min(k, vocab) for k in args.ks} | {vocab})
    log(f"teacher {names['teacher']} (float32); students: base = {names['base']} (the untuned model), "
        f"noise{args.noise:g} = the teacher plus Gaussian noise of {args.noise:g} x each weight matrix's std "
        f"(`tools.testing.perturbed_copy`, seed 0); K {ks} (V = {vocab}), values {args.values_dtype} as stored; "
        f"beta {list(args.betas)}; temperature 1; device cpu, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)")  # fmt: skip
    data, lines = {"arithmetic": arithmetic, "docs": docs_rows(args.rows)}, []
    for name, load in students.items():
        student = load()
        if "chat" not in data:  # the untuned model's own answers (for the base student: its own samples)
            data["chat"] = sampled_rows(student if name == "base" else teacher, tokenizer, chat_prompts(args.rows),
                                        args.max_new_tokens)  # fmt: skip
            log(f"chat rows: {args.rows} generic prompts, answers sampled from the {name} student "
                f"(temperature 1, at most {args.max_new_tokens} tokens, seed 0)")  # fmt: skip
        for kind in ("arithmetic", "chat", "docs"):
            divergences = row_divergences(teacher, student, tokenizer, data[kind], ks, args.betas,
                                          values_dtype=args.values_dtype)  # fmt: skip
            lines += bias_table(divergences, kind, name, vocab)
            log(f"  {kind} x {name}: {len(data[kind])} rows, {sum(divergences['tokens'])} completion tokens, "
                f"{time.time() - started:.0f} s")  # fmt: skip
        del student
        gc.collect()
    table = [line for line in lines if "check" not in line]
    checks = [line for line in lines if "check" in line]
    log("\n| data | student | K | beta | cached / full, mean +- std over rows | min - max | pooled | full D / token |")
    log("|---|---|---|---|---|---|---|---|")
    for r in table:
        log(f"| {r['data']} | {r['student']} | {r['K']} | {r['beta']:g} | {r['ratio_mean']:.4f} +- "
            f"{r['ratio_std']:.4f} | {r['ratio_min']:.4f} - {r['ratio_max']:.4f} | {r['ratio_pooled']:.4f} | "
            f"{r['full_per_token']:.4f} |")  # fmt: skip
    worst = max(c["max_abs_ratio_minus_1"] for c in checks)
    log(f"check, K = V in float32 storage against the full divergence: max |ratio - 1| over rows {worst:.1e}")
    return {"mode": "bias", "names": names, "rows": args.rows, "ks": ks, "vocab": vocab, "betas": list(args.betas),
            "values_dtype": args.values_dtype, "noise": args.noise, "threads": torch.get_num_threads(),
            "table": table, "check_max_abs_ratio_minus_1": worst, "wall_s": round(time.time() - started)}  # fmt: skip


def plot_bias(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["data"] for r in result["table"]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.3 * len(kinds), 3.8), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = [r for r in result["table"] if r["data"] == kind]
        for student in dict.fromkeys(r["student"] for r in rows):
            for beta in result["betas"]:
                line = [r for r in rows if r["student"] == student and r["beta"] == beta]
                ax.errorbar([r["k"] for r in line], [r["ratio_mean"] for r in line],
                            yerr=[r["ratio_std"] for r in line], marker="o", capsize=3,
                            label=f"{student}, beta {beta:g}")  # fmt: skip
        ax.axhline(1.0, color="#888", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["ks"], [("V" if k == result["vocab"] else str(k)) for k in result["ks"]])
        ax.set_title(f"{kind}: cached / full loss", fontsize=10)
        ax.set_xlabel("K")
    axes[0][0].set_ylabel("mean over rows (+- std)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per arm (after one warm-up step)")
    parser.add_argument("--loss-batches", type=int, default=4, help="train batches of the loss comparison")
    parser.add_argument("--root", default=None, help="where the caches go (default: a temporary directory)")
    parser.add_argument("--cache-dir", default=None, help="The demo's cache (default: the user cache).")
    parser.add_argument("--plot", default=None, help="default: teacher_cache.png (teacher_cache-bias.png, --bias)")
    parser.add_argument("--log", default="", help="also append the tables and the final JSON line here")
    parser.add_argument("--bias", action="store_true", help="measure the top-K + tail loss against the full one")
    parser.add_argument("--rows", type=int, default=64, help="--bias: rows per data kind")
    parser.add_argument("--ks", type=_ints, default=BIAS_KS, help="--bias: cache K values (and always V)")
    parser.add_argument("--betas", type=_floats, default=BIAS_BETAS, help="--bias: generalized JSD betas")
    parser.add_argument("--noise", type=float, default=0.05, help="--bias: the noisy student's relative weight noise")
    parser.add_argument("--values-dtype", default="float16", help="--bias: the cache's storage type")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="--bias: length of the sampled chat answers")
    parser.add_argument("--threads", type=int, default=0, help="--bias: torch threads (0: torch's default)")
    parser.add_argument("--tiny", action="store_true", help="--bias on tiny random models (the smoke test)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    here = os.path.dirname(__file__)
    args.plot = args.plot or os.path.join(here, "teacher_cache-bias.png" if args.bias else "teacher_cache.png")
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
    if args.bias:
        result = run_bias(args, log)
        plot_bias(result, args.plot)
        log(f"plot: {args.plot}   wall time {result['wall_s']} s")
        log(json.dumps(result))
        return
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
