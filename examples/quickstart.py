"""Quickstart on tiny models, offline, on CPU in about a minute: GKD and SpecKD side by side.

    python examples/quickstart.py

A 2-layer teacher is first tuned on chat sums (so it has something to teach), then a fresh student is distilled from
it twice for the same number of steps: once with TRL's `GKDTrainer`, once with `SpecKDTrainer` (gate="topk"). The
only change in the code is the class names and the gate fields. The table shows the final distillation loss, the
gate's acceptance rate (the teacher's binary reward) and how often the student's argmax agrees with the teacher's on
held-out answers. On this toy, GKD agrees more; the point is the API, not the numbers.
"""

import json
import os
import tempfile


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from speckd_trl import SpecKDConfig, SpecKDTrainer  # noqa: E402
from speckd_trl.tools.testing import make_dataset, make_model, make_tokenizer  # noqa: E402


COMMON = dict(bf16=False, use_cpu=True, report_to="none", save_strategy="no", seed=0, disable_tqdm=True)


def tuned_teacher(tokenizer, train, workdir):
    teacher = make_model(1, tokenizer, layers=2)
    args = SFTConfig(output_dir=workdir, max_steps=150, learning_rate=3e-3, per_device_train_batch_size=16, **COMMON)
    SFTTrainer(model=teacher, args=args, train_dataset=train, processing_class=tokenizer).train()
    return teacher


@torch.no_grad()
def answer_accuracy(model, teacher, tokenizer, rows):
    """Share of completion tokens where the student's argmax equals the teacher's argmax."""
    hits = total = 0
    for row in rows:
        ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True, return_tensors="pt")
        n_prompt = len(
            tokenizer.apply_chat_template(row["messages"][:1], tokenize=True, add_generation_prompt=True)["input_ids"]
        )
        s = model(**ids).logits[0, n_prompt - 1 : -1].argmax(-1)
        t = teacher(**ids).logits[0, n_prompt - 1 : -1].argmax(-1)
        hits += (s == t).sum().item()
        total += s.numel()
    return hits / total


def main():
    tokenizer = make_tokenizer()
    train, held_out = make_dataset(256, seed=0), make_dataset(32, seed=1)
    workdir = tempfile.mkdtemp(prefix="speckd-quickstart-")
    teacher = tuned_teacher(tokenizer, train, workdir)
    shared = dict(output_dir=workdir, lmbda=0.5, beta=0.5, max_new_tokens=8, max_steps=60, learning_rate=3e-3,
                  per_device_train_batch_size=8, logging_steps=10, **COMMON)  # fmt: skip
    results = {}
    for name, trainer_cls, config in [
        ("GKD", GKDTrainer, GKDConfig(**shared)),
        ("SpecKD", SpecKDTrainer, SpecKDConfig(gate="topk", gate_top_k=5, **shared)),
    ]:
        student = make_model(0, tokenizer, layers=1)
        trainer = trainer_cls(model=student, teacher_model=teacher, args=config, train_dataset=train,
                              processing_class=tokenizer)  # fmt: skip
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        results[name] = {
            "final_loss": logs[-1]["loss"],
            "acceptance_rate": logs[-1].get("gate/acceptance_rate"),
            "agreement_with_teacher": answer_accuracy(student, teacher, tokenizer, held_out),
        }
    print(f"{'trainer':<8} {'final loss*':>11} {'acceptance':>11} {'agreement':>10}")
    for name, r in results.items():
        rate = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.3f}"
        print(f"{name:<8} {r['final_loss']:>11.4f} {rate:>11} {r['agreement_with_teacher']:>10.3f}")
    print(
        "* each trainer's own objective, not comparable: SpecKD weights rejected tokens by reject_weight (0.5 by "
        "default) and divides on-policy batches by their generated tokens (GKD by the dataset's)."
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
