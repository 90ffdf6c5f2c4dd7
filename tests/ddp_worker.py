"""One process of the multi-process test (`test_distributed.py`): a few steps of `SpecKDTrainer` with lmbda=0.5, with
each loss path, recording per step the batch kind this process drew and the logged metrics, written to
`<out>/<loss_path>.rank<i>.json`; then a few steps of `SpecKDDistillationTrainer` (`<out>/distillation.rank<i>.json`).

Run under `python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT BATCH` (`torchrun`; gloo on CPU),
or in-process via `run`.
"""

import json
import os
import sys

from accelerate import PartialState

from speckd_trl import SpecKDConfig, SpecKDDistillationConfig, SpecKDDistillationTrainer, SpecKDTrainer
from speckd_trl.cli import exit_distributed_job
from speckd_trl.tools.testing import (
    DISTRIBUTED_ARGS,
    DISTRIBUTED_GATE,
    make_dataset,
    make_model,
    make_prompt_dataset,
    make_tokenizer,
)


LOSS_PATHS = ("eager", "chunked")


def run(out_dir: str, per_device_batch: int, loss_path: str) -> dict:
    tokenizer = make_tokenizer()
    args = SpecKDConfig(
        output_dir=out_dir,
        per_device_train_batch_size=per_device_batch,
        max_new_tokens=6,
        lmbda=0.5,
        loss_path=loss_path,
        temperature=1e-4,  # near-greedy sampling: the same completions however the batch is split
        **DISTRIBUTED_ARGS,
        **DISTRIBUTED_GATE,
    )
    trainer = SpecKDTrainer(
        model=make_model(0, tokenizer),
        teacher_model=make_model(1, tokenizer),
        args=args,
        train_dataset=make_dataset(16),
        processing_class=tokenizer,
    )
    kinds = []
    draw = trainer._batch_kinds.draw

    def recording_draw():
        kinds.append(draw())
        return kinds[-1]

    trainer._batch_kinds.draw = recording_draw
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    record = {"rank": trainer.accelerator.process_index, "world": trainer.accelerator.num_processes}
    record.update(kinds=kinds, logs=logs)
    with open(os.path.join(out_dir, f"{loss_path}.rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)
    return record


def run_distillation(out_dir: str, per_device_batch: int) -> dict:
    """`SpecKDDistillationTrainer` (greedy completions, `top_k=1`), gated with `topk`: the logged metrics."""
    tokenizer = make_tokenizer()
    args = SpecKDDistillationConfig(
        output_dir=out_dir,
        per_device_train_batch_size=per_device_batch,
        max_completion_length=6,
        top_k=1,
        **DISTRIBUTED_ARGS,
        **DISTRIBUTED_GATE,
    )
    trainer = SpecKDDistillationTrainer(
        model=make_model(0, tokenizer),
        teacher_model=make_model(1, tokenizer),
        args=args,
        train_dataset=make_prompt_dataset(16),
        processing_class=tokenizer,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    record = {"rank": trainer.accelerator.process_index, "world": trainer.accelerator.num_processes, "logs": logs}
    with open(os.path.join(out_dir, f"distillation.rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)
    return record


if __name__ == "__main__":
    for loss_path in LOSS_PATHS:
        run(sys.argv[1], int(sys.argv[2]), loss_path)
    run_distillation(sys.argv[1], int(sys.argv[2]))
    PartialState().destroy_process_group()
    exit_distributed_job(0)  # as the CLI: a gloo job's teardown can abort a process that finished its work
