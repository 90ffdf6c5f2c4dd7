"""Issue 7: exact resume, per-sample mixing, padded vocabularies and numerical guard rails, on tiny models."""

import math

import pytest
import torch
from transformers import TrainerCallback

from speckd_trl import SpecKDTrainer
from speckd_trl.batches import KIND_KEY, MIXED, OFF_POLICY, ON_POLICY, ROW_ON_POLICY_KEY, on_policy_rows
from speckd_trl.losses import weighted_generalized_jsd
from speckd_trl.tools.testing import make_model, make_tokenizer, make_trainer


def build(output_dir, **overrides) -> SpecKDTrainer:
    defaults = dict(per_device_train_batch_size=2, max_new_tokens=6, learning_rate=5e-3)
    return make_trainer(output_dir, **{**defaults, **overrides})


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def train_logs(trainer, **kwargs):
    trainer.train(**kwargs)
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


# ------------------------------------------------------------------ resume


@pytest.mark.parametrize(
    "mixing, logging_steps, stop",
    [("batch", 1, 3), ("sample", 1, 3), ("batch", 2, 3)],
)
def test_resume_matches_the_uninterrupted_run(tmp_path, mixing, logging_steps, stop):
    """Stop at step `stop`, resume from its checkpoint: the same loss and gate metrics at every logged step.

    lmbda=0.5 and gate="spec" so that both the batch-kind draw and the gate's generator matter. With
    logging_steps=2 the checkpoint falls inside a logging window: the gate counts of step 3 come back from the
    checkpoint, but the Trainer itself does not save its running loss, so the loss of the first log after resuming
    (step 4) covers step 4 only and is not compared.
    """
    config = dict(
        lmbda=0.5, gate="spec", mixing=mixing, max_steps=6, logging_steps=logging_steps, gate_proposal="sample"
    )
    reference = train_logs(build(tmp_path / "full", **config))

    first = build(tmp_path / "cut", save_strategy="steps", save_steps=stop, callbacks=[StopAt(stop)], **config)
    train_logs(first)
    assert first.state.global_step == stop
    resumed = train_logs(
        build(tmp_path / "cut", **config), resume_from_checkpoint=str(tmp_path / f"cut/checkpoint-{stop}")
    )

    assert sorted(resumed) == sorted(reference)
    straddling = {step for step in reference if step > stop and step - logging_steps < stop}
    for step, expected in reference.items():
        got = resumed[step]
        keys = [k for k in expected if k.startswith(("gate/", "reward/"))]
        assert keys and sorted(keys) == sorted(k for k in got if k.startswith(("gate/", "reward/")))
        if step not in straddling:
            keys.append("loss")
        for key in keys:
            assert got[key] == pytest.approx(expected[key], abs=1e-5), (step, key)


def test_resume_restores_the_batch_kind_draw(tmp_path):
    trainer = build(tmp_path, lmbda=0.5, save_strategy="steps", save_steps=2, max_steps=2)
    trainer.train()
    expected = [trainer._batch_kinds.rng.random() for _ in range(5)]
    resumed = build(tmp_path, lmbda=0.5, max_steps=2)
    resumed._resume_checkpoint = str(tmp_path / "checkpoint-2")
    resumed._load_rng_state(resumed._resume_checkpoint)
    assert [resumed._batch_kinds.rng.random() for _ in range(5)] == expected


# ------------------------------------------------------------------ per-sample mixing


@pytest.mark.parametrize(
    "lmbda, batch_size, expected", [(0.25, 8, 2), (0.5, 3, 2), (0.1, 4, 0), (0.125, 4, 1), (1.0, 5, 5), (0.0, 5, 0)]
)
def test_on_policy_rows_round_half_up(lmbda, batch_size, expected):
    assert on_policy_rows(lmbda, batch_size) == expected


def test_per_sample_mixing_generates_a_quarter_of_the_rows(tmp_path):
    trainer = build(tmp_path, lmbda=0.25, mixing="sample", per_device_train_batch_size=8, gate="topk", gate_top_k=5)
    dataset = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    for _ in range(3):
        batch = trainer._make_completions(dataset)
        assert batch[KIND_KEY] == MIXED
        on = batch[ROW_ON_POLICY_KEY]
        assert on.dtype == torch.bool and int(on.sum()) == 2
        width = dataset["input_ids"].size(1)
        # off-policy rows keep the dataset's tokens (then right padding); on-policy rows keep the prompt only
        assert torch.equal(batch["input_ids"][~on, :width], dataset["input_ids"][~on])
        assert torch.equal(batch["labels"][~on, :width], dataset["labels"][~on])
        assert (batch["labels"][~on, width:] == -100).all()
        prompt_len = dataset["prompts"].size(1)
        assert torch.equal(batch["input_ids"][on, :prompt_len], dataset["prompts"][on])

    # the mixed batch's loss is the sum of its two halves' losses under the window's token count
    n_tokens = (batch["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        mixed = trainer.compute_loss(trainer.model, batch, num_items_in_batch=n_tokens)
        halves = 0.0
        for rows, kind in ((on, ON_POLICY), (~on, OFF_POLICY)):
            part = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "labels")}
            halves += trainer.compute_loss(trainer.model, {**part, KIND_KEY: kind}, num_items_in_batch=n_tokens)
    assert mixed.item() == pytest.approx(float(halves), rel=1e-5, abs=1e-7)


def test_per_sample_mixing_trains_and_logs_both_kinds(tmp_path):
    trainer = build(tmp_path, lmbda=0.5, mixing="sample", gate="spec", max_steps=2, logging_steps=1)
    logs = train_logs(trainer)
    for entry in logs.values():
        assert math.isfinite(entry["loss"])
        assert "gate/acceptance_rate_on_policy" in entry and "gate/acceptance_rate_off_policy" in entry


# ------------------------------------------------------------------ padded vocabularies (Qwen)


def padded_teacher(tokenizer, size=128):
    """The seed-1 teacher with its embedding and head padded to `size` rows (random extra rows, large logits)."""
    small, big = make_model(1, tokenizer), make_model(1, tokenizer, vocab_size=size)
    state = {k: v for k, v in small.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    big.load_state_dict(state, strict=False)
    n = small.config.vocab_size
    with torch.no_grad():
        big.model.embed_tokens.weight[:n] = small.model.embed_tokens.weight
        big.lm_head.weight[:n] = small.lm_head.weight
        big.lm_head.weight[n:] = 5.0  # padding rows that would dominate the softmax if they were compared
    return small, big


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
def test_padded_teacher_gives_the_loss_of_the_unpadded_one(tmp_path, loss_path):
    tokenizer = make_tokenizer()
    small, big = padded_teacher(tokenizer)
    losses = []
    for teacher in (small, big):
        trainer = build(tmp_path, teacher=teacher, loss_path=loss_path, gate="topk", gate_top_k=10)
        batch = {**trainer.data_collator([trainer.train_dataset[i] for i in range(4)]), KIND_KEY: OFF_POLICY}
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, batch).item())
    assert trainer._shared_vocab == len(tokenizer)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.parametrize("generation", ["student", "speculative"])
def test_padded_teacher_trains_on_policy(tmp_path, generation):
    tokenizer = make_tokenizer()
    _, big = padded_teacher(tokenizer)
    trainer = build(tmp_path, teacher=big, lmbda=1.0, gate="spec", on_policy_generation=generation, max_steps=2)
    logs = train_logs(trainer)
    assert all(math.isfinite(entry["loss"]) for entry in logs.values())


# ------------------------------------------------------------------ numerical guard rails


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
@pytest.mark.parametrize("gate", ["spec", "topk"])
def test_all_masked_batch_gives_zero_loss_and_gradient(tmp_path, loss_path, gate):
    trainer = build(tmp_path, loss_path=loss_path, gate=gate)
    batch = {**trainer.data_collator([trainer.train_dataset[i] for i in range(2)]), KIND_KEY: OFF_POLICY}
    batch["labels"] = torch.full_like(batch["labels"], -100)  # no completion token at all
    for normalize in ("tokens", "accepted"):
        trainer.args.gate_normalize = normalize
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=0)
        loss.backward()
        assert torch.isfinite(loss) and loss.item() == 0.0
        assert all(torch.count_nonzero(p.grad) == 0 for p in trainer.model.parameters() if p.grad is not None)


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
def test_all_rejected_batch_gives_zero_loss(tmp_path, loss_path):
    trainer = build(tmp_path, loss_path=loss_path, gate="topk", gate_top_k=1, reject_weight=0.0)
    batch = {**trainer.data_collator([trainer.train_dataset[i] for i in range(2)]), KIND_KEY: OFF_POLICY}
    with torch.no_grad():
        trainer.teacher_model.lm_head.weight.zero_()  # top-1 is always id 0 (<pad>), never the student's argmax
    for normalize in ("tokens", "accepted"):
        trainer.args.gate_normalize = normalize
        loss = trainer.compute_loss(trainer.model, batch)
        assert torch.isfinite(loss) and loss.item() == 0.0


@pytest.mark.parametrize("temperature", [1e-4, 1.0, 100.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_jsd_is_finite_for_half_precision_logits_and_extreme_temperatures(temperature, beta, dtype):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 96, generator=generator) * 30
    teacher = torch.randn(2, 3, 96, generator=generator) * 30
    weights = torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 0.0]])
    reference = weighted_generalized_jsd(student, teacher, weights, beta=beta, temperature=temperature)
    half = weighted_generalized_jsd(student.to(dtype), teacher.to(dtype), weights, beta=beta, temperature=temperature)
    half = half.float()
    assert torch.isfinite(reference).all() and torch.isfinite(half).all()
    assert (half[:, 2] == 0).all()
    # both are computed in float32 (in bfloat16, as GKD does, temperature 100 with beta 0.5 is off by 30%)
    assert torch.allclose(half, reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
def test_teacher_with_non_finite_outputs_stops_training_naming_the_step(tmp_path, loss_path):
    tokenizer = make_tokenizer()
    teacher = make_model(1, tokenizer)
    with torch.no_grad():
        teacher.model.norm.weight.fill_(float("nan"))  # NaN hidden states and logits
    trainer = build(tmp_path, teacher=teacher, loss_path=loss_path, max_steps=2)
    with pytest.raises(RuntimeError, match=r"non-finite outputs \(NaN or inf\) at training step 1 \(global_step=0\)"):
        trainer.train()


def test_per_sample_mixing_with_the_reward_term(tmp_path):
    """The REINFORCE term (`reward_coef`) applies to the on-policy rows of a mixed batch only."""
    trainer = build(
        tmp_path, lmbda=0.5, mixing="sample", per_device_train_batch_size=4, reward_coef=0.5, gate_top_k=30
    )
    dataset = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    batch = trainer._make_completions(dataset)
    assert batch[KIND_KEY] == MIXED
    with torch.no_grad():
        with_reward = trainer.compute_loss(trainer.model, batch).item()
        trainer.args.reward_coef = 0.0
        without = trainer.compute_loss(trainer.model, batch).item()
    assert math.isfinite(with_reward) and with_reward != without


def test_an_ungated_proposal_mode_draws_nothing(tmp_path):
    """gate_on="on_policy" gates no dataset row, so gate_proposal cannot matter; with "sample" nothing may be drawn
    from torch's global generator either (it would shift every later draw of the run: sampling, dropout)."""
    runs = []
    for proposal in ("greedy", "sample"):
        trainer = build(
            tmp_path / proposal,
            lmbda=0.5,
            mixing="sample",
            gate_on="on_policy",
            gate_proposal=proposal,
            max_steps=3,
            logging_steps=1,
        )
        runs.append(train_logs(trainer))
    assert runs[0].keys() == runs[1].keys() == {1, 2, 3}
    for step, entry in runs[0].items():
        assert runs[1][step]["loss"] == entry["loss"]
        assert runs[1][step]["gate/acceptance_rate"] == entry["gate/acceptance_rate"]
