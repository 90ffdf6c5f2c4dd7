"""One process of the FSDP2 test (`test_fsdp.py`): a few steps of `SpecKDTrainer` (eager and chunked loss) and of
`SpecKDDistillationTrainer`, each gated with `topk`, recording per run the logged losses, how the student and the
teacher were prepared, and (process 0) the student's final full weights; then, without training, how TRL's own
`GKDTrainer` prepares its teacher, and the error for speculative generation.

Run under `accelerate launch --config_file examples/accelerate/fsdp2.yaml tests/fsdp_worker.py OUT TEACHER_DIR [--gpu]`
(`TEACHER_DIR`: `make_model(1)` saved with its tokenizer; the eager run loads its teacher from there, by path; with
`--gpu` the processes train on their GPUs through the plain launcher, and TRL's `GKDTrainer` also takes a step), or
in-process (one process, no FSDP) through `run`.

accelerate 1.15 never makes a CPU job an FSDP job: `AcceleratorState` turns `ACCELERATE_USE_FSDP` into
`DistributedType.FSDP` only for GPU-like types (MULTI_GPU, MULTI_NPU, ...), and a CPU job is MULTI_CPU, so with
`use_cpu=True` the launcher's FSDP settings are dropped without a word and the processes train as plain DDP (measured:
`distributed_type` MULTI_CPU, the student a `DistributedDataParallel`); without `use_cpu` on a machine with no GPU they
do not form a job at all. `cpu_fsdp_state` forms the gloo group as a CPU job and then lets the launcher's FSDP plugin
apply (`use_configured_state`); from there on every step is accelerate's own FSDP2 path (`fsdp2_prepare_model`,
`fully_shard`, DTensor parameters, reduce-scatter of the gradients over gloo).
"""

import json
import os
import sys

import torch
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


CASES = ("eager", "chunked", "distillation")
STEPS = DISTRIBUTED_ARGS["max_steps"]


def cpu_fsdp_state() -> None:
    """Form this process's gloo group as accelerate's CPU job, then mark it GPU-like so that `AcceleratorState` applies
    the FSDP plugin the launcher put in the environment (see the module docstring). Trainers built afterwards must pass
    `accelerator_config={"use_configured_state": True}`."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)
    assert state.distributed_type == DistributedType.MULTI_CPU and state.backend == "gloo", state
    state.distributed_type = DistributedType.MULTI_GPU


def settings(use_cpu: bool, configured_state: bool) -> dict:
    """`DISTRIBUTED_ARGS` with the device, and the pre-configured accelerate state of `cpu_fsdp_state` when it was
    set up."""
    extra = {"accelerator_config": {"use_configured_state": True}} if configured_state else {}
    return {**DISTRIBUTED_ARGS, "use_cpu": use_cpu, **extra}


def build(
    out_dir: str,
    case: str,
    per_device_batch: int,
    configured_state: bool,
    teacher_dir: str | None = None,
    use_cpu: bool = True,
):
    """The trainer of `case`; the eager `SpecKDTrainer` loads its teacher from `teacher_dir` (by path) when given."""
    tokenizer = make_tokenizer()
    common = dict(
        output_dir=out_dir,
        per_device_train_batch_size=per_device_batch,
        **settings(use_cpu, configured_state),
        **DISTRIBUTED_GATE,
    )
    if case == "distillation":
        args = SpecKDDistillationConfig(max_completion_length=6, top_k=1, **common)  # top_k=1: greedy completions
        return SpecKDDistillationTrainer(
            model=make_model(0, tokenizer),
            teacher_model=make_model(1, tokenizer),
            args=args,
            train_dataset=make_prompt_dataset(16),
            processing_class=tokenizer,
        )
    # lmbda=0.5: on-policy and dataset batches both occur (generation under FSDP2 included); temperature=1e-4:
    # near-greedy sampling, the same completions however the batch is split over processes
    args = SpecKDConfig(max_new_tokens=6, lmbda=0.5, temperature=1e-4, loss_path=case, **common)
    return SpecKDTrainer(
        model=make_model(0, tokenizer),
        teacher_model=teacher_dir if case == "eager" and teacher_dir else make_model(1, tokenizer),
        args=args,
        train_dataset=make_dataset(16),
        processing_class=tokenizer,
    )


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The student's parameters, gathered whole (`full_tensor`) where FSDP2 sharded them; collective under FSDP2."""
    out = {}
    for name, param in model.named_parameters():
        data = param.detach()
        if isinstance(data, torch.distributed.tensor.DTensor):
            data = data.full_tensor()
        out[name] = data.clone()
    return out


def describe(module: torch.nn.Module) -> dict:
    from torch.distributed.fsdp import FSDPModule

    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    return {
        "class": type(module).__name__,
        "fsdp2": isinstance(module, FSDPModule),
        "dtensor_params": sum(isinstance(p, torch.distributed.tensor.DTensor) for p in module.parameters()),
        "params": sum(1 for _ in module.parameters()),
        "head_weight": None if head is None else type(head.weight).__name__,
        "device": str(next(module.parameters()).device),
    }


def run(
    out_dir: str,
    case: str,
    per_device_batch: int,
    configured_state: bool = False,
    teacher_dir: str | None = None,
    use_cpu: bool = True,
) -> dict:
    trainer = build(os.path.join(out_dir, case), case, per_device_batch, configured_state, teacher_dir, use_cpu)
    accelerator = trainer.accelerator
    record = {
        "case": case,
        "rank": accelerator.process_index,
        "world": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "fsdp_version": getattr(getattr(accelerator.state, "fsdp_plugin", None), "fsdp_version", None),
        "device": str(accelerator.device),
        "teacher": describe(trainer.teacher_model),
    }
    trainer.train()
    record["student"] = describe(trainer.model)
    record["logs"] = [entry for entry in trainer.state.log_history if "loss" in entry]
    weights = full_weights(trainer.model)
    if record["rank"] == 0:
        torch.save(weights, os.path.join(out_dir, f"{case}.weights.pt"))
    with open(os.path.join(out_dir, f"{case}.rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)
    return record


def untrained_checks(
    out_dir: str, use_cpu: bool = True, configured_state: bool = True, gkd_step: bool = False
) -> dict:
    """How TRL's `GKDTrainer` prepares its teacher here (with `gkd_step`, whether it survives a training step: TRL
    issue #2580 on GPUs), and `SpecKDTrainer`'s errors for speculative generation and a sharded trainable head."""
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = make_tokenizer()
    configured = settings(use_cpu, configured_state)
    gkd = GKDTrainer(
        model=make_model(0, tokenizer),
        teacher_model=make_model(1, tokenizer),  # on the CPU, as a model object or a teacher loaded by name is
        args=GKDConfig(
            output_dir=os.path.join(out_dir, "gkd"), **{**configured, "max_steps": 1}, max_new_tokens=6, lmbda=0.0
        ),
        train_dataset=make_dataset(16),
        processing_class=tokenizer,
    )
    record = {"rank": gkd.accelerator.process_index, "gkd_teacher": describe(gkd.teacher_model)}
    try:
        SpecKDTrainer(
            model=make_model(0, tokenizer),
            teacher_model=make_model(1, tokenizer),
            args=SpecKDConfig(
                output_dir=os.path.join(out_dir, "speculative"),
                on_policy_generation="speculative",
                **configured,
            ),
            train_dataset=make_dataset(16),
            processing_class=tokenizer,
        )
        record["speculative_error"] = None
    except ValueError as err:
        record["speculative_error"] = str(err)
    # the chunked loss's reader of output layers, on a student whose `lm_head` is still sharded (before any forward)
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    from speckd_trl.models import output_head

    student = fsdp2_prepare_model(gkd.accelerator, make_model(0, tokenizer))
    try:
        output_head(student, "student")
        record["sharded_head_error"] = None
    except RuntimeError as err:
        record["sharded_head_error"] = str(err)
    with torch.no_grad():  # no gradient: gathered whole
        record["sharded_head_no_grad"] = list(output_head(student, "student").weight.shape)
    if gkd_step:  # last: a failed step may leave the FSDP state behind
        try:
            gkd.train()
            record["gkd_step_error"] = None
        except RuntimeError as err:
            record["gkd_step_error"] = str(err)[:500]
    with open(os.path.join(out_dir, f"untrained.rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)
    return record


if __name__ == "__main__":
    out, teacher_dir, gpu = sys.argv[1], sys.argv[2], "--gpu" in sys.argv[3:]
    if not gpu:
        cpu_fsdp_state()
    for case in CASES:
        run(out, case, per_device_batch=2, configured_state=not gpu, teacher_dir=teacher_dir, use_cpu=not gpu)
    untrained_checks(out, use_cpu=not gpu, configured_state=not gpu, gkd_step=gpu)
    PartialState().destroy_process_group()
    exit_distributed_job(0)  # as the CLI: a gloo job's teardown can abort a process that finished its work
