"""What the gate costs: one loss + backward step of GKD vs SpecKD (topk, spec), side by side in one run.

    python benchmarks/gate_overhead.py                       # CPU, small models
    python benchmarks/gate_overhead.py --hidden 1024 --layers 8 --vocab 49152 --batch 8 --seq 512   # GPU

Random-init Qwen2 student and teacher built from configs (no download), one fixed batch of random tokens with a
masked prompt, the same batch for every method. Each method runs `warmup` untimed steps, then `steps` timed ones;
the table reports milliseconds per step, the ratio to GKD and (on CUDA) peak allocated memory. Generation is left out
on purpose: it is the same for both trainers, and it would drown the gate's cost in sampling noise. Prints a table and
a final JSON line, and saves a bar chart.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from speckd_trl import SpecKDConfig, SpecKDTrainer  # noqa: E402
from speckd_trl.testing import make_dataset, make_model, make_tokenizer  # noqa: E402
from speckd_trl.trainer import KIND_KEY, OFF_POLICY, ON_POLICY  # noqa: E402


def build_models(tokenizer, args, device):
    models = []
    for seed in (0, 1):
        model = make_model(seed, tokenizer, vocab_size=args.vocab, layers=args.layers)
        if args.hidden != 64:
            torch.manual_seed(seed)
            config = model.config
            config.hidden_size, config.intermediate_size = args.hidden, 4 * args.hidden
            config.num_attention_heads, config.num_key_value_heads = (
                max(4, args.hidden // 64),
                max(2, args.hidden // 256),
            )
            model = type(model)(config)
        models.append(model.to(device=device, dtype=torch.bfloat16 if args.bf16 else torch.float32))
    return models


def make_batch(args, device):
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, args.vocab, (args.batch, args.seq), generator=g)
    labels = input_ids.clone()
    labels[:, : args.seq // 4] = -100  # the prompt
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device),
    }


def time_method(name, trainer, batch, kind, args, device):
    model = trainer.model
    inputs = {**batch, KIND_KEY: kind}
    n_items = (batch["labels"][:, 1:] != -100).sum()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, inputs, num_items_in_batch=n_items)
        loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / args.steps * 1000
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {"method": name, "batch": kind, "ms_per_step": ms, "peak_mib": peak, "loss": loss.item()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--plot", default="gate_overhead.png")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = make_tokenizer()
    student, teacher = build_models(tokenizer, args, device)
    batch = make_batch(args, device)
    common = dict(
        output_dir=tempfile.mkdtemp(), report_to="none", bf16=args.bf16, use_cpu=device.type == "cpu", seed=0
    )
    methods = [
        ("GKD", GKDTrainer, GKDConfig(**common)),
        ("SpecKD topk", SpecKDTrainer, SpecKDConfig(gate="topk", **common)),
        ("SpecKD spec", SpecKDTrainer, SpecKDConfig(gate="spec", **common)),
    ]
    rows = []
    for name, cls, config in methods:
        trainer = cls(model=student, teacher_model=teacher, args=config, train_dataset=make_dataset(4),
                      processing_class=tokenizer)  # fmt: skip
        kinds = [OFF_POLICY, ON_POLICY] if cls is SpecKDTrainer else [OFF_POLICY]
        rows += [time_method(name, trainer, batch, kind, args, device) for kind in kinds]

    base = rows[0]["ms_per_step"]
    print(
        f"device={device} hidden={args.hidden} layers={args.layers} vocab={args.vocab} batch={args.batch}x{args.seq}"
    )
    print(f"{'method':<12} {'batch':<11} {'ms/step':>9} {'x GKD':>7} {'peak MiB':>9}")
    for row in rows:
        row["ratio_to_gkd"] = row["ms_per_step"] / base
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        print(
            f"{row['method']:<12} {row['batch']:<11} {row['ms_per_step']:>9.2f} {row['ratio_to_gkd']:>7.3f} {peak:>9}"
        )

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [f"{r['method']}\n{r['batch']}" for r in rows]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(labels, [r["ms_per_step"] for r in rows], color=["#888"] + ["#2a7"] * (len(rows) - 1))
        ax.set_ylabel("ms per loss+backward step")
        ax.set_title(f"Gate overhead on {device.type} (vocab {args.vocab}, batch {args.batch}x{args.seq})")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    except ImportError:
        print("plot: skipped (matplotlib not installed)")
    print(json.dumps({"device": str(device), "args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
