"""GPU paths: bf16 student, NF4 teacher on CUDA, CUDA generators, FSDP2 through `accelerate launch`. Skipped where no
CUDA device is present (CI)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from speckd_trl import SpecKDConfig, SpecKDTrainer, accept_mask
from speckd_trl.tools.testing import accelerate_launch, make_dataset, make_model, make_tokenizer


REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "examples" / "accelerate" / "fsdp2.yaml"
_spec = importlib.util.spec_from_file_location("fsdp_worker", REPO / "tests" / "fsdp_worker.py")
fsdp_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fsdp_worker)


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_spec_gate_with_a_cuda_generator_is_reproducible():
    g = torch.Generator(device="cuda").manual_seed(0)
    student, teacher = torch.randn(2, 2, 5, 50, device="cuda", generator=g)
    proposals = torch.randint(0, 50, (2, 5), device="cuda", generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool, device="cuda")
    runs = [
        accept_mask(student, teacher, proposals, mask, gate="spec", generator=torch.Generator("cuda").manual_seed(3))
        for _ in range(2)
    ]
    assert runs[0].device.type == "cuda" and torch.equal(runs[0], runs[1])


def test_bf16_lora_student_with_nf4_teacher_on_cuda(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    tokenizer = make_tokenizer()
    make_model(1, tokenizer).save_pretrained(tmp_path / "teacher")
    args = SpecKDConfig(
        output_dir=str(tmp_path / "out"),
        bf16=True,
        report_to="none",
        per_device_train_batch_size=4,
        max_new_tokens=8,
        max_steps=6,
        logging_steps=3,
        learning_rate=5e-3,
        save_strategy="no",
        lmbda=0.5,
        gate="spec",
        teacher_load_in_4bit=True,
    )
    trainer = SpecKDTrainer(
        model=make_model(0, tokenizer).to(torch.bfloat16),  # model_init_kwargs apply only to a model given by name
        teacher_model=str(tmp_path / "teacher"),
        args=args,
        train_dataset=make_dataset(32),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    layers = [m for m in trainer.teacher_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" and m.weight.quant_type == "nf4" for m in layers)
    assert layers[0].compute_dtype == torch.bfloat16
    assert trainer.model.get_input_embeddings().weight.dtype == torch.bfloat16
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all(math.isfinite(entry["loss"]) and "gate/acceptance_rate" in entry for entry in logs)
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed


def test_fsdp2_on_gpus_trains_shards_the_teacher_and_matches_one_process(tmp_path):
    """`tests/test_fsdp.py` on GPUs, through the plain `accelerate launch --config_file examples/accelerate/fsdp2.yaml`
    (NCCL): 2 processes where 2 GPUs are visible, else 1 (one-process FSDP2 still shards into DTensors and still
    leaves TRL's GKD teacher on the CPU while the student is on the GPU, TRL issue #2580). `SpecKDTrainer` eager (its
    teacher loaded by path) and chunked and `SpecKDDistillationTrainer`, each gated with `topk`, against one process
    without FSDP on the same global batch."""
    n = 2 if torch.cuda.device_count() >= 2 else 1
    tokenizer = make_tokenizer()
    teacher_dir, out = tmp_path / "teacher", tmp_path / "fsdp"
    make_model(1, tokenizer).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    out.mkdir()
    args = ["--num_processes", str(n), REPO / "tests" / "fsdp_worker.py", out, teacher_dir, "--gpu"]
    result = accelerate_launch(FSDP_CONFIG, args, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]

    initial = {name: p.detach() for name, p in make_model(0, tokenizer).named_parameters()}
    for case in fsdp_worker.CASES:
        ranks = [json.loads((out / f"{case}.rank{i}.json").read_text()) for i in range(n)]
        for record in ranks:
            assert record["world"] == n and record["distributed_type"] == "DistributedType.FSDP"
            assert record["fsdp_version"] == 2
            student, teacher = record["student"], record["teacher"]
            assert student["fsdp2"] and student["dtensor_params"] == student["params"], (case, student)
            # #2580: the teacher sharded and on the student's GPU
            assert teacher["fsdp2"] and teacher["dtensor_params"] == teacher["params"], (case, teacher)
            assert teacher["device"] == student["device"] and student["device"].startswith("cuda"), (case, record)
        reference = fsdp_worker.run(
            str(tmp_path / "single"), case, per_device_batch=2 * n, teacher_dir=str(teacher_dir), use_cpu=False
        )
        assert len(ranks[0]["logs"]) == len(reference["logs"]) == fsdp_worker.STEPS
        for got, expected in zip(ranks[0]["logs"], reference["logs"]):
            assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4), case
        got = torch.load(out / f"{case}.weights.pt", map_location="cpu")
        expected = torch.load(tmp_path / "single" / f"{case}.weights.pt", map_location="cpu")
        assert max((got[key] - expected[key]).abs().max().item() for key in expected) <= 1e-4, case
        assert max((expected[key] - initial[key]).abs().max().item() for key in expected) >= 1e-3, case

    for i in range(n):
        record = json.loads((out / f"untrained.rank{i}.json").read_text())
        # TRL 1.16's own GKD under FSDP: its teacher stays unwrapped on the CPU, and its first step fails (#2580)
        assert not record["gkd_teacher"]["fsdp2"] and record["gkd_teacher"]["device"] == "cpu"
        assert record["gkd_step_error"] and "device" in record["gkd_step_error"], record["gkd_step_error"]
        assert "still sharded by FSDP2" in record["sharded_head_error"]
        if n > 1:
            assert "not supported under FSDP with several processes" in record["speculative_error"]


def test_a_teacher_cache_made_on_cuda_trains_a_bf16_student_without_a_teacher(tmp_path):
    """The cache built by the NF4 teacher on the GPU; training from it (bf16 LoRA student) loads no teacher and
    matches the live loss on the same batch (the top-K + tail approximation at K = the vocabulary: none)."""
    from speckd_trl.batches import KIND_KEY, OFF_POLICY
    from speckd_trl.tools.testing import VOCAB_SIZE

    tokenizer = make_tokenizer()
    make_model(1, tokenizer).save_pretrained(tmp_path / "teacher")
    common = dict(output_dir=str(tmp_path / "out"), bf16=True, report_to="none", lmbda=0.0, max_steps=2,
                  per_device_train_batch_size=4, gate="topk", gate_top_k=5)  # fmt: skip
    peft = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    live = SpecKDTrainer(model=make_model(0, tokenizer), teacher_model=str(tmp_path / "teacher"),
                         args=SpecKDConfig(**common, teacher_load_in_4bit=True), train_dataset=make_dataset(),
                         processing_class=tokenizer, peft_config=peft)  # fmt: skip
    live.cache_teacher(str(tmp_path / "cache"), top_k=VOCAB_SIZE, values_dtype="float32")
    cached = SpecKDTrainer(model=make_model(0, tokenizer), args=SpecKDConfig(**common, teacher_cache=str(tmp_path / "cache")),
                           train_dataset=make_dataset(), processing_class=tokenizer, peft_config=peft)  # fmt: skip
    assert cached.teacher_model is None
    batch = {**live.data_collator([live.train_dataset[i] for i in range(4)]), KIND_KEY: OFF_POLICY}
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    losses = []
    for trainer in (live, cached):
        trainer.model.train()
        losses.append(trainer.compute_loss(trainer.model, dict(batch)).item())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)  # bf16 student; the NF4 teacher's values cached
    cached.train()
    assert cached.state.global_step == 2


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM for the teacher server")
def test_the_server_trainer_against_a_real_vllm_teacher_server(tmp_path):
    """`trl vllm-serve` hosts the tiny teacher; the gated server trainer's loss on a batch equals the one computed
    with `LocalTeacherClient` on the same teacher (vLLM's prompt log-probabilities against a local forward)."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from speckd_trl import SpecKDServerDistillationConfig, SpecKDServerDistillationTrainer
    from speckd_trl.tools.testing import LocalTeacherClient, free_port, make_prompt_dataset

    tokenizer = make_tokenizer()
    teacher = make_model(1, tokenizer)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trl.scripts.vllm_serve",
            "--model",
            str(tmp_path / "teacher"),
            "--port",
            str(port),
            "--gpu_memory_utilization",
            "0.2",
            "--max_model_len",
            "256",
        ],  # fmt: skip
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"},
    )
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health/", timeout=1)
                break
            except OSError:
                time.sleep(1)
        args = SpecKDServerDistillationConfig(output_dir=str(tmp_path / "out"), report_to="none", max_steps=2,
                                              teacher_model_server_url=f"http://127.0.0.1:{port}", loss_top_k=8,
                                              per_device_train_batch_size=4, max_completion_length=6)  # fmt: skip
        trainer = SpecKDServerDistillationTrainer(model=make_model(0, tokenizer), args=args,
                                                  train_dataset=make_prompt_dataset(), processing_class=tokenizer)  # fmt: skip
        trainer.current_gradient_accumulation_steps = 1
        g = torch.Generator().manual_seed(0)
        batch = {
            "prompt_ids": torch.randint(4, 96, (4, 5), generator=g).cuda(),
            "prompt_mask": torch.ones(4, 5, dtype=torch.long).cuda(),
            "completion_ids": torch.randint(4, 96, (4, 6), generator=g).cuda(),
            "completion_mask": torch.ones(4, 6, dtype=torch.long).cuda(),
        }
        trainer.model.train()
        served = trainer.compute_loss(trainer.model, dict(batch)).item()
        trainer.teacher_client = LocalTeacherClient(teacher.cuda().eval())
        local = trainer.compute_loss(trainer.model, dict(batch)).item()
        assert served == pytest.approx(local, rel=1e-2)
        trainer.train()
        assert trainer.state.global_step == 2
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_check_teacher_on_cuda_and_the_planner(tmp_path, quantization):
    """`check-teacher`'s comparison with the teacher quantized on CUDA (bitsandbytes' CUDA kernels, bf16 compute),
    and the planner's teacher weights against what the CUDA model holds."""
    from speckd_trl.plan import PlanConfig, estimate_memory
    from speckd_trl.teacher_check import check_teacher, weights_bytes

    tokenizer = make_tokenizer()
    make_model(1, tokenizer, layers=3).save_pretrained(tmp_path / "teacher")
    args = SpecKDConfig(output_dir=str(tmp_path), report_to="none", bf16=True, teacher_quantization=quantization)
    report = check_teacher(str(tmp_path / "teacher"), args, make_dataset(8), tokenizer, samples=8, batch_size=4)
    assert report["price"].kl_per_token > 0 and report["configured"].peak_mib > 0
    from speckd_trl.models import load_teacher

    loaded = load_teacher(str(tmp_path / "teacher"), args)
    assert next(loaded.parameters()).device.type == "cuda"
    plan = estimate_memory(PlanConfig(teacher=str(tmp_path / "teacher"), student=str(tmp_path / "teacher"),
                                      teacher_quant=quantization, dtype="float32"))  # fmt: skip
    assert plan.terms["teacher weights"] == pytest.approx(weights_bytes(loaded), rel=0.02)
