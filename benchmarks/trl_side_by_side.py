"""Step time and peak memory of every SpecKD trainer against its TRL parent, side by side in one run.

    python benchmarks/trl_side_by_side.py --threads 1          # CPU: vocab 49152, batch 2 x 512, hidden 256 x 4

Pairs (the same random-init Qwen2 student and teacher, batch, tokens and settings on both sides):

- TRL `DistillationTrainer` (its defaults: beta 1, temperature 1, the chunked divergence) against
  `SpecKDDistillationTrainer` with `gate="none"` and with its default gate (`topk`, k=5);
- TRL `ServerDistillationTrainer` against `SpecKDServerDistillationTrainer` (its default gate `topk`), both at
  SpecKD's server defaults (`beta=0`, `loss_top_k=20`, tail bucket: TRL's default `beta=1` is a top-1 estimator the
  gate does not run on), with the package's in-process `LocalTeacherClient` answering for the teacher server on both
  sides (it scores one sequence at a time with a local teacher, as the server would);
- TRL `GKDTrainer` against `SpecKDTrainer` (`SpecKDConfig()` as shipped), and `SpecKDTrainer` against TRL
  `DistillationTrainer` at GKD's `beta=0.5` on the same batch (the fastest TRL path a user could pick for that data).

Measurements, each for every method: `dataset step` (`training_step` on a given batch of prompt + completion tokens,
prompt = the first quarter: for the trainers on `DistillationTrainer`, which are on-policy only, the batch is handed
to the loss as if it had been generated, `_prepare_inputs` skipped) and `on-policy step` (the student samples
`--new-tokens` tokens after a prompt of `seq - new_tokens` tokens, then forward, loss and backward; EOS never stops a
sample, so every method generates the same number of tokens).

Every trainer runs at its own defaults on its own copy of the student (the same weights): gradient checkpointing is on
in all of them (the TRL configs' default; the JSON line records it per method).

The machinery is `speed_memory.py`'s: one subprocess per measurement times every method in turns, round after round
(median of `--steps` after `--warmup`), one subprocess per method and measurement takes its peak memory. The gate's
own cost (`gate_ms`) is timed inside the timed steps themselves: the time spent in the gate's draws and verdicts
(`TokenGate.batch`, `GatedBatch.verdicts` / `verdicts_from_hidden` / `chunk_verdicts`, the server trainer's
`candidate_view`). Prints a table with the ratio of each SpecKD trainer to its TRL parent, a final JSON line, and saves
a plot.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import speed_memory  # noqa: E402  (its model builder and peak-memory protocol)


# method -> (trainer family, SpecKD config overrides or None for the TRL trainer, TRL config overrides)
METHODS = {
    "TRL Distillation": ("distill", None, {}),
    "SpecKD-Distill none": ("distill", dict(gate="none"), {}),
    "SpecKD-Distill topk": ("distill", {}, {}),
    "TRL ServerDistill": ("server", None, dict(beta=0.0, loss_top_k=20)),
    "SpecKD-Server topk": ("server", {}, {}),
    "TRL GKD": ("gkd", None, {}),
    "SpecKD defaults": ("gkd", {}, {}),
    "TRL Distillation b0.5": ("distill", None, dict(beta=0.5)),
}
# (SpecKD method, its TRL baseline): the ratios the table reports
PAIRS = (
    ("SpecKD-Distill none", "TRL Distillation"),
    ("SpecKD-Distill topk", "TRL Distillation"),
    ("SpecKD-Server topk", "TRL ServerDistill"),
    ("SpecKD defaults", "TRL GKD"),
    ("SpecKD defaults", "TRL Distillation b0.5"),
)
MEASUREMENTS = ("dataset step", "on-policy step")


# ----------------------------------------------------------------------------- the gate's own time


class GateClock:
    """Seconds spent in the gate (outermost calls only) while `running`."""

    def __init__(self):
        self.seconds, self.depth, self.running = 0.0, 0, False

    def wrap(self, owner, name):
        original = getattr(owner, name)
        clock = self

        def timed(*args, **kwargs):
            if not clock.running or clock.depth:
                return original(*args, **kwargs)
            clock.depth += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - start
                clock.depth -= 1

        setattr(owner, name, timed)

    @contextmanager
    def measure(self):
        self.seconds, self.running = 0.0, True
        try:
            yield self
        finally:
            self.running = False


CLOCK = GateClock()


def install_gate_clock():
    from speckd_trl import server_trainer
    from speckd_trl.weighting import GatedBatch, TokenGate

    CLOCK.wrap(TokenGate, "batch")
    for name in ("verdicts", "verdicts_from_hidden", "chunk_verdicts"):
        CLOCK.wrap(GatedBatch, name)
    CLOCK.wrap(server_trainer, "candidate_view")  # the server trainer's gate view (as the server trainer calls it)


# ----------------------------------------------------------------------------- one measurement (child process)


def build_trainers(args, methods, on_policy):
    """One trainer per method, all on the same student and teacher, and the input each trains on."""
    import torch
    import trl.generation.vllm_client as vllm_client
    from trl import DistillationConfig, DistillationTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer

    from speckd_trl import (
        SpecKDConfig,
        SpecKDDistillationConfig,
        SpecKDDistillationTrainer,
        SpecKDServerDistillationConfig,
        SpecKDServerDistillationTrainer,
        SpecKDTrainer,
    )
    from speckd_trl.batches import KIND_KEY, OFF_POLICY
    from speckd_trl.tools.testing import LocalTeacherClient, make_dataset, make_prompt_dataset, make_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    student, teacher = speed_memory.build_models(args, tokenizer, args.layers, device)
    student.generation_config.eos_token_id = None  # every method samples exactly `new_tokens` tokens
    teacher.eval()
    vllm_client.VLLMClient = lambda *a, **k: LocalTeacherClient(teacher)  # the teacher server, in-process
    prompt_len = args.seq - args.new_tokens if on_policy else args.seq // 4
    batch = speed_memory.make_batch(args, prompt_len, device)
    ids = batch["input_ids"]
    prompt_ids, completion_ids = ids[:, :prompt_len], ids[:, prompt_len:]
    generated = dict(  # the same tokens as DistillationTrainer's generation hands them to its loss
        prompt_ids=prompt_ids,
        prompt_mask=torch.ones_like(prompt_ids),
        completion_ids=completion_ids,
        completion_mask=torch.ones_like(completion_ids),
        num_items_in_batch=torch.tensor(completion_ids.numel(), device=device),
    )
    common = speed_memory.trainer_basics(args, device)
    gkd = dict(lmbda=1.0 if on_policy else 0.0, max_new_tokens=args.new_tokens)
    distill = dict(max_completion_length=args.new_tokens)
    server = dict(teacher_model_server_url="http://teacher.invalid:8000")
    configs = {
        "gkd": (GKDTrainer, GKDConfig, SpecKDTrainer, SpecKDConfig, gkd),
        "distill": (
            DistillationTrainer,
            DistillationConfig,
            SpecKDDistillationTrainer,
            SpecKDDistillationConfig,
            distill,
        ),
        "server": (
            ServerDistillationTrainer,
            ServerDistillationConfig,
            SpecKDServerDistillationTrainer,
            SpecKDServerDistillationConfig,
            {**distill, **server},
        ),
    }
    trainers = {}
    for method in methods:
        family, ours, trl_overrides = METHODS[method]
        trl_cls, trl_config, ours_cls, ours_config, extra = configs[family]
        if ours is None:
            trainer_cls, config = trl_cls, trl_config(**common, **extra, **trl_overrides)
        else:
            trainer_cls, config = ours_cls, ours_config(**common, **extra, **ours)
        # each trainer its own copy of the student (the same weights), set up at the trainer's own defaults
        kwargs = dict(model=copy.deepcopy(student), args=config, processing_class=tokenizer)
        if family != "server":
            kwargs["teacher_model"] = teacher
        kwargs["train_dataset"] = make_dataset(4) if family == "gkd" else make_prompt_dataset(4)
        trainer = trainer_cls(**kwargs)
        trainer.generation_config.eos_token_id = None
        trainer.current_gradient_accumulation_steps = 1  # set by `train()`, which this benchmark bypasses
        if family == "gkd":
            inputs = batch if on_policy or trainer_cls is GKDTrainer else {**batch, KIND_KEY: OFF_POLICY}
        elif on_policy:  # the prompts tokenized to the same ids for every method; generation as the trainer does it
            rows = [ids.tolist() for ids in prompt_ids.cpu()]
            trainer._tokenize_prompts = lambda prompts, rows=rows: (rows[: len(prompts)], None, {})
            inputs = [{"prompt": "x"} for _ in range(args.batch)]
        else:  # the dataset batch handed to the loss as if generated
            trainer._prepare_inputs = lambda inputs: inputs
            inputs = generated
        trainers[method] = (trainer, inputs)
    return trainers, device


def one_step(trainer, inputs, device) -> tuple[float, float]:
    """Seconds and loss of one `training_step` (forward, loss, backward; generation first when on-policy)."""
    import torch

    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fresh = dict(inputs) if isinstance(inputs, dict) else list(inputs)
    loss = trainer.training_step(trainer.model, fresh, None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, float(loss)


def child_time(args) -> list[dict]:
    methods = args.methods.split(",")
    install_gate_clock()
    trainers, device = build_trainers(args, methods, args.measure == "on-policy step")
    times, gates = {m: [] for m in methods}, {m: [] for m in methods}
    for round_index in range(args.warmup + args.steps):
        for method in methods:
            with CLOCK.measure() as clock:
                seconds, _ = one_step(*trainers[method], device)
            if round_index >= args.warmup:
                times[method].append(seconds)
                gates[method].append(clock.seconds)
    return [
        {
            "method": m,
            "measure": args.measure,
            "gradient_checkpointing": bool(trainers[m][0].args.gradient_checkpointing),
            "ms": 1000 * statistics.median(times[m]),
            "ms_min": 1000 * min(times[m]),
            "ms_max": 1000 * max(times[m]),
            "gate_ms": 1000 * statistics.median(gates[m]),
        }
        for m in methods
    ]


def child_memory(args) -> dict:
    from speckd_trl.teacher_check import PeakMemory

    trainers, device = build_trainers(args, [args.methods], args.measure == "on-policy step")
    trainer, inputs = trainers[args.methods]
    memory = PeakMemory(device)
    one_step(trainer, inputs, device)
    memory.start()
    _, loss = one_step(trainer, inputs, device)
    return {"method": args.methods, "measure": args.measure, "peak_mib": memory.peak_mib(), "loss": loss}


# ----------------------------------------------------------------------------- the side-by-side run (parent)


def run_child(args, mode, methods, measure):
    return speed_memory.run_child(args, mode, methods, measure, script=__file__)


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def plot(comparisons, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(f"{c['speckd']}\nvs {c['trl']}" for c in comparisons))
    measures = list(dict.fromkeys(c["measure"] for c in comparisons))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    width = 0.8 / len(measures)
    for ax, key, label in ((axes[0], "ms_ratio", "step time / TRL's"), (axes[1], "mem_ratio", "peak memory / TRL's")):
        for i, measure in enumerate(measures):
            xs, values = [], []
            for j, name in enumerate(labels):
                row = next(
                    (c for c in comparisons if f"{c['speckd']}\nvs {c['trl']}" == name and c["measure"] == measure),
                    None,
                )
                if row is not None:
                    xs.append(j + (i - (len(measures) - 1) / 2) * width)
                    values.append(row[key])
            ax.bar(xs, values, width, label=measure)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = speed_memory.model_arguments(__doc__, METHODS, MEASUREMENTS, "trl_side_by_side.png")
    args = parser.parse_args()
    if speed_memory.answer_as_child(args, child_time, child_memory):
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    methods = [m.strip() for m in args.methods.split(",")]
    if any(m not in METHODS for m in methods):
        parser.error(f"--methods must name only these: {', '.join(METHODS)}")
    measures = [m.strip() for m in args.measures.split(",")]
    if not measures or any(m not in MEASUREMENTS for m in measures):
        parser.error(f"--measures must name some of: {', '.join(MEASUREMENTS)}")
    started = time.time()
    rows = []
    for measure in measures:
        timed = {r["method"]: r for r in run_child(args, "time", ",".join(methods), measure)}
        for method in methods:
            row = {**timed[method], **run_child(args, "memory", method, measure)}
            rows.append(row)
            print(f"  measured {method:<22} {measure:<15} {row['ms']:9.1f} ms {row['peak_mib']:8.0f} MiB", flush=True)

    def row_of(method, measure):
        return next(r for r in rows if r["method"] == method and r["measure"] == measure)

    comparisons = [
        {
            "speckd": ours,
            "trl": base,
            "measure": measure,
            "ms": row_of(ours, measure)["ms"],
            "trl_ms": row_of(base, measure)["ms"],
            "ms_ratio": ratio(row_of(ours, measure)["ms"], row_of(base, measure)["ms"]),
            "peak_mib": row_of(ours, measure)["peak_mib"],
            "trl_peak_mib": row_of(base, measure)["peak_mib"],
            "mem_ratio": ratio(row_of(ours, measure)["peak_mib"], row_of(base, measure)["peak_mib"]),
            "gate_share": ratio(row_of(ours, measure)["gate_ms"], row_of(ours, measure)["ms"]),
        }
        for ours, base in PAIRS
        for measure in measures
        if ours in methods and base in methods
    ]
    title = (
        f"{device}, {'bf16' if args.bf16 else 'fp32'}, Qwen2 student = teacher shape: hidden {args.hidden} x "
        f"{args.layers} layers, vocab {args.vocab}; batch {args.batch} x {args.seq}, {args.new_tokens} new tokens"
        f"{f', {args.threads} thread(s)' if args.threads else ''}"
    )
    print(f"\n{title}; median of {args.steps} steps; peak memory above the level before the step\n")
    print(f"{'method':<23}" + "".join(f"| {m:<38}" for m in measures))
    print(f"{'':<23}" + "| ms (min-max)          MiB   gate ms  " * len(measures))
    for method in methods:
        line = f"{method:<23}"
        for measure in measures:
            r = row_of(method, measure)
            spread = f"{r['ms']:6.0f} ({r['ms_min']:.0f}-{r['ms_max']:.0f})"
            line += f"| {spread:<20} {r['peak_mib']:6.0f} {r['gate_ms']:8.1f}  "
        print(line)
    checkpointed = [m for m in methods if row_of(m, measures[0])["gradient_checkpointing"]]
    print(f"gradient checkpointing on in {len(checkpointed)} of the {len(methods)} trainers (their defaults)")
    print("\nSpecKD / TRL: step time x, peak memory x, the gate's share of the SpecKD step")
    for c in comparisons:
        print(
            f"  {c['speckd'] + ' / ' + c['trl']:<45} {c['measure']:<15} time x{c['ms_ratio']:5.2f}  "
            f"memory x{c['mem_ratio']:5.2f}  gate {100 * c['gate_share']:4.1f}%"
        )
    plot(comparisons, args.plot, title)
    print(f"plot: {args.plot}   wall time {time.time() - started:.0f} s")
    summary = {
        "device": device,
        "precision": "bf16" if args.bf16 else "fp32",
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "measure")},
        "rows": rows,
        "comparisons": comparisons,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
