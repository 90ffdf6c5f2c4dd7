"""The binary-reward view: the REINFORCE term on the teacher's accept bit, and the scheduled gate."""

import pytest
import torch
from trl.experimental.gkd import GKDTrainer

from speckd_trl import SpecKDConfig, SpecKDTrainer
from speckd_trl.batches import KIND_KEY, OFF_POLICY, ON_POLICY
from speckd_trl.losses import policy_gradient_loss
from speckd_trl.rules import accept_mask
from speckd_trl.tools.testing import TINY_ARGS
from speckd_trl.tools.testing import make_trainer as tiny_trainer


DEFAULTS = dict(per_device_train_batch_size=4, max_new_tokens=6)


def make_args(tmp_path, **overrides) -> SpecKDConfig:
    return SpecKDConfig(**{**TINY_ARGS, "output_dir": str(tmp_path), **DEFAULTS, **overrides})


def make_trainer(tmp_path, **overrides) -> SpecKDTrainer:
    return tiny_trainer(tmp_path, **{**DEFAULTS, **overrides})


def on_policy_batch(trainer):
    """A dataset batch marked on-policy: its completion tokens play the student's samples."""
    ds = trainer.train_dataset
    return {**trainer.data_collator([ds[i] for i in range(4)]), KIND_KEY: ON_POLICY}


def grads_of(trainer, batch, n_items):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=n_items)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]


def test_policy_gradient_loss_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -1.5]], requires_grad=True)
    rewards = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss = policy_gradient_loss(logprobs, rewards, mask, denominator=7.0)
    b = 3 / 5  # mean reward over the 5 masked positions
    expected = -sum((rewards[i, j] - b) * logprobs[i, j] for i in range(2) for j in range(3) if mask[i, j]) / 7.0
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert logprobs.grad[0, 2] == 0
    assert logprobs.grad[0, 0].item() == pytest.approx(-(1 - b) / 7)


def test_policy_gradient_loss_is_zero_when_all_rewards_agree():
    logprobs = torch.randn(2, 3, requires_grad=True)
    loss = policy_gradient_loss(logprobs, torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), denominator=6)
    assert loss.item() == 0


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
@pytest.mark.parametrize("gate", ["topk", "spec"])
def test_reward_term_gradient_matches_a_by_hand_formula(tmp_path, loss_path, gate):
    """kd_coef=0: the loss is exactly -c * sum (r - b) log q_tau(x) / N, r the trainer's own accept bits."""
    coef, temperature = 0.7, 0.8
    trainer = make_trainer(
        tmp_path, gate=gate, gate_top_k=20, kd_coef=0.0, reward_coef=coef, temperature=temperature, loss_path=loss_path
    )
    batch = on_policy_batch(trainer)
    n_items = torch.tensor(11)
    trainer._gate.generator.manual_seed(5)
    loss, grads = grads_of(trainer, batch, n_items)

    # by hand, with the same u_t for the spec gate
    trainer._gate.generator.manual_seed(5)
    labels = batch["labels"][:, 1:]
    gated = labels != -100
    u = torch.rand(gated.shape, generator=trainer._gate.generator) if gate == "spec" else None
    trainer.model.zero_grad()
    logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        teacher = trainer.teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    x = labels.clamp(min=0)
    r = accept_mask(logits.detach() / temperature, teacher[:, :-1], x, gated, gate=gate, top_k=20, uniforms=u)
    assert 0 < r[gated].float().mean() < 1  # both rewards occur: the term is not trivially 0
    logq = torch.log_softmax(logits / temperature, dim=-1).gather(-1, x[..., None]).squeeze(-1)
    b = r[gated].float().mean()
    expected = -coef * ((r.float() - b) * logq)[gated].sum() / 11
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    for got, p in zip(grads, trainer.model.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)


def test_reward_coef_zero_leaves_the_loss_unchanged(tmp_path):
    results = []
    for overrides in ({}, {"reward_coef": 0.0, "kd_coef": 1.0}):
        trainer = make_trainer(tmp_path, gate="topk", gate_top_k=10, **overrides)
        results.append(grads_of(trainer, on_policy_batch(trainer), torch.tensor(9)))
    assert results[0][0].item() == results[1][0].item()
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_reward_term_only_on_on_policy_batches(tmp_path):
    plain = make_trainer(tmp_path, gate="topk", gate_top_k=10)
    rewarded = make_trainer(tmp_path, gate="topk", gate_top_k=10, reward_coef=2.0)
    batch = {**on_policy_batch(plain), KIND_KEY: OFF_POLICY}
    assert grads_of(plain, batch, 9)[0].item() == grads_of(rewarded, batch, 9)[0].item()


def test_pure_policy_gradient_trains(tmp_path):
    trainer = make_trainer(tmp_path, kd_coef=0.0, reward_coef=1.0, lmbda=1.0, max_steps=2, logging_steps=1)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all("reward/mean" in e for e in logs)


# ----------------------------------------------------------------------------- schedules


@torch.no_grad()
def scheduled_loss_by_hand(trainer, batch, num_items, top_k, reject_weight):
    """The step's loss from docs/concepts.md with this `top_k` and `reject_weight` (`topk` gate, greedy proposals on
    dataset batches, the sampled token on on-policy ones, `gate_normalize="tokens"`), TRL's divergence."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    student = trainer.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    teacher = trainer.teacher_model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    completion = labels != -100
    proposals = labels.clamp(min=0) if batch[KIND_KEY] == ON_POLICY else student.argmax(-1)
    accepted = (teacher.topk(top_k).indices == proposals[..., None]).any(-1)
    weights = torch.where(accepted, 1.0, reject_weight) * completion
    divergence = GKDTrainer.generalized_jsd_loss(student, teacher, beta=trainer.beta, reduction="none").sum(-1)
    return ((weights * divergence).sum() / num_items).item()


def test_linear_top_k_schedule_is_logged_every_step(tmp_path):
    """The values in force are logged each step, and the step's loss is the loss with those values (recomputed by
    hand on the step's own batch and weights), not with another step's."""
    steps = 5
    top_ks, reject_weights = [40, 31, 21, 12, 2], [0.5, 0.375, 0.25, 0.125, 0.0]  # 40 - 38 * s / 4, rounded half up
    with pytest.warns(UserWarning, match="reject weight of 0"):  # the schedule ends at 0
        trainer = make_trainer(
            tmp_path,
            gate="topk",
            gate_proposal="greedy",
            gate_normalize="tokens",
            beta=0.5,
            gate_top_k_schedule="linear",
            gate_top_k_start=40,
            gate_top_k_end=2,
            reject_weight_schedule="linear",
            reject_weight_start=0.5,
            reject_weight_end=0.0,
            lmbda=0.5,
            max_steps=steps,
            logging_steps=1,
        )
    seen, compute_loss = [], trainer.compute_loss

    def checked(model, inputs, return_outputs=False, num_items_in_batch=None):
        # before the step's update: the weights the loss is taken at
        by_hand = [
            scheduled_loss_by_hand(trainer, inputs, num_items_in_batch, *v) for v in zip(top_ks, reject_weights)
        ]
        loss = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        value = (loss[0] if return_outputs else loss).item()
        seen.append((trainer.state.global_step, inputs[KIND_KEY], value, by_hand))
        return loss

    trainer.compute_loss = checked
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["gate/top_k"] for e in logs] == top_ks
    assert [e["gate/reject_weight"] for e in logs] == pytest.approx(reject_weights)

    assert [step for step, *_ in seen] == list(range(steps))
    assert {kind for _, kind, *_ in seen} == {ON_POLICY, OFF_POLICY}  # lmbda=0.5: both kinds of batch occur
    for step, kind, loss, by_hand in seen:
        assert loss == pytest.approx(by_hand[step], rel=1e-5, abs=1e-7), (step, kind)
        # the check has power: with any other step's values this batch's loss is another one
        for other, value in enumerate(by_hand):
            if other != step:
                assert value != pytest.approx(by_hand[step], rel=1e-3), (step, other, kind)


def test_schedule_values():
    args = SpecKDConfig(
        output_dir="unused", use_cpu=True, gate_top_k_schedule="linear", gate_top_k_start=1, gate_top_k_end=9
    )
    assert [args.gate_top_k_at(s, 5) for s in range(6)] == [1, 3, 5, 7, 9, 9]
    assert args.gate_top_k_at(0, 0) == 1  # outside training: the start value
    assert SpecKDConfig(output_dir="unused", use_cpu=True, gate_top_k=7).gate_top_k_at(3, 10) == 7


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"gate_top_k_schedule": "linear", "gate_top_k_start": 5}, "gate_top_k_end is not set"),
        ({"gate_top_k_start": 5}, "gate_top_k_start=5 is set but gate_top_k_schedule='constant'"),
        ({"gate_top_k_schedule": "cosine"}, "gate_top_k_schedule='cosine'"),
        (
            {"gate_top_k_schedule": "linear", "gate_top_k_start": 0, "gate_top_k_end": 3},
            "gate_top_k_start=0 is not valid",
        ),
        (
            {"reject_weight_schedule": "linear", "reject_weight_start": 0.1, "reject_weight_end": 1.5},
            "reject_weight_end=1.5 is out of range",
        ),
        ({"reward_coef": -1.0}, "reward_coef=-1.0 is out of range"),
        ({"kd_coef": 0.0}, "kd_coef=0 and reward_coef=0 leave nothing to train on"),
    ],
)
def test_bad_schedule_or_coefficients(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SpecKDConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)
