"""The lab's capacity axis: does the gate's gap to GKD shrink, or turn into a gain, as the student gets too small for
part of what its teacher knows? (issue 23, item 1)

    python benchmarks/lab_capacity.py --quick                       # a smoke run (about a minute)
    python benchmarks/lab_capacity.py --log benchmarks/results/lab-capacity --plot benchmarks/lab-capacity.png

**The process** is the lab's (`lab_process.py`) with capacity-bound slots: deterministic answers `--hard-slots` (by
default 0 and 2, half of them) are ``HARD_TABLE[a_i, a_{i+1}]``, a fixed random table of the 256 digit pairs, which a
student must memorize; the other two stay a fixed permutation of one digit (learnable by any size), the fillers
keep their Zipf law. **The teacher is exact** (`noise=0`): sharp and right everywhere, the hard slots included;
`--noise` gives it `lab.py`'s noise instead (with `--hard-slots ""`: the main lab's noisy-teacher regime).

**Students**: from-scratch Qwen2, 2 layers, hidden `--sizes` (16 / 32 / 64; intermediate 2x hidden). **Budgets**:
each run trains `max(--budgets)` steps (cosine schedule) and is evaluated after every budget (150 and 450 steps by
default), so "early in training" is the same run seen sooner.

**Methods**: `gkd` (TRL's `GKDTrainer` as shipped) and `SpecKDTrainer` with `gate="none"`, the gates `topk` and
`spec`, and the variants of `lab_rules.py`: `topk-warm` (`reject_weight` linear from 1 down:
`reject_weight_schedule="linear"`), `topk-uncertain` (the `topk` verdict only where the teacher's entropy is high)
, `student-uncertain` (full weight where the student is least sure), `topk-filter` (target filtering,
`reject_target="top_k"` with `reject_weight=1`: a rejected position keeps full weight, its target the teacher's top-k
renormalized) and `topk-filter-all` (that target at every position: `lab_rules.TopKTargetFilterAll`, which rejects
everything, with the same settings), and `skd-full`, SKD's rollout editing with the full loss
(`gate="none"`, `on_policy_generation="speculative"` and `topk` editing the rollouts: the teacher replaces the
student's rejected drafts while it generates, and the loss gates nothing; the grid's `generation_gate` key, set on
`lab_rules.LabSpecKDTrainer`). Distillers: `lmbda=0.5`, `beta=0`,
`loss_path="eager"`, as `lab.py`.

**Settings chosen on validation only**: every gated method's grid runs on the validation prompts at the middle size,
the largest budget, `--select-seeds` seeds (1000..) that are not reporting seeds; the best mean KL all is kept and
runs on the test prompts for every size, budget and reporting seed.

**Metrics** per slot type, on 500 held-out test prompts (one sampled answer each, teacher-forced): mean KL(true ||
student) over the learnable deterministic slots (`kl_easy`, end of turn included), the hard slots (`kl_hard`), the
fillers (`kl_ent`) and all answer slots (`kl_all`); greedy `exact` (all four deterministic answers right). Every
SpecKD method against `gkd`: the paired per-seed difference with its 95% t-interval.

Prints the tables, one `RUN {...}` line per run and a final JSON line; saves a plot of the gap against student size.
Runs `--workers` processes of one thread each: 252 runs in 27 minutes on 2 cores (activation checkpointing off; the
results are in benchmarks/README.md, "Capacity gap").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lab  # noqa: E402
import lab_process as lp  # noqa: E402
import lab_rules  # noqa: E402


METHODS = (
    "gkd",
    "speckd-none",
    "speckd-topk",
    "speckd-spec",
    "speckd-topk-warm",
    "speckd-topk-uncertain",
    "speckd-student-uncertain",
    "speckd-topk-filter",
    "speckd-topk-filter-all",
    "speckd-skd-full",
)
# each method's grid; a `rule` key names a `lab_rules` variant and its threshold
GRID = {
    "speckd-topk": [dict(gate="topk", gate_top_k=k, reject_weight=w) for k in (1, 4) for w in (0.1, 0.5)],
    "speckd-spec": [dict(gate="spec", reject_weight=w) for w in (0.1, 0.5)],
    "speckd-topk-warm": [
        dict(gate="topk", gate_top_k=k, reject_weight_schedule="linear", reject_weight_start=1.0, reject_weight_end=w)
        for k in (1, 4)
        for w in (0.1, 0.5)
    ],
    "speckd-topk-uncertain": [
        dict(rule=("topk_uncertain", t), gate_top_k=1, reject_weight=w) for t in (0.3, 1.0) for w in (0.1, 0.5)
    ],
    "speckd-student-uncertain": [
        dict(rule=("student_uncertain", t), reject_weight=w) for t in (1.0, 2.5) for w in (0.1, 0.5)
    ],
    "speckd-topk-filter": [
        dict(gate="topk", gate_top_k=k, reject_target="top_k", reject_weight=1.0) for k in (1, 2, 4)
    ],
    "speckd-topk-filter-all": [
        dict(rule=("topk_filter_all", None), gate_top_k=k, reject_target="top_k", reject_weight=1.0)
        for k in (2, 4, 16)
    ],
    "speckd-skd-full": [
        dict(gate="none", on_policy_generation="speculative", generation_gate="topk", gate_top_k=k) for k in (1, 4)
    ],
}
FIXED = {"speckd-none": dict(gate="none")}
SLOT_METRICS = ("kl_all", "kl_easy", "kl_hard", "kl_ent", "exact")

_STATE: dict = {}  # per worker process: the data, the teacher and the settings of the run


def init_worker(args) -> None:
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    lp.configure(tuple(args.hard_slots))
    for method in METHODS[1:]:  # every setting here names its gate (`lab.build_trainer` adds `lab.GATES[method]`)
        lab.GATES[method] = {}
    _STATE["args"] = args
    _STATE["setup"] = lab.make_setup(args)
    # `SpecKDTrainer`, plus SKD rollout editing under another loss gate (`generation_gate`, set per run in `run`)
    _STATE["setup"]["trainer_class"] = lab_rules.LabSpecKDTrainer
    _STATE["teacher"] = lab.make_teacher(args.noise, 1.0)


def gate_settings(settings: dict) -> tuple[dict, str | None]:
    """`SpecKDConfig` fields of a grid point (a `rule` entry registers its `lab_rules` variant in this process) and
    its `generation_gate` (the rule that edits SKD rollouts, `lab_rules.LabSpecKDTrainer`; None: the loss's gate)."""
    settings = dict(settings)
    rule = settings.pop("rule", None)
    if rule is not None:
        settings["gate"] = lab_rules.variant(*rule)
    return settings, settings.pop("generation_gate", None)


def slot_metrics(model, data) -> dict[str, float]:
    """KL(true || student) per slot type and greedy exact match on a held-out set."""
    import torch

    model.eval()
    with torch.no_grad():
        log_probs = model(input_ids=data["ids"]).logits[:, :-1].float().log_softmax(-1)
        exact = lab.greedy_exact(model, data["prompts"])
    p, slots = data["p_true"], data["slots"]
    kl = (torch.xlogy(p, p) - p * log_probs).sum(-1)
    hard = torch.zeros_like(slots, dtype=torch.bool)
    for i in lp.HARD_SLOTS:
        hard |= slots == 2 * i
    det = torch.zeros_like(hard)
    for s in lp.DET_SLOTS:
        det |= slots == s
    ent = (slots >= 0) & (slots % 2 == 1) & (slots < lp.ANSWER_LEN)
    out = {"kl_all": kl[det | ent].mean().item(), "kl_easy": kl[det & ~hard].mean().item()}
    out["kl_hard"] = kl[hard].mean().item() if hard.any() else float("nan")
    out["kl_ent"] = kl[ent].mean().item()
    out["exact"] = exact
    return out


def run(job: dict) -> dict:
    """One training run: `job` = method, settings, seed, size, split; metrics after every budget."""
    from transformers import PrinterCallback, TrainerCallback

    from speckd_trl.tools.testing import make_model

    args, setup, teacher = _STATE["args"], _STATE["setup"], _STATE["teacher"]
    size = job["size"]
    lab.make_student = lambda seed, tokenizer: make_model(
        seed, tokenizer, vocab_size=lp.VOCAB_SIZE, layers=2, hidden_size=size, intermediate_size=2 * size
    )
    budgets = sorted(args.budgets)
    data = setup["eval"][job["split"]]
    at_budget: dict[int, dict] = {}

    class EvaluateAtBudgets(TrainerCallback):
        def on_step_end(self, _args, state, control, model=None, **kwargs):
            if state.global_step in budgets:
                at_budget[state.global_step] = slot_metrics(model, data)
                model.train()

    run_args = argparse.Namespace(**{**vars(args), "steps": budgets[-1], "gradient_checkpointing": False})
    start = time.time()
    settings, generation_gate = gate_settings(job["settings"])
    trainer = lab.build_trainer(job["method"], settings, job["seed"], setup, teacher, run_args)
    if generation_gate is not None:  # (a `LabSpecKDTrainer`: only SpecKD methods name one)
        trainer.generation_gate = generation_gate
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(EvaluateAtBudgets())
    trainer.train()
    rates = [e["gate/acceptance_rate"] for e in trainer.state.log_history if "gate/acceptance_rate" in e]
    return {
        **{k: job[k] for k in ("method", "settings", "seed", "size", "split")},
        "budgets": {str(b): at_budget[b] for b in budgets},
        "train_acceptance": rates[-1] if rates else None,
        "wall_s": round(time.time() - start, 2),
    }


def paired(
    rows: list[dict], method: str, size: int, budget: int, metric: str, baseline: str = "gkd"
) -> tuple[float, float, int] | None:
    """`method - baseline` per seed at one size and budget: mean, 95% half-width, seeds."""

    def values(m):
        return {r["seed"]: r["budgets"][str(budget)][metric] for r in rows if r["method"] == m and r["size"] == size}

    a, b = values(method), values(baseline)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    mean, half = lab.t_interval([a[s] - b[s] for s in seeds])
    return mean, half, len(seeds)


def paired_cell(d: tuple[float, float, int] | None, scale: float = 1.0, digits: int = 3) -> str:
    """A paired difference as ``mean +- half-width``, starred where the interval excludes 0 (``-`` for none)."""
    if not d:
        return "-"
    return lab.fmt(d[:2], scale, digits) + ("*" if abs(d[0]) > d[1] and d[2] > 1 else "")


def report(rows, methods, sizes, budgets, out) -> dict:
    result = {}
    # a metric some run could not measure (`kl_hard` without hard slots: NaN) is left out, shown as "-"
    measured = {m for m in SLOT_METRICS if all(math.isfinite(r["budgets"][b][m]) for r in rows for b in r["budgets"])}
    for budget in budgets:
        for size in sizes:
            out(f"\nhidden {size}, {budget} steps: mean +- 95% t half-width over seeds (KL: nats, lower is better)")
            out("| method | KL all | KL easy | KL hard | KL ent | exact % | train acc. | n |")
            out("|---|---|---|---|---|---|---|---|")
            for method in methods:
                runs = [r for r in rows if r["method"] == method and r["size"] == size]
                cells = []
                for metric in SLOT_METRICS:
                    if metric not in measured:
                        cells.append("-")
                        continue
                    values = [r["budgets"][str(budget)][metric] for r in runs]
                    scale, digits = (100, 1) if metric == "exact" else (1, 3)
                    result[f"{method}/{size}/{budget}/{metric}"] = interval = lab.t_interval(values)
                    cells.append(lab.fmt(interval, scale, digits))
                acc = [r["train_acceptance"] for r in runs if r["train_acceptance"] is not None]
                cells.append(f"{statistics.fmean(acc):.2f}" if acc else "-")
                out(f"| {method} | " + " | ".join(cells) + f" | {len(runs)} |")
            out("paired: method - gkd per seed, mean +- 95% t half-width (* the interval excludes 0)")
            out("| method - gkd | KL all | KL easy | KL hard | KL ent | exact % |")
            out("|---|---|---|---|---|---|")
            for method in methods:
                if method == "gkd":
                    continue
                cells = []
                for metric in SLOT_METRICS:
                    d = paired(rows, method, size, budget, metric) if metric in measured else None
                    result[f"{method} - gkd/{size}/{budget}/{metric}"] = d
                    cells.append(paired_cell(d, *((100, 1) if metric == "exact" else (1, 3))))
                out(f"| {method} - gkd | " + " | ".join(cells) + " |")
            if "speckd-none" in methods:  # the gate alone: both sides SpecKDTrainer, only the rule differs
                cells = []
                for method in methods:
                    if method in ("gkd", "speckd-none"):
                        continue
                    d = paired(rows, method, size, budget, "kl_all", baseline="speckd-none")
                    result[f"{method} - speckd-none/{size}/{budget}/kl_all"] = d
                    cells.append(f"{method.replace('speckd-', '')} {paired_cell(d)}")
                out("the gate alone, KL all minus speckd-none: " + "; ".join(cells))
    out("\nclaims: the method beats GKD on KL all (lab.verdict: 'holds' only if the paired 95% interval excludes 0)")
    out("| method | hidden | steps | method - gkd, KL all [95% interval] | seeds | verdict |")
    out("|---|---|---|---|---|---|")
    for method in methods:
        if method == "gkd":
            continue
        for size in sizes:
            for budget in budgets:
                d = paired(rows, method, size, budget, "kl_all")
                if not d:
                    continue
                mean, half, n = d
                call = lab.verdict(mean, mean - half, mean + half)
                result[f"verdict/{method}/{size}/{budget}"] = call
                out(
                    f"| {method} | {size} | {budget} | {mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] | {n} | {call} |"
                )
    return result


def plot(result, methods, sizes, budgets, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("kl_all", "kl_easy", "kl_hard", "kl_ent")
    fig, axes = plt.subplots(len(budgets), len(metrics), figsize=(4 * len(metrics), 3.2 * len(budgets)), squeeze=False)
    for i, budget in enumerate(budgets):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            for k, method in enumerate(m for m in methods if m != "gkd"):
                points = [(s, result.get(f"{method} - gkd/{s}/{budget}/{metric}")) for s in sizes]
                points = [(s, d) for s, d in points if d]
                if not points:
                    continue
                x = [s * (1 + 0.03 * (k - 3)) for s, _ in points]
                ax.errorbar(x, [d[0] for _, d in points], yerr=[d[1] for _, d in points], marker="o", capsize=3,
                            label=method.replace("speckd-", ""))  # fmt: skip
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(s) for s in sizes])
            ax.set_title(f"{metric} - GKD, {budget} steps", fontsize=9)
            ax.set_xlabel("student hidden size")
    axes[0][0].set_ylabel("paired diff. (nats; < 0: better than GKD)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sizes", default="16,32,64", help="student hidden sizes (2 layers)")
    parser.add_argument("--budgets", default="150,450", help="evaluate after these optimizer steps (one run each)")
    parser.add_argument("--hard-slots", default="0,2", help="deterministic answers (0..3) that are lookups")
    parser.add_argument("--noise", type=float, default=0.0, help="teacher noise (lab.py's; 0: the exact teacher)")
    parser.add_argument("--seeds", type=int, default=10, help="reporting seeds 0..N-1")
    parser.add_argument("--select-seeds", type=int, default=2, help="validation seeds (1000..) of the grid; 0: skip")
    parser.add_argument("--settings", default="", help="JSON {method: settings}: skip the validation grid")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--lmbda", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--train-prompts", type=int, default=2000)
    parser.add_argument("--eval-prompts", type=int, default=500)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="parallel runs (one thread each)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, budgets 4,8, one grid point each")
    parser.add_argument("--output-dir", default="/tmp/speckd-lab-capacity")
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "lab-capacity.png"))
    parser.add_argument("--log", default="", help="also write the lines and the final JSON here (.log and .json)")
    parser.add_argument("--from-json", default="", help="train nothing: re-report an earlier run's .json")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.load(open(args.from_json))
        methods = list(dict.fromkeys(r["method"] for r in saved["rows"]))
        result = report(saved["rows"], methods, saved["sizes"], saved["budgets"], print)
        plot(result, methods, saved["sizes"], saved["budgets"], args.plot)
        return {**{k: v for k, v in saved.items() if k != "rows"}, "result": result}
    args.methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or "gkd" not in args.methods:
        parser.error(f"methods must include gkd and come from {', '.join(METHODS)}; unknown: {unknown}")
    args.sizes = [int(x) for x in args.sizes.split(",")]
    args.budgets = [int(x) for x in args.budgets.split(",")]
    args.hard_slots = [int(x) for x in args.hard_slots.split(",") if x.strip()]
    grid = {m: g for m, g in GRID.items() if m in args.methods}
    if args.quick:
        args.seeds, args.select_seeds, args.budgets = 2, 1, [4, 8]
        args.train_prompts, args.eval_prompts = 128, 32
        grid = {m: g[:1] for m, g in grid.items()}
    args.logging_steps = max(1, min(10, min(args.budgets)))
    started, lines = time.time(), []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    log(
        f"CAPACITY sizes {args.sizes}, budgets {args.budgets}, hard slots {args.hard_slots}, seeds {args.seeds}, "
        f"teacher noise {args.noise}"
    )
    with ProcessPoolExecutor(args.workers, initializer=init_worker, initargs=(args,)) as pool:
        chosen = {m: FIXED.get(m, {}) for m in args.methods}
        if args.settings:
            chosen.update(json.loads(args.settings))
        elif args.select_seeds:
            middle = args.sizes[len(args.sizes) // 2]
            jobs = [dict(method=m, settings=s, seed=1000 + i, size=middle, split="validation")
                    for m, g in grid.items() for s in g for i in range(args.select_seeds)]  # fmt: skip
            select = list(pool.map(run, jobs))
            for row in select:
                log("SELECT " + json.dumps(row))
            last = str(max(args.budgets))
            for method, points in grid.items():
                scores = []
                for settings in points:
                    kls = [
                        r["budgets"][last]["kl_all"]
                        for r in select
                        if r["method"] == method and r["settings"] == settings
                    ]
                    scores.append((statistics.fmean(kls), settings))
                    log(f"GRID {method} {json.dumps(settings)}: validation KL all {statistics.fmean(kls):.4f}")
                chosen[method] = min(scores, key=lambda s: s[0])[1]
                log(f"CHOSEN {method} {json.dumps(chosen[method])}")
        jobs = [dict(method=m, settings=chosen[m], seed=seed, size=size, split="test")
                for size in args.sizes for seed in range(args.seeds) for m in args.methods]  # fmt: skip
        rows = []
        for row in pool.map(run, jobs):
            rows.append(row)
            log("RUN " + json.dumps(row))
    result = report(rows, args.methods, args.sizes, sorted(args.budgets), log)
    plot(result, args.methods, args.sizes, sorted(args.budgets), args.plot)
    summary = {
        "benchmark": "lab_capacity",
        "sizes": args.sizes,
        "budgets": sorted(args.budgets),
        "hard_slots": args.hard_slots,
        "noise": args.noise,
        "seeds": args.seeds,
        "chosen": chosen,
        # the headline: every method's paired KL all difference to GKD, per size and budget (mean, half-width, n)
        "kl_all_minus_gkd": {
            k.split(" - gkd/")[0] + "/" + k.split(" - gkd/")[1].rsplit("/", 1)[0]: v
            for k, v in result.items()
            if " - gkd/" in k and k.endswith("/kl_all")
        },  # fmt: skip
        "minutes": round((time.time() - started) / 60, 1),
        "plot": args.plot,
    }
    log(json.dumps(summary))
    if args.log:
        os.makedirs(os.path.dirname(args.log) or ".", exist_ok=True)
        with open(args.log + ".log", "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(args.log + ".json", "w") as f:
            json.dump({**summary, "result": result, "rows": rows}, f)
    return summary


if __name__ == "__main__":
    main()
