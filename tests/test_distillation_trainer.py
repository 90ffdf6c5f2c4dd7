"""`SpecKDDistillationTrainer` on TRL's `DistillationTrainer`: TRL's loss with no gate, the gated loss against a loop
reference, a short training run, and the config's errors."""

import copy

import pytest
import torch
from datasets import Dataset
from trl import DistillationConfig, DistillationTrainer
from trl.trainer import distillation_trainer as trl_distillation

from speckd_trl import SpecKDConfig, SpecKDDistillationConfig, SpecKDDistillationTrainer
from speckd_trl import compat as speckd_compat
from speckd_trl.losses import policy_gradient_loss, weighted_generalized_jsd
from speckd_trl.rules import accept_mask
from speckd_trl.tools.testing import (
    HEAD_FAMILIES,
    TINY_ARGS,
    make_dataset,
    make_family_model,
    make_model,
    make_prompt_dataset,
    make_tokenizer,
    save_teacher_with_another_tokenizer,
)


TINY = dict(**TINY_ARGS, per_device_train_batch_size=4, max_completion_length=6, learning_rate=1e-3)
EXTRA_WINDOW_TOKENS = 7  # the batch is one micro-batch of a larger accumulation window


def build(
    tmp_path, trainer_class=SpecKDDistillationTrainer, config_class=SpecKDDistillationConfig, family=None, **overrides
):
    """A trainer on the tiny models (Qwen2, or a `HEAD_FAMILIES` family)."""
    tokenizer = make_tokenizer()

    def model(seed):
        return make_family_model(seed, tokenizer, family) if family else make_model(seed, tokenizer)

    return trainer_class(
        model=model(0),
        teacher_model=model(1),
        args=config_class(output_dir=str(tmp_path), **{**TINY, **overrides}),
        train_dataset=make_prompt_dataset(8),
        processing_class=tokenizer,
    )


def ragged_batch(trainer) -> dict:
    """Four on-policy completions, two of them ended early (right padding, as at an EOS), in a larger window."""
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(make_prompt_dataset(4).to_list())
    mask = batch["completion_mask"].clone()
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    ids = batch["completion_ids"].masked_fill(mask == 0, trainer.processing_class.pad_token_id)
    n_items = torch.tensor(int(mask.sum()) + EXTRA_WINDOW_TOKENS)
    return {**batch, "completion_ids": ids, "completion_mask": mask, "num_items_in_batch": n_items}


def loss_and_grads(trainer, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def max_diffs(a, b) -> tuple[float, float]:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert grads_a.keys() == grads_b.keys() and grads_a
    return (loss_a - loss_b).abs().item(), max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a)


# ----------------------------------------------------------------------------- gate="none" is DistillationTrainer


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("loss", ["closed-form", "trl", "trl-compact"])
def test_no_gate_reproduces_distillation_trainer(tmp_path, monkeypatch, beta, loss):
    """`closed-form`: SpecKD's chunked loss, which the trainer uses on the CPU; `trl`: TRL's
    `ChunkedDivergenceFunction`, which it uses elsewhere; `trl-compact`: that one projecting only the completion
    tokens, as TRL does on Triton devices (the torch tiles still run)."""
    if loss != "closed-form":
        monkeypatch.setattr(SpecKDDistillationTrainer, "_closed_form_loss", lambda self, device: False)
    if loss == "trl-compact":
        monkeypatch.setattr(trl_distillation, "_use_triton", lambda device: True)
        monkeypatch.setattr(speckd_compat, "_use_triton", lambda device: True)
    reference = build(tmp_path / "trl", DistillationTrainer, DistillationConfig, beta=beta, temperature=0.8)
    ours = build(tmp_path / "ours", beta=beta, temperature=0.8, gate="none")
    assert ours._closed_form_loss(torch.device("cpu")) == (loss == "closed-form")
    batch = ragged_batch(reference)
    loss_diff, grad_diff = max_diffs(loss_and_grads(reference, batch), loss_and_grads(ours, batch))
    assert loss_diff <= 1e-5 and grad_diff <= 1e-5
    # the same entropy metric (the closed-form loss computes it apart from TRL's kernel: equal to float round-off)
    assert ours._metrics["train"]["entropy"] == pytest.approx(reference._metrics["train"]["entropy"], rel=1e-6)
    # every completion token counted as gated and accepted
    assert ours._gate.window["gated_on"] == ours._gate.window["accepted_on"] == int(batch["completion_mask"].sum())


# ----------------------------------------------------------------------------- the gate against a loop reference


def loop_reference(trainer, batch, uniforms):
    """The gated loss position by position: `accept_mask` on the student's sample with ``q`` the student at the
    sampling temperature and ``p`` the teacher at temperature 1, `weighted_generalized_jsd` at the divergence's
    temperature, summed over the window's tokens; plus the reward term when `reward_coef > 0`."""
    args = trainer.args
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    n_completion = batch["completion_ids"].size(1)
    trainer.model.train()
    trainer.model.zero_grad()
    student = trainer.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -n_completion - 1 : -1]
    with torch.no_grad():
        teacher = trainer.teacher_model(input_ids=input_ids, attention_mask=attention_mask).logits
        teacher = teacher[:, -n_completion - 1 : -1]
    completion = batch["completion_mask"].bool()
    accepted = torch.zeros_like(completion)
    kd = torch.zeros(())
    for b, k in completion.nonzero().tolist():
        s, t = student[b, k][None, None], teacher[b, k][None, None]
        x = batch["completion_ids"][b, k][None, None]
        u = None if uniforms is None else uniforms[b, k][None, None]
        one = torch.ones(1, 1, dtype=torch.bool)
        verdict = accept_mask(
            s.detach() / args.temperature, t, x, one, gate=args.gate, top_k=args.gate_top_k, uniforms=u
        )
        accepted[b, k] = verdict.item()
        w = torch.tensor([[1.0 if verdict.item() else args.reject_weight]])
        kd = kd + weighted_generalized_jsd(s, t, w, beta=args.beta, temperature=args.temperature).sum()
    n_items = batch["num_items_in_batch"].float()
    loss = args.kd_coef * kd / n_items
    if args.reward_coef > 0:
        logq = torch.log_softmax(student / args.temperature, -1)
        logq = logq.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
        loss = loss + args.reward_coef * policy_gradient_loss(logq, accepted, completion, denominator=n_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return (loss.detach(), grads), accepted


@pytest.mark.parametrize(
    "gate, reward_coef, beta, family, temperature",
    [("topk", 0.0, 0.5, None, 0.5), ("spec", 0.0, 0.5, None, 0.5), ("spec", 0.5, 1.0, None, 0.5)]
    + [("topk", 0.3, 0.0, None, 0.5)]
    # the models' own logits against the chunked divergence on scaled and soft-capped heads
    + [("topk", 0.0, 0.5, family, 0.5) for family in sorted(HEAD_FAMILIES)]
    + [("spec", 0.5, 0.5, "gemma2", 0.5), ("topk", 0.3, 1.0, "granite", 0.5)]  # the reward term's log q on those heads
    # at temperature 1 the gate reads the closed-form loss's chunks (on the CPU): its verdicts and weights, there
    + [("topk", 0.0, 0.5, None, 1.0), ("spec", 0.5, 1.0, None, 1.0), ("topk", 0.3, 0.0, None, 1.0)]
    + [("spec", 0.0, 0.5, "gemma2", 1.0), ("topk", 0.0, 0.5, "granite", 1.0)],
)
def test_gated_loss_matches_a_loop_reference(tmp_path, gate, reward_coef, beta, family, temperature):
    trainer = build(
        tmp_path,
        family=family,
        gate=gate,
        gate_top_k=30,
        reject_weight=0.2,
        reward_coef=reward_coef,
        beta=beta,
        temperature=temperature,
        max_completion_length=16,
    )
    assert trainer._closed_form_loss(torch.device("cpu")) == (temperature == 1.0)
    batch = ragged_batch(trainer)
    trainer._gate.generator.manual_seed(7)
    ours = loss_and_grads(trainer, batch)
    uniforms = torch.rand(batch["completion_mask"].shape, generator=torch.Generator().manual_seed(7))
    reference, accepted = loop_reference(trainer, batch, uniforms if gate == "spec" else None)
    window = trainer._gate.window
    assert window["gated_on"] == int(batch["completion_mask"].sum())
    assert window["accepted_on"] == int(accepted.sum())
    assert 0 < window["accepted_on"] < window["gated_on"]  # the gate both accepts and rejects here
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-7)
    for name, grad in ours[1].items():
        torch.testing.assert_close(grad, reference[1][name], rtol=1e-4, atol=1e-6)
        # and within 1e-5 of each gradient's scale (its largest entry)
        assert (grad - reference[1][name]).abs().max() <= 1e-5 * reference[1][name].abs().max(), name


# ----------------------------------------------------------------------------- end to end


def test_training_logs_the_gate_and_moves_the_student(tmp_path):
    tokenizer = make_tokenizer()
    student = make_model(0, tokenizer)
    before = copy.deepcopy(student.state_dict())
    trainer = SpecKDDistillationTrainer(
        model=student,
        teacher_model=make_model(1, tokenizer),
        args=SpecKDDistillationConfig(
            output_dir=str(tmp_path), **{**TINY, "max_steps": 3, "logging_steps": 1}, gate="topk", gate_top_k=10
        ),
        train_dataset=make_dataset(12),  # chat rows: the prompt is every message before the assistant's
        eval_dataset=make_prompt_dataset(4),
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.evaluate()["eval_loss"] > 0
    assert trainer._gate.window["gated_on"] == 0  # evaluation is not counted in the training window
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3
    for log in logs:
        assert 0 <= log["gate/acceptance_rate"] <= 1
        assert log["gate/acceptance_rate_on_policy"] == log["gate/acceptance_rate"]
        assert log["gate/top_k"] == 10 and log["gate/reject_weight"] == trainer.args.reject_weight
        assert "reward/mean" in log and "entropy" in log  # TRL's own metrics are kept
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)

    # a checkpoint keeps the gate's generator and logging window
    trainer._gate.window["gated_on"] = 5.0
    trainer._save_rng_state(str(tmp_path / "checkpoint"))
    state = trainer._gate.generator.get_state().clone()
    torch.rand(3, generator=trainer._gate.generator)
    trainer._gate.window["gated_on"] = 0.0
    trainer._load_rng_state(str(tmp_path / "checkpoint"))
    assert torch.equal(trainer._gate.generator.get_state(), state) and trainer._gate.window["gated_on"] == 5.0


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "overrides",
    [
        {"gate": "top-k"},
        {"gate_top_k": 0},
        {"reject_weight": 1.5},
        {"gate_normalize": "mean"},
        {"gate_top_k_schedule": "linear", "gate_top_k_start": 5},
        {"reject_weight_start": 0.5},
        {"kd_coef": 0.0},
        {"reward_coef": -1.0},
        {"gate": "none", "kd_coef": 0.0, "reward_coef": 0.5},
        {"temperature": 0.0},
    ],
)
def test_bad_gate_settings_fail_as_in_speckd_config(overrides):
    base = dict(output_dir="unused", bf16=False, use_cpu=True, report_to="none")
    with pytest.raises(ValueError) as speckd:
        SpecKDConfig(**base, **overrides)
    with pytest.raises(ValueError) as distillation:
        SpecKDDistillationConfig(**base, **overrides)
    expected = str(speckd.value).replace("SpecKDConfig:", "SpecKDDistillationConfig:")
    assert str(distillation.value) == expected and expected.startswith("SpecKDDistillationConfig:")


def test_warnings_and_wrong_arguments(tmp_path):
    base = dict(output_dir="unused", bf16=False, use_cpu=True, report_to="none")
    with pytest.warns(UserWarning, match="reject weight of 0 masks rejected positions"):
        SpecKDDistillationConfig(**base, reject_weight=0.0)
    with pytest.warns(UserWarning, match=r"gate='spec' takes the student's proposal distribution.*top_p=0.9"):
        SpecKDDistillationConfig(**base, gate="spec", top_p=0.9)
    tokenizer = make_tokenizer()
    with pytest.raises(TypeError, match="SpecKDDistillationConfig"):
        SpecKDDistillationTrainer(
            model=make_model(0, tokenizer),
            teacher_model=make_model(1, tokenizer),
            args=DistillationConfig(output_dir=str(tmp_path), **TINY),
            train_dataset=make_prompt_dataset(8),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="needs a teacher"):
        SpecKDDistillationTrainer(
            model=make_model(0, tokenizer),
            args=SpecKDDistillationConfig(output_dir=str(tmp_path), **TINY),
            train_dataset=make_prompt_dataset(8),
            processing_class=tokenizer,
        )


# ----------------------------------------------------------------------------- input checks, before any model loads


def build_with(tmp_path, train_dataset, model="no/such/student", teacher="no/such/teacher", tokenizer=None, **args):
    """`SpecKDDistillationTrainer` with models given by paths that do not exist: an input check that runs before any
    model is loaded raises its own error, any later one a loading error."""
    return SpecKDDistillationTrainer(
        model=model,
        teacher_model=teacher,
        args=SpecKDDistillationConfig(output_dir=str(tmp_path), **{**TINY, **args}),
        train_dataset=train_dataset,
        processing_class=tokenizer or make_tokenizer(),
    )


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"question": "what is 1 + 2 ="}],
            r"has columns \['question'\], but SpecKDDistillationTrainer needs prompts",
        ),
        ([{"text": "what is 1 + 2 = answer 3"}], r"has columns \['text'\], .* a `prompt` column"),
        ([], r"train_dataset is empty \(0 rows\)"),
    ],
)
def test_bad_datasets_fail_before_the_models_load(tmp_path, rows, message):
    dataset = Dataset.from_list(rows) if rows else make_prompt_dataset(4).select([])
    with pytest.raises(ValueError, match=message):
        build_with(tmp_path, dataset)


def test_chat_prompts_need_a_chat_template(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="holds chat messages, but the tokenizer .* has no chat template"):
        build_with(tmp_path, make_prompt_dataset(4), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="eval_dataset\\['a'\\] holds chat messages"):
        SpecKDDistillationTrainer(
            model=make_model(0, make_tokenizer()),
            teacher_model=make_model(1, make_tokenizer()),
            args=SpecKDDistillationConfig(output_dir=str(tmp_path), **TINY),
            train_dataset=Dataset.from_list([{"prompt": "what is 1 + 2 ="}] * 4),
            eval_dataset={"a": make_dataset(4)},
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("passed_as", ["path", "model"])
def test_teacher_tokenizer_that_differs_token_by_token(tmp_path, passed_as):
    """TRL compares only the vocabulary sizes; the tokenizers are compared id by id too, for a teacher given by path
    or as a model loaded from one."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    teacher = str(save_teacher_with_another_tokenizer(tmp_path / "teacher", tokenizer))
    if passed_as == "model":
        teacher = AutoModelForCausalLM.from_pretrained(teacher)
    with pytest.raises(ValueError, match="teacher.s tokenizer differ on 2 of their 96 shared token ids"):
        build_with(tmp_path, make_prompt_dataset(4), model=make_model(0, tokenizer), teacher=teacher)


def test_gate_top_k_at_or_above_the_vocabulary(tmp_path):
    with pytest.raises(ValueError, match="gate_top_k=96 is not below the vocabulary size 96"):
        build(tmp_path, gate="topk", gate_top_k=96)
