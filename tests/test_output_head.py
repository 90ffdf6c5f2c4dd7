"""One reader of output layers for every path that projects hidden states itself, with TRL's logit-scale and softcap
rules, checked against the model's own logits before the first step: logit-scaled and soft-capped families give the
same loss and gradients on the eager and the chunked path, and a head no rule describes stops the trainer."""

import pytest
import torch
from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig, LlamaForCausalLM

from speckd_trl import SpecKDDistillationConfig, SpecKDDistillationTrainer
from speckd_trl.batches import OFF_POLICY, ON_POLICY
from speckd_trl.models import OutputHead, check_output_head, logit_scale, output_head
from speckd_trl.tools.testing import (
    HEAD_FAMILIES,
    TINY_ARGS,
    collated_batch,
    loss_gradients_and_window,
    make_family_model,
    make_model,
    make_prompt_dataset,
    make_tokenizer,
    make_trainer,
)


class ScaledLogitsLlama(LlamaForCausalLM):
    """A family no rule anticipates: its forward multiplies the logits by 3, and its config says nothing of it."""

    def forward(self, *args, **kwargs):
        outputs = super().forward(*args, **kwargs)
        outputs.logits = outputs.logits * 3
        return outputs


@pytest.mark.parametrize(
    "config, expected",
    [
        (LlamaConfig(), 1.0),
        (CohereConfig(logit_scale=0.25), 0.25),
        (GraniteConfig(logits_scaling=8.0), 0.125),
        (Gemma2Config(), 1.0),
    ],
)
def test_logit_scale_follows_trls_rules(config, expected):
    assert logit_scale(config) == expected


@pytest.mark.parametrize("family", sorted(HEAD_FAMILIES))
def test_the_reader_reproduces_the_models_own_logits(family):
    tokenizer = make_tokenizer()
    model = make_family_model(0, tokenizer, family)
    ids = torch.randint(4, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = model(input_ids=ids, output_hidden_states=True)
    head = output_head(model, "student")
    computed = head.transform(head.project(outputs.hidden_states[-1]))
    torch.testing.assert_close(computed, outputs.logits, rtol=1e-5, atol=1e-6)
    if family != "llama":
        assert head.transforms  # the rule did something: the test would catch a reader that ignores it


def test_check_output_head_names_the_class_and_the_remedy():
    tokenizer = make_tokenizer()
    model = make_model(0, tokenizer)
    hidden = torch.randn(3, 64)
    head = output_head(model)
    logits = head.project(hidden)
    check_output_head(model, "student", head, hidden, logits, remedy="use loss_path='eager'")  # agrees: no error
    with pytest.raises(ValueError, match=r"The teacher Qwen2ForCausalLM .*Use loss_path='eager'"):
        check_output_head(model, "teacher", head, hidden, logits * 1.1, remedy="use loss_path='eager'")
    wrong = OutputHead(head.weight, logit_scale=0.5)
    with pytest.raises(ValueError, match="logit scale 0.5"):
        check_output_head(model, "student", wrong, hidden, logits, remedy="use loss_path='eager'")


# ----------------------------------------------------------------------------- SpecKDTrainer: eager == chunked


@pytest.mark.parametrize("kind", [OFF_POLICY, ON_POLICY])
@pytest.mark.parametrize("family", sorted(HEAD_FAMILIES))
def test_speckd_trainer_chunked_equals_eager_on_every_head(tmp_path, family, kind):
    tokenizer = make_tokenizer()
    results = {}
    for loss_path in ("eager", "chunked"):
        trainer = make_trainer(
            tmp_path / loss_path,
            student=make_family_model(0, tokenizer, family),
            teacher=make_family_model(1, tokenizer, family),
            loss_path=loss_path,
            loss_chunk_size=5,
            gate="spec" if kind == ON_POLICY else "topk",
            reward_coef=0.3 if kind == ON_POLICY else 0.0,  # the reward term's log q through the same head
            gate_top_k=48,
            reject_weight=0.2,
            temperature=0.7,
            per_device_train_batch_size=4,
        )
        results[loss_path] = loss_gradients_and_window(trainer, collated_batch(trainer, kind))
    (loss_e, grads_e, window_e), (loss_c, grads_c, window_c) = results["eager"], results["chunked"]
    assert loss_e.item() > 0
    assert loss_c.item() == pytest.approx(loss_e.item(), rel=1e-5)
    accepted, gated = (sum(window_e[f"{key}_{kind}"] for kind in ("on", "off")) for key in ("accepted", "gated"))
    assert window_c == window_e and 0 < accepted <= gated  # the same verdicts on both paths
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:  # within 1e-5 of each gradient's scale (its largest entry): float32 round-off
        error = (grads_c[name] - grads_e[name]).abs().max() / grads_e[name].abs().max()
        assert error <= 1e-5, (name, error.item())


def _scaled_student(tokenizer):
    return ScaledLogitsLlama(make_model(0, tokenizer, config_class=LlamaConfig).config)


def test_speckd_trainer_stops_on_a_head_it_cannot_reproduce(tmp_path):
    tokenizer = make_tokenizer()
    teacher = make_model(1, tokenizer, config_class=LlamaConfig)
    trainer = make_trainer(tmp_path / "chunked", student=_scaled_student(tokenizer), teacher=teacher, max_steps=1)
    before = {n: p.clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match=r"The student ScaledLogitsLlama computes its logits.*Use loss_path='eager'"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())  # no step on a wrong loss
    eager = make_trainer(
        tmp_path / "eager", student=_scaled_student(tokenizer), teacher=teacher, max_steps=1, loss_path="eager"
    )
    eager.train()  # the eager path reads the model's own logits


# ----------------------------------------------------------------------------- SpecKDDistillationTrainer


def _distillation_trainer(tmp_path, student, teacher):
    tokenizer = make_tokenizer()
    args = SpecKDDistillationConfig(
        output_dir=str(tmp_path), **TINY_ARGS, per_device_train_batch_size=4, max_completion_length=6, max_steps=1
    )
    return SpecKDDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=make_prompt_dataset(8),
        processing_class=tokenizer,
    )


def test_distillation_trainer_stops_on_a_head_it_cannot_reproduce(tmp_path):
    tokenizer = make_tokenizer()
    teacher = make_model(1, tokenizer, config_class=LlamaConfig)
    trainer = _distillation_trainer(tmp_path, _scaled_student(tokenizer), teacher)
    with pytest.raises(
        ValueError, match=r"The student ScaledLogitsLlama computes.*SpecKDTrainer with loss_path='eager'"
    ):
        trainer.train()
