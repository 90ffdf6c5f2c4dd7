"""Packed against padded dataset micro-batches: tokens per second and peak memory of `SpecKDTrainer` with
`packing=True` and without, beside TRL's `GKDTrainer` and `DistillationTrainer` (padded, as they ship), on rows of
varied lengths.

    python benchmarks/packing.py                      # CPU defaults: vocab 16384, hidden 256 x 4 layers, 8 rows
    python benchmarks/packing.py --vocab 49152 --hidden 1024 --layers 8 --bf16        # a GPU

The data: `--rows` prompt / completion rows of random words (one token each, no download) whose lengths are log-normal, median `--median` tokens
and sigma `--sigma` (0.6), cut to `--max-length`; the prompt takes a uniform 20-60% of each row, the rest is the
completion (its `completion_mask`). Log-normal because the lengths of chat and instruction data are right-skewed
with a long tail (many short exchanges, a few long ones): published length histograms of instruction datasets
(Alpaca, UltraChat, ShareGPT) have that shape, and it is the usual model of message lengths. With 8 such rows a
micro-batch padded to its longest row is about half padding, the "third to a half" of issue 37.

Every method trains on the same `--batches` micro-batches of `--batch` rows (collated by `SpecKDTrainer`'s collator,
GKD's) with the same random-init Qwen2 student and teacher:

- `GKD`: TRL's `GKDTrainer.training_step` on the padded micro-batch (its full `[B, T, V]` logits);
- `DistillationTrainer`: TRL's chunked loss (`compute_loss` and backward; its `training_step` would generate) on the
  same rows in its layout: prompts left-padded to the longest prompt, completions right-padded to the longest
  completion (so its rows are at least as wide as the others');
- `SpecKD padded` / `SpecKD packed`: `SpecKDTrainer.training_step` at its defaults (gate topk, chunked loss), with
  `packing=False` / `True` (the packing itself inside the timed step);
- on request, `SpecKD padded (eager)` / `SpecKD packed (eager)`: the same on the eager loss path, whose logits cover
  every position (the chunked loss projects completion tokens only, so packing cannot save there).

Tokens per second: the micro-batches' real tokens (prompt and completion) over the time of one pass over them,
median over `--steps` rounds after `--warmup`; within a round the methods take turns micro-batch by micro-batch, in
one process, so that a slow spell of a shared machine falls on all alike. The time packing saves is read from the
paired rounds: the median over rounds of SpecKD packed's time over SpecKD padded's in the same round (each method's
"paired time ratio"), which a drifting load moves far less than a ratio of medians. Peak memory: one fresh process per method, the peak over one pass
above the level after a warm-up pass (`teacher_check.PeakMemory`: `VmHWM` on a CPU, with glibc told to map
allocations above 1 MiB separately; `max_memory_allocated` on a GPU). Reports the share of padding in the padded
micro-batches, the share of computed positions packing removes, the time packing saves, and whether the saving is
within 10% (relative) of the share removed. Prints a table and a final JSON line, and saves a plot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import speed_memory  # noqa: E402  (its measuring-subprocess dispatch)


METHODS = ("GKD", "DistillationTrainer", "SpecKD padded", "SpecKD packed")
# on request (`--methods`): the eager loss path, whose `[B, T, V]` logits cover every position, padding included
EAGER = ("SpecKD padded (eager)", "SpecKD packed (eager)")
SPECKD = {  # each SpecKD method's settings over SpecKDConfig's defaults
    "SpecKD padded": {},
    "SpecKD packed": dict(packing=True),
    "SpecKD padded (eager)": dict(loss_path="eager"),
    "SpecKD packed (eager)": dict(packing=True, loss_path="eager"),
}


# ----------------------------------------------------------------------------- data


def lengths(args) -> list[tuple[int, int]]:
    """(prompt, completion) lengths of the `--rows` rows: total log-normal, prompt a uniform 20-60% of it."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    totals = np.clip(np.rint(rng.lognormal(np.log(args.median), args.sigma, args.rows)), 8, args.max_length)
    shares = rng.uniform(0.2, 0.6, args.rows)
    return [(max(1, int(t * s)), int(t) - max(1, int(t * s))) for t, s in zip(totals, shares)]


def dataset(args, tokenizer):
    """The rows as `prompt` / `completion` text of random words of the tiny word-level tokenizer (one token each), and
    as the tokenized rows (`input_ids`, `completion_mask`, `prompt`) `SpecKDTrainer` makes of them and GKD's collator
    reads."""
    import numpy as np
    from datasets import Dataset

    from speckd_trl.data import prepare_prompt_completion

    rng = np.random.default_rng(args.seed + 1)
    words = [w for w in tokenizer.get_vocab() if w.startswith("w")]
    rows = []
    for prompt, completion in lengths(args):
        text = [" ".join(rng.choice(words, n)) for n in (prompt, completion)]
        rows.append({"prompt": text[0], "completion": text[1]})
    text = Dataset.from_list(rows)
    return text, prepare_prompt_completion(text, tokenizer, args.max_length)


def distillation_inputs(batch: dict, pad_token_id: int) -> dict:
    """A collated (left-padded) micro-batch in `DistillationTrainer`'s layout: prompts left-padded, completions
    right-padded."""
    import torch

    prompts, completions = [], []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        real = mask.bool()
        is_completion = labels[real] != -100
        prompts.append(ids[real][~is_completion])
        completions.append(ids[real][is_completion])
    P, K = max(len(p) for p in prompts), max(len(c) for c in completions)
    prompt_ids = torch.full((len(prompts), P), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    completion_ids = torch.full((len(prompts), K), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros_like(completion_ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        prompt_ids[i, P - len(p) :], prompt_mask[i, P - len(p) :] = p, 1
        completion_ids[i, : len(c)], completion_mask[i, : len(c)] = c, 1
    device = batch["input_ids"].device
    return {
        "prompt_ids": prompt_ids.to(device),
        "prompt_mask": prompt_mask.to(device),
        "completion_ids": completion_ids.to(device),
        "completion_mask": completion_mask.to(device),
    }


# ----------------------------------------------------------------------------- one measurement (child process)


def build(args, methods: list[str]):
    """One trainer per method on the same student and teacher; the padded micro-batches; each method's inputs."""
    import torch
    from trl import DistillationConfig, DistillationTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.experimental.utils import DataCollatorForChatML

    from speckd_trl import SpecKDConfig, SpecKDTrainer
    from speckd_trl.tools.testing import make_model, make_prompt_dataset, make_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = make_tokenizer()
    models = []
    for seed in (0, 1):
        heads = max(4, args.hidden // 64)
        model = make_model(
            seed,
            tokenizer,
            vocab_size=args.vocab,
            layers=args.layers,
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=max(256, args.max_length),
            attn_implementation=args.attention,
        )
        models.append(model.to(device=device, dtype=torch.bfloat16 if args.bf16 else torch.float32))
    student, teacher = models
    common = speed_memory.trainer_basics(args, device)
    data, tokenized = dataset(args, tokenizer)
    trainers = {}
    for method in methods:
        if method == "DistillationTrainer":
            trainer = DistillationTrainer(
                model=student,
                teacher_model=teacher,
                args=DistillationConfig(**common, max_completion_length=args.max_length),
                train_dataset=make_prompt_dataset(4),
                processing_class=tokenizer,
            )
        elif method == "GKD":
            trainer = GKDTrainer(
                model=student,
                teacher_model=teacher,
                args=GKDConfig(**common, max_length=args.max_length, lmbda=0.0),
                train_dataset=tokenized,
                processing_class=tokenizer,
            )
        else:
            trainer = SpecKDTrainer(
                model=student,
                teacher_model=teacher,
                args=SpecKDConfig(**common, max_length=args.max_length, lmbda=0.0, **SPECKD[method]),
                train_dataset=data,
                processing_class=tokenizer,
            )
        trainer.current_gradient_accumulation_steps = 1  # set by `train()`, which this benchmark bypasses
        trainers[method] = trainer
    collate = DataCollatorForChatML(tokenizer=tokenizer, max_length=args.max_length)  # GKD's and SpecKD's
    batches = []
    for b in range(args.batches):
        rows = [tokenized[i] for i in range(b * args.batch, (b + 1) * args.batch)]
        batches.append({k: v.to(device) if hasattr(v, "to") else v for k, v in collate(rows).items()})
    inputs = {
        method: [
            distillation_inputs(batch, tokenizer.pad_token_id) if method == "DistillationTrainer" else batch
            for batch in batches
        ]
        for method in methods
    }
    return trainers, batches, inputs, device


def one_pass(trainer, inputs: list[dict], device) -> float:
    """Seconds of one training step on each micro-batch."""
    import torch
    from trl import DistillationTrainer

    trainer.model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in inputs:
        trainer.model.zero_grad(set_to_none=True)
        if isinstance(trainer, DistillationTrainer):  # its training_step would generate the completions
            n_items = batch["completion_mask"].sum()
            loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=n_items)
            trainer.accelerator.backward(loss)
        else:
            trainer.training_step(trainer.model, dict(batch))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def layout(batches: list[dict], max_length: int, pad_token_id: int) -> dict:
    """Real tokens, padded positions (SpecKD's and GKD's layout; DistillationTrainer's) and packed positions."""
    from speckd_trl.packing import pack_micro_batch

    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    packed = sum(pack_micro_batch(b, max_length, pad_token_id)["input_ids"].numel() for b in batches)
    distillation = sum(
        distillation_inputs(b, pad_token_id)["prompt_ids"].size(1) * b["input_ids"].size(0)
        + distillation_inputs(b, pad_token_id)["completion_ids"].numel()
        for b in batches
    )
    return {
        "real_tokens": real,
        "padded_positions": padded,
        "packed_positions": packed,
        "distill_positions": distillation,
    }


def child_time(args) -> dict:
    methods = args.methods.split(",")
    trainers, batches, inputs, device = build(args, methods)
    times = {m: [] for m in methods}
    for round_index in range(args.warmup + args.steps):
        spent = dict.fromkeys(methods, 0.0)
        for b in range(len(batches)):  # micro-batch by micro-batch, the methods in turns: paired measurements
            for method in methods:
                spent[method] += one_pass(trainers[method], inputs[method][b : b + 1], device)
        if round_index >= args.warmup:
            for method in methods:
                times[method].append(spent[method])
    pad = trainers[methods[0]].processing_class.pad_token_id
    base = times["SpecKD padded"]
    return {
        "layout": layout(batches, args.max_length, pad),
        "seconds": {m: statistics.median(times[m]) for m in methods},
        "spread": {m: [min(times[m]), max(times[m])] for m in methods},
        # each round's time over SpecKD padded's in the same round: robust to a machine whose load drifts
        "paired_ratio": {m: statistics.median(t / b for t, b in zip(times[m], base)) for m in methods},
    }


def child_memory(args) -> dict:
    from speckd_trl.teacher_check import PeakMemory

    trainers, _, inputs, device = build(args, [args.methods])
    trainer, batches = trainers[args.methods], inputs[args.methods]
    memory = PeakMemory(device)
    one_pass(trainer, batches, device)
    memory.start()
    one_pass(trainer, batches, device)
    return {"method": args.methods, "peak_mib": memory.peak_mib()}


# ----------------------------------------------------------------------------- the run (parent)

SETTINGS = ("vocab", "hidden", "layers", "batch", "batches", "rows", "median", "sigma", "max_length", "steps")
SETTINGS += ("warmup", "threads", "seed", "attention")


def run_child(args, mode: str, methods: str) -> dict:
    return speed_memory.launch_child(__file__, args, mode, SETTINGS, "--methods", methods)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["method"] for r in rows]
    colors = ["#999999" if "SpecKD" not in n else ("#1f77b4" if "packed" in n else "#aec7e8") for n in names]
    for ax, key, label in ((axes[0], "tokens_per_s", "real tokens / s"), (axes[1], "peak_mib", "peak memory (MiB)")):
        ax.bar(range(len(rows)), [r[key] for r in rows], color=colors)
        ax.set_xticks(range(len(rows)), [n.replace(" ", "\n", 1) for n in names], fontsize=8)
        ax.set_ylabel(label)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="rows per micro-batch")
    parser.add_argument("--batches", type=int, default=3, help="micro-batches per timed pass")
    parser.add_argument("--rows", type=int, default=0, help="dataset rows (0: batch x batches)")
    parser.add_argument("--median", type=float, default=160, help="median row length (tokens)")
    parser.add_argument("--sigma", type=float, default=0.6, help="sigma of the log-normal row lengths")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention", default="sdpa", help="attn_implementation of both models")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated subset, timed in this order.")
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "packing.png"))
    parser.add_argument("--child", choices=("time", "memory"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rows = args.rows or args.batch * args.batches
    if speed_memory.answer_as_child(args, child_time, child_memory):
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    methods = [m.strip() for m in args.methods.split(",")]
    if not {"SpecKD padded", "SpecKD packed"} <= set(methods) or any(m not in METHODS + EAGER for m in methods):
        parser.error(
            f"--methods must include SpecKD padded and SpecKD packed and name only: {', '.join(METHODS + EAGER)}"
        )
    started = time.time()
    timed = run_child(args, "time", ",".join(methods))
    shape = timed["layout"]
    rows = []
    for method in methods:
        seconds = timed["seconds"][method]
        memory = run_child(args, "memory", method)
        positions = shape["distill_positions"] if method == "DistillationTrainer" else shape["padded_positions"]
        positions = shape["packed_positions"] if "packed" in method else positions
        rows.append(
            {
                "method": method,
                "seconds": seconds,
                "spread": timed["spread"][method],
                "tokens_per_s": shape["real_tokens"] / seconds,
                "paired_time_ratio": timed["paired_ratio"][method],
                "positions": positions,
                "peak_mib": memory["peak_mib"],
            }
        )
        print(f"  measured {method:<20} {1000 * seconds:9.0f} ms {memory['peak_mib']:8.0f} MiB", flush=True)
    by = {r["method"]: r for r in rows}
    padded, packed = by["SpecKD padded"], by["SpecKD packed"]
    padding_share = 1 - shape["real_tokens"] / shape["padded_positions"]
    removed = 1 - shape["packed_positions"] / shape["padded_positions"]
    saved = 1 - packed["seconds"] / padded["seconds"]
    saved_best = 1 - packed["spread"][0] / padded["spread"][0]
    saved_paired = 1 - packed["paired_time_ratio"]
    memory_saved = 1 - packed["peak_mib"] / padded["peak_mib"] if padded["peak_mib"] > 0 else float("nan")
    within = abs(saved_paired - removed) <= 0.1 * removed
    eager_saved = None
    if set(EAGER) <= set(by):
        eager_saved = 1 - by[EAGER[1]]["paired_time_ratio"] / by[EAGER[0]]["paired_time_ratio"]

    title = (
        f"{device}, vocab {args.vocab}, hidden {args.hidden} x {args.layers} layers, "
        f"{'bf16' if args.bf16 else 'fp32'}, {args.attention}; {args.batches} micro-batches of {args.batch} rows, "
        f"log-normal lengths (median {args.median:g}, sigma {args.sigma:g}, max {args.max_length})"
    )
    print(f"\n{title}; median of {args.steps} passes; peak memory above the level before the pass")
    print(
        f"{'method':<21}| {'positions':>9} | {'ms / pass':>9} | {'best ms':>9} | {'tokens/s':>9} | {'x padded':>8} | "
        f"{'MiB':>7} | {'x padded':>8} | {'paired time ratio':>17}"
    )
    for r in rows:
        ratio = r["tokens_per_s"] / padded["tokens_per_s"]
        memory = r["peak_mib"] / padded["peak_mib"] if padded["peak_mib"] > 0 else float("nan")
        print(
            f"{r['method']:<21}| {r['positions']:9d} | {1000 * r['seconds']:9.0f} | {1000 * r['spread'][0]:9.0f} | "
            f"{r['tokens_per_s']:9.0f} | {ratio:8.2f} | {r['peak_mib']:7.0f} | {memory:8.2f} | "
            f"{r['paired_time_ratio']:17.2f}"
        )
    print(
        f"\nreal tokens {shape['real_tokens']}; padding in the padded micro-batches {100 * padding_share:.1f}%; "
        f"positions packing removes {100 * removed:.1f}%; step time it saves {100 * saved_paired:.1f}% (median of "
        f"the paired rounds; {100 * saved:.1f}% median against median, {100 * saved_best:.1f}% best against best), "
        f"{'within' if within else 'not within'} 10% of the positions removed; peak memory it saves "
        f"{100 * memory_saved:.1f}%"
    )
    if eager_saved is not None:
        print(f"on the eager loss path (logits at every position) packing saves {100 * eager_saved:.1f}% (paired)")
    plot(rows, args.plot, title)
    print(f"plot: {args.plot}   wall time {time.time() - started:.0f} s")
    summary = {
        "device": device,
        "args": {k: v for k, v in vars(args).items() if k != "child"},
        "layout": shape,
        "padding_share": padding_share,
        "positions_removed": removed,
        "time_saved": saved_paired,
        "time_saved_medians": saved,
        "time_saved_best": saved_best,
        "memory_saved": memory_saved,
        "saving_within_10pct_of_removed": within,
        "eager_time_saved": eager_saved,
        "rows": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
