"""Bad input fails before training starts, with a message that names the value and the fix."""

import re

import pytest
import torch
from datasets import Dataset

from speckd_trl import SpecKDConfig, SpecKDTrainer, config, validation
from speckd_trl.tools.testing import make_dataset, make_model, make_tokenizer, save_teacher_with_another_tokenizer


BASE = dict(output_dir="unused", bf16=False, use_cpu=True, report_to="none")


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("gate", "top-k", "topk, spec, none"),
        ("gate_top_k", 0, ">= 1"),
        ("gate_top_k", 2.5, ">= 1"),
        ("gate_on", "student", "both, on_policy, off_policy"),
        ("gate_proposal", "beam", "greedy, sample"),
        ("reject_weight", 1.5, "[0.0, 1.0]"),
        ("reject_weight", -0.1, "[0.0, 1.0]"),
        ("gate_normalize", "mean", "tokens, accepted"),
        ("teacher_bnb_4bit_quant_type", "int4", "nf4, fp4"),
        ("teacher_bnb_4bit_compute_dtype", "fp8", "auto"),
        ("lmbda", 2.0, "[0.0, 1.0]"),
        ("beta", -1.0, "[0.0, 1.0]"),
        ("temperature", 0.0, "> 0"),
        ("max_new_tokens", 0, ">= 1"),
    ],
)
def test_invalid_config_value_names_field_value_and_range(field, value, fragment):
    with pytest.raises(ValueError) as err:
        SpecKDConfig(**BASE, **{field: value})
    message = str(err.value)
    assert f"{field}={value!r}" in message and fragment in message


def test_padding_free_alone_is_refused_not_ignored():
    """`SFTConfig`'s `padding_free` reaches SpecKDConfig through GKDConfig; SpecKD packs with `packing=True` instead
    (tests/test_packing.py): refused by name, with the alternative."""
    with pytest.raises(ValueError, match="padding_free=True is not supported.*Use packing=True instead"):
        SpecKDConfig(output_dir="out", report_to="none", padding_free=True)


def test_defaults_are_valid():
    args = SpecKDConfig(**BASE)
    assert (args.gate, args.gate_top_k, args.gate_on, args.reject_weight) == ("topk", 5, "both", 0.5)
    assert args.gate_normalize == "tokens" and not args.teacher_load_in_4bit


@pytest.mark.parametrize(
    "overrides",
    [
        {"reject_weight": 0.0},
        {"gate": "spec", "reject_weight": 0.0},
        {"reject_weight_schedule": "linear", "reject_weight_start": 0.5, "reject_weight_end": 0.0},
    ],
)
def test_masking_rejected_positions_completely_warns(overrides):
    """reject_weight 0 collapsed the student in the quality benchmark: allowed, but it warns and names the fix."""
    with pytest.warns(UserWarning, match=r"reject weight of 0 masks rejected positions.*reject_weight=0.5"):
        SpecKDConfig(**BASE, **overrides)


@pytest.mark.parametrize("overrides", [{}, {"reject_weight": 0.05}, {"gate": "none", "reject_weight": 0.0}])
def test_a_small_reject_weight_or_no_gate_does_not_warn(overrides, recwarn):
    SpecKDConfig(**BASE, **overrides)
    assert not [w for w in recwarn if "reject weight of 0" in str(w.message)]


@pytest.mark.parametrize(
    "overrides, why, fix",
    [
        ({"gate": "none"}, "gate='none' accepts every token", "gate='topk'"),
        ({"gate_on": "off_policy"}, "gate_on='off_policy' gates no on-policy token", "gate_on='both'"),
        ({"lmbda": 0.0}, "lmbda=0 generates no on-policy token", "lmbda > 0"),
    ],
)
def test_a_reward_term_that_is_identically_zero(overrides, why, fix, recwarn):
    """kd_coef=0 would train on a loss of exactly 0: an error. Beside distillation the term is only useless: a
    warning."""
    args = {**BASE, "reward_coef": 0.5, **overrides}
    with pytest.raises(ValueError) as err:
        SpecKDConfig(**args, kd_coef=0.0)
    message = str(err.value)
    assert "reward_coef=0.5 has no effect" in message and why in message and fix in message
    with pytest.warns(UserWarning, match=f"reward_coef=0.5 has no effect: {why}"):
        SpecKDConfig(**args, kd_coef=1.0)


def test_a_pure_reward_step_on_gated_on_policy_tokens_is_valid(recwarn):
    SpecKDConfig(**BASE, kd_coef=0.0, reward_coef=0.5, lmbda=0.5, gate="spec", gate_on="on_policy")
    assert not [w for w in recwarn if "reward_coef" in str(w.message)]


def test_import_prints_no_bitsandbytes_kernels_line():
    """bitsandbytes (imported by PEFT) logs that the optional `kernels` package is missing; a newcomer reads that as
    a failure, so `import speckd_trl` drops that one line and nothing else. The record is sent by hand too, so the
    test holds whether or not this machine's bitsandbytes logs it (it does only on CPUs with AVX512-BF16)."""
    import subprocess
    import sys

    script = """
import logging, sys
import speckd_trl, bitsandbytes
logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", ModuleNotFoundError("No module named 'kernels'"))
logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", RuntimeError("kernel version 0.1"))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "kernels'" not in result.stdout + result.stderr
    assert "kernel version 0.1" in result.stderr  # any other failure to load the kernels is still reported


def make(tokenizer, student, teacher, **overrides):
    return SpecKDTrainer(
        model=student,
        teacher_model=teacher,
        args=SpecKDConfig(**{**BASE, **overrides}),
        train_dataset=make_dataset(),
        processing_class=tokenizer,
    )


@pytest.mark.parametrize("passed_as", ["path", "model"])
def test_teacher_tokenizer_that_differs_token_by_token(tmp_path, passed_as):
    """Same size, different tokens: the teacher's saved tokenizer is compared id by id, not only by its length,
    whether the teacher is given by path or as a model loaded from that path (most GKD users pass a model)."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    teacher = str(save_teacher_with_another_tokenizer(tmp_path / "teacher", tokenizer))
    if passed_as == "model":
        teacher = AutoModelForCausalLM.from_pretrained(teacher)
    with pytest.raises(ValueError, match="teacher.s tokenizer differ on 2 of their 96 shared token ids") as err:
        make(tokenizer, make_model(0, tokenizer), teacher, output_dir=str(tmp_path / "out"))
    assert "'user' vs 'assistant'" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, setting, example",
    [
        ({"teacher_load_in_4bit": True}, "teacher_load_in_4bit=True", "BitsAndBytesConfig(load_in_4bit=True"),
        ({"teacher_quantization": "int8"}, "teacher_quantization='int8'", "BitsAndBytesConfig(load_in_8bit=True)"),
    ],
)
def test_4bit_flag_with_a_loaded_teacher(tmp_path, kwargs, setting, example):
    """`teacher_load_in_4bit` / `teacher_quantization` cannot quantize a loaded model: an error, not a full-precision
    teacher."""
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match=rf"{re.escape(setting)} quantizes a teacher given as a name or path") as err:
        make(tokenizer, make_model(0, tokenizer), make_model(1, tokenizer), **kwargs, output_dir="x")
    assert f"quantization_config={example}" in str(err.value)


def loaded_in_4bit(path, seed: int, tokenizer):
    """`make_model(seed)` saved to `path` and loaded back in 4-bit (bitsandbytes' CPU backend)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_model(seed, tokenizer).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map={"": "cpu"}
    )


def test_4bit_flag_with_a_teacher_loaded_in_4bit(tmp_path):
    pytest.importorskip("bitsandbytes")
    tokenizer = make_tokenizer()
    teacher = loaded_in_4bit(tmp_path / "teacher", 1, tokenizer)
    trainer = make(tokenizer, make_model(0, tokenizer), teacher, teacher_load_in_4bit=True, output_dir=str(tmp_path))
    assert trainer.teacher_model.is_loaded_in_4bit


def test_teacher_init_kwargs_with_a_loaded_teacher(tmp_path):
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match="teacher_model_init_kwargs .* already loaded"):
        make(
            tokenizer,
            make_model(0, tokenizer),
            make_model(1, tokenizer),
            teacher_model_init_kwargs={"dtype": "float32"},
            output_dir=str(tmp_path),
        )


def test_teacher_output_smaller_than_the_tokenizer(tmp_path):
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match="the tokenizer has 96 tokens but the teacher produces only 64 logits") as err:
        make(tokenizer, make_model(0, tokenizer), make_model(1, tokenizer, vocab_size=64), output_dir=str(tmp_path))
    # the advice fixes the cause (another tokenizer), it does not silence the check
    assert "resize_token_embeddings" not in str(err.value) and "SpecKDGOLDTrainer" in str(err.value)


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({"gate_top_k": 96}, "gate_top_k=96"),
        ({"gate_top_k": 500}, "gate_top_k=500"),
        ({"gate_top_k_schedule": "linear", "gate_top_k_start": 200, "gate_top_k_end": 2}, "gate_top_k_start=200"),
    ],
)
def test_gate_top_k_at_or_above_the_vocabulary(tmp_path, overrides, name):
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match=f"{name} is not below the vocabulary size 96: .*gate='none'"):
        make(tokenizer, make_model(0, tokenizer), make_model(1, tokenizer), output_dir=str(tmp_path), **overrides)
    make(tokenizer, make_model(0, tokenizer), make_model(1, tokenizer), output_dir=str(tmp_path), gate_top_k=95)


def test_tokenizer_larger_than_the_models(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.add_tokens([f"extra{i}" for i in range(8)])
    small = dict(vocab_size=len(tokenizer) - 4)
    with pytest.raises(ValueError, match=f"tokenizer has {len(tokenizer)} tokens"):
        make(tokenizer, make_model(0, tokenizer, **small), make_model(1, tokenizer, **small), output_dir=str(tmp_path))


def test_tokenizer_without_pad_token(tmp_path):
    tokenizer = make_tokenizer(with_pad=False)
    with pytest.raises(ValueError, match="pad token"):
        make(tokenizer, make_model(0, make_tokenizer()), make_model(1, make_tokenizer()), output_dir=str(tmp_path))


def test_missing_teacher(tmp_path):
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match="needs a teacher"):
        make(tokenizer, make_model(0, tokenizer), None, output_dir=str(tmp_path))


def test_teacher_path_that_does_not_exist(tmp_path):
    tokenizer = make_tokenizer()
    missing = str(tmp_path / "no-such-teacher")
    with pytest.raises(ValueError, match="Could not load the teacher model from"):
        make(tokenizer, make_model(0, tokenizer), missing, output_dir=str(tmp_path))


def test_args_must_be_a_speckd_config(tmp_path):
    from trl.experimental.gkd import GKDConfig

    tokenizer = make_tokenizer()
    with pytest.raises(TypeError, match="SpecKDConfig"):
        SpecKDTrainer(
            model=make_model(0, tokenizer),
            teacher_model=make_model(1, tokenizer),
            args=GKDConfig(**{**BASE, "output_dir": str(tmp_path)}),
            train_dataset=make_dataset(),
            processing_class=tokenizer,
        )


def test_tokenizer_without_chat_template(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        make(tokenizer, make_model(0, tokenizer), make_model(1, tokenizer), output_dir=str(tmp_path))


def make_with_dataset(tmp_path, dataset, **overrides):
    tokenizer = make_tokenizer()
    return SpecKDTrainer(
        model=make_model(0, tokenizer),
        teacher_model=make_model(1, tokenizer),
        args=SpecKDConfig(**{**BASE, "output_dir": str(tmp_path), **overrides}),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


@pytest.mark.parametrize(
    "row, advice",
    [
        ({"text": "what is 1 + 2 = answer 3"}, "Plain `text` rows have no prompt/completion boundary"),
        ({"prompt": "what is 1 + 2 ="}, "Prompt-only rows .* use SpecKDDistillationTrainer"),
        (
            {"conversations": [{"from": "human", "value": "hi"}]},
            r"dataset.rename_column\('conversations', 'messages'\)",
        ),
        ({"question": "what is 1 + 2 =", "answer": "3"}, "Rename or map the columns to `messages`"),
    ],
)
def test_dataset_rows_without_messages_or_prompt_completion(tmp_path, row, advice):
    """The advice depends on what the columns hold (it suggested renaming `conversations` for every dataset)."""
    columns = str(list(row)).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ValueError, match=f"train_dataset has columns {columns}, but SpecKDTrainer needs") as err:
        make_with_dataset(tmp_path, Dataset.from_list([row]))
    assert re.search(advice, str(err.value)), str(err.value)
    assert ("conversations" in str(err.value)) == ("conversations" in row)


def test_empty_dataset(tmp_path):
    with pytest.raises(ValueError, match=r"train_dataset is empty \(0 rows\)"):
        make_with_dataset(tmp_path, make_dataset().select([]))


def test_max_length_shorter_than_the_prompts(tmp_path):
    with pytest.raises(ValueError, match="max_length=6 is shorter than the prompts: the prompt of row") as err:
        make_with_dataset(tmp_path, make_dataset(), max_length=6)
    assert "Raise max_length above" in str(err.value)


def test_prompt_completion_rows_are_accepted(tmp_path):
    chat = [
        {
            "prompt": [{"role": "user", "content": "what is 1 + 2 ="}],
            "completion": [{"role": "assistant", "content": "answer 3"}],
        }
    ] * 4
    text = [{"prompt": "what is 1 + 2 =", "completion": "answer 3 <|im_end|>"}] * 4
    for rows in (chat, text):
        trainer = make_with_dataset(tmp_path, Dataset.from_list(rows))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        completion = batch["labels"][0][batch["labels"][0] != -100]
        assert trainer.processing_class.decode(completion).split()[:2] == ["answer", "3"]


LONG_ANSWER = "answer " + " ".join(str(i) for i in range(12))  # with the prompt, 25 tokens


@pytest.mark.parametrize("form", ["messages", "chat_prompt_completion", "text_prompt_completion", "tokenized"])
def test_max_length_cuts_every_dataset_format(tmp_path, form):
    """Every format is cut to `max_length` tokens as TRL's collator cuts chat rows: the oldest prompt tokens first."""
    tokenizer = make_tokenizer()
    user, assistant = {"role": "user", "content": "what is 1 + 2 ="}, {"role": "assistant", "content": LONG_ANSWER}
    prompt_text = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template([user, assistant], tokenize=False)
    rows = {
        "messages": [{"messages": [user, assistant]}],
        "chat_prompt_completion": [{"prompt": [user], "completion": [assistant]}],
        "text_prompt_completion": [{"prompt": prompt_text, "completion": full_text[len(prompt_text) :]}],
        "tokenized": [
            {
                "prompt": prompt_text,
                "input_ids": tokenizer(full_text, add_special_tokens=False)["input_ids"],
                "completion_mask": [0] * len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
                + [1] * (len(tokenizer(full_text, add_special_tokens=False)["input_ids"]) - 11),
            }
        ],
    }[form]
    if form == "tokenized":  # the prompt is 11 tokens here
        assert len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"]) == 11
    full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    assert len(full) > 19
    trainer = make_with_dataset(tmp_path, Dataset.from_list(rows * 2), max_length=19)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert batch["input_ids"].shape == (2, 19)
    assert batch["input_ids"][0].tolist() == full[-19:]  # the same tokens for every format
    completion = batch["labels"][0][batch["labels"][0] != -100]
    assert tokenizer.decode(completion).split()[:2] == ["answer", "0"]


def test_long_tokenized_rows_without_a_completion_mask(tmp_path):
    rows = [{"input_ids": list(range(4, 30)), "prompt": "what is 1 + 2 ="}] * 2
    with pytest.raises(ValueError, match=r"up to 26 tokens, more than max_length=19, and no `completion_mask`"):
        make_with_dataset(tmp_path, Dataset.from_list(rows), max_length=19)


def test_tokenized_rows_without_a_prompt(tmp_path):
    rows = [{"input_ids": list(range(4, 10)), "completion_mask": [0, 0, 0, 1, 1, 1]}] * 2
    with pytest.raises(ValueError, match=r"tokenized rows .* `prompt` column"):
        make_with_dataset(tmp_path, Dataset.from_list(rows))


def test_4bit_teacher_without_bitsandbytes(tmp_path, monkeypatch):
    monkeypatch.setattr(validation, "bitsandbytes_available", lambda: False)
    tokenizer = make_tokenizer()
    with pytest.raises(ImportError, match="teacher_load_in_4bit=True needs the bitsandbytes package"):
        make(
            tokenizer,
            make_model(0, tokenizer),
            str(tmp_path / "teacher"),
            teacher_load_in_4bit=True,
            output_dir=str(tmp_path),
        )


def test_4bit_teacher_on_an_unsupported_device(tmp_path, monkeypatch):
    monkeypatch.setattr(validation, "bitsandbytes_available", lambda: True)
    monkeypatch.setattr(validation, "BNB_4BIT_DEVICES", ("cuda",))  # pretend this CPU is not supported
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match="teacher_load_in_4bit=True is not supported on device 'cpu'"):
        make(
            tokenizer,
            make_model(0, tokenizer),
            str(tmp_path / "teacher"),
            teacher_load_in_4bit=True,
            output_dir=str(tmp_path),
        )
    with pytest.raises(ValueError, match="not supported on device 'mps'"):
        validation.check_4bit_teacher("mps")


def test_bf16_where_unsupported(monkeypatch):
    monkeypatch.setattr(config, "bf16_unsupported_reason", lambda use_cpu: "the GPU does not support bfloat16")
    with pytest.raises(ValueError, match="bf16=True is not supported here: the GPU does not support bfloat16"):
        SpecKDConfig(**{**BASE, "bf16": True})
    if not torch.cuda.is_available():  # the real check: no GPU, use_cpu=False
        monkeypatch.undo()
        with pytest.raises(ValueError, match="no GPU is visible and use_cpu=False"):
            SpecKDConfig(**{**BASE, "bf16": True, "use_cpu": False})


def test_quantized_student_without_peft_config(tmp_path):
    pytest.importorskip("bitsandbytes")
    tokenizer = make_tokenizer()
    student = loaded_in_4bit(tmp_path / "student", 0, tokenizer)
    with pytest.raises(ValueError, match="is quantized, and quantized weights cannot be trained directly"):
        make(tokenizer, student, make_model(1, tokenizer), output_dir=str(tmp_path))
