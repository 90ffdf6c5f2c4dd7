"""A few real optimizer steps on tiny models: every batch kind, every gate, LoRA, a 4-bit teacher, resuming."""

import math

import pytest
import torch
from peft import LoraConfig

from speckd_trl import SpecKDTrainer
from speckd_trl.tools.testing import (
    drop_cache_under_gradient_checkpointing,
    make_model,
    make_tokenizer,
    make_trainer,
)


GATE_KEYS = ("gate/acceptance_rate", "reward/mean", "reward/std")


def build(tmp_path, **overrides) -> SpecKDTrainer:
    defaults = dict(per_device_train_batch_size=2, max_new_tokens=6, max_steps=4, logging_steps=2, learning_rate=5e-3)
    return make_trainer(tmp_path, **{**defaults, **overrides})


def run(tmp_path, **kwargs):
    """Train a few steps; return the trainer, the training log entries and the names of the changed parameters."""
    trainer = build(tmp_path, **kwargs)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return trainer, logs, changed


def check_logs(logs):
    assert logs, "no training log entries"
    for entry in logs:
        assert math.isfinite(entry["loss"])
        for key in GATE_KEYS:
            assert key in entry, f"{key} missing from {entry}"
            assert 0.0 <= entry[key] <= 1.0


@pytest.mark.parametrize("gate", ["topk", "spec", "none"])
@pytest.mark.parametrize("lmbda", [0.0, 0.5, 1.0])
def test_trains_for_each_lmbda_and_gate(tmp_path, lmbda, gate):
    _, logs, changed = run(tmp_path, lmbda=lmbda, gate=gate, gate_top_k=30)
    check_logs(logs)
    assert changed, "the student's weights did not change"
    seen = {key for entry in logs for key in entry}
    # a batch kind that never occurred is omitted, never logged as 0
    assert ("gate/acceptance_rate_on_policy" in seen) == (lmbda > 0)
    assert ("gate/acceptance_rate_off_policy" in seen) == (lmbda < 1)
    if gate == "none":
        assert all(entry["gate/acceptance_rate"] == 1.0 for entry in logs)


@pytest.mark.parametrize("gate", ["topk", "spec", "none"])
def test_trains_with_seq_kd(tmp_path, gate):
    _, logs, changed = run(tmp_path, lmbda=0.5, seq_kd=True, gate=gate, gate_proposal="sample")
    check_logs(logs)
    assert changed


@pytest.mark.parametrize("gate_on", ["on_policy", "off_policy"])
def test_gate_on_restricts_the_gated_kind(tmp_path, gate_on):
    _, logs, _ = run(tmp_path, lmbda=0.5, gate_on=gate_on, max_steps=6, logging_steps=6)
    (entry,) = logs
    other = "off_policy" if gate_on == "on_policy" else "on_policy"
    assert f"gate/acceptance_rate_{gate_on}" in entry
    assert f"gate/acceptance_rate_{other}" not in entry


def test_lora_student(tmp_path):
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, bias="none")
    trainer, logs, changed = run(tmp_path, lmbda=0.5, peft_config=peft_config)
    check_logs(logs)
    assert changed and all("lora_" in name for name in changed), changed
    assert any("lora_B" in name for name in changed)


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
def test_4bit_nf4_teacher_from_a_saved_directory(tmp_path, loss_path):
    bnb = pytest.importorskip("bitsandbytes")
    tokenizer = make_tokenizer()
    teacher_dir = tmp_path / "teacher"
    make_model(1, tokenizer).save_pretrained(teacher_dir)
    trainer, logs, changed = run(
        tmp_path / "out",
        teacher=str(teacher_dir),
        teacher_load_in_4bit=True,
        lmbda=0.5,
        gate="spec",
        loss_path=loss_path,
    )
    check_logs(logs)
    assert changed
    layers = [m for m in trainer.teacher_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_type == "nf4" for m in layers)


@pytest.mark.parametrize(
    "quantization, skip, layer_class",
    [("int8", None, "Linear8bitLt"), ("nf4", ["model.layers.0"], "Linear4bit"), ("fp4", None, "Linear4bit")],
)
def test_teacher_quantization_loads_and_trains(tmp_path, quantization, skip, layer_class):
    """`teacher_quantization` beyond `teacher_load_in_4bit`: int8, FP4, and NF4 with a decoder layer kept in float32
    (`teacher_quantization_skip_modules`); the output layer stays a plain linear layer for the chunked loss."""
    bnb = pytest.importorskip("bitsandbytes")
    tokenizer = make_tokenizer()
    teacher_dir = tmp_path / "teacher"
    make_model(1, tokenizer).save_pretrained(teacher_dir)
    trainer, logs, changed = run(tmp_path / "out", teacher=str(teacher_dir), teacher_quantization=quantization,
                                 teacher_quantization_skip_modules=skip, lmbda=0.5, max_steps=2)  # fmt: skip
    check_logs(logs)
    assert changed
    teacher = trainer.teacher_model
    for index, layer in enumerate(teacher.model.layers):
        kept = skip is not None and f"model.layers.{index}" in skip
        classes = {type(m).__name__ for m in layer.modules() if isinstance(m, torch.nn.Linear)}
        assert classes == ({"Linear"} if kept else {layer_class}), (index, classes)
    assert type(teacher.lm_head) is torch.nn.Linear
    if layer_class == "Linear4bit":
        quantized = [m for m in teacher.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert all(m.weight.quant_type == quantization for m in quantized)


def test_checkpoint_resumes(tmp_path):
    run(tmp_path, lmbda=0.5, save_strategy="steps", save_steps=2, max_steps=2)
    assert (tmp_path / "checkpoint-2").is_dir()
    trainer = build(tmp_path, lmbda=0.5, max_steps=4)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert trainer.state.global_step == 4
    steps = [entry["step"] for entry in trainer.state.log_history if "loss" in entry]
    assert steps == [2, 4]  # the restored history, then the two steps trained after resuming


@pytest.mark.parametrize("gate", ["topk", "spec"])
def test_speculative_on_policy_generation(tmp_path, gate):
    trainer, logs, changed = run(
        tmp_path, lmbda=1.0, gate=gate, gate_top_k=30, on_policy_generation="speculative", gate_draft_len=3
    )
    check_logs(logs)
    assert changed
    for entry in logs:
        assert 0 < entry["gen/teacher_forwards_per_token"] <= 1.0
        assert 0 <= entry["gen/mean_accepted_run"] <= 3
        assert 0 <= entry["gen/replaced_fraction"] <= 1.0


def test_student_generation_logs_no_gen_metrics(tmp_path):
    _, logs, _ = run(tmp_path, lmbda=1.0, max_steps=2)
    assert not any(key.startswith("gen/") for entry in logs for key in entry)


def test_speculative_generation_with_gradient_checkpointing(tmp_path):
    """Generation turns gradient checkpointing off, so the student keeps its KV cache even if (as older transformers
    did) the model drops it under checkpointing in training mode: the student here always does."""
    student = drop_cache_under_gradient_checkpointing(make_model(0, make_tokenizer()))
    _, logs, changed = run(
        tmp_path,
        student=student,
        lmbda=1.0,
        on_policy_generation="speculative",
        gradient_checkpointing=True,
        max_steps=2,
    )
    assert changed and "gen/teacher_forwards_per_token" in logs[-1]


def test_speculative_generation_with_a_lora_student(tmp_path):
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    _, logs, changed = run(
        tmp_path, lmbda=1.0, gate="spec", on_policy_generation="speculative", peft_config=peft_config, max_steps=2
    )
    check_logs(logs)
    assert changed and all("lora_" in name for name in changed)
    assert "gen/mean_accepted_run" in logs[-1]
