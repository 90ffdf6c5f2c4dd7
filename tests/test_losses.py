"""`speckd_trl.losses` against a slow per-position reference of the generalized JSD."""

import math

import pytest
import torch

from speckd_trl.losses import normalize_loss, weighted_generalized_jsd


B, T, V = 2, 5, 9


def jsd_reference(s_logits, t_logits, beta, temperature):
    """D_beta(p, q) at one position, from the definitions (double precision, explicit sums)."""
    q = torch.softmax(s_logits.double() / temperature, -1).tolist()
    p = torch.softmax(t_logits.double() / temperature, -1).tolist()

    def kl(a, b):
        return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b) if ai > 0)

    if beta == 0:
        return kl(p, q)  # forward KL(teacher || student)
    if beta == 1:
        return kl(q, p)  # reverse KL(student || teacher)
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.2])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_weighted_jsd_matches_reference(beta, temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(B, T, V, generator=g) * 2
    teacher = torch.randn(B, T, V, generator=g) * 2
    weights = torch.rand(B, T, generator=g)
    weights[0, 1] = 0.0  # a masked position
    got = weighted_generalized_jsd(student, teacher, weights, beta=beta, temperature=temperature)
    assert got.shape == (B, T)
    for b in range(B):
        for t in range(T):
            expected = weights[b, t].item() * jsd_reference(student[b, t], teacher[b, t], beta, temperature)
            assert got[b, t].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert got[0, 1].item() == 0.0


def test_zero_weights_give_zero_loss_and_zero_gradient():
    student = torch.randn(B, T, V, requires_grad=True)
    teacher = torch.randn(B, T, V)
    weights = torch.zeros(B, T)
    completion = torch.ones(B, T, dtype=torch.bool)
    for normalize in ("tokens", "accepted"):
        student.grad = None
        weighted = weighted_generalized_jsd(student, teacher, weights, beta=0.5)
        loss = normalize_loss(weighted, weights, completion, normalize=normalize)
        loss.backward()
        assert torch.isfinite(loss) and loss.item() == 0.0
        assert torch.count_nonzero(student.grad) == 0


def test_normalize_tokens_and_accepted():
    weighted = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    weights = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    completion = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    assert normalize_loss(weighted, weights, completion, normalize="tokens").item() == pytest.approx(6 / 5)
    assert normalize_loss(weighted, weights, completion, num_items_in_batch=12).item() == pytest.approx(6 / 12)
    assert normalize_loss(weighted, weights, completion, normalize="accepted").item() == pytest.approx(6 / 3)
    # across a window of 10 completion tokens this micro-batch (5 tokens) counts for half
    got = normalize_loss(weighted, weights, completion, normalize="accepted", num_items_in_batch=torch.tensor(10))
    assert got.item() == pytest.approx(6 / 3 * 5 / 10)
    with pytest.raises(ValueError, match="normalize"):
        normalize_loss(weighted, weights, completion, normalize="mean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_divergence_is_gkd_bit_for_bit(dtype, beta, temperature):
    """TRL's divergence split at its log-softmax (so the gate can read it) gives TRL's values and gradients exactly."""
    from trl.experimental.gkd import GKDTrainer

    g = torch.Generator().manual_seed(0)
    student = (torch.randn(B, T, 64, generator=g) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(B, T, 64, generator=g) * 3).to(dtype)
    ones = torch.ones(B, T)
    ours = weighted_generalized_jsd(student, teacher, ones, beta=beta, temperature=temperature)
    trl = GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=temperature, reduction="none")
    trl = trl.sum(-1)
    assert ours.dtype == dtype and torch.equal(ours, trl)
    upstream = torch.randn(B, T, generator=g).to(dtype)
    (grad_ours,) = torch.autograd.grad(ours, student, upstream)
    (grad_trl,) = torch.autograd.grad(trl, student, upstream)
    assert torch.equal(grad_ours, grad_trl)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("scale", [3.0, 40.0])  # 40: log-probabilities down to about -300, where exp underflows
def test_closed_form_divergence_and_gradient_equal_trl_operations(beta, temperature, scale):
    """`generalized_jsd_and_logit_grad` (the chunked loss's divergence and backward) against TRL's operations
    (`generalized_jsd_from_log_probs`) and autograd through them and the `log_softmax`."""
    from speckd_trl.losses import generalized_jsd_and_logit_grad, generalized_jsd_from_log_probs, jsd_log_probs

    generator = torch.Generator().manual_seed(0)
    student = (scale * torch.randn(4, 5, 50, generator=generator, dtype=torch.float64)).requires_grad_()
    teacher = scale * torch.randn(4, 5, 50, generator=generator, dtype=torch.float64)
    log_q, log_p = jsd_log_probs(student, temperature), jsd_log_probs(teacher, temperature)
    reference = generalized_jsd_from_log_probs(log_q, log_p, beta=beta).sum(dim=-1)
    reference.sum().backward()
    divergence, grad = generalized_jsd_and_logit_grad(log_q.detach(), log_p, beta=beta)
    torch.testing.assert_close(divergence, reference.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad / temperature, student.grad, rtol=1e-10, atol=1e-12)
    value_only, none = generalized_jsd_and_logit_grad(log_q.detach(), log_p, beta=beta, grad=False)
    assert none is None and torch.equal(value_only, divergence)
