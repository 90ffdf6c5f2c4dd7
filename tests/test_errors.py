"""Bad input fails before training starts, with a message that names the value and the fix."""

import pytest

from speckd_trl import SpecKDConfig, SpecKDTrainer
from speckd_trl.testing import make_dataset, make_model, make_tokenizer


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


def test_defaults_are_valid():
    args = SpecKDConfig(**BASE)
    assert (args.gate, args.gate_top_k, args.gate_on, args.reject_weight) == ("topk", 5, "both", 0.0)
    assert args.gate_normalize == "tokens" and not args.teacher_load_in_4bit


def make(tokenizer, student, teacher, **overrides):
    return SpecKDTrainer(
        model=student,
        teacher_model=teacher,
        args=SpecKDConfig(**{**BASE, **overrides}),
        train_dataset=make_dataset(),
        processing_class=tokenizer,
    )


def test_vocabulary_mismatch(tmp_path):
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match="vocab"):
        make(tokenizer, make_model(0, tokenizer), make_model(1, tokenizer, vocab_size=128), output_dir=str(tmp_path))


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
