"""GPU paths: bf16 student, NF4 teacher on CUDA, CUDA generators. Skipped where no CUDA device is present (CI)."""

import math

import pytest
import torch
from peft import LoraConfig

from speckd_trl import SpecKDConfig, SpecKDTrainer, accept_mask
from speckd_trl.testing import make_dataset, make_model, make_tokenizer


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
