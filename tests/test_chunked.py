"""The chunked loss path against the eager one: same loss, same gradients, same gate decisions."""

import contextlib
import dataclasses
import io
import pathlib

import pytest
import torch
from peft import LoraConfig

from speckd_trl import PlanConfig, SpecKDConfig
from speckd_trl.batches import OFF_POLICY, ON_POLICY
from speckd_trl.chunked import ChunkOutput, chunked_linear_loss
from speckd_trl.cli import main
from speckd_trl.losses import chunked_weighted_jsd, weighted_generalized_jsd
from speckd_trl.models import OutputHead
from speckd_trl.tools.testing import (
    collated_batch,
    loss_gradients_and_window,
    make_dataset,
    make_model,
    make_tokenizer,
)
from speckd_trl.trainer import SpecKDTrainer


def make_args(tmp_path, **overrides) -> SpecKDConfig:
    kwargs = dict(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", save_strategy="no")
    kwargs.update(per_device_train_batch_size=4, max_new_tokens=6, seed=0)
    return SpecKDConfig(**{**kwargs, **overrides})


# ----------------------------------------------------------------------------- the pure function


def _eager_reference(h_s, head_s, h_t, head_t, weights, beta, temperature):
    student_logits = head_s.transform(head_s.project(h_s))
    teacher_logits = head_t.transform(head_t.project(h_t))
    return weighted_generalized_jsd(student_logits, teacher_logits, weights, beta=beta, temperature=temperature).sum()


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
@pytest.mark.parametrize("head_kind", ["plain", "bias_scale_softcap"])
def test_chunked_matches_eager_loss_and_gradients(beta, chunk_size, head_kind):
    torch.manual_seed(0)
    n, h_s_dim, h_t_dim, vocab = 37, 16, 24, 50
    h_s = torch.randn(n, h_s_dim, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(n, h_t_dim, dtype=torch.float64)
    w_s = torch.randn(vocab, h_s_dim, dtype=torch.float64, requires_grad=True)
    w_t = torch.randn(vocab, h_t_dim, dtype=torch.float64)
    extra = {}
    if head_kind != "plain":
        extra = dict(logit_scale=0.7, softcap=3.0)
    b_s = torch.randn(vocab, dtype=torch.float64, requires_grad=True) if extra else None
    head_s = OutputHead(w_s, b_s, **extra)
    head_t = OutputHead(w_t, torch.randn(vocab, dtype=torch.float64) if extra else None, **extra)
    weights = torch.rand(n, dtype=torch.float64) * (torch.rand(n) > 0.3)
    seen = []

    def weight_fn(student_logits, teacher_logits, rows):
        seen.append((rows, student_logits.shape, teacher_logits.shape))
        assert not student_logits.requires_grad
        return weights[rows]

    # the chunked path computes in float32: compare with a float64 reference to float32 precision
    loss, returned = chunked_weighted_jsd(
        h_s.float(), OutputHead(w_s.float(), None if b_s is None else b_s.float(), **extra),
        h_t.float(), OutputHead(w_t.float(), None if head_t.bias is None else head_t.bias.float(), **extra),
        lambda s, t, rows: weight_fn(s, t, rows).float(), beta=beta, temperature=0.8, chunk_size=chunk_size,
    )  # fmt: skip
    reference = _eager_reference(h_s, head_s, h_t, head_t, weights, beta, 0.8)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(returned.double(), weights, atol=1e-7)
    assert all(shape[0] <= chunk_size for _, shape, _ in seen) and sum(s[0] for _, s, _ in seen) == n

    params = [h_s, w_s] + ([b_s] if b_s is not None else [])
    expected = torch.autograd.grad(reference * 1.7, params)
    h32, w32 = h_s.detach().float().requires_grad_(), w_s.detach().float().requires_grad_()
    b32 = None if b_s is None else b_s.detach().float().requires_grad_()
    loss32, _ = chunked_weighted_jsd(
        h32, OutputHead(w32, b32, **extra),
        h_t.float(), OutputHead(w_t.float(), None if head_t.bias is None else head_t.bias.float(), **extra),
        lambda s, t, rows: weights[rows].float(), beta=beta, temperature=0.8, chunk_size=chunk_size,
    )  # fmt: skip
    got = torch.autograd.grad(loss32 * 1.7, [h32, w32] + ([b32] if b32 is not None else []))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-3, atol=1e-5)  # float32 vs float64


def test_chunked_under_no_grad_computes_no_gradient(monkeypatch):
    """Evaluation runs the loss under `torch.no_grad()`: the same value, and no gradient work (no autograd.grad call,
    no float32 `[N, H]` / `[V, H]` buffers), although the inputs still require grad."""
    torch.manual_seed(0)
    h_s = torch.randn(9, 8, requires_grad=True)
    head_s = OutputHead(weight=torch.randn(20, 8, requires_grad=True))
    h_t, head_t = torch.randn(9, 12), OutputHead(weight=torch.randn(20, 12))

    def weight_fn(student_log_probs, teacher_log_probs, rows):
        return torch.ones(student_log_probs.size(0))

    expected, _ = chunked_weighted_jsd(h_s, head_s, h_t, head_t, weight_fn, beta=0.5, chunk_size=4)

    def no_grad_allowed(*args, **kwargs):
        raise AssertionError("a gradient was computed under torch.no_grad()")

    monkeypatch.setattr(torch.autograd, "grad", no_grad_allowed)
    with torch.no_grad():
        total, weights = chunked_weighted_jsd(h_s, head_s, h_t, head_t, weight_fn, beta=0.5, chunk_size=4)
    assert not total.requires_grad
    torch.testing.assert_close(total, expected.detach())
    torch.testing.assert_close(weights, torch.ones(9))


def test_chunked_needs_same_vocabulary():
    head = OutputHead(torch.randn(10, 4))
    with pytest.raises(ValueError, match="same vocabulary"):
        chunked_weighted_jsd(
            torch.randn(3, 4), head, torch.randn(3, 4), OutputHead(torch.randn(11, 4)), lambda s, t, r: 1, beta=0.5
        )


def test_chunked_with_nothing_to_train_on_is_zero():
    head = OutputHead(torch.randn(10, 4, requires_grad=True))
    hidden = torch.randn(0, 4, requires_grad=True)
    loss, weights = chunked_weighted_jsd(hidden, head, torch.randn(0, 4), head, lambda s, t, r: s[:, 0], beta=0.5)
    loss.backward()
    assert loss.item() == 0 and weights.numel() == 0 and torch.all(head.weight.grad == 0)


@pytest.mark.parametrize("head_kind", ["plain", "bias_scale_softcap"])
def test_chunk_loop_takes_any_per_chunk_loss(head_kind):
    """The chunk loop (`chunked.chunked_linear_loss`) knows nothing of the divergence: with a per-chunk cross-entropy
    and its closed-form gradient, its loss and gradients equal autograd through the full logits."""
    torch.manual_seed(0)
    n, hidden_size, vocab = 23, 8, 30
    extra = {} if head_kind == "plain" else dict(logit_scale=0.7, softcap=3.0)
    hidden = torch.randn(n, hidden_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(vocab, dtype=torch.float64, requires_grad=True) if extra else None
    head = OutputHead(weight, bias, **extra)
    labels = torch.randint(vocab, (n,))

    def cross_entropy(logits, rows, *, grad):
        log_probs = torch.log_softmax(logits, dim=-1)
        loss = -log_probs.gather(-1, labels[rows, None]).squeeze(-1)
        gradient = log_probs.exp() - torch.nn.functional.one_hot(labels[rows], vocab) if grad else None
        return ChunkOutput(loss, gradient, labels[rows])

    total, values = chunked_linear_loss(hidden, head, cross_entropy, chunk_size=5)
    params = [hidden, weight] + ([bias] if bias is not None else [])
    got = torch.autograd.grad(total * 0.5, params)
    reference = torch.nn.functional.cross_entropy(head.transform(head.project(hidden)), labels, reduction="sum")
    expected = torch.autograd.grad(reference * 0.5, params)
    assert total.item() == pytest.approx(reference.item(), rel=1e-6) and torch.equal(values, labels)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-7)  # (accumulated in float32)


# ----------------------------------------------------------------------------- the trainer


def _trainer(tmp_path, loss_path, peft=False, **overrides):
    tokenizer = make_tokenizer()
    student = make_model(0, tokenizer, tie_word_embeddings=not peft)
    return SpecKDTrainer(
        model=student,
        teacher_model=make_model(1, tokenizer),
        args=make_args(tmp_path / loss_path, loss_path=loss_path, loss_chunk_size=5, **overrides),
        train_dataset=make_dataset(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0) if peft else None,
    )


@pytest.mark.parametrize(
    "gate",
    [
        {"gate": "none"},
        {"gate": "topk", "gate_top_k": 3, "reject_weight": 0.2},
        {"gate": "topk", "gate_top_k": 2, "gate_proposal": "sample"},
        {"gate": "spec", "reject_weight": 0.1},
        {"gate": "spec", "gate_proposal": "sample", "gate_normalize": "accepted"},
    ],
    ids=["none", "topk", "topk-sample", "spec", "spec-sample-accepted"],
)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("kind", [OFF_POLICY, ON_POLICY])
def test_trainer_chunked_equals_eager(tmp_path, gate, beta, kind):
    results = {}
    for loss_path in ("eager", "chunked"):
        trainer = _trainer(tmp_path, loss_path, beta=beta, temperature=0.7, **gate)
        results[loss_path] = loss_gradients_and_window(trainer, collated_batch(trainer, kind))
    (loss_e, grads_e, window_e), (loss_c, grads_c, window_c) = results["eager"], results["chunked"]
    assert loss_c.item() == pytest.approx(loss_e.item(), rel=1e-5, abs=1e-7)
    assert window_c == window_e  # same accept decisions, counted the same way
    assert grads_c.keys() == grads_e.keys() and "model.embed_tokens.weight" in grads_c  # tied to the head
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_chunked_equals_eager_with_lora(tmp_path):
    results = {}
    for loss_path in ("eager", "chunked"):
        trainer = _trainer(tmp_path, loss_path, peft=True, gate="topk", gate_top_k=3, beta=0.5)
        results[loss_path] = loss_gradients_and_window(trainer, collated_batch(trainer, OFF_POLICY))
    assert results["chunked"][0].item() == pytest.approx(results["eager"][0].item(), rel=1e-5)
    for name, grad in results["eager"][1].items():
        torch.testing.assert_close(results["chunked"][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_trains_end_to_end(tmp_path):
    trainer = _trainer(tmp_path, "chunked", gate="spec", lmbda=0.5, max_steps=3, logging_steps=1)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert all("gate/acceptance_rate" in entry for entry in logs)


def test_chunked_refuses_a_lora_head(tmp_path):
    tokenizer = make_tokenizer()
    trainer = SpecKDTrainer(
        model=make_model(0, tokenizer),
        teacher_model=make_model(1, tokenizer),
        args=make_args(tmp_path, loss_path="chunked"),
        train_dataset=make_dataset(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    )
    with pytest.raises(ValueError, match="not a plain nn.Linear.*loss_path='eager'"):
        trainer.compute_loss(trainer.model, collated_batch(trainer, OFF_POLICY))


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_bad_chunk_size(tmp_path, value):
    with pytest.raises(ValueError, match=f"loss_chunk_size={value!r}"):
        SpecKDConfig(output_dir=str(tmp_path), use_cpu=True, loss_chunk_size=value)


def test_bad_loss_path(tmp_path):
    with pytest.raises(ValueError, match="loss_path='fused'.*eager, chunked"):
        SpecKDConfig(output_dir=str(tmp_path), use_cpu=True, loss_path="fused")


def test_chunked_is_the_default_of_the_config_the_planner_and_the_cli(tmp_path):
    """Issue 16: the fast path by default, the same in `SpecKDConfig`, `PlanConfig` and `speckd-trl plan`."""
    assert SpecKDConfig(output_dir=str(tmp_path)).loss_path == "chunked"
    assert {f.name: f.default for f in dataclasses.fields(PlanConfig)}["loss_path"] == "chunked"
    config = str(pathlib.Path(__file__).resolve().parents[1] / "examples" / "configs" / "llama3.2-1b.json")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", "--teacher", config, "--student", config]) == 0
    assert "loss path chunked" in out.getvalue()
