"""A fast synthetic lab: does SpecKD beat GKD, and why? (issue 15, item 2)

    python benchmarks/lab.py                        # validation sweep, then the main comparison on the test split
    python benchmarks/lab.py --quick                # a smoke run (seconds): 2 seeds, few steps, no sweep
    python benchmarks/lab.py --sweep-noise 0,0.3,0.6 --methods gkd,speckd-none,speckd-topk,speckd-spec
    python benchmarks/lab.py --claims --log benchmarks/results/lab-claims --plot benchmarks/lab-claims.png

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

**The student**: a from-scratch Qwen2 of hidden 64 x 2 layers (`speckd_trl.tools.testing.make_model`, 82k parameters),
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

**Claims** (`--claims`, about 20 minutes on 1 thread): one process tests every claim of issue 15. The validation
grid picks the gates' settings (as above); then on the test split:
- C1, SpecKD beats KD and SFT: the main comparison (all five methods, teacher noise `--noise`, `--beta`, 10 seeds);
- C2, stability: from C1's (and C4's) runs, the across-seed sd of KL all per method with its ratio to GKD (a
  percentile bootstrap over seeds, fixed RNG: with 10 seeds it is wide), and loss spikes per run. The loss is
  logged every 5 steps (a mean over those steps); a *spike* is a logged loss after warm-up that exceeds 1.5 times
  the minimum of all the logged losses before it (`count_spikes`);
- C3, a stronger teacher helps SpecKD more than plain KD: teacher noise `--claims-noises` (0, 0.3, 0.6; 0.3 reuses
  C1's first seeds) x {gkd, topk, spec}, `--claims-seeds` (5) seeds: is KL all monotone in the noise, and does
  gate - GKD shrink with a stronger teacher (paired difference in differences)?
- C4, objective-agnostic: `--betas` 0.5 (JSD) and 1 (reverse KL) x {gkd, none, topk, spec}, 5 seeds: gate - GKD;
- C5, implicit curriculum: does the training acceptance rise (last fifth minus first fifth of the logged curve,
  per seed), and does constant-k `topk` match `speckd-topk-sched` (k linear from `--sched-start` 16 to the chosen
  k, `SpecKDConfig.gate_top_k_schedule="linear"`), `--sched-seeds` (10) seeds paired with C1's `topk`?
The claims table (`claims_table`) gives each comparison a verdict by fixed rules (`verdict`): "holds" only if the
paired 95% interval excludes the null in the claim's favour, "does not hold" if the point estimate is on the other
side, "unclear" otherwise. One figure (`plot_claims`) has a panel per experiment.
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
# `speckd-topk-sched`: the `topk` gate with an explicit loose-to-tight k (`gate_top_k_schedule="linear"`, from
# `--sched-start` to the k chosen for `speckd-topk`, same `reject_weight`); used by `--claims` (C5).
EXTRA_METHODS = ("speckd-topk-sched",)
GATES = {
    "speckd-none": dict(gate="none"),
    "speckd-topk": dict(gate="topk"),
    "speckd-spec": dict(gate="spec"),
    "speckd-topk-sched": dict(gate="topk"),
}
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
    from speckd_trl.tools.testing import make_model

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


def warmup_steps(steps: int) -> int:
    """Linear warm-up steps of every method: 10% of the budget, at least one."""
    return max(1, steps // 10)


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
        warmup_steps=warmup_steps(args.steps),
        logging_steps=max(1, min(getattr(args, "logging_steps", None) or 10, args.steps)),
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        # TRL's configs checkpoint activations by default; a tiny student does not need it (same numbers, faster)
        gradient_checkpointing=getattr(args, "gradient_checkpointing", True),
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
    config = SpecKDConfig(**common, **distill, loss_path="eager", **GATES[method], **settings)
    return setup.get("trainer_class", SpecKDTrainer)(
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
    row = {"method": method, "settings": settings, "seed": seed, "split": split, "noise": teacher.config.noise,
           "beta": args.beta, "lmbda": args.lmbda}  # fmt: skip
    row.update(evaluate(trainer.model, setup["eval"][split], teacher))
    history = trainer.state.log_history
    rates = [e["gate/acceptance_rate"] for e in history if "gate/acceptance_rate" in e]
    row["train_acceptance"] = rates[-1] if rates else None
    row["acceptance_curve"] = rates
    losses = [e["loss"] for e in history if "loss" in e]
    row["final_loss"] = losses[-1] if losses else None
    row["loss_curve"] = [[e["step"], e["loss"]] for e in history if "loss" in e]
    row["spikes"] = count_spikes(row["loss_curve"], warmup_steps(args.steps))
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


SPIKE_FACTOR = 1.5


def count_spikes(curve: list[list[float]], warmup: int, factor: float = SPIKE_FACTOR) -> int:
    """Loss spikes in a logged loss curve ``[[step, loss], ...]``: a logged loss after warm-up (``step > warmup``)
    that exceeds `factor` times the minimum of all the logged losses before it. Each logged loss is the mean over a
    logging window (5 steps in `--claims`), so a single noisy batch does not count as a spike on its own."""
    spikes, best = 0, math.inf
    for step, loss in curve:
        if step > warmup and loss > factor * best:
            spikes += 1
        best = min(best, loss)
    return spikes


def window_change(curve: list[float], frac: float = 0.2) -> float | None:
    """Mean of the last `frac` of a curve minus the mean of its first `frac` (at least one point each; None for a
    curve of fewer than two points)."""
    if len(curve) < 2:
        return None
    width = max(1, min(len(curve) // 2, round(len(curve) * frac)))
    return statistics.fmean(curve[-width:]) - statistics.fmean(curve[:width])


def percentile(sorted_values: list[float], q: float) -> float:
    """The `q`-quantile (0..1) of sorted values, linearly interpolated."""
    pos = q * (len(sorted_values) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (pos - low) * (sorted_values[high] - sorted_values[low])


def sd_ratio(a: list[float], b: list[float], n_boot: int = 4000, seed: int = 0) -> tuple[float, float, float] | None:
    """``sd(a) / sd(b)`` over paired seeds, with a percentile-bootstrap 95% interval: the seeds are resampled with
    replacement (one draw for both, so the pairing is kept) by a fixed RNG; draws where ``sd(b) = 0`` are skipped.
    With 5-10 seeds this interval is wide, and the percentile bootstrap of a spread tends to be too narrow rather
    than too wide: read it as a rough guide. None with fewer than three seeds or ``sd(b) = 0``."""
    import random

    if len(a) != len(b) or len(a) < 3 or statistics.pstdev(b) == 0:
        return None
    rng = random.Random(seed)
    n = len(a)
    ratios = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        sb = statistics.pstdev([b[i] for i in idx])
        if sb > 0:
            ratios.append(statistics.pstdev([a[i] for i in idx]) / sb)
    ratios.sort()
    point = statistics.pstdev(a) / statistics.pstdev(b)
    return point, percentile(ratios, 0.025), percentile(ratios, 0.975)


VERDICTS = ("holds", "does not hold", "unclear")


def verdict(estimate: float | None, low: float | None, high: float | None, null: float = 0.0,
            lower_is_better: bool = True) -> str:  # fmt: skip
    """The verdict on a claim from an estimate and its 95% interval ``[low, high]``, where the claim says the
    estimate is below `null` (`lower_is_better`, e.g. a KL difference gate - GKD < 0) or above it:

    - "holds": the whole interval lies on the claim's side of `null` (it excludes `null` in the claim's favour);
    - "does not hold": the point estimate lies on the other side of `null` (whether or not the interval excludes
      it): the data point against the claim;
    - "unclear": otherwise (the estimate favours the claim, or equals `null`, but the interval includes `null`;
      or there is no estimate).
    """
    if estimate is None or low is None or high is None or any(map(math.isnan, (estimate, low, high))):
        return "unclear"
    if not lower_is_better:
        estimate, low, high, null = -estimate, -high, -low, -null
    if high < null:
        return "holds"
    if estimate > null:
        return "does not hold"
    return "unclear"


def paired_interval(rows, method, baseline, metric) -> tuple[float, float, float, int] | None:
    """`paired` as ``(mean, low, high, seeds)``: the 95% interval's ends instead of its half-width."""
    d = paired(rows, method, baseline, metric)
    return None if d is None else (d[0], d[0] - d[1], d[0] + d[1], d[2])


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


def select_settings(setup, teacher, args, log, record: list | None = None) -> dict:
    """Pick each gate's settings on the validation split (mean KL all over the selection seeds); with `record`,
    append ``{"method", "settings", "kl_all"}`` per grid point to it."""
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
            if record is not None:
                record.append({"method": method, "settings": settings, "kl_all": statistics.fmean(kls)})
            log(f"SELECT {method} {settings}: validation KL all {statistics.fmean(kls):.4f}")
        chosen[method] = min(scores, key=lambda s: s[0])[1]
        log(f"CHOSEN {method} {chosen[method]}")
    return chosen


def compare(
    setup, teacher, settings, args, log, split="test", methods=None, seeds=None, experiment=None
) -> list[dict]:
    """Run every method on every seed (default: `args.methods`, `args.seeds`); tag the rows with `experiment`."""
    rows = []
    for seed in args.seeds if seeds is None else seeds:
        for method in args.methods if methods is None else methods:
            row = run_one(method, settings.get(method, {}), seed, split, setup, teacher, args)
            if experiment is not None:
                row["experiment"] = experiment
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
    if result.get("mode") == "claims":  # recompute the analysis and the verdicts from the rows
        args = result["args"]
        print_table(_select(result["rows"], experiment="C1"), list(METHODS), result["title"])
        result["analysis"] = analyze_claims(result["rows"], args["noise"], args["beta"])
        result["claims"] = claims_table(result["analysis"])
        report_claims(result["analysis"], result["claims"])
        plot_claims(result, plot_path)
        print(f"plot: {plot_path}")
        return result
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


# ---------------------------------------------------------------------------------------------- claims (--claims)

C3_METHODS = ("gkd", "speckd-topk", "speckd-spec")
C4_METHODS = ("gkd", "speckd-none", "speckd-topk", "speckd-spec")
C5_METHODS = ("speckd-topk-sched",)
GATED = ("speckd-topk", "speckd-spec")
RUN_SECONDS = {"sft": 5.0}  # seconds per run at 150 steps, 1 thread (main run); distillers: DISTILL_SECONDS
DISTILL_SECONDS = 9.0


def sched_settings(topk: dict, start: int) -> dict:
    """`speckd-topk-sched`'s settings: k linear from `start` (loose) at step 0 to the chosen constant k at the last
    step, the chosen `reject_weight`."""
    return dict(gate_top_k_schedule="linear", gate_top_k_start=start, gate_top_k_end=topk.get("gate_top_k", 5),
                reject_weight=topk.get("reject_weight", 0.1))  # fmt: skip


def claims_plan(args) -> list[dict]:
    """The test-split experiments of `--claims`, in run order: ``{"experiment", "noise", "beta", "methods",
    "seeds"}``. C1 is the main comparison (all methods, `args.seeds`); C5 the scheduled gate on the first
    `sched_seeds` of them; C4 each extra beta; C3 each extra teacher noise (the main noise is C1's rows)."""
    few = args.seeds[: args.claims_seeds]
    plan = [dict(experiment="C1", noise=args.noise, beta=args.beta, methods=list(METHODS), seeds=args.seeds)]
    plan.append(dict(experiment="C5", noise=args.noise, beta=args.beta, methods=list(C5_METHODS),
                     seeds=args.seeds[: args.sched_seeds]))  # fmt: skip
    plan += [dict(experiment="C4", noise=args.noise, beta=b, methods=list(C4_METHODS), seeds=few)
             for b in args.betas if b != args.beta]  # fmt: skip
    plan += [dict(experiment="C3", noise=n, beta=args.beta, methods=list(C3_METHODS), seeds=few)
             for n in args.claims_noises if n != args.noise]  # fmt: skip
    return plan


def estimate_seconds(plan: list[dict], grid_runs: int, steps: int) -> float:
    """A rough wall-time estimate: seconds per run of the main run (1 thread) scaled by the step budget."""
    runs = [m for e in plan for m in e["methods"] for _ in e["seeds"]] + ["speckd-topk"] * grid_runs
    return sum(RUN_SECONDS.get(m, DISTILL_SECONDS) * max(steps, 10) / 150 + 0.5 for m in runs)


def _interval(values: list[float]) -> list[float] | None:
    """``[mean, low, high, n]`` of a 95% t-interval (None when empty)."""
    if not values:
        return None
    mean, half = t_interval(values)
    return [mean, mean - half, mean + half, len(values)]


def _select(rows, **match) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _paired_block(rows, pairs) -> dict:
    """``{"m - b": [mean, low, high, n, seeds lower]}`` of KL all per pair present in `rows`."""
    out = {}
    for method, baseline in pairs:
        d = paired_interval(rows, method, baseline, "kl_all")
        if d is not None:
            out[f"{method} - {baseline}"] = [*d, lower_count(rows, method, baseline, "kl_all")[0]]
    return out


def stability(rows, baseline: str = "gkd") -> dict:
    """C2 per method: the across-seed sd of KL all, its ratio to `baseline`'s (bootstrap 95% interval, see
    `sd_ratio`), spikes per run (`count_spikes`) and the paired per-seed spike difference to `baseline`."""
    out = {}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    base = {r["seed"]: r["kl_all"] for r in rows if r["method"] == baseline}
    for method in methods:
        runs = [r for r in rows if r["method"] == method]
        kl = [r["kl_all"] for r in runs]
        entry = {"n": len(runs), "sd_kl_all": statistics.stdev(kl) if len(kl) > 1 else 0.0,
                 "spikes_per_run": statistics.fmean(r.get("spikes", 0) for r in runs),
                 "runs_with_spikes": sum(r.get("spikes", 0) > 0 for r in runs)}  # fmt: skip
        if method != baseline and base:
            mine = {r["seed"]: r["kl_all"] for r in runs}
            seeds = sorted(set(mine) & set(base))
            entry["sd_ratio"] = sd_ratio([mine[s] for s in seeds], [base[s] for s in seeds])
            entry["spikes_diff"] = paired_interval(rows, method, baseline, "spikes")
        out[method] = entry
    return out


def teacher_strength(rows, noises: list[float], methods, gates=GATED) -> dict:
    """C3: KL all per method and teacher noise, whether it rises monotonically with the noise (falls with teacher
    strength), each gate's paired gap to GKD per noise, and the paired difference-in-differences per seed
    ``(gate - gkd at the strongest teacher) - (gate - gkd at the weakest)`` (negative: the gate gains more than
    GKD from the stronger teacher)."""
    noises = sorted(noises)
    out = {"noises": noises, "kl_all": {}, "monotone": {}, "gap": {}, "did": {}}
    for method in methods:
        cells = [_interval([r["kl_all"] for r in _select(rows, method=method, noise=n)]) for n in noises]
        out["kl_all"][method] = cells
        means = [c[0] for c in cells if c]
        out["monotone"][method] = len(means) == len(noises) and all(a < b for a, b in zip(means, means[1:]))
    for gate in gates:
        out["gap"][gate] = [paired_interval(_select(rows, noise=n), gate, "gkd", "kl_all") for n in noises]

        def gaps(noise, gate=gate):
            sub = _select(rows, noise=noise)
            a = {r["seed"]: r["kl_all"] for r in sub if r["method"] == gate}
            b = {r["seed"]: r["kl_all"] for r in sub if r["method"] == "gkd"}
            return {s: a[s] - b[s] for s in set(a) & set(b)}

        strong, weak = gaps(noises[0]), gaps(noises[-1])
        out["did"][gate] = _interval([strong[s] - weak[s] for s in sorted(set(strong) & set(weak))])
    return out


def acceptance_change(rows, methods) -> dict:
    """C5: per method, the per-seed change of the training acceptance rate (`window_change` of its logged curve:
    last fifth minus first fifth) with its 95% t-interval, and the mean first and last windows."""
    out = {}
    for method in methods:
        curves = [
            r["acceptance_curve"] for r in rows if r["method"] == method and len(r.get("acceptance_curve") or []) > 1
        ]
        if not curves:
            continue
        w = max(1, min(len(curves[0]) // 2, round(len(curves[0]) * 0.2)))
        out[method] = {"change": _interval([window_change(c) for c in curves]),
                       "first": statistics.fmean(statistics.fmean(c[:w]) for c in curves),
                       "last": statistics.fmean(statistics.fmean(c[-w:]) for c in curves)}  # fmt: skip
    return out


def analyze_claims(rows: list[dict], noise: float, beta: float) -> dict:
    """Every claim's measurements from the test-split runs of `--claims` (rows tagged C1, C3, C4, C5), a pure
    function of the rows."""
    c1 = _select(rows, experiment="C1")
    c1_seeds = sorted({r["seed"] for r in c1})
    few_seeds = sorted({r["seed"] for r in rows if r.get("experiment") in ("C3", "C4")}) or c1_seeds
    out = {"C1": {"kl_all": {m: _interval([r["kl_all"] for r in _select(c1, method=m)]) for m in METHODS},
                  "exact": {m: _interval([r["exact"] for r in _select(c1, method=m)]) for m in METHODS},
                  "paired": _paired_block(c1, [(g, b) for g in ("speckd-none", *GATED) for b in ("gkd", "sft")]
                                          + [(g, "speckd-none") for g in GATED])}}  # fmt: skip
    out["C2"] = {"C1": stability(c1)}  # the verdicts; the other groups are reported
    for b in sorted({r["beta"] for r in _select(rows, experiment="C4")}):
        out["C2"][f"C4 beta {b}"] = stability(_select(rows, experiment="C4", beta=b))
    for n in sorted({r["noise"] for r in _select(rows, experiment="C3")}):
        out["C2"][f"C3 noise {n}"] = stability(_select(rows, experiment="C3", noise=n))
    c3 = [r for r in c1 if r["seed"] in few_seeds and r["method"] in C3_METHODS] + _select(rows, experiment="C3")
    out["C3"] = teacher_strength(c3, sorted({r["noise"] for r in c3}), C3_METHODS)
    betas = {beta: [r for r in c1 if r["method"] in C4_METHODS]}
    betas.update(
        {b: _select(rows, experiment="C4", beta=b) for b in {r["beta"] for r in _select(rows, experiment="C4")}}
    )
    pairs = [(g, "gkd") for g in ("speckd-none", *GATED)] + [(g, "speckd-none") for g in GATED]
    out["C4"] = {f"beta {b}": _paired_block(betas[b], pairs) for b in sorted(betas)}
    c5 = c1 + _select(rows, experiment="C5")
    out["C5"] = {"acceptance": acceptance_change(c5, (*GATED, *C5_METHODS)),
                 "sched": _paired_block(c5, [("speckd-topk-sched", "speckd-topk")])}  # fmt: skip
    out["meta"] = {"noise": noise, "beta": beta, "c1_seeds": len(c1_seeds), "few_seeds": len(few_seeds)}
    return out


def _ci(values, digits: int = 3, signed: bool = True) -> str:
    """``"+0.106 [-0.057, +0.269]"`` from ``[mean, low, high, ...]``."""
    if not values:
        return "n/a"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"{f.format(values[0])} [{f.format(values[1])}, {f.format(values[2])}]"


def claims_table(analysis: dict) -> list[dict]:
    """The claims table: one row per (claim, comparison) with `claim`, `experiment`, `measured` and a `verdict`
    (see `verdict`) plus the `estimate`, `low`, `high` it was computed from. Lower KL is better throughout. The
    rules per claim:

    - C1 (SpecKD beats the KD baseline and SFT): the paired 95% t-interval of KL all, gate - gkd (gate - sft),
      must lie below 0;
    - C2 (SpecKD is more stable): the across-seed sd of KL all, ratio gate / gkd, bootstrap 95% interval below 1;
      and the per-seed paired difference in loss spikes, gate - gkd, interval below 0;
    - C3 (the student gains from a stronger teacher under SpecKD more than under plain KD): "does not hold" if the
      gate's KL all is not monotone in the teacher noise; otherwise the verdict on the paired difference in
      differences (gate - gkd at noise min) - (gate - gkd at noise max), interval below 0 to hold;
    - C4 (the gate helps whatever the divergence): gate - gkd at each extra beta, interval below 0;
    - C5 (implicit curriculum): the training acceptance rises (last fifth - first fifth of the logged curve, per
      seed, interval above 0); and the implicit curriculum makes an explicit one redundant: constant-k `topk`
      beats the loose-to-tight k schedule (sched - constant KL all, interval above 0).
    """
    table = []

    def add(claim, experiment, measured, values, null=0.0, lower_is_better=True, override=None):
        est, low, high = (values[0], values[1], values[2]) if values else (None, None, None)
        table.append({"claim": claim, "experiment": experiment, "measured": measured,
                      "verdict": override or verdict(est, low, high, null, lower_is_better),
                      "estimate": est, "low": low, "high": high})  # fmt: skip

    meta = analysis["meta"]
    c1 = analysis["C1"]["paired"]
    for gate in GATED:
        for base in ("gkd", "sft"):
            d = c1.get(f"{gate} - {base}")
            measured = f"KL all {gate} - {base}: {_ci(d)} ({d[4]}/{d[3]} seeds lower)" if d else "n/a"
            add(f"C1: {gate} beats {base.upper()}", f"noise {meta['noise']}, beta {meta['beta']}, "
                f"{meta['c1_seeds']} seeds", measured, d)  # fmt: skip
    c2 = analysis["C2"]["C1"]
    for gate in GATED:
        r = c2.get(gate, {}).get("sd_ratio")
        sd = f"sd KL all {c2[gate]['sd_kl_all']:.3f} vs gkd {c2['gkd']['sd_kl_all']:.3f}" if gate in c2 else ""
        add(f"C2: {gate} is more stable (seed spread)", f"C1 runs, {meta['c1_seeds']} seeds",
            f"{sd}; ratio {_ci(r, 2, False)} (bootstrap)", r, null=1.0)  # fmt: skip
    for gate in GATED:
        d = c2.get(gate, {}).get("spikes_diff")
        spikes = (
            f"spikes/run {c2[gate]['spikes_per_run']:.2f} vs gkd {c2['gkd']['spikes_per_run']:.2f}"
            if gate in c2
            else ""
        )
        add(f"C2: {gate} has fewer loss spikes", f"C1 runs, {meta['c1_seeds']} seeds",
            f"{spikes}; paired {_ci(d, 2)}", d)  # fmt: skip
    c3 = analysis["C3"]
    noises = c3["noises"]
    for gate in GATED:
        did = c3["did"].get(gate)
        curve = " / ".join(f"{c[0]:.3f}" if c else "n/a" for c in c3["kl_all"][gate])
        gkd = " / ".join(f"{c[0]:.3f}" if c else "n/a" for c in c3["kl_all"]["gkd"])
        mono = "monotone" if c3["monotone"][gate] else "NOT monotone"
        gkd_mono = "monotone" if c3["monotone"]["gkd"] else "not monotone"
        measured = (f"KL all at noise {'/'.join(map(str, noises))}: {gate} {curve} ({mono}), gkd {gkd} "
                    f"({gkd_mono}); DiD {_ci(did)}")  # fmt: skip
        override = None if c3["monotone"][gate] else "does not hold"
        add(
            f"C3: {gate} gains more from a stronger teacher than GKD",
            f"noise {'/'.join(map(str, noises))}, {meta['few_seeds']} seeds",
            measured,
            did,
            override=override,
        )
    for key, block in analysis["C4"].items():
        if key == f"beta {meta['beta']}":
            continue
        for gate in GATED:
            d = block.get(f"{gate} - gkd")
            none = block.get(f"{gate} - speckd-none")
            measured = f"{gate} - gkd {_ci(d)}; {gate} - none {_ci(none)}" if d else "n/a"
            add(f"C4: {gate} beats GKD at {key}", f"{key}, {d[3] if d else 0} seeds", measured, d)
    c5 = analysis["C5"]
    for gate in GATED:
        a = c5["acceptance"].get(gate)
        measured = f"acceptance {a['first']:.2f} -> {a['last']:.2f}, change {_ci(a['change'], 2)}" if a else "n/a"
        add(f"C5: {gate}'s acceptance rises over training", f"C1 runs, {meta['c1_seeds']} seeds", measured,
            a["change"] if a else None, lower_is_better=False)  # fmt: skip
    d = c5["sched"].get("speckd-topk-sched - speckd-topk")
    measured = f"KL all sched - const {_ci(d)} ({d[4]}/{d[3]} seeds sched lower)" if d else "n/a"
    add(
        "C5: constant k (implicit curriculum) beats an explicit loose-to-tight k schedule",
        f"speckd-topk vs speckd-topk-sched, {d[3] if d else 0} seeds",
        measured,
        d,
        lower_is_better=False,
    )
    return table


def report_claims(analysis: dict, table: list[dict], out=print) -> None:
    """The per-claim tables, then the claims table and one VERDICT line per row."""
    out("\nC2 stability: across-seed sd of KL all, ratio to gkd (bootstrap 95%), spikes per run (a logged loss > "
        f"{SPIKE_FACTOR}x the minimum of the earlier logged losses, after warm-up), runs with a spike; the verdicts "
        "use the C1 group only")  # fmt: skip
    out("| group | method | n | sd KL all | sd ratio vs gkd | spikes/run | runs with spikes |")
    out("|---|---|---|---|---|---|---|")
    for group, block in analysis["C2"].items():
        for method, e in block.items():
            out(f"| {group} | {method} | {e['n']} | {e['sd_kl_all']:.3f} | {_ci(e.get('sd_ratio'), 2, False)} | "
                f"{e['spikes_per_run']:.2f} | {e['runs_with_spikes']} |")  # fmt: skip
    c3 = analysis["C3"]
    out("\nC3 teacher strength: KL all, mean [95% t-interval], by teacher noise (0 = exact teacher)")
    out("| method | " + " | ".join(f"noise {n}" for n in c3["noises"]) + " | monotone |")
    out("|---|" + "---|" * (len(c3["noises"]) + 1))
    for method, cells in c3["kl_all"].items():
        out(f"| {method} | " + " | ".join(_ci(c, 3, False) for c in cells) + f" | {c3['monotone'][method]} |")
    for gate, gaps in c3["gap"].items():
        out(f"| {gate} - gkd | " + " | ".join(_ci(g) for g in gaps) + f" | DiD {_ci(c3['did'][gate])} |")
    out("\nC4 (and C1 at the main beta): paired KL all differences by beta, mean [95% t-interval] (seeds lower)")
    out("| beta | " + " | ".join(next(iter(analysis["C4"].values())).keys()) + " |")
    out("|---|" + "---|" * len(next(iter(analysis["C4"].values()))))
    for key, block in analysis["C4"].items():
        out(f"| {key} | " + " | ".join(f"{_ci(d)} ({d[4]}/{d[3]})" for d in block.values()) + " |")
    out("\nC5 training acceptance: mean first fifth -> last fifth of the logged curve; paired change")
    for method, a in analysis["C5"]["acceptance"].items():
        out(f"  {method}: {a['first']:.3f} -> {a['last']:.3f}, change {_ci(a['change'])}")
    for key, d in analysis["C5"]["sched"].items():
        out(f"  KL all {key}: {_ci(d)} ({d[4]}/{d[3]} seeds lower)")
    out("\nCLAIMS (verdict rules: `verdict` and `claims_table` in benchmarks/lab.py)")
    out("| claim | experiment | measured | verdict |")
    out("|---|---|---|---|")
    for row in table:
        out(f"| {row['claim']} | {row['experiment']} | {row['measured']} | **{row['verdict']}** |")
    for row in table:
        out(f"VERDICT {row['claim']}: {row['verdict']}")


def plot_claims(result: dict, path: str) -> None:
    """One figure, a panel per claim's experiment: C1 bars, C2 per-seed KL all and loss curves, C3 KL all by
    teacher noise, C4 paired differences by beta, C5 acceptance curves and scheduled vs constant k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, analysis = result["rows"], result["analysis"]
    c1 = _select(rows, experiment="C1")
    colors = {"sft": "#777", "gkd": "#333", "speckd-none": "#1f77b4", "speckd-topk": "#2ca02c",
              "speckd-spec": "#d62728", "speckd-topk-sched": "#9467bd"}  # fmt: skip
    fig, axes = plt.subplots(2, 4, figsize=(22, 9.5))
    axes = axes.ravel()

    ax = axes[0]  # C1
    for i, m in enumerate(METHODS):
        cell = analysis["C1"]["kl_all"][m]
        ax.bar(i, cell[0], yerr=[[cell[0] - cell[1]], [cell[2] - cell[0]]], capsize=4, color=colors[m], alpha=0.7)
        vals = [r["kl_all"] for r in _select(c1, method=m)]
        ax.scatter([i] * len(vals), vals, s=8, color="k", zorder=3)
    ax.axhline(result["teacher"][str(result["args"]["noise"])]["test"]["kl_all"], color="r", ls="--", lw=1,
               label="teacher")  # fmt: skip
    ax.set_xticks(range(len(METHODS)), METHODS, rotation=25, ha="right", fontsize=8)
    ax.set_title("C1: KL(true||student), all slots (mean, 95% CI, seeds)", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[1]  # C2: per-seed spread
    for m in METHODS:
        pts = sorted((r["seed"], r["kl_all"]) for r in _select(c1, method=m))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1, color=colors[m], label=m)
    ax.set_xlabel("seed")
    ax.set_title("C2: KL all per seed (C1 runs; spread = stability)", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[2]  # C2: loss curves
    for m in ("gkd", *GATED):
        for j, r in enumerate(_select(c1, method=m)):
            curve = r.get("loss_curve") or []
            ax.plot([c[0] for c in curve], [c[1] for c in curve], color=colors[m], lw=0.7, alpha=0.5,
                    label=f"{m} ({analysis['C2']['C1'][m]['spikes_per_run']:.1f} spikes/run)"
                    if j == 0 else None)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_title("C2: logged training loss, every seed (C1 runs)", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[3]  # C3
    c3 = analysis["C3"]
    for m, cells in c3["kl_all"].items():
        xs = [n for n, c in zip(c3["noises"], cells) if c]
        ys = [c[0] for c in cells if c]
        err = [[c[0] - c[1] for c in cells if c], [c[2] - c[0] for c in cells if c]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=colors[m], label=m)
    ax.plot(c3["noises"], [result["teacher"][str(n)]["test"]["kl_all"] for n in c3["noises"]], "r--", lw=1,
            label="teacher")  # fmt: skip
    ax.set_xlabel("teacher noise (0 = exact teacher)")
    ax.set_title(f"C3: KL all by teacher strength ({analysis['meta']['few_seeds']} seeds)", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[4]  # C4
    keys = list(analysis["C4"])
    for j, (label, color) in enumerate((("speckd-none - gkd", colors["speckd-none"]),
                                        ("speckd-topk - gkd", colors["speckd-topk"]),
                                        ("speckd-spec - gkd", colors["speckd-spec"]))):  # fmt: skip
        xs, ys, err = [], [], [[], []]
        for i, k in enumerate(keys):
            d = analysis["C4"][k].get(label)
            if d:
                xs.append(i + (j - 1) * 0.15), ys.append(d[0]), err[0].append(d[0] - d[1]), err[1].append(d[2] - d[0])
        ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, color=color, label=label)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(
        range(len(keys)), [f"{k}\n(n={next(iter(analysis['C4'][k].values()))[3]})" for k in keys], fontsize=8
    )
    ax.set_title("C4: paired KL all difference to GKD by beta (< 0: better)", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[5]  # C5: acceptance curves
    c5 = c1 + _select(rows, experiment="C5")
    steps = result["args"]["steps"]
    for m in (*GATED, *C5_METHODS):
        curves = [r["acceptance_curve"] for r in _select(c5, method=m) if r.get("acceptance_curve")]
        if curves:
            n = min(len(c) for c in curves)
            every = steps / max(n, 1)
            ax.plot([every * (i + 1) for i in range(n)], [statistics.fmean(c[i] for c in curves) for i in range(n)],
                    marker=".", color=colors[m], label=m)  # fmt: skip
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("optimizer step")
    ax.set_title("C5: training acceptance rate (mean over seeds)", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[6]  # C5: scheduled vs constant k
    const = {r["seed"]: r["kl_all"] for r in _select(c5, method="speckd-topk")}
    sched = {r["seed"]: r["kl_all"] for r in _select(c5, method="speckd-topk-sched")}
    seeds = sorted(set(const) & set(sched))
    ax.scatter([const[s] for s in seeds], [sched[s] for s in seeds], color=colors["speckd-topk-sched"])
    if seeds:
        lim = [0, max(max(const[s], sched[s]) for s in seeds) * 1.05]
        ax.plot(lim, lim, "k--", lw=0.8)
    ax.set_xlabel("KL all, constant k (speckd-topk)")
    ax.set_ylabel("KL all, linear k schedule")
    ax.set_title("C5: scheduled vs constant k, per seed (below diagonal: schedule better)", fontsize=9)

    ax = axes[7]  # the verdicts
    ax.axis("off")
    text = "\n".join(f"{r['verdict']:>13}  {r['claim']}" for r in result["claims"])
    ax.text(0, 1, text, va="top", ha="left", fontsize=7, family="monospace")
    ax.set_title("claims table (verdicts)", fontsize=9)
    fig.suptitle(result["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_claims(args, log) -> dict:
    """`--claims`: the validation grid, then C1 (main comparison), C5 (scheduled gate), C4 (other betas) and C3
    (other teacher noises) on the test split, one process; the analysis, the claims table, the plot."""
    started = time.time()
    setup = make_setup(args)
    noises = sorted(set(args.claims_noises) | {args.noise})
    teachers = {n: make_teacher(n, args.teacher_temperature, args.teacher_mode) for n in noises}
    references = {}
    for n in noises:
        references[str(n)] = {
            split: teacher_reference(teachers[n], setup["eval"][split]) for split in ("validation", "test")
        }
        log(f"TEACHER noise {n}: {json.dumps(references[str(n)])}")
    plan = claims_plan(args)
    grid_runs = 0 if args.settings else sum(len(g) for g in DEFAULT_GRID.values()) * len(args.select_seeds)
    runs = grid_runs + sum(len(e["methods"]) * len(e["seeds"]) for e in plan)
    estimate = estimate_seconds(plan, grid_runs, args.steps)
    log(f"PLAN {runs} runs ({grid_runs} validation grid; "
        + ", ".join(f"{e['experiment']} noise {e['noise']} beta {e['beta']}: {len(e['methods'])} x {len(e['seeds'])}"
                    for e in plan)
        + f"); estimated {estimate / 60:.1f} min on 1 thread")  # fmt: skip

    settings = dict(DEFAULT_SETTINGS)
    grid = []
    if args.settings:
        settings.update(json.loads(args.settings))
    elif args.select_seeds:
        settings.update(select_settings(setup, teachers[args.noise], args, log, record=grid))
    settings["speckd-topk-sched"] = sched_settings(settings["speckd-topk"], args.sched_start)
    log(f"SETTINGS (chosen on validation) {json.dumps(settings)}")
    select_s = time.time() - started

    rows = []
    for e in plan:
        run_args = argparse.Namespace(**{**vars(args), "beta": e["beta"]})
        rows += compare(setup, teachers[e["noise"]], settings, run_args, log, methods=e["methods"], seeds=e["seeds"],
                        experiment=e["experiment"])  # fmt: skip
        log(f"DONE {e['experiment']} noise {e['noise']} beta {e['beta']} at {time.time() - started:.0f} s")

    title = (f"lab --claims: teacher {args.teacher_mode}, {args.steps} steps x batch {args.batch_size}, lr "
             f"{args.learning_rate}, lmbda {args.lmbda}, {len(setup['eval']['test']['prompts'])} test prompts")  # fmt: skip
    result = {"mode": "claims", "title": title, "args": dict(vars(args)), "settings": settings, "grid": grid,
              "teacher": references, "plan": plan, "rows": rows}  # fmt: skip
    c1 = _select(rows, experiment="C1")
    result.update(print_table(c1, list(METHODS), f"C1 main comparison: {title}, noise {args.noise}, beta {args.beta}",
                              log))  # fmt: skip
    result["analysis"] = analyze_claims(rows, args.noise, args.beta)
    result["claims"] = claims_table(result["analysis"])
    report_claims(result["analysis"], result["claims"], log)
    wall = time.time() - started
    result["compute"] = {"runs": runs, "estimate_s": round(estimate), "selection_s": round(select_s, 1),
                         "wall_s": round(wall, 1)}  # fmt: skip
    plot_claims(result, args.plot)
    log(f"plot: {args.plot}   selection {select_s:.0f} s   wall time {wall:.0f} s (estimate {estimate:.0f} s)")
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
    parser.add_argument("--claims", action="store_true",
                        help="test every claim in one run: validation grid, C1 main comparison, C2 stability, C3 "
                        "teacher strength, C4 other betas, C5 acceptance and the scheduled gate")  # fmt: skip
    parser.add_argument(
        "--claims-seeds", type=int, default=5, help="--claims: seeds of C3 and C4 (first N of --seeds)"
    )
    parser.add_argument("--sched-seeds", type=int, default=10, help="--claims: seeds of speckd-topk-sched (C5)")
    parser.add_argument("--sched-start", type=int, default=16, help="--claims: k of speckd-topk-sched at step 0")
    parser.add_argument("--betas", default="0.5,1.0", help="--claims: C4's betas (0.5 = JSD, 1 = reverse KL)")
    parser.add_argument("--claims-noises", default="0,0.3,0.6", help="--claims: C3's teacher noises")
    parser.add_argument("--logging-steps", type=int, default=None, help="default 10; --claims: 5")
    parser.add_argument("--output-dir", default="/tmp/speckd-lab")
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "lab.png"))
    parser.add_argument("--log", default="", help="also write the lines and the final JSON here (.log and .json)")
    parser.add_argument("--from-json", default="", help="train nothing: re-report an earlier run's .json")
    args = parser.parse_args(argv)
    if args.from_json:
        return from_json(args.from_json, args.plot)
    if args.quick:
        args.seeds, args.select_seeds, args.train_prompts = 2, (1 if args.claims else 0), 128
        args.eval_prompts = min(args.eval_prompts, 64)
        args.claims_seeds = args.sched_seeds = 2
    if args.logging_steps is None:
        args.logging_steps = 5 if args.claims else 10
    if args.steps is None:
        args.steps = 8 if args.quick else 150
    args.methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in args.methods if m not in METHODS + EXTRA_METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS + EXTRA_METHODS)}")
    if args.claims and args.methods != list(METHODS):
        parser.error("--claims runs its own methods; leave --methods out")
    args.betas = [float(x) for x in args.betas.split(",")]
    args.claims_noises = [float(x) for x in args.claims_noises.split(",")]
    args.seeds = list(range(args.seeds))
    args.select_seeds = list(range(1000, 1000 + args.select_seeds))

    import torch

    torch.set_num_threads(args.threads)
    started = time.time()
    lines = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    if args.claims:
        return finish(run_claims(args, log), args, lines)
    setup = make_setup(args)
    teacher = make_teacher(args.noise, args.teacher_temperature, args.teacher_mode)
    reference = {split: teacher_reference(teacher, setup["eval"][split]) for split in ("validation", "test")}
    log(f"TEACHER noise {args.noise}: {json.dumps(reference)}")

    settings = dict(DEFAULT_SETTINGS)
    if args.settings:
        settings.update(json.loads(args.settings))
    elif args.select_seeds:
        settings.update(select_settings(setup, teacher, args, log))
    if "speckd-topk-sched" in args.methods:
        settings.setdefault("speckd-topk-sched", sched_settings(settings["speckd-topk"], args.sched_start))
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
    return finish(result, args, lines)


def finish(result: dict, args, lines: list[str]) -> dict:
    """Print the final JSON line (the result without its rows); with `--log`, write the lines and it to `.log`
    and the whole result to `.json`."""
    final = json.dumps({k: v for k, v in result.items() if k != "rows"}, default=str)
    print(final)
    if args.log:
        Path(args.log).with_suffix(".log").write_text("\n".join(lines) + "\n" + final + "\n")
        Path(args.log).with_suffix(".json").write_text(json.dumps(result, default=str, indent=1))
    return result


if __name__ == "__main__":
    main()
