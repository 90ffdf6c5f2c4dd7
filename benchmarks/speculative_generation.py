"""SKD-style gated generation: teacher forward passes per generated token and wall time, for several draft lengths.

    python benchmarks/speculative_generation.py                      # CPU (1 thread), ~1 minute
    python benchmarks/speculative_generation.py --hidden 1024 --layers 16 --vocab 32000 --batch 16 --new-tokens 128

Random-init Qwen2 teacher built from a config (no download). The student must be close to the teacher for a high
acceptance rate, and cheaper than it for a speed-up: it is the teacher's first `--student-layers` layers (embeddings,
final norm and head shared) plus Gaussian noise (`--noise` times each weight's std), and the teacher's deeper layers
are damped (their output projections scaled by `--damp`) so that they refine the shallow model's prediction rather
than replace it. `--logit-scale` sharpens both models' next-token distributions to a realistic entropy (random-init
models are close to uniform, which would make any two models agree under the `spec` rule).

For each `gate_draft_len` in `--draft-lens` (default 1, 4, 8) one `speculative_generate` call (gate `spec`, sampling
at temperature 1, no EOS, so every sequence has `--new-tokens` tokens) on the same prompts and seeds, after an
untimed warm-up, timed `--repeats` times (fastest kept); the student sampling alone (GKD's on-policy generation) and the teacher sampling alone for reference.
Reports the measured acceptance rate, teacher forward passes per generated token (per sequence: verify blocks /
tokens), the ratio to draft length 1, the theory `(1 - a) / (1 - a^k)` at the measured acceptance `a`, and wall time
per generated sequence. Prints a table and a final JSON line, and saves `speculative_generation.png` next to itself.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402

from speckd_trl.generation import row_seeds, speculative_generate, student_generate  # noqa: E402


def build_models(args, device):
    torch.manual_seed(args.seed)
    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(4, args.hidden // 64),
        num_key_value_heads=max(2, args.hidden // 256),
        max_position_embeddings=args.prompt_len + args.new_tokens + 8,
        tie_word_embeddings=False,
    )
    teacher = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(args.logit_scale)
        for layer in teacher.model.layers[args.student_layers :]:
            layer.self_attn.o_proj.weight.mul_(args.damp)
            layer.mlp.down_proj.weight.mul_(args.damp)
    student = AutoModelForCausalLM.from_config(
        Qwen2Config(**{**config.to_dict(), "num_hidden_layers": args.student_layers, "layer_types": None})
    )
    student.load_state_dict(teacher.state_dict(), strict=False)  # the first layers, embeddings, norm and head
    generator = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for param in student.parameters():
            if param.dim() > 1:
                param.add_(torch.randn(param.shape, generator=generator) * param.std() * args.noise)
    return student.eval().to(device), teacher.to(device)


def timed(fn, device, repeats: int):
    """The result of ``fn()`` and its fastest wall time over ``repeats`` runs (same seeds: same result each time)."""
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return result, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=12, help="teacher layers")
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--draft-lens", type=str, default="1,4,8")
    parser.add_argument("--noise", type=float, default=0.03)
    parser.add_argument("--damp", type=float, default=0.05)
    parser.add_argument("--logit-scale", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared CPU)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per row; the fastest is reported")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    student, teacher = build_models(args, device)
    g = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(4, args.vocab, (args.batch, args.prompt_len), generator=g).to(device)
    attention_mask = torch.ones_like(input_ids)
    seeds = row_seeds(g, args.batch)
    common = dict(max_new_tokens=args.new_tokens, temperature=1.0, pad_token_id=0, seeds=seeds)

    rows = []
    # references: one model sampling alone (one forward per token)
    for name, model in (("student alone", student), ("teacher alone", teacher)):
        student_generate(
            model, input_ids[:2], attention_mask[:2], **{**common, "max_new_tokens": 4, "seeds": seeds[:2]}
        )
        _, seconds = timed(
            lambda m=model: student_generate(m, input_ids, attention_mask, **common), device, args.repeats
        )
        rows.append({"method": name, "draft_len": None, "seconds_per_sequence": seconds / args.batch})
    for k in [int(x) for x in args.draft_lens.split(",")]:
        run = dict(gate="spec", draft_len=k, **common)
        speculative_generate(student, teacher, input_ids[:2], attention_mask[:2], **{**run, "max_new_tokens": 4,
                                                                                    "seeds": seeds[:2]})  # fmt: skip
        (sequences, stats), seconds = timed(
            lambda run=run: speculative_generate(student, teacher, input_ids, attention_mask, **run),
            device,
            args.repeats,
        )
        assert sequences.shape == (args.batch, args.prompt_len + args.new_tokens)
        a = stats.acceptance_rate
        rows.append(
            {
                "method": "speculative (spec)",
                "draft_len": k,
                "acceptance_rate": a,
                "teacher_forwards_per_token": stats.teacher_forwards_per_token,
                "theory_forwards_per_token": (1 - a) / (1 - a**k) if a < 1 else 1 / k,
                "teacher_calls": stats.teacher_calls,
                "mean_accepted_run": stats.mean_accepted_run,
                "seconds_per_sequence": seconds / args.batch,
            }
        )
    spec_rows = [r for r in rows if r["draft_len"] is not None]
    base = next((r for r in spec_rows if r["draft_len"] == 1), spec_rows[0])
    for r in spec_rows:
        r["forwards_vs_draft1"] = r["teacher_forwards_per_token"] / base["teacher_forwards_per_token"]
        r["time_vs_draft1"] = r["seconds_per_sequence"] / base["seconds_per_sequence"]

    n_student = sum(p.numel() for p in student.parameters()) / 1e6
    n_teacher = sum(p.numel() for p in teacher.parameters()) / 1e6
    print(
        f"device {device}, teacher {args.layers} layers ({n_teacher:.1f}M), student {args.student_layers} layers "
        f"({n_student:.1f}M), hidden {args.hidden}, vocab {args.vocab}, batch {args.batch}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, gate spec, temperature 1"
    )
    header = (
        f"{'method':<20}{'draft':>6}{'accept':>8}{'fwd/token':>11}{'theory':>8}{'vs k=1':>8}{'s/seq':>9}{'vs k=1':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["draft_len"] is None:
            print(
                f"{r['method']:<20}{'-':>6}{'-':>8}{1.0:>11.3f}{'-':>8}{'-':>8}{r['seconds_per_sequence']:>9.4f}{'-':>8}"
            )
        else:
            print(
                f"{r['method']:<20}{r['draft_len']:>6}{r['acceptance_rate']:>8.3f}{r['teacher_forwards_per_token']:>11.3f}"
                f"{r['theory_forwards_per_token']:>8.3f}{r['forwards_vs_draft1']:>8.3f}{r['seconds_per_sequence']:>9.4f}"
                f"{r['time_vs_draft1']:>8.3f}"
            )
    plot(rows, Path(__file__).with_suffix(".png"))
    print(json.dumps({"config": vars(args), "device": str(device), "rows": rows}))


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = [r for r in rows if r["draft_len"] is not None]
    ks = [r["draft_len"] for r in spec]
    fig, (ax_fwd, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    ax_fwd.plot(ks, [r["teacher_forwards_per_token"] for r in spec], marker="o", label="measured")
    ax_fwd.plot(ks, [r["theory_forwards_per_token"] for r in spec], ls="--", marker="x", label="(1-a)/(1-a^k)")
    ax_fwd.set(xlabel="gate_draft_len k", ylabel="teacher forwards per generated token", ylim=(0, 1.05),
               title="acceptance a = " + ", ".join(f"{r['acceptance_rate']:.2f}" for r in spec))  # fmt: skip
    ax_fwd.legend()
    labels = [r["method"] if r["draft_len"] is None else f"k={r['draft_len']}" for r in rows]
    ax_time.bar(labels, [1000 * r["seconds_per_sequence"] for r in rows], color="#4a7")
    ax_time.set(ylabel="ms per generated sequence", title="wall time")
    ax_time.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
