"""The teacher's verdict as a GRPO reward, on tiny models, offline, on CPU in about a minute.

    python examples/grpo_teacher_reward.py

A 2-layer teacher is first tuned on chat sums (so its verdict means something), then a fresh policy is trained with
TRL's `GRPOTrainer` for a few steps on two rewards side by side: a correctness reward (the completion is the right
answer) and `TeacherAcceptanceReward`, the share of each sampled completion's tokens that are among the teacher's
top-k: a dense verifier that scores every completion, right or wrong. TRL logs each reward under its name
(`rewards/teacher_acceptance/mean`, `rewards/correct/mean`). On this toy, a few steps move little; the point is the API.
"""

import os
import tempfile


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from speckd_trl import TeacherAcceptanceReward  # noqa: E402
from speckd_trl.tools.testing import make_dataset, make_model, make_tokenizer  # noqa: E402


COMMON = dict(bf16=False, use_cpu=True, report_to="none", save_strategy="no", seed=0, disable_tqdm=True)


def correct(completions, solution, **kwargs):
    """1.0 when the completion is the expected answer (the dataset's `solution` column), else 0.0."""
    return [float(c[0]["content"].strip() == s) for c, s in zip(completions, solution)]


def main():
    tokenizer = make_tokenizer()
    workdir = tempfile.mkdtemp(prefix="speckd-grpo-")
    teacher = make_model(1, tokenizer, layers=2)
    sft = SFTConfig(output_dir=workdir, max_steps=60, learning_rate=3e-3, per_device_train_batch_size=16, **COMMON)
    SFTTrainer(model=teacher, args=sft, train_dataset=make_dataset(256), processing_class=tokenizer).train()

    rows = make_dataset(32, seed=1)
    prompts = Dataset.from_list([{"prompt": r["messages"][:1], "solution": r["messages"][1]["content"]} for r in rows])
    teacher_reward = TeacherAcceptanceReward(teacher, tokenizer, gate="topk", top_k=5)
    args = GRPOConfig(output_dir=workdir, num_generations=4, max_completion_length=4, per_device_train_batch_size=4,
                      max_steps=6, logging_steps=2, learning_rate=1e-3, **COMMON)  # fmt: skip
    trainer = GRPOTrainer(
        model=make_model(0, tokenizer, layers=1),
        reward_funcs=[correct, teacher_reward],
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
    )
    trainer.train()
    print(f"{'step':>4} {'teacher_acceptance':>18} {'correct':>8}")
    for entry in trainer.state.log_history:
        if "rewards/teacher_acceptance/mean" in entry:
            acceptance, right = entry["rewards/teacher_acceptance/mean"], entry["rewards/correct/mean"]
            print(f"{entry['step']:>4} {acceptance:>18.3f} {right:>8.3f}")


if __name__ == "__main__":
    main()
