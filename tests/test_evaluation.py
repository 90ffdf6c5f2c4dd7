"""Evaluation: `eval_dataset` (one dataset or a dict of them), its loss against GKD's and a by-hand value,
evaluation during training, and the gate's random draws (evaluation has a stream of its own, re-seeded by every
`evaluate()`, so it neither moves the training draws nor changes between calls)."""

import math

import pytest
import torch
from trl.experimental.gkd import GKDTrainer

from speckd_trl import SpecKDConfig, SpecKDTrainer
from speckd_trl.tools.testing import make_dataset, make_model, make_tokenizer


EVAL_ROWS = 4  # one evaluation batch: `eval_loss` is that batch's loss


def make_trainer(tmp_path, eval_dataset="default", **overrides) -> SpecKDTrainer:
    kwargs = dict(
        output_dir=str(tmp_path),
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        seed=0,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=EVAL_ROWS,
        prediction_loss_only=True,
        max_new_tokens=6,
        beta=0.5,
        gate_proposal="greedy",
        gate_normalize="tokens",
    )
    tokenizer = make_tokenizer()
    return SpecKDTrainer(
        model=make_model(0, tokenizer),
        teacher_model=make_model(1, tokenizer),
        args=SpecKDConfig(**{**kwargs, **overrides}),
        train_dataset=make_dataset(16, seed=0),
        eval_dataset=make_dataset(EVAL_ROWS, seed=1) if eval_dataset == "default" else eval_dataset,
        processing_class=tokenizer,
    )


def eval_batch(trainer, name=None):
    """The (single) batch the trainer evaluates on, from its own evaluation data loader."""
    batches = list(trainer.get_eval_dataloader(name))
    assert len(batches) == 1
    return batches[0]


@torch.no_grad()
def loss_by_hand(trainer, batch, gate):
    """`gate="none"`: TRL's GKD loss of the batch (mean over completion tokens). `gate="topk"`: docs/concepts.md's
    ``sum_t w_t D_t / N`` with the student's greedy proposal accepted iff in the teacher's top-k."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    student = trainer.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    teacher = trainer.teacher_model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    if gate == "none":
        return GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=trainer.beta).item()
    completion = labels != -100
    accepted = (teacher.topk(trainer.args.gate_top_k).indices == student.argmax(-1, keepdim=True)).any(-1)
    assert 0 < accepted[completion].float().mean() < 1  # the gate decides something here
    weights = torch.where(accepted, 1.0, trainer.args.reject_weight) * completion
    divergence = GKDTrainer.generalized_jsd_loss(student, teacher, beta=trainer.beta, reduction="none").sum(-1)
    return ((weights * divergence).sum() / completion.sum()).item()


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
@pytest.mark.parametrize("prediction_loss_only", [True, False])
@pytest.mark.parametrize("gate", ["none", "topk"])
def test_eval_loss_of_one_dataset(tmp_path, gate, prediction_loss_only, loss_path):
    trainer = make_trainer(
        tmp_path,
        gate=gate,
        gate_top_k=30,
        reject_weight=0.25,
        loss_path=loss_path,
        prediction_loss_only=prediction_loss_only,
    )
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
    expected = loss_by_hand(trainer, eval_batch(trainer), gate)
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert not any(key.startswith("gate/") for key in metrics)
    assert all(p.grad is None for p in trainer.model.parameters())  # evaluation leaves no gradients behind


def test_eval_loss_of_a_dict_of_datasets(tmp_path):
    datasets = {"sums": make_dataset(EVAL_ROWS, seed=1), "other": make_dataset(EVAL_ROWS - 1, seed=2)}
    trainer = make_trainer(tmp_path, eval_dataset=datasets, gate="none")
    metrics = trainer.evaluate()
    for name in datasets:
        loss = metrics[f"eval_{name}_loss"]
        assert math.isfinite(loss) and loss > 0
        assert loss == pytest.approx(loss_by_hand(trainer, eval_batch(trainer, name), "none"), rel=1e-5)
    assert metrics["eval_sums_loss"] != metrics["eval_other_loss"]


def train_logs(tmp_path, **overrides):
    trainer = make_trainer(
        tmp_path, gate="spec", lmbda=0.0, max_steps=4, logging_steps=1, learning_rate=1e-3, **overrides
    )
    trainer.train()
    history = trainer.state.log_history
    train = [(e["step"], e["loss"], e["gate/acceptance_rate"]) for e in history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    return train, evals


def test_evaluation_during_training_leaves_the_training_run_unchanged(tmp_path):
    """`eval_strategy="steps"`: evaluations at steps 2 and 4, and the training losses and acceptance rates of every
    step are those of the same run without evaluation (the `spec` gate's draws are not moved by it)."""
    plain, no_evals = train_logs(tmp_path / "plain")
    train, evals = train_logs(tmp_path / "evaluated", eval_strategy="steps", eval_steps=2)
    assert no_evals == []
    assert [step for step, _ in evals] == [2, 4]
    assert all(math.isfinite(loss) and loss > 0 for _, loss in evals)
    assert evals[0][1] != evals[1][1]  # the model moved between the two
    assert [step for step, *_ in train] == [1, 2, 3, 4]
    assert train == plain


@pytest.mark.parametrize("gate,proposal", [("spec", "greedy"), ("spec", "sample"), ("topk", "sample")])
def test_evaluate_draws_from_its_own_stream(tmp_path, gate, proposal):
    """A random gate (`spec`, or sampled proposals): `evaluate()` leaves the training generator where it was, and
    evaluating the same model twice gives the same loss."""
    trainer = make_trainer(tmp_path, gate=gate, gate_proposal=proposal, gate_top_k=10)
    before = trainer._gate.generator.get_state().clone()
    first = trainer.evaluate()["eval_loss"]
    assert torch.equal(trainer._gate.generator.get_state(), before)
    second = trainer.evaluate()["eval_loss"]
    assert torch.equal(trainer._gate.generator.get_state(), before)
    assert second == first
    # the check has power: the loss does depend on the gate's draws (another seed, another loss)
    other_seed = make_trainer(tmp_path / "seed1", gate=gate, gate_proposal=proposal, gate_top_k=10, seed=1)
    other_seed.model.load_state_dict(trainer.model.state_dict())
    other_seed.teacher_model.load_state_dict(trainer.teacher_model.state_dict())
    assert other_seed.evaluate()["eval_loss"] != first


# ----------------------------------------------------------------------------- predictions


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
def test_predictions_are_the_students_logits_at_every_position(tmp_path, loss_path):
    """`compute_metrics` and `predict` get `[B, T, V]` logits, as from GKD, on both loss paths (the chunked path
    projects one position per model otherwise)."""
    seen = []

    def compute_metrics(prediction):
        seen.append((prediction.predictions.shape, prediction.label_ids.shape))
        return {"positions": float(prediction.predictions.shape[1])}

    trainer = make_trainer(tmp_path, loss_path=loss_path, prediction_loss_only=False, gate="topk")
    trainer.compute_metrics = compute_metrics
    batch = eval_batch(trainer)
    with torch.no_grad():
        expected = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    metrics = trainer.evaluate()
    assert seen == [(tuple(expected.shape), tuple(batch["labels"].shape))]
    assert metrics["eval_positions"] == expected.shape[1]
    output = trainer.predict(trainer.eval_dataset)
    torch.testing.assert_close(torch.as_tensor(output.predictions), expected, rtol=1e-5, atol=1e-6)
    assert output.metrics["test_loss"] == pytest.approx(metrics["eval_loss"])
