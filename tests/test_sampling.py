"""On-policy tokens are drawn from exactly the ``q`` the `spec` gate scores them with, ``softmax(logits / T)``, even
when the student's own generation config (from its checkpoint) sets sampling options the trainer never asked for:
transformers 5 fills every setting a trainer leaves unset from it. Checked on thousands of first tokens, in both
trainers, with a chi-square test; and the configuration warns when the user asks for settings the gate cannot
describe."""

import math
import warnings

import pytest
import torch

from speckd_trl import SpecKDConfig, SpecKDDistillationConfig, SpecKDDistillationTrainer
from speckd_trl.batches import ON_POLICY
from speckd_trl.tools.testing import TINY_ARGS, make_dataset, make_model, make_prompt_dataset, make_tokenizer
from speckd_trl.trainer import SpecKDTrainer


SAMPLES = 4000
TEMPERATURE = 0.7
# what a checkpoint's generation_config.json may set (Qwen2.5-Instruct ships repetition_penalty 1.05-1.1)
CHECKPOINT_SETTINGS = [{"repetition_penalty": 3.0}, {"min_p": 0.2}, {"typical_p": 0.5}]


def peaked_student(tokenizer, settings):
    """A tiny student with sharp next-token distributions (so that min_p / typical_p cut real mass), whose own
    generation config carries `settings`."""
    student = make_model(0, tokenizer)
    with torch.no_grad():
        student.lm_head.weight.mul_(8)
    for name, value in settings.items():
        setattr(student.generation_config, name, value)
    return student


def q_of(student, prompt_ids: torch.Tensor) -> torch.Tensor:
    """The `spec` gate's ``q`` for the first completion token: ``softmax(z / T)`` at the prompt's last position."""
    with torch.no_grad():
        logits = student(input_ids=prompt_ids[None]).logits[0, -1]
    return torch.softmax(logits / TEMPERATURE, dim=-1)


def chi_square_critical(df: int, z: float = 4.75) -> float:
    """The chi-square quantile of `df` degrees of freedom at the normal quantile `z` (4.75: a false alarm once in a
    million), by the Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_drawn_from(tokens: torch.Tensor, q: torch.Tensor) -> None:
    """Pearson's chi-square test of the tokens' counts against ``q`` (cells expecting fewer than 5 pooled)."""
    counts = torch.bincount(tokens, minlength=q.numel()).double()
    expected = q.double() * tokens.numel()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected > 0
    chi2 = (((observed - expected) ** 2)[keep] / expected[keep]).sum().item()
    df = int(keep.sum()) - 1
    assert chi2 < chi_square_critical(df), f"chi2={chi2:.1f} over {df} degrees of freedom"


@pytest.mark.parametrize("settings", CHECKPOINT_SETTINGS, ids=lambda s: next(iter(s)))
def test_speckd_trainer_samples_from_the_gates_q(tmp_path, settings):
    tokenizer = make_tokenizer()
    student = peaked_student(tokenizer, settings)
    trainer = SpecKDTrainer(
        model=student,
        teacher_model=make_model(1, tokenizer),
        args=SpecKDConfig(
            output_dir=str(tmp_path), **TINY_ARGS, lmbda=1.0, max_new_tokens=1, temperature=TEMPERATURE, gate="spec"
        ),
        train_dataset=make_dataset(4),
        processing_class=tokenizer,
    )
    inputs = trainer.data_collator([trainer.train_dataset[0]] * SAMPLES)
    torch.manual_seed(0)
    generated = trainer._generate(ON_POLICY, inputs)
    prompt = inputs["prompts"][0]
    first_tokens = generated["input_ids"][:, prompt.numel()]
    assert_drawn_from(first_tokens, q_of(student, prompt))
    assert getattr(student.generation_config, next(iter(settings))) == next(iter(settings.values()))  # restored


@pytest.mark.parametrize("settings", CHECKPOINT_SETTINGS, ids=lambda s: next(iter(s)))
def test_distillation_trainer_samples_from_the_gates_q(tmp_path, settings):
    tokenizer = make_tokenizer()
    student = peaked_student(tokenizer, settings)
    trainer = SpecKDDistillationTrainer(
        model=student,
        teacher_model=make_model(1, tokenizer),
        args=SpecKDDistillationConfig(
            output_dir=str(tmp_path), **TINY_ARGS, max_completion_length=1, temperature=TEMPERATURE, gate="spec"
        ),
        train_dataset=make_prompt_dataset(4),
        processing_class=tokenizer,
    )
    text = tokenizer.apply_chat_template(
        make_prompt_dataset(1)[0]["prompt"], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    completions = trainer._generate_single_turn([prompt] * SAMPLES, None, {})
    first_tokens = torch.tensor([c[0] for c in completions])
    assert_drawn_from(first_tokens, q_of(student, torch.tensor(prompt)))


def test_the_chi_square_check_sees_a_checkpoints_sampling_settings():
    """The test above has the power to see what it guards against: sampling with the checkpoint's settings (as
    transformers does when nothing replaces them) fails it."""
    tokenizer = make_tokenizer()
    student = peaked_student(tokenizer, {"min_p": 0.2})
    prompt = torch.tensor(tokenizer("<|im_start|>user what is 3 + 4 = <|im_end|> <|im_start|>assistant")["input_ids"])
    torch.manual_seed(0)
    out = student.generate(
        input_ids=prompt.expand(SAMPLES, -1),
        attention_mask=torch.ones(SAMPLES, prompt.numel(), dtype=torch.long),
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=TEMPERATURE,
        max_new_tokens=1,
    )
    with pytest.raises(AssertionError, match="chi2="):
        assert_drawn_from(out[:, prompt.numel()], q_of(student, prompt))


# ----------------------------------------------------------------------------- what the user asks for


BASE = dict(output_dir="unused", bf16=False, use_cpu=True, report_to="none")


def test_sampling_settings_in_generation_kwargs_warn_for_spec():
    with pytest.warns(UserWarning, match=r"top_p=0.5, repetition_penalty=1.3 change the distribution"):
        SpecKDDistillationConfig(**BASE, gate="spec", generation_kwargs={"top_p": 0.5, "repetition_penalty": 1.3})
    with pytest.warns(UserWarning, match=r"temperature=0.5"):  # a second temperature: q is not the sampler's
        SpecKDDistillationConfig(**BASE, gate="spec", temperature=0.9, generation_kwargs={"temperature": 0.5})
    with pytest.warns(UserWarning, match=r"do_sample=False"):
        SpecKDDistillationConfig(**BASE, gate="spec", generation_kwargs={"do_sample": False})


@pytest.mark.parametrize(
    "overrides",
    [
        {"gate": "spec", "generation_kwargs": {"min_p": 0.0, "typical_p": 1.0, "max_new_tokens": 4}},
        {"gate": "spec", "generation_kwargs": {"temperature": 1.0}},  # the same as `temperature`
        {"gate": "topk", "top_p": 0.5, "generation_kwargs": {"repetition_penalty": 1.3}},  # topk reads the teacher
    ],
)
def test_neutral_or_unread_settings_do_not_warn(overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        SpecKDDistillationConfig(**BASE, **overrides)
