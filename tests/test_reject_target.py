"""Target filtering (`reject_target="top_k"`): a rejected position is distilled toward the teacher's top-k
renormalized; checked against loop references, on both loss paths, and its configuration errors."""

import math

import pytest
import torch

from speckd_trl import SpecKDConfig, SpecKDDistillationConfig
from speckd_trl.batches import OFF_POLICY, ON_POLICY
from speckd_trl.losses import top_k_log_probs
from speckd_trl.tools.testing import TINY_ARGS, collated_batch, loss_gradients_and_window, make_trainer


def top_k_reference(row: list[float], k: int) -> list[float]:
    """Probabilities of one distribution (given as log-probabilities) kept on the tokens at or above the k-th
    largest value, renormalized."""
    kth = sorted(row, reverse=True)[k - 1]
    kept = [math.exp(v) if v >= kth else 0.0 for v in row]
    return [v / sum(kept) for v in kept]


def test_top_k_log_probs_match_a_loop_reference():
    g = torch.Generator().manual_seed(1)
    log_p = torch.randn(5, 12, generator=g).mul(3).log_softmax(-1)
    log_p[0, 3] = log_p[0, 7] = log_p[0].max() + 0.5  # a tie at the top
    log_p[0] = log_p[0].log_softmax(-1)
    for k in (1, 2, 3, 12):
        got = top_k_log_probs(log_p, k).exp()
        for row, out in zip(log_p.tolist(), got):
            torch.testing.assert_close(out, torch.tensor(top_k_reference(row, k)), atol=1e-6, rtol=1e-5)
    assert (top_k_log_probs(log_p, 1).exp()[0] > 0).sum() == 2  # ties at the k-th value are kept
    assert torch.isfinite(top_k_log_probs(log_p, 1)).all()


def by_hand_loss(trainer, batch, kind: str, top_k: int, reject_weight: float) -> float:
    """sum_t w_t KL(target_t || q_t) / completion tokens (beta=0), the target filtered where the teacher rejects
    the proposal (the student's greedy token on dataset rows, the sampled token on on-policy rows)."""
    with torch.no_grad():
        ids, attention = batch["input_ids"], batch["attention_mask"]
        s_lp = trainer.model(input_ids=ids, attention_mask=attention).logits[:, :-1].double().log_softmax(-1)
        t_lp = trainer.teacher_model(input_ids=ids, attention_mask=attention).logits[:, :-1].double().log_softmax(-1)
    completion = batch["labels"][:, 1:] != -100
    total, rejected = 0.0, 0
    for b, t in completion.nonzero().tolist():
        s, teacher = s_lp[b, t], t_lp[b, t].tolist()
        proposal = ids[b, t + 1].item() if kind == ON_POLICY else int(s.argmax())
        top = sorted(range(len(teacher)), key=lambda v: (-teacher[v], v))[:top_k]
        p, w = [math.exp(v) for v in teacher], 1.0
        if proposal not in top:
            rejected += 1
            p, w = top_k_reference(teacher, top_k), reject_weight
        total += w * sum(p[v] * (math.log(p[v]) - s[v].item()) for v in range(len(p)) if p[v] > 0)
    assert 0 < rejected < completion.sum().item()
    return total / completion.sum().item()


@pytest.mark.parametrize("kind", [OFF_POLICY, ON_POLICY])
@pytest.mark.parametrize("reject_weight", [1.0, 0.25])
def test_both_loss_paths_match_the_by_hand_reference(tmp_path, kind, reject_weight):
    runs = {}
    for path in ("eager", "chunked"):
        trainer = make_trainer(tmp_path / path, gate="topk", gate_top_k=30, reject_target="top_k",
                               reject_weight=reject_weight, beta=0.0, loss_path=path)  # fmt: skip
        batch = collated_batch(trainer, kind)
        runs[path] = loss_gradients_and_window(trainer, batch, num_items_in_batch=int(batch["labels"].ne(-100).sum()))
    (loss_e, grads_e, window_e), (loss_c, grads_c, window_c) = runs["eager"], runs["chunked"]
    assert loss_c.item() == pytest.approx(loss_e.item(), rel=1e-5)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6)
    assert window_c == window_e
    assert loss_e.item() == pytest.approx(by_hand_loss(trainer, batch, kind, 30, reject_weight), rel=1e-4)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_the_filter_changes_the_loss_only_where_it_rejects(tmp_path, beta):
    """With every proposal in the teacher's top k nothing is filtered: the same loss as reject_target='teacher'."""
    losses = {}
    for target in ("teacher", "top_k"):
        for k in (3, 95):
            trainer = make_trainer(tmp_path / f"{target}{k}", gate_top_k=k, reject_target=target, beta=beta)
            losses[target, k] = loss_gradients_and_window(trainer, collated_batch(trainer, OFF_POLICY))[0].item()
    assert losses["top_k", 95] == pytest.approx(losses["teacher", 95], rel=1e-6)
    assert losses["top_k", 3] != pytest.approx(losses["teacher", 3], rel=1e-3)


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="reject_target='top_p' is not valid; allowed values are teacher, top_k"):
        SpecKDConfig(output_dir=str(tmp_path), **TINY_ARGS, reject_target="top_p")
    with pytest.raises(ValueError, match="gate='none' rejects nothing"):
        SpecKDConfig(output_dir=str(tmp_path), **TINY_ARGS, gate="none", reject_target="top_k")
    with pytest.raises(ValueError, match="supported by SpecKDTrainer only"):
        SpecKDDistillationConfig(output_dir=str(tmp_path), **TINY_ARGS, reject_target="top_k")
