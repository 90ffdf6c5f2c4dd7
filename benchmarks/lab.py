"""A fast synthetic lab: does SpecKD beat GKD, and why? (issue 15, item 2)

    python benchmarks/lab.py                        # validation sweep, then the main comparison on the test split
    python benchmarks/lab.py --quick                # a smoke run (seconds): 2 seeds, few steps, no sweep
    python benchmarks/lab.py --sweep-noise 0,0.3,0.6 --methods gkd,speckd-none,speckd-topk,speckd-spec

**The process** (`lab_process.py`): a 64-token vocabulary; a prompt of four random digits; an answer that
interleaves four *deterministic* tokens (a fixed permutation of the i-th prompt digit, entropy 0) with four
*high-entropy* fillers (a Zipf law over 16 fillers rotated by the previous token, 2.36 nats), then the end of turn.
The true next-token law is computable at every answer position of any sequence, the student's own samples included,
so every metric below is exact, not estimated against a reference answer. Train, validation and test prompts are
disjoint.

**The teacher** (`lab_process.OracleTeacher`): a `PreTrainedModel` whose logits are the log of
``(1 - noise) * p_true + noise * r_ctx`` (then tempered by `--teacher-temperature`), with `r_ctx` a fixed
Dirichlet(0.3) law over the 32 content tokens picked by a hash of the context. `noise` is the teacher's weakness:
0 is the exact process; 0.3 (the default) keeps every deterministic argmax right but puts 30% of the mass on
context-specific wrong tokens and distorts the fillers' law (the "noisy teacher tokens" SpecKD's gate is meant to
filter); 0.6 is a weak teacher (KL(true || teacher) 0.74 nats; its argmaxes are still right on the test prompts).
`--teacher-mode flip` makes the errors position-level instead: at a share `noise` of the contexts the teacher puts
0.9 on one wrong token (0.1 on the truth), elsewhere it is exact -- the case where a gate that acts on whole
positions could filter the teacher's noise. A computable teacher is exact, costs almost nothing, and makes the
mechanism readable (KL(true || teacher) is known); its price is that it has no architecture, so
"teacher size" is modelled by its error, not its width.

**The student**: a from-scratch Qwen2 of hidden 64 x 2 layers (`speckd_trl.testing.make_model`, 82k parameters),
initialized from the seed; every method of a seed starts from the same weights and sees the same data order.

**Methods** (same steps, batch, learning rate and schedule): `sft` (TRL `SFTTrainer` on sampled answers),
`gkd` (TRL `GKDTrainer` as shipped, its on-policy normalization bug included), `speckd-none` (`SpecKDTrainer`,
`gate="none"`: GKD's loss with the normalization fixed), `speckd-topk` and `speckd-spec` (the gates). Distillers use
`lmbda=0.5`, `beta=0` (forward KL), temperature 1, 9 new tokens, `loss_path="eager"`.

**Settings chosen on the validation split only**: `gate_top_k` and the `reject_weight` of each gate are picked from a
small grid (`--grid`) by the mean total KL on the validation prompts over `--select-seeds` seeds that are not the
reporting seeds; the chosen settings then run on the test prompts with the reporting seeds.

**Metrics** (on the held-out prompts; one sampled answer per prompt, teacher-forced):
- `KL det`: mean KL(true || student) over the deterministic slots (= the NLL of the right token, end of turn
  included); `KL ent`: the same over the high-entropy slots; `KL all`: over all nine answer slots (the primary,
  continuous metric);
- `exact`: greedy decoding from the prompt, share of prompts whose four deterministic tokens are all right;
- `acc`: the training `gate/acceptance_rate` of the last logging window (SpecKD);
- compute: optimizer steps, teacher forward passes and sequences, training wall time.

**Statistics**: mean and a 95% t-interval over seeds; for every SpecKD method, the paired difference to `gkd` per
seed (same init, same data order) with its 95% t-interval, and the pure gate effect (gate minus `speckd-none`).

Prints a table, one `RUN {...}` line per run, a final JSON line; saves a plot and (with `--log`) the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lab_process as lp  # noqa: E402


METHODS = ("sft", "gkd", "speckd-none", "speckd-topk", "speckd-spec")
DEFAULT_GRID = {
    "speckd-topk": [dict(gate_top_k=k, reject_weight=w) for k in (1, 4) for w in (0.1, 0.5)],
    "speckd-spec": [dict(reject_weight=w) for w in (0.1, 0.5)],
}
DEFAULT_SETTINGS = {"speckd-topk": dict(gate_top_k=4, reject_weight=0.1), "speckd-spec": dict(reject_weight=0.1)}
METRICS = ("kl_all", "kl_det", "kl_ent", "exact", "train_acceptance", "kl_teacher", "off_support")


# ---------------------------------------------------------------------------------------------- data and models


def make_setup(args) -> dict:
    from datasets import Dataset

    splits = lp.make_splits(args.train_prompts, args.eval_prompts, args.eval_prompts, seed=args.data_seed)
    tokenizer = lp.make_lab_tokenizer()
    train = Dataset.from_list(lp.chat_rows(splits.train, seed=args.data_seed))
    sft_train = train.map(
        lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
        remove_columns=train.column_names,
    )
    return {
        "tokenizer": tokenizer,
        "train": train,
        "sft_train": sft_train,
        "eval": {
            name: eval_set(getattr(splits, name), args.data_seed + i + 1)
            for i, name in enumerate(("validation", "test"))
        },  # fmt: skip
    }


def eval_set(prompts, seed) -> dict:
    """Held-out sequences (one sampled answer per prompt) and their exact per-position laws."""
    import random

    import torch

    rng = random.Random(seed)
    ids = torch.tensor([lp.prompt_ids(p) + lp.sample_answer(p, rng) + [lp.IM_END] for p in prompts])
    p_true, slots = lp.true_distributions(ids)
    return {"prompts": prompts, "ids": ids, "p_true": p_true[:, :-1], "slots": slots[:, :-1]}


def make_student(seed: int, tokenizer):
    from speckd_trl.testing import make_model

    return make_model(seed, tokenizer, vocab_size=lp.VOCAB_SIZE, layers=2)


def make_teacher(noise: float, temperature: float, mode: str = "mix"):
    return lp.OracleTeacher(lp.OracleTeacherConfig(noise=noise, temperature=temperature, mode=mode))


# ---------------------------------------------------------------------------------------------- metrics


def kl_metrics(model_log_probs, data) -> dict[str, float]:
    """Mean KL(true || model) over the deterministic, the high-entropy and all answer slots."""
    import torch

    p = data["p_true"]
    slots = data["slots"]
    kl = (torch.xlogy(p, p) - p * model_log_probs).sum(-1)  # [B, T]
    det = torch.zeros_like(slots, dtype=torch.bool)
    for s in lp.DET_SLOTS:
        det |= slots == s
    ent = (slots >= 0) & (slots % 2 == 1) & (slots < lp.ANSWER_LEN)
    return {
        "kl_det": kl[det].mean().item(),
        "kl_ent": kl[ent].mean().item(),
        "kl_all": kl[det | ent].mean().item(),
    }


def greedy_exact(model, prompts) -> float:
    """Share of prompts whose greedy answer has all four deterministic tokens right."""
    import torch

    ids = torch.tensor([lp.prompt_ids(p) for p in prompts])
    for _ in range(lp.ANSWER_LEN):
        nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    answer = ids[:, -lp.ANSWER_LEN :: 2]
    target = torch.tensor([lp.deterministic_answer(p) for p in prompts])
    return (answer == target).all(-1).float().mean().item()


def evaluate(model, data, teacher=None) -> dict[str, float]:
    """`kl_*` and `exact`; with the teacher also `kl_teacher` (mean KL(teacher || student) over the answer slots:
    how closely the student copies its teacher) and `off_support` (the student's mean probability mass outside the
    true support at the high-entropy slots: the share of the teacher's noise it learned)."""
    import torch

    model.eval()
    with torch.no_grad():
        log_probs = model(input_ids=data["ids"]).logits[:, :-1].float().log_softmax(-1)
        out = kl_metrics(log_probs, data)
        out["exact"] = greedy_exact(model, data["prompts"])
        if teacher is not None:
            p_t = teacher.probabilities(data["ids"])[:, :-1]
            slots = data["slots"]
            answer = (slots >= 0) & (slots <= lp.ANSWER_LEN)
            kl_t = (torch.xlogy(p_t, p_t) - p_t * log_probs).sum(-1)
            out["kl_teacher"] = kl_t[answer].mean().item()
            ent = (slots >= 0) & (slots % 2 == 1) & (slots < lp.ANSWER_LEN)
            outside = (log_probs.exp() * (data["p_true"] == 0)).sum(-1)
            out["off_support"] = outside[ent].mean().item()
    return out


def teacher_reference(teacher, data) -> dict[str, float]:
    """The teacher's own KL(true || teacher) and greedy exact match: what distillation can at best copy."""
    import torch

    with torch.no_grad():
        log_probs = teacher(input_ids=data["ids"]).logits[:, :-1].log_softmax(-1)
        out = kl_metrics(log_probs, data)
        out["exact"] = greedy_exact(teacher, data["prompts"])
        slots = data["slots"]
        ent = (slots >= 0) & (slots % 2 == 1) & (slots < lp.ANSWER_LEN)
        out["off_support"] = (log_probs.exp() * (data["p_true"] == 0)).sum(-1)[ent].mean().item()
    return out


# ---------------------------------------------------------------------------------------------- training


def build_trainer(method: str, settings: dict, seed: int, setup: dict, teacher, args):
    from trl import SFTConfig, SFTTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from speckd_trl import SpecKDConfig, SpecKDTrainer

    student = make_student(seed, setup["tokenizer"])
    common = dict(
        output_dir=os.path.join(args.output_dir, f"{method}-{seed}"),
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        logging_steps=max(1, min(10, args.steps)),
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
    )
    distill = dict(lmbda=args.lmbda, beta=args.beta, temperature=1.0, max_new_tokens=lp.ANSWER_LEN + 1)
    if method == "sft":
        return SFTTrainer(
            model=student, args=SFTConfig(**common), train_dataset=setup["sft_train"],
            processing_class=setup["tokenizer"],
        )  # fmt: skip
    if method == "gkd":
        return GKDTrainer(
            model=student, teacher_model=teacher, args=GKDConfig(**common, **distill),
            train_dataset=setup["train"], processing_class=setup["tokenizer"],
        )  # fmt: skip
    gate = {"speckd-none": dict(gate="none"), "speckd-topk": dict(gate="topk"), "speckd-spec": dict(gate="spec")}
    config = SpecKDConfig(**common, **distill, loss_path="eager", **gate[method], **settings)
    return SpecKDTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=setup["train"],
        processing_class=setup["tokenizer"],
    )  # fmt: skip


def run_one(method: str, settings: dict, seed: int, split: str, setup: dict, teacher, args) -> dict:
    import transformers
    from transformers import PrinterCallback

    transformers.logging.set_verbosity_error()
    forwards, rows = teacher.forwards, teacher.rows
    start = time.time()
    trainer = build_trainer(method, settings, seed, setup, teacher, args)
    trainer.remove_callback(PrinterCallback)  # the RUN line below says what matters
    built = time.time()
    trainer.train()
    train_s = time.time() - built
    row = {"method": method, "settings": settings, "seed": seed, "split": split, "noise": teacher.config.noise}
    row.update(evaluate(trainer.model, setup["eval"][split], teacher))
    history = trainer.state.log_history
    rates = [e["gate/acceptance_rate"] for e in history if "gate/acceptance_rate" in e]
    row["train_acceptance"] = rates[-1] if rates else None
    row["acceptance_curve"] = rates
    losses = [e["loss"] for e in history if "loss" in e]
    row["final_loss"] = losses[-1] if losses else None
    row["steps"] = trainer.state.global_step
    row["teacher_forwards"] = teacher.forwards - forwards
    row["teacher_rows"] = teacher.rows - rows
    row["train_s"] = round(train_s, 2)
    row["wall_s"] = round(time.time() - start, 2)
    return row


# ---------------------------------------------------------------------------------------------- statistics


# Student's t quantile t_{0.975, df} for df = 1..30 (5 decimals); scipy is not a dependency of the project.
T_975 = (
    12.70620,
    4.30265,
    3.18245,
    2.77645,
    2.57058,
    2.44691,
    2.36462,
    2.30600,
    2.26216,
    2.22814,
    2.20099,
    2.17881,
    2.16037,
    2.14479,
    2.13145,
    2.11991,
    2.10982,
    2.10092,
    2.09302,
    2.08596,
    2.07961,
    2.07387,
    2.06866,
    2.06390,
    2.05954,
    2.05553,
    2.05183,
    2.04841,
    2.04523,
    2.04227,
)


def t_quantile_975(df: int) -> float:
    """``t_{0.975, df}``: the table up to 30 degrees of freedom, then the Cornish-Fisher expansion around the normal
    quantile (within 2e-4 of the exact value for df > 30)."""
    if df <= len(T_975):
        return T_975[df - 1]
    z = statistics.NormalDist().inv_cdf(0.975)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def summarize(rows, methods) -> dict:
    table = {}
    for method in methods:
        runs = [r for r in rows if r["method"] == method]
        table[method] = {
            metric: t_interval(values)
            for metric in METRICS + ("train_s", "teacher_forwards", "steps")
            if (values := [r[metric] for r in runs if r.get(metric) is not None])
        }
        table[method]["n"] = len(runs)
    return table


def paired(rows, method, baseline, metric) -> tuple[float, float, int] | None:
    """Mean per-seed difference `method - baseline` on `metric`, its 95% t half-width, and the seeds paired."""
    a = {r["seed"]: r[metric] for r in rows if r["method"] == method}
    b = {r["seed"]: r[metric] for r in rows if r["method"] == baseline}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    mean, half = t_interval([a[s] - b[s] for s in seeds])
    return mean, half, len(seeds)


def lower_count(rows, method, baseline, metric) -> tuple[int, int]:
    """Seeds on which `method` has a lower `metric` than `baseline`, of the seeds paired (a sign-test view that a
    bimodal outcome, a seed that learned the task or did not, cannot skew)."""
    a = {r["seed"]: r[metric] for r in rows if r["method"] == method}
    b = {r["seed"]: r[metric] for r in rows if r["method"] == baseline}
    seeds = sorted(set(a) & set(b))
    return sum(a[s] < b[s] for s in seeds), len(seeds)


def fmt(value: tuple[float, float], scale: float = 1.0, digits: int = 3) -> str:
    mean, half = value
    return f"{mean * scale:.{digits}f} +- {half * scale:.{digits}f}"


def print_table(rows, methods, title, out=print) -> dict:
    table = summarize(rows, methods)
    out(f"\n{title}\nmean +- 95% t-interval half-width over seeds (n per method in the last column)")
    header = ("method", "KL all", "KL det", "KL ent", "exact %", "train acc.", "KL(teacher||student)", "off-support",
              "teacher fwd", "train s", "n")  # fmt: skip
    out("| " + " | ".join(header) + " |")
    out("|" + "---|" * len(header))
    for method in methods:
        m = table[method]
        cells = [
            fmt(m["kl_all"]), fmt(m["kl_det"]), fmt(m["kl_ent"]), fmt(m["exact"], 100, 1),
            fmt(m["train_acceptance"], 1, 2) if "train_acceptance" in m else "-",
            fmt(m["kl_teacher"]) if "kl_teacher" in m else "-",
            fmt(m["off_support"]) if "off_support" in m else "-",
            f"{m['teacher_forwards'][0]:.0f}", f"{m['train_s'][0]:.1f}", str(m["n"]),
        ]  # fmt: skip
        out("| " + " | ".join([method, *cells]) + " |")
    diffs = {}
    pairs = [(m, "gkd") for m in methods if m.startswith("speckd") and "gkd" in methods]
    pairs += [(m, "speckd-none") for m in methods if m in ("speckd-topk", "speckd-spec") and "speckd-none" in methods]
    pairs += [(m, "sft") for m in methods if m != "sft" and "sft" in methods and m in ("gkd", "speckd-none")]
    if pairs:
        out("\npaired differences per seed (method - baseline), mean +- 95% t half-width; negative KL = better")
        out("| method - baseline | KL all | KL det | KL ent | exact % | seeds lower KL all |")
        out("|---|---|---|---|---|---|")
    for method, baseline in pairs:
        cells = []
        for metric, scale, digits in (("kl_all", 1, 3), ("kl_det", 1, 3), ("kl_ent", 1, 3), ("exact", 100, 1)):
            d = paired(rows, method, baseline, metric)
            diffs[f"{method} - {baseline}/{metric}"] = d
            cells.append(fmt(d[:2], scale, digits) + ("*" if abs(d[0]) > d[1] and d[2] > 1 else ""))
        wins = lower_count(rows, method, baseline, "kl_all")
        diffs[f"{method} - {baseline}/seeds_lower_kl_all"] = wins
        out(f"| {method} - {baseline} | " + " | ".join(cells) + f" | {wins[0]} of {wins[1]} |")
    if pairs:
        out("(* : the 95% interval excludes 0)")
    return {"table": table, "paired": diffs}


# ---------------------------------------------------------------------------------------------- stages


def select_settings(setup, teacher, args, log) -> dict:
    """Pick each gate's settings on the validation split (mean KL all over the selection seeds)."""
    chosen = {}
    for method, grid in DEFAULT_GRID.items():
        if method not in args.methods:
            continue
        scores = []
        for settings in grid:
            kls = []
            for seed in args.select_seeds:
                row = run_one(method, settings, seed, "validation", setup, teacher, args)
                log("RUN " + json.dumps(row))
                kls.append(row["kl_all"])
            scores.append((statistics.fmean(kls), settings))
            log(f"SELECT {method} {settings}: validation KL all {statistics.fmean(kls):.4f}")
        chosen[method] = min(scores, key=lambda s: s[0])[1]
        log(f"CHOSEN {method} {chosen[method]}")
    return chosen


def compare(setup, teacher, settings, args, log, split="test") -> list[dict]:
    rows = []
    for seed in args.seeds:
        for method in args.methods:
            row = run_one(method, settings.get(method, {}), seed, split, setup, teacher, args)
            rows.append(row)
            log("RUN " + json.dumps(row))
    return rows


def plot(result, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, methods = result["rows"], result["methods"]
    sweep = result.get("sweep")
    panels = 5 if sweep else 4
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 4.2))
    table = summarize(rows, methods)
    ref = result["teacher"]
    for ax, metric, label in zip(axes, ("kl_det", "kl_ent", "exact"),
                                 ("KL(true||student), deterministic slots", "KL(true||student), high-entropy slots",
                                  "greedy exact match")):  # fmt: skip
        means = [table[m][metric][0] for m in methods]
        halves = [table[m][metric][1] for m in methods]
        colors = ["#888" if m in ("sft", "gkd") else "#2a7" for m in methods]
        ax.bar(range(len(methods)), means, yerr=halves, capsize=4, color=colors)
        for i, m in enumerate(methods):
            seeds = [r[metric] for r in rows if r["method"] == m]
            ax.scatter([i] * len(seeds), seeds, s=6, color="k", zorder=3)
        ax.axhline(ref[metric], color="r", ls="--", lw=1, label="teacher")
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[3]  # the mechanism: how much of the signal the gate keeps, over training
    for method in methods:
        curves = [r["acceptance_curve"] for r in rows if r["method"] == method and r.get("acceptance_curve")]
        if curves and method != "speckd-none":
            n = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
            every = result["args"]["steps"] / max(n, 1)
            ax.plot([every * (i + 1) for i in range(n)], mean, marker=".", label=method)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("optimizer step")
    ax.set_title("training acceptance rate (mean over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    if sweep:
        ax = axes[4]
        for method in sweep["methods"]:
            xs, ys, hs = [], [], []
            for noise in sweep["noises"]:
                vals = [r["kl_all"] for r in sweep["rows"] if r["method"] == method and r["noise"] == noise]
                if vals:
                    m, h = t_interval(vals)
                    xs.append(noise), ys.append(m), hs.append(h)
            ax.errorbar(xs, ys, yerr=hs, capsize=3, marker="o", label=method)
        if sweep.get("teacher"):
            ax.plot(sweep["noises"], [sweep["teacher"][str(x)]["kl_all"] for x in sweep["noises"]], "r--",
                    lw=1, label="teacher")  # fmt: skip
        ax.set_xlabel("teacher noise (0 = exact process)")
        ax.set_title("KL(true||student), all slots, by teacher noise", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_sweep(sweep, out=print) -> None:
    for noise in sweep["noises"]:
        teacher = sweep["teacher"][str(noise)]
        print_table(
            [r for r in sweep["rows"] if r["noise"] == noise],
            sweep["methods"],
            f"sweep: teacher noise {noise} (teacher: KL all {teacher['kl_all']:.3f}, KL det {teacher['kl_det']:.3f}, "
            f"KL ent {teacher['kl_ent']:.3f}, exact {100 * teacher['exact']:.1f}%)",
            out,
        )


def from_json(path: str, plot_path: str) -> dict:
    """Re-print the tables and redraw the plot of an earlier run's `.json` (teacher references of a sweep that
    lacks them are read from the `TEACHER` lines of the `.log` next to it)."""
    result = json.loads(Path(path).read_text())
    print_table(result["rows"], result["methods"], result["title"])
    sweep = result.get("sweep")
    if sweep and not sweep.get("teacher"):
        sweep["teacher"] = {}
        for line in Path(path).with_suffix(".log").read_text().splitlines():
            if line.startswith("TEACHER noise "):
                noise, ref = line[len("TEACHER noise ") :].split(": ", 1)
                ref = json.loads(ref)
                sweep["teacher"][str(float(noise))] = ref.get("test", ref)  # older logs: the test split alone
    if sweep:
        report_sweep(sweep)
    plot(result, plot_path, result["title"])
    print(f"plot: {plot_path}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=10, help="reporting seeds 0..N-1")
    parser.add_argument("--select-seeds", type=int, default=3, help="validation seeds (1000..) for the grid; 0: skip")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 150; --quick: 8)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--lmbda", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--noise", type=float, default=0.3, help="teacher noise of the main comparison")
    parser.add_argument("--teacher-temperature", type=float, default=1.0)
    parser.add_argument("--teacher-mode", default="mix", choices=lp.TEACHER_MODES,
                        help="'mix': error spread inside every distribution; 'flip': confidently wrong at a share "
                        "`noise` of the contexts, exact elsewhere")  # fmt: skip
    parser.add_argument("--sweep-noise", default="", help="comma-separated teacher noises: run the sweep too")
    parser.add_argument("--settings", default="", help="JSON {method: settings}: skip the validation grid")
    parser.add_argument("--train-prompts", type=int, default=2000)
    parser.add_argument("--eval-prompts", type=int, default=500)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 seeds, 8 steps, no grid, <= 64 held-out prompts"
    )
    parser.add_argument("--output-dir", default="/tmp/speckd-lab")
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "lab.png"))
    parser.add_argument("--log", default="", help="also write the lines and the final JSON here (.log and .json)")
    parser.add_argument("--from-json", default="", help="train nothing: re-report an earlier run's .json")
    args = parser.parse_args(argv)
    if args.from_json:
        return from_json(args.from_json, args.plot)
    if args.quick:
        args.seeds, args.select_seeds, args.train_prompts = 2, 0, 128
        args.eval_prompts = min(args.eval_prompts, 64)
    if args.steps is None:
        args.steps = 8 if args.quick else 150
    args.methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    args.seeds = list(range(args.seeds))
    args.select_seeds = list(range(1000, 1000 + args.select_seeds))

    import torch

    torch.set_num_threads(args.threads)
    started = time.time()
    lines = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    setup = make_setup(args)
    teacher = make_teacher(args.noise, args.teacher_temperature, args.teacher_mode)
    reference = {split: teacher_reference(teacher, setup["eval"][split]) for split in ("validation", "test")}
    log(f"TEACHER noise {args.noise}: {json.dumps(reference)}")

    settings = dict(DEFAULT_SETTINGS)
    if args.settings:
        settings.update(json.loads(args.settings))
    elif args.select_seeds:
        settings.update(select_settings(setup, teacher, args, log))
    select_s = time.time() - started

    rows = compare(setup, teacher, settings, args, log)
    title = (
        f"lab: teacher {args.teacher_mode} noise {args.noise}, {args.steps} steps x batch {args.batch_size}, lr {args.learning_rate}, "
        f"lmbda {args.lmbda}, beta {args.beta}, {len(setup['eval']['test']['prompts'])} test prompts"
    )
    result = {"title": title, "args": {k: v for k, v in vars(args).items()}, "settings": settings,
              "teacher": reference["test"], "methods": args.methods, "rows": rows}  # fmt: skip
    log(f"settings: {json.dumps(settings)}   teacher on test: {json.dumps(reference['test'])}")
    result.update(print_table(rows, args.methods, title, log))

    if args.sweep_noise:
        noises = [float(x) for x in args.sweep_noise.split(",")]
        sweep_rows, sweep_teacher_refs = [], {}
        for noise in noises:
            if noise == args.noise:
                sweep_rows += rows
                sweep_teacher_refs[str(noise)] = reference["test"]
                continue
            sweep_teacher = make_teacher(noise, args.teacher_temperature, args.teacher_mode)
            sweep_teacher_refs[str(noise)] = teacher_reference(sweep_teacher, setup["eval"]["test"])
            log(f"TEACHER noise {noise}: {json.dumps({'test': sweep_teacher_refs[str(noise)]})}")
            sweep_rows += compare(setup, sweep_teacher, settings, args, log)
        result["sweep"] = {"noises": noises, "methods": args.methods, "rows": sweep_rows,
                           "teacher": sweep_teacher_refs}  # fmt: skip
        report_sweep(result["sweep"], log)

    compute = {m: {"steps": args.steps, "teacher_forwards": result["table"][m]["teacher_forwards"][0],
                   "train_s": result["table"][m]["train_s"][0]} for m in args.methods}  # fmt: skip
    wall = time.time() - started
    result["compute"] = {"per_method": compute, "selection_s": round(select_s, 1), "wall_s": round(wall, 1)}
    plot(result, args.plot, title)
    log(f"plot: {args.plot}   selection {select_s:.0f} s   wall time {wall:.0f} s")
    final = json.dumps({k: v for k, v in result.items() if k != "rows"}, default=str)
    print(final)
    if args.log:
        Path(args.log).with_suffix(".log").write_text("\n".join(lines) + "\n" + final + "\n")
        Path(args.log).with_suffix(".json").write_text(json.dumps(result, default=str, indent=1))
    return result


if __name__ == "__main__":
    main()
