"""One process of the DeepSpeed ZeRO-3 test (`test_zero3.py`): a few steps of `SpecKDTrainer` (eager and chunked loss,
LoRA and full fine-tuning) and of `SpecKDDistillationTrainer`, each gated with `topk`, recording per run the logged
losses, how the teacher was prepared, and (process 0) the student's final trainable weights, gathered whole; then the
errors for the chunked loss on a trainable output layer and for a 4-bit teacher. Under ZeRO-2: an NF4 teacher.

Run under `accelerate launch --config_file <zero3.yaml with use_cpu: true> tests/zero3_worker.py OUT STUDENT TEACHER 3`
(DeepSpeed's CPU accelerator, gloo; with `zero2.yaml` and `2`: `ZERO2_CASES`), or in-process (one process,
no DeepSpeed) through `run`. Both models are loaded
by path, so that ZeRO-3 partitions them as they load (`zero3_init_flag`) with the same weights as one process.
"""

import contextlib
import json
import os
import sys

import torch
from accelerate import PartialState
from peft import LoraConfig

from speckd_trl import SpecKDConfig, SpecKDDistillationConfig, SpecKDDistillationTrainer, SpecKDTrainer
from speckd_trl.cli import exit_distributed_job
from speckd_trl.tools.testing import (
    DISTRIBUTED_ARGS,
    DISTRIBUTED_GATE,
    make_dataset,
    make_prompt_dataset,
    make_tokenizer,
)


# (trainer, loss_path, student): `lmbda=0`, dataset batches only: on-policy sampling draws from each process's own
# random stream (HF's `generate`), so a sampled completion depends on how the batch is split; `on_policy` checks that
# generation under ZeRO-3 trains, not that it matches
# (the distillation trainer has one loss path, TRL's chunked one)
CASES = (
    "speckd-eager-lora",
    "speckd-chunked-lora",
    "speckd-eager-full",
    "distillation-chunked-lora",
    "distillation-chunked-full",
)
ON_POLICY_CASE = "speckd-chunked-lora-on_policy"
NF4_CASE = "speckd-chunked-lora-nf4"  # under ZeRO-2: the 4-bit teacher stays whole on each process
ZERO2_CASES = (NF4_CASE, "speckd-eager-lora", "distillation-chunked-lora")
STEPS = DISTRIBUTED_ARGS["max_steps"]


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def build(out_dir: str, case: str, per_device_batch: int, student: str, teacher: str):
    trainer_kind, loss_path, student_kind = case.split("-")[:3]
    tokenizer = make_tokenizer()
    common = dict(
        output_dir=out_dir, per_device_train_batch_size=per_device_batch, **DISTRIBUTED_ARGS, **DISTRIBUTED_GATE
    )
    peft_config = lora() if student_kind == "lora" else None
    if trainer_kind == "distillation":
        args = SpecKDDistillationConfig(max_completion_length=6, top_k=1, **common)  # top_k=1: greedy completions
        return SpecKDDistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=make_prompt_dataset(16),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    lmbda = 1.0 if case == ON_POLICY_CASE else 0.0
    nf4 = case == NF4_CASE
    args = SpecKDConfig(max_new_tokens=6, lmbda=lmbda, loss_path=loss_path, teacher_load_in_4bit=nf4, **common)
    return SpecKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=make_dataset(16),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters, gathered whole where ZeRO-3 partitioned them (collective under ZeRO-3)."""
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    gather = contextlib.nullcontext()
    if hasattr(named[0][1], "ds_id"):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([param for _, param in named])
    with gather:
        return {name.removeprefix("base_model.model."): param.detach().clone() for name, param in named}


def describe_teacher(teacher: torch.nn.Module) -> dict:
    module = getattr(teacher, "module", teacher)  # a DeepSpeed engine wraps it
    head = module.get_output_embeddings().weight
    return {
        "class": type(teacher).__name__,
        "partitioned": hasattr(head, "ds_id") and head.numel() == 0,
        "head_shape": list(getattr(head, "ds_shape", head.shape)),
    }


def run(out_dir: str, case: str, per_device_batch: int, student: str, teacher: str) -> dict:
    trainer = build(os.path.join(out_dir, case), case, per_device_batch, student, teacher)
    accelerator = trainer.accelerator
    record = {
        "case": case,
        "rank": accelerator.process_index,
        "world": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "zero_stage": getattr(getattr(accelerator.state, "deepspeed_plugin", None), "zero_stage", None),
        "teacher": describe_teacher(trainer.teacher_model),
    }
    initial = trainable_weights(trainer.model)
    trainer.train()
    record["logs"] = [entry for entry in trainer.state.log_history if "loss" in entry]
    weights = trainable_weights(trainer.model)
    record["weight_change"] = max((weights[n] - initial[n]).abs().max().item() for n in weights)
    if record["rank"] == 0:
        torch.save(weights, os.path.join(out_dir, f"{case}.weights.pt"))
    with open(os.path.join(out_dir, f"{case}.rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)
    return record


def init_error(out_dir: str, case: str, student: str, teacher: str) -> str | None:
    """The error that building the trainer of `case` raises, or None."""
    try:
        build(os.path.join(out_dir, case), case, 2, student, teacher)
    except ValueError as err:
        return str(err)
    return None


if __name__ == "__main__":
    out, student, teacher, stage = sys.argv[1:5]
    if stage == "3":
        for case in (*CASES, ON_POLICY_CASE):
            run(out, case, per_device_batch=2, student=student, teacher=teacher)
        errors = {case: init_error(out, case, student, teacher) for case in ("speckd-chunked-full", NF4_CASE)}
        with open(os.path.join(out, f"errors.rank{os.environ['RANK']}.json"), "w") as f:
            json.dump(errors, f)
    else:
        for case in ZERO2_CASES:
            run(out, case, per_device_batch=2, student=student, teacher=teacher)
    PartialState().destroy_process_group()
    exit_distributed_job(0)  # as the CLI: a gloo job's teardown can abort a process that finished its work
