"""`teacher_quantization` and `speckd-trl check-teacher`: the teacher as configured against its full-precision self."""

import pytest
import torch
from torch import nn
from transformers import BitsAndBytesConfig

from speckd_trl import SpecKDConfig
from speckd_trl.cli import main
from speckd_trl.models import teacher_init_kwargs, teacher_quantization_config
from speckd_trl.teacher_check import (
    VERDICTS,
    TeacherPrice,
    check_teacher,
    completion_batches,
    completion_logits,
    fake_quantize_,
    layer_sensitivity,
    teacher_price,
)
from speckd_trl.tools.testing import make_dataset, make_model, make_tokenizer


def config(**kwargs) -> SpecKDConfig:
    return SpecKDConfig(output_dir="unused", use_cpu=True, report_to="none", **kwargs)


@pytest.mark.parametrize(
    "kwargs, method",
    [
        ({}, "none"),
        ({"teacher_load_in_4bit": True}, "nf4"),
        ({"teacher_load_in_4bit": True, "teacher_bnb_4bit_quant_type": "fp4"}, "fp4"),
        ({"teacher_quantization": "int8"}, "int8"),
        ({"teacher_quantization": "nf4"}, "nf4"),
        ({"teacher_quantization": "none"}, "none"),
    ],
)
def test_teacher_quantization_resolves_once(kwargs, method):
    args = config(**kwargs)
    assert args.teacher_quantization_method == method
    quantization = teacher_quantization_config(args)
    if method == "none":
        assert quantization is None and "quantization_config" not in teacher_init_kwargs(args)
    elif method == "int8":
        assert quantization.load_in_8bit and not quantization.load_in_4bit
    else:
        assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == method


def test_skip_modules_keep_the_output_layer():
    """transformers keeps lm_head unquantized only while llm_int8_skip_modules is unset: we add it back."""
    args = config(teacher_quantization="nf4", teacher_quantization_skip_modules=["model.layers.0"])
    assert teacher_quantization_config(args).llm_int8_skip_modules == ["lm_head", "model.layers.0"]
    assert teacher_quantization_config(config(teacher_quantization="nf4")).llm_int8_skip_modules is None


def test_a_quantization_config_object_is_used_as_it_is():
    bnb = BitsAndBytesConfig(load_in_8bit=True)
    args = config(teacher_quantization=bnb)
    assert teacher_quantization_config(args) is bnb and args.teacher_quantization_method == "bitsandbytes"
    assert '"load_in_8bit": true' in args.to_json_string()  # saved and logged as JSON


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"teacher_quantization": "int4"}, "teacher_quantization='int4' is not valid"),
        ({"teacher_quantization": 4}, "neither one of auto, none, int8, nf4, fp4 nor a transformers"),
        ({"teacher_quantization": "int8", "teacher_load_in_4bit": True}, "the two disagree"),
        ({"teacher_quantization_skip_modules": ["model.layers.0"]}, "but the teacher is not quantized"),
        ({"teacher_quantization": "nf4", "teacher_quantization_skip_modules": "model.layers.0"}, "must be a list"),
    ],
)
def test_bad_teacher_quantization_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        config(**kwargs)


def test_a_quantization_config_in_init_kwargs_and_a_preset_conflict():
    args = config(
        teacher_quantization="nf4", teacher_model_init_kwargs={"quantization_config": {"load_in_8bit": True}}
    )
    with pytest.raises(ValueError, match="keep one of the two"):
        teacher_init_kwargs(args)


@pytest.fixture
def tiny():
    tokenizer = make_tokenizer()
    return tokenizer, make_model(1, tokenizer, layers=3), make_dataset(12)


def test_teacher_price_is_zero_for_the_same_model_and_matches_a_slow_reference(tiny):
    tokenizer, model, dataset = tiny
    batches = completion_batches(dataset, tokenizer, samples=10, batch_size=4, max_length=None)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    reference = completion_logits(model, batches)
    same = teacher_price(reference, model, batches)
    assert same.kl_per_token == pytest.approx(0.0, abs=1e-7) and same.top1_agreement == 1.0
    assert same.positions == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

    other = make_model(2, tokenizer, layers=3)
    price = teacher_price(reference, other, batches)
    kl, agree, n = 0.0, 0, 0  # by hand, position by position
    for batch in batches:
        with torch.no_grad():
            p = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            q = other(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for row in range(batch["input_ids"].shape[0]):
            for t in range(1, batch["input_ids"].shape[1]):
                if batch["labels"][row, t] != -100:
                    lp, lq = p[row, t - 1].log_softmax(-1), q[row, t - 1].log_softmax(-1)
                    kl += float((lp.exp() * (lp - lq)).sum())
                    agree += int(lp.argmax() == lq.argmax())
                    n += 1
    assert price.positions == n
    assert price.kl_per_token == pytest.approx(kl / n, rel=1e-5)
    assert price.top1_agreement == pytest.approx(agree / n)


def test_verdicts_cover_every_kl():
    assert TeacherPrice(0.0, 1.0, 1).verdict.startswith("negligible")
    assert TeacherPrice(0.04, 0.9, 1).verdict.startswith("noticeable")
    assert TeacherPrice(5.0, 0.1, 1).verdict.startswith("large")
    assert VERDICTS[-1][0] == float("inf")


def test_layer_sensitivity_ranks_every_layer_and_restores_the_weights(tiny):
    pytest.importorskip("bitsandbytes")
    tokenizer, model, dataset = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = completion_batches(dataset, tokenizer, samples=8, batch_size=4, max_length=None)
    scores = layer_sensitivity(model, batches, quant_type="nf4")
    assert sorted(name for name, _ in scores) == [f"model.layers.{i}" for i in range(3)]
    kls = [kl for _, kl in scores]
    assert kls == sorted(kls, reverse=True) and all(kl > 0 for kl in kls)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fake_quantize_is_what_bitsandbytes_stores():
    """The simulated rounding is the weight a bitsandbytes Linear4bit stores (dequantized), not the original."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    linear = nn.Linear(128, 64, bias=False)
    original = linear.weight.detach().clone()
    stored = bnb.nn.Params4bit(original.clone(), requires_grad=False, quant_type="nf4", blocksize=64)._quantize("cpu")
    fake_quantize_(linear, "nf4")
    dequantized = F.dequantize_4bit(stored.data, stored.quant_state)
    torch.testing.assert_close(linear.weight.detach(), dequantized, rtol=0, atol=1e-4)
    assert (linear.weight - original).abs().max() > 1e-3  # rounded, not left alone


@pytest.mark.parametrize("quantization, positive", [("nf4", True), ("int8", True), ("none", False)])
def test_check_teacher_reports_the_price(tmp_path, tiny, quantization, positive):
    pytest.importorskip("bitsandbytes")
    tokenizer, model, dataset = tiny
    model.save_pretrained(tmp_path / "teacher")
    args = config(teacher_quantization=quantization)
    report = check_teacher(str(tmp_path / "teacher"), args, dataset, tokenizer, samples=8, batch_size=4)
    price = report["price"]
    assert (price.kl_per_token > 0) == positive and report["samples"] == 8
    if not positive:
        assert price.kl_per_token == 0.0 and price.top1_agreement == 1.0
    assert report["full"].weights_mib > 0 and report["configured"].weights_mib > 0
    if quantization == "nf4":
        assert report["configured"].weights_mib < report["full"].weights_mib


def test_check_teacher_command(workspace, capsys):
    pytest.importorskip("bitsandbytes")
    status = main(
        [
            "check-teacher",
            "--model_name_or_path", str(workspace / "student"),
            "--teacher_model_name_or_path", str(workspace / "teacher"),
            "--dataset_name", str(workspace / "train.jsonl"),
            "--output_dir", str(workspace / "out"), "--use_cpu", "--report_to", "none",
            "--teacher_load_in_4bit", "--check_samples", "6", "--check_sensitivity",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0, out
    assert "KL(full || configured) per token" in out and "top-1 agreement" in out and "verdict:" in out
    assert "--teacher_quantization_skip_modules model.layers." in out


def test_check_teacher_refuses_a_teacher_stored_quantized(workspace, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    stored = AutoModelForCausalLM.from_pretrained(
        str(workspace / "teacher"), quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map={"": "cpu"}
    )
    stored.save_pretrained(tmp_path / "quantized")
    status = main(
        [
            "check-teacher",
            "--model_name_or_path", str(workspace / "student"),
            "--teacher_model_name_or_path", str(tmp_path / "quantized"),
            "--dataset_name", str(workspace / "train.jsonl"),
            "--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none", "--teacher_load_in_4bit",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "is stored quantized" in err and "full-precision checkpoint" in err


def test_int8_cast_message_is_logged_once(caplog):
    """LLM.int8()'s per-matmul cast message: the first line through, the repeats dropped."""
    import logging

    from speckd_trl.models import quiet_int8_casts

    quiet_int8_casts()
    quiet_int8_casts()  # idempotent: one filter
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for _ in range(3):
            logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32)
        logger.warning("another message")
    messages = [r.getMessage() for r in caplog.records if r.name == logger.name]
    assert len([m for m in messages if m.startswith("MatMul8bitLt")]) <= 1 and "another message" in messages


def test_a_gptq_config_object_quantizes_the_teacher_for_training_and_check_teacher(tmp_path, tiny):
    """The calibrated 4-bit teacher that kept the real teacher's skill (GPTQ, docs/one-gpu.md) is reached by passing
    transformers' `GPTQConfig` as `teacher_quantization`: the trainer loads the named teacher quantized and trains,
    and `check_teacher` compares it with the full-precision load. Needs gptqmodel and optimum, which the README's
    test command does not install (gptqmodel asks for a newer torch than the tested one): run where they are."""
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from transformers import GPTQConfig

    from speckd_trl import SpecKDTrainer
    from speckd_trl.tools.testing import TINY_ARGS

    tokenizer, model, dataset = tiny
    model.save_pretrained(tmp_path / "teacher")
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in dataset["messages"][:8]]
    gptq = GPTQConfig(bits=4, group_size=32, dataset=texts, tokenizer=tokenizer)
    args = SpecKDConfig(
        output_dir=str(tmp_path / "out"), teacher_quantization=gptq, max_steps=2, per_device_train_batch_size=4,
        lmbda=0.5, gate="topk", gate_top_k=3, max_new_tokens=4, **TINY_ARGS,
    )  # fmt: skip
    assert args.teacher_quantization_method == "gptq"
    trainer = SpecKDTrainer(
        model=make_model(0, tokenizer), teacher_model=str(tmp_path / "teacher"), args=args,
        train_dataset=dataset, processing_class=tokenizer,
    )  # fmt: skip
    assert type(trainer.teacher_model.hf_quantizer).__name__ == "GptqHfQuantizer"
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))
    report = check_teacher(str(tmp_path / "teacher"), args, dataset, tokenizer, samples=8, batch_size=4)
    assert report["method"] == "gptq" and report["price"].kl_per_token > 0
    assert report["configured"].weights_mib < report["full"].weights_mib
